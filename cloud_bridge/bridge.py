"""The cloud bridge run by a station daemon: push the merged inventory, pull web edits.

One task per station with ``[cloud] url``. Each *round* pushes the store's outbox (items
changed since their last confirmed push, in batches of a few hundred, with the movements
not yet pushed) and then pulls the web edits after the stored cursor. A round starts
shortly after local commits (debounced) and every ``push_interval``; ``push_now`` and
``pull_now`` run one at once (the CLI's ``cloud push`` / ``cloud pull``).

Failures never stop the station:

- :class:`CloudUnavailable` (network, 5xx, sign-in): the round ends and the next one waits
  an exponential backoff with full jitter (AWS's "full jitter": a uniform draw below
  ``min(cap, base * 2**attempt)``), so a fleet coming back from an outage does not retry
  in step. Nothing is lost: the outbox is durable and only confirmed rows leave it.
- :class:`CloudDataError` (the server refused a batch for what is in it): the batch is
  bisected until the rows that fail alone are found; they are *parked* (durably, listed
  in status) and every other row is pushed. A parked item is tried again when it changes.
  If every row fails alone, and all the same way, the request itself is at fault (a
  contract mismatch, a permission): nothing is parked and the round backs off instead.
- A statement timeout (SQLSTATE 57014) halves the batch size, down to one row, and the
  round goes on; after a run of confirmed batches the size doubles again, up to
  ``batch_size``.

The pull applies web edits as writer ``cloud`` with the server's HLC and stores the cursor
in the same commit. ``pull_changes`` only returns web edits (rows the bridge writes are
not logged as web edits), so the bridge never re-applies its own pushes. A web value the
station refuses is reported (status ``refused``); the station pushes its own value back.
When the database answers with another id than the one recorded, or says the cursor does
not fit it (``reset``: restored, or made again at the same URL), the outbox starts over
as for a new target: everything is pushed again and the pull starts from the beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from crdt_store import ItemView, Movement, Store, StoreClosed, StoreError
from crdt_store.cloud import CLOUD_WRITER, CloudEdit, DirtyItem, RefusedValue
from daemon.config import CloudConfig, redact_url

from .transport import (
    CloudConfigError,
    CloudDataError,
    CloudTransport,
    CloudUnavailable,
    open_transport,
    transport_kind,
)

_LOGGER = logging.getLogger(__name__)

#: Items (and as many movements) per ``merge_inventory`` call: a few hundred keeps each
#: request well under REST size limits and each transaction short.
BATCH_SIZE = 400
#: Web edits per ``pull_changes`` call.
PULL_ROWS = 500
#: A burst of scans is pushed together this long after the first commit.
DEBOUNCE = 1.0
BACKOFF_BASE = 1.0
#: Longest wait between attempts while the cloud is down.
BACKOFF_CAP = 300.0
#: Manual runs whose reports are kept for ``status``.
_KEPT_REPORTS = 16
#: Refused web values kept for ``status``.
_KEPT_REFUSED = 20
#: Confirmed batches in a row after which a batch size cut by timeouts doubles again.
_GROW_AFTER = 8

RunKind = Literal["push", "pull"]
Sleep = Callable[[float], Awaitable[None]]
Progress = Callable[["RunReport"], None]


def full_jitter(attempt: int, *, base: float, cap: float, draw: Callable[[], float]) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): uniform in [0, min(cap,
    base * 2**(attempt-1)))."""
    # attempt 0 (no failure counted) would wait below base/2: never spin faster than base.
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 62))
    return draw() * ceiling


