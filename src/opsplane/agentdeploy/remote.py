"""The shell run on a host to deploy, start, stop and inspect its agent. Plain POSIX sh: the
SSH link runs each command under the login user's shell; every value put into a command is
quoted with ``shlex.quote``.

On the host, everything lives in one directory, ``<base>/<host name>`` (the base is
``/opt/opsplane-agent`` for root, ``~/.opsplane-agent`` otherwise, or ``--remote-dir``):

    releases/<digest[:16]>/   opsplane.pyz, site/ (the bundle's dependencies), digest
    current -> releases/…     the release the agent runs
    state/                    the agent's state directory (key, enrollment, spool)
    agent.env                 its settings (OPSPLANE_AGENT_*)
    run-agent.sh              the supervisor, where systemd does not run
    supervisor.pid, agent.pid, agent.log
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

from opsplane.systemd import Role, unit_text

UNIT_NAME = "opsplane-agent.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
# What the bundle's self-check imports: a bundle the agent cannot run fails it.
SELF_CHECK_IMPORTS = (
    "opsplane.cli.agent_main", "opsplane.agent.daemon", "opsplane.agent.grpc_link",
    "opsplane.agent.enroll",
)  # fmt: skip
# The compiled dependencies a host's own python3 must import to run an agent without the
# bundle's site directory.
SYSTEM_DEPENDENCIES = ("grpc", "google.protobuf", "cryptography", "httpx", "psutil")
STOP_WAIT = 90  # seconds a draining agent gets (as the unit's TimeoutStopSec)
# Loads every compiled module of the bundle's dependencies: on a host whose C library or CPU
# cannot (an older glibc than the wheels', say) this fails where the ABI and platform matched.
SITE_CHECK = (
    "import grpc, psutil; from google.protobuf.internal import api_implementation; "
    "from cryptography.hazmat.primitives.asymmetric import ed25519"
)
# The start of the line with which the install command says the bundle's dependencies do
# not load on the host (the deployer then falls back to a venv).
SITE_UNUSABLE = "the bundle's dependencies do not load here:"


@dataclass(frozen=True)
class Probe:
    """What one command found on the host."""

    directory: str
    python: str
    cache_tag: str
    platform: str
    libc: str  # "glibc 2.36", "musl 1.2" or "" (what pip's wheel tags depend on)
    system_dependencies: bool
    current: str  # the digest of the running release ("" if none)
    current_site: bool  # whether that release runs on the bundle's site (else a venv, python3)
    settings: str  # the SHA-256 of agent.env ("" if none)
    running: bool
    systemd: bool
    root: bool
    enrolled: bool

    @classmethod
    def parse(cls, text: str) -> Probe:
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
        yes = {"yes"}.__contains__
        return cls(
            directory=values.get("dir", ""),
            python=values.get("python", ""),
            cache_tag=values.get("cache_tag", ""),
            platform=values.get("platform", ""),
            libc=values.get("libc", ""),
            system_dependencies=yes(values.get("deps", "")),
            current=values.get("current", ""),
            current_site=yes(values.get("current_site", "")),
            settings=values.get("settings", ""),
            running=yes(values.get("running", "")),
            systemd=yes(values.get("systemd", "")),
            root=values.get("uid") == "0",
            enrolled=yes(values.get("enrolled", "")),
        )


def directory_expression(base: str | None, name: str) -> str:
    """Shell that sets ``D`` to the host's agent directory (absolute)."""
    if base:
        chosen = quote(base) if base.startswith("/") else f'"$HOME"/{quote(base)}'
    else:
        chosen = (
            '"$(if [ "$(id -u)" = 0 ]; then echo /opt/opsplane-agent; '
            'else echo "$HOME/.opsplane-agent"; fi)"'
        )
    return f"D={chosen}/{quote(name)}"


def probe_command(base: str | None, name: str) -> str:
    imports = ", ".join(SYSTEM_DEPENDENCIES)
    tags = (
        "import sys, sysconfig, platform; print('cache_tag=' + sys.implementation.cache_tag); "
        "print('platform=' + sysconfig.get_platform()); "
        "print('libc=' + ' '.join(platform.libc_ver()).strip())"
    )
    return f"""{directory_expression(base, name)}
echo "dir=$D"
echo "uid=$(id -u)"
P=$(command -v python3 || true)
echo "python=$P"
if [ -n "$P" ]; then
  "$P" -c {quote(tags)} 2>/dev/null
  if "$P" -c 'import {imports}' >/dev/null 2>&1; then echo deps=yes; else echo deps=no; fi
fi
[ -f "$D/current/digest" ] && echo "current=$(cat "$D/current/digest")"
grep -q '/site$' "$D/current/pythonpath" 2>/dev/null && echo current_site=yes
[ -f "$D/agent.env" ] && echo "settings=$(sha256sum < "$D/agent.env" | cut -d' ' -f1)"
[ -d /run/systemd/system ] && echo systemd=yes
[ -f "$D/state/enrollment.json" ] && echo enrolled=yes
if [ -d /run/systemd/system ] && [ "$(id -u)" = 0 ] && [ -f {UNIT_PATH} ]; then
  systemctl is-active --quiet {UNIT_NAME} && echo running=yes
elif [ -f "$D/supervisor.pid" ] && kill -0 "$(cat "$D/supervisor.pid")" 2>/dev/null; then
  echo running=yes
fi
exit 0
"""


