"""The control API: HTTP/JSON on the station's Unix socket.

One endpoint per CLI command. The CLI is its main client; scripts may use it too (see
docs/cli.md). Every error is JSON, ``{"error": {"code": ..., "message": ...}}``, with an
HTTP status that says whose fault it is (4xx: the request, 5xx: the station). Handlers
only translate between JSON and the store: the rules live in ``crdt_store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from aiohttp import web

from crdt_store import (
    AmbiguousBarcode,
    InsufficientStock,
    InvalidInput,
    ItemNotFound,
    ItemView,
    NewItem,
    NoConflict,
    Store,
    StoreClosed,
    StoreError,
    WrongState,
)
from crdt_store.model import Kind

from .admin import FleetAdmin, FleetError
from .catalog import RowProblem, parse_rows
from .config import Config, ConfigError, parse_duration, parse_host_port
from .peers import PeerManager

if TYPE_CHECKING:
    from cloud_bridge.bridge import CloudBridge

_LOGGER = logging.getLogger(__name__)

API = "/v1"
MAX_BODY = 16 * 1024 * 1024
#: Rows per import request: its CPU runs on the event loop, so a request of 1,000 rows
#: holds scans up for about a quarter of a second (the CLI sends 500).
MAX_IMPORT_ROWS = 1000
_STATUS_OF: dict[type[StoreError], int] = {
    InvalidInput: 400,
    ItemNotFound: 404,
    AmbiguousBarcode: 409,
    InsufficientStock: 409,
    WrongState: 409,
    NoConflict: 409,
    StoreClosed: 503,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered as JSON with a code (for problems found by the API itself)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(message)


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, FleetError) as exc:
        return error_response(exc.status, exc.code, str(exc))
    except StoreError as exc:
        status = next((s for cls, s in _STATUS_OF.items() if isinstance(exc, cls)), 500)
        extra: dict[str, Any] = {}
        if isinstance(exc, InvalidInput):
            extra["field"] = exc.field
        if isinstance(exc, AmbiguousBarcode):
            extra["item_ids"] = exc.item_ids
        return error_response(status, exc.code, str(exc), **extra)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(exc.status, "http_error", exc.reason)
        raise
    except Exception:
        _LOGGER.exception("control API request %s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the daemon log")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    return data


def _int(data: Mapping[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(key, value, "must be a whole number")
    return value


def _text(data: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = data.get(key, default)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(key, value, "must be text")
    return value


def _item(view: ItemView) -> dict[str, Any]:
    return view.to_json()


class ControlApi:
    """Routes of the control API, bound to one station's store and config."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        peers: PeerManager | None = None,
        fleet: FleetAdmin | None = None,
        cloud: CloudBridge | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.peers = peers
        self.fleet_admin = fleet
        self.cloud = cloud
        self.started = time.monotonic()
        #: Held from "is this barcode taken?" until the item that takes it is committed
        #: (and so in the index): two requests adding one barcode at once cannot both pass.
        self._barcodes = asyncio.Lock()
        self._imports: dict[str, dict[str, int]] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
        r = app.router
        r.add_get(f"{API}/status", self.status)
        r.add_get(f"{API}/items", self.list_items)
        r.add_post(f"{API}/items", self.add_item)
        r.add_post(f"{API}/import", self.import_rows)
        r.add_get(f"{API}/items/{{key}}", self.show_item)
        r.add_patch(f"{API}/items/{{key}}", self.edit_item)
        r.add_delete(f"{API}/items/{{key}}", self.delete_item)
        r.add_post(f"{API}/items/{{key}}/checkout", self.checkout)
        r.add_post(f"{API}/items/{{key}}/return", self.return_units)
        r.add_post(f"{API}/items/{{key}}/count", self.count)
        r.add_get(f"{API}/items/{{key}}/history", self.history)
        r.add_get(f"{API}/conflicts", self.conflicts)
        r.add_post(f"{API}/conflicts/resolve", self.resolve)
        r.add_get(f"{API}/fleet", self.fleet)
        r.add_get(f"{API}/peers", self.list_peers)
        r.add_post(f"{API}/sync", self.sync)
        r.add_post(f"{API}/fleet/invite", self.fleet_invite)
        r.add_post(f"{API}/fleet/join", self.fleet_join)
        r.add_post(f"{API}/fleet/revoke", self.fleet_revoke)
        r.add_post(f"{API}/fleet/export-ca", self.fleet_export_ca)
        r.add_post(f"{API}/fleet/import-ca", self.fleet_import_ca)
        r.add_get(f"{API}/cloud", self.cloud_status)
        r.add_post(f"{API}/cloud/push", self.cloud_push)
        r.add_post(f"{API}/cloud/pull", self.cloud_pull)
        return app

    # -------------------------------------------------------------- status

    async def status(self, request: web.Request) -> web.Response:
        store = self.store
        conflicts, alerts = await store.attention_counts()
        body: dict[str, Any] = {
            "station": {"id": store.station_id, "name": self.config.name},
            "data_dir": str(self.config.data_dir),
            "socket": str(self.config.socket_path),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "items": await store.count_items(),
            "conflicts": conflicts,
            "alerts": alerts,
            "hlc": store.hlc,
            "clock_warnings": [
                {"station": w.station, "ahead_ms": w.ahead_ms} for w in store.clock_warnings()
            ],
            "fleet": self._fleet_summary(),
            "peers": self._peer_summary(),
            "cloud": await self._cloud_summary(),
        }
        return web.json_response(body)

    def _fleet_summary(self) -> dict[str, Any]:
        if self.fleet_admin is None:
            return {"available": False}
        guard = self.fleet_admin.guard
        return {
            "available": True,
            "id": guard.fleet_id,
            "holds_ca": guard.membership.holds_ca,
            "revoked": len(guard.revoked),
            "certificate_expires_at": guard.membership.station_cert.not_valid_after_utc.timestamp(),
        }

    def _peer_summary(self) -> dict[str, Any]:
        if self.peers is None:
            return {"available": False, "connected": 0, "known": 0}
        peers = self.peers.status()
        connected = [p for p in peers if p["state"] == "connected"]
        return {
            "available": True,
            "listen_port": self.peers.port,
            "known": len(peers),
            "connected": len(connected),
            "lacking": sum(p["lacking"] or 0 for p in connected),
            "in_sync": all(p["lacking"] == 0 for p in connected),
        }

    # -------------------------------------------------------------- items

    async def list_items(self, request: web.Request) -> web.Response:
        query = request.query
        views = await self.store.list_items(
            query.get("search") or None,
            limit=_int(query, "limit", 1000),
            offset=_int(query, "offset", 0),
            include_deleted=query.get("deleted") in ("1", "true"),
        )
        return web.json_response({"items": [_item(v) for v in views]})

    async def add_item(self, request: web.Request) -> web.Response:
        data = await _body(request)
        new = NewItem(
            barcode=_text(data, "barcode", "") or "",
            name=_text(data, "name", "") or "",
            kind=cast(Kind, _text(data, "kind", "bulk")),  # check_new_item validates it
            qty=_int(data, "qty", 0),
            location=_text(data, "location", "") or "",
            category=_text(data, "category", "") or "",
            notes=_text(data, "notes", "") or "",
        )
        async with self._barcodes:
            if await self.store.find(new.barcode) and not data.get("allow_duplicate"):
                raise ApiError(
                    409, "exists", f"an item with barcode {new.barcode!r} already exists"
                )
            view = await self.store.add_item(new, operator=_text(data, "operator", "") or "")
        return web.json_response({"item": _item(view)}, status=201)

    async def import_rows(self, request: web.Request) -> web.Response:
        """Import catalog rows: ``{"header": [...], "rows": [{"line": n, "values": [...]}]}``.

        Bad rows are reported by line and skipped; rows whose barcode is already in the
        inventory are skipped too. The good rows of one request land in one commit.
        """
        data = await _body(request)
        header = data.get("header")
        rows = data.get("rows")
        if not isinstance(header, list) or not all(isinstance(h, str) for h in header):
            raise InvalidInput("header", header, "expected a list of column names")
        if not isinstance(rows, list) or len(rows) > MAX_IMPORT_ROWS:
            raise InvalidInput("rows", type(rows).__name__, f"expected up to {MAX_IMPORT_ROWS}")
        records: list[tuple[int, list[str]]] = []
        for row in rows:
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("line"), int)
                or not isinstance(row.get("values"), list)
                or not all(isinstance(v, str) for v in row["values"])
            ):
                raise InvalidInput("rows", row, 'each row is {"line": N, "values": [text...]}')
            records.append((row["line"], row["values"]))
        good, problems = parse_rows(header, records)
        fresh: list[NewItem] = []
        skipped: list[dict[str, Any]] = []
        # A file is sent in several requests: remember its barcodes across them, so a
        # repeat 600 rows later is reported as a repeat, not as "already present".
        import_id = _text(data, "import_id") or ""
        seen = self._imports.pop(import_id, {}) if import_id else {}
        if import_id:
            self._imports[import_id] = seen
            while len(self._imports) > 8:
                del self._imports[next(iter(self._imports))]
        operator = _text(data, "operator", "") or ""
        async with self._barcodes:
            existing = await self.store.live_barcodes([new.barcode for _, new in good])
            for line, new in good:
                if new.barcode in seen:
                    problems.append(
                        RowProblem(line, f"barcode {new.barcode} repeats line {seen[new.barcode]}")
                    )
                elif new.barcode in existing:
                    skipped.append({"line": line, "barcode": new.barcode, "reason": "exists"})
                else:
                    seen[new.barcode] = line
                    fresh.append(new)
            views = await self.store.import_items(fresh, operator=operator) if fresh else []
        return web.json_response(
            {
                "imported": len(views),
                "skipped": skipped,
                "errors": sorted((p.to_json() for p in problems), key=lambda p: p["line"]),
            }
        )

    async def show_item(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        views = await self.store.find(key)
        if not views:
            raise ItemNotFound(key)
        return web.json_response({"items": [_item(v) for v in views]})

    async def _target(self, request: web.Request) -> tuple[ItemView, dict[str, Any]]:
        data = await _body(request)
        view = await self.store.item(request.match_info["key"])
        return view, data

    async def edit_item(self, request: web.Request) -> web.Response:
        view, data = await self._target(request)
        changes = data.get("changes")
        if not isinstance(changes, dict):
            raise InvalidInput("changes", changes, 'expected {"field": value, ...}')
        # The same rule as add_item: a barcode already in use is refused, or the edit
        # would leave two items that no scan can tell apart.
        new_barcode = changes.get("barcode")
        operator = _text(data, "operator", "") or ""
        if not isinstance(new_barcode, str) or new_barcode.strip() == view.barcode:
            view = await self.store.edit_item(view.id, changes, operator=operator)
            return web.json_response({"item": _item(view)})
        async with self._barcodes:
            await self._refuse_taken(new_barcode.strip(), view.id)
            view = await self.store.edit_item(view.id, changes, operator=operator)
        return web.json_response({"item": _item(view)})

    async def delete_item(self, request: web.Request) -> web.Response:
        view = await self.store.item(request.match_info["key"])
        operator = request.query.get("operator", "")
        view = await self.store.delete_item(view.id, operator=operator)
        return web.json_response({"item": _item(view)})

    async def checkout(self, request: web.Request) -> web.Response:
        return await self._move(request, self.store.checkout)

    async def return_units(self, request: web.Request) -> web.Response:
        return await self._move(request, self.store.return_units)

    async def _move(
        self, request: web.Request, move: Callable[..., Awaitable[ItemView]]
    ) -> web.Response:
        """Checkout or return: the same request shape, the store decides the rest."""
        data = await _body(request)
        item_id = await self.store.item_id(request.match_info["key"])
        qty = _int(data, "qty", 1)
        view = await move(
            item_id,
            qty,
            sheet=_text(data, "sheet"),
            operator=_text(data, "operator", "") or "",
            op_id=_text(data, "op_id"),
        )
        return web.json_response({"item": _item(view), "qty": qty})

    async def count(self, request: web.Request) -> web.Response:
        view, data = await self._target(request)
        if "counted" not in data:
            raise InvalidInput("counted", None, "give the number of units on the shelf")
        # The change is what the count recorded in the ledger (read back by its op id): the
        # index view read before it may lag a checkout in the same group commit, and a
        # retried count must report the first attempt's change, not 0.
        op_id = _text(data, "op_id") or str(uuid.uuid4())
        view = await self.store.count(
            view.id,
            _int(data, "counted", 0),
            operator=_text(data, "operator", "") or "",
            op_id=op_id,
        )
        recorded = await self.store.movement(op_id)
        change = (
            recorded.qty
            if recorded is not None and recorded.op == "count" and recorded.item == view.id
            else 0
        )
        return web.json_response({"item": _item(view), "change": change})

    async def history(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        movements = await self.store.history(key)
        if not movements and not await self.store.find(key):
            raise ItemNotFound(key)
        return web.json_response({"movements": [m.to_json() for m in movements]})

    # -------------------------------------------------------------- conflicts

    async def conflicts(self, request: web.Request) -> web.Response:
        items = await self.store.conflicts()
        alerts = await self.store.alerts()
        return web.json_response(
            {"conflicts": [_item(v) for v in items], "alerts": [a.to_json() for a in alerts]}
        )

    async def resolve(self, request: web.Request) -> web.Response:
        data = await _body(request)
        key = _text(data, "key")
        field = _text(data, "field")
        if not key or not field:
            raise InvalidInput("key", key, "give the barcode (or id) and the field")
        view = await self.store.item(key)
        value = data.get("value")
        operator = _text(data, "operator", "") or ""
        if field != "barcode":
            view = await self.store.resolve_conflict(view.id, field, value, operator=operator)
            return web.json_response({"item": _item(view)})
        # Settling a barcode conflict must not hand the item a barcode another has.
        async with self._barcodes:
            if isinstance(value, str):
                await self._refuse_taken(value.strip(), view.id)
            view = await self.store.resolve_conflict(view.id, field, value, operator=operator)
        return web.json_response({"item": _item(view)})

    async def _refuse_taken(self, barcode: str, item_id: str) -> None:
        """409 if a live item other than ``item_id`` has ``barcode``. Call it holding
        ``self._barcodes`` until the change is committed."""
        try:
            holders = await self.store.find(barcode) if barcode else []
        except InvalidInput:
            return  # not a barcode at all: the store refuses the change with the reason
        if any(holder.id != item_id for holder in holders):
            raise ApiError(409, "exists", f"an item with barcode {barcode!r} already exists")

    # -------------------------------------------------------------- fleet, peers, cloud

    def _admin(self) -> FleetAdmin:
        if self.fleet_admin is None:
            raise ApiError(501, "not_available", "fleet security is not running on this station")
        return self.fleet_admin

    async def fleet(self, request: web.Request) -> web.Response:
        admin = self._admin()
        return web.json_response(
            {
                "station_id": self.store.station_id,
                "name": self.config.name,
                "fleet_id": admin.guard.fleet_id,
                "holds_ca": admin.guard.membership.holds_ca,
                "open_invites": admin.invites.open_count(),
                "members": admin.members(),
            }
        )

    async def fleet_invite(self, request: web.Request) -> web.Response:
        data = await _body(request)
        try:
            expires = parse_duration("expires", data.get("expires", "15m"))
        except ConfigError:
            raise InvalidInput(
                "expires", data.get("expires"), "a duration such as 15m, 2h or 1d"
            ) from None
        addresses = []
        for text in data.get("addresses") or []:
            try:
                addresses.append(parse_host_port("address", text))
            except ConfigError as exc:
                raise ApiError(400, "invalid", str(exc)) from exc
        token = self._admin().invite(expires, tuple(addresses))
        return web.json_response(
            {
                "token": token.encode(),
                "short": token.short_form(),
                "expires_at": token.expires_at,
                "addresses": [str(a) for a in token.addresses],
            }
        )

    async def fleet_join(self, request: web.Request) -> web.Response:
        data = await _body(request)
        token = _text(data, "token")
        if not token:
            raise InvalidInput("token", token, "give the token printed by 'fleet invite'")
        result = await self._admin().join(token, force=bool(data.get("force", False)))
        return web.json_response(result)

    async def fleet_revoke(self, request: web.Request) -> web.Response:
        data = await _body(request)
        station = _text(data, "station_id")
        if not station:
            raise InvalidInput("station_id", station, "give the station id to revoke")
        result = await self._admin().revoke(station)
        return web.json_response(result)

    async def fleet_export_ca(self, request: web.Request) -> web.Response:
        data = await _body(request)
        pem = await self._admin().export_ca(_passphrase(data))
        return web.json_response({"pem": pem.decode("ascii")})

    async def fleet_import_ca(self, request: web.Request) -> web.Response:
        data = await _body(request)
        pem = (_text(data, "pem", "") or "").encode()
        result = await self._admin().import_ca(pem, _passphrase(data))
        return web.json_response(result)

    async def list_peers(self, request: web.Request) -> web.Response:
        if self.peers is None:
            raise ApiError(501, "not_available", "peer sync is not running on this station")
        return web.json_response(
            {"peers": self.peers.status(), "refused": list(self.peers.refusals)}
        )

    async def sync(self, request: web.Request) -> web.Response:
        """Anti-entropy with every connected peer now; waits up to ``timeout`` seconds
        (``wait`` false: start it and return, so a client can show progress)."""
        if self.peers is None:
            raise ApiError(501, "not_available", "peer sync is not running on this station")
        data = await _body(request)
        timeout = data.get("timeout", 30)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout <= 600
        ):
            raise InvalidInput("timeout", timeout, "seconds, 0-600")
        wait = float(timeout) if data.get("wait", True) else 0.0
        peers = await self.peers.sync_now(wait)
        connected = [p for p in peers if p["state"] == "connected"]
        return web.json_response(
            {"peers": peers, "in_sync": all(p["lacking"] == 0 for p in connected)}
        )

    # -------------------------------------------------------------- cloud bridge

    def _bridge(self) -> CloudBridge:
        if self.cloud is None:
            raise ApiError(
                409,
                "not_configured",
                "this station has no cloud bridge: set [cloud] url or INVSYNC_CLOUD_URL "
                "(see docs/cloud.md)",
            )
        return self.cloud

    async def cloud_status(self, request: web.Request) -> web.Response:
        if self.cloud is None:
            return web.json_response({"configured": False})
        return web.json_response(await self.cloud.status())

    async def _cloud_summary(self) -> dict[str, Any]:
        """The cloud part of ``/v1/status``."""
        if self.cloud is None:
            return {"configured": False}
        full = await self.cloud.status(parked_rows=0)
        keys = ("configured", "transport", "state", "backlog", "parked_count", "last_error")
        summary = {key: full[key] for key in keys}
        summary["next_retry"] = full["next_retry"]
        for kind in ("push", "pull"):
            last = full[f"last_{kind}"]
            summary[f"last_{kind}_at"] = last["finished_at"] if last and last["ok"] else None
        return summary

    async def cloud_push(self, request: web.Request) -> web.Response:
        """Push the outbox now (``{"wait": false}``: start it and answer 202 with the run
        number; its progress and report are in ``GET /v1/cloud``)."""
        return await self._cloud_run(request, "push")

    async def cloud_pull(self, request: web.Request) -> web.Response:
        return await self._cloud_run(request, "pull")

    async def _cloud_run(self, request: web.Request, kind: Literal["push", "pull"]) -> web.Response:
        bridge = self._bridge()
        data = await _body(request)
        if data.get("wait", True):
            report = await (bridge.push_now() if kind == "push" else bridge.pull_now())
            return web.json_response(report.to_json())
        return web.json_response({"run": bridge.start_run(kind), "started": True}, status=202)


def _passphrase(data: Mapping[str, Any]) -> str:
    """The passphrase of a CA export or import; never echoed back in an error."""
    value = data.get("passphrase", "")
    if not isinstance(value, str):
        raise InvalidInput("passphrase", "(not shown)", "a string")
    return value


class ControlServer:
    """Serves the control API on a Unix socket (mode 0660). ``close()`` is idempotent."""

    def __init__(self, api: ControlApi, path: Path) -> None:
        self.api = api
        self.path = path
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        _claim_socket_path(self.path)
        runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await runner.setup()
        old_umask = os.umask(0o117)
        try:
            site = web.UnixSite(runner, str(self.path))
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ControlSocketError(self.path, exc.strerror or str(exc)) from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        self._runner = runner

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class ControlSocketError(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"cannot serve the control socket {path}: {reason}")


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a crash; refuse if a live daemon answers on it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ControlSocketError(path, f"{path.parent} is not a directory") from None
    except OSError as exc:
        raise ControlSocketError(path, exc.strerror or str(exc)) from exc
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise ControlSocketError(path, "another daemon is listening on it")
