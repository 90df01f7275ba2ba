"""Replicas of the store converge, whatever the order in which their updates arrive.

This is the promise of DESIGN §3 checked end to end on real stores (one SQLite file per
station, clocks up to four minutes apart): 3-5 stations run random warehouse operations
(add, edit, checkout, return, count, delete, conflict resolution) while their updates
reach each other late, interleaved at random, duplicated and partitioned; after a final
full exchange every station must show the same items, conflicts and alerts, and

- every bulk item's stock is its initial stock plus exactly the deltas that were applied
  (an operation the store refused counts for nothing, a count adds the difference from
  the stock that station showed);
- each field shows the write with the highest ``(hlc, station)`` among the writes no
  station had received before writing the field again, and a conflict is listed exactly
  when two or more such concurrent writes carried different values;
- once a person has resolved every conflict at one station and that has spread, no
  station lists a conflict or a double-booked unit.

Causality comes from a model of delivery. Each committed local transaction is one
:class:`Txn`. A write *supersedes* the writes of its field its station had received; its
transaction *deletes* those of them that station still showed (the others were deleted
already, by a transaction every station gets as well). A station shows the writes it
received that no transaction it received deletes, a delete that arrives before its slot
waiting for it as Yjs does. The model predicts every station's items after every step,
and the test compares them with the store's query index, so a station that shows a stale
item, refuses an operation it should accept (or the reverse) or counts from the wrong
stock is caught when it happens.

Delivery is random across stations and documents, so one station's update may reach
another before the update it depends on from a third. Each station's transactions on one
document arrive in the order they were made, as over one connection: pycrdt 0.14
integrates some updates that skip one of their station's earlier ones at once (leaving a
gap in the state vector) and leaves others pending even after the missing one arrives,
until a state-vector exchange sends them again. What a station "has seen" would then
depend on Yrs internals rather than on what was delivered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from crdt_store import (
    LOCAL,
    REGISTER_FIELDS,
    CommittedUpdate,
    InsufficientStock,
    InvalidInput,
    ItemNotFound,
    NewItem,
    NoConflict,
    Store,
    StoreError,
    WrongState,
)
from crdt_store.model import Kind
from crdt_store.names import new_uuid7

SHARDS = 4
STATIONS = ("A", "B", "C", "D", "E")
#: Noon UTC, so skewed clocks and waits stay within one ledger day.
BASE_MS = int(dt.datetime(2025, 3, 4, 12, tzinfo=dt.UTC).timestamp() * 1000)
MAX_SKEW_S = 300.0
STEP_MS = 250

SHEETS: tuple[str | None, ...] = (None, "JOB-1", "JOB-2")
DEFAULTS: dict[str, object] = {
    "barcode": "",
    "name": "",
    "kind": "bulk",
    "location": "",
    "category": "",
    "notes": "",
    "status": "in",
    "sheet": None,
    "deleted": False,
}
#: Small pools of values, so that concurrent writes often agree (no conflict) or differ.
VALUES: dict[str, tuple[object, ...]] = {
    "barcode": ("SPK-1", "SPK-2", "CBL-1"),
    "name": ("Speaker", "Cable", "Mixer"),
    "location": ("", "Shelf 1", "Shelf 2"),
    "category": ("", "Audio"),
    "notes": ("", "dented"),
    "status": ("in", "repair", "lost", "out"),
    "sheet": SHEETS,
}
#: Fields an edit picks from; repeated ones are picked more often, so edits collide.
EDITED_FIELDS = (
    *("name", "name", "name", "location", "location", "status", "status"),
    *("barcode", "category", "notes"),
)

TxnId = tuple[str, str, int]
WriteId = tuple[str, int]


# ---------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Add:
    station: int
    barcode: str
    name: str
    serial: bool
    qty: int


@dataclass(frozen=True)
class Edit:
    station: int
    item: int
    changes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Delete:
    station: int
    item: int


@dataclass(frozen=True)
class Checkout:
    station: int
    item: int
    qty: int
    sheet: str | None


@dataclass(frozen=True)
class Return:
    station: int
    item: int
    qty: int


@dataclass(frozen=True)
class Count:
    station: int
    item: int
    counted: int


@dataclass(frozen=True)
class Resolve:
    station: int
    item: int
    pick: int
    value: int


@dataclass(frozen=True)
class Deliver:
    """Deliver the next ``count`` transactions of one stream waiting for ``station``."""

    station: int
    stream: int
    count: int


@dataclass(frozen=True)
class CatchUp:
    """Deliver everything ``station`` lacks, stream after stream (as after a reconnect)."""

    station: int
    first: int


@dataclass(frozen=True)
class Duplicate:
    """Deliver again a transaction the station already has."""

    station: int
    pick: int


@dataclass(frozen=True)
class Wait:
    seconds: int


Operation = Add | Edit | Delete | Checkout | Return | Count | Resolve
Step = Operation | Deliver | CatchUp | Duplicate | Wait

_station = st.integers(0, len(STATIONS) - 1)
_item = st.integers(0, 63)
_add = st.builds(
    Add,
    _station,
    st.sampled_from(VALUES["barcode"]),
    st.sampled_from(VALUES["name"]),
    st.booleans(),
    st.integers(0, 10),
)
_edit = st.builds(
    Edit,
    _station,
    _item,
    st.lists(
        st.tuples(st.sampled_from(EDITED_FIELDS), st.integers(0, 3)),
        min_size=1,
        max_size=2,
        unique_by=lambda change: change[0],
    ).map(tuple),
)
_deliver = st.builds(Deliver, _station, st.integers(0, 63), st.integers(1, 4))
#: Repeated strategies weigh the mix towards edits and deliveries, which make conflicts.
steps: st.SearchStrategy[Step] = st.one_of(
    _add,
    _add,
    _edit,
    _edit,
    _edit,
    _edit,
    st.builds(Delete, _station, _item),
    st.builds(Checkout, _station, _item, st.integers(1, 6), st.sampled_from(SHEETS)),
    st.builds(Checkout, _station, _item, st.integers(1, 6), st.sampled_from(SHEETS)),
    st.builds(Return, _station, _item, st.integers(1, 4)),
    st.builds(Count, _station, _item, st.integers(0, 12)),
    st.builds(Resolve, _station, _item, st.integers(0, 3), st.integers(0, 5)),
    st.builds(Resolve, _station, _item, st.integers(0, 3), st.integers(0, 5)),
    _deliver,
    _deliver,
    _deliver,
    st.builds(CatchUp, _station, st.integers(0, 63)),
    st.builds(CatchUp, _station, st.integers(0, 63)),
    st.builds(Duplicate, _station, st.integers(0, 255)),
    st.builds(Wait, st.integers(1, 300)),
)


# ---------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Txn:
    """One committed local transaction of one document, as a station sends it."""

    origin: str
    doc: str
    seq: int
    update: bytes

    @property
    def id(self) -> TxnId:
        return (self.origin, self.doc, self.seq)


@dataclass(frozen=True, slots=True)
class Write:
    """One station's write of one field of one item (for ``stock``: its running delta)."""

    item: str
    field: str
    station: str
    hlc: int
    value: object
    txn: TxnId
    #: The writes of this field the writer had received: this write supersedes them.
    supersedes: frozenset[WriteId]
    #: Those of them the writer still showed, whose slots its transaction deletes. (The
    #: others were deleted already, by a transaction that every station receives too.)
    deletes: frozenset[WriteId]

    @property
    def id(self) -> WriteId:
        return (self.station, self.hlc)


