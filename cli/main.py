"""``invsync``: the command line of a station.

Thin by design: parse, call the daemon's control API, print, and map errors to exit
codes (0 ok, 1 failed, 2 usage, 3 daemon not reachable). ``--json`` prints one JSON
document per command (the scan loop: one object per line), documented in docs/cli.md.
Heavy imports (pycrdt, aiohttp) stay out of this path so the CLI starts fast.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from . import output
from .client import ApiFailure, ControlClient, DaemonUnreachable, default_socket_path, item_route

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
IMPORT_CHUNK = 500
EXPORT_PAGE = 1000
CSV_COLUMNS = ("barcode", "name", "qty", "kind", "location", "category", "notes")
#: How long the scan loop keeps retrying while the daemon restarts.
SCAN_RETRY_SECONDS = 60.0


@dataclass
class Context:
    socket_path: Path
    as_json: bool
    operator: str
    _client: ControlClient | None = None
    #: Whether the daemon answered at least once during this command.
    reached: bool = False

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.socket_path)
        return self._client

    def call(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        try:
            return self.client.request(method, route, body, query)
        except DaemonUnreachable as exc:
            unreachable(exc)
        except ApiFailure as exc:
            self.fail(exc)

    def fail(self, exc: ApiFailure) -> NoReturn:
        if self.as_json:
            click.echo(json.dumps({"error": {"code": exc.code, "message": str(exc), **exc.body}}))
        else:
            click.echo(f"invsync: {exc}", err=True)
        sys.exit(EXIT_FAILED)

    def emit(self, data: Any, human: str | Callable[[], str]) -> None:
        if self.as_json:
            click.echo(json.dumps(data))
        else:
            click.echo(human if isinstance(human, str) else human())


def unreachable(exc: DaemonUnreachable) -> NoReturn:
    click.echo(f"invsync: {exc}", err=True)
    click.echo(
        "Start the daemon with 'invsyncd' (or 'sudo systemctl start invsyncd'), or point "
        "--socket / INVSYNC_SOCKET at its control socket.",
        err=True,
    )
    sys.exit(EXIT_UNREACHABLE)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="INVSYNC_SOCKET",
    help="Control socket of the daemon (default: the station's).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
@click.option(
    "--operator",
    envvar="INVSYNC_OPERATOR",
    default=lambda: os.environ.get("USER", ""),
    help="Who is working (recorded in the history; default $USER).",
)
@click.version_option(package_name="invsync", prog_name="invsync")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, as_json: bool, operator: str) -> None:
    """invsync: local-first inventory sync for warehouse scanner stations."""
    state = Context(socket_path or default_socket_path(), as_json, operator or "")
    ctx.obj = state
    ctx.call_on_close(lambda: state._client.close() if state._client else None)


# ---------------------------------------------------------------------- status


@main.command()
@pass_ctx
def status(ctx: Context) -> None:
    """Show this station, its inventory and whether everything is synced."""
    data = ctx.call("GET", "status")

    def human() -> str:
        station = data["station"]
        lines = [
            f"Station   {station['name']} ({station['id']})",
            f"Items     {data['items']}",
            f"Conflicts {data['conflicts']}    Alerts {data['alerts']}",
        ]
        fleet = data.get("fleet", {})
        if fleet.get("available"):
            admin = ", holds the fleet CA" if fleet.get("holds_ca") else ""
            revoked = f", {fleet['revoked']} revoked" if fleet.get("revoked") else ""
            lines.append(f"Fleet     {fleet['id']}{admin}{revoked}")
        peers = data.get("peers", {})
        if peers.get("available"):
            synced = "in sync" if peers.get("in_sync") else f"{peers.get('lacking', 0)} to send"
            lines.append(
                f"Peers     {peers.get('connected', 0)} connected of {peers.get('known', 0)} "
                f"known; {synced}"
            )
        else:
            lines.append("Peers     peer sync is not running")
        cloud = data.get("cloud", {})
        lines.append("Cloud     " + _cloud_line(cloud))
        for warning in data.get("clock_warnings", []):
            lines.append(
                f"WARNING   station {warning['station']} clock is "
                f"{warning['ahead_ms'] / 60000:.1f} min ahead"
            )
        return "\n".join(lines)

    ctx.emit(data, human)


@main.command()
@pass_ctx
def peers(ctx: Context) -> None:
    """List the other stations of the fleet and their sync state."""
    data = ctx.call("GET", "peers")
    ctx.emit(
        data,
        lambda: output.peers_table(data["peers"]) + output.refusals(data.get("refused", [])),
    )


@main.command()
@click.option("--timeout", type=click.FloatRange(0, 600), default=30.0, show_default=True)
@pass_ctx
def sync(ctx: Context, timeout: float) -> None:
    """Exchange changes with every peer now and wait until each has all of ours."""
    ctx.call("POST", "sync", {"wait": False})
    deadline = time.monotonic() + timeout
    show = sys.stderr.isatty() and not ctx.as_json
    while True:
        found = ctx.call("GET", "peers")["peers"]
        connected = [p for p in found if p["state"] == "connected"]
        to_go = sum(p["lacking"] or 0 for p in connected)
        if show:
            click.echo(
                f"\rSyncing with {len(connected)} peers: {to_go} changes to go   ",
                nl=False,
                err=True,
            )
        if to_go == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if show:
        click.echo(err=True)
    data = {"peers": found, "in_sync": to_go == 0}

    def human() -> str:
        if not connected:
            return "No peers connected; nothing to sync with."
        if to_go == 0:
            return f"In sync with {len(connected)} peers."
        behind = ", ".join(
            f"{p['name'] or p['station_id']} ({p['lacking']})" for p in connected if p["lacking"]
        )
        return f"Timed out after {timeout:g}s; still behind: {behind}"

    ctx.emit(data, human)
    if to_go:
        sys.exit(EXIT_FAILED)


# ---------------------------------------------------------------------- items


@main.group()
def item() -> None:
    """Add, show, list, edit and remove items."""


@item.command("add")
@click.argument("barcode")
@click.option("--name", required=True, help="What people call it.")
@click.option("--qty", type=int, default=0, show_default=True, help="Units on the shelf now.")
@click.option("--serial", is_flag=True, help="One barcode = one physical unit.")
@click.option("--location", default="", help="Where it lives (aisle, shelf, bin).")
@click.option("--category", default="", help="Audio, Lighting, Cables...")
@click.option("--notes", default="", help="Anything else.")
@pass_ctx
def item_add(
    ctx: Context,
    barcode: str,
    name: str,
    qty: int,
    serial: bool,
    location: str,
    category: str,
    notes: str,
) -> None:
    """Add an item with BARCODE."""
    body = {
        "barcode": barcode,
        "name": name,
        "qty": 1 if serial and qty == 0 else qty,
        "kind": "serial" if serial else "bulk",
        "location": location,
        "category": category,
        "notes": notes,
        "operator": ctx.operator,
    }
    data = ctx.call("POST", "items", body)
    added = data["item"]
    ctx.emit(data, f"Added {output.label(added)}: {added['stock']} in stock")


@item.command("show")
@click.argument("barcode")
@pass_ctx
def item_show(ctx: Context, barcode: str) -> None:
    """Show the item with BARCODE (or item id)."""
    data = ctx.call("GET", item_route(barcode))

    def human() -> str:
        blocks = [output.item_block(found) for found in data["items"]]
        if len(blocks) > 1:
            blocks.insert(0, f"{len(blocks)} items share barcode {barcode}:")
        return "\n\n".join(blocks)

    ctx.emit(data, human)


@item.command("list")
@click.option("--search", "-s", default=None, help="Text in barcode, name, location or category.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--deleted", is_flag=True, help="Include deleted items.")
@pass_ctx
def item_list(ctx: Context, search: str | None, limit: int, offset: int, deleted: bool) -> None:
    """List items, by name."""
    query = {
        "search": search,
        "limit": limit,
        "offset": offset,
        "deleted": "1" if deleted else None,
    }
    data = ctx.call("GET", "items", query=query)
    ctx.emit(data, lambda: output.items_table(data["items"]) if data["items"] else "No items.")


@item.command("edit")
@click.argument("barcode")
@click.option("--name")
@click.option("--barcode", "new_barcode", help="Give the item a new barcode.")
@click.option("--location")
@click.option("--category")
@click.option("--notes")
@click.option("--status", type=click.Choice(["in", "repair", "lost"]), help="Serialized units.")
@pass_ctx
def item_edit(ctx: Context, /, barcode: str, new_barcode: str | None, **fields: str | None) -> None:
    """Change fields of the item with BARCODE."""
    changes = {key: value for key, value in fields.items() if value is not None}
    if new_barcode is not None:
        changes["barcode"] = new_barcode
    if not changes:
        raise click.UsageError("give at least one field to change, e.g. --name or --location")
    data = ctx.call("PATCH", item_route(barcode), {"changes": changes, "operator": ctx.operator})
    ctx.emit(data, f"Updated {output.label(data['item'])}: {', '.join(sorted(changes))}")


@item.command("rm")
@click.argument("barcode")
@pass_ctx
def item_rm(ctx: Context, barcode: str) -> None:
    """Delete the item with BARCODE (its history is kept)."""
    data = ctx.call("DELETE", item_route(barcode), query={"operator": ctx.operator})
    ctx.emit(data, f"Deleted {output.label(data['item'])}")


# ---------------------------------------------------------------------- stock


def _stock_call(ctx: Context, action: str, barcode: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "operator": ctx.operator, "op_id": str(uuid.uuid4())}
    return ctx.call("POST", item_route(barcode, action), body)


@main.command()
@click.argument("barcode")
@click.option("--qty", type=int, default=1, show_default=True)
@click.option("--sheet", help="Pull sheet (job or event) the units go out on.")
@pass_ctx
def checkout(ctx: Context, barcode: str, qty: int, sheet: str | None) -> None:
    """Check units of BARCODE out."""
    data = _stock_call(ctx, "checkout", barcode, {"qty": qty, "sheet": sheet})
    ctx.emit(data, output.movement_sentence("checkout", qty, data["item"]))


@main.command("return")
@click.argument("barcode")
@click.option("--qty", type=int, default=1, show_default=True)
@click.option("--sheet", help="Pull sheet the units come back from.")
@pass_ctx
def return_(ctx: Context, barcode: str, qty: int, sheet: str | None) -> None:
    """Return units of BARCODE."""
    data = _stock_call(ctx, "return", barcode, {"qty": qty, "sheet": sheet})
    ctx.emit(data, output.movement_sentence("return", qty, data["item"]))


@main.command()
@click.argument("barcode")
@click.argument("qty", type=int)
@pass_ctx
def count(ctx: Context, barcode: str, qty: int) -> None:
    """Record that QTY units of BARCODE are on the shelf."""
    data = _stock_call(ctx, "count", barcode, {"counted": qty})
    change = data["change"]
    ctx.emit(data, f"Counted {qty} × {output.label(data['item'])}: {change:+d}")


@main.command()
@click.argument("barcode")
@pass_ctx
def history(ctx: Context, barcode: str) -> None:
    """Every movement of BARCODE, across all stations, oldest first."""
    data = ctx.call("GET", item_route(barcode, "history"))
    ctx.emit(data, lambda: output.movements_table(data["movements"]))


# ---------------------------------------------------------------------- scan loop


@dataclass
class _Tally:
    scans: int = 0
    ok: int = 0
    not_found: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "scans": self.scans,
            "ok": self.ok,
            "not_found": self.not_found,
            "failed": self.failed,
        }


def _scan_once(
    ctx: Context, mode: str, barcode: str, qty: int, sheet: str | None
) -> dict[str, Any]:
    """One scan, retried (with the same operation id) while the daemon restarts."""
    if mode == "lookup":
        method, route, body = "GET", item_route(barcode), None
    else:
        payload: dict[str, Any] = {"counted": qty} if mode == "count" else {"qty": qty}
        if sheet and mode in ("checkout", "return"):
            payload["sheet"] = sheet
        payload.update(operator=ctx.operator, op_id=str(uuid.uuid4()))
        method, route, body = "POST", item_route(barcode, mode), payload
    deadline = time.monotonic() + SCAN_RETRY_SECONDS
    warned = False
    while True:
        try:
            answer = ctx.client.request(method, route, body)
            ctx.reached = True
            return answer
        except DaemonUnreachable as exc:
            # Only a daemon we have already talked to is worth waiting for (a restart);
            # a wrong socket path fails at once.
            if not ctx.reached or time.monotonic() >= deadline:
                raise
            if not warned:
                click.echo(f"invsync: {exc.reason}; retrying...", err=True)
                warned = True
            ctx.client.close()
            time.sleep(0.2)


def _scan_line(mode: str, barcode: str, qty: int, data: dict[str, Any]) -> str:
    if mode == "lookup":
        found = data["items"]
        if len(found) > 1:
            return f"{barcode}: {len(found)} items share this barcode"
        entry = found[0]
        state = entry["status"] if entry["kind"] == "serial" else f"{entry['stock']} in stock"
        return f"{output.label(entry)}: {state}"
    if mode == "count":
        return f"Counted {qty} × {output.label(data['item'])}: {data['change']:+d}"
    return output.movement_sentence(mode, qty, data["item"])


def _barcodes(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        code = line.strip()
        if code:
            yield code


@main.command()
@click.argument("barcode", required=False)
@click.option(
    "--mode",
    type=click.Choice(["lookup", "checkout", "return", "count"]),
    default="lookup",
    show_default=True,
)
@click.option(
    "--qty", type=int, default=1, show_default=True, help="Units per scan (count: on shelf)."
)
@click.option("--sheet", help="Pull sheet for checkout/return.")
@pass_ctx
def scan(ctx: Context, barcode: str | None, mode: str, qty: int, sheet: str | None) -> None:
    """Scan BARCODE, or with no BARCODE read one barcode per line from stdin.

    The loop keeps going on unknown barcodes, and ends on EOF or Ctrl-C with a summary.
    """
    tally = _Tally()
    ctx.call("GET", "status")  # fail fast (exit 3) on a wrong socket, before reading scans
    ctx.reached = True
    codes: Iterator[str] = iter([barcode]) if barcode else _barcodes(sys.stdin)
    if barcode is None and sys.stdin.isatty() and not ctx.as_json:
        click.echo(f"Scanning ({mode}). Scan a barcode, Ctrl-D or Ctrl-C to finish.", err=True)
    try:
        for code in codes:
            tally.scans += 1
            try:
                data = _scan_once(ctx, mode, code, qty, sheet)
            except DaemonUnreachable as exc:
                _scan_summary(ctx, tally, single=barcode is not None)
                unreachable(exc)
            except ApiFailure as exc:
                if exc.code == "not_found":
                    tally.not_found += 1
                    result = {"barcode": code, "ok": False, "error": "not_found"}
                    human = f"{code}: not found"
                else:
                    tally.failed += 1
                    result = {"barcode": code, "ok": False, "error": exc.code, "message": str(exc)}
                    human = f"{code}: {exc}"
                ctx.emit(result, human)
                continue
            tally.ok += 1
            ctx.emit({"barcode": code, "ok": True, **data}, _scan_line(mode, code, qty, data))
    except KeyboardInterrupt:
        pass
    _scan_summary(ctx, tally, single=barcode is not None)
    if barcode is not None and tally.ok == 0:
        sys.exit(EXIT_FAILED)


def _scan_summary(ctx: Context, tally: _Tally, *, single: bool) -> None:
    if single:
        return
    if ctx.as_json:
        click.echo(json.dumps({"summary": tally.to_json()}))
    else:
        click.echo(
            f"{tally.scans} scans: {tally.ok} ok, {tally.not_found} not found, "
            f"{tally.failed} failed",
            err=True,
        )


# ---------------------------------------------------------------------- conflicts


@main.group(invoke_without_command=True)
@click.pass_context
def conflicts(click_ctx: click.Context) -> None:
    """List conflicts resolved automatically, and alerts (oversold, double-booked)."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx: Context = click_ctx.obj
    data = ctx.call("GET", "conflicts")

    def human() -> str:
        if not data["conflicts"] and not data["alerts"]:
            return "No conflicts and no alerts."
        lines = []
        for entry in data["conflicts"]:
            lines.append(output.label(entry))
            lines += [f"  {output.conflict_line(c)}" for c in entry["conflicts"]]
        for alert in data["alerts"]:
            names = ", ".join(output.label(i) for i in alert["items"])
            lines.append(f"ALERT {alert['kind'].replace('_', ' ')}: {names}")
        lines.append("Pick a value with: invsync conflicts resolve BARCODE FIELD VALUE")
        return "\n".join(lines)

    ctx.emit(data, human)


