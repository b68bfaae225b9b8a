from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.fleet import Fleet, running_fleet

AGENTS = {"web-1": ("web",), "web-2": ("web",), "db-1": ("db",)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), AGENTS) as the_fleet:
        yield the_fleet


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline:
            found.append(process)
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
