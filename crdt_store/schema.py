"""The SQLite schema of a station's store and its named migrations.

The schema version lives in ``PRAGMA user_version``. Each migration runs in its own
``BEGIN IMMEDIATE`` transaction together with the version bump, so a crash mid-upgrade
leaves the database at the previous version, never half-migrated. A database from a newer
version is refused before anything is written to it.

The query index (``items``, ``conflicts``, ``alerts``, ``movements``,
``movement_barcodes``) is derived data: it
can always be rebuilt from the documents. ``INDEX_VERSION`` (kept in ``meta``) says which
layout of derived data is on disk; the store rebuilds when it differs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite

from .errors import MigrationFailed, NotAStore, SchemaTooNew


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str


MIGRATIONS: Sequence[Migration] = (
    Migration(
        "001_document_log",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        -- Every committed transaction of every document, appended before it is
        -- acknowledged or sent to a peer.
        CREATE TABLE updates (
            doc TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (doc, seq)
        ) WITHOUT ROWID;
        -- The log of a document folded into one state, up to and including upto_seq.
        CREATE TABLE snapshots (
            doc TEXT PRIMARY KEY,
            state BLOB NOT NULL,
            state_vector BLOB NOT NULL,
            upto_seq INTEGER NOT NULL
        );
        """,
    ),
    Migration(
        "002_query_index",
        """
        CREATE TABLE items (
            id TEXT PRIMARY KEY,
            barcode TEXT NOT NULL,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            stock INTEGER NOT NULL,
            status TEXT NOT NULL,
            sheet TEXT,
            location TEXT NOT NULL,
            category TEXT NOT NULL,
            deleted INTEGER NOT NULL,
            hlc INTEGER NOT NULL,
            view TEXT NOT NULL
        );
        CREATE INDEX items_barcode ON items (barcode) WHERE NOT deleted;
        CREATE INDEX items_name ON items (name COLLATE NOCASE) WHERE NOT deleted;
        CREATE TABLE conflicts (
            item_id TEXT NOT NULL,
            field TEXT NOT NULL,
            PRIMARY KEY (item_id, field)
        ) WITHOUT ROWID;
        CREATE TABLE alerts (
            item_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            PRIMARY KEY (item_id, kind)
        ) WITHOUT ROWID;
        CREATE TABLE movements (
            id TEXT PRIMARY KEY,
            hlc INTEGER NOT NULL,
            station TEXT NOT NULL,
            operator TEXT NOT NULL,
            item_id TEXT NOT NULL,
            barcode TEXT NOT NULL,
            op TEXT NOT NULL,
            qty INTEGER NOT NULL,
            sheet TEXT
        );
        CREATE INDEX movements_item ON movements (item_id, hlc);
        CREATE INDEX movements_barcode ON movements (barcode, hlc);
        -- How many entries of each station's ledger array are in `movements`.
        CREATE TABLE ledger_progress (
            doc TEXT NOT NULL,
            station TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (doc, station)
        ) WITHOUT ROWID;
        -- A database from before the index has documents but no index: build it.
        INSERT OR REPLACE INTO meta (key, value) VALUES ('index_version', '0');
        """,
    ),
    Migration(
        "003_cloud_outbox",
        """
        -- Items changed since the cloud bridge last confirmed a push, kept durably so a
        -- restart resumes where it stopped. hlc is the item's HLC when it was marked.
        CREATE TABLE cloud_dirty_items (
            item_id TEXT PRIMARY KEY,
            hlc INTEGER NOT NULL
        ) WITHOUT ROWID;
        ALTER TABLE movements ADD COLUMN cloud_pushed INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX movements_cloud_pending ON movements (hlc) WHERE cloud_pushed = 0;
        """,
    ),
    Migration(
        "004_index_backlog",
        """
        -- Items changed in the log whose query-index rows are still to be written: a
        -- catch-up from a peer touching 100k items is indexed a slice per commit, so the
        -- event loop never stalls for seconds, and a crash loses none of the backlog.
        CREATE TABLE index_pending (item_id TEXT PRIMARY KEY) WITHOUT ROWID;
        -- Items indexed before the cloud outbox existed were never queued for a push.
        INSERT OR IGNORE INTO cloud_dirty_items (item_id, hlc) SELECT id, hlc FROM items;
        """,
    ),
    Migration(
        "005_cloud_bridge_state",
        """
        -- The cloud bridge's own durable state: which database it pushes to and the
        -- cursor of the web edits it has pulled ('target', 'cursor').
        CREATE TABLE cloud_state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        -- Rows the cloud rejected for their data (found by bisecting a batch): kept out
        -- of the push until the item changes again or a manual push retries them.
        -- kind is 'item' or 'movement'; mark is the dirty mark the item was parked at.
        CREATE TABLE cloud_parked (
            kind TEXT NOT NULL,
            row_id TEXT NOT NULL,
            barcode TEXT NOT NULL,
            mark INTEGER NOT NULL,
            error TEXT NOT NULL,
            parked_at_ms INTEGER NOT NULL,
            PRIMARY KEY (kind, row_id)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        "006_update_log_in_write_order",
        """
        -- The log was clustered by (doc, seq): each commit's rows, a few hundred bytes
        -- each, landed on one page per document (about 28 pages of WAL for a commit of
        -- 16 checkouts). Stored in write order, one commit's rows share a page or two;
        -- the (doc, seq) index stays small enough to be cached.
        CREATE TABLE updates_in_write_order (
            doc TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        INSERT INTO updates_in_write_order (doc, seq, data)
            SELECT doc, seq, data FROM updates ORDER BY doc, seq;
        DROP TABLE updates;
        ALTER TABLE updates_in_write_order RENAME TO updates;
        CREATE UNIQUE INDEX updates_doc_seq ON updates (doc, seq);
        """,
    ),
    Migration(
        "007_movement_barcodes",
        """
        -- The items movements were recorded for under each barcode. `history` finds a
        -- barcode's movements through them and the movements_item index, so a movement
        -- no longer writes a page of a second index (one at random per barcode); a pair
        -- already here costs a lookup, not a write.
        CREATE TABLE movement_barcodes (
            barcode TEXT NOT NULL,
            item_id TEXT NOT NULL,
            PRIMARY KEY (barcode, item_id)
        ) WITHOUT ROWID;
        INSERT OR IGNORE INTO movement_barcodes (barcode, item_id)
            SELECT DISTINCT barcode, item_id FROM movements;
        DROP INDEX movements_barcode;
        """,
    ),
    Migration(
        "008_concurrent_items",
        """
        -- Items with live writes of several stations to one field (ItemView.concurrent):
        -- after a restart, the items a delete arriving without a change marker can
        -- change. The store fills it from the documents on the next start (meta key
        -- concurrent_items = 'unfilled'), without rebuilding the rest of the index.
        CREATE TABLE concurrent_items (item_id TEXT PRIMARY KEY) WITHOUT ROWID;
        INSERT OR REPLACE INTO meta (key, value) VALUES ('concurrent_items', 'unfilled');
        """,
    ),
    Migration(
        "009_compact_index_records",
        """
        -- Index rows written from now on keep in `view` only what their columns do not
        -- (ItemView.to_record); rows written before are read as they are, nothing is
        -- rewritten. Only the version number changes: earlier versions of invsync
        -- cannot read the new rows, so they refuse the file instead.
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
#: What the documents hold and how (slots, counters, ledger entries), as peers compare it
#: in their hello. Raise it with a migration that changes the documents; one that only
#: changes how this station stores them (006 to 008) leaves it, so stations upgraded one
#: by one keep syncing.
DOCUMENT_FORMAT = 5
#: Bump when the layout of derived index data changes; the store then rebuilds it.
INDEX_VERSION = 1


async def schema_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def check_openable(db: aiosqlite.Connection, path: str) -> None:
    """Refuse a database from a newer invsync, or a SQLite file that is not ours."""
    found = await schema_version(db)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(path, found, SCHEMA_VERSION)
    if found == 0:
        async with db.execute("SELECT count(*) FROM sqlite_master") as cursor:
            row = await cursor.fetchone()
        if row and row[0]:
            raise NotAStore(path)


async def migrate(db: aiosqlite.Connection, path: str, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to ``target``; returns the version found before."""
    found = await schema_version(db)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(path, found, SCHEMA_VERSION)
    for number in range(found + 1, target + 1):
        migration = MIGRATIONS[number - 1]
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migration.sql):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {number}")
            await db.commit()
        except sqlite3.Error as exc:
            await db.rollback()
            raise MigrationFailed(path, migration.name, str(exc)) from exc
        except BaseException:
            await db.rollback()
            raise
    return found


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (none of ours has a ';' inside a literal)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]
