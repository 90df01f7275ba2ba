"""Writes and reads on the pycrdt documents themselves.

This is the only module that knows how an item, a pull sheet, a ledger day and the fleet
are laid out inside Yjs documents:

- an item is a *root-level* Map of its shard doc, named by the item id (root Maps merge by
  name, so two stations can never drop each other's item);
- every transaction that touches an item also sets the writer's *change marker*
  ``"<item id>@<station>" = hlc`` in the shard's ``~changes`` root Map. A remote update
  does not say which root Maps it changed, but the marker map's events do. Each key is
  written *and deleted* only by its own station (never by another one), so an event can
  never be lost to a concurrent write of the same key, nor to another station's delete
  arriving first (a key added and deleted in one transaction raises no event);
- a ledger day holds one root Array per station, ``moves@<station>``, that only that
  station appends to;
- a pull sheet is a root Map named by the sheet, with per-station counters of units out;
- the fleet doc has a ``members`` Map where each station writes only its own entry (name,
  last seen), an ``enrollments`` Map written by the station that enrolled each member, and a
  ``revocations`` Map of CA-signed entries.

No SQL and no clocks here: the caller passes HLC values in.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from pycrdt import Array, Doc, Map

from .model import STOCK_FIELD, Movement, movement_to_raw, slot_key, split_slot_key

CHANGES_ROOT = "~changes"
MEMBERS_ROOT = "members"
#: Written by a station holding the fleet CA when it enrolls a station.
ENROLLMENTS_ROOT = "enrollments"
#: CA-signed revocation entries (verified by the daemon, not here).
REVOCATIONS_ROOT = "revocations"
FLEET_ROOTS = (MEMBERS_ROOT, ENROLLMENTS_ROOT, REVOCATIONS_ROOT)
MOVES_PREFIX = "moves@"


def item_map(doc: Doc[Any], item_id: str) -> Map[Any]:
    item: Map[Any] = doc.get(item_id, type=Map)
    return item


def add_items(doc: Doc[Any], items: Iterable[tuple[str, dict[str, Any]]], station: str) -> None:
    """Write new items (their slots, plain values) and our change marker for each, in one
    transaction. Inserts go straight to Yrs: pycrdt's ``Map.update`` opens a nested
    transaction and type-checks every value, a fifth of an import's time at 100k items."""
    markers = changes_map(doc)
    with doc.transaction() as txn:
        raw_txn = txn._txn
        for item_id, entries in items:
            integrated = item_map(doc, item_id).integrated
            for key, value in entries.items():
                integrated.insert(raw_txn, key, value)
            hlc = max(slot[1] for slot in entries.values())
            markers.integrated.insert(raw_txn, slot_key(item_id, station), hlc)


def changes_map(doc: Doc[Any]) -> Map[Any]:
    markers: Map[Any] = doc.get(CHANGES_ROOT, type=Map)
    return markers


@contextlib.contextmanager
def _in_yrs(doc: Doc[Any]) -> Iterator[tuple[Any, Any]]:
    """The Yrs document and transaction under pycrdt's (the caller's, or a new one).

    Root maps are then reached with ``get_or_insert_map`` straight from Yrs: ``doc.get``
    builds a pycrdt wrapper in a nested transaction, which cost more than the reads and
    writes done here (a third of ``read_maps``).
    """
    with doc.transaction() as txn:
        raw_txn = txn._txn
        assert raw_txn is not None
        yield doc._doc, raw_txn


