"""Peer sync: one session per pair of stations, exchanging CRDT updates.

The :class:`PeerManager` knows addresses (static ``peers``, mDNS, and what connected peers
tell it), dials them with exponential backoff and full jitter, accepts incoming links,
and keeps exactly one session per station: when two stations dial each other at once,
both keep the connection dialed by the lower station id.

A :class:`Session` runs the protocol of ``protocol.py`` over one link: hello, state
vectors, the diffs the other side lacks, then live updates after every local commit
(and relays of remote ones that advanced our state). Anti-entropy repeats the exchange
periodically. Everything a session receives is stored before it is acknowledged or
relayed (``Store.apply_remote`` returns after the commit). A bad frame closes that one
session; the daemon and its other peers carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from crdt_store import CommittedUpdate, Store, StoreClosed, StoreError
from crdt_store.schema import DOCUMENT_FORMAT

from .config import HostPort
from .guard import FleetGuard
from .protocol import (
    PROTOCOL_VERSION,
    Ack,
    Digest,
    Frame,
    FrameError,
    Hello,
    PeerAddress,
    Peers,
    State,
    Update,
    decode_frame,
    decode_state_vector,
    digest,
    encode_frame,
    missing_from,
)
from .transport import (
    CLOSE_DUPLICATE,
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    CLOSE_SHUTDOWN,
    Link,
    LinkClosed,
    PeerRefused,
    PeerServer,
    Route,
    dial,
)

_LOGGER = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A slow peer may have this many bytes queued; beyond it live updates are dropped for
#: that peer and anti-entropy catches it up later, so memory stays bounded.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
_WARN_INTERVAL = 60.0
#: Refused connections remembered for ``invsync peers``.
REFUSALS_KEPT = 20


class PeerListenError(Exception):
    """The peer sync port cannot be opened (taken, or not an address of this host)."""

    def __init__(self, listen: HostPort, reason: str) -> None:
        self.listen = listen
        super().__init__(
            f"setting listen = {listen}: {reason}; stop what uses the port or choose "
            "another with --listen"
        )


class _RateLimitedLog:
    """Peer-caused warnings: at most one per key per interval."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -_WARN_INTERVAL) >= _WARN_INTERVAL:
            self._last[key] = now
            _LOGGER.warning(message, *args)
        else:
            _LOGGER.debug(message, *args)


@dataclass
class KnownAddress:
    """An address we may dial, and when we may next try it."""

    address: HostPort
    station_id: str | None = None
    source: str = "static"
    failures: int = 0
    next_attempt: float = 0.0
    dialing: bool = False
    is_self: bool = False


@dataclass
class PeerRecord:
    """What this station knows about another station (shown by ``invsync peers``)."""

    station_id: str
    name: str = ""
    address: str = ""
    connected: bool = False
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    session: Session | None = None
    vectors: dict[str, dict[int, int]] = field(default_factory=dict)
    #: Bytes exchanged with this station by sessions that have ended.
    past_sent: int = 0
    past_received: int = 0

    def traffic(self) -> tuple[int, int]:
        """Total bytes sent to and received from this station, all sessions."""
        link = self.session.link if self.session else None
        sent = self.past_sent + (link.bytes_sent if link else 0)
        received = self.past_received + (link.bytes_received if link else 0)
        return sent, received