@dataclass
class Model:
    """What every station has been delivered, and what it must therefore show."""

    stations: tuple[str, ...]
    writes: dict[tuple[str, str], list[Write]] = field(default_factory=dict)
    item_txns: dict[str, set[TxnId]] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)
    delivered: dict[str, set[TxnId]] = field(default_factory=dict)
    #: Initial stock plus every delta the stores accepted, per bulk item.
    expected_stock: dict[str, int] = field(default_factory=dict)
    own_stock: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.delivered = {station: set() for station in self.stations}

    def has(self, station: str, write: Write) -> bool:
        return write.txn in self.delivered[station]

    def known(self, station: str, item: str) -> bool:
        return not self.item_txns.get(item, set()).isdisjoint(self.delivered[station])

    def live_writes(self, station: str, item: str, name: str) -> list[Write]:
        """The slots of a field a station shows: delivered, and not deleted by a delivered
        transaction (a delete that arrives before its slot waits for it, as in Yjs)."""
        held = [w for w in self.writes.get((item, name), []) if self.has(station, w)]
        gone: set[WriteId] = set().union(*(w.deletes for w in held))
        return [w for w in held if w.id not in gone]

    def record(
        self,
        station: str,
        item: str,
        *,
        txn: TxnId,
        hlc: int,
        registers: Mapping[str, object],
        stock_delta: int,
    ) -> None:
        """A local transaction of ``station``, which also has it from then on."""
        for name, value in registers.items():
            writes = self.writes.setdefault((item, name), [])
            seen = frozenset(w.id for w in writes if self.has(station, w))
            shown = frozenset(w.id for w in self.live_writes(station, item, name))
            writes.append(Write(item, name, station, hlc, value, txn, seen, shown))
        if stock_delta:
            own = self.own_stock.get((item, station), 0) + stock_delta
            self.own_stock[(item, station)] = own
            # A station's counter slot is only ever replaced by that station.
            mine = frozenset(
                w.id for w in self.writes.get((item, "stock"), []) if w.station == station
            )
            write = Write(item, "stock", station, hlc, own, txn, mine, mine)
            self.writes.setdefault((item, "stock"), []).append(write)
            self.expected_stock[item] = self.expected_stock.get(item, 0) + stock_delta
        self.item_txns.setdefault(item, set()).add(txn)
        self.delivered[station].add(txn)

    def view(self, station: str, item: str) -> dict[str, Any] | None:
        """The item as DESIGN §3 says this station must show it (``ItemView.to_json``)."""
        if not self.known(station, item):
            return None
        values = dict(DEFAULTS)
        conflicts: list[dict[str, Any]] = []
        top_hlc = 0
        out_slots = 0
        for name in REGISTER_FIELDS:
            live = self.live_writes(station, item, name)
            if not live:
                continue
            best = max(live, key=lambda w: (w.hlc, w.station))
            values[name] = best.value
            top_hlc = max(top_hlc, best.hlc)
            if name == "status":
                out_slots = sum(1 for w in live if w.value == "out")
            if len({w.value for w in live}) > 1:
                ordered = sorted(live, key=lambda w: (-w.hlc, w.station))
                conflicts.append(
                    {
                        "field": name,
                        "chosen": best.value,
                        "values": [
                            {"value": w.value, "hlc": w.hlc, "station": w.station} for w in ordered
                        ],
                    }
                )
        counters = self.live_writes(station, item, "stock")
        top_hlc = max([top_hlc, *(w.hlc for w in counters)])
        serial = values["kind"] == "serial"
        deleted = values["deleted"] is True
        if serial:
            stock = 1 if values["status"] == "in" else 0
        else:
            stock = sum(w.value for w in counters if isinstance(w.value, int))
        alerts = []
        if not serial and not deleted and stock < 0:
            alerts.append("oversold")
        if serial and not deleted and out_slots > 1:
            alerts.append("double_booked")
        return {
            "id": item,
            **{name: values[name] for name in REGISTER_FIELDS},
            "stock": stock,
            "conflicts": conflicts,
            "alerts": alerts,
            "hlc": top_hlc,
        }

    def views(self, station: str) -> dict[str, dict[str, Any]]:
        found = {item: self.view(station, item) for item in self.items}
        return {item: view for item, view in found.items() if view is not None}


