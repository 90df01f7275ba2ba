"""The store's side of the cloud bridge: the push outbox, parked rows and the pull cursor.

Once the outbox is bound to a cloud database (``Store.cloud_use_target``, which marks
every item), every commit that writes an item's query-index row also marks the item in
``cloud_dirty_items`` (see ``index.view_statements``); new movements wait with
``cloud_pushed = 0``. The bridge reads a batch of marked items with their views, pushes it,
and *confirms* it: a mark is removed only if it is still the one that was read, so an edit
that lands while a push is in flight is pushed again, never lost. Rows the cloud rejects
for their data are *parked* (kept out of the push, listed in status) until the item
changes again or a manual push retries them. ``cloud_state`` keeps which database the
marks refer to and the cursor of web edits already applied.

Web edits come back as :class:`CloudEdit` values and are written by the store as writer
:data:`CLOUD_WRITER` (``name@cloud = [value, server HLC]``); a web count of a bulk item
adds a counter slot of its own, ``stock@cloud:<change> = [difference, server HLC]``
(:func:`web_count_writer`). A value the station refuses is reported as a
:class:`RefusedValue`. ``cloud_state`` also keeps the id of the database the outbox was
pushed to, when the database says it.

Everything here is SQL text and values; the store runs the statements in its group commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiosqlite

from .index import RAISE_CLOUD_MARK, Statement, view_columns, view_of_row
from .model import ItemView, Movement

#: The writer name of web edits in an item's slots (``name@cloud``).
CLOUD_WRITER = "cloud"
#: Movement status in ``movements.cloud_pushed``.
PENDING, PUSHED, PARKED = 0, 1, 2

ParkedKind = Literal["item", "movement"]


@dataclass(frozen=True, slots=True)
class DirtyItem:
    """An item waiting to be pushed: its view, and the mark to confirm the push with."""

    view: ItemView
    mark: int


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A row the cloud rejected for its data; it waits until the item changes again."""

    kind: ParkedKind
    row_id: str
    barcode: str
    error: str
    parked_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.row_id,
            "barcode": self.barcode,
            "error": self.error,
            "parked_at_ms": self.parked_at_ms,
        }


@dataclass(frozen=True, slots=True)
class CloudBacklog:
    """What is still to push: marked items, new movements, and parked rows."""

    items: int
    movements: int
    parked: int

    def to_json(self) -> dict[str, int]:
        return {"items": self.items, "movements": self.movements, "parked": self.parked}


@dataclass(frozen=True, slots=True)
class CloudEdit:
    """One web edit pulled from the cloud: field values stamped with the server's HLC.

    ``fields`` maps a register field (or ``stock``) to ``(value, hlc)``; ``change_id``
    names the edit in the cloud's change log, so every station that applies it records
    the same movement. ``stock_before`` is the cloud's stock when the web user changed
    it: the count is applied as the difference, which is the same on every station that
    pulls the edit (a difference from each station's own view would not be).
    """

    item: str
    fields: Mapping[str, tuple[object, int]]
    change_id: str = ""
    stock_before: int | None = None


@dataclass(frozen=True, slots=True)
class RefusedValue:
    """A field of a web edit the station refused (its validation said no).

    The station writes its own value of the field again with a fresh HLC, so the next
    push puts it back in the cloud row and the table agrees with the stations again.
    """

    item: str
    barcode: str
    field: str
    value: str
    reason: str
    change_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "item": self.item,
            "barcode": self.barcode,
            "field": self.field,
            "value": self.value,
            "reason": self.reason,
            "change_id": self.change_id,
        }


@dataclass(frozen=True, slots=True)
class AppliedEdits:
    """What one batch of web edits did: items changed, values refused."""

    views: list[ItemView]
    refused: list[RefusedValue]


def web_count_writer(change_id: str) -> str:
    """The counter "station" of one web count: ``cloud:<change>``.

    One slot per change, written once with the same value by every station that applies
    it: a per-change key is what keeps a count from being lost or doubled when several
    bridges pull it at once (one shared ``stock@cloud`` slot, rewritten per count, could
    lose a concurrent rewrite, since Yjs settles a contested key by client id, not HLC).
    ``@`` would end the slot's field name, so it cannot appear in the change id.
    """
    return f"{CLOUD_WRITER}:{change_id.replace('@', '_')}"


# ---------------------------------------------------------------------- reads


async def dirty_items(db: aiosqlite.Connection, limit: int, after: str = "") -> list[DirtyItem]:
    """Marked items with ids after ``after``, in id order (the table's key: no sort)."""
    async with db.execute(
        f"SELECT d.hlc, {view_columns('i')} FROM cloud_dirty_items d "
        "JOIN items i ON i.id = d.item_id WHERE d.item_id > ? ORDER BY d.item_id LIMIT ?",
        (after, limit),
    ) as cursor:
        rows = await cursor.fetchall()
    return [DirtyItem(view_of_row(columns), int(mark)) for mark, *columns in rows]


