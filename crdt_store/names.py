"""Identifiers: item and movement ids (UUIDv7), station ids, and document names.

The store holds many named pycrdt documents so that a diff never costs O(inventory):
``items/NN`` (item shards), ``sheets/NN`` (pull sheets), ``ledger/YYYY-MM-DD`` (one per
UTC day) and ``fleet``. Which shard an item lives in is a pure function of its id, so
every station computes the same answer without coordination.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zlib

from .errors import InvalidInput, UnknownDocument

DEFAULT_SHARDS = 64
MAX_SHARDS = 256
SHEET_SHARDS = 8
FLEET_DOC = "fleet"

_STATION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_DOC_RE = re.compile(r"^(items|sheets)/(\d{2,3})$|^ledger/(\d{4}-\d{2}-\d{2})$|^fleet$")


class _RandomPool:
    """Random bytes from the OS, fetched 4 KiB at a time: one ``os.urandom`` call per id
    was a sixteenth of an import of 100k items. Used from the event loop's thread only
    (the store's), so it needs no lock; a forked child starts with an empty pool so it
    never hands out its parent's bytes."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._used = 0

    def take(self, count: int) -> bytes:
        if self._used + count > len(self._pool):
            self._pool, self._used = os.urandom(self._SIZE), 0
        start = self._used
        self._used += count
        return self._pool[start : self._used]

    def forget(self) -> None:
        self._pool, self._used = b"", 0


_RANDOM = _RandomPool()
os.register_at_fork(after_in_child=_RANDOM.forget)


def new_uuid7(now_ms: int, rand: bytes | None = None) -> str:
    """A UUIDv7: 48 bits of milliseconds, then random bits, so ids sort by creation time."""
    tail = rand if rand is not None else _RANDOM.take(10)
    value = (now_ms & ((1 << 48) - 1)) << 80
    value |= int.from_bytes(tail[:10], "big") & ((1 << 80) - 1)
    # Set version (7) and variant (0b10) bits as RFC 9562 requires.
    value &= ~(0xF << 76)
    value |= 0x7 << 76
    value &= ~(0x3 << 62)
    value |= 0x2 << 62
    return uuid_text(f"{value:032x}")


def uuid_text(hex32: str) -> str:
    """A UUID's text form from its 32 hex digits, without building a ``uuid.UUID``: an
    import makes 100k ids and a new station decodes as many ledger entries."""
    return f"{hex32[:8]}-{hex32[8:12]}-{hex32[12:16]}-{hex32[16:20]}-{hex32[20:]}"


def is_item_id(text: str) -> bool:
    """True for a lower-case UUIDv7 string, the only form item ids take."""
    return bool(_UUID_RE.match(text))


def check_station_id(station_id: str) -> str:
    """Station ids end up in slot keys (``field@station``), so ``@`` is not allowed."""
    if not _STATION_RE.match(station_id):
        raise InvalidInput("station id", station_id, "use 1-64 letters, digits, '-' or '_'")
    return station_id


def shard_of(item_id: str, shard_count: int) -> int:
    """The shard an item lives in; stable across processes and versions."""
    return zlib.crc32(item_id.encode("ascii")) % shard_count


def item_doc(shard: int) -> str:
    return f"items/{shard:02d}"


def sheet_doc(sheet: str) -> str:
    return f"sheets/{zlib.crc32(sheet.encode('utf-8')) % SHEET_SHARDS:02d}"


def ledger_doc(ms: int) -> str:
    day = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).date()
    return f"ledger/{day.isoformat()}"


def check_doc_name(name: str, shard_count: int) -> str:
    """Accept only document names this store may hold; anything else is refused."""
    match = _DOC_RE.match(name)
    if match is None:
        raise UnknownDocument(name)
    kind, number, day = match.groups()
    if kind == "items" and int(number) >= shard_count:
        raise UnknownDocument(name)
    if kind == "sheets" and int(number) >= SHEET_SHARDS:
        raise UnknownDocument(name)
    if day is not None:
        try:
            dt.date.fromisoformat(day)
        except ValueError:
            raise UnknownDocument(name) from None
    return name


def fixed_doc_names(shard_count: int) -> list[str]:
    """Documents every store has from the start (ledger days appear as they are used)."""
    names = [item_doc(i) for i in range(shard_count)]
    names += [f"sheets/{i:02d}" for i in range(SHEET_SHARDS)]
    names.append(FLEET_DOC)
    return names
