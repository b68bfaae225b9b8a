"""The agent bundle: what ``opsplane agents deploy`` pushes to a host, built from the control
plane's own installation so that a fleet gets exactly the version the control plane runs, with
no package index on the way (an offline fleet works).

A bundle is a directory of at most two files and a manifest:

- ``opsplane.pyz``: a zipapp (``python3 opsplane.pyz agent …``) of the installed ``opsplane``
  package, pure Python.
- ``site.tar.gz``: the installed distributions the agent imports (grpcio, protobuf,
  cryptography, httpx, … and their own dependencies), copied file for file from this
  environment's site-packages. Compiled ones only load on a host whose Python has the same
  ``cache_tag`` (``cpython-311``) and platform (``linux-x86_64``); the manifest says which.
- ``manifest.json``: ``cache_tag``, ``platform``, the distributions with their versions.

Both archives are written byte-for-byte reproducibly (fixed timestamps, sorted members), so
the same installation always gives the same ``digest``, which is what a host's "already
current" is judged by, across control-plane restarts too.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import opsplane
from opsplane.domain.errors import ConfigError

PYZ = "opsplane.pyz"
SITE = "site.tar.gz"
MANIFEST = "manifest.json"
# What a running agent imports, enrollment included; optional links are added when installed.
_AGENT_IMPORTS = (
    "opsplane.cli.agent_main", "opsplane.agent.daemon", "opsplane.agent.grpc_link",
    "opsplane.agent.enroll", "httpx",
)  # fmt: skip
_OPTIONAL_IMPORTS = ("opsplane.agent.amqp_link",)
# In sys.modules of any process (setuptools' distutils hack) or owning a top-level name the
# agent imports (grpc_tools beside grpc), but never needed by an agent.
_NOT_SHIPPED = frozenset({"opsplane", "setuptools", "pip", "grpcio-tools"})
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MAIN = "from opsplane.cli.entry import main\n\nmain()\n"


@dataclass(frozen=True)
class Bundle:
    path: Path
    digest: str
    cache_tag: str
    platform: str
    distributions: tuple[str, ...]  # "name==version"

    @property
    def has_site(self) -> bool:
        return (self.path / SITE).is_file()

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(n for n in (PYZ, SITE) if (self.path / n).is_file())

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """A bundle directory (built here or elsewhere); its digest is computed, not trusted."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not an agent bundle ({MANIFEST}: {e})") from e
        if not (path / PYZ).is_file():
            raise ConfigError(f"{path} is not an agent bundle: {PYZ} is missing")
        return cls(
            path=path,
            digest=_digest(path),
            cache_tag=str(manifest.get("cache_tag", "")),
            platform=str(manifest.get("platform", "")),
            distributions=tuple(manifest.get("distributions") or ()),
        )