def read_maps(doc: Doc[Any], names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Plain-value copies of several root Maps in one read transaction, through JSON:
    whole numbers come back as ints, as pull sheets and fleet entries (signed by the CA)
    need them. Items are read faster with ``read_items``.
    """
    result: dict[str, dict[str, Any]] = {}
    with _in_yrs(doc) as (roots, txn):
        for name in names:
            result[name] = json.loads(roots.get_or_insert_map(txn, name).to_json(txn))
    return result


#: What ``Map.get`` of Yrs gives for plain values; anything else is a shared type.
_PLAIN_VALUES = frozenset({list, str, float, int, bool, type(None), dict, bytearray})


def _all_plain(values: Iterable[Any]) -> bool:
    """Whether no value is a shared type (only a bad peer writes one where a value
    belongs): else the caller reads through JSON, as the values were read before."""
    return all(type(value) in _PLAIN_VALUES for value in values)


def read_items(doc: Doc[Any], item_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The slots of several items (root Maps) as plain values, in one read transaction.

    Read key by key: 3.7 us for an 8-slot item against 9.3 us through ``to_json`` and
    ``json.loads`` (``read_maps``), which was a fifth of a new station's catch-up. Numbers
    come back as floats, as the item view expects (``model._as_int``), and NaN and
    infinities as floats where JSON gave null (``model._parse_slots`` reads them as null).
    A slot holding a shared type (only a bad peer writes one) makes that item read
    through JSON, so it resolves exactly as before.
    """
    result: dict[str, dict[str, Any]] = {}
    with _in_yrs(doc) as (roots, txn):
        for item_id in item_ids:
            item = roots.get_or_insert_map(txn, item_id)
            slots = {key: item.get(txn, key) for key in item.keys(txn)}
            if not _all_plain(slots.values()):
                slots = json.loads(item.to_json(txn))
            result[item_id] = slots
    return result


def slot_counts(doc: Doc[Any], names: Iterable[str]) -> dict[str, int]:
    """How many entries each of several root Maps has (about 1 us each: no values are
    read)."""
    with _in_yrs(doc) as (roots, txn):
        return {name: roots.get_or_insert_map(txn, name).len(txn) for name in names}


def root_names(doc: Doc[Any]) -> list[str]:
    return list(doc.keys())


def write_register(item: Map[Any], station: str, field: str, value: object, hlc: int) -> None:
    """Set this station's slot and delete every other slot of the field we have seen.

    Deleting what we have seen is what makes a later write supersede earlier ones no matter
    their clocks; only slots we have *not* seen (concurrent writes) survive as a conflict.
    """
    own = slot_key(field, station)
    prefix = field + "@"
    for key in [key for key in list(item.keys()) if key.startswith(prefix) and key != own]:
        del item[key]
    item[own] = [value, hlc]


def write_register_if_newer(
    item: Map[Any], station: str, field: str, value: object, hlc: int
) -> bool:
    """``write_register`` unless a slot of the field we hold is at least as new.

    For writes stamped elsewhere (web edits carry the cloud's HLC): a slot written after
    them, or the same edit applied before, wins, so nothing is overwritten back. "New" is
    ``(hlc, station)``, the order the item view and the cloud table both resolve a field
    by, so an edit and a station write with equal HLCs end the same way on both sides.
    """
    if has_slot_at_least(item, field, hlc, station):
        return False
    write_register(item, station, field, value, hlc)
    return True


def has_slot_at_least(item: Map[Any], field: str, hlc: int, station: str) -> bool:
    """Whether a slot of ``field`` is at least as new as ``(hlc, station)``."""
    prefix = field + "@"
    for key in list(item.keys()):
        if key.startswith(prefix):
            slot = item[key]
            if (
                type(slot) is list
                and len(slot) == 2
                and _at_least(slot[1], key[len(prefix) :], hlc, station)
            ):
                return True
    return False


def _at_least(stored: object, stored_station: str, hlc: int, station: str) -> bool:
    """Whether a slot's ``(hlc, station)`` is at least ``(hlc, station)``."""
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return False
    return (stored, stored_station) >= (hlc, station)


def add_stock(item: Map[Any], station: str, delta: int, current_own: int, hlc: int) -> None:
    """Each station only ever writes its own counter slot: stock = sum of all slots."""
    item[slot_key(STOCK_FIELD, station)] = [current_own + delta, hlc]


def set_own_stock(doc: Doc[Any], item_id: str, station: str, total: int, hlc: int) -> None:
    """This station's counter slot of an item (``total`` is its new net delta) and our
    change marker, in the caller's transaction.

    Straight to Yrs, as a checkout's only document write: pycrdt's wrappers of the item
    and marker maps (a transaction and a type check each) cost more than the write.
    """
    with _in_yrs(doc) as (roots, txn):
        roots.get_or_insert_map(txn, item_id).insert(
            txn, slot_key(STOCK_FIELD, station), [total, hlc]
        )
        roots.get_or_insert_map(txn, CHANGES_ROOT).insert(txn, slot_key(item_id, station), hlc)


def add_stock_once(item: Map[Any], writer: str, delta: int, hlc: int) -> bool:
    """A counter slot written once, for one change (``stock@cloud:<change>``): every
    station that applies the change writes the same key and value, so several doing it
    at once neither lose nor double it. Returns whether the slot was new here."""
    key = slot_key(STOCK_FIELD, writer)
    if key in item:
        return False
    item[key] = [delta, hlc]
    return True


def mark_changed(doc: Doc[Any], item_id: str, station: str, hlc: int) -> None:
    """Set our change marker for the item.

    Other stations' markers are left alone even when we can see them: deleting one lets
    a station that receives our update before that station's own update get the marker
    added and deleted in one transaction, which raises no event, so the item's other new
    slots would never reach the query index there.
    """
    changes_map(doc)[slot_key(item_id, station)] = hlc


def append_movements(doc: Doc[Any], station: str, movements: Iterable[Movement]) -> None:
    moves = doc.get(MOVES_PREFIX + station, type=Array)
    moves.extend([movement_to_raw(movement) for movement in movements])


def ledger_stations(doc: Doc[Any]) -> list[str]:
    return [name[len(MOVES_PREFIX) :] for name in list(doc.keys()) if name.startswith(MOVES_PREFIX)]


def ledger_tail(doc: Doc[Any], station: str, start: int) -> list[Any]:
    """Entries of one station's ledger array from ``start`` on (arrays only ever grow).

    Read entry by entry straight from Yrs: a new station reads a whole day of 100k
    entries at once, and ``to_json`` + ``json.loads`` of it took 0.8-1.2 s against
    0.2-0.3 s (raw UUIDs come back as bytes, not as lists of numbers). A day holding an
    entry that is a shared type (only a bad peer writes one) is read through JSON, as it
    was before; NaN and infinities, which JSON gives as null, are read as null where it
    matters (``model.movement_from_raw``).
    """
    with _in_yrs(doc) as (roots, txn):
        moves = roots.get_or_insert_array(txn, MOVES_PREFIX + station)
        entries = [moves.get(txn, index) for index in range(start, moves.len(txn))]
        if not _all_plain(entries):
            tail: list[Any] = json.loads(moves.to_json(txn))[start:]
            return tail
        return entries


def add_to_sheet(doc: Doc[Any], sheet: str, item_id: str, station: str, delta: int) -> None:
    """Per-station counters of units of each item out on a pull sheet."""
    lines = doc.get(sheet, type=Map)
    key = slot_key(item_id, station)
    current = lines.get(key, 0)
    lines[key] = int(current) + delta


def sheet_lines(doc: Doc[Any], sheet: str) -> dict[str, int]:
    """Units out per item on a sheet, summed over stations."""
    if sheet not in set(doc.keys()):
        return {}
    raw = read_maps(doc, [sheet])[sheet]
    totals: dict[str, int] = {}
    for key, value in raw.items():
        parts = split_slot_key(key)
        if parts is None or not isinstance(value, int | float):
            continue
        totals[parts[0]] = totals.get(parts[0], 0) + int(value)
    return {item: qty for item, qty in totals.items() if qty}


def set_fleet_entry(doc: Doc[Any], root: str, station: str, entry: dict[str, Any]) -> None:
    doc.get(root, type=Map)[station] = entry


def fleet_entries(doc: Doc[Any], root: str) -> dict[str, dict[str, Any]]:
    """Station entries of one map of the fleet doc; entries that are not objects (a bad
    peer) are left out so no caller trips over them."""
    if root not in set(doc.keys()):
        return {}
    raw: dict[str, Any] = read_maps(doc, [root])[root]
    return {station: entry for station, entry in raw.items() if isinstance(entry, dict)}
