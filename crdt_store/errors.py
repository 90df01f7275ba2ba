"""Errors raised by the inventory store.

Every error the store raises derives from :class:`StoreError`, so the daemon can map
the whole family to one JSON error shape. Subclasses carry the fields a caller needs to
explain the problem to a warehouse operator (which barcode, which quantity, which file).
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error raised by ``crdt_store``."""

    code = "store_error"


class InvalidInput(StoreError):
    """A value given by a user or a script is not acceptable; nothing was changed."""

    code = "invalid"

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r}: {reason}")


class ItemNotFound(StoreError):
    """No live item has this barcode or id."""

    code = "not_found"

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no item with barcode or id {key!r}")


class AmbiguousBarcode(StoreError):
    """Two or more live items claim one barcode; the caller must pick one by id."""

    code = "ambiguous"

    def __init__(self, barcode: str, item_ids: list[str]) -> None:
        self.barcode = barcode
        self.item_ids = item_ids
        super().__init__(
            f"barcode {barcode!r} belongs to {len(item_ids)} items ({', '.join(item_ids)}); "
            "use the item id, or fix the duplicate barcode"
        )


class InsufficientStock(StoreError):
    """A checkout asks for more units than this station sees on the shelf."""

    code = "insufficient_stock"

    def __init__(self, barcode: str, requested: int, available: int) -> None:
        self.barcode = barcode
        self.requested = requested
        self.available = available
        super().__init__(f"cannot check out {requested} of {barcode!r}: only {available} in stock")


class WrongState(StoreError):
    """The operation does not fit the item as it is (a serial unit already out, ...)."""

    code = "wrong_state"

    def __init__(self, barcode: str, reason: str) -> None:
        self.barcode = barcode
        self.reason = reason
        super().__init__(f"{barcode}: {reason}")


class NoConflict(StoreError):
    """``resolve`` was asked for a field that has no conflict to resolve."""

    code = "no_conflict"

    def __init__(self, barcode: str, field: str) -> None:
        self.barcode = barcode
        self.field = field
        super().__init__(f"{barcode}: field {field!r} has no conflict to resolve")


class UnknownDocument(StoreError):
    """A document name that this store does not hold and cannot create."""

    code = "unknown_document"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown document {name!r}")


class CorruptUpdate(StoreError):
    """An update from outside could not be decoded; stored state is untouched."""

    code = "corrupt_update"

    def __init__(self, doc: str, reason: str) -> None:
        self.doc = doc
        self.reason = reason
        super().__init__(f"rejected update for {doc}: {reason}")


class SchemaTooNew(StoreError):
    """The database was written by a newer invsync; opening it could damage it."""

    code = "schema_too_new"

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path} has schema version {found}, but this invsync supports up to "
            f"{supported}: upgrade invsync before opening this database"
        )


class SQLiteTooOld(StoreError):
    """The SQLite library Python uses lacks a feature the store's index writes need."""

    code = "sqlite_too_old"

    def __init__(self, found: str, needed: str) -> None:
        self.found = found
        self.needed = needed
        super().__init__(
            f"this Python uses SQLite {found}, but invsync needs SQLite {needed} or newer "
            "(for UPDATE ... FROM); use a Python built against a newer SQLite"
        )


class NotAStore(StoreError):
    """The file is a SQLite database of something else; we will not write into it."""

    code = "not_a_store"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path} is a SQLite database but not an invsync store; refusing to touch it"
        )


class MigrationFailed(StoreError):
    """A schema upgrade failed; the database stays at its previous version."""

    code = "migration_failed"

    def __init__(self, path: str, migration: str, reason: str) -> None:
        self.path = path
        self.migration = migration
        super().__init__(f"upgrading {path} ({migration}) failed, nothing changed: {reason}")


class StoreMismatch(StoreError):
    """The database belongs to another station or another shard layout."""

    code = "store_mismatch"

    def __init__(self, path: str, setting: str, stored: object, requested: object) -> None:
        self.path = path
        self.setting = setting
        self.stored = stored
        self.requested = requested
        super().__init__(
            f"{path} was created with {setting}={stored!r}, not {requested!r}; "
            f"{setting} is fixed for the life of a store"
        )


class StoreClosed(StoreError):
    """The store is closed, or stopped after a failed commit; restart to reload from disk."""

    code = "store_closed"
