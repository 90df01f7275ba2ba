"""The store's side of the cloud bridge, on real stores in SQLite files.

The push outbox (marks confirmed only if not raised meanwhile, movements, parked rows,
re-targeting) and web edits written as writer ``cloud`` with the cloud's HLC: merged by
HLC with station edits, idempotent, durable with the pull cursor, and spread to peers by
the normal sync seam.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crdt_store import NewItem, Store
from crdt_store.cloud import CLOUD_WRITER, CloudEdit
from crdt_store.hlc import pack
from tests.conftest import OpenStore, sync_pair


@pytest.fixture
def open_store(open_store: OpenStore) -> OpenStore:
    """Stores whose outbox is bound to a cloud database, as the bridge binds it before
    its first push (an unbound store keeps no item marks: see the test below)."""

    async def _open(station_id: str = "A", **kwargs: object) -> Store:
        store = await open_store(station_id, **kwargs)
        await store.cloud_use_target("db/FLEET")
        return store

    return _open


async def drain(store: Store) -> list[str]:
    """Confirm everything on the outbox as a bridge would; returns the item ids."""
    pushed: list[str] = []
    while batch := await store.cloud_dirty_items(100):
        await store.cloud_confirm([(d.view.id, d.mark) for d in batch])
        pushed += [d.view.id for d in batch]
    while movements := await store.cloud_pending_movements(100):
        await store.cloud_confirm([], [m.id for m in movements])
    return pushed


def web_hlc(store: Store, ahead_ms: int = 1000) -> int:
    """A server HLC a little after the station's clock (the cloud's clock is its own)."""
    return pack((store.hlc >> 11) + ahead_ms, 7)


async def test_outbox_holds_changed_items_and_new_movements_until_confirmed(
    store: Store,
) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    cable = await store.add_item(NewItem("CBL001", "Cable", qty=50))
    batch = await store.cloud_dirty_items(10)
    assert {d.view.id for d in batch} == {spk.id, cable.id}
    by_id = {d.view.id: d.view for d in batch}
    assert by_id[spk.id].stock == 8 and set(by_id[spk.id].field_hlcs) >= {"name", "barcode"}
    assert by_id[spk.id].stock_hlcs == {"A": spk.hlc}
    movements = await store.cloud_pending_movements(10)
    assert [m.op for m in movements] == ["add", "add"]
    assert (await store.cloud_backlog()).to_json() == {"items": 2, "movements": 2, "parked": 0}

    await store.cloud_confirm([(d.view.id, d.mark) for d in batch], [m.id for m in movements])
    assert (await store.cloud_backlog()).to_json() == {"items": 0, "movements": 0, "parked": 0}
    await store.checkout(spk.id, 2)
    assert [d.view.stock for d in await store.cloud_dirty_items(10)] == [6]
    assert [m.op for m in await store.cloud_pending_movements(10)] == ["checkout"]


async def test_binding_the_outbox_marks_what_changed_before_it(tmp_path: Path) -> None:
    """Until a bridge binds the outbox to a database, commits mark no item (a page
    written per checkout for a cloud that may never come); binding marks them all, so
    nothing changed before it is left out of the first push."""
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=8) as store:
        spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
        await store.checkout(spk.id, 2)
        assert await store.cloud_dirty_items(10) == []
        assert (await store.cloud_backlog()).items == 0
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=8) as store:
        cable = await store.add_item(NewItem("CBL001", "Cable", qty=50))
        assert await store.cloud_use_target("db/FLEET") is True
        await store.checkout(cable.id, 1)
        dirty = {d.view.barcode: d.view.stock for d in await store.cloud_dirty_items(10)}
        assert dirty == {"SPK001": 6, "CBL001": 49}
        assert len(await store.cloud_pending_movements(10)) == 4
        await drain(store)
    # Bound stays bound across a restart: the next change is marked again.
    async with Store.open(tmp_path / "A.db", station_id="A", shard_count=8) as store:
        await store.checkout(spk.id, 1)
        assert [d.view.stock for d in await store.cloud_dirty_items(10)] == [5]


async def test_an_edit_during_a_push_keeps_the_item_on_the_outbox(store: Store) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    (read,) = await store.cloud_dirty_items(10)
    await store.checkout(spk.id, 1)  # lands while the batch is "in flight"
    await store.cloud_confirm([(read.view.id, read.mark)])
    (still,) = await store.cloud_dirty_items(10)
    assert still.view.stock == 7 and still.mark > read.mark


async def test_a_late_peer_write_with_an_older_hlc_still_counts_as_a_change(
    open_store: OpenStore,
) -> None:
    """A peer's offline edit can change the view without raising the item's HLC; the
    mark must rise anyway, or a push in flight would confirm it away unsent."""
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    await sync_pair(a, b)
    await drain(a)
    await b.edit_item(spk.id, {"location": "Aisle 9"})  # B's clock: an earlier HLC
    await a.edit_item(spk.id, {"notes": "new"})
    await a.edit_item(spk.id, {"notes": "newer"})
    (read,) = await a.cloud_dirty_items(10)
    await sync_pair(a, b)
    await a.cloud_confirm([(read.view.id, read.mark)])
    (still,) = await a.cloud_dirty_items(10)
    assert still.view.location == "Aisle 9"


async def test_parked_rows_wait_for_the_next_change_or_a_retry(store: Store) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    (dirty,) = await store.cloud_dirty_items(10)
    (movement,) = await store.cloud_pending_movements(10)
    await store.cloud_park("item", spk.id, barcode="SPK001", mark=dirty.mark, error="bad name")
    await store.cloud_park("movement", movement.id, barcode="SPK001", mark=0, error="bad op")
    assert await store.cloud_dirty_items(10) == []
    assert await store.cloud_pending_movements(10) == []
    parked = await store.cloud_parked()
    assert [(p.kind, p.row_id, p.error) for p in parked] == [
        ("item", spk.id, "bad name"),
        ("movement", movement.id, "bad op"),
    ]
    assert (await store.cloud_backlog()).parked == 2

    await store.edit_item(spk.id, {"name": "Speaker 2"})
    (again,) = await store.cloud_dirty_items(10)
    assert again.view.name == "Speaker 2"
    assert await store.cloud_retry_parked() == 2
    assert len(await store.cloud_pending_movements(10)) == 2  # the add and the edit
    await drain(store)
    assert await store.cloud_parked() == []


async def test_another_target_pushes_everything_again_and_resets_the_cursor(
    store: Store,
) -> None:
    await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    assert await store.cloud_use_target("db-one/FLEET") is True
    await drain(store)
    await store.apply_cloud_edits([], cursor="42")
    assert await store.cloud_use_target("db-one/FLEET") is False
    assert await store.cloud_cursor() == "42"
    assert await store.cloud_use_target("db-two/FLEET") is True
    assert (await store.cloud_backlog()).to_json() == {"items": 1, "movements": 1, "parked": 0}
    assert await store.cloud_cursor() is None


async def test_web_edit_is_written_as_writer_cloud_and_reaches_a_peer(
    open_store: OpenStore,
) -> None:
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8, location="Aisle 1"))
    await sync_pair(a, b)
    hlc = web_hlc(a)
    edit = CloudEdit(spk.id, {"location": ("Aisle 7", hlc)}, change_id="c1")
    (view,) = await a.apply_cloud_edits([edit], cursor="100")
    assert view.location == "Aisle 7" and view.field_hlcs["location"] == hlc
    assert not view.conflicts
    assert a.hlc >= hlc, "the clock observed the server HLC"
    assert await a.cloud_cursor() == "100"
    history = await a.history(spk.id)
    assert [(m.op, m.operator) for m in history][-1] == ("edit", "web")

    # Applying the same edit again (a pull may see it twice) changes nothing.
    assert await a.apply_cloud_edits([edit]) == []
    await sync_pair(a, b)
    seen = await b.item("SPK001")
    assert seen.location == "Aisle 7" and not seen.conflicts
    # B pulls the same change itself: nothing new, and the history shows it once.
    assert await b.apply_cloud_edits([edit]) == []
    assert len(await b.history(spk.id)) == len(history)


async def test_web_and_station_edits_of_one_field_resolve_by_hlc(store: Store) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    older = spk.hlc + 1  # a web edit stamped before the station's next edit
    await store.edit_item(spk.id, {"name": "Station name"})
    assert await store.apply_cloud_edits([CloudEdit(spk.id, {"name": ("Web name", older)})]) == []
    assert (await store.item(spk.id)).name == "Station name"

    newer = web_hlc(store)
    (view,) = await store.apply_cloud_edits([CloudEdit(spk.id, {"name": ("Web name", newer)})])
    assert view.name == "Web name" and not view.conflicts
    await store.edit_item(spk.id, {"name": "Later station name"})
    assert (await store.item(spk.id)).name == "Later station name"


async def test_web_stock_is_a_count_and_web_rows_create_items(store: Store) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    await store.checkout(spk.id, 3)
    (view,) = await store.apply_cloud_edits(
        [CloudEdit(spk.id, {"stock": (10, web_hlc(store))}, change_id="c2")]
    )
    assert view.stock == 10
    (count,) = [k for k in view.stock_by_station if k.startswith(CLOUD_WRITER + ":")]
    assert view.stock_by_station[count] == 5
    assert (await store.history(spk.id))[-1].qty == 5

    web_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    hlc = web_hlc(store, 2000)
    (created,) = await store.apply_cloud_edits(
        [
            CloudEdit(
                web_id,
                {
                    "barcode": ("WEB001", hlc),
                    "name": ("Added on the web", hlc),
                    "kind": ("bulk", hlc),
                    "stock": (4, hlc),
                },
                change_id="c3",
            )
        ]
    )
    assert created.id == web_id
    assert (await store.item("WEB001")).to_json() | {"hlc": 0} == created.to_json() | {"hlc": 0}
    assert created.stock == 4 and created.name == "Added on the web"


async def test_web_edits_with_bad_values_are_skipped_field_by_field(store: Store) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    hlc = web_hlc(store)
    (view,) = await store.apply_cloud_edits(
        [CloudEdit(spk.id, {"status": ("stolen", hlc), "notes": ("fine", hlc)})]
    )
    assert view.notes == "fine" and view.status == "in"
    assert await store.apply_cloud_edits([CloudEdit("not-an-id", {"name": ("x", hlc)})]) == []


async def test_cursor_and_web_edits_survive_a_restart(open_store: OpenStore) -> None:
    a = await open_store("A")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    hlc = web_hlc(a)
    await a.apply_cloud_edits([CloudEdit(spk.id, {"name": ("Renamed", hlc)})], cursor="7")
    path = a.path
    await a.close()
    async with Store.open(path, station_id="A", shard_count=8) as again:
        assert await again.cloud_cursor() == "7"
        assert (await again.item(spk.id)).name == "Renamed"
        assert {d.view.id for d in await again.cloud_dirty_items(10)} == {spk.id}


async def test_a_web_count_pulled_by_two_stations_counts_once(open_store: OpenStore) -> None:
    """Both stations apply the same web count from different views of the stock; the
    difference from the cloud's stock before the edit is the same on both, so they agree
    after syncing (a difference from each own view would count twice or not at all)."""
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    await sync_pair(a, b)
    await a.checkout(spk.id, 1)  # B has not seen it
    hlc = web_hlc(a)
    edit = CloudEdit(spk.id, {"stock": (20, hlc)}, change_id="9", stock_before=8)
    (on_a,) = await a.apply_cloud_edits([edit])
    (on_b,) = await b.apply_cloud_edits([edit])
    assert (on_a.stock, on_b.stock) == (19, 20)
    await sync_pair(a, b)
    assert (await a.item(spk.id)).stock == (await b.item(spk.id)).stock == 19
    # A web-created row: the stock before is 0, pulled by a station that never saw it.
    web_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c"
    new = CloudEdit(web_id, {"name": ("Web", hlc), "stock": (4, hlc)}, "10", stock_before=0)
    await a.apply_cloud_edits([new])
    await b.apply_cloud_edits([new])
    await sync_pair(a, b)
    assert (await a.item(web_id)).stock == (await b.item(web_id)).stock == 4


async def test_web_counts_pulled_in_any_order_by_two_stations_count_once_each(
    open_store: OpenStore,
) -> None:
    """Each web count is its own counter slot, keyed by its change: stations applying
    counts in different orders, each before seeing the other's, still agree (a shared
    slot rewritten per count could lose one to a concurrent rewrite)."""
    a = await open_store("A")
    b = await open_store("B")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    await sync_pair(a, b)
    first = CloudEdit(spk.id, {"stock": (20, web_hlc(a))}, change_id="db/1", stock_before=8)
    second = CloudEdit(spk.id, {"stock": (15, web_hlc(a, 2000))}, change_id="db/2", stock_before=20)
    await a.apply_cloud_edits([first, second])
    await b.apply_cloud_edits([first])
    await sync_pair(a, b)
    await b.apply_cloud_edits([second, first])  # again, and late: nothing changes
    await sync_pair(a, b)
    for store in (a, b):
        assert (await store.item(spk.id)).stock == 15
        counts = [m.qty for m in await store.history(spk.id) if m.op == "count"]
        assert sorted(counts) == [-5, 12]


async def test_a_web_edit_with_the_hlc_of_a_station_write_resolves_as_the_table_does(
    open_store: OpenStore,
) -> None:
    """Equal HLCs: the writer breaks the tie, in the item view and in the cloud table
    alike (("A", h) < ("cloud", h) < ("zz", h)), so both sides keep the same value."""
    a = await open_store("A")
    zz = await open_store("zz")
    spk = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    await sync_pair(a, zz)
    await zz.edit_item(spk.id, {"location": "Aisle 2"})
    view = await a.edit_item(spk.id, {"name": "Station name"})
    await sync_pair(a, zz)
    name_hlc = view.field_hlcs["name"]
    location_hlc = (await a.item(spk.id)).field_hlcs["location"]
    (won,) = await a.apply_cloud_edits(
        [CloudEdit(spk.id, {"name": ("Web name", name_hlc)}, change_id="7")]
    )
    assert won.name == "Web name"  # ("cloud", h) > ("A", h)
    assert (
        await a.apply_cloud_edits(
            [CloudEdit(spk.id, {"location": ("Web aisle", location_hlc)}, change_id="8")]
        )
        == []
    )  # ("zz", h) > ("cloud", h)
    assert (await a.item(spk.id)).location == "Aisle 2"


async def test_a_refused_web_value_is_reported_and_the_stations_value_refreshed(
    store: Store,
) -> None:
    spk = await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    await drain(store)
    hlc = web_hlc(store)
    applied = await store.apply_cloud_pull(
        [
            CloudEdit(
                spk.id,
                {"name": ("", hlc), "stock": (-3, hlc), "notes": ("fine", hlc)},
                change_id="db/4",
            )
        ]
    )
    (view,) = applied.views
    assert (view.name, view.notes, view.stock) == ("Speaker", "fine", 8)
    assert [(r.field, r.barcode) for r in applied.refused] == [
        ("name", "SPK001"),
        ("stock", "SPK001"),
    ]
    # The station's own values, written again after the web edit's clock: the next push
    # wins over the refused values in the cloud row.
    assert view.field_hlcs["name"] > hlc
    assert view.stock_hlcs["A"] > hlc
    assert {d.view.id for d in await store.cloud_dirty_items(10)} == {spk.id}
    # A refused value of an item the station does not have: reported, nothing written.
    unknown = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5d"
    applied = await store.apply_cloud_pull([CloudEdit(unknown, {"name": ("", hlc)})])
    assert applied.views == [] and [r.field for r in applied.refused] == ["name"]


async def test_another_database_id_starts_the_outbox_over(store: Store) -> None:
    await store.add_item(NewItem("SPK001", "Speaker", qty=8))
    await store.cloud_use_target("db/FLEET")
    await drain(store)
    await store.apply_cloud_edits([], cursor="5:0")
    assert await store.cloud_use_database("one") is False  # first seen: only recorded
    assert await store.cloud_use_database("one") is False
    assert (await store.cloud_backlog()).items == 0 and await store.cloud_cursor() == "5:0"
    assert await store.cloud_use_database("two") is True
    assert (await store.cloud_backlog()).to_json() == {"items": 1, "movements": 1, "parked": 0}
    assert await store.cloud_cursor() is None
    assert await store.cloud_use_database("two") is False
    await drain(store)
    await store.apply_cloud_edits([], cursor="6:0")
    await store.cloud_start_over()
    assert (await store.cloud_backlog()).items == 1 and await store.cloud_cursor() is None
    assert await store.cloud_use_database("two") is False, "the id stays recorded"


async def test_an_item_with_a_conflict_is_pushed_again_only_when_it_changes(
    open_store: OpenStore,
) -> None:
    """Items holding concurrent writes are checked after every merge into their shard
    (a delete may reach them without a change marker). Across a restart, a merge that
    does not touch them must not mark them for the cloud again."""
    a, b = await open_store("A", shard_count=1), await open_store("B", shard_count=1)
    speaker = await a.add_item(NewItem("SPK001", "Speaker", qty=8))
    cable = await a.add_item(NewItem("CBL001", "Cable", qty=50))
    await sync_pair(a, b)
    await a.edit_item(speaker.id, {"name": "Speaker (pair)"})
    await b.edit_item(speaker.id, {"name": "Speaker main"})
    await sync_pair(a, b)
    assert [view.barcode for view in await a.conflicts()] == ["SPK001"]
    await drain(a)
    await a.close()
    a = await open_store("A", shard_count=1)
    await b.checkout(cable.id, 2)
    await sync_pair(a, b)
    assert await drain(a) == [cable.id]
