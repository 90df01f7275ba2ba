"""What a station's SQLite file keeps, and what it refuses, across restarts.

Everything here runs on real SQLite files. A station's inventory must come back exactly
as it was after a clean shutdown, after compaction folded the update log into snapshots,
and after an upgrade from an older schema (built from the real older migrations); a
database from a newer invsync, or one made for another station or shard layout, is
refused without being touched. Updates from other stations are durably stored before
``apply_remote`` returns and before subscribers (the sync layer) see them, and a corrupt
update changes nothing. The query index is derived data: when rows are missing it is
rebuilt on open. Where a test needs "the power went out right now", it copies the
database and its WAL while the store is still open (a crash image) and opens the copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_store import (
    Alert,
    CommittedUpdate,
    CorruptUpdate,
    ItemView,
    MigrationFailed,
    Movement,
    NewItem,
    NotAStore,
    SchemaTooNew,
    SQLiteTooOld,
    Store,
    StoreMismatch,
    UnknownDocument,
)
from crdt_store.checkpoint import CHECKPOINT_INTERVAL
from crdt_store.schema import SCHEMA_VERSION, migrate
from crdt_store.store import _PREFETCH_STEP, INDEX_SLICE, LEDGER_STEP, check_sqlite

SHARDS = 8
BARCODES = ("SPK001", "CBL010", "MIX001", "DUP001", "LGT001", "CASE01")
SHEETS = ("JOB-A", "JOB-B", "JOB-1")


# ---------------------------------------------------------------------- helpers


async def sync(a: Store, b: Store) -> None:
    """Bring two stores to the same state, both ways, for every document."""
    for source, target in ((a, b), (b, a)):
        for name in source.doc_names():
            update = source.diff(name, target.state_vector(name))
            await target.apply_remote(name, update, origin=source.station_id)


async def populate(a: Store, b: Store) -> None:
    """A day at two stations: plain operations, and concurrent ones that conflict.

    Leaves ``a`` with a name conflict (SPK001), an oversold item (CBL010), a double-booked
    unit (MIX001), one barcode on two items (DUP001), a deleted item (CASE01) and
    movements on three pull sheets.
    """
    speaker = await a.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8, location="A3"))
    cable = await a.add_item(NewItem("CBL010", "XLR cable 10 m", qty=3, category="Audio"))
    mixer = await a.add_item(NewItem("MIX001", "Yamaha MG10XU Mixer", kind="serial"))
    light = await a.add_item(NewItem("LGT001", "Par can", qty=20))
    case = await a.add_item(NewItem("CASE01", "Road case", qty=2))
    await a.checkout(speaker.id, 2, sheet="JOB-1", operator="dana")
    await a.return_units(speaker.id, 1, operator="dana")
    await a.count(light.id, 18, operator="lee")
    await a.edit_item(light.id, {"location": "Cage 2", "notes": "two lamps out"})
    await a.delete_item(case.id, operator="lee")
    await sync(a, b)
    # While the stations cannot see each other:
    await a.edit_item(speaker.id, {"name": "QSC K10.2 (pair)"}, operator="dana")
    await b.edit_item(speaker.id, {"name": "QSC K10.2 main"}, operator="sam")
    await a.checkout(cable.id, 2, sheet="JOB-A")
    await b.checkout(cable.id, 2, sheet="JOB-B")
    await a.checkout(mixer.id, sheet="JOB-A")
    await b.checkout(mixer.id, sheet="JOB-B")
    await a.add_item(NewItem("DUP001", "Mic stand", qty=4))
    await b.add_item(NewItem("DUP001", "Boom arm", qty=6))
    await sync(a, b)


@dataclass(frozen=True, slots=True)
class Seen:
    """Everything a warehouse lead can look at on a station."""

    items: list[ItemView]
    conflicts: list[ItemView]
    alerts: list[Alert]
    histories: dict[str, list[Movement]]
    sheets: dict[str, dict[str, int]]


async def seen(store: Store) -> Seen:
    return Seen(
        items=await store.list_items(include_deleted=True),
        conflicts=await store.conflicts(),
        alerts=await store.alerts(),
        histories={barcode: await store.history(barcode) for barcode in BARCODES},
        sheets={sheet: store.sheet(sheet) for sheet in SHEETS},
    )


def check_populated(view: Seen) -> None:
    """The populated state is really there (so comparing two of them means something)."""
    # Concurrent names on the speaker; the double-booked mixer has two sheets.
    assert {item.barcode for item in view.conflicts} == {"SPK001", "MIX001"}
    assert sorted(alert.kind for alert in view.alerts) == [
        "double_booked",
        "duplicate_barcode",
        "oversold",
    ]
    assert sum(item.deleted for item in view.items) == 1
    assert len(view.items) == 7
    assert [m.op for m in view.histories["CASE01"]] == ["add", "delete"]
    assert view.sheets["JOB-1"] and view.sheets["JOB-A"] and view.sheets["JOB-B"]


@pytest.fixture
async def populated(tmp_path: Path) -> tuple[Path, Seen]:
    """Station A's database after ``populate``, closed cleanly, and what it showed."""
    path = tmp_path / "A.db"
    async with (
        Store.open(path, station_id="A", shard_count=SHARDS) as a,
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
    ):
        await populate(a, b)
        before = await seen(a)
    check_populated(before)
    return path, before


