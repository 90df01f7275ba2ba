"""A small blocking client for the daemon's control API over its Unix socket.

The CLI must start fast (``invsync item show X`` within 300 ms wall), so this uses the
standard library's ``http.client`` rather than aiohttp, and one keep-alive connection
for the whole command (the scan loop sends hundreds of requests over it).
"""

from __future__ import annotations

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


class _PeerHungUp(Exception):
    """The daemon closed a keep-alive connection before answering."""


class _UnixConnection:
    """Just enough HTTP/1.1 for the control API, over one keep-alive Unix socket.

    ``http.client`` pulls in the ``email`` package (about 100 ms of imports on these
    machines), which alone would use a third of the CLI's start-up budget.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock

    def exchange(self, method: str, url: str, payload: bytes | None) -> tuple[int, bytes]:
        fresh = self._sock is None
        sock = self._sock or self._connect()
        body = payload or b""
        head = f"{method} {url} HTTP/1.1\r\nHost: invsyncd\r\nContent-Length: {len(body)}\r\n"
        if payload is not None:
            head += "Content-Type: application/json\r\n"
        sock.sendall(head.encode("ascii") + b"\r\n" + body)
        try:
            status, headers = self._read_head(sock)
        except _PeerHungUp:
            self.close()
            if fresh:
                raise ConnectionResetError("the daemon closed the connection") from None
            raise
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._read_chunked(sock)
        else:
            data = self._read_exact(sock, int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def _fill(self, sock: socket.socket) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise _PeerHungUp
        self._buffer += chunk

    def _read_head(self, sock: socket.socket) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._buffer:
            self._fill(sock)
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionResetError(f"not an HTTP answer: {lines[0][:60]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _read_exact(self, sock: socket.socket, length: int) -> bytes:
        while len(self._buffer) < length:
            try:
                self._fill(sock)
            except _PeerHungUp:
                raise ConnectionResetError("answer cut short") from None
        data, self._buffer = self._buffer[:length], self._buffer[length:]
        return data

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill(sock)
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _read_chunked(self, sock: socket.socket) -> bytes:
        data = b""
        while True:
            size = int(self._read_line(sock).split(b";")[0], 16)
            if size == 0:
                self._read_line(sock)
                return data
            data += self._read_exact(sock, size)
            self._read_line(sock)


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
        for attempt in (1, 2):
            try:
                status, raw = self._conn.exchange(method, url, payload)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
            except (_PeerHungUp, BrokenPipeError, ConnectionResetError) as exc:
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
                status, "bad_response", raw[:200].decode(errors="replace"), {}
            ) from None
        if status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiFailure(
                status,
                str(error.get("code", "error")),
                str(error.get("message", f"HTTP {status}")),
                error,
            )
        if not isinstance(data, dict):
            raise ApiFailure(status, "bad_response", "expected a JSON object", {})
        return data


def item_route(key: str, action: str = "") -> str:
    route = "items/" + quote(key, safe="")
    return f"{route}/{action}" if action else route
