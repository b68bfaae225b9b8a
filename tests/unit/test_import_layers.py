"""The layering of DESIGN.md §6, checked on the source: which package may import which, and no
import cycles. The source is parsed, not imported, so that an import inside a function (a lazy
one) counts as much as one at the top. The agent's footprint at run time is checked by
tests/integration/test_agent_footprint.py; this is its static counterpart for the server side."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import opsplane

SRC = Path(opsplane.__file__).parent


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted (a module, or a module's name)
    line: int
    top_level: bool  # at module level, outside ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = ["opsplane", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # ``from . import x`` in a package's __init__ is relative to the package itself.
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> Iterator[Import]:
    """Every import in the file at ``path``, lazy and TYPE_CHECKING ones included."""
    yield from imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    tree = ast.parse(source)

    def walk(node: ast.AST, top: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, top)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                for alias in child.names:
                    yield Import(module, f"{base}.{alias.name}", child.lineno, top)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
                isinstance(child, ast.If) and _is_type_checking(child)
            ):
                yield from walk(child, False)
            else:
                yield from walk(child, top)

    yield from walk(tree, True)


def all_imports() -> list[Import]:
    return [i for path in sorted(SRC.rglob("*.py")) for i in imports_of(path)]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# (importer, imported): no module under the first may import anything under the second.
FORBIDDEN = [
    # Routes call engine and security services, which hand out domain records
    # (domain/records.py); the composition root (opsplane.app_factory) is outside ``api``.
    ("opsplane.api", "opsplane.store"),
    # The engine knows the agent keys and the secret box only as engine/ports.py's protocols,
    # wired by opsplane.app_factory.make_engine.
    ("opsplane.engine", "opsplane.security"),
    ("opsplane.engine", "opsplane.api"),
    # DESIGN §6: the domain imports nothing of ours; a transport never touches the store.
    ("opsplane.domain", "opsplane.store"),
    ("opsplane.domain", "opsplane.engine"),
    ("opsplane.domain", "opsplane.api"),
    ("opsplane.transport", "opsplane.store"),
    ("opsplane.transport", "opsplane.engine"),
    ("opsplane.transport", "opsplane.api"),
    # An agent runs on every host: nothing of the control plane (see its footprint test).
    ("opsplane.agent", "opsplane.store"),
    ("opsplane.agent", "opsplane.engine"),
    ("opsplane.agent", "opsplane.api"),
]


def violations(imports: list[Import]) -> list[str]:
    return [
        f"{i.module} (line {i.line}) imports {i.target}"
        for i in imports
        for importer, imported in FORBIDDEN
        if _within(i.module, importer) and _within(i.target, imported)
    ]


def test_no_package_imports_a_layer_it_must_not() -> None:
    assert violations(all_imports()) == []


def test_the_layer_check_sees_lazy_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from opsplane.store.tables import TaskRow\n"
        "def f() -> None:\n    from ...store import queries\n"
    )
    parsed = list(imports_in(source, "opsplane.domain.sub.probe"))
    assert parsed[1:] == [
        Import("opsplane.domain.sub.probe", "opsplane.store.tables.TaskRow", 3, False),
        Import("opsplane.domain.sub.probe", "opsplane.store.queries", 5, False),
    ]
    assert len(violations(parsed)) == 2


def _top_level_graph(*, lazy_too: bool = False) -> dict[str, set[str]]:
    """Module → the modules of ours it imports when it is imported (top level, not
    TYPE_CHECKING; with ``lazy_too``, also inside functions and under TYPE_CHECKING).
    ``from pkg import name`` counts as importing ``pkg.name`` if that is a module, else
    ``pkg``."""
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in all_imports():
        if not (i.top_level or lazy_too) or not _within(i.target, "opsplane"):
            continue
        target = i.target
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != i.module:
            graph[i.module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exporting its modules, which import each other through the
    # package's full path, is not a cycle between responsibilities: ignore edges into inits
    # from their own submodules.
    return {
        m: {t for t in targets if not (m.startswith(t + ".") and t != "opsplane")}
        for m, targets in graph.items()
    }


def test_no_import_cycles_among_top_level_imports() -> None:
    assert cycles(_without_package_inits(_top_level_graph())) == []


def test_no_import_cycles_even_through_lazy_imports() -> None:
    # A lazy import breaks the cycle at start-up, not in the design: none either.
    assert cycles(_without_package_inits(_top_level_graph(lazy_too=True))) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


# Each pair once imported the other (issue 21): the shared thing now lives in a lower module
# (catalog.registry's InternalEntries, transport/ssh/work.py's WorkPublisher), and the lower of
# the pair does not import the upper at all, not even lazily or for type checking.
LOWER_UPPER = [
    ("opsplane.catalog.registry", "opsplane.catalog.handlers"),
    ("opsplane.transport.ssh.link", "opsplane.transport.ssh.worker"),
    ("opsplane.transport.ssh.work", "opsplane.transport.ssh.worker"),
]


def test_the_lower_module_of_a_former_cycle_never_imports_the_upper() -> None:
    imports = all_imports()
    assert [
        f"{i.module} (line {i.line}) imports {i.target}"
        for lower, upper in LOWER_UPPER
        for i in imports
        if i.module == lower and _within(i.target, upper)
    ] == []
