"""The catalog file (seed 004): validation with the entry named, argv building, kebab-case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsplane.catalog import (
    CatalogError,
    ExternalEntry,
    HandlerRegistry,
    InternalEntry,
    kebab_case,
    load_catalog,
)
from opsplane.catalog.registry import BodyError, parse_any_json, parse_string_array
from opsplane.transport.local import HandlerContext

FIXTURE = Path(__file__).parents[1] / "fixtures" / "catalog" / "catalog.yaml"

DEMO1: dict[str, Any] = {
    "name": "demo1",
    "cluster_type": "TendbCluster",
    "language": "sh",
    "executable": "echo hello",
    "args": ["aaa", "bbb"],
    "collected": False,
}


@pytest.fixture
def collect(tmp_path: Path) -> Path:
    directory = tmp_path / "collect"
    directory.mkdir()
    for name, mode in (("s.sh", 0o755), ("testbin", 0o755), ("kkk.pl", 0o644), ("x.py", 0o644)):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(mode)
    (directory / "sub").mkdir()
    (directory / "sub" / "tool").write_text("#!/bin/sh\n")
    (directory / "sub" / "tool").chmod(0o755)
    return directory


def _write(tmp_path: Path, entries: Any) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(entries) if not isinstance(entries, str) else entries)
    return path


def _load(tmp_path: Path, *entries: dict[str, Any]) -> list[ExternalEntry]:
    catalog = load_catalog(_write(tmp_path, list(entries)))
    return [e for e in catalog.entries if isinstance(e, ExternalEntry)]


def _entry(tmp_path: Path, **fields: Any) -> ExternalEntry:
    (entry,) = _load(tmp_path, {**DEMO1, **fields})
    return entry


# Argv building ------------------------------------------------------------------------------


def test_the_seeds_demo1_example_runs_sh_dash_c_with_everything_joined(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    assert entry.sync_path == "/sync/tendb-cluster/demo1"
    assert entry.async_path == "/async/tendb-cluster/demo1"
    assert entry.argv(["123", "456"]) == ("sh", "-c", "echo hello aaa bbb 123 456")


def test_sh_and_bash_pass_args_and_body_to_the_shell_unquoted_as_the_seed_does(
    tmp_path: Path,
) -> None:
    entry = _entry(tmp_path, executable="printf '%s|' x", args=["a b"])
    assert entry.argv(["$HOME", "; id"]) == ("sh", "-c", "printf '%s|' x a b $HOME ; id")
    bash = _entry(tmp_path, language="bash", executable="echo $BASH_VERSION", args=[])
    assert bash.argv() == ("bash", "-c", "echo $BASH_VERSION")


def test_language_shell_runs_like_sh_as_the_seeds_prose_says(tmp_path: Path) -> None:
    # Seed 004: "值为 sh, shell 时会以 sh -c $Executable $Args 方式执行".
    entry = _entry(tmp_path, language="shell")
    assert entry.argv(["123", "456"]) == ("sh", "-c", "echo hello aaa bbb 123 456")


def test_collected_sh_script_runs_by_its_path_under_collect(tmp_path: Path, collect: Path) -> None:
    entry = _entry(tmp_path, executable="s.sh  -v", args=["x"], collected=True)
    assert entry.argv(["y"]) == ("sh", "-c", f"{collect / 's.sh'} -v x y")


def test_binary_runs_directly_with_extras_args_and_body_in_order(
    tmp_path: Path, collect: Path
) -> None:
    entry = _entry(
        tmp_path, language="binary", executable="sub/tool 1 '2 3'", args=["4"], collected=True
    )
    assert entry.argv(["5 6", "$X"]) == (
        str(collect / "sub" / "tool"),
        "1",
        "2 3",
        "4",
        "5 6",
        "$X",
    )
    plain = _entry(tmp_path, language="binary", executable="/bin/echo -n", args=[])
    assert plain.argv(["a"]) == ("/bin/echo", "-n", "a")


@pytest.mark.parametrize("language", ["python", "python2", "python3", "perl"])
def test_interpreters_run_language_then_script_then_arguments(
    tmp_path: Path, collect: Path, language: str
) -> None:
    entry = _entry(
        tmp_path, language=language, executable="x.py --flag", args=["a"], collected=True
    )
    assert entry.argv(["b"]) == (language, str(collect / "x.py"), "--flag", "a", "b")
    plain = _entry(tmp_path, language=language, executable="/opt/kkk.pl", args=[])
    assert plain.argv() == (language, "/opt/kkk.pl")


def test_collect_dir_may_be_given_explicitly(tmp_path: Path, collect: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = _write(
        elsewhere, [{**DEMO1, "language": "perl", "executable": "kkk.pl", "collected": True}]
    )
    (entry,) = load_catalog(path, collect_dir=collect).entries
    assert isinstance(entry, ExternalEntry) and entry.argv()[1] == str(collect / "kkk.pl")


def test_the_fixture_catalog_loads(tmp_path: Path) -> None:
    catalog = load_catalog(FIXTURE)
    names = [entry.name for entry in catalog.entries]
    assert names[:5] == ["demo1", "demo2", "demo3", "demopython", "demoperl"]
    assert catalog.find("tendb-cluster", "demo1") is not None


# Validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"language": "ruby"},
            "language must be one of python, python2, python3, perl, sh, shell, bash, binary, "
            "got 'ruby'",
        ),
        ({"collected": None}, "collected is required (true or false)"),
        ({"executable": ""}, "executable"),
        ({"executable": "   "}, "executable must not be blank"),
        ({"colected": True}, "unknown field 'colected'"),
        ({"args": "aaa"}, "args"),
        ({"args": [["x"]]}, "args.0"),
        ({"name": "../etc"}, "name must be letters"),
        ({"name": "a/b"}, "name must be letters"),
        ({"cluster_type": "%%"}, "cluster_type '%%' does not make a path segment"),
        ({"timeout": 0}, "timeout"),
        ({"language": "binary", "executable": "x 'unclosed"}, "cannot be split into words"),
        ({"collected": True, "executable": "/abs/s.sh"}, "must be a path relative"),
        ({"collected": True, "executable": "../s.sh"}, "must not contain '..'"),
        ({"collected": True, "executable": "sub/../../s.sh"}, "must not contain '..'"),
        ({"collected": True, "executable": "~/s.sh"}, "must be a path relative"),
        ({"collected": True, "executable": "missing.sh"}, "not found in the collect directory"),
        ({"collected": True, "executable": "kkk.pl"}, "is not executable"),
    ],
)
def test_a_bad_entry_is_refused_with_its_position_name_and_reason(
    tmp_path: Path, collect: Path, change: dict[str, Any], reason: str
) -> None:
    good = {**DEMO1, "name": "first"}
    bad = {**DEMO1, **change}
    with pytest.raises(CatalogError) as caught:
        _load(tmp_path, good, bad)
    message = str(caught.value)
    assert str(tmp_path / "catalog.yaml") in message
    assert "entry #2" in message and reason in message
    if bad.get("name") == "demo1":
        assert "'demo1'" in message


def test_missing_collected_is_refused(tmp_path: Path) -> None:
    entry = {k: v for k, v in DEMO1.items() if k != "collected"}
    with pytest.raises(
        CatalogError,
        match=r"entry #1 \('demo1'\): collected is required \(true or false\)",
    ):
        _load(tmp_path, entry)


def test_duplicate_route_is_refused_naming_both_entries(tmp_path: Path) -> None:
    other = {**DEMO1, "cluster_type": "tendb_cluster"}  # same kebab-case path segment
    with pytest.raises(
        CatalogError,
        match=r"entry #2 \('demo1'\): duplicate route /sync/tendb-cluster/demo1 "
        r"\(already used by entry #1 \('demo1'\)\)",
    ):
        _load(tmp_path, DEMO1, other)


def test_an_entry_may_not_take_an_in_process_handlers_route(tmp_path: Path) -> None:
    registry = HandlerRegistry()

    @registry.register(cluster_type="TendbCluster", name="demo1")
    async def _handler(ctx: HandlerContext, body: Any) -> int:
        return 0

    with pytest.raises(CatalogError, match="already used by in-process handler"):
        load_catalog(_write(tmp_path, [DEMO1]), handlers=registry)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("{name: demo1}", "must be a YAML list of tasks, got a dict"),
        ("- just a string", "entry #1: must be a mapping of fields, got a str"),
        ("- name: [unclosed", "not valid YAML"),
    ],
)
def test_a_bad_document_is_refused(tmp_path: Path, document: str, reason: str) -> None:
    with pytest.raises(CatalogError, match=reason):
        load_catalog(_write(tmp_path, document))


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read it"):
        load_catalog(tmp_path / "nope.yaml")


def test_an_empty_file_is_an_empty_catalog_and_numbers_in_args_are_text(tmp_path: Path) -> None:
    assert load_catalog(_write(tmp_path, "")).entries == []
    assert _entry(tmp_path, args=[1, 2.5]).args == ("1", "2.5")


# Routes, kebab-case, bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster_type", "segment"),
    [
        ("TendbCluster", "tendb-cluster"),
        ("TendbHA", "tendb-ha"),
        ("TendbSingle", "tendb-single"),
        ("sqlsvr", "sqlsvr"),
        ("redis", "redis"),
        ("MongoDB", "mongo-db"),
        ("HTTPServer", "http-server"),
        ("tendb_cluster", "tendb-cluster"),
        ("Tendb Cluster", "tendb-cluster"),
        ("tendb-cluster", "tendb-cluster"),
        ("Es7Cluster", "es7-cluster"),
    ],
)
def test_cluster_types_become_kebab_case(cluster_type: str, segment: str) -> None:
    assert kebab_case(cluster_type) == segment


def test_list_shows_each_entrys_sync_and_async_route_then_the_fixed_ones(
    tmp_path: Path,
) -> None:
    registry = HandlerRegistry()

    @registry.register(cluster_type="TendbHA", name="counter")
    async def _counter(ctx: HandlerContext, body: Any) -> int:
        return 0

    catalog = load_catalog(_write(tmp_path, [DEMO1]), handlers=registry)
    assert catalog.routes() == [
        ("POST", "/sync/tendb-cluster/demo1"),
        ("POST", "/async/tendb-cluster/demo1"),
        ("POST", "/sync/tendb-ha/counter"),
        ("POST", "/async/tendb-ha/counter"),
        ("POST", "/async/kill"),
        ("POST", "/async/query"),
        ("GET", "/list"),
    ]
    handler = catalog.find("tendb-ha", "counter")
    assert isinstance(handler, InternalEntry)
    assert handler.exec_spec({"count": 2}).args == (json.dumps({"count": 2}),)
    assert set(registry.link_handlers()) == {handler.handler}


def test_a_handler_route_registered_twice_is_refused() -> None:
    registry = HandlerRegistry()

    async def handler(ctx: HandlerContext, body: Any) -> int:
        return 0

    registry.register(cluster_type="redis", name="x")(handler)
    with pytest.raises(CatalogError, match="registered twice"):
        registry.register(cluster_type="Redis", name="x")(handler)
    with pytest.raises(CatalogError, match="name must be letters"):
        registry.register(cluster_type="redis", name="a b")(handler)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"not json", 400),
        (b"\xff", 400),
        (b'{"a": 1}', 422),
        (b'"123"', 422),
        (b"[1, 2]", 422),
        (b'["a", null]', 422),
        (b'["a\\u0000b"]', 422),
    ],
)
def test_an_external_task_body_must_be_a_json_array_of_strings(raw: bytes, status: int) -> None:
    with pytest.raises(BodyError) as caught:
        parse_string_array(raw)
    assert caught.value.status == status


def test_bodies_that_are_accepted() -> None:
    assert parse_string_array(b"") == ()
    assert parse_string_array(b' ["123", "456"] ') == ("123", "456")
    assert parse_any_json(b"") is None
    assert parse_any_json(b'{"count": 2}') == {"count": 2}
