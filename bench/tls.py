"""What mutual TLS costs on the peer transport: the same WebSocket links with and without it.

The product has no plaintext mode (on purpose), so the plain side is built here: an aiohttp
WebSocket server and client with the settings of ``daemon.transport`` (heartbeat, frame
limit, no compression, one client session per link), which is what peer links were before
TLS. The TLS side is the product's own :class:`~daemon.transport.PeerServer` and
:func:`~daemon.transport.dial` with contexts from :class:`~daemon.fleet.FleetMembership`
of two stations enrolled in one fleet (Ed25519 certificates, TLS 1.3).

Both servers run in this process on loopback, with the clients, in one event loop, so a
figure is the CPU of both ends. The two variants are measured interleaved (alternating
which goes first) so that other work on the machine lands on both alike:

- ``setup``: dial to usable link (TCP, TLS handshake with both certificates verified, the
  WebSocket upgrade, and for TLS the station id read from the peer's certificate);
- ``round_trip``: a 180-byte frame to the server and echoed back on an open link, which is
  what a scan's update costs on the wire (a checkout is ~190 bytes A to B), and the bytes
  each frame takes on TCP (TLS record and WebSocket header included);
- ``bulk``: ~70 MB in frames of 64 KiB to 1 MiB, until the server confirms it has them
  all, which is what an initial sync of 100k items costs on the wire (73 MB, one update
  per document of about 1 MiB).

Reports medians and p99s per round, the median over rounds, the ratios TLS/plain and
whether each stays within 20%. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.stations import FLEET, _log, _ms, _percentile, _target
from daemon import fleet
from daemon.config import HostPort
from daemon.identity import load_or_create
from daemon.protocol import MAX_FRAME
from daemon.transport import (
    CONNECT_TIMEOUT,
    HEARTBEAT,
    SYNC_PATH,
    Link,
    LinkClosed,
    PeerServer,
    dial,
)
from tests.daemon_harness import short_dir

Json = dict[str, Any]

#: The issue's budget: with TLS on, peer sync figures stay within 20% of those without.
SHARE = 0.2
WITHIN = 1 + SHARE
LOOPBACK = "127.0.0.1"
#: First byte of a frame, telling the echo server what to do with it.
ECHO, BULK, DONE = b"E", b"B", b"D"
#: A checkout's update is ~190 bytes on the wire A to B (docs/performance.md).
SCAN_FRAME = 180
BULK_FRAMES = (64 * 1024, 256 * 1024, 1024 * 1024)
BULK_BYTES = 70 * 1024 * 1024
#: A link that is not up in this time, or a transfer not confirmed, is a failure to report
#: (a lost upgrade request would otherwise hang ``make bench``: dial has no read timeout).
DIAL_TIMEOUT = 15.0
BULK_TIMEOUT = 120.0
#: The end-to-end figures before TLS (docs/performance.md, peer sync): the wire-level
#: extra of TLS is also set against them, as a share of what a user waits for.
PRE_TLS_SCAN_TO_VISIBLE_P50_MS = 8.0
PRE_TLS_INITIAL_SYNC_S = 26.0


@dataclass(frozen=True, slots=True)
class Sizes:
    rounds: int
    connections: int
    round_trips: int
    bulk_bytes: int


async def _serve(link: Link) -> None:
    """Echo ``ECHO`` frames, count ``BULK`` bytes, answer ``DONE`` with the count."""
    received = 0
    try:
        while True:
            frame = await link.receive()
            kind = frame[:1]
            if kind == ECHO:
                await link.send(frame)
            elif kind == BULK:
                received += len(frame)
            elif kind == DONE:
                await link.send(DONE + str(received).encode())
                received = 0
    except LinkClosed:
        return


def _allow(station_id: str) -> str | None:
    return None


def _refused(remote: str, reason: str, station_id: str | None) -> None:
    _log(f"tls: refused {remote} ({station_id}): {reason}")


class _PlainServer:
    """The peer server without TLS: aiohttp's request handler straight on the TCP socket."""

    def __init__(self, accept: Callable[[Link], Awaitable[None]]) -> None:
        self._accept = accept
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> _PlainServer:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get(SYNC_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        factory = self._runner.server
        assert factory is not None
        self._server = await asyncio.get_running_loop().create_server(factory, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME, compress=False)
        await ws.prepare(request)
        link = Link(ws, "plain", dialed=False)
        try:
            await self._accept(link)
        finally:
            await link.close()
        return ws


async def _dial_plain(port: int) -> Link:
    """``daemon.transport.dial`` as it was before TLS: ``ws://``, same settings."""
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
    )
    try:
        ws = await session.ws_connect(
            f"ws://{LOOPBACK}:{port}{SYNC_PATH}",
            heartbeat=HEARTBEAT,
            max_msg_size=MAX_FRAME,
            compress=0,
            autoping=True,
        )
    except BaseException:
        await session.close()
        raise
    return Link(ws, f"{LOOPBACK}:{port}", dialed=True, session=session)


