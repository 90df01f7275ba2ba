"""A local stand-in for Supabase's HTTP front: PostgREST's RPC endpoint and Auth's token
endpoint, on 127.0.0.1.

Only the HTTP front is a stand-in. Every RPC call runs the real SQL contract in the real
PostgreSQL of the test fixture, the way PostgREST runs it: connected as ``authenticator``,
one transaction per request (read-only for STABLE functions), ``set local role`` to the
JWT's ``role`` (``anon`` without a token) and ``request.jwt.claims`` set to the JWT's
payload, named arguments taken from the JSON body. Postgres errors come back with
PostgREST's status codes and ``{"code", "message", "details", "hint"}`` body, an
unreachable database as 503.

The token endpoint issues HS256 JWTs (signed here with ``hmac``) for the password and
refresh_token grants; refresh tokens are single-use, as Supabase rotates them. ``clock``
is injectable so tests can expire tokens without sleeping. Counters (``grants``,
``rpc_calls``, ``rejected_tokens``) let tests see what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from daemon.config import CloudConfig


@dataclass(frozen=True, slots=True)
class AuthUser:
    email: str
    password: str
    fleet: str
    id: str = ""
    #: Station users carry app_metadata.invsync_station (the bridge functions demand it).
    station: bool = True


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(claims: dict[str, Any], secret: bytes) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def verify_jwt(token: str, secret: bytes) -> dict[str, Any] | None:
    """The claims of a token signed with ``secret``, or ``None`` (expiry is not checked)."""
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64url(signature)):
            return None
        claims = json.loads(_unb64url(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def _status_for(sqlstate: str, role: str) -> int:
    """PostgREST's mapping of a SQLSTATE to an HTTP status."""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "53400": 500,
        "P0001": 400,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "42501":
        return 401 if role == "anon" else 403
    prefixes = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 500,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return prefixes.get(sqlstate[:2], 400)


def _error(status: int, code: str, message: str, details: str | None = None) -> web.Response:
    body = {"code": code, "message": message, "details": details, "hint": None}
    return web.json_response(body, status=status)


