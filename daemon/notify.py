"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1.

Only active when ``NOTIFY_SOCKET`` is set (running under ``Type=notify``); otherwise every
call is a no-op, so the daemon runs the same by hand and under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

_LOGGER = logging.getLogger(__name__)


class Notifier:
    """Sends datagrams to the socket systemd gave us. ``close()`` is idempotent."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading '@' names an abstract socket (a NUL byte on the wire).
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        watchdog = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        active = watchdog.isdigit() and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the timeout), or None if not asked for.
        self.watchdog_interval = int(watchdog) / 2_000_000 if active else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        if self._sock is None or self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            _LOGGER.warning("cannot notify systemd: %s", exc)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def stopping(self) -> None:
        self.send(stopping=1, status="stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
