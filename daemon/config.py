"""The daemon's settings, loaded once: defaults, then the TOML file, then ``INVSYNC_*``
environment variables, then command-line flags, validated into one :class:`Config`.

Every error names the setting and the bad value (``ConfigError``), so an operator can fix
``/etc/invsync/invsync.toml`` without reading code.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdt_store.names import DEFAULT_SHARDS, MAX_SHARDS

DEFAULT_CONFIG_FILE = Path("/etc/invsync/invsync.toml")
DEFAULT_PORT = 7420
SOCKET_NAME = "invsyncd.sock"
#: Unix socket paths longer than this do not fit in sockaddr_un.
MAX_SOCKET_PATH = 107
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


#: ``password=...`` (and ``sslpassword=``) in a libpq URL's query string.
_QUERY_PASSWORD = re.compile(r"([?&][a-z_]*password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without the password of its user (or of its query), for messages, logs and
    reprs: ``postgresql://dock_a:secret@db/inv`` → ``postgresql://dock_a@db/inv``.

    Plain string work rather than ``urlsplit``, which raises on a malformed port, so even
    a URL the config refuses can be shown.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    ends = [index for index in (rest.find(char) for char in "/?#") if index >= 0]
    end = min(ends, default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        authority = f"{user}@{host}" if user else host
    return scheme + sep + authority + _QUERY_PASSWORD.sub(r"\1***", tail)


def _shown(setting: str, value: object) -> object:
    """A setting's value as an error may show it: keys and passwords in URLs hidden."""
    if not isinstance(value, str):
        return value
    if setting.endswith("anon_key"):
        # Enough to tell an anon JWT ("eyJhbGciOi") from a secret key ("sb_secret_").
        return value[:10] + "..." if len(value) > 10 else "..."
    if "@" in value or "password=" in value.lower():
        return redact_url(value)
    return value


class ConfigError(Exception):
    """A setting has a bad value; the message names it (secrets in it redacted)."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        self.setting = setting
        self.value = _shown(setting, value)
        self.reason = reason
        super().__init__(f"setting {setting} = {self.value!r}: {reason}")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CloudConfig:
    """Cloud bridge settings; ``url`` unset means no bridge on this station."""

    url: str | None = None
    anon_key: str | None = None
    station_email: str | None = None
    station_password_file: Path | None = None
    push_interval: float = 30.0

    def __repr__(self) -> str:
        # The DSN may hold a password and the key is the project's: neither belongs in a
        # log line or a traceback.
        url = redact_url(self.url) if self.url else None
        key = "..." if self.anon_key else None
        return (
            f"CloudConfig(url={url!r}, anon_key={key!r}, station_email={self.station_email!r}, "
            f"station_password_file={self.station_password_file!r}, "
            f"push_interval={self.push_interval!r})"
        )


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path
    socket_path: Path
    listen: HostPort
    name: str
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    peers: tuple[HostPort, ...] = ()
    #: A secret: kept out of the repr.
    join_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    shard_count: int = 64
    max_clock_skew: float = 300.0
    anti_entropy_interval: float = 30.0
    cloud: CloudConfig = field(default_factory=CloudConfig)
    config_file: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "inventory.db"


def parse_host_port(setting: str, text: object, *, default_host: str = "0.0.0.0") -> HostPort:
    """``host:port``, ``[v6]:port`` or ``:port``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(setting, text, "expected HOST:PORT")
    value = text.strip()
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ConfigError(setting, text, "expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(setting, text, "the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(setting, text, "the port must be 0-65535")
    return HostPort(host or default_host, port)


def parse_duration(setting: str, value: object) -> float:
    """Seconds as a number, or text like ``90s``, ``5m``, ``2h``."""
    if isinstance(value, bool):
        raise ConfigError(setting, value, "expected a duration like 30s, 5m or 2h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        for suffix in sorted(units, key=len, reverse=True):
            if text.endswith(suffix):
                number, factor = text[: -len(suffix)], units[suffix]
                break
        else:
            number, factor = text, 1.0
        try:
            seconds = float(number) * factor
        except ValueError:
            raise ConfigError(setting, value, "expected a duration like 30s, 5m or 2h") from None
    else:
        raise ConfigError(setting, value, "expected a duration like 30s, 5m or 2h")
    if not math.isfinite(seconds):
        # float() takes "nan" and "inf" (and TOML has them too); neither is a duration.
        raise ConfigError(setting, value, "expected a duration like 30s, 5m or 2h")
    if seconds < 0:
        raise ConfigError(setting, value, "must not be negative")
    return seconds


def default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("INVSYNC_DATA_DIR"):
        return Path(env["INVSYNC_DATA_DIR"])
    if env.get("STATE_DIRECTORY"):
        # systemd passes a colon-separated list when several are configured.
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return Path(env.get("HOME", str(Path.home()))) / ".local" / "share" / "invsync"


def default_socket_path(env: Mapping[str, str], data_dir: Path) -> Path:
    if env.get("INVSYNC_SOCKET"):
        return Path(env["INVSYNC_SOCKET"])
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    return data_dir / SOCKET_NAME


_KNOWN_KEYS = {
    "data_dir",
    "socket",
    "listen",
    "name",
    "mdns",
    "mdns_interfaces",
    "peers",
    "join_token",
    "log_level",
    "shard_count",
    "max_clock_skew",
    "anti_entropy_interval",
    "cloud",
}
_CLOUD_KEYS = {"url", "anon_key", "station_email", "station_password_file", "push_interval"}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("config", str(path), exc.strerror or str(exc)) from None
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], data[sorted(unknown)[0]], "unknown setting")
    cloud = data.get("cloud", {})
    if not isinstance(cloud, dict):
        raise ConfigError("cloud", cloud, "expected a [cloud] table")
    unknown_cloud = set(cloud) - _CLOUD_KEYS
    if unknown_cloud:
        key = sorted(unknown_cloud)[0]
        raise ConfigError(f"cloud.{key}", cloud[key], "unknown setting")
    return data


