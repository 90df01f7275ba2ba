"""Who may sync with this station: the fleet membership in force and the revocation list.

The guard holds the current :class:`FleetMembership` (swapped when the station joins
another fleet), builds the TLS contexts from it, and keeps the set of revoked stations
from the ``revocations`` map of the fleet doc — only entries signed by the fleet CA count.
It re-reads that map whenever a commit touches the fleet doc (a revocation made here or
arriving from any peer) and tells the peer manager to drop revoked stations at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from crdt_store import CommittedUpdate, Store, StoreError
from crdt_store.documents import ENROLLMENTS_ROOT, REVOCATIONS_ROOT
from crdt_store.names import FLEET_DOC

from . import pki
from .fleet import FleetMembership, write_file

#: Revocations this station has verified, kept even if the fleet doc loses them.
REVOKED_FILE = "revoked.json"
#: Seconds a stopping station waits for revocations it is writing back to the fleet doc.
WRITE_BACK_WAIT = 5.0

_LOGGER = logging.getLogger(__name__)


class FleetGuard:
    def __init__(self, store: Store, membership: FleetMembership) -> None:
        self.store = store
        self._membership = membership
        self._server_context: ssl.SSLContext | None = None
        self._client_context: ssl.SSLContext | None = None
        self.revoked: dict[str, pki.Revocation] = {}
        self._ignored: set[str] = set()
        #: Called with (station id, reason) for each newly revoked station.
        self.on_revoked: Callable[[str, str], None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FleetGuard:
        self._load_revocations()
        self.refresh()
        self._unsubscribe = self.store.subscribe(self._on_commit)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop watching the fleet doc, and let revocations being written back finish
        (a commit each) while the store is still open: a task left pending would die
        with the store and the entry wait for the next start."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        pending = list(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=WRITE_BACK_WAIT)
            for task in late:
                task.cancel("station stopping")

    @property
    def membership(self) -> FleetMembership:
        return self._membership

    @property
    def fleet_id(self) -> str:
        return self._membership.fleet_id

    @property
    def station_id(self) -> str:
        return self._membership.identity.station_id

    def server_context(self) -> ssl.SSLContext:
        if self._server_context is None:
            self._server_context = self._membership.server_context()
        return self._server_context

    def client_context(self) -> ssl.SSLContext:
        if self._client_context is None:
            self._client_context = self._membership.client_context()
        return self._client_context

    def switch(self, membership: FleetMembership) -> None:
        """Use another membership (joined a fleet, or imported the CA key)."""
        self._membership = membership
        self._server_context = self._client_context = None
        self._ignored.clear()
        self._load_revocations()
        self.refresh()

    def certificate_warning(self) -> str:
        """Words to add to a refusal when our own certificate is the likely reason."""
        expires = self._membership.station_cert.not_valid_after_utc
        if expires < dt.datetime.now(dt.UTC):
            return (
                f" (this station's certificate expired on {expires:%Y-%m-%d}: "
                "join the fleet again with a new token)"
            )
        return ""

    def authorize(self, station_id: str) -> str | None:
        """Why ``station_id`` may not sync with us, or ``None``."""
        if station_id in self.revoked:
            return "this station was revoked from the fleet"
        return None

    # ------------------------------------------------------------ revocations

    def _on_commit(self, update: CommittedUpdate) -> None:
        if update.doc == FLEET_DOC:
            self.refresh()

    def refresh(self) -> None:
        """Re-read the revocation list; drop stations revoked since the last read.

        A verified revocation is never forgotten: the fleet doc is writable by every
        enrolled station, so one could overwrite or delete an entry there. Verified
        revocations are also kept in ``revoked.json`` (loaded at start), and an entry
        missing from the doc, or replaced by one that does not verify, is written back."""
        known = dict(self.revoked)
        damaged: list[pki.Revocation] = []
        entries = self.store.fleet_entries(REVOCATIONS_ROOT)
        for station, entry in entries.items():
            revocation = pki.verified_revocation(self._membership.ca_cert, station, entry)
            if revocation is not None:
                known.setdefault(station, revocation)
            elif station in known:
                damaged.append(known[station])
            elif station not in self._ignored:
                # Also revocations of a fleet this station left: they merged in with its
                # inventory and are signed by that fleet's CA.
                self._ignored.add(station)
                _LOGGER.warning("ignoring a revocation of %s not signed by the fleet CA", station)
        damaged += [r for station, r in known.items() if station not in entries]
        new = set(known) - set(self.revoked)
        self.revoked = known
        if new:
            self._save_revocations()
        for revocation in damaged:
            _LOGGER.warning(
                "the revocation of %s was removed from the fleet doc; restoring it",
                revocation.station_id,
            )
            self._republish(revocation)
        for station in sorted(new):
            _LOGGER.warning("station %s is revoked: refusing it from now on", station)
            if self.on_revoked is not None:
                self.on_revoked(station, "this station was revoked from the fleet")

    def _republish(self, revocation: pki.Revocation) -> None:
        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self.store.record_fleet_entry(
                    REVOCATIONS_ROOT, revocation.station_id, revocation.to_entry()
                )

        task = asyncio.get_running_loop().create_task(
            write(), name=f"fleet: restore revocation of {revocation.station_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _revocations_path(self) -> Path:
        return self._membership.data_dir / REVOKED_FILE

    def _load_revocations(self) -> None:
        """The revocations this station has verified before (for its current fleet)."""
        self.revoked = {}
        try:
            data = json.loads(self._revocations_path().read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            _LOGGER.error("cannot read %s (%s); using the fleet doc only", REVOKED_FILE, exc)
            return
        if not isinstance(data, dict) or data.get("fleet") != self.fleet_id:
            return
        entries = data.get("revocations")
        for station, entry in (entries if isinstance(entries, dict) else {}).items():
            revocation = pki.verified_revocation(self._membership.ca_cert, station, entry)
            if revocation is not None:
                self.revoked[station] = revocation

    def _save_revocations(self) -> None:
        data = {
            "fleet": self.fleet_id,
            "revocations": {s: r.to_entry() for s, r in sorted(self.revoked.items())},
        }
        try:
            write_file(self._revocations_path(), json.dumps(data, indent=1).encode())
        except OSError as exc:
            _LOGGER.error("cannot record revocations in %s: %s", REVOKED_FILE, exc)

    async def revoke(self, station_id: str) -> pki.Revocation:
        """Sign a revocation with the CA key and spread it through the fleet doc."""
        ca_key = self._membership.ca_key
        if ca_key is None:
            raise PermissionError("this station does not hold the fleet CA")
        revocation = pki.sign_revocation(ca_key, self.fleet_id, station_id, int(time.time() * 1000))
        await self.store.record_fleet_entry(REVOCATIONS_ROOT, station_id, revocation.to_entry())
        self.refresh()
        return revocation

    async def record_enrollment(self, station_id: str, name: str) -> None:
        entry = {"at": int(time.time() * 1000), "by": self.station_id, "name": name}
        await self.store.record_fleet_entry(ENROLLMENTS_ROOT, station_id, entry)
