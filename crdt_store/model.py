"""Values of the inventory model: fields, validation, and the item view.

An item is stored as a flat map of *slots*. A descriptive field is a register kept as one
slot per writing station, ``"<field>@<station>" = [value, hlc]``; stock is a counter kept
as ``"stock@<station>" = [net delta, hlc]`` (stock is the sum of the deltas; a web count
adds a slot of its own, ``"stock@cloud:<change>"``, read like any station's). This module
turns such a map (as plain Python values) into an :class:`ItemView`: the value of each
field is its slot with the highest ``(hlc, station)``, and several live slots with
different values are a visible conflict.

Everything here is pure: no pycrdt, no SQL, no clocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidInput
from .names import uuid_text

Kind = Literal["bulk", "serial"]
KINDS: tuple[Kind, ...] = ("bulk", "serial")
STATUSES = ("in", "out", "repair", "lost")

#: Fields kept as per-station registers, in display order.
REGISTER_FIELDS = (
    "barcode",
    "name",
    "kind",
    "location",
    "category",
    "notes",
    "status",
    "sheet",
    "deleted",
)
#: Fields a person may set with an edit or a conflict resolution.
EDITABLE_FIELDS = ("barcode", "name", "location", "category", "notes", "status")
STOCK_FIELD = "stock"

MAX_QTY = 1_000_000
MAX_STOCK = 1_000_000_000

_BARCODE_RE = re.compile(r"^[!-~]{1,64}$")
#: Unicode's control characters (category Cc: U+0000-001F and U+007F-009F), as a class a
#: regex scans in C; a per-character ``unicodedata`` loop was a tenth of an import.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The same without tab and line feed, which notes may contain.
_CONTROL_IN_NOTES_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TEXT_LIMITS = {"name": 200, "location": 100, "category": 100, "notes": 2000, "sheet": 64}
FIELD_DEFAULTS: dict[str, object] = {
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

FieldValue = str | bool | None
#: Register fields whose value is any text (``_fits``).
_TEXT_FIELDS = frozenset({"barcode", "name", "location", "category", "notes"})


def _check_text(name: str, value: object, *, required: bool, multiline: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(name, value, "must be text")
    text = value.strip()
    if required and not text:
        raise InvalidInput(name, value, "must not be empty")
    limit = _TEXT_LIMITS[name]
    if len(text) > limit:
        raise InvalidInput(name, value[:40] + "...", f"longer than {limit} characters")
    if (_CONTROL_IN_NOTES_RE if multiline else _CONTROL_RE).search(text):
        raise InvalidInput(name, value, "contains control characters")
    return text


def check_barcode(value: object) -> str:
    """Barcodes are what a scanner types: 1-64 printable ASCII characters, no spaces."""
    if not isinstance(value, str) or not _BARCODE_RE.match(value.strip()):
        raise InvalidInput("barcode", value, "use 1-64 printable ASCII characters, no spaces")
    return value.strip()


def check_field(name: str, value: object) -> FieldValue:
    """Validate one register value as a person or a script would set it."""
    if name == "barcode":
        return check_barcode(value)
    if name == "name":
        return _check_text(name, value, required=True)
    if name in ("location", "category"):
        return _check_text(name, value, required=False)
    if name == "notes":
        return _check_text(name, value, required=False, multiline=True)
    if name == "kind":
        if value not in KINDS:
            raise InvalidInput(name, value, "must be 'bulk' or 'serial'")
        return str(value)
    if name == "status":
        if value not in STATUSES:
            raise InvalidInput(name, value, f"must be one of {', '.join(STATUSES)}")
        return str(value)
    if name == "sheet":
        if value is None:
            return None
        sheet = _check_text(name, value, required=True)
        return sheet
    if name == "deleted":
        if not isinstance(value, bool):
            raise InvalidInput(name, value, "must be true or false")
        return value
    raise InvalidInput("field", name, f"fields are {', '.join(REGISTER_FIELDS)}")


def check_qty(value: object, *, name: str = "qty", minimum: int = 1, maximum: int = MAX_QTY) -> int:
    """Quantities are whole units within sane bounds (a typo of 10**9 is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, value, "must be a whole number")
    if not minimum <= value <= maximum:
        raise InvalidInput(name, value, f"must be between {minimum} and {maximum}")
    return value


def _fits(name: str, value: object) -> bool:
    """Whether a slot value read from a document has the type its field needs."""
    if name == "deleted":
        return isinstance(value, bool)
    if name == "sheet":
        return value is None or isinstance(value, str)
    if name == "kind":
        return value in KINDS
    if name == "status":
        return value in STATUSES
    return isinstance(value, str)