class Session:
    """One live, handshaken link to one peer station."""

    def __init__(self, manager: PeerManager, link: Link, hello: Hello) -> None:
        self.manager = manager
        self.link = link
        self.hello = hello
        self.peer_id = hello.station_id
        self.dialed_by = manager.station_id if link.dialed else hello.station_id
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._dropped = False
        self._closing: str | None = None
        self._store = manager.store
        #: Catch-up diffs sent per document and not yet acknowledged.
        self._diffs_in_flight: dict[str, int] = {}

    # ------------------------------------------------------------ outgoing

    def send(self, frame: Frame, *, droppable: bool = False) -> None:
        """Queue a frame; live updates are dropped (and resynced later) if the peer lags."""
        data = encode_frame(frame)
        if droppable and self._queued_bytes + len(data) > MAX_QUEUED_BYTES:
            self._dropped = True
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._wakeup.set()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                data = self._queue.popleft()
                self._queued_bytes -= len(data)
                await self.link.send(data)
            if self._dropped:
                # We skipped live updates: ask the peer for its state to fill the gap.
                self._dropped = False
                self.send(State(self.manager.vectors(), reply=True))

    # ------------------------------------------------------------ incoming

    async def _reader(self) -> None:
        while True:
            data = await self.link.receive()
            frame = decode_frame(data)
            await self._handle(frame)

    async def _handle(self, frame: Frame) -> None:
        if isinstance(frame, Update):
            try:
                stored = self._store.merge_remote(frame.doc, frame.update, origin=self.peer_id)
            except StoreClosed:
                raise
            except StoreError as exc:
                raise FrameError(f"rejected update: {exc}") from exc
            # Acknowledge once durable; meanwhile keep reading, so a burst of updates
            # shares group commits instead of waiting for one fsync each.
            stored.add_done_callback(partial(self._acknowledge, frame.doc))
        elif isinstance(frame, Ack):
            self._record_vector(frame.doc, frame.state_vector)
            if self._diffs_in_flight.get(frame.doc):
                self._diffs_in_flight[frame.doc] -= 1
        elif isinstance(frame, State):
            for name, vector in frame.vectors:
                self._record_vector(name, vector)
            self._send_missing(dict(frame.vectors))
            if frame.reply:
                self.send(State(self.manager.vectors()))
        elif isinstance(frame, Digest):
            ours = self.manager.vectors()
            if frame.value != digest(ours):
                self.send(State(ours, reply=True))
            else:
                # Equal digests: the peer had exactly our vectors. Record them, or the
                # peer's own writes (which it never acks back to us) would count as
                # "lacking" for good, since agreeing stations exchange no STATE.
                for name, vector in ours:
                    self._record_vector(name, vector)
        elif isinstance(frame, Peers):
            self.manager.learn_many(frame.peers, source=f"via {self.peer_id}")
        else:
            raise FrameError(f"unexpected {type(frame).__name__} after hello")

    def _acknowledge(self, doc: str, stored: asyncio.Future[bool]) -> None:
        if stored.cancelled() or stored.exception() is not None:
            return  # the store stopped; the peer resends what it lacks after reconnecting
        self.send(Ack(doc, self._store.state_vector(doc)))

    def _record_vector(self, doc: str, vector: bytes) -> None:
        record = self.manager.records.get(self.peer_id)
        if record is not None:
            record.vectors[doc] = decode_state_vector(vector)

    def _send_missing(self, theirs: dict[str, bytes]) -> None:
        """Send a diff for every document the peer lacks something of."""
        for name in self._store.doc_names():
            if self._diffs_in_flight.get(name):
                # Its state predates the diff still on its way: sending another copy of a
                # large catch-up (a whole shard) would only double the traffic.
                continue
            ours = decode_state_vector(self._store.state_vector(name))
            their_vector = theirs.get(name)
            their_clocks = decode_state_vector(their_vector) if their_vector else {}
            if missing_from(ours, their_clocks):
                self.send(Update(name, self._store.diff(name, their_vector)))
                self._diffs_in_flight[name] = self._diffs_in_flight.get(name, 0) + 1

    # ------------------------------------------------------------ lifecycle

    def relay(self, update: CommittedUpdate) -> None:
        if update.origin != self.peer_id:
            self.send(Update(update.doc, update.update), droppable=True)

    async def run(self) -> None:
        """Exchange state, then serve until the link ends; returns the reason."""
        self.send(Peers(tuple(self.manager.addresses_for(self.peer_id))))
        self.send(State(self.manager.vectors()))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._reader(), name=f"peer {self.peer_id}: reader")
                tasks.create_task(self._writer(), name=f"peer {self.peer_id}: writer")
                tasks.create_task(self._anti_entropy(), name=f"peer {self.peer_id}: anti-entropy")
        except* FrameError as group:
            reason = str(group.exceptions[0])
            self.manager.log.warning(
                f"bad {self.peer_id}", "closing link to %s: %s", self.peer_id, reason
            )
            await self.link.close(CLOSE_PROTOCOL, reason)
            raise LinkClosed(reason) from None
        except* LinkClosed as group:
            raise LinkClosed(str(group.exceptions[0])) from None
        except* StoreClosed as group:
            await self.link.close(CLOSE_SHUTDOWN, "store closed")
            raise LinkClosed(f"store closed: {group.exceptions[0]}") from None

    async def _anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(self.manager.anti_entropy_interval * random.uniform(0.8, 1.2))
            self.send(Digest(digest(self.manager.vectors())))

    def lacking(self, ours: Mapping[str, Mapping[int, int]] | None = None) -> int:
        """How many of our changes this peer has not seen, by its last state vectors.

        ``ours`` is our decoded state vectors (``PeerManager.our_clocks``): status for
        several peers, polled by ``invsync sync``, decodes them once, not per peer.
        """
        record = self.manager.records.get(self.peer_id)
        theirs = record.vectors if record else {}
        clocks = ours if ours is not None else self.manager.our_clocks()
        return sum(missing_from(clock, theirs.get(name, {})) for name, clock in clocks.items())