def _env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    simple = {
        "INVSYNC_DATA_DIR": "data_dir",
        "INVSYNC_SOCKET": "socket",
        "INVSYNC_LISTEN": "listen",
        "INVSYNC_NAME": "name",
        "INVSYNC_LOG_LEVEL": "log_level",
        "INVSYNC_JOIN_TOKEN": "join_token",
        "INVSYNC_MAX_CLOCK_SKEW": "max_clock_skew",
    }
    for variable, key in simple.items():
        if env.get(variable):
            settings[key] = env[variable]
    if env.get("INVSYNC_MDNS_INTERFACES"):
        settings["mdns_interfaces"] = env["INVSYNC_MDNS_INTERFACES"].replace(",", " ").split()
    if env.get("INVSYNC_PEERS"):
        settings["peers"] = [p for p in env["INVSYNC_PEERS"].replace(",", " ").split() if p]
    if env.get("INVSYNC_MDNS"):
        settings["mdns"] = env["INVSYNC_MDNS"].strip().lower() not in ("0", "false", "no", "off")
    cloud: dict[str, Any] = {}
    for key in _CLOUD_KEYS:
        variable = f"INVSYNC_CLOUD_{key.upper()}"
        if env.get(variable):
            cloud[key] = env[variable]
    if cloud:
        settings["cloud"] = cloud
    return settings


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if key == "cloud" and isinstance(value, Mapping):
            merged["cloud"] = {**merged.get("cloud", {}), **value}
        else:
            merged[key] = value
    return merged


