"""The inventory as CRDT documents (pycrdt), persisted in SQLite (aiosqlite).

``crdt_store`` owns the data model (items with per-field registers and stock counters,
the movements ledger, pull sheets, the fleet document), the hybrid logical clock, the
durable log with group commit and compaction, and the query index. It imports no
networking: the sync layer talks to it through ``state_vector``/``diff``/``apply_remote``
and ``subscribe``.
"""

from .errors import (
    AmbiguousBarcode,
    CorruptUpdate,
    InsufficientStock,
    InvalidInput,
    ItemNotFound,
    MigrationFailed,
    NoConflict,
    NotAStore,
    SchemaTooNew,
    SQLiteTooOld,
    StoreClosed,
    StoreError,
    StoreMismatch,
    UnknownDocument,
    WrongState,
)
from .index import Alert
from .model import EDITABLE_FIELDS, REGISTER_FIELDS, FieldConflict, ItemView, Movement, Slot
from .names import DEFAULT_SHARDS
from .store import LOCAL, CommittedUpdate, NewItem, SkewedStation, Store

__all__ = [
    "DEFAULT_SHARDS",
    "EDITABLE_FIELDS",
    "LOCAL",
    "REGISTER_FIELDS",
    "Alert",
    "AmbiguousBarcode",
    "CommittedUpdate",
    "CorruptUpdate",
    "FieldConflict",
    "InsufficientStock",
    "InvalidInput",
    "ItemNotFound",
    "ItemView",
    "MigrationFailed",
    "Movement",
    "NewItem",
    "NoConflict",
    "NotAStore",
    "SQLiteTooOld",
    "SchemaTooNew",
    "SkewedStation",
    "Slot",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreMismatch",
    "UnknownDocument",
    "WrongState",
]