@conflicts.command("resolve")
@click.argument("barcode")
@click.argument("field")
@click.argument("value")
@pass_ctx
def conflicts_resolve(ctx: Context, barcode: str, field: str, value: str) -> None:
    """Set FIELD of BARCODE to VALUE, replacing every conflicting value."""
    body = {"key": barcode, "field": field, "value": value, "operator": ctx.operator}
    data = ctx.call("POST", "conflicts/resolve", body)
    ctx.emit(data, f"Resolved {field} of {output.label(data['item'])}: {value}")


# ---------------------------------------------------------------------- import / export


def _progress(total: int, label: str, quiet: bool) -> Any:
    """A progress bar on a terminal; nothing when piped or with --json."""
    show = not quiet and sys.stderr.isatty()
    return click.progressbar(length=total, label=label, file=sys.stderr, hidden=not show)


@main.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@pass_ctx
def import_(ctx: Context, file: IO[str]) -> None:
    """Import a catalog CSV (header: barcode,name,qty,kind,location,category,notes).

    Bad rows are reported by line number and skipped; rows whose barcode already exists
    are skipped. Every good row is imported whole or not at all.
    """
    text = file.read()
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise click.UsageError(f"{file.name} is empty: expected a header row") from None
    records: list[dict[str, Any]] = []
    try:
        for values in reader:
            if any(v.strip() for v in values):
                records.append({"line": reader.line_num, "values": values})
    except csv.Error as exc:
        raise click.UsageError(f"{file.name} line {reader.line_num}: {exc}") from None
    imported = 0
    skipped: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    import_id = str(uuid.uuid4())
    with _progress(len(records), "Importing", ctx.as_json) as bar:
        for start in range(0, len(records), IMPORT_CHUNK):
            chunk = records[start : start + IMPORT_CHUNK]
            body = {
                "header": header,
                "rows": chunk,
                "operator": ctx.operator,
                "import_id": import_id,
            }
            data = ctx.call("POST", "import", body)
            imported += data["imported"]
            skipped += data["skipped"]
            errors += data["errors"]
            bar.update(len(chunk))
    if not records:
        # Still check the header, so a wrong file is reported, not silently accepted.
        ctx.call("POST", "import", {"header": header, "rows": []})
    totals = {"imported": imported, "skipped": skipped, "errors": errors}

    def human() -> str:
        lines = [f"line {e['line']}: {e['message']}" for e in errors]
        lines.append(
            f"Imported {imported} items; {len(skipped)} already present; "
            f"{len(errors)} rows with errors skipped"
        )
        return "\n".join(lines)

    ctx.emit(totals, human)
    if errors:
        sys.exit(EXIT_FAILED)


