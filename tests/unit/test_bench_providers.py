"""bench/run's registry (bench/suite/providers.py): every budget row has someone to measure it,
every provider can run in this tree, and the adapters read what the scripts really print."""

from __future__ import annotations

from collections import Counter

from bench.suite import scripts
from bench.suite.common import REPO
from bench.suite.figures import BUDGETS
from bench.suite.providers import PROVIDERS


def test_every_budget_row_has_exactly_one_provider() -> None:
    owners = Counter(key for provider in PROVIDERS for key in provider.keys)
    budgeted = [b.key for b in BUDGETS if b.limit is not None or b.ratio is not None]
    # memory.soak is the --soak entry's; every other budget row is a provider's, and only one's.
    assert {key for key in budgeted if owners[key] != 1} == {"memory.soak"}


def test_every_provider_runs_in_this_tree() -> None:
    for provider in PROVIDERS:
        if provider.script is not None:
            assert (REPO / provider.script).exists(), provider
        else:
            assert provider.measure is not None, provider


def test_the_broadcast_adapter_reads_bench_broadcast_py_lines() -> None:
    # The lines as bench/broadcast.py prints them (its f-strings, filled in).
    source = (REPO / "bench" / "broadcast.py").read_text()
    assert "median submit → all terminal: {statistics.median(totals):.2f} s" in source
    assert 'f"throughput: {tasks} one-host tasks over {len(hosts)} agents: "' in source
    line = "throughput: 3000 one-host tasks over 100 agents: 812 runs/s"
    found = scripts._THROUGHPUT.search(line)
    assert found is not None and found.groups() == ("3000", "100", "812")
    found = scripts._BROADCAST.search("median submit → all terminal: 0.14 s")
    assert found is not None and found.group(1) == "0.14"
