"""Each store operation, its effect on what a warehouse sees, and its error paths.

Two-station cases exchange real pycrdt updates between two real stores (each on its own
SQLite file) with ``diff``/``apply_remote``, the seam the sync layer uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import unicodedata
from typing import Any

import pycrdt
import pytest

from crdt_store import (
    AmbiguousBarcode,
    CommittedUpdate,
    CorruptUpdate,
    InsufficientStock,
    InvalidInput,
    ItemNotFound,
    Movement,
    NewItem,
    NoConflict,
    Store,
    UnknownDocument,
    WrongState,
    documents,
)
from crdt_store.model import Kind, check_field, item_view, movement_from_raw, movement_to_raw
from crdt_store.names import new_uuid7
from crdt_store.store import CheckedItem, check_new_item
from tests.conftest import OpenStore


async def sync(a: Store, b: Store) -> None:
    """Bring two stores to the same state, both ways, for every document."""
    for source, target in ((a, b), (b, a)):
        for name in source.doc_names():
            update = source.diff(name, target.state_vector(name))
            await target.apply_remote(name, update, origin=source.station_id)


SPEAKER = NewItem("SPK001", "QSC K10.2 Speaker", qty=8, location="Aisle 3", category="Audio")
MIXER = NewItem("MIX001", "Yamaha MG10XU Mixer", kind="serial")


# ---------------------------------------------------------------------- add / show / list


async def test_add_item_shows_every_field(store: Store) -> None:
    item = await store.add_item(SPEAKER, operator="dana")
    found = await store.item("SPK001")
    assert found == item
    assert (found.barcode, found.name, found.kind, found.stock) == (
        "SPK001",
        "QSC K10.2 Speaker",
        "bulk",
        8,
    )
    assert (found.location, found.category, found.notes) == ("Aisle 3", "Audio", "")
    assert not found.deleted and not found.conflicts
    data = found.to_json()
    for key in ("id", "barcode", "name", "kind", "stock", "status", "sheet", "location"):
        assert key in data
    assert data["conflicts"] == []


async def test_item_ids_are_uuidv7_and_distinct(store: Store) -> None:
    first = await store.add_item(SPEAKER)
    second = await store.add_item(MIXER)
    assert first.id != second.id
    assert first.id[14] == "7" and second.id[14] == "7"
    assert await store.item(first.id) == first


async def test_serial_unit_starts_in_with_stock_one(store: Store) -> None:
    unit = await store.add_item(MIXER)
    assert (unit.kind, unit.status, unit.stock, unit.sheet) == ("serial", "in", 1, None)


@pytest.mark.parametrize(
    ("new", "field"),
    [
        (NewItem("", "Speaker"), "barcode"),
        (NewItem("has space", "Speaker"), "barcode"),
        (NewItem("X" * 65, "Speaker"), "barcode"),
        (NewItem("SPK\u00e9", "Speaker"), "barcode"),
        (NewItem("SPK002", "   "), "name"),
        (NewItem("SPK002", "bad\x07name"), "name"),
        (NewItem("SPK002", "Speaker", qty=-1), "qty"),
        (NewItem("SPK002", "Speaker", qty=10**12), "qty"),
        (NewItem("SPK002", "Speaker", kind="crate"), "kind"),  # type: ignore[arg-type]
        (NewItem("SPK002", "Speaker", kind="serial", qty=5), "qty"),
        (NewItem("SPK002", "Speaker", notes="n" * 2001), "notes"),
    ],
)
async def test_add_refuses_bad_input_and_changes_nothing(
    store: Store, new: NewItem, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.add_item(new)
    assert caught.value.field == field
    assert await store.list_items() == []
    assert await store.history("SPK002") == []


async def test_text_survives_the_index_exactly(store: Store) -> None:
    """The index keeps each view as JSON next to its columns: quotes, backslashes,
    accents, emoji and line breaks come back exactly, in lookups, listings and after a
    restart."""
    name = 'Stagebox 16/4 "Pro" \\ Bühne 🎛️ – 10 m'
    notes = "Line one\n\tIndented 'quoted' \\ back"
    item = await store.add_item(
        NewItem("BOX001", name, qty=3, location="Gang Ä", category="Stageboxen", notes=notes)
    )
    await store.checkout(item.id, 1)
    await store.edit_item(item.id, {"location": 'Rack "B"'})
    for view in (await store.item("BOX001"), (await store.list_items("bühne"))[0]):
        assert (view.name, view.notes, view.location, view.stock) == (name, notes, 'Rack "B"', 2)
    await store.close()
    async with Store.open(
        store.path, station_id=store.station_id, shard_count=store.shard_count
    ) as reopened:
        view = await reopened.item("BOX001")
        assert (view.name, view.notes, view.stock) == (name, notes, 2)
        assert [m.op for m in await reopened.history("BOX001")] == ["add", "checkout", "edit"]


def test_text_fields_refuse_exactly_the_control_characters() -> None:
    """Names and the like refuse Unicode's control characters and nothing else; notes
    may also hold tabs and line breaks."""
    for code in range(0x3000):
        char = chr(code)
        control = unicodedata.category(char) == "Cc"
        for field, allowed in (("name", ""), ("notes", "\t\n")):
            refused = control and char not in allowed
            try:
                check_field(field, f"a{char}b")
            except InvalidInput:
                assert refused, (field, hex(code))
            else:
                assert not refused, (field, hex(code))


KINDS: tuple[Kind, ...] = ("bulk", "serial")


async def test_the_view_an_add_returns_is_the_view_read_back(store: Store) -> None:
    """Adds build their views directly (imports make 100k); every combination of kind,
    quantity and fields left at their default must match the view resolved from the
    document's slots."""
    rows = [
        NewItem(f"VIEW-{i}", f"Item {i}", kind, qty, location, category, notes)
        for i, (kind, qty, location, category, notes) in enumerate(
            (kind, qty, location, category, notes)
            for kind in KINDS
            for qty in ((0, 5) if kind == "bulk" else (0,))
            for location in ("", "Aisle 3")
            for category in ("", "Audio")
            for notes in ("", "dented")
        )
    ]
    views = await store.import_items(rows)
    assert len(views) == len(rows) == 24
    for view in views:
        assert view == store._compute_view(view.id), view.barcode
        assert view == await store.item(view.barcode)


