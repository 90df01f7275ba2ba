"""The daemon's settings: where each value comes from, and how a bad one is reported.

``load_config`` is called with explicit flag and environment dicts and real TOML files,
so these tests do not depend on the machine's environment. The default file
(``/etc/invsync/invsync.toml``) is pointed at a path inside the test's directory, so a
file on the test machine cannot leak in.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_module
from daemon.config import (
    MAX_SOCKET_PATH,
    CloudConfig,
    Config,
    ConfigError,
    HostPort,
    load_config,
    parse_duration,
    redact_url,
)

HOME = "/home/ops"


@pytest.fixture(autouse=True)
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default config file, moved into the test's directory (absent unless written)."""
    path = tmp_path / "etc" / "invsync.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", path)
    return path


def write_toml(tmp_path: Path, text: str, name: str = "invsync.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(flags: dict[str, Any] | None = None, /, **env: str) -> Config:
    return load_config(flags or {}, {"HOME": HOME, **env})


def config_error(flags: dict[str, Any] | None = None, /, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(flags, **env)
    return caught.value


# ---------------------------------------------------------------------- defaults


def test_zero_config_defaults() -> None:
    config = load()
    assert config.data_dir == Path(HOME, ".local", "share", "invsync")
    assert config.socket_path == config.data_dir / "invsyncd.sock"
    assert config.db_path == config.data_dir / "inventory.db"
    assert config.listen == HostPort("0.0.0.0", 7420)
    assert config.name == socket.gethostname()
    assert config.mdns is True
    assert config.peers == ()
    assert config.log_level == "INFO"
    assert config.max_clock_skew == 300.0
    assert config.cloud.url is None
    assert config.config_file is None


def test_data_dir_prefers_invsync_data_dir_then_state_directory() -> None:
    both = load(INVSYNC_DATA_DIR="/srv/inv", STATE_DIRECTORY="/var/lib/invsync")
    assert both.data_dir == Path("/srv/inv")
    # systemd passes several StateDirectory= entries separated by colons: use the first.
    systemd = load(STATE_DIRECTORY="/var/lib/invsync:/var/lib/other")
    assert systemd.data_dir == Path("/var/lib/invsync")
    assert systemd.socket_path == Path("/var/lib/invsync/invsyncd.sock")


def test_socket_prefers_invsync_socket_then_runtime_directory_then_data_dir() -> None:
    env = {"INVSYNC_DATA_DIR": "/srv/inv", "RUNTIME_DIRECTORY": "/run/invsync:/run/x"}
    assert load(**env).socket_path == Path("/run/invsync/invsyncd.sock")
    assert load(**env, INVSYNC_SOCKET="/tmp/s.sock").socket_path == Path("/tmp/s.sock")
    assert load(INVSYNC_DATA_DIR="/srv/inv").socket_path == Path("/srv/inv/invsyncd.sock")


def test_socket_default_follows_a_data_dir_from_the_file_or_flags(tmp_path: Path) -> None:
    file = write_toml(tmp_path, 'data_dir = "/srv/from-file"\n')
    assert load({"config": str(file)}).socket_path == Path("/srv/from-file/invsyncd.sock")
    from_flag = load({"data_dir": "/srv/from-flag"})
    assert from_flag.socket_path == Path("/srv/from-flag/invsyncd.sock")


# ---------------------------------------------------------------------- precedence

FILE_SETTINGS = """
data_dir = "/srv/file"
socket = "/run/file.sock"
listen = "10.0.0.1:7000"
name = "dock-file"
log_level = "warning"
max_clock_skew = "2m"
peers = ["10.0.0.9:7420"]
mdns = true

[cloud]
url = "https://file.supabase.co"
anon_key = "anon-key-from-the-file"
station_email = "dock-file@example.com"
station_password_file = "/etc/invsync/cloud-password"
push_interval = "45s"
"""


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE_SETTINGS)
    config = load({"config": str(path)})
    assert config.config_file == path
    assert config.data_dir == Path("/srv/file")
    assert config.socket_path == Path("/run/file.sock")
    assert config.listen == HostPort("10.0.0.1", 7000)
    assert config.name == "dock-file"
    assert config.log_level == "WARNING"
    assert config.max_clock_skew == 120.0
    assert config.peers == (HostPort("10.0.0.9", 7420),)
    assert config.cloud.url == "https://file.supabase.co"
    assert config.cloud.push_interval == 45.0


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE_SETTINGS)
    config = load(
        INVSYNC_CONFIG=str(path),
        INVSYNC_DATA_DIR="/srv/env",
        INVSYNC_SOCKET="/run/env.sock",
        INVSYNC_LISTEN="10.0.0.2:7001",
        INVSYNC_NAME="dock-env",
        INVSYNC_LOG_LEVEL="debug",
        INVSYNC_PEERS="10.0.0.3:1, 10.0.0.4:2",
        INVSYNC_MDNS="off",
        INVSYNC_CLOUD_URL="postgresql://db.example/inv",
    )
    assert config.config_file == path
    assert config.data_dir == Path("/srv/env")
    assert config.socket_path == Path("/run/env.sock")
    assert config.listen == HostPort("10.0.0.2", 7001)
    assert config.name == "dock-env"
    assert config.log_level == "DEBUG"
    assert config.peers == (HostPort("10.0.0.3", 1), HostPort("10.0.0.4", 2))
    assert config.mdns is False
    assert config.cloud.url == "postgresql://db.example/inv"
    # Settings the environment does not name keep the file's value, [cloud] included.
    assert config.max_clock_skew == 120.0
    assert config.cloud.push_interval == 45.0


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE_SETTINGS)
    flags: dict[str, Any] = {
        "config": str(path),
        "data_dir": "/srv/flag",
        "socket": "/run/flag.sock",
        "listen": ":7002",
        "name": "dock-flag",
        "mdns": False,
        "peers": ["[fe80::1]:7420"],
        "log_level": "error",
        # What the daemon's entry point passes for flags that were not given.
        "mdns_interfaces": None,
        "join_token": None,
    }
    config = load(
        flags,
        INVSYNC_DATA_DIR="/srv/env",
        INVSYNC_SOCKET="/run/env.sock",
        INVSYNC_NAME="dock-env",
        INVSYNC_LOG_LEVEL="debug",
    )
    assert config.data_dir == Path("/srv/flag")
    assert config.socket_path == Path("/run/flag.sock")
    assert config.listen == HostPort("0.0.0.0", 7002)
    assert config.name == "dock-flag"
    assert config.mdns is False
    assert config.peers == (HostPort("fe80::1", 7420),)
    assert str(config.peers[0]) == "[fe80::1]:7420"
    assert config.log_level == "ERROR"
    assert config.max_clock_skew == 120.0


