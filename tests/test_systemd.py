"""The systemd unit in ``systemd/``: it loads without a warning, its sandbox scores an
exposure of at most 2.0, it sets what the daemon relies on (notify, watchdog, restart,
state and runtime directories, a dedicated user), and its sysusers.d snippet creates that
user. The settings example in docs/install.md is checked against the daemon's config loader.

No running systemd is needed: ``systemd-analyze verify``/``security --offline`` and
``systemd-sysusers --root`` work on files. Tests that need those tools skip when they are
missing (``make system-deps`` installs the Debian package ``systemd``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from cli.client import SYSTEM_SOCKET
from daemon.config import DEFAULT_CONFIG_FILE, CloudConfig, Config, load_config, parse_duration

CHECKOUT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = CHECKOUT / "systemd"
INSTALL_DOC = CHECKOUT / "docs" / "install.md"
UNIT = SYSTEMD_DIR / "invsyncd.service"
SYSUSERS = SYSTEMD_DIR / "invsync.sysusers.conf"
#: Where docs/install.md puts the virtualenv, and so where the unit runs the daemon from.
EXEC_START = "/opt/invsync/bin/invsyncd"
MAX_EXPOSURE = 2.0
#: Directories the host's package manager installs system units into (sysinit.target...).
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

Settings = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Settings:
    """Section → key → values in file order; an empty assignment resets the list."""
    sections: Settings = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        assert not line.endswith("\\"), "continuation lines are not expected in this unit"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def one(settings: Settings, section: str, key: str) -> str:
    values = settings.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, found {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> Settings:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package systemd; make system-deps)")
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_runs_the_daemon_as_systemd_expects(unit: Settings) -> None:
    service = "Service"
    assert one(unit, service, "Type") == "notify"
    assert one(unit, service, "NotifyAccess") == "main"
    assert one(unit, service, "ExecStart") == EXEC_START
    assert one(unit, service, "Restart") == "on-failure"
    # The daemon pings at half the timeout; anything under a few seconds would kill it
    # during a slow start-up on a scanner station, anything huge would never fire.
    assert 10 <= parse_duration("WatchdogSec", one(unit, service, "WatchdogSec")) <= 120
    dynamic = unit[service].get("DynamicUser", ["no"])[-1] in ("yes", "true", "1", "on")
    user = unit[service].get("User", [""])[-1]
    assert dynamic or user not in ("", "root", "0"), "the daemon must not run as root"
    assert one(unit, service, "StateDirectory") == "invsync"
    assert one(unit, service, "StateDirectoryMode") == "0700"
    assert one(unit, service, "RuntimeDirectory") == "invsync"
    assert "AF_PACKET" not in " ".join(unit[service]["RestrictAddressFamilies"])
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_directories_are_where_the_daemon_and_cli_look(unit: Settings, tmp_path: Path) -> None:
    """What systemd hands the daemon lands the store in /var/lib and the socket where the
    CLI looks first, and the unit's config directory holds the daemon's default file."""
    service = unit["Service"]
    empty = tmp_path / "invsync.toml"
    empty.write_text("")
    config = load_config(
        {"config": str(empty)},
        {
            "STATE_DIRECTORY": f"/var/lib/{service['StateDirectory'][0]}",
            "RUNTIME_DIRECTORY": f"/run/{service['RuntimeDirectory'][0]}",
        },
    )
    assert config.data_dir == Path("/var/lib/invsync")
    assert config.socket_path == SYSTEM_SOCKET
    assert DEFAULT_CONFIG_FILE.parent == Path("/etc") / service["ConfigurationDirectory"][0]


def _verify_root(tmp_path: Path) -> Path:
    """A file system root holding the unit, the host's system units (the unit's default
    dependencies such as sysinit.target) and, at ExecStart, a copy of this checkout's
    ``invsyncd`` entry point, since verify refuses an ExecStart that is not executable."""
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host_units is None:
        pytest.skip(f"no system unit directory with sysinit.target in {HOST_UNIT_DIRS}")
    entry_point = Path(sys.executable).parent / "invsyncd"
    if not entry_point.exists():
        pytest.skip(f"{entry_point} is missing: install the project (pip install -e .)")
    root = tmp_path / "root"
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    installed = root / EXEC_START.lstrip("/")
    installed.parent.mkdir(parents=True)
    shutil.copy2(entry_point, installed)
    # The copy is the real daemon (its shebang names this venv's Python), not a stub.
    help_run = run(installed, "--help")
    assert help_run.returncode == 0, help_run.stderr
    assert "invsyncd" in help_run.stdout
    return root


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    root = _verify_root(tmp_path)
    unit_in_root = f"/etc/systemd/system/{UNIT.name}"

    result = run(analyze, "verify", f"--root={root}", unit_in_root)
    # verify exits 0 on unknown or misspelt keys and only warns: a warning is a failure too.
    warnings = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert warnings == []

    # The same check notices a station where the venv is not where the unit expects it.
    (root / EXEC_START.lstrip("/")).unlink()
    missing = run(analyze, "verify", f"--root={root}", unit_in_root)
    assert missing.returncode != 0
    assert f"Command {EXEC_START} is not executable" in missing.stderr


def test_unit_sandbox_exposure_is_at_most_2() -> None:
    analyze = require_tool("systemd-analyze")
    threshold = round(MAX_EXPOSURE * 10)
    result = run(
        analyze, "security", "--offline=true", f"--threshold={threshold}", "--no-pager", UNIT
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def _by_name(path: Path) -> dict[str, list[str]]:
    """An /etc/passwd-style file as name → its colon-separated fields."""
    entries = (line.split(":") for line in path.read_text().splitlines() if line)
    return {entry[0]: entry for entry in entries}


def test_sysusers_snippet_creates_the_user_the_unit_runs_as(unit: Settings, tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", SYSUSERS)
    assert result.returncode == 0, result.stderr

    passwd = _by_name(tmp_path / "etc/passwd")
    groups = _by_name(tmp_path / "etc/group")
    user, group = one(unit, "Service", "User"), one(unit, "Service", "Group")
    assert user in passwd, passwd
    assert group in groups, groups
    _, _, uid, gid, _, home, shell = passwd[user]
    assert int(uid) != 0
    assert gid == groups[group][2], "the socket's group is the daemon's primary group"
    assert home == "/var/lib/invsync"
    assert shell.endswith("nologin")


def test_install_doc_config_example_is_valid_and_names_every_setting(tmp_path: Path) -> None:
    """The invsync.toml example in docs/install.md loads as written, still loads with every
    commented-out setting switched on, and mentions every setting the daemon reads."""
    match = re.search(r"```toml\n(.*?)```", INSTALL_DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "docs/install.md has no toml example"
    example = match.group(1)
    as_written = tmp_path / "as-written.toml"
    as_written.write_text(example)
    config = load_config({"config": str(as_written)}, {"STATE_DIRECTORY": "/var/lib/invsync"})
    assert config.data_dir == Path("/var/lib/invsync"), "the example must not move the data"
    assert config.cloud.url is None, "the example must not turn on the cloud bridge"

    everything = re.sub(r"(?m)^# ([a-z_]+ = .*)$", r"\1", example)
    full = tmp_path / "everything.toml"
    full.write_text(everything)
    load_config({"config": str(full)}, {})

    documented = set(re.findall(r"(?m)^([a-z_]+) = ", everything))
    settings = {field.name for field in fields(Config)} - {"config_file", "socket_path", "cloud"}
    settings |= {"socket"} | {field.name for field in fields(CloudConfig)}
    assert settings - documented == set()
