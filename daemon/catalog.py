"""Catalog import rows: mapping CSV columns onto new items, reporting bad rows by line.

The CLI reads the file and sends records with their line numbers; this module decides
which columns mean what and which rows are acceptable, so the rules live in one place
(the daemon) whatever client sends the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from crdt_store import InvalidInput, NewItem
from crdt_store.model import Kind
from crdt_store.store import check_new_item

COLUMNS = ("barcode", "name", "qty", "kind", "location", "category", "notes")
REQUIRED = ("barcode", "name")
#: Columns ``invsync export`` writes after the import columns. They describe the item's
#: state on the exporting station, not the catalog, so an import accepts and ignores them:
#: an exported file must import into an empty station as the same catalog.
EXPORT_ONLY = ("id", "stock", "status", "sheet")


@dataclass(frozen=True, slots=True)
class RowProblem:
    line: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "message": self.message}


def header_columns(header: Sequence[str]) -> list[str]:
    """Normalise the header row; unknown or missing columns are refused up front."""
    names = [column.strip().lower() for column in header]
    unknown = [name for name in names if name not in COLUMNS and name not in EXPORT_ONLY]
    if unknown:
        raise InvalidInput("header", unknown[0], f"columns are {', '.join(COLUMNS)}")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise InvalidInput("header", ",".join(header), f"the {missing[0]} column is required")
    if len(set(names)) != len(names):
        raise InvalidInput("header", ",".join(header), "a column appears twice")
    return names


def parse_rows(
    header: Sequence[str], records: Iterable[tuple[int, Sequence[str]]]
) -> tuple[list[tuple[int, NewItem]], list[RowProblem]]:
    """Turn ``(line, values)`` records into validated items, or a problem per line."""
    columns = header_columns(header)
    good: list[tuple[int, NewItem]] = []
    problems: list[RowProblem] = []
    for line, values in records:
        if len(values) != len(columns):
            problems.append(
                RowProblem(line, f"expected {len(columns)} columns, found {len(values)}")
            )
            continue
        row = dict(zip(columns, (value.strip() for value in values), strict=True))
        try:
            qty_text = row.get("qty") or "0"
            try:
                qty = int(qty_text)
            except ValueError:
                raise InvalidInput("qty", qty_text, "must be a whole number") from None
            kind = (row.get("kind") or "bulk").lower()
            new = check_new_item(
                NewItem(
                    barcode=row["barcode"],
                    name=row["name"],
                    kind=cast(Kind, kind),  # check_new_item validates it
                    qty=qty if kind != "serial" or qty else 0,
                    location=row.get("location", ""),
                    category=row.get("category", ""),
                    notes=row.get("notes", ""),
                )
            )
        except InvalidInput as exc:
            problems.append(RowProblem(line, str(exc)))
            continue
        good.append((line, new))
    return good, problems
