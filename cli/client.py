"""A small blocking client for the daemon's control API over its Unix socket.

The CLI must start fast (``invsync item show X`` within 300 ms wall), so this uses the
standard library's ``http.client`` rather than aiohttp, and one keep-alive connection
for the whole command (the scan loop sends hundreds of requests over it).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

SOCKET_NAME = "invsyncd.sock"
SYSTEM_SOCKET = Path("/run/invsync") / SOCKET_NAME
SYSTEM_UNITS = (
    Path("/etc/systemd/system/invsyncd.service"),
    Path("/usr/lib/systemd/system/invsyncd.service"),
    Path("/lib/systemd/system/invsyncd.service"),
)


def default_socket_path() -> Path:
    """Where the daemon listens unless told otherwise (mirrors the daemon's default)."""
    if os.environ.get("INVSYNC_SOCKET"):
        return Path(os.environ["INVSYNC_SOCKET"])
    if os.environ.get("INVSYNC_DATA_DIR"):
        return Path(os.environ["INVSYNC_DATA_DIR"]) / SOCKET_NAME
    # /run/invsync disappears while the service is stopped; an installed unit still means
    # the socket belongs there, so "not reachable" names the right path.
    if SYSTEM_SOCKET.exists() or any(p.exists() for p in SYSTEM_UNITS):
        return SYSTEM_SOCKET
    return Path.home() / ".local" / "share" / "invsync" / SOCKET_NAME


class DaemonUnreachable(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot reach invsyncd at {path}: {reason}")


class ApiFailure(Exception):
    """The daemon answered with an error document."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any]) -> None:
        self.status = status
        self.code = code
        self.body = body
        super().__init__(message)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.path = path
        self._conn = _UnixConnection(path, timeout)

    def close(self) -> None:
        self._conn.close()

    def request(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = "/v1/" + route
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            try:
                self._conn.request(method, url, body=payload, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A keep-alive connection the daemon closed: reconnect once.
                self._conn.close()
                if attempt == 2:
                    raise DaemonUnreachable(self.path, str(exc)) from None
            except PermissionError as exc:
                raise DaemonUnreachable(
                    self.path, f"{exc.strerror} (are you in the invsync group?)"
                ) from None
            except TimeoutError:
                raise DaemonUnreachable(self.path, "no answer (timed out)") from None
            except OSError as exc:
                # Any other way the socket path cannot be connected to (not a directory on
                # the way, a path longer than AF_UNIX allows): exit 3 with the path, not a
                # traceback.
                raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise ApiFailure(
                response.status, "bad_response", raw[:200].decode(errors="replace"), {}
            ) from None
        if response.status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiFailure(
                response.status,
                str(error.get("code", "error")),
                str(error.get("message", f"HTTP {response.status}")),
                error,
            )
        if not isinstance(data, dict):
            raise ApiFailure(response.status, "bad_response", "expected a JSON object", {})
        return data


def item_route(key: str, action: str = "") -> str:
    route = "items/" + quote(key, safe="")
    return f"{route}/{action}" if action else route