def test_config_flag_beats_invsync_config(tmp_path: Path) -> None:
    env_file = write_toml(tmp_path, 'name = "from-env-file"\n', "env.toml")
    flag_file = write_toml(tmp_path, 'name = "from-flag-file"\n', "flag.toml")
    config = load({"config": str(flag_file)}, INVSYNC_CONFIG=str(env_file))
    assert config.name == "from-flag-file"
    assert config.config_file == flag_file


def test_default_file_is_read_only_when_it_exists(no_default_file: Path) -> None:
    assert load().config_file is None
    no_default_file.parent.mkdir()
    no_default_file.write_text('name = "dock-etc"\n', encoding="utf-8")
    config = load()
    assert config.name == "dock-etc"
    assert config.config_file == no_default_file


# ---------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("90s", 90.0), (300, 300.0), (2.5, 2.5), ("2h", 7200.0), ("250ms", 0.25)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration("max_clock_skew", value) == seconds


def test_duration_from_file_and_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'max_clock_skew = 90\n[cloud]\npush_interval = "5m"\n')
    assert load({"config": str(path)}).max_clock_skew == 90.0
    assert load({"config": str(path)}).cloud.push_interval == 300.0
    assert load(INVSYNC_MAX_CLOCK_SKEW="90s").max_clock_skew == 90.0
    assert load(INVSYNC_CLOUD_PUSH_INTERVAL="2m").cloud.push_interval == 120.0


@pytest.mark.parametrize(
    "value", ["5 minutes", "soon", "", "-5s", True, [5], "nan", "inf", float("inf")]
)
def test_bad_duration_names_the_setting(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration("max_clock_skew", value)
    assert caught.value.setting == "max_clock_skew"
    assert "max_clock_skew" in str(caught.value)


def test_bad_duration_in_env_names_the_setting() -> None:
    error = config_error(INVSYNC_CLOUD_PUSH_INTERVAL="every minute")
    assert error.setting == "cloud.push_interval"
    assert "'every minute'" in str(error)


def test_infinite_duration_in_file_names_the_setting(tmp_path: Path) -> None:
    # TOML has inf and nan literals; the store would crash on them at start-up.
    path = write_toml(tmp_path, "max_clock_skew = inf\n")
    assert config_error({"config": str(path)}).setting == "max_clock_skew"


# ---------------------------------------------------------------------- validation errors


@pytest.mark.parametrize("listen", ["7420", "host:port", "host:70000", "", "[::1]7420"])
def test_bad_listen_names_the_setting(listen: str) -> None:
    error = config_error({"listen": listen}) if listen else config_error(INVSYNC_LISTEN=" ")
    assert error.setting == "listen"
    assert str(error).startswith("setting listen = ")


@pytest.mark.parametrize("peer", ["10.0.0.5", ":7420", "10.0.0.5:x", "10.0.0.5:-1"])
def test_bad_peer_names_the_setting(peer: str) -> None:
    error = config_error({"peers": ["10.0.0.4:7420", peer]})
    assert error.setting == "peers"
    assert peer in str(error)


def test_bad_peer_in_file_names_the_setting(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "peers = [7420]\n")
    assert config_error({"config": str(path)}).setting == "peers"


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'data_dir = "/srv"\nlisten_port = 7420\n')
    error = config_error({"config": str(path)})
    assert error.setting == "listen_port"
    assert "unknown setting" in str(error)