def export_row(entry: dict[str, Any]) -> list[Any]:
    """One item as an export CSV row: the import columns, then the station's state.

    ``qty`` is what an import creates: an oversold item (stock below zero after merged
    checkouts) exports 0 there, since no catalog starts below zero; the ``stock`` column
    keeps the real figure. A serialized unit is one unit wherever it is.
    """
    qty = max(entry["stock"], 0) if entry["kind"] == "bulk" else 1
    return [
        entry["barcode"],
        entry["name"],
        qty,
        entry["kind"],
        entry["location"],
        entry["category"],
        entry["notes"],
        entry["id"],
        entry["stock"],
        entry["status"],
        entry["sheet"] or "",
    ]


@main.command()
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: stdout).",
)
@pass_ctx
def export(ctx: Context, fmt: str, out: Path | None) -> None:
    """Export every item (CSV with the import columns plus id, stock and status)."""
    total = ctx.call("GET", "status")["items"]
    items: list[dict[str, Any]] = []
    with _progress(total, "Exporting", ctx.as_json or out is None) as bar:
        offset = 0
        while True:
            page = ctx.call("GET", "items", query={"limit": EXPORT_PAGE, "offset": offset})["items"]
            items += page
            bar.update(len(page))
            if len(page) < EXPORT_PAGE:
                break
            offset += EXPORT_PAGE
    handle: IO[str] = out.open("w", encoding="utf-8", newline="") if out else sys.stdout
    try:
        if fmt == "json":
            json.dump({"items": items}, handle, indent=2 if out else None)
            handle.write("\n")
        else:
            writer = csv.writer(handle)
            writer.writerow([*CSV_COLUMNS, "id", "stock", "status", "sheet"])
            writer.writerows(export_row(entry) for entry in items)
    finally:
        if out:
            handle.close()
    if out:
        summary = {"exported": len(items), "file": str(out), "format": fmt}
        ctx.emit(summary, f"Exported {len(items)} items to {out}")


