"""How peer connections are opened: WebSocket over mutual TLS 1.3, server and client side.

Everything above this module sees a :class:`Link` (send bytes, receive bytes, close with a
reason) whose ``peer_station`` is the station id proven by the peer's certificate.
Heartbeats are WebSocket pings: a peer that stops answering is closed within about 10 s.

Who may connect is settled here, before the WebSocket exists and so before any document
byte moves: the TLS handshake verifies the peer's certificate against the fleet CA (another
fleet, a self-made or an expired certificate, or a client that does not speak TLS fail
here), and ``authorize`` refuses revoked stations. The server runs its own TLS handshake
(``loop.start_tls``) instead of letting asyncio do it silently, so every refused
connection is logged with its address and reason and shown by ``invsync peers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from cryptography import x509

from .config import HostPort
from .pki import CertificateProblem, station_id_of_certificate
from .protocol import MAX_FRAME

_LOGGER = logging.getLogger(__name__)

SYNC_PATH = "/invsync/sync"
#: Ping interval; aiohttp closes a link whose pong is later than half of it. At 2 s a
#: pong queued behind a large catch-up update cut busy links, so 5 s (offline in ≤ 10 s).
HEARTBEAT = 5.0
CONNECT_TIMEOUT = 5.0
TLS_HANDSHAKE_TIMEOUT = 10.0
#: Connect, TLS handshake and WebSocket upgrade of one dial, all together.
UPGRADE_TIMEOUT = CONNECT_TIMEOUT + TLS_HANDSHAKE_TIMEOUT
#: Carries the reason of a refused upgrade back to the dialing station.
REFUSED_HEADER = "X-Invsync-Refused"
_HUNG_UP = "the peer hung up after the TLS handshake: it refused our certificate"

#: WebSocket close codes in the private range carry our reasons to the other side.
CLOSE_PROTOCOL = 4000
CLOSE_REFUSED = 4001
CLOSE_DUPLICATE = 4002
CLOSE_SHUTDOWN = 1001


class LinkClosed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PeerRefused(Exception):
    """A connection refused for who the peer is (TLS, certificate, revocation)."""

    def __init__(self, reason: str, station_id: str | None = None) -> None:
        self.reason = reason
        self.station_id = station_id
        super().__init__(reason)


#: Why a station may not sync (revoked, ...), or ``None`` if it may.
Authorize = Callable[[str], str | None]
#: Told about every refused connection: (remote address, reason, station id if known).
Refused = Callable[[str, str, str | None], None]


class Link:
    """One WebSocket, client or server side, as a stream of binary frames."""

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        remote: str,
        *,
        dialed: bool,
        peer_station: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._ws = ws
        self.remote = remote
        self.dialed = dialed
        #: The station id in the peer's verified certificate.
        self.peer_station = peer_station
        self._session = session
        #: Bytes sent and received, framing of our protocol included.
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise LinkClosed(f"send failed: {exc}") from exc
        self.bytes_sent += len(data)

    async def receive(self) -> bytes:
        """The next binary frame; raises :class:`LinkClosed` when the link ends."""
        message = await self._ws.receive()
        if message.type is WSMsgType.BINARY:
            data: bytes = message.data
            self.bytes_received += len(data)
            return data
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            code = self._ws.close_code
            reason = message.extra or ""
            raise LinkClosed(f"closed by peer ({code}{': ' + reason if reason else ''})")
        if message.type is WSMsgType.ERROR:
            raise LinkClosed(f"connection error: {self._ws.exception()}")
        raise LinkClosed(f"unexpected {message.type.name} message")

    async def close(self, code: int = CLOSE_SHUTDOWN, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._ws.close(code=code, message=reason.encode()[:120]), timeout=2.0
            )
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def closed(self) -> bool:
        return self._ws.closed


Acceptor = Callable[[Link], Awaitable[None]]
Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def describe_tls_failure(exc: BaseException) -> str:
    """Words for why a TLS handshake failed, for the log and ``invsync peers``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if (
            "unable to get local issuer" in detail
            or "self-signed" in detail
            or ("self signed" in detail)
        ):
            return f"certificate not issued by this fleet's CA ({detail})"
        return f"certificate refused ({detail})"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "http request" in reason:
            return "not TLS: a plain HTTP/WebSocket client"
        if "wrong version number" in reason or "record layer failure" in reason:
            return "not TLS (or not TLS 1.3)"
        if "certificate required" in reason:
            return "no certificate: the other side demands a station certificate"
        if "unknown ca" in reason or "bad certificate" in reason:
            return f"our certificate was refused by the other side ({reason})"
        if "certificate expired" in reason:
            return "our certificate was refused by the other side: it has expired"
        return f"TLS failed ({reason})"
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        # In TLS 1.3 the server shows its certificate first; a peer that does not trust it
        # (another fleet, a self-made certificate) hangs up before showing its own.
        return "the peer hung up during the TLS handshake: it does not trust this fleet's CA"
    return f"TLS failed ({exc.__class__.__name__}: {exc})"