def target_of(url: str, fleet: str) -> str:
    """Which database and fleet the outbox refers to, without credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # a malformed port: the transport says so on its first call
        port = None
    if port:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}{parts.path}#{fleet}"


def encode_item(view: ItemView) -> dict[str, Any]:
    """An item as ``merge_inventory`` takes it: each field with the HLC of its winning
    slot (and, when slots disagree, the winning station, which breaks HLC ties the way the
    CRDT does), and stock as ``[value, version, kind HLC]``.

    A version is only comparable under one kind (a counter sum for bulk, a status HLC for
    a unit), so the cloud orders stock by ``(kind HLC, version)``: after a kind change the
    first view with the new kind replaces the stock, whatever its version."""
    conflicted = {conflict.field: conflict for conflict in view.conflicts}
    fields: dict[str, list[Any]] = {}
    for name, hlc in view.field_hlcs.items():
        value = getattr(view, name)
        slot: list[Any] = [value, hlc]
        if name in conflicted:
            winners = [s for s in conflicted[name].slots if s.hlc == hlc and s.value == value]
            if winners:
                slot.append(max(s.station for s in winners))
        fields[name] = slot
    if view.kind == "serial":
        # A unit's stock follows its status (1 when in), so its version is the status HLC.
        version = view.field_hlcs.get("status", 0)
    else:
        # Each counter slot's HLC only grows and slots are only added, so a view that knows
        # more has a larger sum: stock only ever moves to a more complete view.
        version = sum(view.stock_hlcs.values())
    kind_hlc = view.field_hlcs.get("kind", 0)
    return {"id": view.id, "fields": fields, "stock": [view.stock, version, kind_hlc]}


def decode_changes(changes: object, *, database: str | None = None) -> list[CloudEdit]:
    """Web edits from ``pull_changes``; malformed entries are logged and skipped.

    A change id is only unique in the database that numbered it, so the database's id,
    when it gives one, is part of the change id the stations record (and key a web count
    by)."""
    edits: list[CloudEdit] = []
    if not isinstance(changes, list):
        raise CloudDataError(f"pull_changes returned {type(changes).__name__}, not a list")
    for change in changes:
        try:
            raw_fields = change["fields"]
            fields = {
                str(name): (slot[0], int(slot[1]))
                for name, slot in raw_fields.items()
                if isinstance(slot, list) and len(slot) >= 2
            }
            stock = raw_fields.get("stock")
            before = stock[2] if isinstance(stock, list) and len(stock) >= 3 else None
            change_id = str(change.get("change_id", ""))
            if change_id and database:
                change_id = f"{database}/{change_id}"
            edits.append(
                CloudEdit(
                    str(change["item"]),
                    fields,
                    change_id,
                    stock_before=(
                        before if isinstance(before, int) and not isinstance(before, bool) else None
                    ),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            _LOGGER.warning("skipping a malformed web edit from the cloud: %.200r", change)
    return edits


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class RunReport:
    """What one push or pull did; also the progress of one that is running."""

    kind: RunKind
    run: int = 0
    started_at: float = 0.0
    finished_at: float | None = None
    ok: bool = False
    items: int = 0
    movements: int = 0
    parked: int = 0
    changes: int = 0
    #: Web values the station refused (a pull); its own values are pushed back.
    refused: int = 0
    #: Rows the database changed or added (what ``merge_inventory`` answered): a replay
    #: or a stale batch adds nothing.
    rows_changed: int = 0
    #: Outbox size when a push started (items + movements), for progress.
    total: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "run": self.run,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "done": self.finished_at is not None,
            "ok": self.ok,
            "items": self.items,
            "movements": self.movements,
            "parked": self.parked,
            "changes": self.changes,
            "refused": self.refused,
            "rows_changed": self.rows_changed,
            "total": self.total,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class _Refusal:
    """One row (an item or a movement) the cloud refused alone, and why."""

    dirty: Sequence[DirtyItem]
    movements: Sequence[Movement]
    error: CloudDataError


@dataclass(slots=True)
class _Health:
    last_push: RunReport | None = None
    last_pull: RunReport | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    next_retry: float | None = None
    reports: dict[int, RunReport] = field(default_factory=dict)
    #: The latest web values refused, with when (newest last).
    refused: list[tuple[RefusedValue, float]] = field(default_factory=list)


class CloudBridge:
    """Push and pull loops of one station. ``async with CloudBridge(...) as bridge``.

    ``sleep``, ``clock`` and ``draw`` are injectable so tests can fast-forward an outage
    of minutes; ``transport`` replaces ``open_transport(config)`` in tests.
    """

    def __init__(
        self,
        store: Store,
        config: CloudConfig,
        *,
        fleet: str | Callable[[], str],
        transport: CloudTransport | None = None,
        batch_size: int = BATCH_SIZE,
        pull_rows: int = PULL_ROWS,
        debounce: float = DEBOUNCE,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ) -> None:
        if not config.url:
            raise CloudConfigError("url", "not set")
        self.store = store
        self.config = config
        self._fleet = fleet
        self.origin = f"station:{store.station_id}"
        self.batch_size = batch_size
        self.pull_rows = pull_rows
        self.debounce = debounce
        self.backoff_base = backoff_base
        # Ten intervals, at most five minutes: a station on a short interval (tests, a
        # busy office) also recovers sooner.
        self.backoff_cap = (
            backoff_cap
            if backoff_cap is not None
            else max(backoff_base, min(BACKOFF_CAP, 10 * config.push_interval))
        )
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        self._transport = transport
        self._health = _Health()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._recovered = asyncio.Event()
        self._activity: RunReport | None = None
        self._runs = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        #: Rows per batch now: ``batch_size``, or less after statement timeouts.
        self._batch_limit = batch_size
        self._confirmed_in_row = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> CloudBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self, *, loop: bool = True) -> None:
        """Bind the outbox to this target and start the loop (``loop=False``: manual
        runs only, for tools and tests)."""
        await self._use_target()
        self._unsubscribe = self.store.subscribe(self._on_commit)
        if loop:
            self._loop_task = asyncio.create_task(self._run(), name="cloud bridge: loop")

    async def close(self) -> None:
        """Stop the loop and any run in progress, and close the transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel("cloud bridge closing")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()

    @property
    def fleet(self) -> str:
        """The fleet pushed for (a station that joins another fleet pushes for that)."""
        return self._fleet() if callable(self._fleet) else self._fleet

    async def _use_target(self) -> None:
        assert self.config.url
        if await self.store.cloud_use_target(target_of(self.config.url, self.fleet)):
            _LOGGER.info(
                "cloud bridge: new target %s fleet %s, everything will be pushed",
                self.url,
                self.fleet,
            )

    @property
    def url(self) -> str:
        assert self.config.url
        return redact_url(self.config.url)

    def _on_commit(self, update: Any) -> None:
        if update.doc.startswith(("items/", "ledger/")):
            self._changed.set()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        # The first round runs at once: whatever waited while the daemon was down.
        while True:
            try:
                async with self._lock:
                    self._changed.clear()
                    await self._push(RunReport("push", started_at=self._clock()))
                    await self._pull(RunReport("pull", started_at=self._clock()))
            except CloudUnavailable:
                await self._back_off(
                    full_jitter(
                        self._health.failures,
                        base=self.backoff_base,
                        cap=self.backoff_cap,
                        draw=self._draw,
                    )
                )
                continue
            except StoreClosed as exc:
                # The store stopped (fail-stop) or is closing: the daemon is going down.
                _LOGGER.warning("cloud bridge stops: %s", exc)
                return
            except Exception as exc:
                # A bug, or a store error that is not the store going away, must not take
                # the station down, nor spin: report it, wait, retry.
                self._unexpected(RunReport("push"), exc)
                await self._back_off(self.backoff_cap)
                continue
            if await self._wait(self._changed, self.config.push_interval):
                await self._sleep(self.debounce)

    async def _back_off(self, delay: float) -> None:
        self._health.next_retry = self._clock() + delay
        self._recovered.clear()
        # A change does not cut the backoff short; a manual run that gets through does.
        await self._wait(self._recovered, delay)

    async def _wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait for ``event`` or ``seconds`` (on the injectable sleep); returns
        whether the event was set."""
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, sleeper):
                task.cancel()
            for task in (waiter, sleeper):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return event.is_set()

    def _failed(self, report: RunReport, exc: Exception) -> None:
        """A failed run: reported, and counted, whatever the cause (the backoff grows
        with the count, so a setting that cannot work does not spin)."""
        self._count_failure(report, str(exc) or type(exc).__name__)
        if self._health.failures in (1, 10) or self._health.failures % 100 == 0:
            _LOGGER.warning(
                "cloud %s failed (%d in a row), will retry: %s",
                report.kind,
                self._health.failures,
                report.error,
            )

    def _succeeded(self, report: RunReport) -> None:
        report.ok = True
        report.finished_at = self._clock()
        if self._health.failures:
            _LOGGER.info(
                "cloud %s works again after %d failures", report.kind, self._health.failures
            )
        self._health.failures = 0
        self._health.next_retry = None
        self._recovered.set()

    def _connect(self) -> CloudTransport:
        if self._transport is None:
            self._transport = open_transport(self.config)
        return self._transport

    # ------------------------------------------------------------------ push

    async def _push(self, report: RunReport, progress: Progress | None = None) -> RunReport:
        """Push the whole outbox (what is marked when the round reaches it)."""
        await self._use_target()
        backlog = await self.store.cloud_backlog()
        report.total = backlog.items + backlog.movements
        self._activity = report
        try:
            transport = self._connect()
            after = ""
            while True:
                size = self._batch_limit
                dirty = await self.store.cloud_dirty_items(size, after=after)
                movements = await self.store.cloud_pending_movements(size)
                if not dirty and not movements:
                    break
                try:
                    await self._merge_batch(transport, report, dirty, movements)
                except CloudUnavailable as exc:
                    if not exc.timed_out or size <= 1:
                        raise
                    # The server is there but this much work does not fit its statement
                    # timeout: the same rows again, in smaller batches. What was
                    # confirmed has left the outbox; nothing was parked yet.
                    self._shrink_batches(exc)
                    continue
                self._batch_confirmed()
                if dirty:
                    after = dirty[-1].view.id
                if progress is not None:
                    progress(report)
        except (CloudUnavailable, CloudConfigError) as exc:
            self._failed(report, exc)
            self._health.last_push = report
            raise CloudUnavailable(str(exc)) from exc
        finally:
            self._activity = None
        self._succeeded(report)
        self._health.last_push = report
        return report

    def _shrink_batches(self, exc: CloudUnavailable) -> None:
        self._batch_limit = max(1, self._batch_limit // 2)
        self._confirmed_in_row = 0
        _LOGGER.warning(
            "cloud push timed out (%s); pushing %d rows per batch for now",
            exc,
            self._batch_limit,
        )

    def _batch_confirmed(self) -> None:
        if self._batch_limit >= self.batch_size:
            return
        self._confirmed_in_row += 1
        if self._confirmed_in_row >= _GROW_AFTER:
            self._batch_limit = min(self.batch_size, self._batch_limit * 2)
            self._confirmed_in_row = 0
            _LOGGER.info("cloud push: %d rows per batch again", self._batch_limit)

    async def _merge_batch(
        self,
        transport: CloudTransport,
        report: RunReport,
        dirty: Sequence[DirtyItem],
        movements: Sequence[Movement],
    ) -> None:
        """Merge one batch; rows refused for their data are parked, unless every row was
        refused alone and the same way, which a bad request does, not bad rows."""
        refused: list[_Refusal] = []
        merged = await self._merge(transport, report, dirty, movements, refused)
        if not refused:
            return
        reasons = {(r.error.code, str(r.error)) for r in refused}
        if merged == 0 and len(refused) > 1 and len(reasons) == 1:
            error = refused[0].error
            raise CloudUnavailable(
                f"every row of a batch of {len(refused)} was refused with the same error, so "
                f"the request is at fault, not a row: {error}",
                code=error.code,
            )
        for refusal in refused:
            await self._park(report, refusal)

    async def _merge(
        self,
        transport: CloudTransport,
        report: RunReport,
        dirty: Sequence[DirtyItem],
        movements: Sequence[Movement],
        refused: list[_Refusal],
    ) -> int:
        """Merge rows, bisecting on a data error down to the rows that fail alone (added
        to ``refused``); returns how many rows were confirmed."""
        batch = {
            "fleet": self.fleet,
            "origin": self.origin,
            "items": [encode_item(d.view) for d in dirty],
            "movements": [m.to_json() for m in movements],
        }
        try:
            answer = await transport.merge(batch)
        except CloudDataError as exc:
            rows = len(dirty) + len(movements)
            if rows == 1:
                refused.append(_Refusal(dirty, movements, exc))
                return 0
            # Halve the rows (items first, then movements) and try each half.
            half = rows // 2
            split = max(0, half - len(dirty))
            first = await self._merge(transport, report, dirty[:half], movements[:split], refused)
            second = await self._merge(transport, report, dirty[half:], movements[split:], refused)
            return first + second
        await self.store.cloud_confirm(
            [(d.view.id, d.mark) for d in dirty], [m.id for m in movements]
        )
        report.items += len(dirty)
        report.movements += len(movements)
        with contextlib.suppress(TypeError, ValueError):
            report.rows_changed += int(answer.get("items_changed", 0))
            report.rows_changed += int(answer.get("movements_inserted", 0))
        return len(dirty) + len(movements)

    async def _park(self, report: RunReport, refusal: _Refusal) -> None:
        reason = str(refusal.error) or type(refusal.error).__name__
        if refusal.dirty:
            (item,) = refusal.dirty
            await self.store.cloud_park(
                "item", item.view.id, barcode=item.view.barcode, mark=item.mark, error=reason
            )
            _LOGGER.warning(
                "cloud refused item %s (%s): %s", item.view.barcode, item.view.id, reason
            )
        else:
            (movement,) = refusal.movements
            await self.store.cloud_park(
                "movement", movement.id, barcode=movement.barcode, mark=0, error=reason
            )
            _LOGGER.warning(
                "cloud refused movement %s of %s: %s", movement.id, movement.barcode, reason
            )
        report.parked += 1

    # ------------------------------------------------------------------ pull

    async def _pull(self, report: RunReport, progress: Progress | None = None) -> RunReport:
        """Apply every web edit after the stored cursor."""
        self._activity = report
        try:
            transport = self._connect()
            cursor = await self.store.cloud_cursor()
            started_over = False
            while True:
                answer = await transport.pull(self.fleet, cursor, self.pull_rows)
                if not started_over and await self._another_database(answer, cursor):
                    # Everything is to push again; pull from the first change on.
                    started_over = True
                    cursor = None
                    continue
                changes = answer.get("changes")
                database = answer.get("database")
                edits = decode_changes(
                    changes, database=str(database) if isinstance(database, str) else None
                )
                new_cursor = answer.get("cursor")
                if not isinstance(new_cursor, str):
                    raise CloudDataError(f"pull_changes returned cursor {new_cursor!r}")
                if not changes:
                    # Nothing new: keep the stored cursor rather than spend a commit (an
                    # fsync per round) on a horizon that moved; reading from it is cheap.
                    break
                # Stored even when no change decoded (all malformed): the pull must get
                # past them, or it would read the same ones forever.
                applied = await self.store.apply_cloud_pull(edits, cursor=new_cursor)
                report.changes += len(edits)
                report.items += len(applied.views)
                report.refused += len(applied.refused)
                now = self._clock()
                self._health.refused.extend((value, now) for value in applied.refused)
                del self._health.refused[:-_KEPT_REFUSED]
                if progress is not None:
                    progress(report)
                cursor = new_cursor
                if not answer.get("more"):
                    break
        except (CloudUnavailable, CloudConfigError) as exc:
            self._failed(report, exc)
            self._health.last_pull = report
            raise CloudUnavailable(str(exc)) from exc
        except CloudDataError as exc:
            # A bad cursor or answer: report it; the next round tries again.
            self._failed(report, exc)
            self._health.last_pull = report
            return report
        finally:
            self._activity = None
        self._succeeded(report)
        self._health.last_pull = report
        return report

    async def _another_database(self, answer: dict[str, Any], cursor: str | None) -> bool:
        """Whether the answer shows a database other than the one the outbox was pushed
        to (another id than recorded, or a cursor it says it cannot have given); if so
        the outbox has started over."""
        database = answer.get("database")
        if isinstance(database, str) and database and await self.store.cloud_use_database(database):
            _LOGGER.warning(
                "cloud database %s is another one than before (id %s): everything will be "
                "pushed again and web edits pulled from the start",
                self.url,
                database,
            )
            return True
        if answer.get("reset") is True and cursor is not None:
            _LOGGER.warning(
                "cloud database %s does not know the pull cursor (restored or made "
                "again?): everything will be pushed again and web edits pulled from the "
                "start",
                self.url,
            )
            await self.store.cloud_start_over()
            return True
        return False

    # ------------------------------------------------------------------ manual runs

    async def push_now(
        self, progress: Progress | None = None, *, report: RunReport | None = None
    ) -> RunReport:
        """Push everything now, parked rows included (tried again); never raises for the
        cloud being down: the report says so."""
        report = report or self._new_report("push")
        async with self._lock:
            report.started_at = self._clock()
            try:
                await self.store.cloud_retry_parked()
                await self._push(report, progress)
            except CloudUnavailable:
                pass
            except Exception as exc:
                self._unexpected(report, exc)
        return report

    async def pull_now(
        self, progress: Progress | None = None, *, report: RunReport | None = None
    ) -> RunReport:
        """Pull web edits now; the report says whether it worked."""
        report = report or self._new_report("pull")
        async with self._lock:
            report.started_at = self._clock()
            try:
                await self._pull(report, progress)
            except CloudUnavailable:
                pass
            except Exception as exc:
                self._unexpected(report, exc)
        return report

    def start_run(self, kind: RunKind) -> int:
        """Start ``push_now``/``pull_now`` in the background; returns its run number (its
        report is in ``status()['runs']``)."""
        report = self._new_report(kind)
        run = self.push_now if kind == "push" else self.pull_now
        task = asyncio.create_task(
            run(report=report), name=f"cloud bridge: {kind} now #{report.run}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return report.run

    def _new_report(self, kind: RunKind) -> RunReport:
        self._runs += 1
        report = RunReport(kind, run=self._runs, started_at=self._clock())
        self._health.reports[report.run] = report
        while len(self._health.reports) > _KEPT_REPORTS:
            del self._health.reports[min(self._health.reports)]
        return report

    def _unexpected(self, report: RunReport, exc: Exception) -> None:
        """A bug or a store error, not the cloud: logged (a bug with its traceback),
        reported and counted."""
        if isinstance(exc, StoreError):
            _LOGGER.warning("cloud %s stopped: %s", report.kind, exc)
        else:
            _LOGGER.exception("cloud %s failed unexpectedly", report.kind)
        self._count_failure(report, f"{type(exc).__name__}: {exc}")

    def _count_failure(self, report: RunReport, error: str) -> None:
        report.error = error
        report.finished_at = self._clock()
        self._health.last_error = f"{report.kind}: {error}"
        self._health.last_error_at = report.finished_at
        self._health.failures += 1

    # ------------------------------------------------------------------ status

    async def status(self, *, parked_rows: int = 100) -> dict[str, Any]:
        """Everything ``invsync cloud status`` shows (documented in docs/cloud.md)."""
        health = self._health
        backlog = await self.store.cloud_backlog()
        parked = await self.store.cloud_parked(limit=parked_rows) if parked_rows else []
        if self._activity is not None:
            state = "pushing" if self._activity.kind == "push" else "pulling"
        elif health.next_retry is not None:
            state = "backing_off"
        else:
            state = "idle"
        return {
            "configured": True,
            "transport": transport_kind(self.config.url) if self.config.url else None,
            "url": self.url,
            "fleet": self.fleet,
            "writer": CLOUD_WRITER,
            "state": state,
            "backlog": {"items": backlog.items, "movements": backlog.movements},
            "parked_count": backlog.parked,
            "parked": [row.to_json() for row in parked],
            "last_push": health.last_push.to_json() if health.last_push else None,
            "last_pull": health.last_pull.to_json() if health.last_pull else None,
            "last_error": (
                {"message": health.last_error, "at": _iso(health.last_error_at)}
                if health.last_error
                else None
            ),
            "failures": health.failures,
            "next_retry": _iso(health.next_retry),
            "refused": [
                value.to_json() | {"at": _iso(at)} for value, at in reversed(health.refused)
            ],
            "batch_size": self._batch_limit,
            "activity": self._activity.to_json() if self._activity else None,
            "runs": {str(run): report.to_json() for run, report in health.reports.items()},
            "push_interval_s": self.config.push_interval,
        }