Dialer = Callable[[], Awaitable[Link]]

#: ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` in Linux's ``struct tcp_info``.
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_BYTES_OFFSET = 120


def _tcp_bytes(link: Link) -> tuple[int, int] | None:
    """Bytes this link's TCP socket has had acked and has received: what really crossed
    the wire, TLS records and WebSocket headers included (``Link`` counts only frames)."""
    # Link does not expose its socket; the benchmark reads it from the WebSocket.
    sock = link._ws.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    size = _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
    if len(info) < size:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    return int(acked), int(received)


def _summary(samples: Sequence[float]) -> Json:
    return {
        "p50_ms": _ms(_percentile(samples, 0.5)),
        "p99_ms": _ms(_percentile(samples, 0.99)),
    }


async def _setup_round(dialers: dict[str, Dialer], connections: int) -> dict[str, Json]:
    times: dict[str, list[float]] = {name: [] for name in dialers}
    order = list(dialers)
    for n in range(connections):
        # Alternate who goes first, so a burst of other work hits both variants alike.
        for name in order if n % 2 == 0 else reversed(order):
            started = time.perf_counter()
            link = await asyncio.wait_for(dialers[name](), DIAL_TIMEOUT)
            times[name].append(time.perf_counter() - started)
            await link.close()
    return {name: _summary(samples) for name, samples in times.items()}


async def _round_trip_round(links: dict[str, Link], count: int) -> dict[str, Json]:
    times: dict[str, list[float]] = {name: [] for name in links}
    frame = ECHO + os.urandom(SCAN_FRAME - 1)
    order = list(links)
    before = {name: _tcp_bytes(link) for name, link in links.items()}
    for n in range(count):
        for name in order if n % 2 == 0 else reversed(order):
            link = links[name]
            started = time.perf_counter()
            await link.send(frame)
            echoed = await asyncio.wait_for(link.receive(), DIAL_TIMEOUT)
            times[name].append(time.perf_counter() - started)
            if echoed != frame:
                raise RuntimeError(f"{name}: echo differs")
    result = {name: _summary(samples) for name, samples in times.items()}
    for name, link in links.items():
        start, end = before[name], _tcp_bytes(link)
        if start is not None and end is not None:
            # Heartbeat pings (every 5 s) are in here too: a few bytes over the round.
            result[name]["tcp_bytes_per_frame_sent"] = round((end[0] - start[0]) / count, 1)
            result[name]["tcp_bytes_per_frame_received"] = round((end[1] - start[1]) / count, 1)
    return result