@dataclass(frozen=True, slots=True)
class Slot:
    """One station's latest write to a register field."""

    value: FieldValue
    hlc: int
    station: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "hlc": self.hlc, "station": self.station}


@dataclass(frozen=True, slots=True)
class FieldConflict:
    """Concurrent writes with different values that are both still live."""

    field: str
    chosen: FieldValue
    slots: tuple[Slot, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "chosen": self.chosen,
            "values": [slot.to_json() for slot in self.slots],
        }


@dataclass(frozen=True, slots=True)
class ItemView:
    """What a person sees of an item: each field resolved, stock summed, conflicts listed."""

    id: str
    barcode: str
    name: str
    kind: Kind
    stock: int
    status: str
    sheet: str | None
    location: str
    category: str
    notes: str
    deleted: bool
    conflicts: tuple[FieldConflict, ...]
    double_booked: bool
    #: Highest HLC of any slot; orders "last changed".
    hlc: int
    stock_by_station: Mapping[str, int] = field(default_factory=dict)
    stock_hlcs: Mapping[str, int] = field(default_factory=dict)
    field_hlcs: Mapping[str, int] = field(default_factory=dict)
    #: Whether some field holds live writes of several stations (a conflict, or the
    #: same value written concurrently): a delete that supersedes one of them may reach
    #: a station apart from the edit that made it (see ``Store._recheck_concurrent``).
    #: Bookkeeping of the store, not part of what a person sees: not compared, and not
    #: kept in index records (the ``concurrent_items`` table is).
    concurrent: bool = field(default=False, compare=False)

    @property
    def oversold(self) -> bool:
        return self.kind == "bulk" and not self.deleted and self.stock < 0

    @property
    def alerts(self) -> tuple[str, ...]:
        found: list[str] = []
        if self.oversold:
            found.append("oversold")
        if self.double_booked:
            found.append("double_booked")
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON shape of an item (documented in docs/cli.md)."""
        return {
            "id": self.id,
            "barcode": self.barcode,
            "name": self.name,
            "kind": self.kind,
            "stock": self.stock,
            "status": self.status,
            "sheet": self.sheet,
            "location": self.location,
            "category": self.category,
            "notes": self.notes,
            "deleted": self.deleted,
            "conflicts": [conflict.to_json() for conflict in self.conflicts],
            "alerts": list(self.alerts),
            "hlc": self.hlc,
        }

    def to_record(self) -> dict[str, Any]:
        """What the query index keeps of the view beside its columns (``RECORD_COLUMNS``);
        ``from_record`` of both together gives the view back.

        Not the whole view again: the columns' values in the JSON were half of each row,
        and of the time to encode it (9.2 against 5.3 us), for every item written."""
        return {
            "notes": self.notes,
            "conflicts": [conflict.to_json() for conflict in self.conflicts],
            "double_booked": self.double_booked,
            "stock_by_station": dict(self.stock_by_station),
            "stock_hlcs": dict(self.stock_hlcs),
            "field_hlcs": dict(self.field_hlcs),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ItemView:
        """The view from ``to_record`` with the ``RECORD_COLUMNS`` added (rows written
        before schema 9 held every field in the record itself)."""
        conflicts = tuple(
            FieldConflict(
                c["field"],
                c["chosen"],
                tuple(Slot(s["value"], s["hlc"], s["station"]) for s in c["values"]),
            )
            for c in record["conflicts"]
        )
        return cls(
            id=record["id"],
            barcode=record["barcode"],
            name=record["name"],
            kind="serial" if record["kind"] == "serial" else "bulk",
            stock=record["stock"],
            status=record["status"],
            sheet=record["sheet"],
            location=record["location"],
            category=record["category"],
            notes=record["notes"],
            deleted=record["deleted"],
            conflicts=conflicts,
            double_booked=record["double_booked"],
            hlc=record["hlc"],
            stock_by_station=record["stock_by_station"],
            stock_hlcs=record["stock_hlcs"],
            field_hlcs=record["field_hlcs"],
        )


#: The fields of a view the query index keeps in columns of their own (``to_record``).
RECORD_COLUMNS = (
    "id",
    "barcode",
    "name",
    "kind",
    "stock",
    "status",
    "sheet",
    "location",
    "category",
    "deleted",
    "hlc",
)


def slot_key(name: str, station: str) -> str:
    return f"{name}@{station}"


def split_slot_key(key: str) -> tuple[str, str] | None:
    name, sep, station = key.rpartition("@")
    if not sep or not name or not station:
        return None
    return name, station


def _as_int(value: object) -> int | None:
    """pycrdt returns every number as a float; accept only exact integers below 2**53."""
    if type(value) is float:  # the common case, checked first: this runs per slot
        return int(value) if value.is_integer() and abs(value) < 2**53 else None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if abs(value) < 2**53 else None


#: (hlc, station, value) of one register slot, before any Slot object is made.
_RawSlot = tuple[int, str, FieldValue]


def _parse_slots(
    raw: Mapping[str, Any],
) -> tuple[dict[str, list[_RawSlot]], dict[str, tuple[int, int]], bool]:
    """One pass over an item map: well-formed register slots by field, counters, and
    whether some field has slots of several stations (counted before values are checked:
    a newer peer's slot we cannot read may still supersede one we show).

    Slots that do not fit (a peer running a newer version, or a bad peer) are ignored
    rather than allowed to break the view. This runs for every item a checkout, an import
    or a catch-up touches, so it avoids building objects until a conflict needs them.
    """
    registers: dict[str, list[_RawSlot]] = {}
    counters: dict[str, tuple[int, int]] = {}
    written: set[str] = set()
    concurrent = False
    for key, value in raw.items():
        name, sep, station = key.rpartition("@")
        if not sep or not name or not station:
            continue
        if name != STOCK_FIELD:
            if name in written:
                concurrent = True
            else:
                written.add(name)
        if type(value) is not list or len(value) != 2:
            continue
        first, second = value
        # _as_int inlined for the float pycrdt gives back: this loop runs per slot.
        if type(second) is float and second.is_integer() and abs(second) < 2**53:
            hlc = int(second)
        else:
            checked = _as_int(second)
            if checked is None:
                continue
            hlc = checked
        if name == STOCK_FIELD:
            delta = _as_int(first)
            if delta is not None:
                counters[station] = (delta, hlc)
            continue
        if type(first) is float and not math.isfinite(first):
            first = None  # as Yrs' JSON gives it: NaN and infinities are written as null
        if (type(first) is str and name in _TEXT_FIELDS) or (
            name in FIELD_DEFAULTS and _fits(name, first)
        ):
            slots = registers.get(name)
            if slots is None:
                registers[name] = [(hlc, station, first)]
            else:
                slots.append((hlc, station, first))
    return registers, counters, concurrent


def added_item_view(
    item_id: str, station: str, hlc: int, written: Mapping[str, object], stock: int
) -> ItemView:
    """What ``item_view`` gives for an item ``station`` has just added: the register
    slots ``written`` (all at ``hlc``) and, for a bulk item, one counter of ``stock``.
    Built directly because an import of 100k items makes 100k of them; a test holds it
    equal to ``item_view`` of the same slots."""
    values = {**FIELD_DEFAULTS, **written}
    kind: Kind = "serial" if values["kind"] == "serial" else "bulk"
    status = str(values["status"])
    counted = kind == "bulk" and stock != 0
    return ItemView(
        id=item_id,
        barcode=str(values["barcode"]),
        name=str(values["name"]),
        kind=kind,
        stock=stock if kind == "bulk" else (1 if status == "in" else 0),
        status=status,
        sheet=None,
        location=str(values["location"]),
        category=str(values["category"]),
        notes=str(values["notes"]),
        deleted=False,
        conflicts=(),
        double_booked=False,
        hlc=hlc,
        stock_by_station={station: stock} if counted else {},
        stock_hlcs={station: hlc} if counted else {},
        field_hlcs=dict.fromkeys(written, hlc),
    )


def _slot_order(slot: _RawSlot) -> tuple[int, str]:
    return slot[0], slot[1]


def item_view(item_id: str, raw: Mapping[str, Any]) -> ItemView:
    """Resolve an item map (plain values, as pycrdt's ``to_py`` gives) into a view."""
    registers, counters, concurrent = _parse_slots(raw)
    values: dict[str, object] = dict(FIELD_DEFAULTS)
    field_hlcs: dict[str, int] = {}
    conflicts: list[FieldConflict] = []
    top_hlc = 0
    for name in REGISTER_FIELDS:
        live = registers.get(name)
        if live is None:
            continue
        # Latest write wins: highest HLC, ties (different stations) by station id; one
        # station has one slot per field, so the value never decides.
        best_hlc, _, best_value = live[0] if len(live) == 1 else max(live, key=_slot_order)
        values[name] = best_value
        field_hlcs[name] = best_hlc
        top_hlc = max(top_hlc, best_hlc)
        if len(live) > 1 and len({repr(slot[2]) for slot in live}) > 1:
            ordered = sorted(live, key=lambda slot: (-slot[0], slot[1]))
            slots = tuple(Slot(value, hlc, station) for hlc, station, value in ordered)
            conflicts.append(FieldConflict(name, best_value, slots))
    kind: Kind = "serial" if values["kind"] == "serial" else "bulk"
    deleted = bool(values["deleted"])
    for _, counter_hlc in counters.values():
        top_hlc = max(top_hlc, counter_hlc)
    status = str(values["status"])
    if kind == "bulk":
        stock = sum(delta for delta, _ in counters.values())
    else:
        stock = 1 if status == "in" else 0
    double_booked = (
        kind == "serial"
        and not deleted
        and sum(1 for slot in registers.get("status", ()) if slot[2] == "out") > 1
    )
    sheet = values["sheet"]
    return ItemView(
        id=item_id,
        barcode=str(values["barcode"]),
        name=str(values["name"]),
        kind=kind,
        stock=stock,
        status=status,
        sheet=sheet if isinstance(sheet, str) else None,
        location=str(values["location"]),
        category=str(values["category"]),
        notes=str(values["notes"]),
        deleted=deleted,
        conflicts=tuple(conflicts),
        double_booked=double_booked,
        hlc=top_hlc,
        stock_by_station={station: delta for station, (delta, _) in counters.items()},
        stock_hlcs={station: hlc for station, (_, hlc) in counters.items()},
        field_hlcs=field_hlcs,
        concurrent=concurrent,
    )


@dataclass(frozen=True, slots=True)
class Movement:
    """One entry of the movements ledger: what happened to which item, when, where."""

    id: str
    hlc: int
    station: str
    operator: str
    item: str
    barcode: str
    op: str
    qty: int
    sheet: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hlc": self.hlc,
            "station": self.station,
            "operator": self.operator,
            "item": self.item,
            "barcode": self.barcode,
            "op": self.op,
            "qty": self.qty,
            "sheet": self.sheet,
        }


#: One letter per operation in the stored ledger entry (saves 7 bytes per checkout).
_OP_CODES = {
    "add": "a",
    "edit": "e",
    "delete": "d",
    "checkout": "o",
    "return": "r",
    "count": "c",
    "resolve": "x",
}
_OP_NAMES = {code: name for name, code in _OP_CODES.items()}


def movement_to_raw(movement: Movement) -> list[object]:
    """The compact form a ledger entry takes in a document.

    ``[id, hlc, operator, item, barcode, op, qty, sheet]`` with both UUIDs as 16 raw
    bytes, the operation as one letter and the station implied by the array it is in:
    about 95 bytes of update per entry instead of 211 for a keyed map of strings, and a
    ledger entry rides along with every checkout that crosses the Wi-Fi.
    """
    return [
        _uuid_bytes(movement.id),
        movement.hlc,
        movement.operator,
        _uuid_bytes(movement.item),
        movement.barcode,
        _OP_CODES.get(movement.op, movement.op),
        movement.qty,
        movement.sheet,
    ]


def _uuid_bytes(text: str) -> bytes:
    """The 16 bytes of a UUID's text form (what ``uuid.UUID(text).bytes`` gives, faster)."""
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a UUID: {text!r}")
    return raw


def _uuid_of(value: object) -> str | None:
    """The UUID text of 16 raw bytes as a ledger entry holds them (bytes, or a list of
    numbers after a round trip through JSON). A new station decodes every entry of the
    ledger while it catches up, so this avoids building ``uuid.UUID`` objects."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, list):
        try:
            raw = bytes(value)  # a list of ints 0-255
        except (TypeError, ValueError):
            if not all(isinstance(b, int | float) for b in value):
                return None
            try:
                raw = bytes(int(b) for b in value)
            except ValueError:
                return None
    else:
        return None
    if len(raw) != 16:
        return None
    return uuid_text(raw.hex())


def movement_from_raw(station: str, raw: object) -> Movement | None:
    """Decode a ledger entry of ``station`` as stored; ``None`` if it is malformed."""
    if not isinstance(raw, list) or len(raw) != 8:
        return None
    ident, hlc_raw, operator, item_raw, barcode, op, qty_raw, sheet = raw
    movement_id, item = _uuid_of(ident), _uuid_of(item_raw)
    hlc, qty = _as_int(hlc_raw), _as_int(qty_raw)
    if movement_id is None or item is None or hlc is None or qty is None:
        return None
    if not all(isinstance(text, str) for text in (operator, barcode, op)):
        return None
    if type(sheet) is float and not math.isfinite(sheet):
        sheet = None  # as Yrs' JSON gives it (see _parse_slots)
    if sheet is not None and not isinstance(sheet, str):
        return None
    name = _OP_NAMES.get(str(op), str(op))
    return Movement(movement_id, hlc, station, str(operator), item, str(barcode), name, qty, sheet)