# ---------------------------------------------------------------------- fleet and cloud


@main.group()
def fleet() -> None:
    """This station's fleet: id, members, enrollment and revocation."""


@fleet.command("id")
@pass_ctx
def fleet_id(ctx: Context) -> None:
    """Print this station's id (what 'fleet revoke' takes); --json adds the fleet's id
    and whether this station holds the fleet CA."""
    data = ctx.call("GET", "fleet")
    summary = {k: data[k] for k in ("station_id", "name", "fleet_id", "holds_ca")}
    ctx.emit(summary, data["station_id"])


@fleet.command("members")
@pass_ctx
def fleet_members(ctx: Context) -> None:
    """List the stations of the fleet: enrolled when, last seen, revoked."""
    data = ctx.call("GET", "fleet")
    ctx.emit({"members": data["members"]}, lambda: output.members_table(data["members"]))


@fleet.command("invite")
@click.option("--expires", default="15m", show_default=True, help="e.g. 15m, 2h, 1d (max 7d).")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    help="HOST:PORT the new station should reach this one at (default: this station's).",
)
@pass_ctx
def fleet_invite(ctx: Context, expires: str, addresses: tuple[str, ...]) -> None:
    """Print a one-time token that lets a new station join (needs the fleet CA)."""
    data = ctx.call("POST", "fleet/invite", {"expires": expires, "addresses": list(addresses)})
    until = output.moment(data["expires_at"])
    short = (
        f"Short form for a QR code or typing:\n\n  {data['short']}\n\n" if data.get("short") else ""
    )
    ctx.emit(
        data,
        f"Join token (single use, expires {until}):\n\n  {data['token']}\n\n{short}"
        "On the new station run: invsync fleet join TOKEN",
    )