async def test_import_is_all_or_nothing(store: Store) -> None:
    rows = [NewItem(f"XLR{i:03d}", f"XLR cable {i} m", qty=i) for i in range(1, 6)]
    with pytest.raises(InvalidInput):
        await store.import_items([*rows, NewItem("bad code", "Broken row")])
    assert await store.list_items() == []
    views = await store.import_items(rows)
    assert [view.stock for view in views] == [1, 2, 3, 4, 5]
    assert len(await store.list_items()) == 5


async def test_an_item_altered_after_its_check_is_checked_again(store: Store) -> None:
    """An item the daemon checked is not checked twice, but a copy altered after the
    check, or one marked checked by hand, is: nothing invalid reaches the documents."""
    good = check_new_item(NewItem(" SPK001 ", " Speaker "))
    assert (good.barcode, good.name) == ("SPK001", "Speaker")
    for bad in (dataclasses.replace(good, barcode="has space"), CheckedItem("X1", "")):
        with pytest.raises(InvalidInput):
            await store.import_items([bad])
    assert await store.list_items() == []
    assert [view.barcode for view in await store.import_items([good])] == ["SPK001"]


async def test_list_and_search(store: Store) -> None:
    await store.import_items(
        [
            SPEAKER,
            MIXER,
            NewItem("XLR010", "XLR cable 10 m", qty=40, location="Bin 7", category="Cables"),
        ]
    )
    names = [view.name for view in await store.list_items()]
    assert names == ["QSC K10.2 Speaker", "XLR cable 10 m", "Yamaha MG10XU Mixer"]
    assert [v.barcode for v in await store.list_items("cable")] == ["XLR010"]
    assert [v.barcode for v in await store.list_items("aisle")] == ["SPK001"]
    assert [v.barcode for v in await store.list_items("MIX")] == ["MIX001"]
    assert await store.list_items("100%_") == []
    assert len(await store.list_items(limit=2)) == 2
    assert [v.barcode for v in await store.list_items(limit=1, offset=2)] == ["MIX001"]


async def test_unknown_barcode_is_not_found(store: Store) -> None:
    with pytest.raises(ItemNotFound):
        await store.item("NOPE")
    assert await store.find("NOPE") == []
    with pytest.raises(InvalidInput):
        await store.find("not a barcode")