def build_bundle(cache_root: Path) -> Bundle:
    """The bundle of this installation, built once into ``cache_root`` (kept there across
    restarts, keyed by the installation's fingerprint)."""
    fingerprint = _fingerprint()
    target = cache_root / fingerprint[:20]
    if (target / MANIFEST).is_file():
        return Bundle.load(target)
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = cache_root / f".build-{uuid.uuid4().hex}"
    scratch.mkdir()
    try:
        _write_pyz(scratch / PYZ)
        dists = _agent_distributions()
        _write_site(scratch / SITE, dists)
        manifest = {
            "opsplane": opsplane.__version__,
            "cache_tag": sys.implementation.cache_tag,
            "platform": sysconfig.get_platform(),
            "distributions": sorted(f"{d.metadata['Name']}=={d.version}" for d in dists),
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(scratch, target)
        except OSError:  # another build finished first: use it
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Bundle.load(target)


def _digest(path: Path) -> str:
    total = hashlib.sha256()
    for name in (PYZ, SITE):
        file = path / name
        if file.is_file():
            total.update(f"{name}\0{_file_sha256(file)}\n".encode())
    return total.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _package_files() -> list[tuple[Path, str]]:
    root = Path(opsplane.__file__).parent
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            found.append((path, "opsplane/" + path.relative_to(root).as_posix()))
    return found


def _fingerprint() -> str:
    """Changes when the opsplane package or any installed distribution changes."""
    digest = hashlib.sha256(f"{sys.implementation.cache_tag} {sysconfig.get_platform()}".encode())
    for path, name in _package_files():
        stat = path.stat()
        digest.update(f"{name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    for dist in sorted(md.distributions(), key=lambda d: str(d.metadata["Name"]).lower()):
        digest.update(f"{dist.metadata['Name']}=={dist.version}\n".encode())
    return digest.hexdigest()


def _write_pyz(target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "__main__.py", _MAIN.encode())
        for path, name in _package_files():
            _add(archive, name, path.read_bytes())


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _agent_distributions() -> list[md.Distribution]:
    """The installed distributions an agent process imports, found by importing what the agent
    imports in a fresh interpreter (so nothing the control plane loaded counts)."""
    probe = (
        "import importlib, json, sys\n"
        f"for m in {_AGENT_IMPORTS!r}: importlib.import_module(m)\n"
        f"for m in {_OPTIONAL_IMPORTS!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except ImportError: pass\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, timeout=120
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"cannot find the agent's dependencies: {e}") from e
    tops = json.loads(out)
    owners = md.packages_distributions()
    names = {dist for top in tops for dist in owners.get(top, ())} - _NOT_SHIPPED
    # Plus what those require, installed here: some import lazily (httpx its transport).
    found: dict[str, md.Distribution] = {}
    todo = sorted(names)
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = _normal(str(dist.metadata["Name"]))
        if key in found or key in _NOT_SHIPPED:
            continue
        found[key] = dist
        for requirement in dist.requires or ():
            if "extra ==" not in requirement.replace('"', "").replace("'", ""):
                match = re.match(r"[A-Za-z0-9._-]+", requirement)
                if match:
                    todo.append(match.group(0))
    return sorted(found.values(), key=lambda d: _normal(str(d.metadata["Name"])))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _write_site(target: Path, dists: list[md.Distribution]) -> None:
    members: dict[str, Path] = {}
    for dist in dists:
        base = Path(str(dist.locate_file("")))
        for entry in dist.files or ():
            relative = Path(str(entry))
            # Scripts land outside site-packages (../../bin); caches are rebuilt on the host.
            if relative.parts[:1] == ("..",) or "__pycache__" in relative.parts:
                continue
            source = base / relative
            if source.is_file():
                members[relative.as_posix()] = source
    with (
        target.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for name in sorted(members):
            data = members[name].read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if os.access(members[name], os.X_OK) else 0o644
            archive.addfile(info, io.BytesIO(data))


def wheel_platforms(platform: str, libc: str) -> list[str]:
    """pip's ``--platform`` tags for a host of sysconfig ``platform`` (``linux-x86_64``) and
    ``libc`` (``glibc 2.36``): every manylinux (or musllinux) tag its C library can load."""
    system, _, arch = platform.partition("-")
    if system != "linux" or not arch:
        raise ConfigError(f"no wheelhouse can be built for a {platform or 'unknown'} host")
    kind, _, version = libc.partition(" ")
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = numbers[0], numbers[1]
    tags = [f"linux_{arch}"]
    if kind == "glibc" and major == 2:
        tags += [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{arch}" for m, name in legacy.items() if minor >= m]
    elif kind.startswith("musl"):
        tags += [f"musllinux_1_{m}_{arch}" for m in range(max(minor, 1), -1, -1)]
    return tags


def build_wheelhouse(
    cache_root: Path, requirements: tuple[str, ...], cache_tag: str, platform: str, libc: str
) -> Path:
    """The wheels of ``requirements`` for a host's Python (``cache_tag`` ``cpython-312``,
    ``platform``, ``libc``), fetched with ``pip download`` by the control plane (from its
    index or its pip configuration's), once per kind of host: kept in ``cache_root``."""
    match = re.fullmatch(r"cpython-(\d)(\d+)", cache_tag)
    if not match:
        raise ConfigError(f"no wheelhouse can be built for a {cache_tag or 'unknown'} python")
    version = f"{match.group(1)}.{match.group(2)}"
    key = hashlib.sha256(
        "\n".join((cache_tag, platform, libc, *sorted(requirements))).encode()
    ).hexdigest()
    target = cache_root / key[:20]
    if (target / ".complete").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = cache_root / f".build-{uuid.uuid4().hex}"
    command = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
        "-q", "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
        "--abi", f"cp{match.group(1)}{match.group(2)}", "--abi", "abi3", "--abi", "none",
        *(a for tag in wheel_platforms(platform, libc) for a in ("--platform", tag)),
        "-d", str(scratch), *requirements,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if line.strip()][-2:]
            raise ConfigError(
                f"pip download of the agent's dependencies for {cache_tag} {platform} failed: "
                + " ".join(last)
            )
        (scratch / ".complete").write_text("\n".join(requirements) + "\n")
        try:
            os.replace(scratch, target)
        except OSError:  # another build finished first: use it
            shutil.rmtree(scratch, ignore_errors=True)
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ConfigError(f"cannot run pip download for the agent's wheelhouse: {e}") from e
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target