async def _bulk_once(link: Link, frame: bytes, total: int) -> float:
    frames = max(1, total // len(frame))
    started = time.perf_counter()
    for _ in range(frames):
        await link.send(frame)
    await link.send(DONE)
    answer = await link.receive()
    elapsed = time.perf_counter() - started
    if answer != DONE + str(frames * len(frame)).encode():
        raise RuntimeError(f"bulk: server confirmed {answer[:40]!r}")
    return elapsed


async def _bulk_round(links: dict[str, Link], total: int, first: int) -> dict[str, Json]:
    result: dict[str, Json] = {name: {} for name in links}
    order = list(links)
    if first % 2:
        order.reverse()
    for size in BULK_FRAMES:
        frame = BULK + os.urandom(size - 1)
        for name in order:
            seconds = await asyncio.wait_for(_bulk_once(links[name], frame, total), BULK_TIMEOUT)
            sent = max(1, total // size) * size
            result[name][f"{size // 1024}KiB"] = {
                "seconds": round(seconds, 3),
                "mb_per_s": round(sent / seconds / 1e6, 1),
            }
        order.reverse()
    return result


async def _measure(base: Path, sizes: Sizes) -> Json:
    memberships = []
    for name in ("server", "client"):
        data = base / name
        FLEET.enroll(data)
        memberships.append(fleet.load(data, load_or_create(data)))
    server_context = memberships[0].server_context()
    client_context = memberships[1].client_context()
    rounds: list[Json] = []
    tls_server = PeerServer(
        HostPort(LOOPBACK, 0),
        _serve,
        lambda: server_context,
        authorize=_allow,
        refused=_refused,
    )
    async with tls_server, _PlainServer(_serve) as plain_server:
        tls_address = HostPort(LOOPBACK, tls_server.port)
        dialers: dict[str, Dialer] = {
            "tls": lambda: dial(tls_address, client_context, _allow),
            "plain": lambda: _dial_plain(plain_server.port),
        }
        await _setup_round(dialers, 20)  # warm-up: imports, caches, the first allocations
        for number in range(sizes.rounds):
            _log(f"tls: round {number + 1} of {sizes.rounds}")
            setup = await _setup_round(dialers, sizes.connections)
            links = {
                name: await asyncio.wait_for(dialer(), DIAL_TIMEOUT)
                for name, dialer in dialers.items()
            }
            try:
                await _round_trip_round(links, 50)  # warm-up
                round_trip = await _round_trip_round(links, sizes.round_trips)
                bulk = await _bulk_round(links, sizes.bulk_bytes, number)
            finally:
                for link in links.values():
                    await link.close()
            rounds.append({"setup": setup, "round_trip": round_trip, "bulk": bulk})
    return _report(rounds, sizes)


def _median_of(rounds: Sequence[Json], *path: str) -> float:
    values = []
    for figures in rounds:
        leaf: Any = figures
        for key in path:
            leaf = leaf[key]
        values.append(float(leaf))
    return round(statistics.median(values), 3)


def _report(rounds: Sequence[Json], sizes: Sizes) -> Json:
    median: Json = {}
    ratios: Json = {}
    targets: list[Json] = []

    def compare(label: str, *path: str) -> None:
        tls = _median_of(rounds, *path[:1], "tls", *path[1:])
        plain = _median_of(rounds, *path[:1], "plain", *path[1:])
        key = "/".join(path)
        median[key] = {"tls": tls, "plain": plain}
        ratio = round(tls / plain, 3) if plain else float("inf")
        ratios[key] = ratio
        targets.append(_target(f"{label}: TLS/plain", ratio, WITHIN))

    compare("connection set-up p50", "setup", "p50_ms")
    compare("connection set-up p99", "setup", "p99_ms")
    compare("small-frame round trip p50", "round_trip", "p50_ms")
    compare("small-frame round trip p99", "round_trip", "p99_ms")
    for size in BULK_FRAMES:
        compare(
            f"{sizes.bulk_bytes // 2**20} MiB in {size // 1024} KiB frames",
            "bulk",
            f"{size // 1024}KiB",
            "seconds",
        )
    scan_extra_ms = median["round_trip/p50_ms"]["tls"] - median["round_trip/p50_ms"]["plain"]
    bulk_key = f"bulk/{BULK_FRAMES[-1] // 1024}KiB/seconds"
    bulk_extra_s = median[bulk_key]["tls"] - median[bulk_key]["plain"]
    targets.append(
        _target(
            "TLS extra of a small-frame round trip (p50), share of the pre-TLS "
            f"scan-to-visible p50 ({PRE_TLS_SCAN_TO_VISIBLE_P50_MS} ms)",
            round(scan_extra_ms / PRE_TLS_SCAN_TO_VISIBLE_P50_MS, 4),
            SHARE,
        )
    )
    # Scaled to the 73 MB of the real initial sync, so a --quick run gives a sane share.
    bulk_extra_73mb_s = bulk_extra_s * 73e6 / sizes.bulk_bytes
    targets.append(
        _target(
            "TLS extra of 73 MB in 1 MiB frames, share of the pre-TLS initial sync of "
            f"100k items ({PRE_TLS_INITIAL_SYNC_S} s)",
            round(bulk_extra_73mb_s / PRE_TLS_INITIAL_SYNC_S, 4),
            SHARE,
        )
    )
    return {
        "rounds": sizes.rounds,
        "connections_per_round": sizes.connections,
        "round_trips_per_round": sizes.round_trips,
        "round_trip_frame_bytes": SCAN_FRAME,
        "bulk_bytes": sizes.bulk_bytes,
        "per_round": list(rounds),
        "median_of_rounds": median,
        "ratio_tls_to_plain": ratios,
        "tls_extra": {
            "round_trip_p50_ms": round(scan_extra_ms, 3),
            "bulk_73mb_in_1mib_frames_s": round(bulk_extra_73mb_s, 3),
        },
        "targets": targets,
    }


def run(args: argparse.Namespace) -> Json:
    quick = bool(args.quick)
    sizes = Sizes(
        rounds=getattr(args, "repeat", None) or (1 if quick else 3),
        connections=50 if quick else 200,
        round_trips=200 if quick else 2000,
        bulk_bytes=8 * 2**20 if quick else BULK_BYTES,
    )
    base = short_dir("bench")
    try:
        return asyncio.run(_measure(base, sizes))
    finally:
        shutil.rmtree(base, ignore_errors=True)