def crash_image(path: Path, dest: Path) -> Path:
    """Copy a database as a power cut right now would leave it (main file and WAL)."""
    shutil.copyfile(path, dest)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, dest.with_name(dest.name + "-wal"))
    return dest


def table_rows(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Read the file through a separate read-only connection, as another process would."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def user_version(path: Path) -> int:
    return int(table_rows(path, "PRAGMA user_version")[0][0])


def fingerprint(path: Path) -> tuple[str, int, list[str]]:
    """Content, modification time and sibling files (-wal, -shm) of a database."""
    siblings = sorted(p.name for p in path.parent.glob(path.name + "*"))
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, siblings


# ---------------------------------------------------------------------- reopen


async def test_reopen_after_clean_shutdown_keeps_everything(
    populated: tuple[Path, Seen],
) -> None:
    path, before = populated
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert await seen(store) == before
        # The station carries on where it stopped.
        speaker = next(item for item in before.items if item.barcode == "SPK001")
        after = await store.checkout(speaker.id, 1, sheet="JOB-1")
        assert after.stock == speaker.stock - 1


async def test_compaction_folds_the_log_and_keeps_everything(
    populated: tuple[Path, Seen],
) -> None:
    path, before = populated
    log_before = table_rows(path, "SELECT count(*) FROM updates")[0][0]
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        await store.compact()
        assert await seen(store) == before
        assert store.stats()["log_updates"] == 0
        every_doc = set(store.doc_names())
        light = await store.item("LGT001")
        await store.checkout(light.id, 3, sheet="JOB-1", operator="lee")
    assert table_rows(path, "SELECT count(*) FROM updates")[0][0] < log_before
    assert {row[0] for row in table_rows(path, "SELECT doc FROM snapshots")} == every_doc
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        after = await seen(store)
        light = await store.item("LGT001")
    assert light.stock == 15
    assert after.histories["LGT001"][-1].op == "checkout"
    assert after.histories["SPK001"] == before.histories["SPK001"]
    assert after.conflicts == before.conflicts and after.alerts == before.alerts


async def test_compaction_runs_by_itself_after_compact_after_updates(tmp_path: Path) -> None:
    path = tmp_path / "A.db"
    async with Store.open(path, station_id="A", shard_count=SHARDS, compact_after=10) as store:
        item = await store.add_item(NewItem("CBL010", "XLR cable 10 m", qty=100))
        for _ in range(40):
            await store.checkout(item.id, 1, sheet="JOB-1")
        assert store.stats()["log_updates"] < 40
    # 41 commits each wrote the item's shard and the ledger day (and the sheet): without
    # compaction every one of those documents would have 40+ updates in the log.
    per_doc: dict[str, int] = dict(
        table_rows(path, "SELECT doc, count(*) FROM updates GROUP BY doc")
    )
    # One document is folded per commit, so another may wait a commit or two past 10.
    assert all(count < 20 for count in per_doc.values()), per_doc
    folded = [row[0] for row in table_rows(path, "SELECT doc FROM snapshots")]
    assert any(doc.startswith("items/") for doc in folded), folded
    assert any(doc.startswith("ledger/") for doc in folded), folded
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert (await store.item("CBL010")).stock == 60
        assert len(await store.history("CBL010")) == 41
        assert store.sheet("JOB-1") == {item.id: 40}


def wal_pages(db: Path) -> int:
    """How many pages the WAL file of ``db`` has room for (its size, not its content)."""
    size = os.path.getsize(f"{db}-wal")
    return max(0, size - 32) // (4096 + 24)  # a 32-byte header, a 24-byte one per page


async def test_the_wal_starts_over_after_each_burst_of_checkouts(tmp_path: Path) -> None:
    """Checkpoints run on their own thread after commits, not in them. Whenever the
    scanning pauses, one catches up and the next commit starts the WAL over, so the
    file stays the size of one burst: the writer's own checkpoint would only step in
    at 16 MB (these commits write some 2,700 pages in all)."""
    path = tmp_path / "A.db"
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        items = await store.import_items(
            [NewItem(f"CBL{n:03d}", "XLR cable", qty=10_000) for n in range(240)]
        )
        largest = 0
        for burst in range(8):
            for n in range(30):
                await store.checkout(items[burst * 30 + n].id, 1)
                largest = max(largest, wal_pages(path))
            await asyncio.sleep(CHECKPOINT_INTERVAL * 2 + 0.1)
        assert largest < 1000, f"the WAL grew to {largest} pages"
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert sum(view.stock for view in await store.list_items()) == 240 * 10_000 - 240


# ---------------------------------------------------------------------- migrations


async def build_old_database(current: Path, old: Path, version: int) -> None:
    """Make the database an older invsync would have written, from the same history.

    The document log (``meta``, ``updates``, ``snapshots``) has kept its format since
    version 1; later migrations only added derived tables. So an older station's file is
    the real older migrations plus the rows of the tables that version had, copied from a
    current store that went through the same operations.
    """
    # The tables each version added, with the columns it had. A new migration must add
    # the tables of the version before it here, so that upgrade keeps being tested.
    tables = {
        1: {"updates": "doc, seq, data", "snapshots": "doc, state, state_vector, upto_seq"},
        2: {
            "items": "id, barcode, name, kind, stock, status, sheet, location, category, "
            "deleted, hlc, view",
            "conflicts": "item_id, field",
            "alerts": "item_id, kind",
            "movements": "id, hlc, station, operator, item_id, barcode, op, qty, sheet",
            "ledger_progress": "doc, station, count",
        },
        3: {"cloud_dirty_items": "item_id, hlc"},
        4: {"index_pending": "item_id"},
        5: {
            "cloud_state": "key, value",
            "cloud_parked": "kind, row_id, barcode, mark, error, parked_at_ms",
        },
        6: {},  # the update log stored in write order: same rows
        7: {"movement_barcodes": "barcode, item_id"},
        8: {"concurrent_items": "item_id"},
    }
    # Before 9, an index row's record held every field of the view, its columns' too.
    full_record = (
        "json_set(view, '$.id', id, '$.barcode', barcode, '$.name', name, '$.kind', kind, "
        "'$.stock', stock, '$.status', status, '$.sheet', sheet, '$.location', location, "
        "'$.category', category, '$.deleted', json(iif(deleted, 'true', 'false')), "
        "'$.hlc', hlc, '$.alerts', json('[]'))"
    )
    assert set(range(1, version + 1)) <= tables.keys(), f"describe version {version} here"
    async with aiosqlite.connect(old, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        assert await migrate(db, str(old), target=version) == 0
        await db.execute("ATTACH DATABASE ? AS current", (str(current),))
        await db.execute("BEGIN IMMEDIATE")
        # Version 1 had no query index, so no index_version either; before 8, nothing
        # said whether concurrent_items was filled.
        skip_meta = "key != 'concurrent_items'" + (
            "" if version >= 2 else " AND key != 'index_version'"
        )
        await db.execute(
            f"INSERT OR REPLACE INTO main.meta SELECT * FROM current.meta WHERE {skip_meta}"
        )
        for number in range(1, version + 1):
            for table, columns in tables[number].items():
                selected = columns
                if table == "items" and version < 9:
                    selected = columns.replace("hlc, view", f"hlc, {full_record}")
                await db.execute(
                    f"INSERT INTO main.{table} ({columns}) SELECT {selected} FROM current.{table}"
                )
        await db.commit()
        await db.execute("DETACH DATABASE current")
    assert user_version(old) == version


@pytest.mark.parametrize("version", [SCHEMA_VERSION - 1, SCHEMA_VERSION - 2, 1])
async def test_upgrade_from_an_older_schema_keeps_everything(
    populated: tuple[Path, Seen], tmp_path: Path, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    current, before = populated
    old = tmp_path / f"v{version}.db"
    await build_old_database(current, old, version)
    if version == 1:
        assert not table_rows(old, "SELECT name FROM sqlite_master WHERE name = 'items'")
    # Rows with a record of every field (before 9) and without (9 on), by item id.
    full = "SELECT id FROM items WHERE json_extract(view, '$.barcode') IS NOT NULL ORDER BY id"
    if version > 1:
        assert table_rows(old, full) == table_rows(old, "SELECT id FROM items ORDER BY id")
    async with Store.open(old, station_id="A", shard_count=SHARDS) as store:
        assert await seen(store) == before
        # Only a file without a query index has one built; the others keep theirs.
        assert ("rebuilding the query index" in caplog.text) == (version == 1)
        # Writing works on the upgraded file (every table the current code writes exists).
        light = await store.item("LGT001")
        await store.checkout(light.id, 1, sheet="JOB-1")
    assert user_version(old) == SCHEMA_VERSION
    # Rows are read as they are and only rewritten when their item changes.
    if version > 1:
        assert (light.id,) not in table_rows(old, full) and len(table_rows(old, full)) > 1
    # The upgrade found the items that hold concurrent writes (SPK001's names, MIX001's
    # checkouts): a delete that reaches them alone is still seen.
    concurrent = "SELECT item_id FROM concurrent_items ORDER BY item_id"
    assert len(table_rows(current, concurrent)) == 2
    assert table_rows(old, concurrent) == table_rows(current, concurrent)
    async with Store.open(old, station_id="A", shard_count=SHARDS) as store:
        assert (await store.item("LGT001")).stock == light.stock - 1
        assert (await seen(store)).histories["SPK001"] == before.histories["SPK001"]


async def test_failed_upgrade_leaves_the_previous_version(
    populated: tuple[Path, Seen], tmp_path: Path
) -> None:
    current, _ = populated
    old = tmp_path / "old.db"
    await build_old_database(current, old, 2)
    # Make the last statement of 003_cloud_outbox fail: its index name is already taken.
    with sqlite3.connect(old) as db:
        db.execute("CREATE INDEX movements_cloud_pending ON items (hlc)")
    db.close()
    with pytest.raises(MigrationFailed, match="movements_cloud_pending"):
        await Store.connect(old, station_id="A", shard_count=SHARDS)
    assert user_version(old) == 2
    columns = [row[1] for row in table_rows(old, "PRAGMA table_info(movements)")]
    assert "cloud_pushed" not in columns, "half of the migration was committed"
    assert not table_rows(old, "SELECT name FROM sqlite_master WHERE name = 'cloud_dirty_items'")


async def test_newer_schema_is_refused_and_left_untouched(populated: tuple[Path, Seen]) -> None:
    path, _ = populated
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = fingerprint(path)
    with pytest.raises(SchemaTooNew) as refused:
        await Store.connect(path, station_id="A", shard_count=SHARDS)
    message = str(refused.value)
    assert str(path) in message
    assert f"version {SCHEMA_VERSION + 1}" in message and f"up to {SCHEMA_VERSION}" in message
    assert "upgrade invsync" in message
    assert fingerprint(path) == before
    assert user_version(path) == SCHEMA_VERSION + 1


async def test_newer_schema_in_rollback_journal_mode_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = fingerprint(path)
    with pytest.raises(SchemaTooNew):
        await Store.connect(path, station_id="A", shard_count=SHARDS)
    assert fingerprint(path) == before


@pytest.mark.parametrize(
    ("station_id", "shard_count", "setting"),
    [("B", SHARDS, "station_id"), ("A", SHARDS * 2, "shard_count")],
)
async def test_other_station_or_shard_layout_is_refused(
    populated: tuple[Path, Seen], station_id: str, shard_count: int, setting: str
) -> None:
    path, before = populated
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        client_id = store.client_id
    with pytest.raises(StoreMismatch) as refused:
        await Store.connect(path, station_id=station_id, shard_count=shard_count)
    assert refused.value.setting == setting
    assert setting in str(refused.value) and str(path) in str(refused.value)
    # The refused open wrote nothing: not even the "running" mark, so the client id from
    # the clean shutdown is still reused.
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert store.client_id == client_id
        assert await seen(store) == before


# ---------------------------------------------------------------------- remote updates


async def test_corrupt_update_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with (
        Store.open(tmp_path / "A.db", station_id="A", shard_count=SHARDS) as a,
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
    ):
        speaker = await a.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
        await sync(a, b)
        await a.checkout(speaker.id, 3, sheet="JOB-1")
        doc = next(
            name
            for name in a.doc_names()
            if name.startswith("items/") and b.state_vector(name) != a.state_vector(name)
        )
        update = a.diff(doc, b.state_vector(doc))
        state_vector = b.state_vector(doc)
        log_rows = table_rows(b.path, "SELECT count(*) FROM updates")
        names = b.doc_names()
        bad_updates = [update[:cut] for cut in (0, 1, 2, len(update) // 2, len(update) - 1)]
        bad_updates += [b"\xff" * 16, b"\x01\x01not an update at all"]
        for bad in bad_updates:
            with pytest.raises(CorruptUpdate) as refused:
                await b.apply_remote(doc, bad, origin="A")
            assert refused.value.doc == doc
            assert b.state_vector(doc) == state_vector
        # A corrupt update for a document the station does not have yet creates nothing.
        with pytest.raises(CorruptUpdate):
            await b.apply_remote("ledger/2020-01-01", update[:-1], origin="A")
        for name in ("items/99", "inventory", "ledger/2024-02-30", "../fleet"):
            with pytest.raises(UnknownDocument):
                await b.apply_remote(name, update, origin="A")
        assert b.doc_names() == names
        assert table_rows(b.path, "SELECT count(*) FROM updates") == log_rows
        assert (await b.item("SPK001")).stock == 8
    async with Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b:
        assert (await b.item("SPK001")).stock == 8
        # The intact update still applies: the refusals were about the bytes, not the doc.
        assert await b.apply_remote(doc, update, origin="A")
        assert (await b.item("SPK001")).stock == 5


def _sample_update() -> bytes:
    """A real update with items, counters and ledger entries, as a peer sends them."""
    doc: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
    with doc.transaction():
        for n in range(20):
            item = doc.get(f"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f{n:04d}", type=pycrdt.Map)
            item["name@A"] = [f"Speaker {n}", 3_000_000_000_000 + n]
            item["stock@A"] = [n, 3_000_000_000_000 + n]
        moves = doc.get("moves@A", type=pycrdt.Array)
        moves.extend([[b"\x01" * 16, 3_000_000_000_000, "", b"\x02" * 16, "SPK001", "o", 1, None]])
    return doc.get_update()


SAMPLE_UPDATE = _sample_update()


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(min_value=1, max_value=len(SAMPLE_UPDATE)),
    flips=st.lists(
        st.tuples(st.integers(0, len(SAMPLE_UPDATE) - 1), st.integers(0, 255)), max_size=4
    ),
)
def test_an_update_that_fails_to_decode_changes_nothing(
    cut: int, flips: list[tuple[int, int]]
) -> None:
    """What ``apply_remote`` relies on instead of decoding every update twice: Yrs
    decodes a whole update before it integrates any of it."""
    damaged = bytearray(SAMPLE_UPDATE[:cut])
    for position, value in flips:
        if position < len(damaged):
            damaged[position] = value
    doc: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
    doc.get("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f0000", type=pycrdt.Map)["name@B"] = ["Mine", 1]
    before = doc.get_update()
    try:
        doc.apply_update(bytes(damaged))
    except Exception:
        assert doc.get_update() == before


async def test_remote_update_is_stored_before_apply_remote_returns(tmp_path: Path) -> None:
    async with (
        Store.open(tmp_path / "A.db", station_id="A", shard_count=SHARDS) as a,
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
    ):
        speaker = await a.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
        await a.checkout(speaker.id, 3, sheet="JOB-1", operator="dana")
        await a.edit_item(speaker.id, {"location": "Truck 2"})
        await sync(a, b)
        image = crash_image(b.path, tmp_path / "B-crash.db")
    async with Store.open(image, station_id="B", shard_count=SHARDS) as crashed:
        view = await crashed.item("SPK001")
        assert (view.stock, view.location) == (5, "Truck 2")
        assert [m.op for m in await crashed.history("SPK001")] == ["add", "checkout", "edit"]
        assert crashed.sheet("JOB-1") == {speaker.id: 3}


async def test_subscribers_see_only_committed_updates(tmp_path: Path) -> None:
    """The sync layer sends what subscribers get: it must already be on disk."""
    checked: list[tuple[str, str, bool]] = []

    def on_disk(store: Store) -> None:
        def callback(update: CommittedUpdate) -> None:
            rows = table_rows(
                store.path,
                "SELECT count(*) FROM updates WHERE doc = ? AND data = ?",
                update.doc,
                update.update,
            )
            checked.append((store.station_id, update.origin, rows[0][0] == 1))

        store.subscribe(callback)

    async with (
        Store.open(tmp_path / "A.db", station_id="A", shard_count=SHARDS) as a,
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
    ):
        on_disk(a)
        on_disk(b)
        speaker = await a.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
        await a.checkout(speaker.id, 2, sheet="JOB-1")
        await sync(a, b)
        await b.return_units(speaker.id, 1)
    assert {(station, origin) for station, origin, _ in checked} == {
        ("A", "local"),
        ("B", "A"),
        ("B", "local"),
    }
    assert all(stored for *_, stored in checked), checked


async def test_update_received_before_its_dependency_survives_restart(tmp_path: Path) -> None:
    sent: list[bytes] = []
    async with (
        Store.open(tmp_path / "A.db", station_id="A", shard_count=SHARDS) as a,
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
    ):
        speaker = await a.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
        doc = next(
            name
            for name in a.doc_names()
            if name.startswith("items/") and a.state_vector(name) != b.state_vector(name)
        )
        a.subscribe(lambda update: sent.append(update.update) if update.doc == doc else None)
        await b.apply_remote(doc, a.diff(doc, b.state_vector(doc)), origin="A")
        await a.checkout(speaker.id, 1)
        await a.checkout(speaker.id, 1)
        # The network delivered the second checkout first.
        await b.apply_remote(doc, sent[1], origin="A")
        await b.apply_remote(doc, sent[0], origin="A")
        assert (await b.item("SPK001")).stock == 6
    async with (
        Store.open(tmp_path / "B.db", station_id="B", shard_count=SHARDS) as b,
        Store.open(tmp_path / "C.db", station_id="C", shard_count=SHARDS) as c,
    ):
        await sync(b, c)
        assert (await c.item("SPK001")).stock == 6


# ---------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("lost", ["some", "all"])
async def test_missing_index_rows_are_rebuilt_on_open(
    populated: tuple[Path, Seen], lost: str
) -> None:
    path, before = populated
    where = "WHERE barcode IN ('SPK001', 'DUP001')" if lost == "some" else ""
    with sqlite3.connect(path) as db:
        db.execute(f"DELETE FROM items {where}")
    db.close()
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        speaker = next(item for item in before.items if item.barcode == "SPK001")
        assert await store.item("SPK001") == speaker
        assert len(await store.find("DUP001")) == 2
        assert await seen(store) == before


async def test_database_files_are_private_to_the_station(tmp_path: Path) -> None:
    path = tmp_path / "data" / "station.db"
    old_umask = os.umask(0o022)
    try:
        async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
            await store.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
            files = sorted(path.parent.glob("station.db*"))
            assert [f.name for f in files] == ["station.db", "station.db-shm", "station.db-wal"]
            for file in files:
                assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    finally:
        os.umask(old_umask)


async def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.close()
    before = fingerprint(path)
    with pytest.raises(NotAStore, match="not an invsync store"):
        await Store.connect(path, station_id="A", shard_count=SHARDS)
    assert fingerprint(path) == before


async def test_a_restored_older_copy_gets_a_new_client_id(tmp_path: Path) -> None:
    """Writes made after a backup used the client id; reusing it after restoring the
    backup would make peers drop new changes as duplicates of the lost ones."""
    path = tmp_path / "station.db"
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        await store.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
    backup = tmp_path / "backup.db"
    shutil.copyfile(path, backup)
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        used_after_backup = store.client_id
        await store.checkout((await store.item("SPK001")).id, 2)
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert store.client_id == used_after_backup  # a clean restart keeps it
    shutil.copyfile(backup, path)
    async with Store.open(path, station_id="A", shard_count=SHARDS) as store:
        assert store.client_id != used_after_backup
        assert (await store.item("SPK001")).stock == 8


async def test_a_large_import_reaches_the_ledger_whole_in_several_updates(
    tmp_path: Path,
) -> None:
    """An import larger than one ledger step is appended in several transactions (see
    ``Store._write_ledger``): every movement is still in the history, after a restart
    and at a peer that merges the updates the import handed to subscribers."""
    count = 2 * LEDGER_STEP + 50
    committed: list[CommittedUpdate] = []
    paths = {station: tmp_path / f"{station}.db" for station in "AB"}
    async with Store.open(paths["A"], station_id="A") as source:
        source.subscribe(committed.append)
        await source.import_items([NewItem(f"XLR{i:04d}", f"XLR cable {i}") for i in range(count)])
    assert len([update for update in committed if update.doc.startswith("ledger/")]) == 3
    async with Store.open(paths["B"], station_id="B") as peer:
        for update in committed:
            await peer.apply_remote(update.doc, update.update, origin="A")
        async with Store.open(paths["A"], station_id="A") as source:
            for station in (peer, source):
                for i in (0, LEDGER_STEP, count - 1):
                    (added,) = await station.history(f"XLR{i:04d}")
                    assert (added.op, added.station) == ("add", "A")
    for path in paths.values():
        assert table_rows(path, "SELECT count(*) FROM movements") == [(count,)]


async def _indexed_items(store: Store, expected: int) -> int:
    """Live items in the query index once it stops growing (bounded wait)."""
    for _ in range(200):
        count = await store.count_items()
        if count == expected:
            return count
        await asyncio.sleep(0.05)
    return await store.count_items()


async def test_a_large_catch_up_is_indexed_in_slices_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    """Indexing 1,200 items from a peer is spread over commits; a restart in the middle
    finishes it from the durable backlog instead of losing those items from lookups."""
    count = 2 * INDEX_SLICE + 200
    # One shard, so one update from the peer touches every item at once.
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=1) as source:
        await source.import_items([NewItem(f"XLR{i:04d}", f"XLR cable {i}") for i in range(count)])
        docs = {name: source.diff(name) for name in source.doc_names()}
    path = tmp_path / "B.db"
    async with Store.open(path, station_id="B", shard_count=1) as station:
        # Stop right after the catch-up is stored: at most two slices are indexed by then.
        await station.apply_remote("items/00", docs["items/00"], origin="A")
    # The station stopped with part of the catch-up still unindexed.
    assert table_rows(path, "SELECT count(*) FROM index_pending")[0][0] > 0
    async with Store.open(path, station_id="B", shard_count=1) as station:
        assert await _indexed_items(station, count) == count
        assert (await station.item("XLR1199")).name == "XLR cable 1199"
    assert table_rows(path, "SELECT count(*) FROM index_pending") == [(0,)]


def _watch_resolving_ahead(station: Store) -> list[bool]:
    """Make ``station`` record whether it is resolving views ahead of a slice (during a
    commit) right now: the returned flag's one element is True only then."""
    ahead = [False]
    resolve_ahead = station._prefetch_views

    async def resolving_ahead(commit: asyncio.Future[None]) -> None:
        ahead[0] = True
        try:
            await resolve_ahead(commit)
        finally:
            ahead[0] = False

    station._prefetch_views = resolving_ahead  # type: ignore[method-assign]
    return ahead


async def test_peer_changes_merged_while_views_are_resolved_ahead_reach_the_index(
    tmp_path: Path,
) -> None:
    """While one catch-up slice is written, the station resolves the next slice's views
    ahead of time. A peer's change merged right after such a view was resolved must
    still reach the index (lookups show it), not the view resolved before it."""
    count = 2 * INDEX_SLICE + 200
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=1) as source:
        views = await source.import_items(
            [NewItem(f"XLR{i:04d}", f"XLR cable {i}", qty=10) for i in range(count)]
        )
        before = source.state_vector("items/00")
        catalog = source.diff("items/00")
        # Items of the second slice, resolved ahead while the first is written: in the
        # first step of that (later ones may not come before a fast commit is done).
        renamed = list(views[INDEX_SLICE : INDEX_SLICE + _PREFETCH_STEP : 20])
        for view in renamed:
            await source.edit_item(view.id, {"name": f"Renamed {view.barcode}"})
            await source.checkout(view.id, 3)
        renames = source.diff("items/00", before)

    path = tmp_path / "B.db"
    async with Store.open(path, station_id="B", shard_count=1) as station:
        resolve = station._compute_views
        ahead = _watch_resolving_ahead(station)
        pending = {view.id for view in renamed}
        merged: list[str] = []

        def resolve_then_merge(item_ids: Iterable[str]) -> dict[str, ItemView]:
            resolved = resolve(item_ids)
            if ahead[0] and pending & resolved.keys() and not merged:
                # The views of renamed items were just resolved ahead, still unrenamed:
                # the peer's renames arrive at the next turn of the loop, while those
                # views wait for their slice.
                merged.extend(pending & resolved.keys())
                asyncio.get_running_loop().call_soon(station.merge_remote, "items/00", renames, "A")
            return resolved

        station._compute_views = resolve_then_merge  # type: ignore[method-assign]
        await station.apply_remote("items/00", catalog, origin="A")
        assert await _indexed_items(station, count) == count
        for _ in range(200):  # the renames' own slice may follow the last count
            if not station._index_backlog:
                break
            await asyncio.sleep(0.05)
        await station.import_items([])  # one more commit: everything before it is in
        assert merged, "the renames never arrived while views were being resolved"
        for view in renamed:
            shown = await station.item(view.barcode)
            assert (shown.name, shown.stock) == (f"Renamed {view.barcode}", 7)


async def test_items_added_and_changed_in_one_commit_are_indexed_once(
    tmp_path: Path,
) -> None:
    """Items created in a commit are inserted into the index without the update path; a
    checkout, rename, re-barcode or delete of them in that same commit must win, also
    past the 500 rows one index statement carries."""
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=SHARDS) as store:
        rows = [NewItem(f"BIN{i:04d}", f"Bin {i}", qty=5) for i in range(1200)]
        added = store._add_items(rows, "")  # stays in the open batch, like an import
        first, second, third, fourth = (view.id for view in added[:4])
        await asyncio.gather(
            store._commit(),
            store.checkout(first, 2),
            store.edit_item(second, {"barcode": "BIN-NEW"}),
            store.delete_item(third),
            store.edit_item(fourth, {"name": "Renamed bin"}),
        )
        assert (await store.item("BIN0000")).stock == 3
        assert await store.find("BIN0001") == []
        assert (await store.item("BIN-NEW")).id == second
        assert await store.find("BIN0002") == []
        assert (await store.item("BIN0003")).name == "Renamed bin"
        assert await store.count_items() == 1199
        # 600 stock changes in one commit: the narrow update runs in two statements.
        await asyncio.gather(*(store.checkout(view.id, 1) for view in added[4:604]))
        stocks = {(await store.item(view.barcode)).stock for view in added[4:604]}
        assert stocks == {4}
        assert (await store.item("BIN0604")).stock == 5
    rows_in_index = table_rows(tmp_path / "A.db", "SELECT count(*) FROM items")
    assert rows_in_index == [(1200,)]


def test_a_sqlite_too_old_for_the_index_is_refused() -> None:
    """UPDATE ... FROM needs SQLite 3.33: an older library is refused with a message
    naming both versions, before a store is opened, rather than failing at the first
    checkout's commit."""
    with pytest.raises(SQLiteTooOld, match=r"SQLite 3\.31\.1.*3\.33\.0 or newer"):
        check_sqlite((3, 31, 1))
    check_sqlite((3, 33, 0))
    check_sqlite(sqlite3.sqlite_version_info)


async def test_a_failure_resolving_views_ahead_does_not_fail_the_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resolving the next slice's views during a commit is optional work: if it fails,
    the commit is still reported stored (an operation retried after a false failure
    would be applied twice) and the slice resolves its views itself."""
    count = 2 * INDEX_SLICE + 200
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=1) as source:
        await source.import_items([NewItem(f"XLR{i:04d}", f"XLR cable {i}") for i in range(count)])
        catalog = source.diff("items/00")
    async with Store.open(tmp_path / "B.db", station_id="B", shard_count=1) as station:
        resolve = station._compute_views
        ahead = _watch_resolving_ahead(station)
        failures: list[int] = []

        def failing_ahead(item_ids: Iterable[str]) -> dict[str, ItemView]:
            if ahead[0]:
                failures.append(1)
                raise RuntimeError("resolving ahead broke")
            return resolve(item_ids)

        station._compute_views = failing_ahead  # type: ignore[method-assign]
        assert await station.apply_remote("items/00", catalog, origin="A")
        added = await station.add_item(NewItem("NEW001", "Added during the catch-up"))
        assert await _indexed_items(station, count + 1) == count + 1
        assert failures, "resolving ahead never ran"
        assert (await station.item("NEW001")).id == added.id
        assert (await station.item(f"XLR{count - 1:04d}")).name == f"XLR cable {count - 1}"
    assert "resolving views ahead of the index failed" in caplog.text