@fleet.command("join")
@click.argument("token")
@click.option("--force", is_flag=True, help="Leave a fleet whose CA this station holds.")
@pass_ctx
def fleet_join(ctx: Context, token: str, force: bool) -> None:
    """Join the fleet that issued TOKEN; this station's items merge into it."""
    data = ctx.call("POST", "fleet/join", {"token": token, "force": force})
    ctx.emit(data, f"Joined fleet {data['fleet_id']} via {data['via']}; syncing with it now.")


@fleet.command("revoke")
@click.argument("station_id")
@pass_ctx
def fleet_revoke(ctx: Context, station_id: str) -> None:
    """Cut STATION_ID off the fleet (needs the fleet CA); every station refuses it."""
    data = ctx.call("POST", "fleet/revoke", {"station_id": station_id})
    ctx.emit(data, f"Revoked {station_id}; the fleet will refuse it from now on.")


def _passphrase(passphrase_file: str | None, *, confirm: bool) -> str:
    if passphrase_file is not None:
        try:
            with open(passphrase_file, encoding="utf-8") as handle:
                return handle.readline().rstrip("\r\n")
        except OSError as exc:
            raise click.UsageError(f"cannot read {passphrase_file}: {exc.strerror}") from exc
    text: str = click.prompt(
        "Passphrase for the CA key", hide_input=True, confirmation_prompt=confirm, err=True
    )
    return text