def release_dir(directory: str, digest: str) -> str:
    return f"{directory}/releases/{digest[:16]}"


def incoming_dir(directory: str, digest: str) -> str:
    return f"{directory}/incoming-{digest[:16]}"


def pythonpath(release: str, with_site: bool) -> str:
    return f"{release}/opsplane.pyz:{release}/site" if with_site else f"{release}/opsplane.pyz"


def install_command(
    directory: str, digest: str, python: str, *, site: bool, ship_site: bool
) -> str:
    """Unpack the uploaded bundle into its release directory and self-check it there; the
    running agent is not touched. ``site``: the agent uses the bundle's dependencies
    (``ship_site``: they were uploaded now)."""
    release, incoming = release_dir(directory, digest), incoming_dir(directory, digest)
    q = quote
    imports = "; ".join(f"import {m}" for m in SELF_CHECK_IMPORTS)
    # httpx loads its transport when a client is made: enrollment needs it.
    check = (
        f"import opsplane, httpx; {imports}; httpx.Client().close(); print(opsplane.__version__)"
    )
    unpack = (
        f"mkdir -p {q(release)}.tmp/site\n"
        f"tar xzf {q(incoming)}/site.tar.gz -C {q(release)}.tmp/site\n"
        if ship_site
        else ""
    )
    site_check = (
        f"if ! PYTHONPATH={q(release)}.tmp/site {q(python)} -c {q(SITE_CHECK)} "
        f"> /dev/null 2> {q(release)}.tmp/site-check.err; then\n"
        f'  echo "{SITE_UNUSABLE} $(tail -n 1 {q(release)}.tmp/site-check.err)" >&2\n'
        "  exit 3\nfi\n"
        if site
        else ""
    )
    return f"""set -e
umask 022
rm -rf {q(release)}.tmp
mkdir -p {q(release)}.tmp
mv {q(incoming)}/opsplane.pyz {q(release)}.tmp/
{unpack}rm -rf {q(incoming)}
printf '%s\\n' {q(digest)} > {q(release)}.tmp/digest
{site_check}PYTHONPATH={q(pythonpath(release + ".tmp", site))} {q(python)} -c {q(check)} >/dev/null
rm -rf {q(release)}
mv {q(release)}.tmp {q(release)}
"""


def venv_dir(directory: str, key: str) -> str:
    return f"{directory}/venv-{key[:16]}"


def venv_command(
    directory: str,
    python: str,
    key: str,
    requirements: tuple[str, ...],
    *,
    wheelhouse: str | None,
    index_url: str | None,
) -> str:
    """Make the venv the agent runs on when the bundle's compiled dependencies do not load
    (once per set of requirements: a later release with the same ones reuses it), from the
    uploaded ``wheelhouse`` or from ``index_url``. The venv is only marked ready once pip
    succeeded, so an interrupted one is made again."""
    q = quote
    venv = venv_dir(directory, key)
    if wheelhouse:
        # --isolated: the host's pip configuration (constraints, other indexes) plays no part.
        source = f"--isolated --no-index --find-links {q(wheelhouse)}"
    else:
        source = f"--index-url {q(index_url or '')}"
    listed = "".join(f"{r}\n" for r in requirements)
    cleanup = f"rm -rf {q(wheelhouse)}\n" if wheelhouse else ""
    return f"""V={q(venv)}
if [ ! -f "$V/ready" ]; then
  rm -rf "$V"
  if ! {q(python)} -m venv "$V" > /dev/null 2>&1; then
    rm -rf "$V"
    echo "{python} -m venv failed: install its venv module (Debian: apt install python3-venv)" >&2
    exit 1
  fi
  cat > "$V/requirements.txt" <<'OPSPLANE_EOF'
{listed}OPSPLANE_EOF
  if ! "$V/bin/python" -m pip install --disable-pip-version-check --no-input -q {source} \
      -r "$V/requirements.txt" > "$V/pip.log" 2>&1; then
    tail -n 3 "$V/pip.log" >&2
    exit 1
  fi
  touch "$V/ready"
fi
{cleanup}exit 0
"""


def env_file(settings: Mapping[str, str]) -> str:
    return "".join(f"{key}={quote(value)}\n" for key, value in sorted(settings.items()))


def env_file_digest(settings: Mapping[str, str]) -> str:
    """What the probe reports for an agent.env holding ``settings``."""
    return hashlib.sha256(env_file(settings).encode()).hexdigest()


