"""The Supabase REST transport: the bridge functions called as PostgREST RPC endpoints.

A station signs in to Supabase Auth as its own user (password grant, email and password
from ``[cloud]`` settings, the password read from a file), sends the user's access token
with the project's anon (publishable) key, and refreshes the token with the refresh token
shortly before it expires. So no service-role key or database password ever sits on a
scanner; what the user may touch is decided by the fleet in its ``app_metadata``.

Errors are classified from PostgREST's answer: a Postgres data error (SQLSTATE class 21,
22, 23, 54), a request PostgREST could not read (``PGRST1xx``) or a body too large is a
:class:`CloudDataError`; a 401 is answered by refreshing the token once; everything else
(other 4xx, 5xx, network, timeouts) is :class:`CloudUnavailable`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from daemon.config import CloudConfig, redact_url

from .postgres import is_data_error
from .transport import CloudConfigError, CloudDataError, CloudUnavailable

_LOGGER = logging.getLogger(__name__)

#: Refresh when less than this share of a token's lifetime is left (at most a minute).
_REFRESH_SHARE = 0.25
_REFRESH_MAX_MARGIN = 60.0


def check_url(url: str) -> str:
    """The project URL without a trailing slash; https, or http to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url.rstrip("/")
    raise CloudConfigError("url", f"{redact_url(url)!r}: use https://<project>.supabase.co")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Token:
    __slots__ = ("access", "expires_at", "lifetime", "refresh")

    def __init__(self, access: str, refresh: str | None, lifetime: float, now: float) -> None:
        self.access = access
        self.refresh = refresh
        self.lifetime = lifetime
        self.expires_at = now + lifetime

    def due(self, now: float) -> bool:
        margin = min(_REFRESH_MAX_MARGIN, self.lifetime * _REFRESH_SHARE)
        return now >= self.expires_at - margin


class RestTransport:
    """:class:`~cloud_bridge.transport.CloudTransport` over Supabase's REST API."""

    name = "rest"

    def __init__(
        self,
        url: str,
        *,
        anon_key: str,
        email: str,
        password_file: Path,
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = check_url(url)
        #: The URL for messages: a project URL has no password, but one pasted with
        #: credentials must not end up in logs.
        self._shown = redact_url(self._url)
        self._anon_key = anon_key
        self._email = email
        self._password_file = password_file
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self._closed = False
        #: Sign-ins by grant type, for status and tests.
        self.grants: dict[str, int] = {"password": 0, "refresh_token": 0}

    @classmethod
    def from_config(cls, config: CloudConfig) -> RestTransport:
        if not config.url:
            raise CloudConfigError("url", "not set")
        check_url(config.url)
        if not config.anon_key:
            raise CloudConfigError("anon_key", "required for an https:// cloud url")
        if not config.station_email:
            raise CloudConfigError("station_email", "required for an https:// cloud url")
        if not config.station_password_file:
            raise CloudConfigError("station_password_file", "required for an https:// cloud url")
        return cls(
            config.url,
            anon_key=config.anon_key,
            email=config.station_email,
            password_file=config.station_password_file,
        )

    def __repr__(self) -> str:
        return f"RestTransport({self._shown!r}, email={self._email!r})"

    async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
        return await self._rpc("merge_inventory", {"batch": batch})

    async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
        return await self._rpc(
            "pull_changes", {"fleet": fleet, "cursor": cursor, "max_rows": max_rows}
        )

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- RPC ----------------------------------------------------------------------------

    async def _rpc(self, function: str, args: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise CloudUnavailable("the transport is closed")
        body = json.dumps(args)
        for attempt in range(2):
            token = await self._access_token(force=attempt > 0)
            status, payload = await self._post(
                f"/rest/v1/rpc/{function}",
                body,
                {"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
            if status == 200 and isinstance(payload, dict):
                return payload
            if status == 401 and attempt == 0:
                # Expired early or revoked: one fresh sign-in, then give up until later.
                _LOGGER.info("cloud rejected the access token; signing in again")
                continue
            raise _classify(function, status, payload)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, path: str, body: str, headers: dict[str, str]) -> tuple[int, object]:
        session = self._session_for_loop()
        try:
            async with session.post(
                self._url + path,
                data=body,
                headers={
                    "apikey": self._anon_key,
                    "Content-Type": "application/json",
                    **headers,
                },
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise CloudUnavailable(f"{self._shown}: {err or type(err).__name__}") from err
        try:
            payload: object = json.loads(text) if text else None
        except ValueError:
            payload = text[:200]
        return status, payload

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    # -- Supabase Auth ------------------------------------------------------------------

    async def _access_token(self, *, force: bool = False) -> str:
        async with self._token_lock:
            token = self._token
            if token is not None and not force and not token.due(self._clock()):
                return token.access
            if token is not None and token.refresh:
                status, payload, refreshed = await self._grant(
                    "refresh_token", {"refresh_token": token.refresh}
                )
                if refreshed is not None:
                    return refreshed.access
                # A used or revoked refresh token: fall back to the password.
                _LOGGER.info("refresh token refused (%s); signing in with the password", status)
                self._token = None
            status, payload, signed_in = await self._grant(
                "password", {"email": self._email, "password": self._read_password()}
            )
            if signed_in is None:
                raise CloudUnavailable(
                    f"Supabase Auth refused the sign-in of {self._email} ({status}): "
                    f"{_message(payload)}"
                )
            return signed_in.access

    async def _grant(
        self, grant_type: str, fields: dict[str, str]
    ) -> tuple[int, object, _Token | None]:
        """One call to the token endpoint; the new token, or ``None`` if it said no."""
        before = self._clock()
        status, payload = await self._post(
            f"/auth/v1/token?grant_type={grant_type}", json.dumps(fields), {}
        )
        self.grants[grant_type] = self.grants.get(grant_type, 0) + 1
        if status >= 500 or status == 429:
            raise CloudUnavailable(f"Supabase Auth answered {status}: {_message(payload)}")
        if status != 200 or not isinstance(payload, dict) or not payload.get("access_token"):
            return status, payload, None
        refresh = payload.get("refresh_token")
        self._token = _Token(
            str(payload["access_token"]),
            str(refresh) if refresh else None,
            float(payload.get("expires_in") or 3600),
            before,
        )
        return status, payload, self._token

    def _read_password(self) -> str:
        try:
            return self._password_file.read_text(encoding="utf-8").strip("\r\n")
        except OSError as err:
            raise CloudUnavailable(
                f"cannot read cloud.station_password_file {self._password_file}: {err.strerror}"
            ) from err


def _message(payload: object) -> str:
    if isinstance(payload, dict):
        for key in ("message", "msg", "error_description", "error"):
            if payload.get(key):
                return str(payload[key])
    return str(payload)[:200]


def _classify(function: str, status: int, payload: object) -> Exception:
    code = payload.get("code") if isinstance(payload, dict) else None
    code = str(code) if code is not None else None
    message = f"{function}: {status} {code or ''} {_message(payload)}".replace("  ", " ")
    # PostgREST answers 400/409 for classes 22/23 but 500 for 54: the code decides.
    if (
        status == 413
        or is_data_error(code)
        or (400 <= status < 500 and code is not None and code.startswith("PGRST1"))
    ):
        return CloudDataError(message, code=code)
    # A statement timeout (57014, answered as 500) keeps its code: the bridge then pushes
    # smaller batches.
    return CloudUnavailable(message, code=code)