@fleet.command("export-ca")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="First line: passphrase.")
@pass_ctx
def fleet_export_ca(ctx: Context, file: str, passphrase_file: str | None) -> None:
    """Write the fleet CA (key encrypted with a passphrase) to FILE for another admin."""
    passphrase = _passphrase(passphrase_file, confirm=True)
    data = ctx.call("POST", "fleet/export-ca", {"passphrase": passphrase})
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.UsageError(f"{file} exists; choose a new file name") from None
    except OSError as exc:
        raise click.UsageError(f"cannot create {file}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(data["pem"])
    ctx.emit({"file": file}, f"Wrote the fleet CA to {file} (mode 0600). Keep it safe.")


@fleet.command("import-ca")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="First line: passphrase.")
@pass_ctx
def fleet_import_ca(ctx: Context, file: str, passphrase_file: str | None) -> None:
    """Make this station an admin station with a CA written by 'fleet export-ca'."""
    with open(file, encoding="ascii", errors="replace") as handle:
        pem = handle.read(64 * 1024)
    passphrase = _passphrase(passphrase_file, confirm=False)
    data = ctx.call("POST", "fleet/import-ca", {"pem": pem, "passphrase": passphrase})
    ctx.emit(data, f"This station now holds the CA of fleet {data['fleet_id']}.")