class PeerManager:
    """Owns the peer server, the dialer and every session. ``close()`` is idempotent."""

    def __init__(
        self,
        store: Store,
        *,
        guard: FleetGuard,
        name: str,
        listen: HostPort,
        static_peers: Iterable[HostPort] = (),
        anti_entropy_interval: float = 30.0,
        routes: Iterable[Route] = (),
    ) -> None:
        self.store = store
        self.guard = guard
        self.station_id = guard.station_id
        self.name = name
        self.listen = listen
        self.anti_entropy_interval = anti_entropy_interval
        self.records: dict[str, PeerRecord] = {}
        self.log = _RateLimitedLog()
        self._addresses: dict[HostPort, KnownAddress] = {}
        for address in static_peers:
            self._addresses[address] = KnownAddress(address, source="static")
        #: Recent connections refused for who the peer is (newest last).
        self.refusals: deque[dict[str, Any]] = deque(maxlen=REFUSALS_KEPT)
        self._server = PeerServer(
            listen,
            self._accept,
            guard.server_context,
            authorize=guard.authorize,
            refused=self._refused_incoming,
            routes=tuple(routes),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._dialer: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def fleet_id(self) -> str:
        return self.guard.fleet_id

    async def __aenter__(self) -> PeerManager:
        try:
            await self._server.__aenter__()
        except OSError as exc:
            raise PeerListenError(self.listen, exc.strerror or str(exc)) from exc
        self._unsubscribe = self.store.subscribe(self._on_commit)
        self._dialer = asyncio.create_task(self._dial_loop(), name="peers: dialer")
        _LOGGER.info("peer sync listening on %s:%d", self.listen.host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        # Stop dialing first, and let _serve refuse links that complete from now on:
        # sessions that started while the links below were closing used to keep the
        # station from stopping (the server waits for its handlers).
        if self._dialer is not None:
            self._dialer.cancel("peer manager closing")
        for record in list(self.records.values()):
            if record.session is not None:
                await record.session.link.close(CLOSE_SHUTDOWN, "station shutting down")
        tasks = [t for t in (self._dialer, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel("peer manager closing")
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.close()

    # ------------------------------------------------------------ knowledge

    def vectors(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((name, self.store.state_vector(name)) for name in self.store.doc_names())

    def learn(self, address: HostPort, station_id: str | None, *, source: str) -> None:
        """Remember an address to dial (mDNS, peer exchange)."""
        if station_id == self.station_id:
            return
        known = self._addresses.get(address)
        if known is None:
            self._addresses[address] = KnownAddress(address, station_id, source)
            self._changed.set()
        elif station_id and known.station_id != station_id:
            known.station_id = station_id
            known.failures = 0
            known.next_attempt = 0.0
            self._changed.set()

    def learn_many(self, peers: Iterable[PeerAddress], *, source: str) -> None:
        for peer in peers:
            self.learn(HostPort(peer.host, peer.port), peer.station_id, source=source)

    def addresses_for(self, other: str) -> list[PeerAddress]:
        """Addresses worth telling ``other`` about (peer exchange)."""
        found = []
        for known in self._addresses.values():
            if known.station_id and known.station_id != other and not known.is_self:
                found.append(PeerAddress(known.station_id, known.address.host, known.address.port))
        return found

    # ------------------------------------------------------------ dialing

    def _connected(self, station_id: str | None) -> bool:
        record = self.records.get(station_id) if station_id else None
        return bool(record and record.session)

    async def _dial_loop(self) -> None:
        while True:
            now = time.monotonic()
            for known in list(self._addresses.values()):
                if known.is_self or known.dialing or self._connected(known.station_id):
                    continue
                if known.next_attempt <= now:
                    known.dialing = True
                    self._spawn(self._dial(known), f"peers: dial {known.address}")
            self._changed.clear()
            # Not asyncio.wait_for: on Python 3.11 it returns normally when it is cancelled
            # just after the event was set (a dial ending while close() cancels this task),
            # so the loop ran on and close() waited for it forever. asyncio.timeout re-raises
            # a cancellation it did not cause.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._changed.wait()

    async def _dial(self, known: KnownAddress) -> None:
        try:
            try:
                link = await dial(known.address, self.guard.client_context(), self.guard.authorize)
            except PeerRefused as exc:
                station = exc.station_id or known.station_id
                reason = exc.reason + self.guard.certificate_warning()
                self._record_refusal(str(known.address), reason, station, outgoing=True)
                self._backoff(known, reason)
                return
            except Exception as exc:  # any failure to connect only backs off
                self._backoff(known, f"cannot connect: {exc}")
                return
            hello = await self._handshake(link, known)
            if hello is None:
                self._backoff(known, "handshake failed")
                return
            known.failures = 0
            known.station_id = hello.station_id
            await self._serve(link, hello)
            known.next_attempt = time.monotonic() + _jitter(BACKOFF_FIRST)
        finally:
            known.dialing = False
            self._changed.set()

    def _backoff(self, known: KnownAddress, reason: str) -> None:
        known.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(known.failures, 10))
        known.next_attempt = time.monotonic() + _jitter(delay)
        if known.station_id and known.station_id in self.records:
            self.records[known.station_id].last_error = reason
        _LOGGER.debug("peer %s: %s (retry in %.1fs)", known.address, reason, delay)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ sessions

    async def _accept(self, link: Link) -> None:
        # The server's handler task is tracked like a dial task, so close() can cancel
        # a session it did not reach; the server would otherwise wait for it for good.
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            hello = await self._handshake(link, None)
            if hello is not None:
                await self._serve(link, hello)
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _hello(self) -> Hello:
        return Hello(
            version=PROTOCOL_VERSION,
            station_id=self.station_id,
            name=self.name,
            fleet_id=self.fleet_id,
            shard_count=self.store.shard_count,
            schema_version=DOCUMENT_FORMAT,
            port=self.port,
        )

    async def _handshake(self, link: Link, known: KnownAddress | None) -> Hello | None:
        """Exchange hellos; refuse (with a reason both sides log) on any mismatch."""
        try:
            await link.send(encode_frame(self._hello()))
            async with asyncio.timeout(HELLO_TIMEOUT):
                raw = await link.receive()
            frame = decode_frame(raw)
        except (LinkClosed, FrameError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or "no hello in time"
            self.log.warning(
                f"hello {link.remote}", "peer %s: handshake failed: %s", link.remote, reason
            )
            self._note_refusal(known.station_id if known else None, reason)
            await link.close(CLOSE_PROTOCOL, reason)
            return None
        if not isinstance(frame, Hello):
            await link.close(CLOSE_PROTOCOL, "expected hello")
            return None
        reason = self._mismatch(frame)
        if reason is None and frame.station_id != link.peer_station:
            reason = (
                f"its certificate is for station {link.peer_station}, "
                f"but it says it is {frame.station_id}"
            )
        if frame.station_id == self.station_id and known is not None:
            known.is_self = True
        if reason is not None:
            self.log.warning(
                f"refuse {frame.station_id}",
                "refusing station %s at %s: %s",
                frame.station_id,
                link.remote,
                reason,
            )
            self._note_refusal(frame.station_id, reason, name=frame.name)
            await link.close(CLOSE_REFUSED, reason)
            return None
        if link.dialed is False and frame.port:
            host = link.remote.rsplit(":", 1)[0]
            self.learn(HostPort(host, frame.port), frame.station_id, source="incoming")
        return frame

    def _mismatch(self, hello: Hello) -> str | None:
        if hello.station_id == self.station_id:
            return "connected to itself"
        if hello.version != PROTOCOL_VERSION:
            return f"protocol version {hello.version}, we speak {PROTOCOL_VERSION}"
        if hello.fleet_id != self.fleet_id:
            return f"station of another fleet ({hello.fleet_id})"
        if hello.shard_count != self.store.shard_count:
            return f"shard count {hello.shard_count}, ours is {self.store.shard_count}"
        if hello.schema_version != DOCUMENT_FORMAT:
            return f"document format {hello.schema_version}, ours is {DOCUMENT_FORMAT}"
        return None

    def _refused_incoming(self, remote: str, reason: str, station_id: str | None) -> None:
        self._record_refusal(remote, reason, station_id, outgoing=False)

    def _record_refusal(
        self, remote: str, reason: str, station_id: str | None, *, outgoing: bool
    ) -> None:
        """A connection refused for who the peer is: logged, and listed by ``peers``."""
        direction = "to" if outgoing else "from"
        host = remote.rsplit(":", 1)[0] if not outgoing else remote
        self.log.warning(
            f"refused {host} {reason}",
            "refused connection %s %s%s: %s",
            direction,
            remote,
            f" (station {station_id})" if station_id else "",
            reason,
        )
        self.refusals.append(
            {
                "address": remote,
                "direction": "outgoing" if outgoing else "incoming",
                "station_id": station_id,
                "reason": reason,
                "at": time.time(),
            }
        )
        self._note_refusal(station_id, reason)

    def drop(self, station_id: str, reason: str) -> None:
        """Close the session with ``station_id`` now (it was revoked)."""
        record = self.records.get(station_id)
        if record is None:
            return
        session, record.session = record.session, None
        record.connected = False
        record.since = time.time()
        record.last_error = reason
        if session is not None:
            # Unregistered at once, so nothing more is relayed to it; the close follows.
            self._spawn(session.link.close(CLOSE_REFUSED, reason), f"peers: drop {station_id}")

    def drop_all(self, reason: str) -> None:
        """Close every session (this station switched fleets) and dial afresh."""
        for record in self.records.values():
            if record.session is not None:
                self._spawn(record.session.link.close(CLOSE_REFUSED, reason), "peers: drop")
        for known in self._addresses.values():
            known.failures = 0
            known.next_attempt = 0.0
        self._changed.set()

    def _note_refusal(self, station_id: str | None, reason: str, *, name: str = "") -> None:
        if station_id is None or station_id == self.station_id:
            return
        record = self.records.setdefault(station_id, PeerRecord(station_id, name=name))
        record.last_error = reason
        if name:
            record.name = name

    async def _serve(self, link: Link, hello: Hello) -> None:
        if self._closed:
            await link.close(CLOSE_SHUTDOWN, "station shutting down")
            return
        record = self.records.setdefault(hello.station_id, PeerRecord(hello.station_id))
        session = Session(self, link, hello)
        existing = record.session
        if existing is not None:
            keep_new = session.dialed_by == min(self.station_id, hello.station_id) and (
                existing.dialed_by != session.dialed_by or existing.link.closed
            )
            if not keep_new:
                await link.close(CLOSE_DUPLICATE, "duplicate connection")
                return
            await existing.link.close(CLOSE_DUPLICATE, "duplicate connection")
        if self._closed:  # close() began while we waited: it will not see this session
            await link.close(CLOSE_SHUTDOWN, "station shutting down")
            return
        # Checked again with no await before the session is registered: a revocation (or a
        # switch to another fleet) committed during the hello would otherwise miss it.
        refusal = self.guard.authorize(hello.station_id)
        if refusal is None and hello.fleet_id != self.fleet_id:
            refusal = "this station changed fleets"
        if refusal is not None:
            self._record_refusal(link.remote, refusal, hello.station_id, outgoing=link.dialed)
            await link.close(CLOSE_REFUSED, refusal)
            return
        record.session = session
        record.name = hello.name
        host = link.remote.rsplit(":", 1)[0]
        record.address = link.remote if link.dialed else f"{host}:{hello.port}"
        record.connected = True
        record.since = time.time()
        record.last_error = None
        _LOGGER.info(
            "connected to station %s (%s) at %s", hello.station_id, hello.name, link.remote
        )
        reason = "closed"
        try:
            await session.run()
        except LinkClosed as exc:
            reason = exc.reason
        except StoreClosed as exc:
            reason = str(exc)
        finally:
            if record.session is session:
                record.past_sent += link.bytes_sent
                record.past_received += link.bytes_received
                record.session = None
                record.connected = False
                record.since = time.time()
                record.last_error = None if reason.startswith("closed by peer (1001") else reason
                _LOGGER.info("station %s offline: %s", hello.station_id, reason)
            await link.close(CLOSE_SHUTDOWN, "")

    def _on_commit(self, update: CommittedUpdate) -> None:
        for record in self.records.values():
            if record.session is not None:
                try:
                    record.session.relay(update)
                except FrameError as exc:
                    _LOGGER.error("cannot send update of %s: %s", update.doc, exc)

    # ------------------------------------------------------------ status and sync

    def our_clocks(self) -> dict[str, dict[int, int]]:
        """Our state vector of every document, decoded."""
        store = self.store
        return {name: decode_state_vector(store.state_vector(name)) for name in store.doc_names()}

    def status(self) -> list[dict[str, Any]]:
        peers = []
        ours = self.our_clocks()
        for record in sorted(self.records.values(), key=lambda r: r.station_id):
            lacking = record.session.lacking(ours) if record.session else None
            sent, received = record.traffic()
            peers.append(
                {
                    "station_id": record.station_id,
                    "name": record.name,
                    "address": record.address,
                    "state": "connected" if record.connected else "offline",
                    "since": record.since,
                    "lacking": lacking,
                    "last_error": record.last_error,
                    "bytes_sent": sent,
                    "bytes_received": received,
                }
            )
        return peers

    async def sync_now(self, wait_seconds: float) -> list[dict[str, Any]]:
        """Run anti-entropy with every connected peer and wait until each has our state."""
        sessions = [r.session for r in self.records.values() if r.session is not None]
        for session in sessions:
            session.send(State(self.vectors(), reply=True))
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            live = [s for s in sessions if self._connected(s.peer_id)]
            ours = self.our_clocks()
            if all(s.lacking(ours) == 0 for s in live):
                break
            await asyncio.sleep(0.05)
        return self.status()


def _jitter(delay: float) -> float:
    """Full jitter: spreads reconnects of many stations after an outage."""
    return random.uniform(0, delay)
