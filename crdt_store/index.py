"""The query index: SQLite tables derived from the documents.

Lookups by barcode, listings, conflicts, alerts and history read these tables and never
scan documents. The store writes them in the same transaction as the document updates
they derive from, so after any crash the index matches the log. Everything here can be
rebuilt from the documents (``INDEX_VERSION`` in ``schema``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from .model import RECORD_COLUMNS, ItemView, Movement


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


#: One SQL statement and the parameter rows to run it with (``executemany``).
Statement = tuple[str, Sequence[Sequence[Any]]]


def view_columns(table: str = "") -> str:
    """The columns of an item's index row, in the order ``_item_row`` writes them and
    ``view_of_row`` reads them, of ``table`` if given."""
    prefix = f"{table}." if table else ""
    return ", ".join(prefix + column for column in (*RECORD_COLUMNS, "view"))


_ITEM_COLUMNS = view_columns()

#: Most rows in one statement: a bound under SQLite's limit on parameters (32,766 since
#: 3.32; 999 before) that keeps each hand-over of parameters short (~5 ms).
_MAX_ROWS = 500
with contextlib.closing(sqlite3.connect(":memory:")) as _probe:
    _MAX_PARAMETERS = _probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)


def bulk(sql: str, rows: Sequence[Sequence[Any]]) -> list[Statement]:
    """``sql`` over many rows at once: ``{rows}`` in it becomes ``(?, ...), (?, ...)``.

    ``executemany`` steps once per row, and each step gives up the GIL and must take it
    back. While the event loop is busy (merging a peer's updates, answering requests)
    each of those waited up to a switch interval: 2,000 index rows took seconds instead
    of 30 ms, and the loop's own work then waited for that commit. One multi-row
    statement takes the GIL back once; chunks keep it within SQLite's parameter limit.
    """
    if not rows:
        return []
    width = len(rows[0])
    per_statement = max(1, min(_MAX_ROWS, _MAX_PARAMETERS // width))
    placeholder = "(" + ", ".join("?" * width) + ")"
    statements: list[Statement] = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        text = sql.replace("{rows}", ", ".join([placeholder] * len(chunk)))
        statements.append((text, [[value for row in chunk for value in row]]))
    return statements


#: One encoder for every index row: ``json.dumps`` with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


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
        _COMPACT_JSON.encode(view.to_record()),
    )


#: Items added in this very commit: nothing to update, no old conflicts or alerts.
_INSERT_ITEMS = f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES {{rows}}"
#: An item whose barcode, name and deleted flag are unchanged (every checkout, return and
#: count) is updated in place without touching the two indexes on those columns: SQLite
#: rewrites an index entry whenever its column is assigned, even to the same value, and
#: those entries were two thirds of the pages a checkout's commit wrote. (``columnN`` are
#: the values of ``_item_row``, in order.)
_UPDATE_UNINDEXED = (
    "UPDATE items SET kind = row.column4, stock = row.column5, status = row.column6, "
    "sheet = row.column7, location = row.column8, category = row.column9, "
    "hlc = row.column11, view = row.column12 FROM (VALUES {rows}) AS row "
    "WHERE items.id = row.column1 AND items.barcode = row.column2 "
    "AND items.name = row.column3 AND items.deleted = row.column10"
)
#: Everything else: items new to this index, and items whose indexed columns changed (the
#: ``WHERE`` leaves alone the rows the statement above just wrote).
_UPSERT_ITEMS = (
    f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES {{rows}} ON CONFLICT (id) DO UPDATE SET "
    "barcode = excluded.barcode, name = excluded.name, kind = excluded.kind, "
    "stock = excluded.stock, status = excluded.status, sheet = excluded.sheet, "
    "location = excluded.location, category = excluded.category, "
    "deleted = excluded.deleted, hlc = excluded.hlc, view = excluded.view "
    "WHERE items.barcode IS NOT excluded.barcode OR items.name IS NOT excluded.name "
    "OR items.deleted IS NOT excluded.deleted"
)


#: How an item is marked for the cloud bridge: the mark only ever rises while the item
#: waits, even when a peer's late write changes the view without raising its HLC. The
#: bridge confirms a push by the mark it read, so a change during the push keeps the
#: item marked.
RAISE_CLOUD_MARK = (
    "ON CONFLICT (item_id) DO UPDATE SET hlc = max(excluded.hlc, cloud_dirty_items.hlc + 1)"
)


def view_statements(
    views: Sequence[ItemView], added: Collection[str] = (), *, cloud_marks: bool = True
) -> list[Statement]:
    """Upsert items, their conflicts, alerts and concurrent writes, and (``cloud_marks``)
    mark them for the cloud bridge.

    Items are updated in place, not deleted and re-inserted as ``INSERT OR REPLACE``
    would, and only the indexes whose columns changed are written (see
    ``_UPDATE_UNINDEXED``). Items in ``added`` were created in this commit: they are
    simply inserted, which is most of an import's index work.
    """
    if not views:
        return []
    fresh = [_item_row(view) for view in views if view.id in added]
    rows = [_item_row(view) for view in views if view.id not in added]
    known = [row[:1] for row in rows]
    return [
        *bulk(_INSERT_ITEMS, fresh),
        # The update must come first: the upsert's rows then differ from it by definition.
        *bulk(_UPDATE_UNINDEXED, rows),
        *bulk(_UPSERT_ITEMS, rows),
        *bulk("DELETE FROM conflicts WHERE item_id IN (VALUES {rows})", known),
        *bulk("DELETE FROM alerts WHERE item_id IN (VALUES {rows})", known),
        *bulk("DELETE FROM concurrent_items WHERE item_id IN (VALUES {rows})", known),
        *bulk(
            "INSERT INTO conflicts (item_id, field) VALUES {rows}",
            [(view.id, c.field) for view in views if not view.deleted for c in view.conflicts],
        ),
        *bulk(
            "INSERT INTO alerts (item_id, kind) VALUES {rows}",
            [(view.id, kind) for view in views for kind in view.alerts],
        ),
        *bulk(
            "INSERT INTO concurrent_items (item_id) VALUES {rows}",
            [(view.id,) for view in views if view.concurrent],
        ),
        # Marked for the cloud bridge (RAISE_CLOUD_MARK).
        *bulk(
            "INSERT INTO cloud_dirty_items (item_id, hlc) VALUES {rows} " + RAISE_CLOUD_MARK,
            [(view.id, view.hlc) for view in views] if cloud_marks else [],
        ),
    ]


def movement_statements(movements: Iterable[Movement]) -> list[Statement]:
    """Insert movements (once each) and the barcodes they were recorded under."""
    rows = [
        (m.id, m.hlc, m.station, m.operator, m.item, m.barcode, m.op, m.qty, m.sheet)
        for m in movements
    ]
    return [
        *bulk(
            "INSERT OR IGNORE INTO movements (id, hlc, station, operator, item_id, barcode, "
            "op, qty, sheet) VALUES {rows}",
            rows,
        ),
        *bulk(
            "INSERT OR IGNORE INTO movement_barcodes (barcode, item_id) VALUES {rows}",
            list(dict.fromkeys((row[5], row[4]) for row in rows)),
        ),
    ]


async def write_views(
    db: aiosqlite.Connection,
    views: Sequence[ItemView],
    added: Collection[str] = (),
    *,
    cloud_marks: bool = True,
) -> None:
    for sql, params in view_statements(views, added, cloud_marks=cloud_marks):
        if params:
            await db.executemany(sql, params)


async def write_movements(db: aiosqlite.Connection, movements: Iterable[Movement]) -> None:
    for sql, params in movement_statements(movements):
        if params:
            await db.executemany(sql, params)


async def clear(db: aiosqlite.Connection) -> None:
    for table in (
        "items",
        "conflicts",
        "alerts",
        "concurrent_items",
        "movements",
        "movement_barcodes",
        "ledger_progress",
    ):
        await db.execute(f"DELETE FROM {table}")


def view_of_row(row: Sequence[Any]) -> ItemView:
    """An item's view from its index row, as selected by ``view_columns``.

    The columns complete the record (``ItemView.to_record``); a row written before schema
    9 has every field in its record as well, with the same values.
    """
    record: dict[str, Any] = json.loads(row[-1])
    record.update(zip(RECORD_COLUMNS, row[:-1], strict=True))
    record["deleted"] = bool(record["deleted"])
    return ItemView.from_record(record)


def _views(rows: Iterable[Any]) -> list[ItemView]:
    return [view_of_row(row) for row in rows]


async def by_barcode(db: aiosqlite.Connection, barcode: str) -> list[ItemView]:
    async with db.execute(
        f"SELECT {_ITEM_COLUMNS} FROM items WHERE barcode = ? AND NOT deleted ORDER BY id",
        (barcode,),
    ) as cursor:
        return _views(await cursor.fetchall())


async def by_id(db: aiosqlite.Connection, item_id: str) -> ItemView | None:
    async with db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)) as cursor:
        rows = await cursor.fetchall()
    views = _views(rows)
    return views[0] if views else None


def by_barcode_now(db: sqlite3.Connection, barcode: str) -> list[ItemView]:
    """``by_barcode`` on a plain connection, for lookups answered on the event loop."""
    rows = db.execute(
        f"SELECT {_ITEM_COLUMNS} FROM items WHERE barcode = ? AND NOT deleted ORDER BY id",
        (barcode,),
    ).fetchall()
    return _views(rows)


def ids_by_barcode_now(db: sqlite3.Connection, barcode: str) -> list[str]:
    """Ids of the live items with this barcode, without decoding their views."""
    rows = db.execute(
        "SELECT id FROM items WHERE barcode = ? AND NOT deleted ORDER BY id", (barcode,)
    ).fetchall()
    return [str(row[0]) for row in rows]


def by_id_now(db: sqlite3.Connection, item_id: str) -> ItemView | None:
    views = _views(
        db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchall()
    )
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
        f"SELECT {_ITEM_COLUMNS} FROM items WHERE {' AND '.join(where)} "
        "ORDER BY name COLLATE NOCASE, barcode, id LIMIT ? OFFSET ?"
    )
    async with db.execute(sql, params) as cursor:
        return _views(await cursor.fetchall())


async def conflicted(db: aiosqlite.Connection) -> list[ItemView]:
    async with db.execute(
        f"SELECT {_ITEM_COLUMNS} FROM items WHERE id IN (SELECT item_id FROM conflicts) "
        "ORDER BY name COLLATE NOCASE, id"
    ) as cursor:
        return _views(await cursor.fetchall())


async def attention_counts(db: aiosqlite.Connection) -> tuple[int, int]:
    """How many items list a conflict, and how many alerts ``alerts`` would return, without
    building a single view (``invsync status`` asks for these on every call)."""
    sql = (
        "SELECT (SELECT count(*) FROM items WHERE id IN (SELECT item_id FROM conflicts)), "
        # CROSS JOIN keeps alerts (a handful of rows) as the outer loop: left to itself,
        # SQLite walked all items and probed alerts for each, 0.3 s at 100k items.
        "(SELECT count(*) FROM alerts a CROSS JOIN items i ON i.id = a.item_id "
        "WHERE NOT i.deleted)"
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
        f"SELECT a.kind, {view_columns('i')} FROM alerts a CROSS JOIN items i "
        "ON i.id = a.item_id WHERE NOT i.deleted ORDER BY a.kind, i.barcode, i.id"
    ) as cursor:
        for kind, *columns in await cursor.fetchall():
            item = view_of_row(columns)
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
    """Movements of these items, or recorded under this barcode, in HLC order.

    Those recorded under the barcode are found through the items they were recorded for
    (``movement_barcodes``), as the movements are indexed by item only.
    """
    marks = ",".join("?" * len(item_ids))
    columns = "id, hlc, station, operator, item_id, barcode, op, qty, sheet"
    sql = (
        f"SELECT {columns} FROM movements WHERE item_id IN ({marks}) "
        f"UNION SELECT {columns} FROM movements WHERE item_id IN "
        "(SELECT item_id FROM movement_barcodes WHERE barcode = ?) AND barcode = ? "
        "ORDER BY hlc, station, id"
    )
    async with db.execute(sql, [*item_ids, barcode, barcode]) as cursor:
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
