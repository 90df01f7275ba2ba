"""Apply the cloud SQL contract (``cloud_bridge/sql/NNN_name.sql``) to a database.

Each file runs once, in name order, in its own transaction, and is recorded in
``public.invsync_migrations`` with its SHA-256; running again applies only what is new.
It needs an administrator's connection (the tables' future owner: ``postgres`` on
Supabase), never the station's. The same files can be pasted into Supabase's SQL editor
in order instead, and then are not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

from daemon.config import redact_url

from .transport import CloudError, CloudUnavailable

_LOGGER = logging.getLogger(__name__)

_LEDGER = """
create table if not exists public.invsync_migrations (
  name text primary key,
  sha256 text not null,
  applied_at timestamptz not null default now()
);
-- Supabase exposes `public` through its REST API and grants its roles everything in it by
-- default privileges: only the owner may see this table.
alter table public.invsync_migrations enable row level security;
revoke all on table public.invsync_migrations from public;
do $$
declare
  api_role text;
begin
  foreach api_role in array array['anon', 'authenticated', 'service_role'] loop
    if exists (select from pg_catalog.pg_roles where rolname = api_role) then
      execute format('revoke all on table public.invsync_migrations from %I', api_role);
    end if;
  end loop;
end
$$;
"""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationFailed(CloudError):
    """A migration file failed; nothing of it was applied."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"migration {name} failed: {reason}")


def load_migrations() -> list[Migration]:
    """The SQL files shipped in ``cloud_bridge/sql``, in the order they apply."""
    folder = resources.files("cloud_bridge") / "sql"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8")) for entry in files]


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet recorded in the database; returns their names.

    Raises :class:`CloudUnavailable` when the database cannot be reached and
    :class:`MigrationFailed` when a file fails (that file is rolled back; the ones before it
    stay applied).
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=30, statement_cache_size=0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        raise CloudUnavailable(f"cannot connect to {redact_url(dsn)}: {err}") from err
    applied: list[str] = []
    try:
        # Another migrator creating the ledger at the same moment: it is there now.
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await conn.execute(_LEDGER)
        for migration in load_migrations():
            async with conn.transaction():
                # Two migrators at once take turns; the second finds the work done.
                await conn.execute("lock table public.invsync_migrations in exclusive mode")
                recorded = await conn.fetchval(
                    "select sha256 from public.invsync_migrations where name = $1",
                    migration.name,
                )
                if recorded is not None:
                    if recorded != migration.sha256:
                        _LOGGER.warning(
                            "migration %s changed since it was applied; not applied again",
                            migration.name,
                        )
                    continue
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as err:
                    raise MigrationFailed(migration.name, f"{err.sqlstate}: {err}") from err
                await conn.execute(
                    "insert into public.invsync_migrations (name, sha256) values ($1, $2)",
                    migration.name,
                    migration.sha256,
                )
            _LOGGER.info("applied migration %s", migration.name)
            applied.append(migration.name)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as err:
        raise CloudUnavailable(f"{redact_url(dsn)}: {err}") from err
    finally:
        try:
            await conn.close(timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()
    return applied
