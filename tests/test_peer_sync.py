"""Peer sync between real ``invsyncd`` processes on one host.

Every station is a real daemon on loopback with its own data directory; the stations of a
test are enrolled offline in a fleet CA made for that test (so stations of tests running
at the same time on this host never mix); every link is mutual TLS. What is
checked is what people at the stations would see: items and stock on every station, the
conflict list, ``invsync peers`` and ``invsync sync``.

mDNS runs on 127.0.0.1 only. Tests without mDNS use static peers and peer exchange. A
line topology A–B–C (relay) is built on loopback by giving A and C listen addresses
(127.0.0.2, 127.0.0.3) other than the source address B sees them connect from
(127.0.0.1): B's peer exchange then hands out addresses where nobody listens, as it would
for stations behind a NAT, and A and C can reach each other only through B.

Polling loops are bounded; timeouts are generous because the stations share the CPU
with each other and with other test runs, and only bound the test.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pycrdt
import pytest

from cli.client import ControlClient, item_route
from crdt_store.schema import DOCUMENT_FORMAT
from daemon.protocol import (
    MAX_FRAME,
    Digest,
    FrameType,
    Hello,
    Update,
    decode_frame,
    encode_frame,
)
from daemon.transport import CLOSE_PROTOCOL, CLOSE_REFUSED, SYNC_PATH
from tests.daemon_harness import Daemon, short_dir
from tests.stations import (
    Stations,
    add_item,
    api,
    checkout,
    cli_json,
    connected,
    find,
    item_count,
    listen_port,
    peer_at,
    peer_list,
    station_id,
    stock,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


#: Bounds for things that take a second or two on an idle machine.
DISCOVERY_TIMEOUT = 40.0
SETTLE_TIMEOUT = 40.0


# ---------------------------------------------------------------------- stations


@pytest.fixture
def fleet() -> Iterator[Stations]:
    with Stations(short_dir("ps")) as fleet:
        yield fleet


def wait_all_connected(daemons: list[Daemon], timeout: float = DISCOVERY_TIMEOUT) -> None:
    ids = {daemon.name: station_id(daemon) for daemon in daemons}
    for daemon in daemons:
        others = set(ids.values()) - {ids[daemon.name]}
        wait_until(
            f"{daemon.name} connected to all {len(others)} others",
            timeout,
            lambda daemon=daemon, others=others: connected(daemon) >= others,  # type: ignore[misc]
        )


def write_catalog(path: Path, rows: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["barcode", "name", "qty", "kind", "location", "category", "notes"])
        for i in range(rows):
            writer.writerow(
                [
                    f"CAT-{i:05d}",
                    f"Cable XLR {i % 50 + 1} m",
                    50,
                    "bulk",
                    f"R{i % 40:02d}-S{i % 7}",
                    ("Cables", "Lighting", "Audio", "Staging")[i % 4],
                    "black, 3-pin" if i % 3 == 0 else "",
                ]
            )


# ---------------------------------------------------------------------- mDNS


def test_three_stations_found_by_mdns_share_items_stock_and_conflicts(fleet: Stations) -> None:
    """Three stations with mDNS on 127.0.0.1 and no static peers find each other; an item
    added on one appears on all; checkouts made at the same moment on all three add up
    exactly everywhere; and one field edited on two stations while they were apart
    converges to the later edit and is listed as a conflict on every station."""
    stations = [fleet.station(name, mdns=True) for name in ("dock-a", "dock-b", "dock-c")]
    a, b, c = stations
    fleet.start(*stations)
    wait_all_connected(stations)

    add_item(a, "MIC-58", "Shure SM58", 100)
    for other in (b, c):
        wait_until(
            f"MIC-58 on {other.name}",
            SETTLE_TIMEOUT,
            lambda o=other: stock(o, "MIC-58") == 100,  # type: ignore[misc]
        )

    # Ten checkouts per station, all three stations at once: 10 of 1, 2 and 3 units = 60.
    start = threading.Barrier(3)

    def scan_out(daemon: Daemon, qty: int) -> None:
        client = ControlClient(daemon.socket_path, timeout=120)
        try:
            start.wait()
            for _ in range(10):
                client.request("POST", item_route("MIC-58", "checkout"), {"qty": qty})
        finally:
            client.close()

    with ThreadPoolExecutor(3) as pool:
        for future in [
            pool.submit(scan_out, d, q) for d, q in zip(stations, (1, 2, 3), strict=True)
        ]:
            future.result()
    for daemon in stations:
        wait_until(
            f"stock 40 on {daemon.name}",
            SETTLE_TIMEOUT,
            lambda d=daemon: stock(d, "MIC-58") == 40,  # type: ignore[misc]
        )
        history = cli_json(daemon, "history", "MIC-58")["movements"]
        assert sum(m["qty"] for m in history if m["op"] == "checkout") == 60

    # Concurrent edits: dock-c goes away and runs on its own for a while (no mDNS, no
    # peers, and an address where the others' stale entry for it cannot reach it), and
    # both sides move the item to a different shelf before they meet again.
    c_id = station_id(c)
    assert c.stop() == 0
    wait_until("dock-c offline on dock-a", 20, lambda: c_id not in connected(a))
    alone = Daemon(c.data_dir, c.socket_path, "--listen", "127.0.0.9:0", name=c.name)
    fleet.stations.append(alone)
    alone.start()
    edited = a.cli("item", "edit", "MIC-58", "--location", "Shelf A1")
    assert edited.returncode == 0, edited.stderr
    wait_until(
        "dock-b sees Shelf A1",
        SETTLE_TIMEOUT,
        lambda: (find(b, "MIC-58") or {}).get("location") == "Shelf A1",
    )
    edited = alone.cli("item", "edit", "MIC-58", "--location", "Cage C3")
    assert edited.returncode == 0, edited.stderr
    assert connected(alone) == set()
    assert (find(alone, "MIC-58") or {}).get("location") == "Cage C3"
    assert alone.stop() == 0
    c.start()

    for daemon in stations:
        wait_until(
            f"{daemon.name} lists the shelf conflict",
            DISCOVERY_TIMEOUT + SETTLE_TIMEOUT,
            lambda d=daemon: cli_json(d, "conflicts")["conflicts"],  # type: ignore[misc]
        )
        (item,) = cli_json(daemon, "conflicts")["conflicts"]
        assert item["barcode"] == "MIC-58"
        assert item["location"] == "Cage C3", daemon.name  # the later edit wins...
        (conflict,) = item["conflicts"]
        assert conflict["field"] == "location"
        values = {v["value"]: (v["hlc"], v["station"]) for v in conflict["values"]}
        assert set(values) == {"Shelf A1", "Cage C3"}
        # ...because it carries the higher hybrid logical clock.
        assert max(values, key=lambda v: values[v]) == "Cage C3"
        assert item["stock"] == 40


def test_five_stations_found_by_mdns_all_connect_and_share_an_item(fleet: Stations) -> None:
    stations = [fleet.station(f"st-{i}", mdns=True) for i in range(5)]
    fleet.start(*stations)
    ids = {station_id(d) for d in stations}
    for daemon in stations:
        mine = station_id(daemon)
        wait_until(
            f"{daemon.name} connected to the 4 others",
            DISCOVERY_TIMEOUT,
            lambda d=daemon, m=mine: connected(d) == ids - {m},  # type: ignore[misc]
        )
    add_item(stations[3], "LED-PAR", "LED Par 64", 24)
    for daemon in stations:
        wait_until(
            f"LED-PAR on {daemon.name}",
            SETTLE_TIMEOUT,
            lambda d=daemon: stock(d, "LED-PAR") == 24,  # type: ignore[misc]
        )
    synced = stations[3].cli("sync", timeout=120)
    assert (synced.returncode, synced.stdout) == (0, "In sync with 4 peers.\n"), synced


# ---------------------------------------------------------------------- static peers


def test_peer_exchange_connects_stations_that_were_told_only_one_peer(fleet: Stations) -> None:
    """A and C each know only B; B tells them about each other and they connect
    directly, so an item added on A reaches C even after B has gone."""
    b = fleet.station("hub-b")
    fleet.start(b)
    hub = peer_at(b)
    a = fleet.station("dock-a", "--peer", hub)
    c = fleet.station("dock-c", "--peer", hub)
    fleet.start(a, c)
    a_id, b_id, c_id = station_id(a), station_id(b), station_id(c)
    wait_until("dock-a connected to dock-c", DISCOVERY_TIMEOUT, lambda: c_id in connected(a))
    wait_until("dock-c connected to dock-a", DISCOVERY_TIMEOUT, lambda: a_id in connected(c))

    assert b.stop() == 0
    wait_until("hub-b offline on dock-c", 20, lambda: b_id not in connected(c))
    add_item(a, "CASE-1", "Road case", 3)
    wait_until("CASE-1 on dock-c without hub-b", SETTLE_TIMEOUT, lambda: stock(c, "CASE-1") == 3)


def test_updates_are_relayed_along_a_line_of_stations(fleet: Stations) -> None:
    """A–B–C where A and C cannot reach each other: changes on either end reach the
    other end through B (relay), not over a direct link."""
    b = fleet.station("mid-b")
    fleet.start(b)
    hub = peer_at(b)
    # B sees A and C connect from 127.0.0.1 and passes that address on; they listen on
    # 127.0.0.2 and 127.0.0.3, so the addresses peer exchange hands out lead nowhere.
    a = fleet.station("end-a", "--listen", "127.0.0.2:0", "--peer", hub)
    c = fleet.station("end-c", "--listen", "127.0.0.3:0", "--peer", hub)
    fleet.start(a, c)
    b_id = station_id(b)
    wait_until("mid-b connected to both ends", DISCOVERY_TIMEOUT, lambda: len(connected(b)) == 2)

    def line_holds() -> None:
        assert connected(a) == {b_id}
        assert connected(c) == {b_id}

    line_holds()
    add_item(a, "TRUSS-3", "Truss 3 m", 12)

    def arrived_through_b() -> bool:
        line_holds()
        return stock(c, "TRUSS-3") == 12

    wait_until("TRUSS-3 on end-c", SETTLE_TIMEOUT, arrived_through_b)
    checkout(c, "TRUSS-3", 5)

    def returned_through_b() -> bool:
        line_holds()
        return stock(a, "TRUSS-3") == 7

    wait_until("the checkout on end-c seen on end-a", SETTLE_TIMEOUT, returned_through_b)
    assert {p["station_id"] for p in peer_list(a)} == {b_id}, "end-a never met end-c"


# ---------------------------------------------------------------------- catching up


@pytest.fixture(scope="module")
def catalog_fleet() -> Iterator[tuple[Stations, Daemon, Daemon]]:
    """Stations A and B sharing a 10 000-item catalog imported on A with ``invsync import``."""
    with Stations(short_dir("ps")) as fleet:
        a = fleet.station("office-a")
        fleet.start(a)
        b = fleet.station("dock-b", "--peer", peer_at(a))
        fleet.start(b)
        catalog = fleet.base / "catalog.csv"
        write_catalog(catalog, 10_000)
        imported = cli_json(a, "import", str(catalog), timeout=300)
        assert imported["imported"] == 10_000, imported
        wait_until("dock-b has the catalog", 180, lambda: item_count(b) == 10_000)
        yield fleet, a, b


def test_new_station_catches_up_with_a_10k_item_fleet(
    catalog_fleet: tuple[Stations, Daemon, Daemon],
) -> None:
    fleet, a, _ = catalog_fleet
    new = fleet.station("new-n", "--peer", peer_at(a))
    fleet.start(new)
    assert item_count(new) < 10_000
    wait_until("new-n has all 10 000 items", 180, lambda: item_count(new) == 10_000)
    for barcode in ("CAT-00000", "CAT-04567", "CAT-09999"):
        assert find(new, barcode) == find(a, barcode)

    synced = a.cli("sync", "--timeout", "120", timeout=180)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert re.fullmatch(r"In sync with \d+ peers\.\n", synced.stdout), synced.stdout
    assert cli_json(new, "sync", "--timeout", "60")["in_sync"] is True
    assert new.stop() == 0


def bytes_received(daemon: Daemon) -> int:
    return sum(int(p["bytes_received"]) for p in peer_list(daemon))


def test_station_back_after_a_day_away_catches_up_with_diffs(
    catalog_fleet: tuple[Stations, Daemon, Daemon],
) -> None:
    """C joins (receiving the whole inventory), is switched off, A and B record 2000
    checkouts, C comes back: it ends with the same stock and history, having received
    a small fraction of what its first sync took."""
    fleet, a, b = catalog_fleet
    c = fleet.station("away-c", "--peer", peer_at(a))
    fleet.start(c)
    wait_until("away-c has the catalog", 180, lambda: item_count(c) == 10_000)
    assert cli_json(c, "sync", "--timeout", "120")["in_sync"] is True
    full_state_bytes = bytes_received(c)
    assert c.stop() == 0

    touched = [f"CAT-{i * 37:05d}" for i in range(200)]

    def shift(worker: int) -> None:
        client = ControlClient((a, b)[worker % 2].socket_path, timeout=120)
        try:
            for n in range(250):
                barcode = touched[(worker * 250 + n) % len(touched)]
                client.request("POST", item_route(barcode, "checkout"), {"qty": 1})
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(shift, worker) for worker in range(8)]:
            future.result()
    synced = a.cli("--json", "sync", "--timeout", "120", timeout=180)
    assert synced.returncode == 0, synced.stdout

    c.start()
    expected = {barcode: stock(a, barcode) for barcode in touched}
    assert set(expected.values()) == {40}
    wait_until(
        "away-c has every checkout",
        120,
        lambda: all(stock(c, barcode) == 40 for barcode in touched),
    )
    history = cli_json(c, "history", touched[0])["movements"]
    assert sum(1 for m in history if m["op"] == "checkout") == 10
    assert cli_json(c, "sync", "--timeout", "120")["in_sync"] is True
    catch_up_bytes = bytes_received(c)
    print(f"away-c: first sync {full_state_bytes} bytes, catching up {catch_up_bytes} bytes")
    # 2000 checkouts in diffs versus a 10 000-item inventory: a tenth is a loose bound
    # (measured: about 4%); a full resend would be at least full_state_bytes.
    assert catch_up_bytes < full_state_bytes / 10, (catch_up_bytes, full_state_bytes)
    assert catch_up_bytes > 2000 * 20, "C received less than the changes it lacked"
    assert c.stop() == 0


# ---------------------------------------------------------------------- bad peers


@dataclass
class Closed:
    code: int | None
    reason: str
    frames: list[Any]


HelloEdit = Callable[[Hello], Hello]


async def raw_session(
    peer: tuple[ssl.SSLContext, str],
    port: int,
    first: bytes | HelloEdit | None,
    *after: bytes | str,
) -> Closed:
    """Dial the daemon like a peer would, send frames, and report how the link ended.

    ``peer`` is a TLS context with a certificate of the fleet and its station id (see
    ``FleetCA.client``). ``first`` may be ``None``: then the hello is copied from the
    daemon's own hello with that station id, so it is valid and of the same fleet; or a
    function that changes that valid hello."""
    context, peer_id = peer
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"wss://127.0.0.1:{port}{SYNC_PATH}", max_msg_size=MAX_FRAME, ssl=context
        ) as ws,
    ):
        theirs = decode_frame(await asyncio.wait_for(ws.receive_bytes(), 20))
        assert isinstance(theirs, Hello)
        if first is None or callable(first):
            valid = Hello(
                version=theirs.version,
                station_id=peer_id,
                name="intruder",
                fleet_id=theirs.fleet_id,
                shard_count=theirs.shard_count,
                schema_version=theirs.schema_version,
                port=0,
            )
            first = encode_frame(first(valid) if callable(first) else valid)
        frames: list[Any] = []
        try:
            await ws.send_bytes(first)
            for message in after:
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
        except (ConnectionError, aiohttp.ClientError):
            pass  # the daemon hung up while we were still sending: also an answer
        while True:
            received = await asyncio.wait_for(ws.receive(), 30)
            if received.type is aiohttp.WSMsgType.BINARY:
                frames.append(decode_frame(received.data))
                continue
            if received.type is aiohttp.WSMsgType.CLOSE:
                return Closed(ws.close_code, received.extra or "", frames)
            return Closed(ws.close_code, str(received.type), frames)


def test_garbage_from_a_peer_closes_that_link_only(fleet: Stations) -> None:
    """A live daemon fed malformed frames closes each such link with a reason and keeps
    syncing with its real peer; nothing the garbage carried reaches its inventory."""
    a = fleet.station("dock-a")
    fleet.start(a)
    b = fleet.station("dock-b", "--peer", peer_at(a))
    fleet.start(b)
    b_id = station_id(b)
    wait_until("dock-a connected to dock-b", DISCOVERY_TIMEOUT, lambda: b_id in connected(a))
    add_item(a, "AMP-1", "Amp rack", 4)
    wait_until("AMP-1 on dock-b", SETTLE_TIMEOUT, lambda: find(b, "AMP-1"))
    port = listen_port(a)
    link_to_b = next(p for p in peer_list(a) if p["station_id"] == b_id)
    inventory = api(a, "GET", "items")["items"]

    author: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
    author.get("x", type=pycrdt.Map)["y"] = "a real update, cut short"
    truncated = author.get_update()[:-4]
    other_fleet = Hello(1, "OTHERFLEET000001", "elsewhere", "Z" * 16, 64, 1, 0)
    nested = bytes([FrameType.PEERS]) + b"[" * 5000

    def newer_documents(hello: Hello) -> Hello:
        return replace(hello, schema_version=DOCUMENT_FORMAT + 1)

    def other_shards(hello: Hello) -> Hello:
        return replace(hello, shard_count=hello.shard_count + 1)

    newer = f"document format {DOCUMENT_FORMAT + 1}, ours is {DOCUMENT_FORMAT}"

    cases: list[tuple[str, bytes | HelloEdit | None, tuple[bytes | str, ...], int, str]] = [
        ("not JSON", b"\x01{not json", (), CLOSE_PROTOCOL, "bad JSON"),
        ("no hello", encode_frame(Digest(b"\x00" * 32)), (), CLOSE_PROTOCOL, "expected hello"),
        ("other fleet", encode_frame(other_fleet), (), CLOSE_REFUSED, "another fleet"),
        ("other documents", newer_documents, (), CLOSE_REFUSED, newer),
        ("other shards", other_shards, (), CLOSE_REFUSED, "shard count"),
        ("unknown type", None, (b"\xff\x00",), CLOSE_PROTOCOL, "unknown frame type"),
        ("corrupt update", None, (encode_frame(Update("items/00", b"\x05\xff\xff")),),
         CLOSE_PROTOCOL, "rejected update"),
        ("cut update", None, (encode_frame(Update("items/01", truncated)),),
         CLOSE_PROTOCOL, "rejected update"),
        ("unknown doc", None, (encode_frame(Update("items/99", author.get_update())),),
         CLOSE_PROTOCOL, "rejected update"),
        ("over type limit", None, (bytes([FrameType.DIGEST]) + b"\x00" * 100,),
         CLOSE_PROTOCOL, "over its limit"),
        ("nested JSON", None, (nested,), CLOSE_PROTOCOL, "bad JSON"),
        ("second hello", None, (encode_frame(other_fleet),), CLOSE_PROTOCOL, "unexpected Hello"),
    ]  # fmt: skip
    peer = fleet.ca.client(fleet.base / "hand-written-peer")
    for label, first, after, code, reason in cases:
        closed = asyncio.run(raw_session(peer, port, first, *after))
        assert closed.code == code, (label, closed)
        assert reason in closed.reason, (label, closed)

    # Frames the WebSocket layer itself refuses (text, or over the largest frame limit)
    # end the link too, though the peer is told no reason; the daemon logs one.
    closed = asyncio.run(raw_session(peer, port, None, "a text frame"))
    assert closed.code is not None, closed
    closed = asyncio.run(raw_session(peer, port, None, b"\x04" + b"\x00" * MAX_FRAME))
    assert closed.code in (1006, 1009), closed  # abnormal closure / message too big
    wait_until("the reason in the log", 10, lambda: "exceeds limit" in a.log())

    assert a.proc is not None and a.proc.poll() is None
    assert api(a, "GET", "items")["items"] == inventory
    (still,) = [p for p in peer_list(a) if p["station_id"] == b_id]
    assert still["state"] == "connected"
    assert still["since"] == link_to_b["since"], "the link to dock-b was never dropped"
    add_item(b, "AMP-2", "Amp rack, spare", 2)
    wait_until("AMP-2 reaches dock-a", SETTLE_TIMEOUT, lambda: stock(a, "AMP-2") == 2)


# ---------------------------------------------------------------------- what people see


def test_peers_and_sync_commands_show_the_fleet(fleet: Stations) -> None:
    a = fleet.station("office-a")
    fleet.start(a)
    hub = peer_at(a)
    b = fleet.station("dock-b", "--peer", hub)
    c = fleet.station("dock-c", "--peer", hub)
    fleet.start(b, c)
    ids = {d.name: station_id(d) for d in (a, b, c)}
    wait_until("office-a sees both docks", DISCOVERY_TIMEOUT, lambda: len(connected(a)) == 2)
    add_item(b, "MIC-1", "Mic", 5)
    wait_until("MIC-1 on office-a", SETTLE_TIMEOUT, lambda: find(a, "MIC-1"))

    synced = a.cli("sync", timeout=120)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert synced.stdout == "In sync with 2 peers.\n"

    table = a.cli("peers")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "STATION", "NAME", "ADDRESS", "STATE", "SINCE", "(UTC)", "LACKING", "LAST", "ERROR"
    ]  # fmt: skip
    assert len(rows) == 2
    for name in ("dock-b", "dock-c"):
        (row,) = [r for r in rows if ids[name] in r]
        assert re.search(
            rf"^{ids[name]}\s+{name}\s+127\.0\.0\.1:\d+\s+connected\s+"
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+0\s*$",
            row,
        ), row

    # A station that hangs (no answer to heartbeats) is shown offline within seconds.
    assert c.proc is not None
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        wait_until("dock-c offline", 20, lambda: ids["dock-c"] not in connected(a))
        noticed_after = time.monotonic() - stopped_at
        row_c = next(r for r in a.cli("peers").stdout.splitlines() if ids["dock-c"] in r)
        assert re.search(r"\soffline\s", row_c), row_c
        synced = a.cli("sync", timeout=120)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert synced.stdout == "In sync with 1 peers.\n"
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    print(f"dock-c shown offline {noticed_after:.1f} s after it hung")
    assert noticed_after < 15, noticed_after

    # A station shut down cleanly is shown offline at once; a resumed one reconnects.
    assert b.stop() == 0
    wait_until("dock-b offline", 10, lambda: ids["dock-b"] not in connected(a))
    wait_until("dock-c back", DISCOVERY_TIMEOUT, lambda: ids["dock-c"] in connected(a))
    (peer_b,) = [p for p in cli_json(a, "peers")["peers"] if p["station_id"] == ids["dock-b"]]
    assert peer_b["state"] == "offline"
    assert peer_b["lacking"] is None


def test_status_says_in_sync_after_the_peer_made_every_change(fleet: Stations) -> None:
    """Only B writes; once A has B's changes, A's status must not keep reporting changes
    to send (the peer's own writes used to count as 'lacking' until a manual sync)."""
    config = fleet.base / "fast.toml"
    config.write_text("anti_entropy_interval = 1.0\n")
    a = fleet.station("office-a", "--config", str(config))
    fleet.start(a)
    b = fleet.station("dock-b", "--config", str(config), "--peer", peer_at(a))
    fleet.start(b)
    wait_until("connected", DISCOVERY_TIMEOUT, lambda: len(connected(a)) == 1)
    add_item(b, "CAB-1", "Cable", 10)
    for _ in range(5):
        checkout(b, "CAB-1", 1)
    wait_until("the checkouts reach office-a", SETTLE_TIMEOUT, lambda: stock(a, "CAB-1") == 5)
    wait_until(
        "office-a status: in sync",
        20,
        lambda: cli_json(a, "status")["peers"]["in_sync"],
    )
    human = a.cli("status").stdout
    assert "in sync" in human, human


def test_resolving_a_barcode_conflict_cannot_take_another_items_barcode(
    fleet: Stations,
) -> None:
    """Two stations re-label one item apart: a barcode conflict. Settling it on a barcode
    another item already has is refused, as an add or an edit would be."""
    a = fleet.station("office-a")
    fleet.start(a)
    b = fleet.station("dock-b", "--peer", peer_at(a))
    fleet.start(b)
    add_item(a, "LBL-1", "Speaker stand", 2)
    add_item(a, "LBL-9", "Mic stand", 2)
    wait_until("both items on dock-b", SETTLE_TIMEOUT, lambda: find(b, "LBL-9"))
    assert b.stop() == 0
    assert a.cli("item", "edit", "LBL-1", "--barcode", "LBL-2").returncode == 0
    alone = Daemon(b.data_dir, b.socket_path, name=b.name)  # no peers: apart from A
    fleet.stations.append(alone)
    alone.start()
    assert alone.cli("item", "edit", "LBL-1", "--barcode", "LBL-3").returncode == 0
    assert alone.stop() == 0
    b.start()
    wait_until(
        "the barcode conflict on office-a",
        SETTLE_TIMEOUT,
        lambda: cli_json(a, "conflicts")["conflicts"],
    )
    (item,) = cli_json(a, "conflicts")["conflicts"]
    taken = a.cli("--json", "conflicts", "resolve", item["id"], "barcode", "LBL-9")
    assert taken.returncode == 1
    assert json.loads(taken.stdout)["error"]["code"] == "exists"
    settled = cli_json(a, "conflicts", "resolve", item["id"], "barcode", "LBL-2")
    assert settled["item"]["barcode"] == "LBL-2" and settled["item"]["conflicts"] == []