def expected_alerts(
    views: Mapping[str, Mapping[str, Any]],
) -> set[tuple[str, str, tuple[str, ...]]]:
    """Oversold and double-booked items, and barcodes claimed by several live items."""
    live = [view for view in views.values() if not view["deleted"]]
    alerts: set[tuple[str, str, tuple[str, ...]]] = {
        (kind, view["barcode"], (view["id"],)) for view in live for kind in view["alerts"]
    }
    by_barcode: dict[str, list[str]] = {}
    for view in live:
        by_barcode.setdefault(view["barcode"], []).append(view["id"])
    alerts |= {
        ("duplicate_barcode", barcode, tuple(sorted(ids)))
        for barcode, ids in by_barcode.items()
        if len(ids) > 1
    }
    return alerts


def conflicted_fields(view: Mapping[str, Any]) -> list[str]:
    """Fields ``resolve`` accepts: conflicts, and status/sheet of a double-booked unit."""
    fields = [conflict["field"] for conflict in view["conflicts"]]
    if "double_booked" in view["alerts"]:
        fields += [name for name in ("status", "sheet") if name not in fields]
    return fields


# ---------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    """Real stores, the transactions in flight between them, and the model."""

    stores: dict[str, Store]
    model: Model
    now_ms: list[int]
    #: Per receiving station, per (origin, doc): transactions not delivered yet, in order.
    inbox: dict[str, dict[tuple[str, str], deque[Txn]]]
    received: dict[str, list[Txn]]
    committed: dict[str, list[CommittedUpdate]]
    next_seq: dict[tuple[str, str], int] = field(default_factory=dict)

    def station(self, index: int) -> str:
        return self.model.stations[index % len(self.model.stations)]

    def send(self, origin: str) -> TxnId | None:
        """Queue what ``origin`` just committed for every other station.

        Returns the item-document transaction among them (one operation touches one item).
        """
        item_txn: TxnId | None = None
        for update in self.committed[origin]:
            assert update.origin == LOCAL
            seq = self.next_seq.get((origin, update.doc), 0) + 1
            self.next_seq[(origin, update.doc)] = seq
            txn = Txn(origin, update.doc, seq, update.update)
            if update.doc.startswith("items/"):
                assert item_txn is None, "one operation wrote two item transactions"
                item_txn = txn.id
            else:
                self.model.delivered[origin].add(txn.id)
            for other in self.model.stations:
                if other != origin:
                    self.inbox[other].setdefault((origin, update.doc), deque()).append(txn)
        self.committed[origin].clear()
        return item_txn

    def waiting(self, station: str) -> list[deque[Txn]]:
        """The streams with transactions not yet delivered to ``station``, in a fixed order."""
        return [queue for _, queue in sorted(self.inbox[station].items()) if queue]

    async def deliver(self, station: str, txn: Txn) -> None:
        store = self.stores[station]
        changed = await store.apply_remote(txn.doc, txn.update, txn.origin)
        assert changed, f"{station} ignored new transaction {txn.id}"
        self.model.delivered[station].add(txn.id)
        self.received[station].append(txn)

    async def check_station(self, station: str) -> None:
        """The station's index shows exactly what the model says it has been delivered."""
        store = self.stores[station]
        shown = {view.id: view.to_json() for view in await store.list_items(include_deleted=True)}
        expected = self.model.views(station)
        assert shown == expected, f"station {station} shows a different inventory"