@main.group()
def cloud() -> None:
    """The Supabase/Postgres cloud bridge (see docs/cloud.md)."""


def _cloud_when(stamp: str | None) -> str:
    """An ISO time from the daemon as local wall-clock time, or 'never'."""
    if not stamp:
        return "never"
    moment = dt.datetime.fromisoformat(stamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _cloud_line(cloud: dict[str, Any]) -> str:
    """The cloud part of ``invsync status``."""
    if not cloud.get("configured"):
        return "not configured"
    backlog = cloud.get("backlog", {})
    text = (
        f"{cloud.get('transport')}, {str(cloud.get('state')).replace('_', ' ')}; "
        f"{backlog.get('items', 0)} items and {backlog.get('movements', 0)} movements to push"
    )
    if cloud.get("parked_count"):
        text += f"; {cloud['parked_count']} parked"
    if cloud.get("next_retry"):
        text += f"; retry at {_cloud_when(cloud['next_retry'])}"
    return text


def _cloud_status_text(data: dict[str, Any]) -> str:
    if not data.get("configured"):
        return (
            "Cloud bridge not configured on this station "
            "(set [cloud] url or INVSYNC_CLOUD_URL; see docs/cloud.md)."
        )
    backlog = data["backlog"]
    state = str(data["state"]).replace("_", " ")
    activity = data.get("activity")
    if activity and activity["kind"] == "push" and activity["total"]:
        state += f" ({activity['items'] + activity['movements']} of {activity['total']} rows)"
    last_push = data.get("last_push") or {}
    last_pull = data.get("last_pull") or {}
    lines = [
        f"Cloud       {data['transport']}  {data['url']}",
        f"Fleet       {data['fleet']}",
        f"State       {state}",
        f"Backlog     {backlog['items']} items, {backlog['movements']} movements",
        f"Parked      {data['parked_count']} rows",
        f"Last push   {_cloud_when(last_push.get('finished_at') if last_push.get('ok') else None)}",
        f"Last pull   {_cloud_when(last_pull.get('finished_at') if last_pull.get('ok') else None)}",
    ]
    if data.get("last_error"):
        error = data["last_error"]
        lines.append(f"Last error  {error['message']} ({_cloud_when(error['at'])})")
    if data.get("next_retry"):
        lines.append(f"Next retry  {_cloud_when(data['next_retry'])}")
    if data.get("parked"):
        lines.append("")
        lines.append("Parked rows (the cloud refused them; retried when the item changes or")
        lines.append("by 'invsync cloud push'):")
        rows = [(p["kind"], p["barcode"], p["id"], p["error"]) for p in data["parked"]]
        lines.append(output.table(("KIND", "BARCODE", "ID", "ERROR"), rows))
    if data.get("refused"):
        lines.append("")
        lines.append("Web values refused (the stations' values were pushed back):")
        rows = [
            (r["barcode"] or r["item"], r["field"], r["value"], r["reason"])
            for r in data["refused"]
        ]
        lines.append(output.table(("ITEM", "FIELD", "VALUE", "REASON"), rows))
    return "\n".join(lines)


@cloud.command("status")
@pass_ctx
def cloud_status(ctx: Context) -> None:
    """Whether the bridge is configured, its backlog, parked rows and last error."""
    data = ctx.call("GET", "cloud")
    ctx.emit(data, lambda: _cloud_status_text(data))


def _cloud_run(ctx: Context, kind: str, timeout: float) -> dict[str, Any]:
    """Start a push or pull in the daemon and follow it until it is done."""
    run = str(ctx.call("POST", f"cloud/{kind}", {"wait": False})["run"])
    deadline = time.monotonic() + timeout
    show = sys.stderr.isatty() and not ctx.as_json
    verb = "Pushing" if kind == "push" else "Pulling"
    while True:
        report = ctx.call("GET", "cloud").get("runs", {}).get(run)
        if report is None:
            raise click.ClickException(f"the daemon forgot {kind} run {run}")
        if show:
            if kind == "push":
                done = report["items"] + report["movements"] + report["parked"]
                line = f"{verb}: {done} of {report['total']} rows"
            else:
                line = f"{verb}: {report['changes']} web edits"
            click.echo(f"\r{line}   ", nl=False, err=True)
        if report["done"]:
            break
        if time.monotonic() >= deadline:
            if show:
                click.echo(err=True)
            click.echo(
                f"invsync: the {kind} is still running after {timeout:g}s; "
                "see 'invsync cloud status'",
                err=True,
            )
            sys.exit(EXIT_FAILED)
        time.sleep(0.2)
    if show:
        click.echo(err=True)
    return dict(report)


@cloud.command("push")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True)
@pass_ctx
def cloud_push(ctx: Context, timeout: float) -> None:
    """Push every pending change to the cloud now (parked rows are tried again)."""
    report = _cloud_run(ctx, "push", timeout)

    def human() -> str:
        if not report["ok"]:
            return f"Push failed: {report['error']}\nThe station keeps its changes and retries."
        text = f"Pushed {report['items']} items and {report['movements']} movements."
        if report["parked"]:
            text += (
                f"\n{report['parked']} rows were refused by the cloud and parked: "
                "see 'invsync cloud status'."
            )
        return text

    ctx.emit(report, human)
    if not report["ok"] or report["parked"]:
        sys.exit(EXIT_FAILED)


