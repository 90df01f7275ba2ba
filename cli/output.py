"""How the CLI shows things to people: aligned tables and plain sentences.

``--json`` output bypasses this module entirely (one JSON document per command), so
wording here can improve without breaking scripts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import click

_COUNTER_BITS = 11


def when(hlc: int) -> str:
    """The wall-clock time of an HLC value, in UTC."""
    moment = dt.datetime.fromtimestamp((hlc >> _COUNTER_BITS) / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def label(item: Mapping[str, Any]) -> str:
    return f"{item['name']} ({item['barcode']})"


def item_block(item: Mapping[str, Any]) -> str:
    lines = [
        f"{item['name']}",
        f"  barcode   {item['barcode']}",
        f"  id        {item['id']}",
        f"  kind      {item['kind']}",
    ]
    if item["kind"] == "serial":
        sheet = f" (sheet {item['sheet']})" if item.get("sheet") else ""
        lines.append(f"  status    {item['status']}{sheet}")
    else:
        lines.append(f"  stock     {item['stock']}")
    for key in ("location", "category", "notes"):
        if item.get(key):
            lines.append(f"  {key:<9} {item[key]}")
    if item.get("deleted"):
        lines.append("  DELETED")
    for alert in item.get("alerts", []):
        lines.append(f"  ALERT     {alert.replace('_', ' ')}")
    for conflict in item.get("conflicts", []):
        lines.append(f"  CONFLICT  {conflict_line(conflict)}")
    return "\n".join(lines)


def conflict_line(conflict: Mapping[str, Any]) -> str:
    values = ", ".join(
        f"{v['value']!r} from {v['station']} at {when(v['hlc'])}" for v in conflict["values"]
    )
    return f"{conflict['field']}: showing {conflict['chosen']!r}; values: {values}"


def items_table(items: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            item["barcode"],
            item["name"],
            item["kind"],
            item["stock"],
            item["status"] if item["kind"] == "serial" else "",
            item["location"],
            "deleted"
            if item.get("deleted")
            else ("!" if item.get("conflicts") or item.get("alerts") else ""),
        )
        for item in items
    ]
    return table(("BARCODE", "NAME", "KIND", "STOCK", "STATUS", "LOCATION", ""), rows)


def movements_table(movements: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            when(m["hlc"]),
            m["station"],
            m["operator"],
            m["op"],
            m["qty"],
            m["sheet"] or "",
        )
        for m in movements
    ]
    return table(("TIME (UTC)", "STATION", "OPERATOR", "OP", "QTY", "SHEET"), rows)


def movement_sentence(action: str, qty: int, item: Mapping[str, Any]) -> str:
    """'Checked out 2 × QSC K10.2 Speaker (SPK001): 6 left' and its relatives."""
    if item["kind"] == "serial":
        where = f" to sheet {item['sheet']}" if item.get("sheet") else ""
        if action == "checkout":
            return f"Checked out {label(item)}{where}"
        return f"Returned {label(item)}: in"
    if action == "checkout":
        return f"Checked out {qty} × {label(item)}: {item['stock']} left"
    return f"Returned {qty} × {label(item)}: {item['stock']} in stock"


def peers_table(peers: Sequence[Mapping[str, Any]]) -> str:
    if not peers:
        return "No peers known yet."
    rows = []
    for peer in peers:
        since = dt.datetime.fromtimestamp(peer["since"], tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lacking = "" if peer["lacking"] is None else peer["lacking"]
        rows.append(
            (
                peer["station_id"],
                peer["name"],
                peer["address"],
                peer["state"],
                since,
                lacking,
                peer.get("last_error") or "",
            )
        )
    return table(
        ("STATION", "NAME", "ADDRESS", "STATE", "SINCE (UTC)", "LACKING", "LAST ERROR"), rows
    )


def moment(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def refusals(refused: Sequence[Mapping[str, Any]]) -> str:
    """Connections refused for who the peer was (another fleet, revoked, not TLS...)."""
    if not refused:
        return ""
    rows = [
        (
            moment(r["at"]),
            r["direction"],
            r["address"],
            r.get("station_id") or "?",
            r["reason"],
        )
        for r in refused
    ]
    return "\n\nRefused connections:\n" + table(
        ("WHEN", "DIRECTION", "ADDRESS", "STATION", "REASON"), rows
    )


def members_table(members: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            m["station_id"] + (" *" if m.get("this_station") else ""),
            m["name"],
            moment(m["enrolled_at"]),
            moment(m["last_seen"]),
            "revoked " + moment(m["revoked_at"]) if m["revoked"] else "",
        )
        for m in members
    ]
    return table(("STATION", "NAME", "ENROLLED", "LAST SEEN", "REVOKED"), rows)


def warn(message: str) -> None:
    click.echo(click.style(message, fg="yellow"), err=True)
