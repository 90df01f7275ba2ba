"""One daemon per data directory, enforced with an advisory lock on ``invsyncd.lock``.

Two daemons writing one store would each pick a Yjs client id and an HLC of their own;
the lock makes the second refuse to start instead. The kernel drops the lock when the
process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirBusy(Exception):
    def __init__(self, data_dir: Path, holder: str) -> None:
        self.data_dir = data_dir
        super().__init__(
            f"another invsyncd ({holder}) is already using {data_dir}; stop it first "
            "or pick another --data-dir"
        )


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "invsyncd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise DataDirBusy(self.path.parent, f"pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