async def open_fleet(path: Path, offsets_s: list[int]) -> Fleet:
    stations = STATIONS[: len(offsets_s)]
    now_ms = [0]
    stores: dict[str, Store] = {}
    committed: dict[str, list[CommittedUpdate]] = {station: [] for station in stations}

    def clock(offset_s: int) -> Callable[[], float]:
        return lambda: (BASE_MS + now_ms[0] + offset_s * 1000) / 1000

    def keep_local(station: str) -> Callable[[CommittedUpdate], None]:
        def _keep(update: CommittedUpdate) -> None:
            if update.origin == LOCAL:
                committed[station].append(update)

        return _keep

    try:
        for station, offset_s in zip(stations, offsets_s, strict=True):
            store = await Store.connect(
                path / f"{station}.db",
                station_id=station,
                shard_count=SHARDS,
                wall_clock=clock(offset_s),
                max_clock_skew=MAX_SKEW_S,
            )
            stores[station] = store
            store.subscribe(keep_local(station))
    except BaseException:
        await close_fleet(stores)
        raise
    return Fleet(
        stores=stores,
        model=Model(stations),
        now_ms=now_ms,
        inbox={station: {} for station in stations},
        received={station: [] for station in stations},
        committed=committed,
    )


async def close_fleet(stores: Mapping[str, Store]) -> None:
    for store in stores.values():
        await store.close()


