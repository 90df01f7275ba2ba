"""The cloud bridge against a real PostgreSQL (``tests/pg_cluster.py``), in one process.

Stations are real stores on SQLite files; peers sync through the store's sync seam; the
bridge talks to the real SQL contract over asyncpg as the least-privilege
``invsync_bridge`` role. Web edits are made the way the web app makes them: an UPDATE or
INSERT as Supabase's ``authenticated`` role with the user's JWT claims. What is checked
is what a person would see: the rows in the cloud table and the items on the stations.

Time is injected (``sleep``, ``clock``) where an outage of minutes is fast-forwarded.
Real daemons are in test_cloud_daemons.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cloud_bridge.bridge import CloudBridge, encode_item, full_jitter
from cloud_bridge.postgres import PostgresTransport
from cloud_bridge.transport import CloudConfigError, CloudDataError, CloudUnavailable
from crdt_store import REGISTER_FIELDS, InvalidInput, ItemView, NewItem, Store, StoreError
from crdt_store.model import Kind
from daemon.config import CloudConfig
from tests.conftest import OpenStore, sync_pair
from tests.pg_cluster import CloudDatabase, PgCluster, web_claims, web_request
from tests.rest_standin import RestStandIn

pytestmark = pytest.mark.timeout(180)

FLEET = "CLOUDTESTFLEET22"


# ---------------------------------------------------------------------- helpers


def bridge_for(
    store: Store, db: CloudDatabase, transport: Any = None, **kwargs: Any
) -> CloudBridge:
    return CloudBridge(
        store,
        CloudConfig(url=db.bridge_dsn, push_interval=30.0),
        fleet=FLEET,
        transport=transport,
        **kwargs,
    )


def stand_in_bridge(store: Store, transport: Any, **kwargs: Any) -> CloudBridge:
    """A bridge whose cloud is ``transport``, a stand-in made to fail in one way (the URL
    is never dialled)."""
    return CloudBridge(
        store, CloudConfig(url="postgresql://x/y"), fleet=FLEET, transport=transport, **kwargs
    )


class Recorder:
    """The real Postgres transport, with every merged batch kept for replays."""

    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.real = PostgresTransport(dsn)
        self.batches: list[dict[str, Any]] = []

    async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
        result = await self.real.merge(batch)
        self.batches.append(json.loads(json.dumps(batch)))
        return result

    async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
        return await self.real.pull(fleet, cursor, max_rows)

    async def close(self) -> None:
        await self.real.close()


async def cloud_rows(db: CloudDatabase) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        rows = await conn.fetch("select * from inventory_items order by id")
    finally:
        await conn.close()
    return {str(row["id"]): dict(row) for row in rows}


async def cloud_movements(db: CloudDatabase) -> list[str]:
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        return [r["id"] for r in await conn.fetch("select id from inventory_movements")]
    finally:
        await conn.close()


async def web_sql(db: CloudDatabase, sql: str, *args: object) -> list[asyncpg.Record]:
    """Run SQL as a web user of the fleet (role ``authenticated`` with its JWT claims)."""
    return await web_request(db, FLEET, sql, *args)


def as_row(view: ItemView) -> dict[str, Any]:
    """What the cloud row of an item must hold: each field, its HLC, stock and version."""
    row: dict[str, Any] = {name: getattr(view, name) for name in REGISTER_FIELDS}
    row |= {f"{name}_hlc": view.field_hlcs.get(name, 0) for name in REGISTER_FIELDS}
    stock, version, kind_hlc = encode_item(view)["stock"]
    row |= {"stock": stock, "stock_version": version, "stock_kind_hlc": kind_hlc}
    return row


def table_matches(rows: dict[str, dict[str, Any]], views: list[ItemView]) -> None:
    assert set(rows) == {view.id for view in views}
    for view in views:
        row = rows[view.id]
        expected = as_row(view)
        assert {key: row[key] for key in expected} == expected, view.barcode


async def all_views(store: Store) -> list[ItemView]:
    return await store.list_items(limit=100_000, include_deleted=True)


async def random_operations(stores: list[Store], rng: random.Random, count: int) -> None:
    """Warehouse work on several stations: adds, edits, checkouts, returns, counts,
    deletes, serial units going out and back, with peers syncing now and then."""
    serial = 0
    for step in range(count):
        store = rng.choice(stores)
        views = await store.list_items(limit=1000)
        choice = rng.random()
        if not views or choice < 0.15:
            serial += 1
            kind: Kind = "serial" if rng.random() < 0.3 else "bulk"
            qty = 1 if kind == "serial" else rng.randint(0, 50)
            barcode = f"{store.station_id}-{step}-{serial}"
            await store.add_item(NewItem(barcode, f"Item {barcode}", kind=kind, qty=qty))
            continue
        view = rng.choice(views)
        try:
            if choice < 0.35:
                field = rng.choice(["name", "location", "category", "notes"])
                value = f"{field} {step}" if field != "name" else f"Renamed {step}"
                await store.edit_item(view.id, {field: value})
            elif choice < 0.55:
                await store.checkout(view.id, 1, sheet=rng.choice([None, "JOB-1", "JOB-2"]))
            elif choice < 0.7:
                await store.return_units(view.id, 1)
            elif choice < 0.85:
                await store.count(view.id, rng.randint(0, 1 if view.kind == "serial" else 60))
            elif choice < 0.9:
                await store.delete_item(view.id)
            else:
                await sync_pair(stores[0], stores[-1])
        except StoreError:
            pass  # refused (not enough stock, unit already in): as at a real station


# ---------------------------------------------------------------------- push


@pytest.mark.parametrize("seed", [1, 2])
async def test_table_equals_the_merged_view_and_replays_change_nothing(
    open_store: OpenStore, cloud_db: CloudDatabase, seed: int
) -> None:
    rng = random.Random(seed)
    a = await open_store("A")
    b = await open_store("B")
    recorder = Recorder(cloud_db.bridge_dsn)
    bridge = bridge_for(a, cloud_db, recorder, batch_size=7)
    await bridge.start(loop=False)
    try:
        for _ in range(4):
            await random_operations([a, b], rng, 40)
            report = await bridge.push_now()
            assert report.ok, report
        await sync_pair(a, b)
        assert (await bridge.push_now()).ok
        assert (await a.cloud_backlog()).to_json() == {"items": 0, "movements": 0, "parked": 0}
    finally:
        await bridge.close()
    views = await all_views(a)
    before = await cloud_rows(cloud_db)
    table_matches(before, views)
    local = {m.id for view in views for m in await a.history(view.id)}
    assert sorted(await cloud_movements(cloud_db)) == sorted(local)

    # Every batch again, twice, then all of them in reverse (stale) order: no row moves.
    replay = PostgresTransport(cloud_db.bridge_dsn)
    try:
        assert len(recorder.batches) > 10
        for batch in recorder.batches + recorder.batches + recorder.batches[::-1]:
            result = await replay.merge(batch)
            assert result == {"items_changed": 0, "movements_inserted": 0}
    finally:
        await replay.close()
    assert await cloud_rows(cloud_db) == before


async def test_two_bridges_pushing_concurrently_converge(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    rng = random.Random(7)
    a = await open_store("A")
    b = await open_store("B")
    bridges = [bridge_for(s, cloud_db, batch_size=5) for s in (a, b)]
    for bridge in bridges:
        await bridge.start(loop=False)
    try:
        for _ in range(4):
            # Each station works on its own, then both push at once views that differ.
            await random_operations([a], rng, 15)
            await random_operations([b], rng, 15)
            reports = await asyncio.gather(*(bridge.push_now() for bridge in bridges))
            assert all(r.ok for r in reports), reports
            await sync_pair(a, b)
        reports = await asyncio.gather(*(bridge.push_now() for bridge in bridges))
        assert all(r.ok for r in reports), reports
    finally:
        for bridge in bridges:
            await bridge.close()
    views = await all_views(a)
    assert [v.to_json() for v in views] == [v.to_json() for v in await all_views(b)]
    table_matches(await cloud_rows(cloud_db), views)


async def test_an_edit_during_a_push_is_pushed_in_the_next_round(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    store = await open_store("A")
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))

    class EditsDuringMerge(Recorder):
        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            if not self.batches:
                await store.checkout(spk.id, 3)  # lands while the batch is on its way
            return await super().merge(batch)

    bridge = bridge_for(store, cloud_db, EditsDuringMerge(cloud_db.bridge_dsn))
    await bridge.start(loop=False)
    try:
        assert (await bridge.push_now()).ok
        assert (await cloud_rows(cloud_db))[spk.id]["stock"] == 8
        assert (await store.cloud_backlog()).items == 1
        assert (await bridge.push_now()).ok
    finally:
        await bridge.close()
    assert (await cloud_rows(cloud_db))[spk.id]["stock"] == 5


async def test_a_poison_row_is_parked_while_the_others_land(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    conn = await asyncpg.connect(cloud_db.admin_dsn)
    try:
        await conn.execute(
            "alter table inventory_items add constraint no_poison check (name <> 'POISON')"
        )
    finally:
        await conn.close()
    store = await open_store("A")
    rows = [NewItem(f"CBL{i:03d}", f"Cable {i}", qty=i) for i in range(60)]
    rows[37] = NewItem("BAD037", "POISON", qty=1)
    views = await store.import_items(rows)
    recorder = Recorder(cloud_db.bridge_dsn)
    bridge = bridge_for(store, cloud_db, recorder, batch_size=25)
    await bridge.start(loop=False)
    try:
        report = await bridge.push_now()
        assert report.ok and report.parked == 1 and report.items == 59
        assert set(await cloud_rows(cloud_db)) == {v.id for v in views if v.barcode != "BAD037"}
        assert len(await cloud_movements(cloud_db)) == 60, "the add of the bad item too"
        status = await bridge.status()
        assert status["parked_count"] == 1 and status["backlog"]["items"] == 0
        (parked,) = status["parked"]
        assert parked["barcode"] == "BAD037" and "no_poison" in parked["error"]
        # Bisecting 25+25 rows down to one costs a handful of calls, not one per row.
        assert len(recorder.batches) < 20

        # Fixed at the station: the item changes, is pushed again, and leaves the list.
        await store.edit_item(views[37].id, {"name": "Cable 37"})
        report = await bridge.push_now()
        assert report.ok and report.parked == 0
        assert (await bridge.status())["parked"] == []
    finally:
        await bridge.close()
    table_matches(await cloud_rows(cloud_db), await all_views(store))


# ---------------------------------------------------------------------- outage


async def test_outage_of_minutes_backs_off_then_drains_the_backlog(
    open_store: OpenStore, cloud_db: CloudDatabase, pg_cluster: PgCluster
) -> None:
    """The server stops mid-push; the loop retries with capped, jittered backoff on a
    fast-forwarded clock while the station keeps working and syncing with a peer; the
    server comes back eight (fake) minutes later and the backlog drains exactly once."""
    store = await open_store("A")
    peer = await open_store("B")
    await store.import_items([NewItem(f"ITM{i:04d}", f"Item {i}", qty=10) for i in range(500)])
    now = [1_000_000.0]
    delays: list[float] = []
    back_at = now[0] + 8 * 60
    restarted = asyncio.Event()
    stopped = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        now[0] += seconds
        if stopped.is_set() and now[0] >= back_at and not restarted.is_set():
            await asyncio.to_thread(pg_cluster.start)
            restarted.set()
        await asyncio.sleep(0.01)

    class StopsMidPush(Recorder):
        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            if len(self.batches) == 2 and not stopped.is_set():
                await asyncio.to_thread(pg_cluster.stop)
                stopped.set()
            return await super().merge(batch)

    bridge = bridge_for(
        store,
        cloud_db,
        StopsMidPush(cloud_db.bridge_dsn),
        batch_size=100,
        sleep=fake_sleep,
        clock=lambda: now[0],
    )
    try:
        async with bridge:
            await asyncio.wait_for(stopped.wait(), 60)
            # During the outage: the station works and syncs with its peer as usual.
            views = await store.list_items(limit=50)
            for view in views[:20]:
                await store.checkout(view.id, 2)
            await peer.add_item(NewItem("NEW001", "Added on the peer", qty=3))
            await sync_pair(store, peer)
            assert (await peer.item(views[0].id)).stock == 8
            status = await bridge.status()
            assert status["failures"] >= 1
            assert status["state"] in ("backing_off", "pushing", "pulling")
            assert status["last_error"] is not None
            await asyncio.wait_for(restarted.wait(), 60)
            for _ in range(600):
                backlog = await store.cloud_backlog()
                healthy = (await bridge.status())["failures"] == 0
                if backlog.items == backlog.movements == 0 and healthy:
                    break
                await asyncio.sleep(0.05)
            assert (await bridge.status())["next_retry"] is None
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
    backoffs = [d for d in delays if d not in (30.0, bridge.debounce)]
    assert backoffs and max(backoffs) <= bridge.backoff_cap
    assert len(backoffs) >= 4, "it retried more than once during eight minutes"
    table_matches(await cloud_rows(cloud_db), await all_views(store))
    movements = await cloud_movements(cloud_db)
    assert len(movements) == len(set(movements)) == 500 + 20 + 1


def test_full_jitter_grows_exponentially_up_to_the_cap() -> None:
    highest = [full_jitter(n, base=1.0, cap=300.0, draw=lambda: 0.999) for n in range(1, 15)]
    assert highest[:4] == pytest.approx([0.999, 1.998, 3.996, 7.992])
    assert max(highest) == pytest.approx(299.7)
    assert full_jitter(5, base=1.0, cap=300.0, draw=lambda: 0.0) == 0.0
    assert full_jitter(10_000, base=1.0, cap=300.0, draw=lambda: 0.5) == 150.0


class RefusesEveryRow:
    """Edge cases a real server does not produce on demand: every row refused alone,
    each for its own reason (bad rows) or all with one message (a bad request)."""

    name = "postgres"

    def __init__(self, *, same_error: bool) -> None:
        self.same_error = same_error
        self.calls = 0

    async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.same_error:
            raise CloudDataError("22023: items and movements must be arrays", code="22023")
        first = (batch["items"] + batch["movements"])[0]
        raise CloudDataError(f"23514: row {first['id']} refused", code="23514")

    async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
        raise CloudUnavailable("down")

    async def close(self) -> None:
        pass


async def test_rows_refused_each_for_its_own_reason_are_all_parked(
    open_store: OpenStore,
) -> None:
    store = await open_store("A")
    await store.import_items([NewItem(f"X{i}", f"X {i}") for i in range(5)])
    bridge = stand_in_bridge(store, RefusesEveryRow(same_error=False))
    await bridge.start(loop=False)
    try:
        report = await bridge.push_now()
        assert report.ok and report.parked == 10  # 5 items and their 5 movements
        assert (await store.cloud_backlog()).to_json() == {"items": 0, "movements": 0, "parked": 10}
        pull = await bridge.pull_now()
        assert not pull.ok and pull.error == "down"
    finally:
        await bridge.close()


async def test_a_batch_refused_as_a_whole_parks_nothing_and_backs_off(
    open_store: OpenStore,
) -> None:
    """Every row fails alone with the same SQLSTATE and message: the request is at fault
    (a contract the server does not have, say), not the rows. Parking them all would hide
    the whole inventory from the cloud until each item changes again."""
    store = await open_store("A")
    await store.import_items([NewItem(f"X{i}", f"X {i}") for i in range(5)])
    bridge = stand_in_bridge(store, RefusesEveryRow(same_error=True))
    await bridge.start(loop=False)
    try:
        report = await bridge.push_now()
        assert not report.ok and report.parked == 0
        assert "must be arrays" in (report.error or "")
        assert (await store.cloud_backlog()).to_json() == {"items": 5, "movements": 5, "parked": 0}
        status = await bridge.status()
        assert status["failures"] == 1 and status["parked"] == []
    finally:
        await bridge.close()


async def test_statement_timeouts_shrink_the_batches_then_they_grow_back(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """The server cancels a merge of more than 12 rows (as Supabase's 8 s statement
    timeout would a large one): the push goes on in smaller batches instead of failing
    forever, and the size grows back once batches go through."""
    store = await open_store("A")
    await store.import_items([NewItem(f"CBL{i:03d}", f"Cable {i}", qty=i) for i in range(60)])

    class TimesOutOnBigBatches(Recorder):
        limit = 12

        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            if len(batch["items"]) + len(batch["movements"]) > self.limit:
                raise CloudUnavailable("57014: canceling statement", code="57014")
            return await super().merge(batch)

    recorder = TimesOutOnBigBatches(cloud_db.bridge_dsn)
    bridge = bridge_for(store, cloud_db, recorder, batch_size=16)
    await bridge.start(loop=False)
    try:
        report = await bridge.push_now()
        assert report.ok and (report.items, report.movements) == (60, 60), report
        assert (await bridge.status())["batch_size"] < 16
        sizes = [len(b["items"]) + len(b["movements"]) for b in recorder.batches]
        assert max(sizes) <= 12
        # Once batches go through, the size doubles back up to batch_size.
        recorder.limit = 1000
        await store.import_items([NewItem(f"NEW{i:03d}", f"New {i}") for i in range(200)])
        assert (await bridge.push_now()).ok
        assert (await bridge.status())["batch_size"] == 16
    finally:
        await bridge.close()
    table_matches(await cloud_rows(cloud_db), await all_views(store))


async def test_a_setting_that_cannot_work_backs_off_instead_of_spinning(
    open_store: OpenStore,
) -> None:
    """A CloudConfigError is a failure like any other: counted, reported, and the loop's
    waits grow exponentially (before, it waited below half a second, forever)."""
    store = await open_store("A")
    await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    waits: list[float] = []
    enough = asyncio.Event()

    class Misconfigured:
        name = "rest"

        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            raise CloudConfigError("anon_key", "required for an https:// cloud url")

        async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
            raise CloudConfigError("anon_key", "required for an https:// cloud url")

        async def close(self) -> None:
            pass

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) >= 5:
            enough.set()
        await asyncio.sleep(0.001)

    bridge = stand_in_bridge(store, Misconfigured(), sleep=fake_sleep, draw=lambda: 1.0)
    async with bridge:
        await asyncio.wait_for(enough.wait(), 30)
        status = await bridge.status()
    assert waits[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert status["failures"] >= 5 and "cloud.anon_key" in status["last_error"]["message"]


async def test_a_store_error_does_not_end_the_loop(open_store: OpenStore) -> None:
    """A store error that is not the store closing (here: a row the store refuses to
    read) is reported and retried later; only StoreClosed ends the loop."""
    store = await open_store("A")
    await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    rounds: list[float] = []
    second_round = asyncio.Event()

    class StoreFailsOnce:
        name = "postgres"
        calls = 0

        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            if self.calls == 1:
                raise InvalidInput("item", "?", "unreadable")
            second_round.set()
            return {"items_changed": 1, "movements_inserted": 1}

        async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
            return {"changes": [], "cursor": "1:0", "more": False}

        async def close(self) -> None:
            pass

    async def fake_sleep(seconds: float) -> None:
        rounds.append(seconds)
        await asyncio.sleep(0.001)

    bridge = stand_in_bridge(store, StoreFailsOnce(), sleep=fake_sleep)
    async with bridge:
        await asyncio.wait_for(second_round.wait(), 30)
        for _ in range(100):
            if (await store.cloud_backlog()).items == 0:
                break
            await asyncio.sleep(0.01)
        status = await bridge.status()
    assert rounds[0] == bridge.backoff_cap
    assert "unreadable" in status["last_error"]["message"]
    assert (await store.cloud_backlog()).items == 0, "the second round pushed it"


# ---------------------------------------------------------------------- pull


async def test_a_web_edit_reaches_the_station_and_then_its_peer(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8, location="Aisle 1"))
    await sync_pair(a, b)
    bridge = bridge_for(a, cloud_db)
    await bridge.start(loop=False)
    try:
        assert (await bridge.push_now()).ok
        await web_sql(
            cloud_db, "update inventory_items set location = 'Aisle 9' where id = $1", spk.id
        )
        report = await bridge.pull_now()
        assert report.ok and report.changes == 1
        assert (await a.item("SPK001")).location == "Aisle 9"
        await sync_pair(a, b)
        assert (await b.item("SPK001")).location == "Aisle 9"
        # Pushing the station's view back does not count as a change in the cloud, and
        # the pull after it does not bring the bridge's own push back.
        report = await bridge.push_now()
        assert report.ok
        assert (await bridge.pull_now()).changes == 0
        row = (await cloud_rows(cloud_db))[spk.id]
        assert row["origin"] == "web" and row["location_writer"] == "cloud"
    finally:
        await bridge.close()


async def test_web_and_station_edits_of_one_field_resolve_by_hlc_on_both_sides(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    mic = await a.add_item(NewItem("MIC001", "Microphone", qty=8))
    await sync_pair(a, b)
    bridge = bridge_for(a, cloud_db)
    await bridge.start(loop=False)
    try:
        assert (await bridge.push_now()).ok
        # SPK: the station edits first, the web later (neither has seen the other).
        await a.edit_item(spk.id, {"name": "Station speaker"})
        await asyncio.sleep(0.01)
        await web_sql(
            cloud_db, "update inventory_items set name = 'Web speaker' where id = $1", spk.id
        )
        # MIC: the web edits first, a peer later.
        await web_sql(cloud_db, "update inventory_items set name = 'Web mic' where id = $1", mic.id)
        await asyncio.sleep(0.01)
        await b.edit_item(mic.id, {"name": "Station mic"})
        await sync_pair(a, b)
        # Both orders of push and pull end the same way.
        assert (await bridge.push_now()).ok
        assert (await bridge.pull_now()).ok
        assert (await bridge.push_now()).ok
        await sync_pair(a, b)
    finally:
        await bridge.close()
    rows = await cloud_rows(cloud_db)
    for store in (a, b):
        assert (await store.item("SPK001")).name == "Web speaker"
        assert (await store.item("MIC001")).name == "Station mic"
    assert rows[spk.id]["name"] == "Web speaker" and rows[mic.id]["name"] == "Station mic"
    table_matches(rows, await all_views(a))


async def test_concurrent_web_edits_of_different_fields_both_survive(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """Two web users and the station edit different fields of one item at once, and an
    edit of another item commits late, after the bridge pulled past later ones: the
    snapshot cursor still brings it."""
    store = await open_store("A")
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    mic = await store.add_item(NewItem("MIC001", "Microphone", qty=2))
    bridge = bridge_for(store, cloud_db)
    await bridge.start(loop=False)
    claims = web_claims(FLEET)
    slow = await asyncpg.connect(cloud_db.authenticator_dsn)
    try:
        assert (await bridge.push_now()).ok
        late = slow.transaction()
        await late.start()
        await slow.execute("set local role authenticated")
        await slow.execute("select set_config('request.jwt.claims', $1, true)", claims)
        await slow.execute("update inventory_items set notes = 'late note' where id = $1", mic.id)
        await web_sql(
            cloud_db, "update inventory_items set category = 'Audio' where id = $1", spk.id
        )
        await web_sql(
            cloud_db, "update inventory_items set notes = 'Web note' where id = $1", spk.id
        )
        await store.edit_item(spk.id, {"location": "Aisle 4"})
        # The open transaction holds the pull back (it could still commit an edit that
        # sorts before the ones already committed); once it commits, all three arrive.
        assert (await bridge.pull_now()).changes == 0
        await late.commit()
        assert (await bridge.pull_now()).changes == 3
        assert (await bridge.push_now()).ok
    finally:
        await slow.close()
        await bridge.close()
    view = await store.item("SPK001")
    assert (view.category, view.notes, view.location) == ("Audio", "Web note", "Aisle 4")
    assert (await store.item("MIC001")).notes == "late note"
    table_matches(await cloud_rows(cloud_db), await all_views(store))


async def test_web_rows_and_web_stock_counts_reach_the_stations(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    bridges = [bridge_for(s, cloud_db) for s in (a, b)]
    for bridge in bridges:
        await bridge.start(loop=False)
    try:
        assert (await bridges[0].push_now()).ok
        (added,) = await web_sql(
            cloud_db,
            "insert into inventory_items (barcode, name, location, stock) "
            "values ('WEB001', 'Added on the web', 'Office', 4) returning id",
        )
        await web_sql(cloud_db, "update inventory_items set stock = 20 where id = $1", spk.id)
        await a.checkout(spk.id, 1)  # before the count arrives, not pushed yet
        # Both stations pull (the same edits), then sync: each edit counts once.
        for bridge in bridges:
            assert (await bridge.pull_now()).ok
        await sync_pair(a, b)
        for bridge in bridges:
            assert (await bridge.push_now()).ok
    finally:
        for bridge in bridges:
            await bridge.close()
    for store in (a, b):
        web = await store.item("WEB001")
        assert (web.id, web.name, web.location, web.stock) == (
            str(added["id"]),
            "Added on the web",
            "Office",
            4,
        )
        # The web user counted 20 when the cloud said 8: +12 on top of the checkout the
        # cloud had not seen yet, the same on both stations.
        assert (await store.item("SPK001")).stock == 19
        history = await store.history("SPK001")
        assert [m.op for m in history].count("count") == 1
    table_matches(await cloud_rows(cloud_db), await all_views(a))


async def test_repeated_web_counts_each_count_once_on_every_station(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """Two web counts of one item, pulled by two bridges at different moments with
    checkouts in between: each count is the difference the web user saw, added once."""
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    await sync_pair(a, b)
    bridges = [bridge_for(s, cloud_db) for s in (a, b)]
    for bridge in bridges:
        await bridge.start(loop=False)
    try:
        assert (await bridges[0].push_now()).ok
        await web_sql(cloud_db, "update inventory_items set stock = 20 where id = $1", spk.id)
        assert (await bridges[0].pull_now()).changes == 1  # A: 8 + 12
        await a.checkout(spk.id, 1)  # A: 19, not pushed yet
        await web_sql(cloud_db, "update inventory_items set stock = 15 where id = $1", spk.id)
        assert (await bridges[1].pull_now()).changes == 2  # B: 8 + 12 - 5
        assert (await b.item(spk.id)).stock == 15
        assert (await bridges[0].pull_now()).changes == 1  # A: 19 - 5
        assert (await a.item(spk.id)).stock == 14
        await sync_pair(a, b)
        # And again after syncing: nothing is counted twice.
        for bridge in bridges:
            assert (await bridge.pull_now()).ok
            assert (await bridge.push_now()).ok
    finally:
        for bridge in bridges:
            await bridge.close()
    for store in (a, b):
        assert (await store.item(spk.id)).stock == 14
        counts = [m.qty for m in await store.history(spk.id) if m.op == "count"]
        assert sorted(counts) == [-5, 12]
    rows = await cloud_rows(cloud_db)
    assert rows[spk.id]["stock"] == 14
    table_matches(rows, await all_views(a))


async def test_a_kind_change_from_the_web_moves_the_cloud_stock_too(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """A bulk item made a serialized unit (and a unit made bulk): the stations' stock
    follows the new kind, and so must the cloud's, though the new kind's stock version
    is not comparable with the old one's."""
    store = await open_store("A")
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    mic = await store.add_item(NewItem("MIC001", "Microphone", kind="serial"))
    bridge = bridge_for(store, cloud_db)
    await bridge.start(loop=False)
    try:
        assert (await bridge.push_now()).ok
        await web_sql(cloud_db, "update inventory_items set kind = 'serial' where id = $1", spk.id)
        await web_sql(cloud_db, "update inventory_items set kind = 'bulk' where id = $1", mic.id)
        assert (await bridge.pull_now()).changes == 2
        assert ((await store.item(spk.id)).stock, (await store.item(mic.id)).stock) == (1, 0)
        assert (await bridge.push_now()).ok
        rows = await cloud_rows(cloud_db)
        assert (rows[spk.id]["kind"], rows[spk.id]["stock"]) == ("serial", 1)
        assert (rows[mic.id]["kind"], rows[mic.id]["stock"]) == ("bulk", 0)
        # The new kind's stock keeps moving: the unit goes out.
        await store.checkout(spk.id, 1)
        assert (await bridge.push_now()).ok
    finally:
        await bridge.close()
    rows = await cloud_rows(cloud_db)
    assert rows[spk.id]["stock"] == 0
    table_matches(rows, await all_views(store))


