"""Benchmarks of real ``invsyncd`` stations: the control API, the CLI, and peer sync.

Measured with real daemon processes on loopback, driven over their control sockets:

- ``daemon``: durable checkouts/s through the control API with 1 and 16 concurrent
  clients, wall time of ``invsync item show X``, and daemon RSS when idle with N items;
- ``sync``: scan-to-visible latency between stations (a checkout on A until B's view
  shows it) with 3 stations, bytes on the wire per checkout, and the initial sync of a new
  station from a peer holding N items.

Each reports figures and its targets; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from cli.client import ControlClient
from daemon.control import MAX_IMPORT_ROWS
from tests import netns
from tests.daemon_harness import INVSYNC, Daemon, short_dir
from tests.fleet_ca import FleetCA

Json = dict[str, Any]
#: Every benchmark station is enrolled offline in this one fleet.
FLEET = FleetCA()


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _target(name: str, measured: float, limit: float, *, higher_is_better: bool = False) -> Json:
    met = measured >= limit if higher_is_better else measured <= limit
    return {"name": name, "target": limit, "measured": measured, "met": met}


def _station(base: Path, name: str, *extra: str) -> Daemon:
    data = base / name
    FLEET.enroll(data)
    return Daemon(data, base / f"{name}.sock", *extra, name=name)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _import(daemon: Daemon, count: int, prefix: str = "ITEM") -> float:
    """Import ``count`` bulk items over the control API; returns seconds taken."""
    client = ControlClient(daemon.socket_path, timeout=600)
    header = ["barcode", "name", "qty", "location", "category"]
    started = time.perf_counter()
    chunk = MAX_IMPORT_ROWS  # the most one request may carry
    for start in range(0, count, chunk):
        rows = [
            {
                "line": i + 2,
                "values": [f"{prefix}{i:06d}", f"XLR cable {i} m", "1000", "Aisle 3", "Cables"],
            }
            for i in range(start, min(count, start + chunk))
        ]
        client.request("POST", "import", {"header": header, "rows": rows})
    client.close()
    return time.perf_counter() - started


async def _checkout_rate(
    socket_path: Path, barcodes: Sequence[str], clients: int, total: int
) -> float:
    """Durable checkouts/s with ``clients`` concurrent connections, ``total`` in all."""
    per_client = total // clients
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(index: int) -> None:
            for n in range(per_client):
                barcode = barcodes[(index * per_client + n) % len(barcodes)]
                async with session.post(
                    f"http://station/v1/items/{barcode}/checkout", json={"qty": 1}
                ) as response:
                    if response.status != 200:
                        raise RuntimeError(await response.text())
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return per_client * clients / elapsed


def _cli_wall(daemon: Daemon, barcode: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [INVSYNC, "--socket", str(daemon.socket_path), "item", "show", barcode],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - started)
    return times


def run_daemon(args: argparse.Namespace) -> Json:
    sizes = [1000] if args.quick else [10_000, 100_000]
    ops = 500 if args.quick else 3000
    base = short_dir("bench")
    result: Json = {"sizes": {}}
    try:
        for count in sizes:
            _log(f"daemon: {count} items")
            daemon = _station(base, f"d{count}")
            daemon.start()
            imported = _import(daemon, count)
            daemon.stop(timeout=120)
            daemon.start(timeout=120)
            time.sleep(2.0)
            assert daemon.proc is not None
            rss = _rss_kib(daemon.proc.pid)
            barcodes = [f"ITEM{i:06d}" for i in range(0, count, max(1, count // 200))]
            single = asyncio.run(_checkout_rate(daemon.socket_path, barcodes, 1, ops // 3))
            sixteen = asyncio.run(_checkout_rate(daemon.socket_path, barcodes, 16, ops))
            walls = _cli_wall(daemon, barcodes[0], 7 if args.quick else 21)
            result["sizes"][str(count)] = {
                "import_s": round(imported, 2),
                "idle_rss_mib": round(rss / 1024, 1),
                "checkouts_per_s_1_client": round(single),
                "checkouts_per_s_16_clients": round(sixteen),
                "cli_item_show_ms": {
                    "median": _ms(statistics.median(walls)),
                    "max": _ms(max(walls)),
                },
            }
            daemon.stop(timeout=120)
        largest = result["sizes"][str(sizes[-1])]
        result["targets"] = [
            _target(
                "checkouts/s with 16 clients",
                largest["checkouts_per_s_16_clients"],
                1000,
                higher_is_better=True,
            ),
            _target(
                "invsync item show wall ms (median)", largest["cli_item_show_ms"]["median"], 300
            ),
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


# ---------------------------------------------------------------------- sync


def _wait(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(step)
    return time.perf_counter() - started


def _peers(client: ControlClient) -> list[Json]:
    peers: list[Json] = client.request("GET", "peers")["peers"]
    return peers


def _mesh(base: Path, names: Sequence[str], ports: Sequence[int]) -> list[Daemon]:
    stations = []
    for name, port in zip(names, ports, strict=True):
        peers = [f"--peer=127.0.0.1:{p}" for p in ports if p != port]
        stations.append(_station(base, name, "--listen", f"127.0.0.1:{port}", *peers))
    for station in stations:
        station.launch()
    for station in stations:
        station.wait_ready(30)
    return stations


def _free_ports(count: int) -> list[int]:

    holders = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        holders.append(sock)
    ports = [int(s.getsockname()[1]) for s in holders]
    for sock in holders:
        sock.close()
    return ports


def _latency(stations: Sequence[Daemon], samples: int) -> Json:
    a, b = ControlClient(stations[0].socket_path), ControlClient(stations[1].socket_path)
    a.request("POST", "items", {"barcode": "LAT001", "name": "Latency probe", "qty": 1_000_000})
    _wait(lambda: _found(b, "LAT001"), 10)
    peers_before = {p["station_id"]: p for p in _peers(a)}
    latencies = []
    stock = 1_000_000
    for _ in range(samples):
        started = time.perf_counter()
        a.request("POST", "items/LAT001/checkout", {"qty": 1})
        stock -= 1
        while b.request("GET", "items/LAT001")["items"][0]["stock"] != stock:
            if time.perf_counter() - started > 5:
                raise TimeoutError("update did not arrive")
        latencies.append(time.perf_counter() - started)
    time.sleep(0.5)  # let the acks of the last checkouts arrive
    peers_after = {p["station_id"]: p for p in _peers(a)}
    b_id = b.request("GET", "status")["station"]["id"]
    sent = peers_after[b_id]["bytes_sent"] - peers_before[b_id]["bytes_sent"]
    received = peers_after[b_id]["bytes_received"] - peers_before[b_id]["bytes_received"]
    a.close()
    b.close()
    return {
        "samples": samples,
        "p50_ms": _ms(_percentile(latencies, 0.5)),
        "p99_ms": _ms(_percentile(latencies, 0.99)),
        "bytes_per_checkout_a_to_b": round(sent / samples, 1),
        "bytes_per_checkout_acks_b_to_a": round(received / samples, 1),
    }


def _found(client: ControlClient, barcode: str) -> bool:
    try:
        client.request("GET", f"items/{barcode}")
    except Exception:
        return False
    return True


def _initial_sync(base: Path, count: int) -> Json:
    source_port, new_port = _free_ports(2)
    source = _station(base, "source", "--listen", f"127.0.0.1:{source_port}")
    source.start()
    imported = _import(source, count, prefix="INIT")
    newcomer = _station(
        base, "newcomer", "--listen", f"127.0.0.1:{new_port}", f"--peer=127.0.0.1:{source_port}"
    )
    started = time.perf_counter()
    newcomer.start()
    client = ControlClient(newcomer.socket_path, timeout=60)
    source_client = ControlClient(source.socket_path, timeout=60)

    def caught_up() -> bool:
        if client.request("GET", "status")["items"] != count:
            return False
        peers = _peers(source_client)
        return bool(peers) and all(p["lacking"] == 0 for p in peers if p["state"] == "connected")

    _wait(caught_up, 600, step=0.2)
    elapsed = time.perf_counter() - started
    (peer,) = _peers(source_client)
    client.close()
    source_client.close()
    newcomer.stop(timeout=120)
    source.stop(timeout=120)
    return {
        "items": count,
        "source_import_s": round(imported, 1),
        "seconds_from_start_to_caught_up": round(elapsed, 2),
        "bytes_sent_by_source": peer["bytes_sent"],
    }


def run_sync(args: argparse.Namespace) -> Json:
    base = short_dir("bench")
    result: Json = {}
    try:
        _log("sync: scan-to-visible latency, 3 stations")
        stations = _mesh(base, ["a", "b", "c"], _free_ports(3))
        try:
            client = ControlClient(stations[0].socket_path)
            _wait(lambda: sum(p["state"] == "connected" for p in _peers(client)) == 2, 30)
            client.close()
            result["scan_to_visible"] = _latency(stations, 100 if args.quick else 500)
        finally:
            for station in stations:
                station.stop(timeout=60)
        count = 2000 if args.quick else 100_000
        _log(f"sync: initial sync of {count} items")
        result["initial_sync"] = _initial_sync(base, count)
        latency = result["scan_to_visible"]
        result["targets"] = [
            _target("scan-to-visible p50 ms", latency["p50_ms"], 20),
            _target("scan-to-visible p99 ms", latency["p99_ms"], 100),
            _target(
                "bytes on the wire per checkout (A to B)", latency["bytes_per_checkout_a_to_b"], 200
            ),
            _target(
                f"initial sync of {count} items, s",
                result["initial_sync"]["seconds_from_start_to_caught_up"],
                15,
            ),
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


# ---------------------------------------------------------------------- partition


def _stock(client: ControlClient, barcode: str) -> int:
    stock: int = client.request("GET", f"items/{barcode}")["items"][0]["stock"]
    return stock


def run_partition(args: argparse.Namespace) -> Json:
    """Convergence after healing a partition during which both sides kept working.

    Two stations in network namespaces on a bridge; nft at the bridge cuts one off, each
    side records ``ops`` checkouts, the cut is removed, and the clock runs until both
    show the same stock and neither lacks anything of the other. The time includes
    noticing the link is back (reconnect backoff), which is what a warehouse sees.
    """
    reason = netns.unavailable()
    if reason is not None:
        return {"skipped": reason}
    ops = 200 if args.quick else 1000
    base = short_dir("bench")
    try:
        with netns.lan(2) as network:
            a_host, b_host = network.hosts
            stations = [
                netns.Station(a_host, base, "a", FLEET),
                netns.Station(b_host, base, "b", FLEET),
            ]
            for station in stations:
                station.launch()
            for station in stations:
                station.wait_ready(30)
            a, b = (ControlClient(s.socket_path, timeout=30) for s in stations)
            try:
                _wait(lambda: any(p["state"] == "connected" for p in _peers(a)), 30)
                a.request("POST", "items", {"barcode": "PART01", "name": "Cable", "qty": 10**6})
                _wait(lambda: _found(b, "PART01"), 30)
                network.cut_off(b_host)
                _wait(lambda: not any(p["state"] == "connected" for p in _peers(a)), 30)
                started = time.perf_counter()
                for client in (a, b):
                    for _ in range(ops):
                        client.request("POST", "items/PART01/checkout", {"qty": 1})
                working = time.perf_counter() - started
                expected = 10**6 - 2 * ops
                network.heal()
                healed = time.perf_counter()

                def converged() -> bool:
                    if _stock(a, "PART01") != expected or _stock(b, "PART01") != expected:
                        return False
                    return all(
                        p["state"] == "connected" and p["lacking"] == 0
                        for client in (a, b)
                        for p in _peers(client)
                    )

                _wait(converged, 120, step=0.05)
                convergence = time.perf_counter() - healed
            finally:
                a.close()
                b.close()
                for station in stations:
                    station.stop(timeout=60)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "ops_per_side": ops,
        "seconds_for_both_sides_to_work": round(working, 2),
        "seconds_from_heal_to_converged": round(convergence, 2),
    }
