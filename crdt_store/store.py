"""The inventory store: named CRDT documents in memory, made durable in SQLite.

One :class:`Store` per station. Operations change the in-memory pycrdt documents
synchronously (so they are atomic with respect to each other) and then wait for the
*group commit*: a single writer task appends every pending update to the log, updates the
query index in the same SQLite transaction, commits with ``synchronous=FULL``, and only
then acknowledges the operations and hands the updates to subscribers (the sync layer).
Persist-before-ack and persist-before-send follow from that order.

If a commit fails the store stops (fail-stop): memory would be ahead of disk, and the only
safe way back is a restart that reloads from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import re
import secrets
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
from pycrdt import Doc, TransactionEvent

from . import cloud, documents, index
from .checkpoint import Checkpointer, tune_writer
from .cloud import (
    AppliedEdits,
    CloudBacklog,
    CloudEdit,
    DirtyItem,
    ParkedKind,
    ParkedRow,
    RefusedValue,
)
from .errors import (
    AmbiguousBarcode,
    CorruptUpdate,
    InsufficientStock,
    InvalidInput,
    ItemNotFound,
    NoConflict,
    SQLiteTooOld,
    StoreClosed,
    StoreMismatch,
    WrongState,
)
from .hlc import HybridClock, physical_ms
from .index import Alert
from .model import (
    EDITABLE_FIELDS,
    FIELD_DEFAULTS,
    MAX_STOCK,
    REGISTER_FIELDS,
    STOCK_FIELD,
    ItemView,
    Kind,
    Movement,
    added_item_view,
    check_barcode,
    check_field,
    check_qty,
    item_view,
    movement_from_raw,
    slot_key,
    split_slot_key,
)
from .names import (
    DEFAULT_SHARDS,
    FLEET_DOC,
    MAX_SHARDS,
    check_doc_name,
    check_station_id,
    fixed_doc_names,
    is_item_id,
    item_doc,
    ledger_doc,
    new_uuid7,
    shard_of,
    sheet_doc,
)
from .schema import INDEX_VERSION, check_openable, migrate

_LOGGER = logging.getLogger(__name__)

#: Origin of transactions made by this station's own operations.
LOCAL = "local"
_LOADING = "loading"
#: Largest update accepted from outside (a full 100k-item shard is ~1 MB).
MAX_REMOTE_UPDATE = 64 * 1024 * 1024
_SKEW_LOG_INTERVAL_MS = 600_000
#: Operation ids remembered in memory for retries; older ones are found in the index.
_RECENT_OPS = 10_000
#: Live item views kept for the next operation on the same item (``_live_view``).
RECENT_VIEWS = 4096
#: Most item views resolved in one commit for changes that came from peers.
INDEX_SLICE = 2000
#: Most movements appended to a ledger document in one transaction (``_write_ledger``).
LEDGER_STEP = 100
#: Views resolved between two looks at the event loop while a commit runs (3-10 ms).
_PREFETCH_STEP = 100
#: Namespace of the movement ids of web edits (uuid5 of item, change and HLC).
_WEB_EDITS = uuid.UUID("6f1c9a52-3d4e-5b8a-9c1f-2e7d0b4a8c63")
_OP_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item as a person enters it (validated by :meth:`Store.add_item`)."""

    barcode: str
    name: str
    kind: Kind = "bulk"
    qty: int = 0
    location: str = ""
    category: str = ""
    notes: str = ""


@dataclass(frozen=True, slots=True)
class CommittedUpdate:
    """A document update that is durably stored; what subscribers receive."""

    doc: str
    update: bytes
    origin: str


@dataclass(frozen=True, slots=True)
class SkewedStation:
    """A station whose clock ran further ahead of ours than ``max_clock_skew``."""

    station: str
    ahead_ms: int
    seen_at_ms: int


@dataclass(slots=True)
class _Batch:
    """Everything one group commit writes; operations wait on ``done``."""

    done: asyncio.Future[None]
    updates: list[CommittedUpdate] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    views: dict[str, ItemView] = field(default_factory=dict)
    #: Items created by this batch: not in the index yet.
    added: set[str] = field(default_factory=set)
    movements: list[Movement] = field(default_factory=list)
    #: This station's movements, appended to the ledger documents as the batch commits.
    to_ledger: list[Movement] = field(default_factory=list)
    ledger_progress: dict[tuple[str, str], int] = field(default_factory=dict)
    compact: set[str] = field(default_factory=set)
    #: Cloud bridge bookkeeping (confirmed pushes, parked rows, the pull cursor).
    cloud: list[index.Statement] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.updates or self.touched or self.movements or self.compact or self.cloud)


