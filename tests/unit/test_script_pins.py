"""Pinning scripts by content hash: the verified copies that run, seed 003's pins file, and the
catalog's ``sha256`` field (validated at load, bound to a verified copy at run time)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsplane.catalog import CatalogError, ExternalEntry, load_catalog
from opsplane.domain.errors import ConfigError, Conflict, InvalidInput
from opsplane.remoterun.scripts import (
    SCRIPT_PATH_ENV,
    ScriptChanged,
    ScriptNotApproved,
    ScriptPins,
    ScriptRefused,
    VerifiedCopies,
    parse_sha256,
)

V1 = b"#!/bin/sh\necho v1\n"
V2 = b"#!/bin/sh\necho v2\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _script(path: Path, data: bytes = V1) -> Path:
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def test_a_pin_is_64_hex_digits_in_either_case() -> None:
    digest = _sha(V1)
    assert parse_sha256(digest.upper()) == digest
    for bad in ("", "abc", digest[:-1] + "g", None, 42, "sha256:" + digest):
        with pytest.raises(ValueError, match="64 hexadecimal digits"):
            parse_sha256(bad)


def test_the_verified_copy_holds_exactly_the_hashed_bytes_and_is_read_only(
    tmp_path: Path,
) -> None:
    script = _script(tmp_path / "backup.sh")
    copies = VerifiedCopies(tmp_path / "verified")
    copy = copies.verified(script, _sha(V1), label="script x", hint="")
    assert copy == tmp_path / "verified" / _sha(V1) / "backup.sh"
    assert copy.read_bytes() == V1
    assert stat.S_IMODE(copy.stat().st_mode) == 0o500
    # The same content again reuses the copy; no temporary file is left behind.
    assert copies.verified(script, _sha(V1), label="script x", hint="") == copy
    assert sorted(p.name for p in (tmp_path / "verified").iterdir()) == [_sha(V1)]


def test_a_changed_script_is_refused_naming_both_hashes_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    script = _script(tmp_path / "backup.sh", V2)
    copies = VerifiedCopies(tmp_path / "verified")
    with pytest.raises(ScriptChanged) as caught:
        copies.verified(script, _sha(V1), label="script 'backup.sh'", hint="Re-approve it.")
    message = str(caught.value)
    assert "script 'backup.sh' changed since it was approved" in message
    assert f"expected sha256 {_sha(V1)[:12]}…, found {_sha(V2)[:12]}…" in message
    assert message.endswith("Re-approve it.")
    assert list((tmp_path / "verified").iterdir()) == []
    # A 409 for the generic API handler, and a 4xx for routes that only know InvalidInput.
    assert isinstance(caught.value, Conflict) and isinstance(caught.value, InvalidInput)


def test_a_script_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    copies = VerifiedCopies(tmp_path / "verified")
    with pytest.raises(ScriptRefused, match="cannot be read"):
        copies.verified(tmp_path / "gone.sh", _sha(V1), label="script 'gone.sh'", hint="")
    fifo = tmp_path / "fifo.sh"
    os.mkfifo(fifo)
    with pytest.raises(ScriptRefused, match="not a regular file"):
        copies.verified(fifo, _sha(V1), label="script 'fifo.sh'", hint="")


def test_approval_writes_the_pins_file_and_reapproval_replaces_the_hash(tmp_path: Path) -> None:
    script = _script(tmp_path / "backup.sh")
    pins = ScriptPins(tmp_path / "data")
    assert pins.load() == {}
    assert pins.approve([script]) == [(script, _sha(V1), None)]
    assert pins.load() == {str(script): _sha(V1)}
    assert pins.check(script, "backup.sh").sha256 == _sha(V1)

    script.write_bytes(V2)
    with pytest.raises(ScriptChanged, match="opsplane scripts approve"):
        pins.check(script, "backup.sh")
    assert pins.approve([script]) == [(script, _sha(V2), _sha(V1))]
    approved = pins.check(script, "backup.sh")
    assert approved.sha256 == _sha(V2) and approved.path.read_bytes() == V2

    assert pins.revoke([str(script), "/not/pinned"]) == [str(script)]
    assert pins.load() == {}


def test_unpinned_scripts_run_in_place_unless_pins_are_required(tmp_path: Path) -> None:
    script = _script(tmp_path / "backup.sh")
    approved = ScriptPins(tmp_path / "data").check(script, "backup.sh")
    assert approved.path == script and approved.sha256 is None
    with pytest.raises(ScriptNotApproved, match="not approved and script_pins_required is on"):
        ScriptPins(tmp_path / "data", required=True).check(script, "backup.sh")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[a, b]\n", "must be a mapping"),
        ("relative.sh: " + "0" * 64 + "\n", "is not an absolute path"),
        ("/x.sh: nothex\n", "64 hexadecimal digits"),
        ("/x.sh: [\n", "not valid YAML"),
    ],
)
def test_a_broken_pins_file_is_a_config_error(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "script-pins.yaml").write_text(text)
    with pytest.raises(ConfigError, match=reason):
        ScriptPins(tmp_path).load()


# The catalog's sha256 -------------------------------------------------------------------------


@pytest.fixture
def collect(tmp_path: Path) -> Path:
    directory = tmp_path / "collect"
    directory.mkdir()
    _script(directory / "s.sh")
    return directory


def _load(tmp_path: Path, **fields: Any) -> ExternalEntry:
    entry = {"name": "pinned", "cluster_type": "test", "collected": True, **fields}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump([entry]))
    (loaded,) = load_catalog(path).entries
    assert isinstance(loaded, ExternalEntry)
    return loaded


def test_a_collected_entry_takes_a_sha256_of_its_script_file(tmp_path: Path, collect: Path) -> None:
    entry = _load(
        tmp_path, language="sh", executable="s.sh --fast", sha256=_sha(V1).upper(), args=["a"]
    )
    assert entry.sha256 == _sha(V1)
    assert entry.script_file == collect.resolve() / "s.sh"
    # At run time the verified copy takes the script's place, and says where it came from.
    bound = dataclasses.replace(entry, run_path=tmp_path / "copy" / "s.sh")
    assert bound.argv(["x"]) == ("sh", "-c", f"{tmp_path}/copy/s.sh --fast a x")
    assert bound.exec_spec(["x"]).env == {SCRIPT_PATH_ENV: str(collect.resolve() / "s.sh")}
    assert entry.exec_spec(["x"]).env == {}


def test_a_binary_with_an_absolute_path_can_be_pinned(tmp_path: Path) -> None:
    program = _script(tmp_path / "tool")
    entry = _load(
        tmp_path, language="binary", executable=f"{program} -v", collected=False, sha256=_sha(V1)
    )
    assert entry.script_file == program
    bound = dataclasses.replace(entry, run_path=tmp_path / "copy" / "tool")
    assert bound.argv(["x"]) == (str(tmp_path / "copy" / "tool"), "-v", "x")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"language": "sh", "executable": "echo hi", "collected": False},
            "sha256 pins a script file, but with language sh and collected: false the "
            "executable is an inline shell command",
        ),
        (
            {"language": "binary", "executable": "ls -l", "collected": False},
            "must be an absolute path",
        ),
        (
            {"language": "binary", "executable": "/nonexistent/tool", "collected": False},
            "not found",
        ),
        ({"language": "sh", "executable": "s.sh", "sha256": "abc"}, "sha256: a SHA-256 is 64"),
    ],
)
def test_a_sha256_that_pins_no_script_file_refuses_the_catalog(
    tmp_path: Path, collect: Path, fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(CatalogError, match="entry #1 \\('pinned'\\)") as caught:
        _load(tmp_path, **{"sha256": _sha(V1), **fields})
    assert reason in str(caught.value)


def test_a_script_path_with_a_trailing_slash_is_refused(tmp_path: Path) -> None:
    from opsplane.remoterun.scripts import ScriptDirs

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _script(scripts / "ok.sh")
    dirs = ScriptDirs([scripts])
    assert dirs.resolve("ok.sh") == (scripts / "ok.sh").resolve()
    for spelling in ("ok.sh/", "/scripts/ok.sh/", f"{scripts}/ok.sh/", "ok.sh//"):
        with pytest.raises(ScriptRefused, match="ends with '/'"):
            dirs.resolve(spelling)


def test_a_hard_link_into_the_script_directory_runs_only_when_pinned(tmp_path: Path) -> None:
    from opsplane.remoterun.scripts import ScriptDirs

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    elsewhere = _script(tmp_path / "writable-by-someone-else.sh")
    os.link(elsewhere, scripts / "linked.sh")
    script = ScriptDirs([scripts]).resolve("linked.sh")
    pins = ScriptPins(tmp_path / "data")
    with pytest.raises(ScriptRefused, match="2 hard links") as refused:
        pins.check(script, "linked.sh")
    assert "opsplane scripts approve" in str(refused.value)
    pins.approve([script])
    approved = pins.check(script, "linked.sh")
    assert approved.sha256 == _sha(V1) and approved.path != script  # the verified copy runs
    # Changed through its other name: the pin catches it.
    elsewhere.write_bytes(V2)
    with pytest.raises(ScriptChanged):
        pins.check(script, "linked.sh")
