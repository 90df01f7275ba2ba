"""Several real ``invsyncd`` stations for one test, and what a test asks of them.

:class:`Stations` owns a short directory with one data directory per station; stations
are enrolled offline in the test's own fleet CA (``FleetCA``), so stations of tests that
run at the same time on this host never mix. ``dispose`` stops them all, prints their
logs (pytest shows them when the test failed) and fails if one did not stop cleanly on
SIGTERM. The helpers below call the control API the way the CLI does.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from cli.client import ApiFailure, ControlClient, item_route
from tests.daemon_harness import Daemon
from tests.fleet_ca import FleetCA

T = TypeVar("T")


@dataclass
class Stations:
    """Stations of one test, each in its own data directory under ``base``."""

    base: Path
    ca: FleetCA = field(default_factory=FleetCA)
    stations: list[Daemon] = field(default_factory=list)

    @property
    def fleet_id(self) -> str:
        return self.ca.fleet_id

    def station(
        self,
        name: str,
        *extra: str,
        mdns: bool = False,
        ca: FleetCA | None = None,
        admin: bool = False,
        own_fleet: bool = False,
    ) -> Daemon:
        """A station (not started), enrolled in ``ca`` (default: this test's fleet) and
        holding that CA if ``admin``; ``own_fleet`` leaves it unenrolled, so it founds a
        fleet of its own on its first start, as a new station does."""
        data_dir = self.base / name
        if not own_fleet:
            (ca or self.ca).enroll(data_dir, holds_ca=admin)
        daemon = Daemon(data_dir, self.base / f"{name}.sock", *extra, name=name, mdns=mdns)
        self.stations.append(daemon)
        return daemon

    def start(self, *daemons: Daemon, env: dict[str, str] | None = None) -> None:
        """Start several stations at once (mDNS start-up takes seconds each)."""
        for daemon in daemons:
            daemon.launch(env=env)
        for daemon in daemons:
            daemon.wait_ready(60.0)

    def close(self) -> list[str]:
        """Stop every station; returns those that did not stop cleanly on SIGTERM."""
        unclean = []
        for daemon in self.stations:
            if daemon.proc is None:
                continue
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            try:
                code = daemon.stop(timeout=20)
            except Exception as exc:
                daemon.kill()
                unclean.append(f"{daemon.name}: {exc}")
            else:
                if code != 0:
                    unclean.append(f"{daemon.name}: exit status {code}")
        return unclean

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Stop everything, show the logs, remove the directory, and fail if a station
        did not stop cleanly: SIGTERM must always stop a station."""
        try:
            unclean = self.close()
            for log in dict.fromkeys(daemon.log_path for daemon in self.stations):
                text = log.read_text(errors="replace") if log.exists() else ""
                print(f"----- {log.name}\n{text[-6000:]}")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
        assert not unclean, unclean


# ---------------------------------------------------------------------- asking a station


def api(
    daemon: Daemon,
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One control API call, as the CLI makes it."""
    client = ControlClient(daemon.socket_path, timeout=120)
    try:
        return client.request(method, route, body, query)
    finally:
        client.close()


def cli_json(daemon: Daemon, *args: str, timeout: float = 120.0) -> Any:
    result = daemon.cli("--json", *args, timeout=timeout)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


def station_id(daemon: Daemon) -> str:
    value = api(daemon, "GET", "status")["station"]["id"]
    assert isinstance(value, str)
    return value


def listen_port(daemon: Daemon) -> int:
    return int(api(daemon, "GET", "status")["peers"]["listen_port"])


def peer_at(daemon: Daemon) -> str:
    """The address other stations reach ``daemon`` at (for ``--peer``)."""
    return f"127.0.0.1:{listen_port(daemon)}"


def peer_list(daemon: Daemon) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api(daemon, "GET", "peers")["peers"]
    return found


def connected(daemon: Daemon) -> set[str]:
    return {p["station_id"] for p in peer_list(daemon) if p["state"] == "connected"}


def find(daemon: Daemon, barcode: str) -> dict[str, Any] | None:
    try:
        (item,) = api(daemon, "GET", item_route(barcode))["items"]
    except ApiFailure as exc:
        if exc.status == 404:
            return None
        raise
    assert isinstance(item, dict)
    return item


def stock(daemon: Daemon, barcode: str) -> int | None:
    item = find(daemon, barcode)
    return None if item is None else int(item["stock"])


def item_count(daemon: Daemon) -> int:
    return int(api(daemon, "GET", "status")["items"])


def wait_until(what: str, timeout: float, condition: Callable[[], T]) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; last saw {last!r}")
        time.sleep(0.1)
        last = condition()
    return last


def add_item(daemon: Daemon, barcode: str, name: str, qty: int) -> dict[str, Any]:
    body = {"barcode": barcode, "name": name, "qty": qty}
    item: dict[str, Any] = api(daemon, "POST", "items", body)["item"]
    return item


def checkout(daemon: Daemon, barcode: str, qty: int) -> None:
    api(daemon, "POST", item_route(barcode, "checkout"), {"qty": qty})
