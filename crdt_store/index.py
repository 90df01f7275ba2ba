"""The query index: SQLite tables derived from the documents.

Lookups by barcode, listings, conflicts, alerts and history read these tables and never
scan documents. The store writes them in the same transaction as the document updates
they derive from, so after any crash the index matches the log. Everything here can be
rebuilt from the documents (``INDEX_VERSION`` in ``schema``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from .model import ItemView, Movement


@dataclass(frozen=True, slots=True)
class Alert:
    """Something a warehouse lead must look at: oversold stock, a double-booked unit,
    or one barcode on several items."""

    kind: str
    barcode: str
    items: tuple[ItemView, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "barcode": self.barcode,
            "items": [item.to_json() for item in self.items],
        }


def _item_row(view: ItemView) -> tuple[Any, ...]:
    return (
        view.id,
        view.barcode,
        view.name,
        view.kind,
        view.stock,
        view.status,
        view.sheet,
        view.location,
        view.category,
        int(view.deleted),
        view.hlc,
        json.dumps(view.to_record(), separators=(",", ":")),
    )


#: One SQL statement and the parameter rows to run it with (``executemany``).
Statement = tuple[str, Sequence[Sequence[Any]]]

#: An item whose barcode, name and deleted flag are unchanged (every checkout, return and
#: count) is updated in place without touching the two indexes on those columns: SQLite
#: rewrites an index entry whenever its column is assigned, even to the same value, and
#: those entries were two thirds of the pages a checkout's commit wrote.
_UPDATE_UNINDEXED = (
    "UPDATE items SET kind = ?, stock = ?, status = ?, sheet = ?, location = ?, "
    "category = ?, hlc = ?, view = ? WHERE id = ? AND barcode = ? AND name = ? AND deleted = ?"
)
#: Everything else: new items, and items whose indexed columns changed (the ``WHERE``
#: leaves alone the rows the statement above just wrote).
_UPSERT_ITEM = (
    "INSERT INTO items (id, barcode, name, kind, stock, status, sheet, location, category, "
    "deleted, hlc, view) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
    "barcode = excluded.barcode, name = excluded.name, kind = excluded.kind, "
    "stock = excluded.stock, status = excluded.status, sheet = excluded.sheet, "
    "location = excluded.location, category = excluded.category, "
    "deleted = excluded.deleted, hlc = excluded.hlc, view = excluded.view "
    "WHERE items.barcode IS NOT excluded.barcode OR items.name IS NOT excluded.name "
    "OR items.deleted IS NOT excluded.deleted"
)


def view_statements(views: Sequence[ItemView]) -> list[Statement]:
    """Upsert items, their conflicts and alerts, and mark them for the cloud bridge.

    Items are updated in place, not deleted and re-inserted as ``INSERT OR REPLACE``
    would, and only the indexes whose columns changed are written (see
    ``_UPDATE_UNINDEXED``).
    """
    if not views:
        return []
    ids = [(view.id,) for view in views]
    rows = [_item_row(view) for view in views]
    return [
        (_UPDATE_UNINDEXED, [(*row[3:9], *row[10:12], *row[0:3], row[9]) for row in rows]),
        (_UPSERT_ITEM, rows),
        ("DELETE FROM conflicts WHERE item_id = ?", ids),
        ("DELETE FROM alerts WHERE item_id = ?", ids),
        (
            "INSERT INTO conflicts (item_id, field) VALUES (?, ?)",
            [(view.id, c.field) for view in views if not view.deleted for c in view.conflicts],
        ),
        (
            "INSERT INTO alerts (item_id, kind) VALUES (?, ?)",
            [(view.id, kind) for view in views for kind in view.alerts],
        ),
        # The mark only ever rises while an item waits, even when a peer's late write
        # changes the view without raising its HLC: the cloud bridge confirms a push by
        # the mark it read, so a change during the push keeps the item marked.
        (
            "INSERT INTO cloud_dirty_items (item_id, hlc) VALUES (?, ?) "
            "ON CONFLICT (item_id) DO UPDATE SET "
            "hlc = max(excluded.hlc, cloud_dirty_items.hlc + 1)",
            [(view.id, view.hlc) for view in views],
        ),
    ]


def movement_statements(movements: Iterable[Movement]) -> list[Statement]:
    return [
        (
            "INSERT OR IGNORE INTO movements (id, hlc, station, operator, item_id, barcode, op, "
            "qty, sheet) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (m.id, m.hlc, m.station, m.operator, m.item, m.barcode, m.op, m.qty, m.sheet)
                for m in movements
            ],
        )
    ]


async def write_views(db: aiosqlite.Connection, views: Sequence[ItemView]) -> None:
    for sql, params in view_statements(views):
        if params:
            await db.executemany(sql, params)


async def write_movements(db: aiosqlite.Connection, movements: Iterable[Movement]) -> None:
    for sql, params in movement_statements(movements):
        if params:
            await db.executemany(sql, params)


async def clear(db: aiosqlite.Connection) -> None:
    for table in ("items", "conflicts", "alerts", "movements", "ledger_progress"):
        await db.execute(f"DELETE FROM {table}")


def _views(rows: Iterable[Any]) -> list[ItemView]:
    return [ItemView.from_record(json.loads(row[0])) for row in rows]


async def by_barcode(db: aiosqlite.Connection, barcode: str) -> list[ItemView]:
    async with db.execute(
        "SELECT view FROM items WHERE barcode = ? AND NOT deleted ORDER BY id", (barcode,)
    ) as cursor:
        return _views(await cursor.fetchall())


async def by_id(db: aiosqlite.Connection, item_id: str) -> ItemView | None:
    async with db.execute("SELECT view FROM items WHERE id = ?", (item_id,)) as cursor:
        rows = await cursor.fetchall()
    views = _views(rows)
    return views[0] if views else None


def by_barcode_now(db: sqlite3.Connection, barcode: str) -> list[ItemView]:
    """``by_barcode`` on a plain connection, for lookups answered on the event loop."""
    rows = db.execute(
        "SELECT view FROM items WHERE barcode = ? AND NOT deleted ORDER BY id", (barcode,)
    ).fetchall()
    return _views(rows)


def ids_by_barcode_now(db: sqlite3.Connection, barcode: str) -> list[str]:
    """Ids of the live items with this barcode, without decoding their views."""
    rows = db.execute(
        "SELECT id FROM items WHERE barcode = ? AND NOT deleted ORDER BY id", (barcode,)
    ).fetchall()
    return [str(row[0]) for row in rows]


def by_id_now(db: sqlite3.Connection, item_id: str) -> ItemView | None:
    views = _views(db.execute("SELECT view FROM items WHERE id = ?", (item_id,)).fetchall())
    return views[0] if views else None


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def search(
    db: aiosqlite.Connection,
    text: str | None,
    *,
    limit: int,
    offset: int,
    include_deleted: bool,
) -> list[ItemView]:
    """Items whose barcode, name, location or category contains ``text``, by name."""
    where = ["1"] if include_deleted else ["NOT deleted"]
    params: list[Any] = []
    if text:
        where.append(
            "(barcode LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\' "
            "OR location LIKE ? ESCAPE '\\' OR category LIKE ? ESCAPE '\\')"
        )
        params += [_like(text)] * 4
    params += [limit, offset]
    sql = (
        f"SELECT view FROM items WHERE {' AND '.join(where)} "
        "ORDER BY name COLLATE NOCASE, barcode, id LIMIT ? OFFSET ?"
    )
    async with db.execute(sql, params) as cursor:
        return _views(await cursor.fetchall())


async def conflicted(db: aiosqlite.Connection) -> list[ItemView]:
    async with db.execute(
        "SELECT view FROM items WHERE id IN (SELECT item_id FROM conflicts) "
        "ORDER BY name COLLATE NOCASE, id"
    ) as cursor:
        return _views(await cursor.fetchall())


async def attention_counts(db: aiosqlite.Connection) -> tuple[int, int]:
    """How many items list a conflict, and how many alerts ``alerts`` would return, without
    building a single view (``invsync status`` asks for these on every call)."""
    sql = (
        "SELECT (SELECT count(*) FROM items WHERE id IN (SELECT item_id FROM conflicts)), "
        "(SELECT count(*) FROM alerts a JOIN items i ON i.id = a.item_id WHERE NOT i.deleted)"
        " + (SELECT count(*) FROM (SELECT 1 FROM items WHERE NOT deleted "
        "GROUP BY barcode HAVING count(*) > 1))"
    )
    async with db.execute(sql) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def alerts(db: aiosqlite.Connection) -> list[Alert]:
    found: list[Alert] = []
    async with db.execute(
        "SELECT a.kind, i.view FROM alerts a JOIN items i ON i.id = a.item_id "
        "WHERE NOT i.deleted ORDER BY a.kind, i.barcode, i.id"
    ) as cursor:
        for kind, view in await cursor.fetchall():
            item = ItemView.from_record(json.loads(view))
            found.append(Alert(kind, item.barcode, (item,)))
    async with db.execute(
        "SELECT barcode FROM items WHERE NOT deleted GROUP BY barcode HAVING count(*) > 1 "
        "ORDER BY barcode"
    ) as cursor:
        duplicated = [row[0] for row in await cursor.fetchall()]
    for barcode in duplicated:
        found.append(Alert("duplicate_barcode", barcode, tuple(await by_barcode(db, barcode))))
    return found


async def history(
    db: aiosqlite.Connection, item_ids: Sequence[str], barcode: str
) -> list[Movement]:
    """Movements of these items, or recorded under this barcode, in HLC order."""
    marks = ",".join("?" * len(item_ids))
    sql = (
        "SELECT id, hlc, station, operator, item_id, barcode, op, qty, sheet FROM movements "
        f"WHERE barcode = ? OR item_id IN ({marks}) ORDER BY hlc, station, id"
    )
    async with db.execute(sql, [barcode, *item_ids]) as cursor:
        rows = await cursor.fetchall()
    return [Movement(*row) for row in rows]


async def movement(db: aiosqlite.Connection, movement_id: str) -> Movement | None:
    sql = (
        "SELECT id, hlc, station, operator, item_id, barcode, op, qty, sheet FROM movements "
        "WHERE id = ?"
    )
    async with db.execute(sql, (movement_id,)) as cursor:
        row = await cursor.fetchone()
    return Movement(*row) if row is not None else None


async def movement_exists(db: aiosqlite.Connection, movement_id: str) -> bool:
    async with db.execute("SELECT 1 FROM movements WHERE id = ?", (movement_id,)) as cursor:
        return await cursor.fetchone() is not None


async def live_barcodes(db: aiosqlite.Connection, barcodes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(barcodes), 500):
        chunk = list(barcodes[start : start + 500])
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT barcode FROM items WHERE NOT deleted AND barcode IN ({marks})"
        async with db.execute(sql, chunk) as cursor:
            found.update(row[0] for row in await cursor.fetchall())
    return found


async def live_item_count(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT count(*) FROM items WHERE NOT deleted") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def item_count(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT count(*) FROM items") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0
