"""The direct Postgres transport: the bridge functions called over one asyncpg connection.

Made for a Supabase project's direct connection, its Supavisor pooler (transaction mode
allows no named prepared statements, hence ``statement_cache_size=0`` and no ``SET``; the
tests connect directly, not through a pooler) and an on-premise PostgreSQL, connecting as a
member of the ``invsync_bridge`` role.
The connection is opened on first use and dropped on any connection-level failure; the
next call opens a new one, so an outage costs nothing but the failed calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg

from daemon.config import redact_url

from .transport import STATEMENT_TIMEOUT, CloudDataError, CloudUnavailable

_LOGGER = logging.getLogger(__name__)

#: SQLSTATE classes that mean "this data was refused": cardinality (21), data exception
#: (22), integrity constraint (23), program limit (54: e.g. a value too large to index,
#: which a smaller batch isolates). Everything else is the server's or our setup's state.
DATA_ERROR_CLASSES = frozenset({"21", "22", "23", "54"})


def is_data_error(sqlstate: str | None) -> bool:
    """Whether a SQLSTATE says the request's data, not the server, was at fault."""
    return sqlstate is not None and sqlstate[:2] in DATA_ERROR_CLASSES


class PostgresTransport:
    """:class:`~cloud_bridge.transport.CloudTransport` over asyncpg."""

    name = "postgres"

    def __init__(
        self, dsn: str, *, connect_timeout: float = 10.0, command_timeout: float = 120.0
    ) -> None:
        self._dsn = dsn
        #: The DSN without its password, for messages and logs.
        self._shown = redact_url(dsn)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None
        # One connection runs one query at a time; the push and pull loops take turns.
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresTransport({self._shown!r})"

    async def merge(self, batch: dict[str, Any]) -> dict[str, Any]:
        return await self._call("select public.merge_inventory($1::jsonb)::text", json.dumps(batch))

    async def pull(self, fleet: str, cursor: str | None, max_rows: int) -> dict[str, Any]:
        return await self._call(
            "select public.pull_changes($1::text, $2::text, $3::integer)::text",
            fleet,
            cursor,
            max_rows,
        )

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            await self._drop()

    async def _call(self, query: str, *args: object) -> dict[str, Any]:
        if self._closed:
            raise CloudUnavailable("the transport is closed")
        async with self._lock:
            conn = await self._connection()
            try:
                text = await conn.fetchval(query, *args, timeout=self._command_timeout)
            except asyncpg.PostgresError as err:
                if is_data_error(err.sqlstate):
                    raise CloudDataError(_describe(err), code=err.sqlstate) from err
                if isinstance(err, asyncpg.PostgresConnectionError | asyncpg.FatalPostgresError):
                    await self._drop()
                raise CloudUnavailable(_describe(err), code=err.sqlstate) from err
            except TimeoutError as err:
                # asyncpg cancelled the query after command_timeout: as for the server's
                # statement_timeout, a smaller batch may fit.
                await self._drop()
                raise CloudUnavailable(
                    f"{self._shown}: no answer within {self._command_timeout:g}s",
                    code=STATEMENT_TIMEOUT,
                ) from err
            except (OSError, asyncpg.InterfaceError) as err:
                # The connection's state is unknown after a timeout or a broken socket.
                await self._drop()
                raise CloudUnavailable(f"{self._shown}: {err or type(err).__name__}") from err
        if not isinstance(text, str):
            raise CloudUnavailable(f"unexpected reply {text!r} from {self._shown}")
        result = json.loads(text)
        if not isinstance(result, dict):
            raise CloudUnavailable(f"unexpected reply {text[:80]!r} from {self._shown}")
        return result

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        try:
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                statement_cache_size=0,
                server_settings={"application_name": "invsync-bridge"},
            )
        except asyncpg.PostgresError as err:
            # Refused logins, unknown databases, too many connections: nothing a smaller
            # batch would fix.
            raise CloudUnavailable(f"{self._shown}: {_describe(err)}") from err
        except (OSError, TimeoutError, asyncpg.InterfaceError) as err:
            raise CloudUnavailable(
                f"cannot connect to {self._shown}: {err or type(err).__name__}"
            ) from err
        _LOGGER.debug("connected to %s", self._shown)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            # terminate(), not close(): close() waits for the server, which may be gone.
            conn.terminate()


def _describe(err: asyncpg.PostgresError) -> str:
    detail = f" ({err.detail})" if getattr(err, "detail", None) else ""
    return f"{err.sqlstate}: {err.args[0] if err.args else type(err).__name__}{detail}"