def runner_script(directory: str, python: str) -> str:
    """The supervisor where systemd does not run: restarts the agent with growing delays
    (2 s doubling to 60 s; back to 2 s after a minute up), and on SIGTERM passes it on (the
    agent drains) and waits for it before ending."""
    q = quote
    return f"""#!/bin/sh
# opsplane agent supervisor, written by `opsplane agents deploy`.
cd {q(directory)} || exit 1
echo $$ > supervisor.pid
child=
finish() {{
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
  rm -f supervisor.pid agent.pid
  exit 0
}}
trap finish TERM INT
delay=2
while :; do
  set -a; . ./agent.env; set +a
  started=$(date +%s)
  PYTHONPATH="$(cat current/pythonpath)" {q(python)} current/opsplane.pyz agent &
  child=$!
  echo "$child" > agent.pid
  wait "$child"
  status=$?
  child=
  if [ $(( $(date +%s) - started )) -ge 60 ]; then delay=2; fi
  echo "agent exited with status $status; restarting in ${{delay}}s" >&2
  sleep "$delay" &
  wait $!
  delay=$(( delay * 2 )); [ "$delay" -gt 60 ] && delay=60
done
"""


def configure_command(
    directory: str, python: str, digest: str, settings: Mapping[str, str], *, site: bool
) -> str:
    """Write the settings and the supervisor, and point ``current`` at the release; venvs
    other than the one ``python`` is in go."""
    q = quote
    release = release_dir(directory, digest)
    keep = python[len(directory) + 1 :].split("/")[0] if python.startswith(directory + "/") else ""
    return f"""set -e
cd {q(directory)}
umask 077
cat > agent.env.tmp <<'OPSPLANE_EOF'
{env_file(settings)}OPSPLANE_EOF
mv agent.env.tmp agent.env
umask 022
cat > run-agent.sh <<'OPSPLANE_EOF'
{runner_script(directory, python)}OPSPLANE_EOF
printf '%s\\n' {q(pythonpath(release, site))} > {q(release)}/pythonpath
ln -sfn {q(release)} current.tmp && mv -T current.tmp current
ls -1 releases | grep -vx {q(digest[:16])} | while read old; do rm -rf "releases/$old"; done
for old in venv-*; do [ -d "$old" ] && [ "$old" != {q(keep or "-")} ] && rm -rf "$old"; done
exit 0
"""


def enroll_command(directory: str, python: str, api_url: str, name: str) -> str:
    """Enroll with the token uploaded to ``enroll.token`` (spent or not, the file goes)."""
    q = quote
    script = (
        "import sys; from pathlib import Path; from opsplane.agent.enroll import enroll; "
        "t = Path(sys.argv[1]); e = enroll(sys.argv[2], t.read_text().strip(), sys.argv[3], "
        "Path(sys.argv[4])); print('enrolled', e.name, ','.join(e.groups))"
    )
    return f"""cd {q(directory)} || exit 1
PYTHONPATH="$(cat current/pythonpath)" {q(python)} -c {q(script)} \\
  enroll.token {q(api_url)} {q(name)} state
status=$?
rm -f enroll.token
exit $status
"""


def start_command(directory: str, python: str, *, systemd: bool) -> str:
    q = quote
    if systemd:
        unit = systemd_unit(directory, python)
        return f"""set -e
cat > {UNIT_PATH} <<'OPSPLANE_EOF'
{unit}OPSPLANE_EOF
systemctl daemon-reload
systemctl enable --quiet {UNIT_NAME}
systemctl restart {UNIT_NAME}
"""
    # setsid: the supervisor leaves this command's process group, which the SSH link kills
    # when the command's channel closes (docs/ssh.md, "A command ends with its connection").
    return f"""cd {q(directory)} || exit 1
rm -f supervisor.pid
setsid sh run-agent.sh >> agent.log 2>&1 < /dev/null &
i=0
while [ ! -s supervisor.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -s supervisor.pid ] && exit 0
echo "the supervisor did not start (see {directory}/agent.log)" >&2
exit 1
"""


def stop_command(directory: str, *, systemd: bool) -> str:
    """Stop the agent; SIGTERM drains it (running commands finish or are spooled)."""
    q = quote
    if systemd:
        return f"systemctl stop {UNIT_NAME}\n"
    return f"""cd {q(directory)} || exit 1
[ -s supervisor.pid ] || exit 0
pid=$(cat supervisor.pid)
kill -TERM "$pid" 2>/dev/null || exit 0
i=0
while kill -0 "$pid" 2>/dev/null && [ $i -lt {STOP_WAIT * 10} ]; do sleep 0.1; i=$((i+1)); done
if kill -0 "$pid" 2>/dev/null; then
  kill -KILL "$pid" "$(cat agent.pid 2>/dev/null)" 2>/dev/null
  echo "the agent did not stop within {STOP_WAIT}s: killed" >&2
fi
rm -f supervisor.pid agent.pid
"""


def systemd_unit(directory: str, python: str) -> str:
    """``opsplane systemd-unit agent``'s unit, running the bundle of ``directory``."""
    text = unit_text(
        Role.agent,
        config=Path("/etc/opsplane/opsplane.yaml"),
        data_dir=Path(directory) / "state",
        user="root",
        python=Path(python),
    )
    return text.replace(
        "EnvironmentFile=-/etc/opsplane/agent.env\n",
        f"EnvironmentFile={directory}/agent.env\n"
        f"Environment=PYTHONPATH={directory}/current/opsplane.pyz:{directory}/current/site\n",
    )