class RestStandIn:
    """``async with RestStandIn(dsn, anon_key=...) as api: api.url``."""

    def __init__(
        self,
        authenticator_dsn: str,
        *,
        anon_key: str = "anon-key-for-tests",
        token_lifetime: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.authenticator_dsn = authenticator_dsn
        self.anon_key = anon_key
        self.token_lifetime = token_lifetime
        self.clock = clock
        self.secret = secrets.token_bytes(32)
        self.users: dict[str, AuthUser] = {}
        self.grants: Counter[str] = Counter()
        self.rpc_calls: Counter[str] = Counter()
        self.rejected_tokens = 0
        self._refresh_tokens: dict[str, AuthUser] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def station_config(self, email: str, password_file: Path) -> CloudConfig:
        """The ``[cloud]`` settings of a station signing in here as ``email``."""
        return CloudConfig(
            url=self.url,
            anon_key=self.anon_key,
            station_email=email,
            station_password_file=password_file,
        )

    def add_user(self, email: str, password: str, fleet: str, *, station: bool = True) -> AuthUser:
        user = AuthUser(email, password, fleet, str(uuid.uuid4()), station)
        self.users[email] = user
        return user

    async def __aenter__(self) -> RestStandIn:
        app = web.Application()
        app.router.add_post("/auth/v1/token", self._token)
        app.router.add_post("/rest/v1/rpc/{function}", self._rpc)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- Supabase Auth ------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        if request.headers.get("apikey") != self.anon_key:
            return web.json_response({"message": "Invalid API key"}, status=401)
        grant = request.query.get("grant_type", "")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"code": 400, "msg": "bad JSON"}, status=400)
        user: AuthUser | None = None
        if grant == "password":
            candidate = self.users.get(str(body.get("email")))
            if candidate is not None and hmac.compare_digest(
                candidate.password.encode(), str(body.get("password")).encode()
            ):
                user = candidate
            failure = ("invalid_credentials", "Invalid login credentials")
        elif grant == "refresh_token":
            user = self._refresh_tokens.pop(str(body.get("refresh_token")), None)
            failure = ("refresh_token_not_found", "Invalid Refresh Token: Refresh Token Not Found")
        else:
            return web.json_response({"code": 400, "msg": "unsupported grant"}, status=400)
        if user is None:
            return web.json_response(
                {"code": 400, "error_code": failure[0], "msg": failure[1]}, status=400
            )
        self.grants[grant] += 1
        now = int(self.clock())
        claims = {
            "aud": "authenticated",
            "sub": user.id,
            "email": user.email,
            "role": "authenticated",
            "iat": now,
            "exp": now + self.token_lifetime,
            "app_metadata": {
                "provider": "email",
                "fleet": user.fleet,
                **({"invsync_station": True} if user.station else {}),
            },
            "user_metadata": {},
        }
        refresh = secrets.token_urlsafe(16)
        self._refresh_tokens[refresh] = user
        return web.json_response(
            {
                "access_token": sign_jwt(claims, self.secret),
                "token_type": "bearer",
                "expires_in": self.token_lifetime,
                "expires_at": now + self.token_lifetime,
                "refresh_token": refresh,
                "user": {
                    "id": user.id,
                    "email": user.email,
                    "app_metadata": claims["app_metadata"],
                },
            }
        )

    # -- PostgREST RPC ------------------------------------------------------------------

    async def _rpc(self, request: web.Request) -> web.Response:
        if request.headers.get("apikey") != self.anon_key:
            return web.json_response({"message": "Invalid API key"}, status=401)
        function = request.match_info["function"]
        claims: dict[str, Any] = {"role": "anon"}
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            verified = verify_jwt(authorization.removeprefix("Bearer "), self.secret)
            if verified is None:
                self.rejected_tokens += 1
                return _error(401, "PGRST301", "JWSError JWSInvalidSignature")
            if float(verified.get("exp", 0)) <= self.clock():
                self.rejected_tokens += 1
                return _error(401, "PGRST303", "JWT expired")
            claims = verified
        role = str(claims.get("role", "anon"))
        try:
            args = await request.json()
        except ValueError:
            return _error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(args, dict):
            return _error(400, "PGRST102", "Empty or invalid json")
        self.rpc_calls[function] += 1
        try:
            conn = await asyncpg.connect(self.authenticator_dsn, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            return _error(503, "PGRST000", "Database connection error", str(err))
        try:
            return await self._call(conn, function, args, role, claims)
        except asyncpg.PostgresError as err:
            status = _status_for(err.sqlstate or "XX000", role)
            return _error(status, err.sqlstate or "XX000", str(err), getattr(err, "detail", None))
        except (OSError, asyncpg.InterfaceError) as err:
            return _error(503, "PGRST001", "Database client error", str(err))
        finally:
            conn.terminate()

    async def _call(
        self,
        conn: asyncpg.Connection[asyncpg.Record],
        function: str,
        args: dict[str, Any],
        role: str,
        claims: dict[str, Any],
    ) -> web.Response:
        signature = await conn.fetchrow(
            "select p.proargnames::text[] as names,"
            " array(select format_type(t, null) from unnest(p.proargtypes) as t) as types,"
            " p.provolatile as volatility"
            " from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'public' and p.proname = $1",
            function,
        )
        if signature is None or set(signature["names"] or ()) != set(args):
            return _error(404, "PGRST202", f"Could not find the function public.{function}")
        named = ", ".join(
            f"\"{name}\" := ($1::jsonb -> '{name}')::{kind}"
            if kind in ("jsonb", "json")
            else f"\"{name}\" := ($1::jsonb ->> '{name}')::{kind}"
            for name, kind in zip(signature["names"], signature["types"], strict=True)
        )
        async with conn.transaction(readonly=signature["volatility"] in ("s", "i")):
            await conn.execute(f'set local role "{role}"')
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)", json.dumps(claims)
            )
            result = await conn.fetchval(
                f'select to_jsonb(public."{function}"({named}))::text', json.dumps(args)
            )
        return web.Response(text=result or "null", content_type="application/json")
