"""Roles and principals live in the domain (``opsplane.domain.roles``): the engine checks
template grants with them and may not import ``security``. Re-exported here for the
security side's callers."""

from opsplane.domain.roles import (
    Permission as Permission,
)
from opsplane.domain.roles import (
    Principal as Principal,
)
from opsplane.domain.roles import (
    Role as Role,
)
from opsplane.domain.roles import (
    authorize as authorize,
)
from opsplane.domain.roles import (
    intersect_groups as intersect_groups,
)
from opsplane.domain.roles import (
    lesser_role as lesser_role,
)
from opsplane.domain.roles import (
    normalize_groups as normalize_groups,
)
from opsplane.domain.roles import (
    parse_role as parse_role,
)
from opsplane.domain.roles import (
    role_at_least as role_at_least,
)