@cloud.command("pull")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True)
@pass_ctx
def cloud_pull(ctx: Context, timeout: float) -> None:
    """Pull web edits from the cloud now."""
    report = _cloud_run(ctx, "pull", timeout)

    def human() -> str:
        if not report["ok"]:
            return f"Pull failed: {report['error']}"
        return f"Pulled {report['changes']} web edits ({report['items']} items changed)."

    ctx.emit(report, human)
    if not report["ok"]:
        sys.exit(EXIT_FAILED)


@cloud.command("migrate")
@click.argument("dsn", required=False, metavar="POSTGRESQL_URL")
@pass_ctx
def cloud_migrate(ctx: Context, dsn: str | None) -> None:
    """Create or upgrade the cloud tables and functions (admin connection string).

    POSTGRESQL_URL defaults to $INVSYNC_CLOUD_URL. Runs here, not in the daemon.
    """
    dsn = dsn or os.environ.get("INVSYNC_CLOUD_URL")
    if not dsn:
        raise click.UsageError("give the database's admin URL: postgresql://postgres:...@host/db")
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise click.UsageError(
            "migrations need a postgresql:// admin connection string (for Supabase: "
            "Project Settings > Database, user postgres), or paste cloud_bridge/sql/*.sql "
            "into the SQL editor in order"
        )
    # Only this command needs asyncio, asyncpg and the SQL files: keep them off every
    # other path.
    import asyncio  # noqa: PLC0415

    from cloud_bridge.migrate import MigrationFailed, migrate  # noqa: PLC0415
    from cloud_bridge.transport import CloudError  # noqa: PLC0415
    from daemon.config import redact_url  # noqa: PLC0415

    try:
        applied = asyncio.run(migrate(dsn))
    except MigrationFailed as exc:
        _cloud_fail(ctx, "migration_failed", str(exc))
    except CloudError as exc:
        _cloud_fail(ctx, "unavailable", str(exc))
    data = {"database": redact_url(dsn), "applied": applied}
    ctx.emit(
        data,
        f"Applied {', '.join(applied)} to {redact_url(dsn)}."
        if applied
        else f"{redact_url(dsn)} is up to date; nothing to apply.",
    )


def _cloud_fail(ctx: Context, code: str, message: str) -> NoReturn:
    if ctx.as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        click.echo(f"invsync: {message}", err=True)
    sys.exit(EXIT_FAILED)