async def pending_movements(db: aiosqlite.Connection, limit: int) -> list[Movement]:
    async with db.execute(
        "SELECT id, hlc, station, operator, item_id, barcode, op, qty, sheet FROM movements "
        "WHERE cloud_pushed = 0 ORDER BY hlc LIMIT ?",
        (limit,),
    ) as cursor:
        rows = await cursor.fetchall()
    return [Movement(*row) for row in rows]


async def backlog(db: aiosqlite.Connection) -> CloudBacklog:
    async with db.execute(
        "SELECT (SELECT count(*) FROM cloud_dirty_items), "
        "(SELECT count(*) FROM movements WHERE cloud_pushed = 0), "
        "(SELECT count(*) FROM cloud_parked)"
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return CloudBacklog(int(row[0]), int(row[1]), int(row[2]))


async def parked(db: aiosqlite.Connection, limit: int = 1000) -> list[ParkedRow]:
    async with db.execute(
        "SELECT kind, row_id, barcode, error, parked_at_ms FROM cloud_parked "
        "ORDER BY parked_at_ms, kind, row_id LIMIT ?",
        (limit,),
    ) as cursor:
        rows = await cursor.fetchall()
    return [
        ParkedRow("movement" if kind == "movement" else "item", row_id, barcode, error, int(at))
        for kind, row_id, barcode, error, at in rows
    ]


async def state(db: aiosqlite.Connection, key: str) -> str | None:
    async with db.execute("SELECT value FROM cloud_state WHERE key = ?", (key,)) as cursor:
        row = await cursor.fetchone()
    return str(row[0]) if row else None


# ---------------------------------------------------------------------- writes


def confirm_statements(
    pushed: Iterable[tuple[str, int]], movements: Iterable[str]
) -> list[Statement]:
    """A pushed batch is in the cloud: drop marks that were not raised meanwhile."""
    items = list(pushed)
    movement_ids = [(movement_id,) for movement_id in movements]
    return [
        ("DELETE FROM cloud_dirty_items WHERE item_id = ? AND hlc = ?", items),
        ("DELETE FROM cloud_parked WHERE kind = 'item' AND row_id = ?", [(i,) for i, _ in items]),
        (f"UPDATE movements SET cloud_pushed = {PUSHED} WHERE id = ?", movement_ids),
        ("DELETE FROM cloud_parked WHERE kind = 'movement' AND row_id = ?", movement_ids),
    ]


def park_statements(
    kind: ParkedKind, row_id: str, *, barcode: str, mark: int, error: str, now_ms: int
) -> list[Statement]:
    """Keep a rejected row out of the push (an item until it is marked again)."""
    if kind == "item":
        leave: Statement = (
            "DELETE FROM cloud_dirty_items WHERE item_id = ? AND hlc = ?",
            [(row_id, mark)],
        )
    else:
        leave = (f"UPDATE movements SET cloud_pushed = {PARKED} WHERE id = ?", [(row_id,)])
    return [
        leave,
        (
            "INSERT OR REPLACE INTO cloud_parked (kind, row_id, barcode, mark, error, "
            "parked_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
            [(kind, row_id, barcode, mark, error[:500], now_ms)],
        ),
    ]


def retry_parked_statements() -> list[Statement]:
    """Put every parked row back into the outbox (a manual push tries them again)."""
    return [
        (_mark_items("id IN (SELECT row_id FROM cloud_parked WHERE kind = 'item')"), [()]),
        (f"UPDATE movements SET cloud_pushed = {PENDING} WHERE cloud_pushed = {PARKED}", [()]),
        ("DELETE FROM cloud_parked", [()]),
    ]


def new_target_statements(target: str) -> list[Statement]:
    """Another database (or fleet) than before: everything is to push, nothing pulled.

    The database id is forgotten too: the first pull from the new target records it.
    """
    return [
        (_mark_items("true"), [()]),
        (f"UPDATE movements SET cloud_pushed = {PENDING}", [()]),
        ("DELETE FROM cloud_parked", [()]),
        ("DELETE FROM cloud_state WHERE key IN ('cursor', 'database')", [()]),
        *state_statements({"target": target}),
    ]


def state_statements(values: Mapping[str, str]) -> list[Statement]:
    return [
        (
            "INSERT OR REPLACE INTO cloud_state (key, value) VALUES (?, ?)",
            list(values.items()),
        )
    ]


def _mark_items(where: str) -> str:
    """Mark items of the query index for a push (raising a mark, as index.py does)."""
    return (
        f"INSERT INTO cloud_dirty_items (item_id, hlc) SELECT id, hlc FROM items WHERE {where} "
        + RAISE_CLOUD_MARK
    )