class Store:
    """A station's inventory. Open with ``async with Store.open(path, station_id=...)``."""

    def __init__(
        self,
        path: Path,
        db: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        lookup: sqlite3.Connection,
        *,
        station_id: str,
        shard_count: int,
        client_id: int,
        clock: HybridClock,
        wall_clock: Callable[[], float],
        compact_after: int,
    ) -> None:
        self.path = path
        self.station_id = station_id
        self.shard_count = shard_count
        self.client_id = client_id
        self._db = db
        self._reader = reader
        #: Indexed lookups by barcode or id, answered on the caller's thread (see ``find``).
        self._lookup = lookup
        self._clock = clock
        self._wall_clock = wall_clock
        self._compact_after = compact_after
        self._docs: dict[str, Doc[Any]] = {}
        self._next_seq: dict[str, int] = {}
        self._log_length: dict[str, int] = {}
        self._log_bytes: dict[str, int] = {}
        self._snapshot_bytes: dict[str, int] = {}
        self._known_items: dict[str, int] = {}
        # OrderedDicts, not dicts: dropping the oldest of a dict with ``next(iter(...))``
        # walks over every slot deleted before it, 3 us a time during an import.
        self._recent_ops: OrderedDict[str, None] = OrderedDict()
        #: Items whose index rows wait for a later commit (ordered; see _index_slice).
        self._index_backlog: dict[str, None] = {}
        #: Views of the backlog's next items, resolved during a commit (_prefetch_views).
        self._prefetched: dict[str, ItemView] = {}
        #: Live views of recently used items, the oldest first (see ``_live_view``).
        self._recent_views: OrderedDict[str, ItemView] = OrderedDict()
        #: By shard, items some field of which holds writes of several stations, with
        #: how many slots each had when its view was last resolved or written here
        #: (``_recheck_concurrent``).
        self._concurrent: dict[int, dict[str, int]] = {}
        self._marker_subscriptions: list[Any] = []
        self._ledger_indexed: dict[tuple[str, str], int] = {}
        #: Whether the outbox is bound to a cloud database (``cloud_use_target``). Until
        #: it is, commits mark nothing: binding marks every item anyway, and each mark
        #: was a page written per checkout for a bridge that may never come.
        self._cloud_bound = False
        self._origin = _LOADING
        self._changed_docs: set[str] = set()
        self._integrated: list[bytes] = []
        self._subscribers: list[Callable[[CommittedUpdate], None]] = []
        self._skewed: dict[str, SkewedStation] = {}
        self._skew_logged: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._batch = _Batch(self._loop.create_future())
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: Checkpointer | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        station_id: str,
        shard_count: int = DEFAULT_SHARDS,
        max_clock_skew: float = 300.0,
        wall_clock: Callable[[], float] = time.time,
        compact_after: int = 1000,
    ) -> AsyncIterator[Store]:
        """Open (creating if needed) the store at ``path`` and close it on exit."""
        store = await cls.connect(
            path,
            station_id=station_id,
            shard_count=shard_count,
            max_clock_skew=max_clock_skew,
            wall_clock=wall_clock,
            compact_after=compact_after,
        )
        try:
            yield store
        finally:
            await store.close()

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        station_id: str,
        shard_count: int = DEFAULT_SHARDS,
        max_clock_skew: float = 300.0,
        wall_clock: Callable[[], float] = time.time,
        compact_after: int = 1000,
    ) -> Store:
        """Open the store; the caller must ``await store.close()``."""
        check_station_id(station_id)
        check_sqlite()
        if not 1 <= shard_count <= MAX_SHARDS:
            raise InvalidInput("shard count", shard_count, f"must be 1-{MAX_SHARDS}")
        db_path = Path(path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 ourselves: SQLite would use the umask, and the WAL and SHM
        # files copy the main file's permissions.
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
        db = await aiosqlite.connect(db_path, isolation_level=None)
        try:
            # Refuse a newer or foreign database before anything (even the journal mode)
            # is written to it.
            await check_openable(db, str(db_path))
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA busy_timeout = 5000")
            await tune_writer(db)
            await migrate(db, str(db_path))
            meta = await _read_meta(db)
            client_id, last_hlc = await _claim_identity(
                db, str(db_path), meta, station_id, shard_count
            )
            reader = await aiosqlite.connect(f"file:{db_path}?mode=ro", uri=True)
            # timeout=0: a lookup that finds the database locked (WAL recovery after a
            # crash) must not block the event loop; ``find`` then asks the reader thread.
            lookup = sqlite3.connect(
                f"file:{db_path}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=0,
            )
        except BaseException:
            await db.close()
            raise
        clock = HybridClock(last_hlc, max_skew_ms=int(max_clock_skew * 1000))
        store = cls(
            db_path,
            db,
            reader,
            lookup,
            station_id=station_id,
            shard_count=shard_count,
            client_id=client_id,
            clock=clock,
            wall_clock=wall_clock,
            compact_after=compact_after,
        )
        try:
            store._cloud_bound = await cloud.state(db, "target") is not None
            await store._load()
            await store._ensure_index(meta)
            await store._fill_concurrent_items(await _read_meta(db))
            store._checkpointer = await Checkpointer.open(db_path)
        except BaseException:
            store._lookup.close()
            await reader.close()
            await db.close()
            raise
        store._origin = LOCAL
        store._writer = asyncio.create_task(store._run_writer(), name="store: writer")
        return store

    async def close(self) -> None:
        """Commit what is pending, mark a clean shutdown and close. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._wakeup.set()
        try:
            # Inside the try: if the writer was cancelled (asyncio.run cancels every task
            # left on its way out), awaiting it re-raises CancelledError, and the SQLite
            # connections must still be closed or their threads keep the process alive.
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    await self._writer
            if self._failure is None:
                nonce = secrets.token_hex(8)
                await self._db.execute("BEGIN IMMEDIATE")
                await _set_meta(self._db, {"hlc": self._clock.last, "clean_shutdown": nonce})
                await self._db.commit()
                await asyncio.to_thread(_write_marker, _marker_path(self.path), nonce)
        finally:
            self._closed = True
            self._lookup.close()
            try:
                if self._checkpointer is not None:
                    await self._checkpointer.close()
            finally:
                try:
                    await self._reader.close()
                finally:
                    await self._db.close()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise StoreClosed(f"store stopped after a failed commit: {self._failure}")
        if self._closing or self._closed:
            raise StoreClosed("store is closed")

    # ------------------------------------------------------------------ loading

    async def _load(self) -> None:
        names = set(fixed_doc_names(self.shard_count))
        async with self._db.execute(
            "SELECT doc FROM snapshots UNION SELECT doc FROM updates"
        ) as cur:
            names.update(row[0] for row in await cur.fetchall())
        for name in sorted(names):
            self._new_doc(name, observe=False)
        async with self._db.execute("SELECT doc, state, upto_seq FROM snapshots") as cur:
            async for name, state, upto in cur:
                self._docs[name].apply_update(state)
                self._next_seq[name] = int(upto) + 1
                self._snapshot_bytes[name] = len(state)
        # In write order, which is each document's seq order (rows are only appended,
        # and migration 006 copied them in (doc, seq) order): a scan of the table,
        # not a walk of the (doc, seq) index with a lookup per row.
        async with self._db.execute("SELECT doc, seq, data FROM updates ORDER BY rowid") as cur:
            async for name, seq, data in cur:
                self._docs[name].apply_update(data)
                self._next_seq[name] = max(self._next_seq[name], int(seq) + 1)
                self._log_length[name] += 1
                self._log_bytes[name] += len(data)
        for name, doc in self._docs.items():
            self._watch(name, doc)
            if name.startswith("items/"):
                shard = int(name.split("/")[1])
                for root in documents.root_names(doc):
                    if is_item_id(root):
                        self._known_items[root] = shard
        async with self._db.execute("SELECT doc, station, count FROM ledger_progress") as cur:
            async for name, station, count in cur:
                self._ledger_indexed[(name, station)] = int(count)
        async with self._db.execute("SELECT item_id FROM index_pending") as cur:
            async for (item_id,) in cur:
                self._index_backlog[item_id] = None
        async with self._db.execute("SELECT item_id FROM concurrent_items") as cur:
            concurrent = [item_id for (item_id,) in await cur.fetchall()]
        # Counted from the documents: the index rows of these items match them (or the
        # items are in the backlog, resolved again anyway).
        self._hold_concurrent(item_id for item_id in concurrent if item_id in self._known_items)

    def _new_doc(self, name: str, *, observe: bool = True) -> Doc[Any]:
        doc: Doc[Any] = Doc(client_id=self.client_id)
        self._docs[name] = doc
        self._next_seq[name] = 1
        self._log_length[name] = 0
        self._log_bytes[name] = 0
        self._snapshot_bytes[name] = 0
        if observe:
            self._watch(name, doc)
        return doc

    def _forget_doc(self, name: str) -> None:
        """Undo ``_new_doc`` for a document nothing was written to."""
        for table in (
            self._docs,
            self._next_seq,
            self._log_length,
            self._log_bytes,
            self._snapshot_bytes,
        ):
            del table[name]

    def _watch(self, name: str, doc: Doc[Any]) -> None:
        doc.observe(partial(self._on_doc_update, name))
        if name.startswith("items/"):
            # Observed on the Yrs map itself: pycrdt's ``observe`` builds a Python event
            # for every transaction, local ones included, a tenth of a checkout's CPU.
            # Local writes are noted by their writer instead (``_keep_view``).
            markers = documents.changes_map(doc)
            callback = partial(self._on_item_markers, int(name.split("/")[1]), doc)
            self._marker_subscriptions.append(markers.integrated.observe(callback))

    async def _fill_concurrent_items(self, meta: Mapping[str, str]) -> None:
        """Find the items with concurrent writes once, after migration 008: every item is
        resolved (3.5 s at 100k items, see store.md) but only that list is written."""
        if meta.get("concurrent_items") != "unfilled":
            return
        items = list(self._known_items)
        found: list[tuple[str]] = []
        for start in range(0, len(items), INDEX_SLICE):
            views = self._compute_views(items[start : start + INDEX_SLICE]).values()
            found += [(view.id,) for view in views if view.concurrent]
        await _transaction(
            self._db,
            [
                ("DELETE FROM concurrent_items", [()]),
                *index.bulk("INSERT INTO concurrent_items (item_id) VALUES {rows}", found),
                (
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("concurrent_items", "filled")],
                ),
            ],
        )

    async def _ensure_index(self, meta: Mapping[str, str]) -> None:
        """Rebuild the query index when its layout changed or rows are missing."""
        stored_version = int(meta.get("index_version", "0"))
        if stored_version == INDEX_VERSION and (
            self._index_backlog or await index.item_count(self._db) == len(self._known_items)
        ):
            if self._index_backlog:
                self._wakeup.set()
            return
        if self._known_items:
            _LOGGER.warning("rebuilding the query index of %s from the documents", self.path)
        views = [self._compute_view(item_id) for item_id in self._known_items]
        movements: list[Movement] = []
        progress: dict[tuple[str, str], int] = {}
        for name, doc in self._docs.items():
            if name.startswith("ledger/"):
                for station in documents.ledger_stations(doc):
                    entries = documents.ledger_tail(doc, station, 0)
                    decoded = (movement_from_raw(station, raw) for raw in entries)
                    movements += [m for m in decoded if m]
                    progress[(name, station)] = len(entries)
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await index.clear(self._db)
            await self._db.execute("DELETE FROM index_pending")
            # The index was just emptied: every row is new (no update or upsert probes).
            await index.write_views(
                self._db,
                views,
                added={view.id for view in views},
                cloud_marks=self._cloud_bound,
            )
            await index.write_movements(self._db, movements)
            await self._db.executemany(
                "INSERT INTO ledger_progress (doc, station, count) VALUES (?, ?, ?)",
                [(doc, station, count) for (doc, station), count in progress.items()],
            )
            await _set_meta(
                self._db, {"index_version": INDEX_VERSION, "concurrent_items": "filled"}
            )
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        self._ledger_indexed = progress
        self._index_backlog.clear()

    # ------------------------------------------------------------------ observers

    def _on_doc_update(self, name: str, event: TransactionEvent) -> None:
        self._changed_docs.add(name)
        if self._origin == LOCAL:
            self._batch.updates.append(CommittedUpdate(name, event.update, LOCAL))
        elif self._origin != _LOADING:
            # What was integrated, which includes updates pycrdt held back until the one
            # they depend on arrived: storing the received bytes alone would lose those.
            self._integrated.append(event.update)

    def _on_item_markers(self, shard: int, doc: Doc[Any], event: Any) -> None:
        """Change markers of a merged update: which items it touched (``event`` is the
        raw Yrs map event)."""
        if self._origin == LOCAL:
            return
        try:
            self._note_markers(shard, event.keys)
        except Exception as exc:
            # As pycrdt's own observers do: the transaction raises it when it ends.
            doc._exceptions.append(exc)

    def _note_markers(self, shard: int, changed: dict[str, dict[str, Any]]) -> None:
        """Every marked item is noted as changed before any clock is looked at: the
        update is merged already, so no bad marker value may leave a view kept."""
        clocks: list[tuple[str, int | float]] = []
        for key, change in changed.items():
            parts = split_slot_key(key)
            if parts is None or not is_item_id(parts[0]):
                continue
            item_id, station = parts
            self._note_changed(item_id)
            self._known_items[item_id] = shard
            new_value = change.get("newValue")
            if isinstance(new_value, int | float) and station != self.station_id:
                clocks.append((station, new_value))
        if self._origin == _LOADING:
            return
        for station, clock in clocks:
            if not isinstance(clock, bool) and math.isfinite(clock):
                self._observe_remote_clock(station, int(clock))

    def _note_changed(self, item_id: str) -> None:
        """A peer's change to the item was merged: index it again, forget its views."""
        self._batch.touched.add(item_id)
        self._batch.views.pop(item_id, None)
        self._prefetched.pop(item_id, None)
        self._recent_views.pop(item_id, None)

    def _recheck_concurrent(self, shard: int) -> None:
        """Note the items of a shard that a merge changed without their change marker.

        An edit deletes the slots of the field its station has seen. A station that
        relays the edit before it has one of those slots holds that delete back (Yjs
        keeps it pending) and leaves it out of what it sends on, so the delete may reach
        us later on its own, from another peer, with no marker. Such a delete meets a
        field that holds the editor's slot, or a later one, as well (they came with the
        relayed edit): only items with writes of several stations to one field change
        this way, and they lose a slot. So after every merge into a shard, the slots of
        those few items are counted (no values are read) against the count their view
        was resolved from.
        """
        held = self._concurrent.get(shard)
        if not held:
            return
        counts = documents.slot_counts(self._docs[item_doc(shard)], held)
        for item_id, count in counts.items():
            if count != held[item_id]:
                self._note_changed(item_id)

    def _track_concurrent(self, view: ItemView, slots: int | None = None) -> None:
        """Count the slots of an item with concurrent writes whose view was just
        resolved (from ``slots`` of them) or kept after a local write, for
        ``_recheck_concurrent``; forget an item that has no concurrent writes now."""
        if not view.concurrent:
            if self._concurrent:  # else the common case: nothing to forget
                shard = shard_of(view.id, self.shard_count)
                held = self._concurrent.get(shard)
                if held is not None and held.pop(view.id, None) is not None and not held:
                    del self._concurrent[shard]
            return
        if slots is None:
            self._hold_concurrent([view.id])
        else:
            self._concurrent.setdefault(shard_of(view.id, self.shard_count), {})[view.id] = slots

    def _hold_concurrent(self, item_ids: Iterable[str]) -> None:
        """Track items with concurrent writes, counting their slots in the documents."""
        by_shard: dict[int, list[str]] = {}
        for item_id in item_ids:
            by_shard.setdefault(shard_of(item_id, self.shard_count), []).append(item_id)
        for shard, ids in by_shard.items():
            counts = documents.slot_counts(self._docs[item_doc(shard)], ids)
            self._concurrent.setdefault(shard, {}).update(counts)

    def _observe_remote_clock(self, station: str, remote_hlc: int) -> None:
        now = self._now_ms()
        skew = self._clock.observe(remote_hlc, now)
        if skew is None:
            return
        self._skewed[station] = SkewedStation(station, skew.ahead_ms, now)
        if now - self._skew_logged.get(station, -_SKEW_LOG_INTERVAL_MS) >= _SKEW_LOG_INTERVAL_MS:
            self._skew_logged[station] = now
            _LOGGER.warning(
                "station %s clock is %.1f min ahead of ours; its writes are merged but do not "
                "move our clock",
                station,
                skew.ahead_ms / 60_000,
            )

    # ------------------------------------------------------------------ helpers

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _tick(self) -> int:
        return self._clock.tick(self._now_ms())

    def _doc(self, name: str) -> Doc[Any]:
        doc = self._docs.get(name)
        if doc is None:
            doc = self._new_doc(name)
        return doc

    def _item_doc(self, item_id: str) -> Doc[Any]:
        return self._docs[item_doc(shard_of(item_id, self.shard_count))]

    def _raw_item(self, item_id: str) -> dict[str, Any]:
        doc = self._item_doc(item_id)
        return documents.read_items(doc, [item_id])[item_id]

    def _compute_view(self, item_id: str) -> ItemView:
        raw = self._raw_item(item_id)
        view = item_view(item_id, raw)
        self._track_concurrent(view, len(raw))
        return view

    def _compute_views(self, item_ids: Iterable[str]) -> dict[str, ItemView]:
        """Views of many items, read with one transaction per shard document (a catch-up
        resolves thousands; one read transaction each was a tenth of that work)."""
        by_shard: dict[int, list[str]] = {}
        for item_id in item_ids:
            by_shard.setdefault(shard_of(item_id, self.shard_count), []).append(item_id)
        views: dict[str, ItemView] = {}
        for shard, ids in by_shard.items():
            raw = documents.read_items(self._docs[item_doc(shard)], ids)
            for item_id in ids:
                slots = raw[item_id]
                view = views[item_id] = item_view(item_id, slots)
                self._track_concurrent(view, len(slots))
        return views

    def _live_view(self, item_id: str) -> ItemView:
        """The current view of an item from memory (includes not-yet-committed writes).

        The views of the last ``RECENT_VIEWS`` items used are kept: a station scans the
        same cables and speakers all day, and resolving an item's slots was a third of a
        checkout's CPU time. A kept view is replaced by every local write
        (``_keep_view``) and dropped when a peer's change to the item is merged
        (``_note_markers``).
        """
        view = self._recent_views.get(item_id)
        if view is None:
            if item_id not in self._known_items:
                raise ItemNotFound(item_id)
            view = self._compute_view(item_id)
            self._remember_view(view)
        else:
            self._recent_views.move_to_end(item_id)
        if view.deleted:
            raise ItemNotFound(item_id)
        return view

    def _remember_view(self, view: ItemView) -> None:
        recent = self._recent_views
        recent[view.id] = view
        recent.move_to_end(view.id)
        if len(recent) > RECENT_VIEWS:
            recent.popitem(last=False)

    def _write_item(self, item_id: str, hlc: int, *, registers: Mapping[str, object]) -> None:
        """One local transaction on an item: register writes and the change marker."""
        self._recent_views.pop(item_id, None)
        doc = self._item_doc(item_id)
        with doc.transaction(origin=LOCAL):
            item = documents.item_map(doc, item_id)
            for name, value in registers.items():
                documents.write_register(item, self.station_id, name, value, hlc)
            documents.mark_changed(doc, item_id, self.station_id, hlc)

    def _movement(
        self,
        view: ItemView,
        *,
        op: str,
        hlc: int,
        operator: str,
        qty: int = 0,
        sheet: str | None = None,
        op_id: str | None = None,
    ) -> Movement:
        return Movement(
            id=op_id or new_uuid7(physical_ms(hlc)),
            hlc=hlc,
            station=self.station_id,
            operator=operator,
            item=view.id,
            barcode=view.barcode,
            op=op,
            qty=qty,
            sheet=sheet,
        )

    def _append_movements(self, movements: Sequence[Movement]) -> None:
        """Record movements of this station; they join the ledger as the batch commits
        (``_write_ledger``)."""
        self._batch.movements.extend(movements)
        self._batch.to_ledger.extend(movements)
        for movement in movements:
            self._recent_ops[movement.id] = None
        while len(self._recent_ops) > _RECENT_OPS:
            self._recent_ops.popitem(last=False)

    async def _replayed(self, op_id: str | None, item_id: str) -> ItemView | None:
        """The result of an operation already applied under ``op_id``, else ``None``.

        Clients that lost the answer (the daemon was killed mid-request) retry with the
        same id; the retry must not count the units twice. When this returns ``None`` the
        caller must apply the operation without awaiting in between.
        """
        if op_id is None:
            return None
        if not _OP_ID_RE.match(op_id):
            raise InvalidInput("op_id", op_id, "expected a UUID chosen by the client")
        known = op_id in self._recent_ops or await index.movement_exists(self._reader, op_id)
        if not known and op_id not in self._recent_ops:
            return None
        await self._commit()
        view = self._compute_view(item_id)
        return view

    def _write_stock(self, view: ItemView, delta: int, hlc: int) -> ItemView:
        """A stock change of a bulk item, and its view after it.

        The new view is the old one with this station's counter moved: reading the item
        back and resolving every field again was a third of a checkout's CPU time.
        ``view`` must be the current view from memory (taken without awaiting since).
        """
        station = self.station_id
        own = view.stock_by_station.get(station, 0)
        doc = self._item_doc(view.id)
        with doc.transaction(origin=LOCAL):
            documents.set_own_stock(doc, view.id, station, own + delta, hlc)
        settled = dataclasses.replace(
            view,
            stock=view.stock + delta,
            stock_by_station={**view.stock_by_station, station: own + delta},
            stock_hlcs={**view.stock_hlcs, station: hlc},
            hlc=max(view.hlc, hlc),
        )
        self._keep_view(settled)
        return settled

    def _settled_view(self, item_id: str) -> ItemView:
        """Compute the view after a local write and keep it for the coming commit."""
        view = self._compute_view(item_id)
        self._keep_view(view)
        return view

    def _keep_view(self, view: ItemView) -> None:
        """The view of an item after a local write, for the coming commit to index.

        Every local write to an item ends here: the change-marker observer skips local
        transactions, so this is also where a view resolved ahead goes stale.
        """
        self._batch.touched.add(view.id)
        self._batch.views[view.id] = view
        self._prefetched.pop(view.id, None)
        self._remember_view(view)
        self._track_concurrent(view)

    async def _commit(self) -> None:
        """Wait until everything done so far is durably stored."""
        batch = self._batch
        self._wakeup.set()
        await asyncio.shield(batch.done)

    # ------------------------------------------------------------------ operations

    async def add_item(self, new: NewItem, *, operator: str = "") -> ItemView:
        """Add one item; returns once it is durably stored."""
        self._check_open()
        (view,) = self._add_items([new], _check_operator(operator))
        await self._commit()
        return view

    async def import_items(self, rows: Sequence[NewItem], *, operator: str = "") -> list[ItemView]:
        """Add many items in one commit. All rows are validated first: all or nothing."""
        self._check_open()
        views = self._add_items(rows, _check_operator(operator))
        await self._commit()
        return views

    def _add_items(self, rows: Sequence[NewItem], operator: str) -> list[ItemView]:
        """New items, one transaction per shard and one ledger append for all of them.

        An import of 100k items would otherwise make 200k transactions and as many log
        rows; the views are computed from the values written, not read back.
        """
        checked = [check_new_item(row) for row in rows]
        station = self.station_id
        by_shard: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        views: list[ItemView] = []
        movements: list[Movement] = []
        for new in checked:
            hlc = self._tick()
            item_id = new_uuid7(physical_ms(hlc))
            registers: dict[str, object] = {
                "barcode": new.barcode,
                "name": new.name,
                "kind": new.kind,
                "location": new.location,
                "category": new.category,
                "notes": new.notes,
            }
            # A field at its default gets no slot: the view shows the default for a field
            # nobody wrote. Each slot is a Yjs entry on every station (memory, bytes on the
            # wire, import time), and most items leave notes, kind and more at default.
            written = {
                k: v
                for k, v in registers.items()
                if k in ("barcode", "name") or v != FIELD_DEFAULTS[k]
            }
            raw: dict[str, Any] = {slot_key(k, station): [v, hlc] for k, v in written.items()}
            stock = new.qty if new.kind == "bulk" else 0
            if stock:
                raw[slot_key(STOCK_FIELD, station)] = [stock, hlc]
            by_shard.setdefault(shard_of(item_id, self.shard_count), []).append((item_id, raw))
            view = added_item_view(item_id, station, hlc, written, stock)
            views.append(view)
            movements.append(
                self._movement(view, op="add", hlc=hlc, operator=operator, qty=view.stock)
            )
        for shard, group in by_shard.items():
            doc = self._docs[item_doc(shard)]
            with doc.transaction(origin=LOCAL):
                documents.add_items(doc, group, station)
            for item_id, _ in group:
                self._known_items[item_id] = shard
        for view in views:
            self._keep_view(view)
            self._batch.added.add(view.id)
        self._append_movements(movements)
        return views

    async def edit_item(
        self, item_id: str, changes: Mapping[str, object], *, operator: str = ""
    ) -> ItemView:
        """Set descriptive fields (barcode, name, location, category, notes, status)."""
        self._check_open()
        operator = _check_operator(operator)
        view = self._live_view(item_id)
        if not changes:
            raise InvalidInput("changes", {}, "nothing to change")
        registers: dict[str, object] = {}
        for name, value in changes.items():
            if name not in EDITABLE_FIELDS:
                raise InvalidInput(
                    "field", name, f"editable fields are {', '.join(EDITABLE_FIELDS)}"
                )
            registers[name] = check_field(name, value)
        if "status" in registers:
            if view.kind != "serial":
                raise WrongState(view.barcode, "only serialized units have a status")
            if registers["status"] == "out":
                raise InvalidInput("status", "out", "use checkout to send a unit out")
            if view.sheet is not None:
                registers["sheet"] = None
        hlc = self._tick()
        self._write_item(item_id, hlc, registers=registers)
        view = self._settled_view(item_id)
        self._append_movements([self._movement(view, op="edit", hlc=hlc, operator=operator)])
        await self._commit()
        return view

    async def delete_item(self, item_id: str, *, operator: str = "") -> ItemView:
        """Mark an item deleted (a register, so later offline edits do not resurrect it)."""
        self._check_open()
        operator = _check_operator(operator)
        self._live_view(item_id)
        hlc = self._tick()
        self._write_item(item_id, hlc, registers={"deleted": True})
        view = self._settled_view(item_id)
        self._append_movements([self._movement(view, op="delete", hlc=hlc, operator=operator)])
        await self._commit()
        return view

    async def checkout(
        self,
        item_id: str,
        qty: int = 1,
        *,
        sheet: str | None = None,
        operator: str = "",
        op_id: str | None = None,
    ) -> ItemView:
        """Send units out, optionally onto a pull sheet (``op_id``: see ``_replayed``)."""
        return await self._move_units(item_id, qty, sheet, operator, op_id, out=True)

    async def return_units(
        self,
        item_id: str,
        qty: int = 1,
        *,
        sheet: str | None = None,
        operator: str = "",
        op_id: str | None = None,
    ) -> ItemView:
        """Bring units back in (a serialized unit also leaves its sheet)."""
        return await self._move_units(item_id, qty, sheet, operator, op_id, out=False)

    async def _move_units(
        self,
        item_id: str,
        qty: int,
        sheet: str | None,
        operator: str,
        op_id: str | None,
        *,
        out: bool,
    ) -> ItemView:
        """A checkout (``out``) or a return: the same steps, mirrored."""
        self._check_open()
        operator = _check_operator(operator)
        qty = check_qty(qty)
        sheet_name = check_field("sheet", sheet) if sheet is not None else None
        assert sheet_name is None or isinstance(sheet_name, str)
        if (done := await self._replayed(op_id, item_id)) is not None:
            return done
        view = self._live_view(item_id)
        hlc = self._tick()
        if view.kind == "serial":
            if qty != 1:
                verb = "checked out" if out else "returned"
                raise InvalidInput("qty", qty, f"a serialized unit is {verb} one at a time")
            if out and view.status != "in":
                where = f" on sheet {view.sheet}" if view.sheet else ""
                raise WrongState(view.barcode, f"unit is {view.status}{where}, not in")
            if not out and view.status == "in":
                raise WrongState(view.barcode, "unit is already in")
            if out:
                registers: dict[str, object] = {"status": "out", "sheet": sheet_name}
            else:
                sheet_name = sheet_name or view.sheet
                registers = {"status": "in", "sheet": None}
            self._write_item(item_id, hlc, registers=registers)
            view = self._settled_view(item_id)
        else:
            if out and qty > view.stock:
                raise InsufficientStock(view.barcode, qty, max(view.stock, 0))
            view = self._write_stock(view, -qty if out else qty, hlc)
        if sheet_name is not None:
            self._add_to_sheet(sheet_name, item_id, qty if out else -qty)
        movement = self._movement(
            view,
            op="checkout" if out else "return",
            hlc=hlc,
            operator=operator,
            qty=qty,
            sheet=sheet_name,
            op_id=op_id,
        )
        self._append_movements([movement])
        await self._commit()
        return view

    async def count(
        self, item_id: str, counted: int, *, operator: str = "", op_id: str | None = None
    ) -> ItemView:
        """Record a stock count: the difference from this station's view is added.

        For a serialized unit, 1 means "it is here" (status in) and 0 means lost.
        """
        self._check_open()
        operator = _check_operator(operator)
        counted = check_qty(counted, name="counted", minimum=0, maximum=MAX_STOCK)
        if (done := await self._replayed(op_id, item_id)) is not None:
            return done
        view = self._live_view(item_id)
        hlc = self._tick()
        if view.kind == "serial":
            if counted > 1:
                raise InvalidInput("counted", counted, "a serialized unit counts as 0 or 1")
            status = "in" if counted else "lost"
            delta = counted - view.stock
            if status != view.status:
                self._write_item(item_id, hlc, registers={"status": status, "sheet": None})
            view = self._settled_view(item_id)
        else:
            delta = counted - view.stock
            if delta:
                view = self._write_stock(view, delta, hlc)
        self._append_movements(
            [self._movement(view, op="count", hlc=hlc, operator=operator, qty=delta, op_id=op_id)]
        )
        await self._commit()
        return view

    async def resolve_conflict(
        self, item_id: str, field_name: str, value: object, *, operator: str = ""
    ) -> ItemView:
        """Pick the value of a conflicted field; the write supersedes every live slot."""
        self._check_open()
        operator = _check_operator(operator)
        if field_name not in REGISTER_FIELDS or field_name in ("kind", "deleted"):
            raise InvalidInput(
                "field", field_name, f"fields are {', '.join(EDITABLE_FIELDS)}, sheet"
            )
        view = self._live_view(item_id)
        conflicted = {conflict.field for conflict in view.conflicts}
        if view.double_booked:
            conflicted |= {"status", "sheet"}
        if field_name not in conflicted:
            raise NoConflict(view.barcode, field_name)
        checked = check_field(field_name, value)
        registers: dict[str, object] = {field_name: checked}
        if field_name == "sheet" and view.kind == "serial":
            # One status write supersedes the concurrent "out" slots too.
            registers["status"] = "out" if checked is not None else "in"
        if field_name == "status" and view.kind == "serial" and checked != "out":
            registers["sheet"] = None
        hlc = self._tick()
        self._write_item(item_id, hlc, registers=registers)
        view = self._settled_view(item_id)
        self._append_movements([self._movement(view, op="resolve", hlc=hlc, operator=operator)])
        await self._commit()
        return view

    def _add_to_sheet(self, sheet: str, item_id: str, delta: int) -> None:
        doc = self._doc(sheet_doc(sheet))
        with doc.transaction(origin=LOCAL):
            documents.add_to_sheet(doc, sheet, item_id, self.station_id, delta)

    async def set_station_name(self, name: str) -> None:
        """Publish this station's display name, and that it is alive now, in the fleet
        document (``fleet members`` shows both)."""
        self._check_open()
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise InvalidInput("station name", name, "use 1-64 characters")
        doc = self._docs[FLEET_DOC]
        entry = {"name": name.strip(), "hlc": self._tick(), "seen": self._now_ms()}
        with doc.transaction(origin=LOCAL):
            documents.set_fleet_entry(doc, documents.MEMBERS_ROOT, self.station_id, entry)
        await self._commit()

    async def record_fleet_entry(self, root: str, station: str, entry: dict[str, Any]) -> None:
        """Write another station's enrollment or revocation entry into the fleet doc (the
        daemon signs and checks them; the store only keeps and replicates them)."""
        self._check_open()
        if root not in (documents.ENROLLMENTS_ROOT, documents.REVOCATIONS_ROOT):
            raise InvalidInput("fleet entry", root, "enrollments or revocations")
        doc = self._docs[FLEET_DOC]
        with doc.transaction(origin=LOCAL):
            documents.set_fleet_entry(doc, root, check_station_id(station), dict(entry))
        await self._commit()

    # ------------------------------------------------------------------ queries

    async def find(self, key: str) -> list[ItemView]:
        """Live items with this barcode (several if the barcode is claimed twice), or by id.

        Answered on the calling thread from a read-only connection: one indexed read takes
        tens of microseconds, while a hand-off to the reader thread and back costs more
        than that in scheduling alone (lookup latency, and every scan goes through here).
        """
        self._check_open()
        try:
            if is_item_id(key):
                view = index.by_id_now(self._lookup, key)
                return [view] if view is not None and not view.deleted else []
            return index.by_barcode_now(self._lookup, check_barcode(key))
        except sqlite3.OperationalError:  # locked for a moment: the reader thread waits
            if is_item_id(key):
                found = await index.by_id(self._reader, key)
                return [found] if found is not None and not found.deleted else []
            return await index.by_barcode(self._reader, check_barcode(key))

    async def item_id(self, key: str) -> str:
        """The id of the one live item with this barcode (or this id): what a checkout
        needs before it resolves the item's live view itself, without decoding the
        indexed view on the way."""
        self._check_open()
        if not is_item_id(key):
            try:
                ids = index.ids_by_barcode_now(self._lookup, check_barcode(key))
            except sqlite3.OperationalError:
                ids = [view.id for view in await self.find(key)]
            if len(ids) > 1:
                raise AmbiguousBarcode(key, ids)
            if ids:
                return ids[0]
            raise ItemNotFound(key)
        return (await self.item(key)).id

    async def item(self, key: str) -> ItemView:
        """The one live item with this barcode or id."""
        found = await self.find(key)
        if not found:
            raise ItemNotFound(key)
        if len(found) > 1:
            raise AmbiguousBarcode(key, [view.id for view in found])
        return found[0]

    async def list_items(
        self,
        search: str | None = None,
        *,
        limit: int = 1000,
        offset: int = 0,
        include_deleted: bool = False,
    ) -> list[ItemView]:
        self._check_open()
        check_qty(limit, name="limit", minimum=1, maximum=MAX_STOCK)
        check_qty(offset, name="offset", minimum=0, maximum=2**31)
        return await index.search(
            self._reader, search, limit=limit, offset=offset, include_deleted=include_deleted
        )

    async def conflicts(self) -> list[ItemView]:
        """Live items with at least one field conflict."""
        self._check_open()
        return [view for view in await index.conflicted(self._reader) if not view.deleted]

    async def alerts(self) -> list[Alert]:
        """Oversold items, double-booked units and barcodes claimed by several items."""
        self._check_open()
        return await index.alerts(self._reader)

    async def history(self, key: str) -> list[Movement]:
        """Every movement of the item(s) with this barcode or id, merged across stations."""
        self._check_open()
        if is_item_id(key):
            view = await index.by_id(self._reader, key)
            barcode = view.barcode if view else key
            return await index.history(self._reader, [key], barcode)
        barcode = check_barcode(key)
        items = await index.by_barcode(self._reader, barcode)
        return await index.history(self._reader, [view.id for view in items], barcode)

    def sheet(self, sheet: str) -> dict[str, int]:
        """Units out per item id on a pull sheet."""
        self._check_open()
        name = check_field("sheet", sheet)
        assert isinstance(name, str)
        return documents.sheet_lines(self._doc(sheet_doc(name)), name)

    def fleet_members(self) -> dict[str, dict[str, Any]]:
        return self.fleet_entries(documents.MEMBERS_ROOT)

    def fleet_entries(self, root: str) -> dict[str, dict[str, Any]]:
        """One map of the fleet doc: ``members``, ``enrollments`` or ``revocations``."""
        self._check_open()
        return documents.fleet_entries(self._docs[FLEET_DOC], root)

    def clock_warnings(self) -> list[SkewedStation]:
        """Stations seen with clocks too far ahead (reported in status and logs)."""
        return sorted(self._skewed.values(), key=lambda s: s.station)

    @property
    def hlc(self) -> int:
        return self._clock.last

    async def attention_counts(self) -> tuple[int, int]:
        """(items with a conflict, alerts): the numbers ``conflicts`` and ``alerts`` would
        list, from the index alone."""
        self._check_open()
        return await index.attention_counts(self._reader)

    async def movement(self, movement_id: str) -> Movement | None:
        """One committed movement by id (an operation's ``op_id`` names its movement), so a
        client that retried an operation learns what the first attempt recorded."""
        self._check_open()
        return await index.movement(self._reader, movement_id)

    async def live_barcodes(self, barcodes: Sequence[str]) -> set[str]:
        """Which of these barcodes belong to a live item (one query, for imports)."""
        self._check_open()
        return await index.live_barcodes(self._reader, barcodes)

    async def count_items(self) -> int:
        """Live (not deleted) items, from the query index."""
        self._check_open()
        return await index.live_item_count(self._reader)

    def stats(self) -> dict[str, int]:
        return {
            "items": len(self._known_items),
            "documents": len(self._docs),
            "log_updates": sum(self._log_length.values()),
        }

    # ------------------------------------------------------------------ sync seam

    def doc_names(self) -> list[str]:
        return sorted(self._docs)

    def state_vector(self, doc_name: str) -> bytes:
        check_doc_name(doc_name, self.shard_count)
        doc = self._docs.get(doc_name)
        return doc.get_state() if doc is not None else b"\x00"

    def diff(self, doc_name: str, state_vector: bytes | None = None) -> bytes:
        """The update another replica with ``state_vector`` lacks (all if ``None``)."""
        check_doc_name(doc_name, self.shard_count)
        if self._batch.to_ledger:
            # An operation's item change is in memory already; its movement must travel
            # with it, or a peer could keep a stock change whose movement is lost if
            # this station stops before the commit.
            self._write_ledger(self._batch)
        doc = self._docs.get(doc_name)
        if doc is None:
            return Doc().get_update()
        try:
            return doc.get_update(state_vector)
        except ValueError as exc:
            raise CorruptUpdate(doc_name, f"bad state vector: {exc}") from exc

    async def apply_remote(self, doc_name: str, update: bytes, origin: str) -> bool:
        """Merge an update received from ``origin``; True if it changed anything.

        The update is decoded before it touches the document, so a corrupt or truncated
        one is refused with :class:`CorruptUpdate` and nothing changes. Returns after the
        update is durably stored; subscribers then see it with its origin.
        """
        return await self.merge_remote(doc_name, update, origin)

    def merge_remote(self, doc_name: str, update: bytes, origin: str) -> asyncio.Future[bool]:
        """Merge now, and return a future that resolves once the merge is durable.

        A peer session merges each update as it arrives and acknowledges it when its
        future resolves, so a burst of updates from one peer shares group commits instead
        of waiting for one fsync each. Errors in the update raise here, at once.
        """
        result: asyncio.Future[bool] = self._loop.create_future()
        if self._merge(doc_name, update, origin):
            batch = self._batch
            self._wakeup.set()
            batch.done.add_done_callback(partial(_relay_outcome, result))
        else:
            result.set_result(False)
        return result

    def _merge(self, doc_name: str, update: bytes, origin: str) -> bool:
        self._check_open()
        check_doc_name(doc_name, self.shard_count)
        if origin == LOCAL or not origin:
            raise InvalidInput("origin", origin, "remote updates need the peer's name")
        if len(update) > MAX_REMOTE_UPDATE:
            raise CorruptUpdate(doc_name, f"{len(update)} bytes is over the limit")
        # No separate decoding pass first: Yrs decodes the whole update before it
        # integrates any of it, so one that fails to decode changes nothing (a test holds
        # this), and a catch-up of 57 MB spent 8% of its time decoding twice.
        new = doc_name not in self._docs
        doc = self._doc(doc_name)
        self._changed_docs.discard(doc_name)
        self._integrated.clear()
        self._origin = origin
        try:
            with doc.transaction(origin=origin):
                doc.apply_update(update)
        except Exception as exc:
            if new:  # a refused update creates no document either
                self._forget_doc(doc_name)
            raise CorruptUpdate(doc_name, str(exc)) from exc
        finally:
            self._origin = LOCAL
        if doc_name not in self._changed_docs:
            return False
        if doc_name.startswith("items/"):
            self._recheck_concurrent(int(doc_name.split("/")[1]))
            # A merge can integrate slots held back from an earlier update without a
            # marker of their item in it (the marker came first): no kept view survives
            # a merge into item documents.
            self._recent_views.clear()
        for integrated in self._integrated:
            self._batch.updates.append(CommittedUpdate(doc_name, integrated, origin))
        self._integrated.clear()
        if doc_name.startswith("ledger/"):
            self._index_ledger(doc_name, doc)
        return True

    def _index_ledger(self, name: str, doc: Doc[Any]) -> None:
        for station in documents.ledger_stations(doc):
            key = (name, station)
            done = self._ledger_indexed.get(key, 0)
            entries = documents.ledger_tail(doc, station, done)
            if not entries:
                continue
            for raw in entries:
                movement = movement_from_raw(station, raw)
                if movement is not None:
                    self._batch.movements.append(movement)
                    self._observe_remote_clock(movement.station, movement.hlc)
            self._ledger_indexed[key] = done + len(entries)
            self._batch.ledger_progress[key] = done + len(entries)

    def subscribe(self, callback: Callable[[CommittedUpdate], None]) -> Callable[[], None]:
        """Call ``callback`` with every update once it is durably stored."""
        self._subscribers.append(callback)
        return partial(self._unsubscribe, callback)

    def _unsubscribe(self, callback: Callable[[CommittedUpdate], None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    async def compact(self, doc_names: Iterable[str] | None = None) -> None:
        """Fold the update log of these documents (default: all) into snapshots."""
        self._check_open()
        names = list(doc_names) if doc_names is not None else self.doc_names()
        for name in names:
            check_doc_name(name, self.shard_count)
            if name in self._docs:
                self._batch.compact.add(name)
                # One snapshot per commit keeps each event-loop stall to one document.
                await self._commit()

    # ------------------------------------------------------------------ cloud bridge seam
    # The outbox of the cloud bridge and the web edits it brings back (see cloud.py).

    async def cloud_dirty_items(self, limit: int = 300, *, after: str = "") -> list[DirtyItem]:
        """Items changed since their last confirmed push, with the mark to confirm by."""
        self._check_open()
        return await cloud.dirty_items(self._reader, limit, after)

    async def cloud_pending_movements(self, limit: int = 300) -> list[Movement]:
        """Movements not yet pushed (from every station), oldest first."""
        self._check_open()
        return await cloud.pending_movements(self._reader, limit)

    async def cloud_confirm(
        self, items: Iterable[tuple[str, int]], movements: Iterable[str] = ()
    ) -> None:
        """The cloud holds these ``(item id, mark)`` and movements: take them off the
        outbox. An item whose mark rose meanwhile (edited during the push) stays on it."""
        self._check_open()
        self._batch.cloud.extend(cloud.confirm_statements(items, movements))
        await self._commit()

    async def cloud_park(
        self, kind: ParkedKind, row_id: str, *, barcode: str, mark: int, error: str
    ) -> None:
        """Keep a row the cloud rejected for its data out of the push (see cloud.py)."""
        self._check_open()
        self._batch.cloud.extend(
            cloud.park_statements(
                kind, row_id, barcode=barcode, mark=mark, error=error, now_ms=self._now_ms()
            )
        )
        await self._commit()

    async def cloud_retry_parked(self) -> int:
        """Put every parked row back on the outbox; returns how many there were."""
        self._check_open()
        count = (await cloud.backlog(self._reader)).parked
        if count:
            self._batch.cloud.extend(cloud.retry_parked_statements())
            await self._commit()
        return count

    async def cloud_parked(self, limit: int = 1000) -> list[ParkedRow]:
        """Rows the cloud refused, oldest first, at most ``limit``."""
        self._check_open()
        return await cloud.parked(self._reader, limit)

    async def cloud_backlog(self) -> CloudBacklog:
        self._check_open()
        return await cloud.backlog(self._reader)

    async def cloud_cursor(self) -> str | None:
        """Where the last pull of web edits ended (``None``: never pulled)."""
        self._check_open()
        return await cloud.state(self._reader, "cursor")

    async def cloud_use_target(self, target: str) -> bool:
        """Bind the outbox to one cloud database and fleet (``target``, no secrets in it).

        For another target than before, every item and movement is to push again and the
        pull starts over. Returns whether that happened.
        """
        self._check_open()
        if await cloud.state(self._reader, "target") == target:
            return False
        self._cloud_from_scratch(target)
        await self._commit()
        return True

    def _cloud_from_scratch(self, target: str) -> None:
        """Queue for the coming commit: bind the outbox to ``target``, every item and
        movement to push again, and the pull from the start."""
        self._batch.cloud.extend(cloud.new_target_statements(target))
        self._cloud_bound = True

    async def cloud_use_database(self, database: str) -> bool:
        """Record the id the cloud database gave itself; for another id than the one
        recorded (the database was restored or replaced behind the same URL), start over
        as for a new target. The first id seen is only recorded. Returns whether the
        outbox started over."""
        self._check_open()
        known = await cloud.state(self._reader, "database")
        if known == database:
            return False
        if known is not None:
            self._cloud_from_scratch(await cloud.state(self._reader, "target") or "")
        self._batch.cloud.extend(cloud.state_statements({"database": database}))
        await self._commit()
        return known is not None

    async def cloud_start_over(self) -> None:
        """Everything to push again and the pull from the start (the cloud said the
        cursor no longer fits it); the target and database id stay."""
        self._check_open()
        target = await cloud.state(self._reader, "target") or ""
        database = await cloud.state(self._reader, "database")
        self._cloud_from_scratch(target)
        if database is not None:
            self._batch.cloud.extend(cloud.state_statements({"database": database}))
        await self._commit()

    async def apply_cloud_edits(
        self, edits: Sequence[CloudEdit], *, cursor: str | None = None
    ) -> list[ItemView]:
        """``apply_cloud_pull``, returning only the views of items that changed."""
        return (await self.apply_cloud_pull(edits, cursor=cursor)).views

    async def apply_cloud_pull(
        self, edits: Sequence[CloudEdit], *, cursor: str | None = None
    ) -> AppliedEdits:
        """Write web edits as writer ``cloud`` with the cloud's HLCs; returns the views of
        items that changed and the values refused. ``cursor`` is stored in the same
        commit, so a crash never skips an edit (one may be seen twice, and applying it
        again changes nothing).

        Each field is written only if no slot of it is as new as the edit by ``(hlc,
        writer)``: a later station edit wins, as it does in the cloud. A web ``stock`` is
        a count, added once per change (see ``cloud.web_count_writer``). A value the
        station's validation refuses is not written; the station's own value is written
        again with a fresh HLC instead, so the next push corrects the cloud row. Peers
        receive the writes by sync like any local operation.
        """
        self._check_open()
        views: list[ItemView] = []
        refused: list[RefusedValue] = []
        for edit in edits:
            view = self._apply_cloud_edit(edit, refused)
            if view is not None:
                views.append(view)
        if cursor is not None:
            self._batch.cloud.extend(cloud.state_statements({"cursor": cursor}))
        await self._commit()
        return AppliedEdits(views, refused)

    def _apply_cloud_edit(self, edit: CloudEdit, refused: list[RefusedValue]) -> ItemView | None:
        item_id = edit.item
        if not is_item_id(item_id):
            _LOGGER.warning("web edit of %r ignored: not an item id", item_id)
            return None
        registers: dict[str, tuple[object, int]] = {}
        counted: tuple[int, int] | None = None
        bad: dict[str, tuple[object, int, str]] = {}
        edit_hlc = 0
        for name, (value, hlc) in edit.fields.items():
            if isinstance(hlc, bool) or not isinstance(hlc, int) or not 0 < hlc < 2**53:
                _LOGGER.warning("web edit of %s.%s ignored: bad HLC %r", item_id, name, hlc)
                continue
            edit_hlc = max(edit_hlc, hlc)
            # Before the fresh HLC of a refused value is drawn: it must follow the edit.
            self._observe_remote_clock(cloud.CLOUD_WRITER, hlc)
            try:
                if name == STOCK_FIELD:
                    counted = (check_qty(value, name="stock", minimum=0, maximum=MAX_STOCK), hlc)
                else:
                    registers[name] = (check_field(name, value), hlc)
            except InvalidInput as exc:
                bad[name] = (value, hlc, exc.reason)
        known = item_id in self._known_items
        before = self._compute_view(item_id) if known else None
        if not registers and counted is None and (not bad or before is None):
            # Nothing to write on an item this station does not have: report it only.
            self._refused(refused, edit, before, bad)
            return None
        shard = shard_of(item_id, self.shard_count)
        doc = self._docs[item_doc(shard)]
        changed: list[int] = []
        delta = 0
        refreshed = 0
        self._recent_views.pop(item_id, None)
        with doc.transaction(origin=LOCAL):
            item = documents.item_map(doc, item_id)
            for name, (value, hlc) in registers.items():
                if documents.write_register_if_newer(item, cloud.CLOUD_WRITER, name, value, hlc):
                    changed.append(hlc)
            kind = registers.get("kind", (before.kind if before else "bulk", 0))[0]
            if counted is not None:
                qty, hlc = counted
                if kind == "serial":
                    status = "in" if qty else "lost"
                    if documents.write_register_if_newer(
                        item, cloud.CLOUD_WRITER, "status", status, hlc
                    ):
                        changed.append(hlc)
                else:
                    base = edit.stock_before
                    if base is None:
                        # An older change log without the cloud's stock before the
                        # edit: counted against this station's view instead.
                        base = before.stock if before else 0
                    # The same on every station (the movement says it too), unless the
                    # change log is an old one without the stock before.
                    delta = qty - base
                    # The change's own HLC is part of the key: a database restored from
                    # a backup numbers new changes again from where the backup was.
                    writer = cloud.web_count_writer(f"{edit.change_id}/{hlc}")
                    if documents.add_stock_once(item, writer, delta, hlc):
                        changed.append(hlc)
            if bad:
                refreshed = self._refresh_refused(item, item_id, before, kind, bad)
            if changed or refreshed:
                documents.mark_changed(doc, item_id, self.station_id, max([*changed, refreshed]))
        self._refused(refused, edit, before, bad)
        if not changed and not refreshed:
            return None
        self._known_items[item_id] = shard
        view = self._settled_view(item_id)
        if not changed:
            return view
        # Every station that pulls this edit records the same movement (id, clock and
        # quantity from the change alone, whichever of its fields each station took), so
        # the history shows it once.
        name = f"{item_id}/{edit.change_id}/{edit_hlc}"
        self._append_movements(
            [
                self._movement(
                    view,
                    op="count" if counted is not None else "edit",
                    hlc=edit_hlc,
                    operator="web",
                    qty=delta,
                    op_id=str(uuid.uuid5(_WEB_EDITS, name)),
                )
            ]
        )
        return view

    def _refresh_refused(
        self,
        item: Any,
        item_id: str,
        before: ItemView | None,
        kind: object,
        bad: Mapping[str, tuple[object, int, str]],
    ) -> int:
        """Write this station's value of each refused field again with a fresh HLC, where
        the refused edit would otherwise have been the newest write of the field (the
        cloud row shows it): the next push replaces it. Only this station's own slot is
        written, so a conflict stays as it was. Returns the HLC used, 0 if none."""
        view = before or item_view(item_id, {})
        fresh = 0
        for name, (value, hlc, _) in bad.items():
            if name == STOCK_FIELD:
                # The cloud takes a stock from a push whose version is greater: moving
                # this station's counter (or a unit's status) to a fresh HLC makes it so.
                field_name = "status" if kind == "serial" else STOCK_FIELD
            elif name in REGISTER_FIELDS:
                field_name = name
                if documents.has_slot_at_least(item, name, hlc, cloud.CLOUD_WRITER):
                    continue  # a newer write is in the row already, or will be
                if getattr(view, name) == value:
                    continue  # the cloud shows what the stations show
            else:
                continue  # not a field of the item: nothing in the row to correct
            fresh = fresh or self._tick()
            station = self.station_id
            if field_name == STOCK_FIELD:
                own = view.stock_by_station.get(station, 0)
                documents.add_stock(item, station, 0, own, fresh)
            else:
                item[slot_key(field_name, station)] = [getattr(view, field_name), fresh]
        return fresh

    def _refused(
        self,
        refused: list[RefusedValue],
        edit: CloudEdit,
        before: ItemView | None,
        bad: Mapping[str, tuple[object, int, str]],
    ) -> None:
        barcode = before.barcode if before else ""
        for name, (value, _, reason) in bad.items():
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            _LOGGER.warning(
                "web edit of %s (%s) refused: %s = %s: %s; the stations' value stays and "
                "is pushed back",
                barcode or "new item",
                edit.item,
                name,
                shown,
                reason,
            )
            refused.append(RefusedValue(edit.item, barcode, name, shown, reason, edit.change_id))

    # ------------------------------------------------------------------ writer

    def _write_ledger(self, batch: _Batch) -> None:
        """Append the batch's movements to this station's ledger array of each one's day,
        one transaction per day for the whole group commit.

        One transaction per operation made a ledger update per checkout: a log row, a
        frame to every peer and some 20 bytes of Yjs header each, and a third of the
        event loop's time for a checkout. Nothing reads the ledger documents before the
        commit: history and the cloud read the ``movements`` table, written with it.

        A transaction holds at most ``LEDGER_STEP`` movements, though: Yrs joins the
        entries appended in one transaction at its commit in time that grows with the
        square of their number (20 ms for 1,000, 75 ms for 2,000), which was a sixth of
        an import. A larger batch (an import) makes one update per step.
        """
        by_day: dict[str, list[Movement]] = {}
        for movement in batch.to_ledger:
            by_day.setdefault(ledger_doc(physical_ms(movement.hlc)), []).append(movement)
        batch.to_ledger = []
        for name, day in by_day.items():
            doc = self._doc(name)
            for start in range(0, len(day), LEDGER_STEP):
                with doc.transaction(origin=LOCAL):
                    documents.append_movements(
                        doc, self.station_id, day[start : start + LEDGER_STEP]
                    )
            key = (name, self.station_id)
            self._ledger_indexed[key] = self._ledger_indexed.get(key, 0) + len(day)
            batch.ledger_progress[key] = self._ledger_indexed[key]

    async def _run_writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = self._batch
            # An empty batch still resolves: its waiters only need what came before it.
            try:
                # Before the next batch opens: the ledger's updates belong to this one.
                self._write_ledger(batch)
                self._batch = _Batch(self._loop.create_future())
                wrote = not batch.is_empty() or bool(self._index_backlog)
                if wrote:
                    await self._write(batch)
            except BaseException as exc:
                self._failure = exc
                _LOGGER.critical("commit failed, the store stops: %s", exc)
                failure = StoreClosed(f"commit failed: {exc}")
                for pending in (batch, self._batch):
                    if not pending.done.done():
                        pending.done.set_exception(failure)
                        pending.done.exception()  # mark retrieved: waiters may be gone
                raise
            batch.done.set_result(None)
            if wrote and self._checkpointer is not None:
                self._checkpointer.committed()
            for update in batch.updates:
                for callback in list(self._subscribers):
                    try:
                        callback(update)
                    except Exception:
                        _LOGGER.exception("update subscriber failed")
            if self._closing and self._batch.is_empty():
                self._batch.done.set_result(None)
                return
            if not self._batch.is_empty() or (self._index_backlog and not self._closing):
                self._wakeup.set()

    def _index_slice(self, batch: _Batch) -> tuple[list[ItemView], list[str], list[str]]:
        """Views to write in this commit, items newly put off, and items caught up.

        Views of local operations are already computed. Items changed by peers are
        resolved here, at most ``INDEX_SLICE`` per commit (about 0.1 s of CPU); the rest
        join a durable backlog that the following commits work through.
        """
        views = [batch.views[item_id] for item_id in batch.touched if item_id in batch.views]
        backlog = self._index_backlog
        put_off = [item_id for item_id in batch.touched if item_id not in batch.views]
        for item_id in put_off:
            backlog[item_id] = None
        done = [view.id for view in views if view.id in backlog]
        for item_id in done:
            del backlog[item_id]
            self._prefetched.pop(item_id, None)
        room = max(0, INDEX_SLICE - len(views))
        taken = list(itertools.islice(backlog, room))
        for item_id in taken:
            del backlog[item_id]
        missing = [item_id for item_id in taken if item_id not in self._prefetched]
        views += [self._prefetched.pop(i) for i in taken if i in self._prefetched]
        views += self._compute_views(missing).values()
        caught_up = done + taken
        fresh = set(caught_up)
        return views, [i for i in put_off if i not in fresh], caught_up

    async def _write(self, batch: _Batch) -> None:
        # Everything read from memory is taken before the first await, so the index
        # and snapshots match exactly the updates in this commit.
        views, put_off, caught_up = self._index_slice(batch)
        rows = []
        for update in batch.updates:
            seq = self._next_seq[update.doc]
            self._next_seq[update.doc] = seq + 1
            self._log_length[update.doc] += 1
            self._log_bytes[update.doc] += len(update.update)
            rows.append((update.doc, seq, update.update))
        compact = set(batch.compact) or self._most_overdue()
        snapshots = [
            (
                name,
                self._docs[name].get_update(),
                self._docs[name].get_state(),
                self._next_seq[name] - 1,
            )
            for name in compact
        ]
        statements: list[index.Statement] = [
            *index.bulk("INSERT INTO updates (doc, seq, data) VALUES {rows}", rows),
            *index.bulk(
                "INSERT OR IGNORE INTO index_pending (item_id) VALUES {rows}",
                [(i,) for i in put_off],
            ),
            *index.bulk(
                "DELETE FROM index_pending WHERE item_id IN (VALUES {rows})",
                [(i,) for i in caught_up],
            ),
            # Before the views: a push confirmed in this commit must not drop the mark
            # that an edit in this same commit sets.
            *batch.cloud,
            *index.view_statements(views, batch.added, cloud_marks=self._cloud_bound),
            *index.movement_statements(batch.movements),
            (
                "INSERT OR REPLACE INTO ledger_progress (doc, station, count) VALUES (?, ?, ?)",
                [(doc, station, n) for (doc, station), n in batch.ledger_progress.items()],
            ),
            (
                "INSERT OR REPLACE INTO snapshots (doc, state, state_vector, upto_seq) "
                "VALUES (?, ?, ?, ?)",
                snapshots,
            ),
            (
                "DELETE FROM updates WHERE doc = ? AND seq <= ?",
                [(name, upto) for name, _, _, upto in snapshots],
            ),
            (
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("hlc", str(self._clock.last))],
            ),
        ]
        commit = asyncio.create_task(_transaction(self._db, statements), name="store: commit")
        try:
            await self._prefetch_views(commit)
        except Exception:
            # Optional work: the commit must not be reported failed because of it. The
            # next slice resolves these views itself (and raises then, before writing).
            _LOGGER.exception("resolving views ahead of the index failed")
            self._prefetched.clear()
        finally:
            await commit
        for name, state, *_ in snapshots:
            self._log_length[name] = 0
            self._log_bytes[name] = 0
            self._snapshot_bytes[name] = len(state)

    async def _prefetch_views(self, commit: asyncio.Future[None]) -> None:
        """Resolve the views of the backlog's next items while ``commit`` is written.

        The database thread runs a commit without holding the GIL (``index.bulk``), so
        items changed by peers are resolved meanwhile instead of after it: a new station
        catching up on 100k items spent half its time on each. Work stops at the first
        step after the commit is done, so the operations waiting for that commit wait at
        most one step longer (a few ms). A view resolved here is dropped when its item
        changes again (``_on_item_markers``).
        """
        prefetched = self._prefetched
        wanted = [
            item_id
            for item_id in itertools.islice(self._index_backlog, INDEX_SLICE)
            if item_id not in prefetched
        ]
        for start in range(0, len(wanted), _PREFETCH_STEP):
            await asyncio.sleep(0)  # the commit's turn first, then between steps
            if commit.done():
                return
            step = wanted[start : start + _PREFETCH_STEP]
            prefetched.update(
                self._compute_views(
                    i for i in step if i in self._index_backlog and i not in prefetched
                )
            )

    def _most_overdue(self) -> set[str]:
        """The one document most worth compacting in this commit, if any.

        A log is folded once it has ``compact_after`` updates *and* is an eighth the size
        of the snapshot (or ten times longer): rewriting a 10 MB ledger day every 1000
        checkouts would cost more than replaying its log. One document per commit keeps
        each event-loop stall to one snapshot.
        """
        due = [
            name
            for name, length in self._log_length.items()
            if length >= self._compact_after
            and (
                self._log_bytes[name] * 8 >= self._snapshot_bytes[name]
                or length >= 10 * self._compact_after
            )
        ]
        return {max(due, key=lambda name: self._log_bytes[name])} if due else set()


# ---------------------------------------------------------------------- module helpers


def _relay_outcome(result: asyncio.Future[bool], done: asyncio.Future[None]) -> None:
    if result.done():
        return
    if done.cancelled():
        result.cancel()
    elif (error := done.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(True)


def _run_transaction(conn: sqlite3.Connection, statements: Sequence[index.Statement]) -> None:
    """Run on aiosqlite's thread: every statement of one commit, then COMMIT."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            if params:
                conn.executemany(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


async def _transaction(db: aiosqlite.Connection, statements: Sequence[index.Statement]) -> None:
    """One hop to the database thread for a whole commit.

    Awaiting each statement separately cost about 12 thread hand-offs per checkout commit,
    which on a loaded 2-core machine took longer than the fsync. aiosqlite has no public
    way to run a function on its thread, so this uses ``_execute``/``_conn`` (stable since
    aiosqlite 0.17; the version is bounded in pyproject.toml).
    """
    await db._execute(_run_transaction, db._conn, statements)  # type: ignore[no-untyped-call]


#: The oldest SQLite the index writes run on (``UPDATE ... FROM``, 3.33.0, 2020).
MIN_SQLITE = (3, 33, 0)


def check_sqlite(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse to open a store on a SQLite too old for it, before anything is written:
    otherwise the first checkout's commit would fail and stop the store."""
    if version < MIN_SQLITE:
        raise SQLiteTooOld(".".join(map(str, version)), ".".join(map(str, MIN_SQLITE)))


def _check_operator(operator: str) -> str:
    if not isinstance(operator, str) or len(operator) > 64:
        raise InvalidInput("operator", operator, "use at most 64 characters")
    if any(ord(char) < 32 for char in operator):
        raise InvalidInput("operator", operator, "contains control characters")
    return operator.strip()


@dataclass(frozen=True, slots=True)
class CheckedItem(NewItem):
    """A :class:`NewItem` as :func:`check_new_item` returns it: valid and normalised.

    The daemon checks every row of an import to report the bad ones by line, and the
    store checks what it is given; an item already checked is not checked again (the
    second check was a twentieth of an import through the control API). Only
    ``check_new_item`` marks one as checked: a ``CheckedItem`` made by hand or by
    ``dataclasses.replace`` (which does not copy the mark) is checked like any other.
    """

    _checked: bool = field(default=False, init=False, repr=False, compare=False)


def check_new_item(new: NewItem) -> CheckedItem:
    """Validate a new item as entered; raises :class:`InvalidInput` naming the field."""
    if type(new) is CheckedItem and new._checked:
        return new
    kind = check_field("kind", new.kind)
    if kind == "serial" and new.qty not in (0, 1):
        raise InvalidInput("qty", new.qty, "a serialized unit is one unit")
    qty = check_qty(new.qty, name="qty", minimum=0, maximum=MAX_STOCK)
    checked = CheckedItem(
        barcode=check_barcode(new.barcode),
        name=str(check_field("name", new.name)),
        kind="serial" if kind == "serial" else "bulk",
        qty=qty,
        location=str(check_field("location", new.location)),
        category=str(check_field("category", new.category)),
        notes=str(check_field("notes", new.notes)),
    )
    object.__setattr__(checked, "_checked", True)
    return checked


async def _read_meta(db: aiosqlite.Connection) -> dict[str, str]:
    async with db.execute("SELECT key, value FROM meta") as cursor:
        return {str(key): str(value) for key, value in await cursor.fetchall()}


async def _set_meta(db: aiosqlite.Connection, values: Mapping[str, object]) -> None:
    await db.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [(key, str(value)) for key, value in values.items()],
    )


async def _claim_identity(
    db: aiosqlite.Connection,
    path: str,
    meta: Mapping[str, str],
    station_id: str,
    shard_count: int,
) -> tuple[int, int]:
    """Check the store belongs to this station and pick the Yjs client id for this run.

    The client id is reused only after a clean shutdown, when everything written under it
    is durably stored; after a crash a fresh random one avoids two histories sharing an id.
    """
    for setting, requested in (("station_id", station_id), ("shard_count", shard_count)):
        stored = meta.get(setting)
        if stored is not None and stored != str(requested):
            raise StoreMismatch(path, setting, stored, requested)
    # A clean shutdown leaves the same random nonce in the database and in a marker file
    # beside it. A database restored from an older copy carries an older nonce (or "0"
    # if copied while running), so it gets a fresh client id: the old one may have been
    # used since the copy was taken.
    marker = _marker_path(Path(path))
    nonce = await asyncio.to_thread(_read_marker, marker)
    clean = "client_id" in meta and nonce is not None and meta.get("clean_shutdown") == nonce
    client_id = int(meta["client_id"]) if clean else secrets.randbelow(2**53 - 2) + 1
    last_hlc = int(meta.get("hlc", "0"))
    await db.execute("BEGIN IMMEDIATE")
    await _set_meta(
        db,
        {
            "station_id": station_id,
            "shard_count": shard_count,
            "client_id": client_id,
            "clean_shutdown": 0,
        },
    )
    await db.commit()
    await asyncio.to_thread(_remove_marker, marker)
    return client_id, last_hlc


def _marker_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".clean")


def _read_marker(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_marker(path: Path, nonce: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, nonce.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_marker(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