# ---------------------------------------------------------------------- running steps


def refusal(op: Operation, view: Mapping[str, Any] | None) -> type[StoreError] | None:
    """Which error the store must raise for ``op`` on a station that shows ``view``."""
    if isinstance(op, Add):
        return None
    if view is None or view["deleted"]:
        return ItemNotFound
    serial = view["kind"] == "serial"
    if isinstance(op, Edit):
        changes = dict(edit_values(op))
        if "status" in changes:
            if not serial:
                return WrongState
            if changes["status"] == "out":
                return InvalidInput
        return None
    if isinstance(op, Checkout):
        if serial:
            return WrongState if view["status"] != "in" else None
        return InsufficientStock if op.qty > view["stock"] else None
    if isinstance(op, Return):
        return WrongState if serial and view["status"] == "in" else None
    if isinstance(op, Resolve):
        return NoConflict if not conflicted_fields(view) else None
    return None


def pick_item(model: Model, station: str, op: Operation) -> str:
    """Mostly an item the station shows as live (for a resolve: one it shows a conflict
    on, if any); one time in eight any item, which the station may not have received
    yet or may show as deleted (the store must refuse)."""
    assert not isinstance(op, Add)
    views = [model.view(station, item) for item in model.items]
    live = [view for view in views if view is not None and not view["deleted"]]
    if isinstance(op, Resolve):
        live = [view for view in live if conflicted_fields(view)] or live
    if live and op.item % 8:
        return str(live[(op.item // 8) % len(live)]["id"])
    return model.items[(op.item // 8) % len(model.items)]


def edit_values(op: Edit) -> list[tuple[str, object]]:
    return [(name, VALUES[name][index % len(VALUES[name])]) for name, index in op.changes]


def resolve_choice(op: Resolve, view: Mapping[str, Any]) -> tuple[str, object]:
    """A conflicted field of the item and a value for it (one of the candidates, or not)."""
    fields = conflicted_fields(view)
    if not fields:
        return "name", "Speaker"
    name = fields[op.pick % len(fields)]
    candidates = [
        slot["value"]
        for conflict in view["conflicts"]
        if conflict["field"] == name
        for slot in conflict["values"]
    ]
    candidates += [value for value in VALUES[name] if value not in candidates]
    return name, candidates[op.value % len(candidates)]


async def run_operation(fleet: Fleet, op: Operation) -> None:
    """Run one operation on a real store and record in the model what it wrote."""
    model = fleet.model
    station = fleet.station(op.station)
    store = fleet.stores[station]
    item = "" if isinstance(op, Add) else pick_item(model, station, op)
    view = model.view(station, item) if item else None
    expected_error = refusal(op, view)
    # Where the station does not show the item, the store must refuse; the arguments
    # below are then only what a person would have typed.
    shown: Mapping[str, Any] = view or {"kind": "bulk", "status": "in", "sheet": None}
    serial = shown["kind"] == "serial"
    registers: dict[str, object] = {}
    stock_delta = 0
    refused: StoreError | None = None
    try:
        if isinstance(op, Add):
            kind: Kind = "serial" if op.serial else "bulk"
            new = NewItem(op.barcode, op.name, kind, 0 if op.serial else op.qty)
            result = await store.add_item(new)
            item = result.id
            model.items.append(item)
            registers = {
                "barcode": op.barcode,
                "name": op.name,
                "kind": kind,
                "location": "",
                "category": "",
                "notes": "",
            }
            # As the store does: a field at its default gets no slot when an item is added.
            registers = {
                name: value
                for name, value in registers.items()
                if name in ("barcode", "name") or value != DEFAULTS[name]
            }
            if not op.serial:
                stock_delta = op.qty
        elif isinstance(op, Edit):
            changes = dict(edit_values(op))
            result = await store.edit_item(item, changes)
            registers = dict(changes)
            if "status" in changes and shown["sheet"] is not None:
                registers["sheet"] = None
        elif isinstance(op, Delete):
            result = await store.delete_item(item)
            registers = {"deleted": True}
        elif isinstance(op, Checkout):
            result = await store.checkout(item, 1 if serial else op.qty, sheet=op.sheet)
            if serial:
                registers = {"status": "out", "sheet": op.sheet}
            else:
                stock_delta = -op.qty
        elif isinstance(op, Return):
            result = await store.return_units(item, 1 if serial else op.qty)
            if serial:
                registers = {"status": "in", "sheet": None}
            else:
                stock_delta = op.qty
        elif isinstance(op, Count):
            counted = op.counted % 2 if serial else op.counted
            result = await store.count(item, counted)
            if serial:
                status = "in" if counted else "lost"
                if status != shown["status"]:
                    registers = {"status": status, "sheet": None}
            else:
                # A count adds the difference from the stock this station saw.
                stock_delta = counted - shown["stock"]
        else:
            name, value = resolve_choice(op, view) if view else ("name", "Speaker")
            result = await store.resolve_conflict(item, name, value)
            registers = {name: value}
            if serial and name == "sheet":
                registers["status"] = "out" if value is not None else "in"
            if serial and name == "status" and value != "out":
                registers["sheet"] = None
    except StoreError as exc:
        refused = exc
    if refused is not None:
        assert type(refused) is expected_error, f"{op} on {view}: {refused!r}"
        assert not fleet.committed[station], "a refused operation wrote something"
        return
    assert expected_error is None, f"{op} on {view} was accepted"
    item_txn = fleet.send(station)
    assert (item_txn is not None) == bool(registers or stock_delta)
    if item_txn is not None:
        model.record(
            station, item, txn=item_txn, hlc=store.hlc, registers=registers, stock_delta=stock_delta
        )
    assert result.to_json() == model.view(station, item)


async def run_step(fleet: Fleet, step: Step) -> None:
    fleet.now_ms[0] += STEP_MS
    if isinstance(step, Wait):
        fleet.now_ms[0] += step.seconds * 1000
        return
    if isinstance(step, Deliver):
        station = fleet.station(step.station)
        streams = fleet.waiting(station)
        if not streams:
            return
        stream = streams[step.stream % len(streams)]
        for _ in range(min(step.count, len(stream))):
            await fleet.deliver(station, stream.popleft())
        await fleet.check_station(station)
        return
    if isinstance(step, CatchUp):
        station = fleet.station(step.station)
        streams = fleet.waiting(station)
        start = step.first % len(streams) if streams else 0
        for stream in streams[start:] + streams[:start]:
            while stream:
                await fleet.deliver(station, stream.popleft())
        await fleet.check_station(station)
        return
    if isinstance(step, Duplicate):
        station = fleet.station(step.station)
        if not fleet.received[station]:
            return
        txn = fleet.received[station][step.pick % len(fleet.received[station])]
        changed = await fleet.stores[station].apply_remote(txn.doc, txn.update, txn.origin)
        assert not changed, f"a duplicate of {txn.id} changed {station}"
        await fleet.check_station(station)
        return
    if not isinstance(step, Add) and not fleet.model.items:
        return
    await fleet.check_station(fleet.station(step.station))
    await run_operation(fleet, step)


async def exchange_everything(fleet: Fleet, rnd: random.Random, *, anti_entropy: bool) -> None:
    """The final full exchange: what is still queued, in a random interleaving of the
    streams, or a state-vector exchange between every pair of stations (a reconnect)."""
    model = fleet.model
    if not anti_entropy:
        while waiting := [(s, stream) for s in model.stations for stream in fleet.waiting(s)]:
            station, stream = rnd.choice(waiting)
            await fleet.deliver(station, stream.popleft())
        return
    for receiver in model.stations:
        target = fleet.stores[receiver]
        for sender in model.stations:
            if sender != receiver:
                source = fleet.stores[sender]
                for doc in source.doc_names():
                    update = source.diff(doc, target.state_vector(doc))
                    await target.apply_remote(doc, update, sender)
        for stream in fleet.waiting(receiver):
            model.delivered[receiver].update(txn.id for txn in stream)
            stream.clear()


# ---------------------------------------------------------------------- the property


async def converge(
    path: Path,
    offsets_s: list[int],
    *,
    catalog: list[Add],
    script: list[Step],
    rnd: random.Random,
    anti_entropy: bool,
) -> None:
    fleet = await open_fleet(path, offsets_s)
    try:
        # A catalog every station has received, so that the script's operations at
        # different stations meet on shared items from the start.
        for add in catalog:
            await run_step(fleet, add)
        for index in range(len(offsets_s)):
            await run_step(fleet, CatchUp(index, 0))
        for step in script:
            await run_step(fleet, step)
        await exchange_everything(fleet, rnd, anti_entropy=anti_entropy)
        await assert_converged(fleet)
        # A warehouse lead then resolves every conflict at one station: once that has
        # reached the others, no station lists a conflict or a double-booked unit.
        await resolve_everything(fleet, rnd)
        await exchange_everything(fleet, rnd, anti_entropy=anti_entropy)
        await assert_converged(fleet)
        for store in fleet.stores.values():
            assert await store.conflicts() == []
            assert not [alert for alert in await store.alerts() if alert.kind == "double_booked"]
    finally:
        await close_fleet(fleet.stores)


async def resolve_everything(fleet: Fleet, rnd: random.Random) -> None:
    station = rnd.randrange(len(fleet.model.stations))
    for _ in range(len(fleet.model.items) * len(REGISTER_FIELDS) + 1):
        views = fleet.model.views(fleet.station(station)).values()
        if not any(conflicted_fields(view) for view in views if not view["deleted"]):
            return
        # ``item=1`` picks the first item the station shows a conflict on.
        resolve = Resolve(station, item=1, pick=rnd.randrange(4), value=rnd.randrange(6))
        await run_step(fleet, resolve)
    raise AssertionError("resolving one conflict after the other does not end")


async def assert_converged(fleet: Fleet) -> None:
    model = fleet.model
    first = fleet.stores[model.stations[0]]
    items = [view.to_json() for view in await first.list_items(include_deleted=True)]
    conflicts = [view.to_json() for view in await first.conflicts()]
    alerts = [alert.to_json() for alert in await first.alerts()]
    for station in model.stations[1:]:
        store = fleet.stores[station]
        shown = [view.to_json() for view in await store.list_items(include_deleted=True)]
        assert shown == items, f"stations {station} and {model.stations[0]} differ"
        assert [view.to_json() for view in await store.conflicts()] == conflicts
        assert [alert.to_json() for alert in await store.alerts()] == alerts

    by_id = {view["id"]: view for view in items}
    assert set(by_id) == set(model.items)

    # Counters are exact: every accepted delta counted once, refused ones not at all.
    for item, view in by_id.items():
        if view["kind"] == "bulk":
            assert view["stock"] == model.expected_stock.get(item, 0), view

    # Each field: latest HLC among the maximal (concurrent) writes; a conflict exactly
    # when those carried different values.
    for (item, name), writes in model.writes.items():
        if name == "stock":
            continue
        superseded = set().union(*(w.supersedes for w in writes))
        maximal = [w for w in writes if w.id not in superseded]
        latest = max(maximal, key=lambda w: (w.hlc, w.station))
        view = by_id[item]
        assert view[name] == latest.value, (item, name, maximal)
        conflict = [c for c in view["conflicts"] if c["field"] == name]
        assert bool(conflict) == (len({w.value for w in maximal}) > 1), (item, name, maximal)
        if conflict:
            slots = {(s["station"], s["hlc"], s["value"]) for s in conflict[0]["values"]}
            assert slots == {(w.station, w.hlc, w.value) for w in maximal}

    # And everything else a person sees: whole items, the conflict list, the alerts.
    expected = model.views(model.stations[0])
    assert by_id == expected
    assert {view["id"] for view in conflicts} == {
        item for item, view in expected.items() if view["conflicts"] and not view["deleted"]
    }
    shown_alerts = {
        (alert["kind"], alert["barcode"], tuple(sorted(i["id"] for i in alert["items"])))
        for alert in alerts
    }
    assert shown_alerts == expected_alerts(expected)


def fleet_directory() -> tempfile.TemporaryDirectory[str]:
    """A fresh directory for one example's databases.

    tmpfs when there is one: every commit is fsynced (``synchronous=FULL``), which is
    what a station needs and what convergence does not depend on; on disk the fsyncs
    take most of the run.
    """
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() else None
    return tempfile.TemporaryDirectory(prefix="invsync-convergence-", dir=where)


@settings(max_examples=50, deadline=None)
@given(
    offsets_s=st.lists(st.integers(-120, 120), min_size=3, max_size=5),
    catalog=st.lists(_add, max_size=4),
    script=st.lists(steps, min_size=20, max_size=60),
    seed=st.integers(0, 2**32),
    anti_entropy=st.booleans(),
)
# Station C receives B's rename of an item before A's add of it (a delete of A's change
# marker thus arrived before the marker): C must still index the item's barcode and stock.
@example(
    offsets_s=[0, 30, -30],
    catalog=[],
    script=[
        Add(0, "SPK-1", "Speaker", serial=False, qty=8),
        Deliver(1, stream=0, count=1),
        Edit(1, item=1, changes=(("name", 1),)),
        Deliver(2, stream=2, count=1),
    ],
    seed=0,
    anti_entropy=False,
)
# Station C relays D's rename to A without the delete of B's name it carries (C lacked
# B's write); the delete reaches A later on its own, from D, with no change marker.
@example(
    offsets_s=[9, -101, -62, 118],
    catalog=[
        Add(2, "SPK-1", "Speaker", serial=True, qty=0),
        Add(0, "SPK-1", "Speaker", serial=True, qty=0),
        Add(0, "SPK-1", "Speaker", serial=True, qty=0),
        Add(0, "SPK-1", "Speaker", serial=False, qty=0),
    ],
    script=[
        Return(0, item=0, qty=1),
        Checkout(1, item=52, qty=1, sheet=None),
        Edit(0, item=0, changes=(("name", 0),)),
        Wait(1),
        Checkout(0, item=0, qty=1, sheet="JOB-2"),
        Wait(95),
        Checkout(0, item=0, qty=1, sheet=None),
        Add(1, "SPK-1", "Cable", serial=False, qty=0),
        Checkout(0, item=0, qty=1, sheet=None),
        Add(0, "SPK-1", "Speaker", serial=False, qty=0),
        Return(0, item=0, qty=1),
        CatchUp(3, first=0),
        Delete(0, item=0),
        Edit(3, item=37, changes=(("name", 0),)),
        Add(0, "SPK-1", "Speaker", serial=False, qty=0),
        Add(3, "SPK-1", "Speaker", serial=False, qty=0),
        Duplicate(0, pick=0),
        Deliver(2, stream=31, count=1),
        Checkout(0, item=0, qty=1, sheet=None),
        Checkout(0, item=0, qty=1, sheet=None),
        Add(0, "SPK-1", "Speaker", serial=False, qty=0),
        Add(0, "SPK-1", "Speaker", serial=False, qty=0),
    ],
    seed=0,
    anti_entropy=True,
)
def test_replicas_converge(
    offsets_s: list[int], catalog: list[Add], script: list[Step], seed: int, anti_entropy: bool
) -> None:
    """3-5 stations with clocks up to 2 minutes off, random operations and deliveries."""
    # Item ids pick the shard documents, and so the streams a step delivers from: derive
    # them from the example so that a failure replays exactly.
    counter = itertools.count()

    def next_id(now_ms: int, rand: bytes | None = None) -> str:
        return new_uuid7(now_ms, random.Random(next(counter)).randbytes(10))

    with fleet_directory() as path, mock.patch("crdt_store.store.new_uuid7", next_id):
        asyncio.run(
            converge(
                Path(path),
                offsets_s,
                catalog=catalog,
                script=script,
                rnd=random.Random(seed),
                anti_entropy=anti_entropy,
            )
        )
