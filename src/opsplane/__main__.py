"""``python -m opsplane`` is the ``opsplane`` command."""

from opsplane.cli.entry import main

main()
