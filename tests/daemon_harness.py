"""Real ``invsyncd`` processes for tests: start, wait until ready, stop, kill.

Sockets live in a short directory under /tmp because Unix socket paths are limited to
107 bytes and pytest's tmp_path can be longer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
INVSYNCD = str(BIN / "invsyncd")
INVSYNC = str(BIN / "invsync")


def short_dir(prefix: str = "inv") -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o700)
    return path


class Daemon:
    """One ``invsyncd`` subprocess with its own data dir and control socket."""

    def __init__(
        self,
        data_dir: Path,
        socket_path: Path,
        *extra: str,
        name: str = "test",
        mdns: bool = False,
    ) -> None:
        """``mdns=True`` runs mDNS discovery on 127.0.0.1 only (never the host's real
        interfaces); the default passes ``--no-mdns``. ``extra`` flags come last and win."""
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.extra = extra
        self.name = name
        self.mdns = mdns
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["INVSYNC_SOCKET"] = str(self.socket_path)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self, *, timeout: float = 20.0, env: dict[str, str] | None = None) -> None:
        self.launch(env=env)
        self.wait_ready(timeout)

    def launch(self, *, env: dict[str, str] | None = None) -> None:
        """Start the process without waiting (start several, then ``wait_ready`` each)."""
        discovery = ["--mdns-interface", "127.0.0.1"] if self.mdns else ["--no-mdns"]
        args = [
            INVSYNCD,
            "--data-dir",
            str(self.data_dir),
            "--socket",
            str(self.socket_path),
            "--name",
            self.name,
            *discovery,
            "--listen",
            "127.0.0.1:0",
            *self.extra,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env or self.env
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"invsyncd exited with {self.proc.returncode}:\n{self.log()}")
            if self.answers():
                return
            time.sleep(0.05)
        raise TimeoutError(f"invsyncd not ready after {timeout}s:\n{self.log()}")

    def answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
            probe.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
            return probe.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def cli(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``invsync`` executable against this daemon."""
        return subprocess.run(
            [INVSYNC, "--socket", str(self.socket_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )


@contextmanager
def running_daemon(*extra: str, name: str = "test") -> Iterator[Daemon]:
    """A started daemon in a fresh short directory; stopped and removed afterwards."""
    base = short_dir()
    daemon = Daemon(base / "data", base / "ctl.sock", *extra, name=name)
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.stop()
        except Exception:
            daemon.kill()
        shutil.rmtree(base, ignore_errors=True)