def load_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the one validated config: defaults → file → environment → flags.

    ``flags`` holds only what was given on the command line (``None`` = not given);
    ``config`` in flags or ``INVSYNC_CONFIG`` names the file; the default file is read
    only if it exists.
    """
    env = os.environ if env is None else env
    file_setting = flags.get("config") or env.get("INVSYNC_CONFIG")
    config_file: Path | None = None
    settings: dict[str, Any] = {}
    if file_setting:
        config_file = Path(file_setting)
        settings = read_config_file(config_file)
    elif DEFAULT_CONFIG_FILE.exists():
        config_file = DEFAULT_CONFIG_FILE
        settings = read_config_file(config_file)
    settings = _merge(settings, _env_settings(env))
    settings = _merge(settings, {k: v for k, v in flags.items() if k != "config"})
    return _validate(settings, env, config_file)


def _validate(settings: Mapping[str, Any], env: Mapping[str, str], source: Path | None) -> Config:
    data_dir = Path(settings["data_dir"]) if settings.get("data_dir") else default_data_dir(env)
    socket_path = (
        Path(settings["socket"]) if settings.get("socket") else default_socket_path(env, data_dir)
    )
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            "socket", str(socket_path), f"longer than {MAX_SOCKET_PATH} bytes (a Unix limit)"
        )
    listen = parse_host_port("listen", settings.get("listen", f"0.0.0.0:{DEFAULT_PORT}"))
    name = settings.get("name") or socket.gethostname()
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise ConfigError("name", name, "use 1-64 characters")
    mdns = settings.get("mdns", True)
    if not isinstance(mdns, bool):
        raise ConfigError("mdns", mdns, "expected true or false")
    interfaces = settings.get("mdns_interfaces", [])
    if isinstance(interfaces, str):
        interfaces = [interfaces]
    if not isinstance(interfaces, Sequence) or not all(isinstance(i, str) for i in interfaces):
        raise ConfigError("mdns_interfaces", interfaces, "expected a list of IP addresses")
    peers_raw = settings.get("peers", [])
    if isinstance(peers_raw, str):
        peers_raw = [peers_raw]
    if not isinstance(peers_raw, Sequence):
        raise ConfigError("peers", peers_raw, 'expected a list like ["10.0.0.5:7420"]')
    peers = tuple(parse_host_port("peers", peer, default_host="") for peer in peers_raw)
    if any(not peer.host for peer in peers):
        raise ConfigError("peers", list(peers_raw), "every peer needs a host")
    log_level = str(settings.get("log_level", "INFO")).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError("log_level", settings.get("log_level"), f"use {', '.join(LOG_LEVELS)}")
    shard_count = settings.get("shard_count", DEFAULT_SHARDS)
    if isinstance(shard_count, bool) or not isinstance(shard_count, int):
        raise ConfigError("shard_count", shard_count, "expected a whole number")
    if not 1 <= shard_count <= MAX_SHARDS:
        raise ConfigError("shard_count", shard_count, f"must be 1-{MAX_SHARDS}")
    skew = parse_duration("max_clock_skew", settings.get("max_clock_skew", 300.0))
    anti_entropy = parse_duration(
        "anti_entropy_interval", settings.get("anti_entropy_interval", 30.0)
    )
    if anti_entropy < 0.1:
        raise ConfigError("anti_entropy_interval", anti_entropy, "must be at least 0.1s")
    cloud = _validate_cloud(settings.get("cloud", {}))
    join = settings.get("join_token")
    if join is not None and (not isinstance(join, str) or not join.strip()):
        raise ConfigError("join_token", join, "expected the token printed by fleet invite")
    return Config(
        data_dir=data_dir,
        socket_path=socket_path,
        listen=listen,
        name=name.strip(),
        mdns=mdns,
        mdns_interfaces=tuple(interfaces),
        peers=peers,
        join_token=join.strip() if isinstance(join, str) else None,
        log_level=log_level,
        shard_count=shard_count,
        max_clock_skew=skew,
        anti_entropy_interval=anti_entropy,
        cloud=cloud,
        config_file=source,
    )


# ---------------------------------------------------------------------- [cloud]

#: Hosts a plain http:// cloud URL may name: a local Supabase stack (``supabase start``
#: serves http://127.0.0.1:54321) or a test server, never a remote one.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _validate_cloud(raw: Mapping[str, Any]) -> CloudConfig:
    """``[cloud]``: a postgresql:// DSN, or an https:// Supabase project with the anon
    key and the station user's sign-in (never a key that bypasses row-level security)."""
    for key in ("url", "anon_key", "station_email"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"cloud.{key}", value, "expected text")
    url = raw.get("url")
    anon_key = raw.get("anon_key") or None
    email = raw.get("station_email") or None
    password_file = raw.get("station_password_file") or None
    if password_file is not None and not isinstance(password_file, str):
        raise ConfigError("cloud.station_password_file", password_file, "expected a file path")
    push_interval = parse_duration("cloud.push_interval", raw.get("push_interval", 30.0))
    if push_interval < 0.1:
        raise ConfigError("cloud.push_interval", raw.get("push_interval"), "must be at least 0.1s")
    if url is not None:
        _check_cloud_url(url)
        if not url.startswith(("postgresql://", "postgres://")):
            for key, value in (
                ("anon_key", anon_key),
                ("station_email", email),
                ("station_password_file", password_file),
            ):
                if value is None:
                    raise ConfigError(
                        f"cloud.{key}", None, "needed with an https:// url (see docs/cloud.md)"
                    )
    if anon_key is not None and _bypasses_rls(anon_key):
        raise ConfigError(
            "cloud.anon_key",
            anon_key,
            "this is a secret (service_role) key, which bypasses row-level security and "
            "must not sit on a station; use the anon (publishable) key and a station user",
        )
    return CloudConfig(
        url=url,
        anon_key=anon_key,
        station_email=email,
        station_password_file=Path(password_file) if password_file else None,
        push_interval=push_interval,
    )


def _check_cloud_url(url: str) -> None:
    if url.startswith(("postgresql://", "postgres://", "https://")):
        return
    if url.startswith("http://"):
        host = url[len("http://") :].split("/", 1)[0].rpartition("@")[2]
        host = host[1:].partition("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if host in _LOOPBACK_HOSTS or host.startswith("127."):
            return
        raise ConfigError("cloud.url", url, "use https:// (http:// only for a local Supabase)")
    raise ConfigError(
        "cloud.url", url, "expected postgresql://... or https://<project>.supabase.co"
    )


def _bypasses_rls(key: str) -> bool:
    """Supabase secret keys (``sb_secret_...``) and legacy service_role JWTs."""
    if key.startswith("sb_secret_"):
        return True
    parts = key.split(".")
    if len(parts) != 3:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("role") == "service_role"