def test_unknown_cloud_key_names_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[cloud]\nurl = "https://x.supabase.co"\nservice_key = "s"\n')
    error = config_error({"config": str(path)})
    assert error.setting == "cloud.service_key"
    assert "cloud.service_key" in str(error)


def test_cloud_must_be_a_table(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'cloud = "https://x.supabase.co"\n')
    assert config_error({"config": str(path)}).setting == "cloud"


@pytest.mark.parametrize("level", ["LOUD", "5", "trace"])
def test_bad_log_level_names_the_setting(level: str) -> None:
    error = config_error(INVSYNC_LOG_LEVEL=level)
    assert error.setting == "log_level"
    assert "DEBUG, INFO, WARNING, ERROR" in str(error)


@pytest.mark.parametrize("url", ["http://x.supabase.co", "x.supabase.co", "mysql://db/inv"])
def test_bad_cloud_url_names_the_setting(url: str) -> None:
    error = config_error(INVSYNC_CLOUD_URL=url)
    assert error.setting == "cloud.url"
    assert url in str(error)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'name = "unterminated\n')
    error = config_error({"config": str(path)})
    assert error.setting == "config"
    assert str(path) in str(error)
    assert "not valid TOML" in str(error)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    error = config_error(INVSYNC_CONFIG=str(missing))
    assert error.setting == "config"
    assert str(missing) in str(error)
    assert "file not found" in str(error)


def test_socket_path_longer_than_a_unix_address_names_the_setting() -> None:
    fits = "/tmp/" + "s" * (MAX_SOCKET_PATH - len("/tmp/"))
    assert str(load(INVSYNC_SOCKET=fits).socket_path) == fits
    error = config_error(INVSYNC_SOCKET=fits + "x")
    assert error.setting == "socket"
    assert "107 bytes" in str(error)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("name = 5\n", "name"),
        (f'name = "{"n" * 65}"\n', "name"),
        ('mdns = "yes"\n', "mdns"),
        ("mdns_interfaces = [1]\n", "mdns_interfaces"),
        ("shard_count = 0\n", "shard_count"),
        ('shard_count = "64"\n', "shard_count"),
        ('join_token = " "\n', "join_token"),
        ("[cloud]\nanon_key = 1\n", "cloud.anon_key"),
    ],
)
def test_other_bad_values_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    path = write_toml(tmp_path, text)
    assert config_error({"config": str(path)}).setting == setting


# ---------------------------------------------------------------------- [cloud]


def test_every_cloud_setting_has_an_environment_override(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE_SETTINGS)
    config = load(
        INVSYNC_CONFIG=str(path),
        INVSYNC_CLOUD_URL="https://env.supabase.co",
        INVSYNC_CLOUD_ANON_KEY="anon-key-from-env",
        INVSYNC_CLOUD_STATION_EMAIL="dock-env@example.com",
        INVSYNC_CLOUD_STATION_PASSWORD_FILE="/run/credentials/invsyncd/cloud-password",
        INVSYNC_CLOUD_PUSH_INTERVAL="10s",
    )
    assert config.cloud.url == "https://env.supabase.co"
    assert config.cloud.anon_key == "anon-key-from-env"
    assert config.cloud.station_email == "dock-env@example.com"
    assert config.cloud.station_password_file == Path("/run/credentials/invsyncd/cloud-password")
    assert config.cloud.push_interval == 10.0
    # Only the URL from the environment: the file's sign-in settings stay.
    config = load(INVSYNC_CONFIG=str(path), INVSYNC_CLOUD_URL="https://other.supabase.co")
    assert config.cloud.url == "https://other.supabase.co"
    assert config.cloud.anon_key == "anon-key-from-the-file"
    assert config.cloud.station_email == "dock-file@example.com"


def test_postgres_url_needs_no_supabase_sign_in() -> None:
    config = load(INVSYNC_CLOUD_URL="postgresql://station_a@db.example:5432/inventory")
    assert config.cloud.url == "postgresql://station_a@db.example:5432/inventory"
    assert config.cloud.anon_key is None
    assert load().cloud.url is None