def peer_station_of(ssl_object: Any) -> str:
    """The station id proven by the peer's (already CA-verified) certificate."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PeerRefused("no station certificate")
    try:
        return station_id_of_certificate(x509.load_der_x509_certificate(der))
    except (ValueError, CertificateProblem) as exc:
        raise PeerRefused(f"unusable certificate: {exc}") from exc


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(HostPort(str(peername[0]), int(peername[1])))
    return "unknown"


class _TlsGate(asyncio.Protocol):
    """A fresh TCP connection: do the TLS handshake ourselves, then hand the encrypted
    transport to aiohttp's request handler. Decrypted data that arrives between the end of
    the handshake and the hand-over is kept and replayed; plain bytes sent before the
    handshake never reach the handler (reading stays paused until the TLS layer reads)."""

    def __init__(self, server: PeerServer) -> None:
        self._server = server
        self._handler: asyncio.Protocol | None = None
        self._pending = bytearray()
        self._eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # start_tls reads from here on; plain bytes go nowhere
        self._server.spawn(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        remote = _address(transport.get_extra_info("peername"))
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                self,
                self._server.tls(),
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except Exception as exc:
            transport.abort()
            self._server.refused(remote, describe_tls_failure(exc), None)
            return
        if tls is None or self._lost:
            return
        handler = self._server.handler_factory()
        self._handler = handler
        tls.set_protocol(handler)
        handler.connection_made(tls)
        if self._pending:
            handler.data_received(bytes(self._pending))
            self._pending.clear()
        if self._eof:
            handler.eof_received()

    def data_received(self, data: bytes) -> None:
        # Only the TLS layer calls this (reading is paused until start_tls installs it),
        # so ``data`` is always decrypted application data.
        if self._handler is not None:
            self._handler.data_received(data)
        else:
            self._pending += data

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._handler is not None:
            self._handler.connection_lost(exc)


class PeerServer:
    """Listens for peer connections; hands each new, authorized link to ``accept``."""

    def __init__(
        self,
        listen: HostPort,
        accept: Acceptor,
        tls: Callable[[], ssl.SSLContext],
        *,
        authorize: Authorize,
        refused: Refused,
        routes: Sequence[Route] = (),
    ) -> None:
        self.listen = listen
        self.tls = tls
        self._accept = accept
        self._authorize = authorize
        self.refused = refused
        self._routes = routes
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._gates: set[asyncio.Task[None]] = set()
        self.port = listen.port

    async def __aenter__(self) -> PeerServer:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get(SYNC_PATH, self._handle)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _TlsGate(self),
                self.listen.host or None,
                self.listen.port,
                reuse_address=True,
            )
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def handler_factory(self) -> asyncio.Protocol:
        assert self._runner is not None and self._runner.server is not None
        protocol: asyncio.Protocol = self._runner.server()
        return protocol

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="peers: TLS handshake")
        self._gates.add(task)
        task.add_done_callback(self._gates.discard)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        gates = list(self._gates)
        for task in gates:
            task.cancel()
        await asyncio.gather(*gates, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        remote = _address(peer)
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        station: str | None = None
        try:
            station = peer_station_of(ssl_object)
            reason = self._authorize(station)
        except PeerRefused as exc:
            reason = exc.reason
        if reason is not None:
            self.refused(remote, reason, station)
            return web.Response(status=403, text=reason, headers={REFUSED_HEADER: reason})
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME, compress=False)
        await ws.prepare(request)
        link = Link(ws, remote, dialed=False, peer_station=station)
        try:
            await self._accept(link)
        finally:
            await link.close()
        return ws


async def dial(address: HostPort, tls: ssl.SSLContext, authorize: Authorize) -> Link:
    """Open a link to a peer. Raises :class:`PeerRefused` when either side refuses the
    other's identity, ``OSError``/``aiohttp.ClientError`` when it cannot be reached."""
    url = f"wss://{address}{SYNC_PATH}"
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
    )
    try:
        try:
            # Bounded as a whole: a peer that finishes TLS and then never answers the
            # upgrade must not keep this dial (and its address) waiting for good.
            async with asyncio.timeout(UPGRADE_TIMEOUT):
                ws = await session.ws_connect(
                    url,
                    heartbeat=HEARTBEAT,
                    max_msg_size=MAX_FRAME,
                    ssl=tls,
                    compress=0,
                    autoping=True,
                )
        except aiohttp.WSServerHandshakeError as exc:
            headers = exc.headers
            reason = headers.get(REFUSED_HEADER) if headers and exc.status == 403 else None
            if reason is not None:
                raise PeerRefused(f"refused by the peer: {reason}") from exc
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PeerRefused(describe_tls_failure(exc.certificate_error)) from exc
        except aiohttp.ClientConnectorSSLError as exc:
            raise PeerRefused(describe_tls_failure(exc.os_error)) from exc
        except aiohttp.ServerDisconnectedError as exc:
            # TLS 1.3: the peer checks our certificate after we finished the handshake and
            # can only hang up; hanging up before answering the upgrade is its refusal.
            raise PeerRefused(_HUNG_UP) from exc
        except aiohttp.ClientOSError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                raise PeerRefused(describe_tls_failure(exc.__cause__)) from exc
            if isinstance(exc.__cause__, ConnectionResetError):
                raise PeerRefused(_HUNG_UP) from exc
            raise
        try:
            station = peer_station_of(ws.get_extra_info("ssl_object"))
            reason = authorize(station)
        except PeerRefused:
            await ws.close()
            raise
        if reason is not None:
            await ws.close(code=CLOSE_REFUSED, message=reason.encode()[:120])
            raise PeerRefused(reason, station)
    except BaseException:
        await session.close()
        raise
    return Link(ws, str(address), dialed=True, peer_station=station, session=session)