async def test_a_web_value_the_stations_refuse_is_replaced_by_theirs(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """A web edit with a value the stations' validation refuses (an empty name, written
    before the table refused such values, or by a client that went around it) is not
    taken; it is reported, and the stations' value goes back to the cloud row."""
    store = await open_store("A")
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    bridge = bridge_for(store, cloud_db)
    await bridge.start(loop=False)
    conn = await asyncpg.connect(cloud_db.admin_dsn)
    try:
        assert (await bridge.push_now()).ok
        # A web edit as an old contract logged it: the value, its clock, the change.
        async with conn.transaction():
            await conn.execute("set local session_replication_role = replica")
            hlc = await conn.fetchval(
                "select (floor(extract(epoch from clock_timestamp()) * 1000)::bigint << 11) + 5"
            )
            await conn.execute(
                "update inventory_items set name = '', name_hlc = $2, name_writer = 'cloud', "
                "origin = 'web' where id = $1",
                spk.id,
                hlc,
            )
            await conn.execute(
                "insert into inventory_changes (fleet, item_id, fields) values ($1, $2, $3)",
                FLEET,
                spk.id,
                json.dumps({"name": ["", hlc]}),
            )
        report = await bridge.pull_now()
        assert report.ok and report.changes == 1 and report.refused == 1, report
        assert (await store.item(spk.id)).name == "Speaker"
        (refused,) = (await bridge.status())["refused"]
        assert (refused["barcode"], refused["field"]) == ("SPK001", "name")
        assert "empty" in refused["reason"]
        assert (await store.cloud_backlog()).items == 1, "the station's value is to push"
        assert (await bridge.push_now()).ok
    finally:
        await conn.close()
        await bridge.close()
    rows = await cloud_rows(cloud_db)
    assert rows[spk.id]["name"] == "Speaker"
    table_matches(rows, await all_views(store))


async def test_another_database_at_the_same_url_gets_everything_again(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    """The database answers with another instance id (restored, or made again behind
    the same URL): the station pushes its whole inventory again and pulls from the
    start, as for a new target."""
    store = await open_store("A")
    await store.import_items([NewItem(f"CBL{i:03d}", f"Cable {i}", qty=i) for i in range(5)])
    bridge = bridge_for(store, cloud_db)
    await bridge.start(loop=False)
    conn = await asyncpg.connect(cloud_db.admin_dsn)
    try:
        assert (await bridge.push_now()).ok
        assert (await bridge.pull_now()).ok
        assert (await store.cloud_backlog()).items == 0
        await conn.execute("update invsync_private.database_instance set id = gen_random_uuid()")
        await conn.execute("delete from inventory_items")
        await conn.execute("delete from inventory_movements")
        assert (await bridge.pull_now()).ok
        assert (await store.cloud_backlog()).to_json() == {"items": 5, "movements": 5, "parked": 0}
        assert (await bridge.push_now()).ok
    finally:
        await conn.close()
        await bridge.close()
    table_matches(await cloud_rows(cloud_db), await all_views(store))
    assert len(await cloud_movements(cloud_db)) == 5


async def test_a_pull_gets_past_changes_it_cannot_read(open_store: OpenStore) -> None:
    """Edge case a real server does not produce on demand: a page of changes none of
    which decodes. The cursor after it is stored, or the pull would read it forever;
    and a reset answer makes the station start over once."""
    store = await open_store("A")
    await store.add_item(NewItem("SPK001", "Speaker", qty=8))

    class Garbled:
        name = "postgres"

        def __init__(self) -> None:
            self.answers: list[dict[str, Any]] = [
                {"changes": [{"nonsense": 1}], "cursor": "9:1", "more": False},
                {"changes": [], "cursor": "12:0", "more": False, "reset": True},
                {"changes": [], "cursor": "3:0", "more": False, "reset": False},
            ]
            self.cursors: list[str | None] = []

        async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
            return {"items_changed": 0, "movements_inserted": 0}

        async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
            self.cursors.append(cursor)
            return self.answers.pop(0)

        async def close(self) -> None:
            pass

    transport = Garbled()
    bridge = stand_in_bridge(store, transport)
    await bridge.start(loop=False)
    try:
        assert (await bridge.push_now()).ok
        assert (await bridge.pull_now()).ok
        assert await store.cloud_cursor() == "9:1"
        # The cloud does not know the cursor: everything is to push, and the pull starts
        # from the beginning (no cursor).
        assert (await bridge.pull_now()).ok
        assert transport.cursors == [None, "9:1", None]
        assert (await store.cloud_backlog()).to_json() == {"items": 1, "movements": 1, "parked": 0}
        assert await store.cloud_cursor() is None
    finally:
        await bridge.close()


async def test_cursor_is_kept_across_a_restart(
    open_store: OpenStore, cloud_db: CloudDatabase
) -> None:
    store = await open_store("A")
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    bridge = bridge_for(store, cloud_db)
    await bridge.start(loop=False)
    assert (await bridge.push_now()).ok
    await web_sql(cloud_db, "update inventory_items set notes = 'one' where id = $1", spk.id)
    assert (await bridge.pull_now()).changes == 1
    await bridge.close()
    cursor = await store.cloud_cursor()
    assert cursor is not None
    again = bridge_for(store, cloud_db)
    await again.start(loop=False)
    try:
        assert (await again.pull_now()).changes == 0
    finally:
        await again.close()


# ---------------------------------------------------------------------- both transports


@pytest.mark.parametrize("transport", ["postgres", "rest"])
async def test_push_and_pull_over_both_transports(
    open_store: OpenStore, cloud_db: CloudDatabase, tmp_path: Path, transport: str
) -> None:
    """The same station work and web edit over asyncpg and over the REST API (a local
    stand-in for PostgREST and Supabase Auth; the SQL behind it is the real contract)."""
    async with contextlib.AsyncExitStack() as stack:
        if transport == "rest":
            api = await stack.enter_async_context(RestStandIn(cloud_db.authenticator_dsn))
            api.add_user("dock-a@example.com", "station password", FLEET)
            password = tmp_path / "password"
            password.write_text("station password\n")
            config = api.station_config("dock-a@example.com", password)
        else:
            config = CloudConfig(url=cloud_db.bridge_dsn)
        store = await open_store("A")
        spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
        await store.import_items([NewItem(f"CBL{i:03d}", f"Cable {i}", qty=i) for i in range(30)])
        await store.checkout(spk.id, 3, sheet="JOB-7")
        bridge = CloudBridge(store, config, fleet=FLEET, batch_size=8)
        # Without the background loop: its own rounds would race this test's calls.
        await bridge.start(loop=False)
        stack.push_async_callback(bridge.close)
        report = await bridge.push_now()
        assert (report.ok, report.items, report.movements) == (True, 31, 32)
        assert (await bridge.status())["transport"] == transport
        await web_sql(
            cloud_db, "update inventory_items set name = 'PA speaker' where id = $1", spk.id
        )
        report = await bridge.pull_now()
        assert report.ok and report.changes == 1, report
        assert (await store.item("SPK001")).name == "PA speaker"
        web_moves = [m for m in await store.history("SPK001") if m.operator == "web"]
        assert [m.op for m in web_moves] == ["edit"]
        assert (await bridge.push_now()).ok
        table_matches(await cloud_rows(cloud_db), await all_views(store))
        if transport == "rest":
            assert api.grants["password"] == 1, "signed in once, as the station user"
