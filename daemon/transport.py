"""How peer connections are opened: WebSocket over aiohttp, server and client side.

Everything above this module sees a :class:`Link` (send bytes, receive bytes, close with a
reason), so securing the transport (mutual TLS) changes only this file. Heartbeats are
WebSocket pings: a peer that stops answering is closed within about 10 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType, web

from .config import HostPort
from .protocol import MAX_FRAME

_LOGGER = logging.getLogger(__name__)

SYNC_PATH = "/invsync/sync"
#: Ping interval; aiohttp closes a link whose pong is later than half of it. At 2 s a
#: pong queued behind a large catch-up update cut busy links, so 5 s (offline in ≤ 10 s).
HEARTBEAT = 5.0
CONNECT_TIMEOUT = 5.0

#: WebSocket close codes in the private range carry our reasons to the other side.
CLOSE_PROTOCOL = 4000
CLOSE_REFUSED = 4001
CLOSE_DUPLICATE = 4002
CLOSE_SHUTDOWN = 1001


class LinkClosed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Link:
    """One WebSocket, client or server side, as a stream of binary frames."""

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        remote: str,
        *,
        dialed: bool,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._ws = ws
        self.remote = remote
        self.dialed = dialed
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


class PeerServer:
    """Listens for peer connections; hands each new link to ``accept``."""

    def __init__(
        self, listen: HostPort, accept: Acceptor, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.listen = listen
        self._accept = accept
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self.port = listen.port

    async def __aenter__(self) -> PeerServer:
        app = web.Application()
        app.router.add_get(SYNC_PATH, self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.listen.host, self.listen.port, ssl_context=self._ssl)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME, compress=False)
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        remote = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        link = Link(ws, remote, dialed=False)
        try:
            await self._accept(link)
        finally:
            await link.close()
        return ws


async def dial(address: HostPort, ssl_context: ssl.SSLContext | None = None) -> Link:
    """Open a link to a peer; raises ``OSError``/``aiohttp.ClientError`` on failure."""
    scheme = "wss" if ssl_context else "ws"
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"{scheme}://{host}:{address.port}{SYNC_PATH}"
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
    )
    try:
        ws = await session.ws_connect(
            url,
            heartbeat=HEARTBEAT,
            max_msg_size=MAX_FRAME,
            ssl=ssl_context if ssl_context else False,
            compress=0,
            autoping=True,
        )
    except BaseException:
        await session.close()
        raise
    return Link(ws, str(address), dialed=True, session=session)