@pytest.mark.parametrize(
    "missing",
    [
        "INVSYNC_CLOUD_ANON_KEY",
        "INVSYNC_CLOUD_STATION_EMAIL",
        "INVSYNC_CLOUD_STATION_PASSWORD_FILE",
    ],
)
def test_https_url_needs_the_anon_key_and_the_station_sign_in(missing: str) -> None:
    env = {
        "INVSYNC_CLOUD_URL": "https://abc.supabase.co",
        "INVSYNC_CLOUD_ANON_KEY": "anon",
        "INVSYNC_CLOUD_STATION_EMAIL": "dock@example.com",
        "INVSYNC_CLOUD_STATION_PASSWORD_FILE": "/etc/invsync/pw",
    }
    assert load(**env).cloud.url == "https://abc.supabase.co"
    del env[missing]
    error = config_error(**env)
    assert error.setting == "cloud." + missing.removeprefix("INVSYNC_CLOUD_").lower()
    assert "docs/cloud.md" in str(error)


def _jwt(payload: str) -> str:
    body = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "key", ["sb_secret_abcdef0123456789", _jwt('{"role":"service_role","iss":"supabase"}')]
)
def test_a_key_that_bypasses_row_level_security_is_refused(key: str) -> None:
    error = config_error(
        INVSYNC_CLOUD_URL="https://abc.supabase.co",
        INVSYNC_CLOUD_ANON_KEY=key,
        INVSYNC_CLOUD_STATION_EMAIL="dock@example.com",
        INVSYNC_CLOUD_STATION_PASSWORD_FILE="/etc/invsync/pw",
    )
    assert error.setting == "cloud.anon_key"
    assert "service_role" in str(error)
    assert key not in str(error), "the secret is not repeated in the message"
    anon = _jwt('{"role":"anon","iss":"supabase"}')
    assert (
        load(
            INVSYNC_CLOUD_URL="https://abc.supabase.co",
            INVSYNC_CLOUD_ANON_KEY=anon,
            INVSYNC_CLOUD_STATION_EMAIL="dock@example.com",
            INVSYNC_CLOUD_STATION_PASSWORD_FILE="/etc/invsync/pw",
        ).cloud.anon_key
        == anon
    )


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:54321", True),
        ("http://localhost:54321/", True),
        ("http://[::1]:54321", True),
        ("http://abc.supabase.co", False),
        ("ftp://db.example", False),
        ("db.example:5432", False),
    ],
)
def test_plain_http_only_for_a_local_supabase(url: str, ok: bool) -> None:
    env = {
        "INVSYNC_CLOUD_URL": url,
        "INVSYNC_CLOUD_ANON_KEY": "anon",
        "INVSYNC_CLOUD_STATION_EMAIL": "dock@example.com",
        "INVSYNC_CLOUD_STATION_PASSWORD_FILE": "/etc/invsync/pw",
    }
    if ok:
        assert load(**env).cloud.url == url
    else:
        assert config_error(**env).setting == "cloud.url"


def test_push_interval_below_a_tenth_of_a_second_is_refused() -> None:
    assert config_error(INVSYNC_CLOUD_PUSH_INTERVAL="10ms").setting == "cloud.push_interval"


def test_secrets_stay_out_of_errors_and_reprs() -> None:
    """A config error or a logged config must not print the database password or the
    project key (they end up in journald and in bug reports)."""
    bad_url = config_error(INVSYNC_CLOUD_URL="ftp://dock_a:s3cret-pw@db.example:5432/inv")
    assert "s3cret-pw" not in str(bad_url) and "dock_a@db.example:5432" in str(bad_url)
    assert "s3cret-pw" not in repr(bad_url.value)
    http = config_error(INVSYNC_CLOUD_URL="http://u:s3cret-pw@example.com/x")
    assert "s3cret-pw" not in str(http)
    key = (
        "eyJhbGciOiJIUzI1NiJ9."
        + base64.urlsafe_b64encode(b'{"role":"service_role"}').decode().rstrip("=")
        + ".c2lnbmF0dXJlLXNlY3JldA"
    )
    refused = config_error(
        INVSYNC_CLOUD_URL="https://abc.supabase.co",
        INVSYNC_CLOUD_ANON_KEY=key,
        INVSYNC_CLOUD_STATION_EMAIL="dock@example.com",
        INVSYNC_CLOUD_STATION_PASSWORD_FILE="/etc/pw",
    )
    assert "c2lnbmF0dXJlLXNlY3JldA" not in str(refused)
    cloud = CloudConfig(
        url="postgresql://dock_a:s3cret-pw@db:5432/inv?password=other-secret",
        anon_key="eyJ-the-anon-key",
    )
    assert "s3cret-pw" not in repr(cloud) and "other-secret" not in repr(cloud)
    assert "the-anon-key" not in repr(cloud) and "dock_a@db:5432/inv" in repr(cloud)
    assert redact_url("postgresql://u:p:q@h/db") == "postgresql://u@h/db"
