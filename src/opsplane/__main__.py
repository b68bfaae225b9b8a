"""``python -m opsplane`` is the ``opsplane`` command."""

from opsplane.cli.main import main

main()