# ---------------------------------------------------------------------- edit / delete


async def test_edit_changes_fields_and_records_history(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    edited = await store.edit_item(
        item.id, {"name": "QSC K12.2 Speaker", "location": "Aisle 4"}, operator="lee"
    )
    assert (edited.name, edited.location, edited.stock) == ("QSC K12.2 Speaker", "Aisle 4", 8)
    assert (await store.item("SPK001")).name == "QSC K12.2 Speaker"
    history = await store.history("SPK001")
    assert [(m.op, m.operator) for m in history] == [("add", ""), ("edit", "lee")]


async def test_edit_barcode_moves_the_lookup(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    await store.edit_item(item.id, {"barcode": "SPK999"})
    assert await store.find("SPK001") == []
    assert (await store.item("SPK999")).id == item.id
    assert [m.op for m in await store.history("SPK999")] == ["add", "edit"]


async def test_history_of_a_barcode_keeps_what_was_recorded_under_it(
    open_store: OpenStore,
) -> None:
    """A relabelled item's movements stay in the old barcode's history up to the
    relabel; the item's whole history is under its new barcode; an item that takes the
    old barcode adds its own. This holds after the index is rebuilt too."""
    store = await open_store("A")
    old = await store.add_item(SPEAKER)
    await store.checkout(old.id, 2)
    await store.edit_item(old.id, {"barcode": "SPK999"})
    await store.checkout(old.id, 1)
    new = await store.add_item(NewItem("SPK001", "Replacement speaker", qty=3))
    await store.checkout(new.id, 1)

    def ops(history: list[Movement]) -> list[tuple[str, str, str]]:
        return [(m.item, m.barcode, m.op) for m in history]

    expected_old_barcode = [
        (old.id, "SPK001", "add"),
        (old.id, "SPK001", "checkout"),
        (new.id, "SPK001", "add"),
        (new.id, "SPK001", "checkout"),
    ]
    expected_new_barcode = [
        (old.id, "SPK001", "add"),
        (old.id, "SPK001", "checkout"),
        (old.id, "SPK999", "edit"),
        (old.id, "SPK999", "checkout"),
    ]
    assert ops(await store.history("SPK001")) == expected_old_barcode
    assert ops(await store.history("SPK999")) == expected_new_barcode
    path = store.path
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM items")  # missing rows: the whole index is rebuilt
    db.close()
    again = await open_store("A", path=path)
    assert ops(await again.history("SPK001")) == expected_old_barcode
    assert ops(await again.history("SPK999")) == expected_new_barcode


async def test_listing_follows_renames_and_stock_changes(store: Store) -> None:
    """The index rewrites name and barcode entries only when they change; listings and
    lookups must still follow every kind of change."""
    item = await store.add_item(SPEAKER)
    await store.checkout(item.id, 2)
    assert [(v.name, v.stock) for v in await store.list_items("speaker")] == [
        ("QSC K10.2 Speaker", 6)
    ]
    await store.edit_item(item.id, {"name": "Powered monitor"})
    assert await store.list_items("speaker") == []
    assert [(v.name, v.stock) for v in await store.list_items("monitor")] == [
        ("Powered monitor", 6)
    ]
    await store.return_units(item.id, 1)
    assert (await store.item("SPK001")).stock == 7
    await store.delete_item(item.id)
    assert await store.list_items("monitor") == []
    assert await store.find("SPK001") == []


@pytest.mark.parametrize(
    "changes",
    [{}, {"kind": "serial"}, {"stock": 5}, {"name": ""}, {"barcode": "a b"}, {"colour": "red"}],
)
async def test_edit_refuses_bad_changes(store: Store, changes: dict[str, object]) -> None:
    item = await store.add_item(SPEAKER)
    with pytest.raises(InvalidInput):
        await store.edit_item(item.id, changes)
    assert await store.item("SPK001") == item


async def test_status_edits_apply_to_serial_units_only(store: Store) -> None:
    speaker = await store.add_item(SPEAKER)
    unit = await store.add_item(MIXER)
    with pytest.raises(WrongState):
        await store.edit_item(speaker.id, {"status": "repair"})
    with pytest.raises(InvalidInput):
        await store.edit_item(unit.id, {"status": "out"})
    repaired = await store.edit_item(unit.id, {"status": "repair"})
    assert (repaired.status, repaired.stock) == ("repair", 0)


async def test_delete_hides_item_but_keeps_history(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    gone = await store.delete_item(item.id, operator="lee")
    assert gone.deleted
    assert await store.find("SPK001") == []
    assert await store.list_items() == []
    assert [v.deleted for v in await store.list_items(include_deleted=True)] == [True]
    assert [m.op for m in await store.history("SPK001")] == ["add", "delete"]
    with pytest.raises(ItemNotFound):
        await store.checkout(item.id)
    with pytest.raises(ItemNotFound):
        await store.delete_item(item.id)


async def test_operations_on_unknown_item_id_are_refused(store: Store) -> None:
    unknown = "01900000-0000-7000-8000-000000000000"
    with pytest.raises(ItemNotFound):
        await store.checkout(unknown)
    with pytest.raises(ItemNotFound):
        await store.edit_item(unknown, {"name": "x"})


# ---------------------------------------------------------------------- stock


async def test_checkout_return_count_bulk(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    assert (await store.checkout(item.id, 2, sheet="JOB-1042")).stock == 6
    assert (await store.return_units(item.id, 1, sheet="JOB-1042")).stock == 7
    assert (await store.count(item.id, 50)).stock == 50
    assert (await store.count(item.id, 50)).stock == 50
    history = await store.history("SPK001")
    assert [(m.op, m.qty, m.sheet) for m in history] == [
        ("add", 8, None),
        ("checkout", 2, "JOB-1042"),
        ("return", 1, "JOB-1042"),
        ("count", 43, None),
        ("count", 0, None),
    ]
    assert store.sheet("JOB-1042") == {item.id: 1}


async def test_checkout_more_than_in_stock_is_refused(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    with pytest.raises(InsufficientStock) as caught:
        await store.checkout(item.id, 9)
    assert (caught.value.requested, caught.value.available) == (9, 8)
    assert (await store.item("SPK001")).stock == 8
    assert [m.op for m in await store.history("SPK001")] == ["add"]


@pytest.mark.parametrize("qty", [0, -1, 10**7, 1.5, "2", True])
async def test_absurd_quantities_are_refused(store: Store, qty: object) -> None:
    item = await store.add_item(SPEAKER)
    with pytest.raises(InvalidInput):
        await store.checkout(item.id, qty)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await store.return_units(item.id, qty)  # type: ignore[arg-type]
    assert (await store.item("SPK001")).stock == 8


async def test_count_refuses_negative(store: Store) -> None:
    item = await store.add_item(SPEAKER)
    with pytest.raises(InvalidInput):
        await store.count(item.id, -3)


async def test_concurrent_checkouts_of_the_last_units(store: Store) -> None:
    item = await store.add_item(NewItem("SPK002", "Sub", qty=3))
    results = await asyncio.gather(
        *(store.checkout(item.id, 1) for _ in range(5)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, InsufficientStock)]
    assert len(refused) == 2
    assert (await store.item("SPK002")).stock == 0


async def test_serial_checkout_and_return(store: Store) -> None:
    unit = await store.add_item(MIXER)
    out = await store.checkout(unit.id, sheet="JOB-7")
    assert (out.status, out.sheet, out.stock) == ("out", "JOB-7", 0)
    with pytest.raises(WrongState, match="out on sheet JOB-7"):
        await store.checkout(unit.id, sheet="JOB-8")
    with pytest.raises(InvalidInput):
        await store.checkout(unit.id, 2)
    back = await store.return_units(unit.id)
    assert (back.status, back.sheet, back.stock) == ("in", None, 1)
    with pytest.raises(WrongState, match="already in"):
        await store.return_units(unit.id)
    assert store.sheet("JOB-7") == {}


async def test_serial_count_marks_found_or_lost(store: Store) -> None:
    unit = await store.add_item(MIXER)
    assert (await store.count(unit.id, 0)).status == "lost"
    assert (await store.count(unit.id, 1)).status == "in"
    with pytest.raises(InvalidInput):
        await store.count(unit.id, 2)


# ---------------------------------------------------------------------- two stations


async def test_concurrent_checkouts_merge_exactly(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    await a.checkout(item.id, 2)
    await b.checkout(item.id, 1)
    await sync(a, b)
    assert (await a.item("SPK001")).stock == 5
    assert (await b.item("SPK001")).stock == 5


async def test_the_next_operation_sees_a_peers_merged_change(open_store: OpenStore) -> None:
    """A station keeps the views of items it just used; a merged change from a peer
    must reach its next checkout, edit and count all the same."""
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(SPEAKER)  # 8 units
    await sync(a, b)
    await a.checkout(item.id, 1)
    await b.checkout(item.id, 6)
    await b.edit_item(item.id, {"location": "Truck 2"})
    await sync(a, b)
    with pytest.raises(InsufficientStock):
        await a.checkout(item.id, 2)
    after = await a.checkout(item.id, 1)
    assert (after.stock, after.location) == (0, "Truck 2")
    await b.delete_item(item.id)
    await sync(a, b)
    with pytest.raises(ItemNotFound):
        await a.return_units(item.id, 1)


async def test_a_checkout_reaches_a_peer_with_its_movement(open_store: OpenStore) -> None:
    """A checkout's movement joins the ledger as its group commit is written; a peer
    that asks for changes before that commit still gets the movement with the stock
    change, never the stock change alone."""
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(SPEAKER)  # 8 units
    await sync(a, b)
    pending = asyncio.ensure_future(a.checkout(item.id, 3))
    await asyncio.sleep(0)  # the checkout ran up to its commit
    # Taken at once, as a peer session does, before A's writer gets to run.
    diffs = {name: a.diff(name, b.state_vector(name)) for name in a.doc_names()}
    for name, update in diffs.items():
        await b.apply_remote(name, update, origin="A")
    assert (await b.item("SPK001")).stock == 5
    assert [m.op for m in await b.history("SPK001")] == ["add", "checkout"]
    await pending
    assert [m.op for m in await a.history("SPK001")] == ["add", "checkout"]


async def test_a_bad_change_marker_leaves_no_kept_view_behind(open_store: OpenStore) -> None:
    """A peer's update whose change marker is not a finite clock (a bad peer) still
    reaches the next checkout of every item it touched: no view kept from before may
    let a checkout take units that are gone."""
    a, b = await open_store("A"), await open_store("B")
    items = [await a.add_item(NewItem(f"CBL{n:03d}", "XLR cable", qty=9)) for n in range(6)]
    await sync(a, b)
    for item in items:
        await a.checkout(item.id, 1)  # A keeps each item's view: 8 left
    for item in items:
        await b.checkout(item.id, 8)
    for name, doc in b._docs.items():  # B's shards, written by hand as a bad peer would
        if name.startswith("items/"):
            markers = doc.get("~changes", type=pycrdt.Map)
            with doc.transaction():
                markers[f"{items[0].id}@B"] = float("inf")
    await sync(a, b)
    for item in items:
        with pytest.raises(InsufficientStock):
            await a.checkout(item.id, 1)


def test_items_read_key_by_key_resolve_as_read_through_json() -> None:
    """Items are read from Yrs key by key (``read_items``), not through JSON
    (``read_maps``): both give the same views, also for slots a bad peer wrote (bytes,
    integers and floats, a shared type where a value belongs)."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    hlc = 3_677_840_929_583_157
    plain = {"barcode@A": ["SPK001", hlc], "name@A": ["Speaker", hlc], "stock@A": [8, hlc]}
    odd = {
        **plain,
        "notes@C": [b"\x00\x01", hlc + 1],
        "category@D": b"raw",
        "stock@E": [2.0, float(hlc + 2)],
        "kind@F": ["bulk", 2.5],
        "location@B": pycrdt.Array(["Dock 9", hlc + 3]),
    }
    # Yrs' JSON writes NaN and infinities as null, which a sheet accepts.
    odd_numbers = {**plain, "sheet@A": ["GIG-7", hlc], "sheet@B": [float("nan"), hlc + 1]}
    with doc.transaction():
        for name, slots in (("plain", plain), ("odd", odd), ("odd_numbers", odd_numbers)):
            item = doc.get(name, type=pycrdt.Map)
            for key, value in slots.items():
                item[key] = value
    names = ["plain", "odd", "odd_numbers"]
    by_key, by_json = documents.read_items(doc, names), documents.read_maps(doc, names)
    views = {name: item_view(name, by_key[name]) for name in by_key}
    assert views == {name: item_view(name, by_json[name]) for name in by_json}
    assert (views["plain"].name, views["plain"].stock) == ("Speaker", 8)
    assert (views["odd"].stock, views["odd"].location) == (10, "Dock 9")
    sheet = views["odd_numbers"]
    assert sheet.sheet is None and [c.field for c in sheet.conflicts] == ["sheet"]


def test_ledger_entries_read_one_by_one_decode_as_read_through_json() -> None:
    """A ledger day is read from Yrs entry by entry (raw UUIDs come back as bytes), not
    through JSON (lists of numbers): the movements decode the same, also for an entry a
    bad peer wrote as a shared type or as something else entirely."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    hlc = 3_677_840_929_583_157
    moves = [
        Movement(
            new_uuid7(1_800_000_000_000 + n),
            hlc + n,
            "A",
            "ana",
            new_uuid7(1),
            f"XLR{n}",
            "checkout",
            n + 1,
            None if n % 2 else "GIG-7",
        )
        for n in range(3)
    ]
    documents.append_movements(doc, "A", moves)
    ledger = doc.get("moves@A", type=pycrdt.Array)
    with doc.transaction():
        # NaN for a sheet: Yrs' JSON gives null, a movement without a sheet.
        ledger.append([*movement_to_raw(moves[1])[:7], float("nan")])
        ledger.append("not an entry")
    no_sheet = dataclasses.replace(moves[1], sheet=None)

    def decoded(start: int) -> tuple[list[Movement | None], list[Movement | None]]:
        with doc.transaction() as txn:
            through_json = json.loads(ledger.integrated.to_json(txn._txn))[start:]
        entries = documents.ledger_tail(doc, "A", start)
        return (
            [movement_from_raw("A", entry) for entry in entries],
            [movement_from_raw("A", entry) for entry in through_json],
        )

    by_value, by_json = decoded(0)
    assert by_value == by_json == [*moves, no_sheet, None]
    assert decoded(3)[0] == [no_sheet, None]
    # Shared types (a bad peer's): the day is read through JSON, one decodes.
    bad_entries: list[Any] = [
        pycrdt.Array(movement_to_raw(moves[0])),
        pycrdt.Text("x"),
        pycrdt.Doc(),
    ]
    for bad in bad_entries:
        with doc.transaction():
            ledger.append(bad)
    by_value, by_json = decoded(2)
    assert by_value == by_json == [moves[2], no_sheet, None, moves[0], None, None]


async def test_concurrent_edits_conflict_latest_wins_and_resolve(
    open_store: OpenStore,
) -> None:
    now = [1_800_000_000.0]
    a = await open_store("A", wall_clock=lambda: now[0])
    b = await open_store("B", wall_clock=lambda: now[0])
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    await a.edit_item(item.id, {"location": "Aisle 5"})
    now[0] += 1
    await b.edit_item(item.id, {"location": "Truck 2"})
    await sync(a, b)
    for station in (a, b):
        view = await station.item("SPK001")
        assert view.location == "Truck 2"
        (conflict,) = view.conflicts
        assert conflict.field == "location"
        assert {slot.value for slot in conflict.slots} == {"Aisle 5", "Truck 2"}
        assert [v.id for v in await station.conflicts()] == [item.id]
        assert await station.attention_counts() == (1, 0)  # what status shows
    with pytest.raises(NoConflict):
        await a.resolve_conflict(item.id, "name", "x")
    resolved = await a.resolve_conflict(item.id, "location", "Aisle 5")
    assert (resolved.location, resolved.conflicts) == ("Aisle 5", ())
    await sync(a, b)
    assert (await b.item("SPK001")).location == "Aisle 5"
    assert await b.conflicts() == []
    assert await b.attention_counts() == (0, 0)


@pytest.mark.parametrize("restart", [False, True], ids=["running", "after a restart"])
async def test_a_delete_relayed_apart_from_its_edit_reaches_the_view(
    open_store: OpenStore, restart: bool
) -> None:
    """An edit that supersedes another station's write deletes that write's slot; a
    station relaying the edit before it has the deleted slot holds the delete back and
    leaves it out of what it sends on. The delete then reaches others on its own, with no
    change marker: the conflict it ends must still go from the item, the conflict list
    and (after a restart) from what the index kept."""
    a, b, c, d = [await open_store(station) for station in "ABCD"]
    item = await a.add_item(SPEAKER)
    for other in (b, c, d):
        await sync(a, other)
    await b.edit_item(item.id, {"name": "Cable"})
    await sync(b, d)
    renames: list[CommittedUpdate] = []
    stop = d.subscribe(renames.append)
    await d.edit_item(item.id, {"name": "Speaker"})  # D saw B's write: no conflict
    stop()
    for update in renames:  # C gets D's rename, never B's
        await c.apply_remote(update.doc, update.update, origin="D")
    await sync(b, a)
    for name in c.doc_names():  # D's rename through C: its slot without the delete
        await a.apply_remote(name, c.diff(name, a.state_vector(name)), origin="C")
    assert [conflict.field for conflict in (await a.item("SPK001")).conflicts] == ["name"]
    if restart:
        await a.close()
        a = await open_store("A")
    for name in d.doc_names():  # the delete itself, from D
        await a.apply_remote(name, d.diff(name, a.state_vector(name)), origin="D")
    view = await a.item("SPK001")
    assert (view.name, view.conflicts) == ("Speaker", ())
    assert await a.conflicts() == []
    assert view == await d.item("SPK001")


async def test_sequential_edits_are_not_conflicts(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    await a.edit_item(item.id, {"name": "first"})
    await sync(a, b)
    await b.edit_item(item.id, {"name": "second"})
    await sync(a, b)
    for station in (a, b):
        view = await station.item("SPK001")
        assert (view.name, view.conflicts) == ("second", ())


async def test_later_write_wins_even_with_a_slower_clock(open_store: OpenStore) -> None:
    """A write that saw the previous one supersedes it, whatever the clocks say."""
    a = await open_store("A", wall_clock=lambda: 1_800_000_100.0)
    b = await open_store("B", wall_clock=lambda: 1_800_000_000.0)
    item = await a.add_item(SPEAKER)
    await a.edit_item(item.id, {"notes": "from A"})
    await sync(a, b)
    await b.edit_item(item.id, {"notes": "from B"})
    await sync(a, b)
    assert (await a.item("SPK001")).notes == "from B"
    assert (await a.item("SPK001")).conflicts == ()


async def test_oversold_after_merge_is_an_alert(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(NewItem("SPK003", "Monitor", qty=3))
    await sync(a, b)
    await a.checkout(item.id, 2)
    await b.checkout(item.id, 2)
    await sync(a, b)
    for station in (a, b):
        assert (await station.item("SPK003")).stock == -1
        alerts = await station.alerts()
        assert [(alert.kind, alert.barcode) for alert in alerts] == [("oversold", "SPK003")]
        assert await station.attention_counts() == (0, 1)
    await a.count(item.id, 0)
    await sync(a, b)
    assert await b.alerts() == []


async def test_double_booked_unit(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    unit = await a.add_item(MIXER)
    await sync(a, b)
    await a.checkout(unit.id, sheet="JOB-1")
    await b.checkout(unit.id, sheet="JOB-2")
    await sync(a, b)
    for station in (a, b):
        view = await station.item("MIX001")
        assert view.double_booked
        assert [c.field for c in view.conflicts] == ["sheet"]
        assert [alert.kind for alert in await station.alerts()] == ["double_booked"]
        assert await station.attention_counts() == (1, 1)
    fixed = await b.resolve_conflict(unit.id, "sheet", "JOB-2")
    assert (fixed.status, fixed.sheet, fixed.double_booked, fixed.conflicts) == (
        "out",
        "JOB-2",
        False,
        (),
    )
    await sync(a, b)
    assert await a.alerts() == []


async def test_duplicate_barcode_is_an_alert_and_lookups_show_both(
    open_store: OpenStore,
) -> None:
    a, b = await open_store("A"), await open_store("B")
    first = await a.add_item(NewItem("CASE01", "Road case", qty=1))
    second = await b.add_item(NewItem("CASE01", "Road case (big)", qty=1))
    await sync(a, b)
    for station in (a, b):
        assert {v.id for v in await station.find("CASE01")} == {first.id, second.id}
        with pytest.raises(AmbiguousBarcode):
            await station.item("CASE01")
        (alert,) = await station.alerts()
        assert alert.kind == "duplicate_barcode"
        assert await station.attention_counts() == (0, 1)
        assert {item.id for item in alert.items} == {first.id, second.id}
    await a.edit_item(second.id, {"barcode": "CASE02"})
    assert await a.alerts() == []


async def test_edit_after_concurrent_delete_does_not_resurrect(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    await a.delete_item(item.id)
    await b.edit_item(item.id, {"notes": "checked"})
    await sync(a, b)
    for station in (a, b):
        assert await station.find("SPK001") == []
        (view,) = await station.list_items(include_deleted=True)
        assert view.deleted and view.notes == "checked"


async def test_history_merges_stations_in_hlc_order(open_store: OpenStore) -> None:
    now = [1_800_000_000.0]
    a = await open_store("A", wall_clock=lambda: now[0])
    b = await open_store("B", wall_clock=lambda: now[0])
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    now[0] += 1
    await b.checkout(item.id, 1, operator="sam")
    now[0] += 1
    await a.checkout(item.id, 2, operator="dana")
    await sync(a, b)
    for station in (a, b):
        history = await station.history("SPK001")
        assert [(m.station, m.op, m.qty) for m in history] == [
            ("A", "add", 8),
            ("B", "checkout", 1),
            ("A", "checkout", 2),
        ]


async def test_remote_clock_far_ahead_does_not_drag_ours(open_store: OpenStore) -> None:
    three_hours = 3 * 3600.0
    a = await open_store("A", wall_clock=lambda: 1_800_000_000.0)
    b = await open_store("B", wall_clock=lambda: 1_800_000_000.0 + three_hours)
    item = await a.add_item(SPEAKER)
    await sync(a, b)
    before = a.hlc
    await b.edit_item(item.id, {"name": "Future name"})
    await sync(a, b)
    assert a.hlc == before
    (warning,) = a.clock_warnings()
    assert warning.station == "B"
    assert 3 * 3600_000 - 60_000 < warning.ahead_ms <= 3 * 3600_000
    assert (await a.item("SPK001")).name == "Future name"
    # A later edit on A supersedes the future write, because A has seen it.
    await a.edit_item(item.id, {"name": "Fixed name"})
    await sync(a, b)
    assert (await b.item("SPK001")).name == "Fixed name"


async def test_hlc_is_monotonic_across_restart_and_clock_jump_back(
    open_store: OpenStore,
) -> None:
    now = [1_800_000_000.0]
    a = await open_store("A", wall_clock=lambda: now[0])
    item = await a.add_item(SPEAKER)
    first = a.hlc
    await a.close()
    now[0] -= 3600
    again = await open_store("A", wall_clock=lambda: now[0])
    assert again.hlc == first
    await again.checkout(item.id, 1)
    assert again.hlc > first


# ---------------------------------------------------------------------- sync seam


async def test_remote_update_is_applied_and_published(open_store: OpenStore) -> None:
    a, b = await open_store("A"), await open_store("B")
    seen: list[tuple[str, str]] = []
    b.subscribe(lambda update: seen.append((update.doc, update.origin)))
    await a.add_item(SPEAKER)
    for name in a.doc_names():
        await b.apply_remote(name, a.diff(name, b.state_vector(name)), origin="A")
    assert (await b.item("SPK001")).stock == 8
    assert {origin for _, origin in seen} == {"A"}
    assert any(doc.startswith("items/") for doc, _ in seen)
    # A duplicate changes nothing and is not published again.
    seen.clear()
    for name in a.doc_names():
        assert not await b.apply_remote(name, a.diff(name), origin="A")
    assert seen == []


async def test_corrupt_remote_update_is_refused(store: Store) -> None:
    await store.add_item(SPEAKER)
    before = store.state_vector("items/00")
    for bad in (b"", b"\x00\x01garbage", b"\xff" * 40):
        with pytest.raises(CorruptUpdate):
            await store.apply_remote("items/00", bad, origin="X")
    assert store.state_vector("items/00") == before
    with pytest.raises(UnknownDocument):
        await store.apply_remote("passwords", b"\x00\x00", origin="X")
    with pytest.raises(UnknownDocument):
        await store.apply_remote("items/99", b"\x00\x00", origin="X")
    assert (await store.item("SPK001")).stock == 8


async def test_fleet_members(store: Store) -> None:
    await store.set_station_name("Dock door scanner")
    assert store.fleet_members()["A"]["name"] == "Dock door scanner"
    with pytest.raises(InvalidInput):
        await store.set_station_name("")
