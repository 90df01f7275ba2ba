"""A throwaway PostgreSQL cluster for the cloud tests, shaped like a Supabase database.

``pg_cluster`` (session scope) runs ``initdb`` and ``pg_ctl`` from the installed server
binaries into a fresh directory under /dev/shm (or /tmp), listening only on 127.0.0.1 at a
free port (and a Unix socket in the same directory). Running as root, every binary runs as
the ``postgres`` user through ``runuser``, since the server refuses to run as root. The
cluster gets Supabase's roles (``anon``, ``authenticated``, ``service_role`` and the
``authenticator`` login PostgREST uses), an ``auth`` schema whose ``auth.jwt()`` /
``auth.uid()`` / ``auth.role()`` read ``request.jwt.claims`` as Supabase's do, and
Supabase's default privileges on ``public``, so the SQL contract runs unmodified.

Two template databases are made once per session: ``invsync_base`` (the Supabase shape,
no invsync tables) and ``invsync_template`` (base plus every migration, applied with
``cloud_bridge.migrate``). Tests get a fresh copy of one of them, which takes a few tens
of milliseconds: ``cloud_db`` (migrated, with its own database id) and ``empty_cloud_db``
(not migrated) yield a :class:`CloudDatabase` with DSNs for the admin, a login role in the
``invsync_bridge`` group (``BRIDGE_LOGIN``) and the ``authenticator``; ``cloud_dbs``
makes several (``db = await cloud_dbs()``). The cluster can be stopped and started again
(outage tests); the per-test fixtures start it again if a test left it stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from cloud_bridge.migrate import migrate

BASE_DB = "invsync_base"
TEMPLATE_DB = "invsync_template"
#: The station's login for direct connections: a member of the NOLOGIN group role
#: ``invsync_bridge``, as docs/cloud.md tells an administrator to create one per station.
BRIDGE_LOGIN = "invsync_dock_a"

_SUPABASE_ROLES = """
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit;
grant anon, authenticated, service_role to authenticator;
"""

# What a Supabase project has before anyone runs a migration (the parts the contract
# touches): the auth helpers over the JWT claims PostgREST sets, and default privileges
# that hand every new table and function in `public` to the API roles.
_SUPABASE_SCHEMA = """
create schema auth;
grant usage on schema auth to anon, authenticated, service_role;
create function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;
create function auth.uid() returns uuid language sql stable as $$
  select nullif(auth.jwt() ->> 'sub', '')::uuid
$$;
create function auth.role() returns text language sql stable as $$
  select auth.jwt() ->> 'role'
$$;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables
  to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions
  to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences
  to anon, authenticated, service_role;
"""


def find_bindir() -> Path | None:
    """PostgreSQL 15's server binaries, or the newest installed, or ``None``."""
    override = os.environ.get("INVSYNC_PG_BINDIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _scratch_dir() -> str:
    """/dev/shm when it is there (cloning a database is disk-bound), else /tmp."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else "/tmp"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgCluster:
    """One PostgreSQL server in a temporary directory; ``postgres`` is its superuser."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data_dir = root / "data"
        self.log_file = root / "server.log"
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.running = False
        self._as_postgres = os.geteuid() == 0

    @classmethod
    def create(cls, bindir: Path) -> PgCluster:
        """``initdb`` into a new directory under /tmp (not started yet)."""
        root = Path(tempfile.mkdtemp(prefix="invsync-pg-", dir=_scratch_dir()))
        cluster = cls(bindir, root)
        if cluster._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--locale=C",
            "--encoding=UTF8",
        )
        return cluster

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        if self.running:
            return
        for attempt in itertools.count():
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses={self.host} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=100"
            )
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                    "-o", options, "start",
                )  # fmt: skip
                break
            except subprocess.CalledProcessError:
                if attempt >= 2:
                    raise
                self.port = _free_port()  # someone took the port in between
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients are disconnected; ``immediate``: a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _run(self, binary: str, *args: str) -> None:
        command = [str(self.bindir / binary), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as err:
            raise subprocess.CalledProcessError(
                err.returncode, err.cmd, err.output, f"{err.stderr}\n{self.server_log()[-2000:]}"
            ) from err


async def _prepare_templates(cluster: PgCluster) -> None:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(_SUPABASE_ROLES)
        await conn.execute(f"create database {BASE_DB}")
    finally:
        await conn.close()
    base = await asyncpg.connect(cluster.dsn(BASE_DB))
    try:
        await base.execute(_SUPABASE_SCHEMA)
    finally:
        await base.close()
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"create database {TEMPLATE_DB} template {BASE_DB}")
    finally:
        await conn.close()
    await migrate(cluster.dsn(TEMPLATE_DB))
    conn = await asyncpg.connect(cluster.dsn())
    try:
        # Roles belong to the cluster: one member of invsync_bridge serves every database.
        await conn.execute(f"create role {BRIDGE_LOGIN} login in role invsync_bridge")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running PostgreSQL cluster with Supabase's roles and the two template databases."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (make system-deps)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root needs a 'postgres' user to run the server as")
    cluster = PgCluster.create(bindir)
    atexit.register(cluster.destroy)  # also when the session dies before its teardown
    try:
        cluster.start()
        asyncio.run(_prepare_templates(cluster))
        yield cluster
    finally:
        cluster.destroy()
        atexit.unregister(cluster.destroy)


@dataclass(frozen=True, slots=True)
class CloudDatabase:
    """A fresh database of :func:`pg_cluster` for one test."""

    cluster: PgCluster
    name: str

    @property
    def admin_dsn(self) -> str:
        """The superuser ``postgres`` (what ``invsync cloud migrate`` is given)."""
        return self.cluster.dsn(self.name)

    @property
    def bridge_dsn(self) -> str:
        """A station's direct connection: a login role in the least-privilege group role
        ``invsync_bridge`` (which cannot log in itself)."""
        return self.cluster.dsn(self.name, BRIDGE_LOGIN)

    @property
    def authenticator_dsn(self) -> str:
        """The login PostgREST uses before ``set local role``."""
        return self.cluster.dsn(self.name, "authenticator")


#: The JWT subject of the web user that ``web_request`` acts as.
WEB_USER = "00000000-0000-4000-8000-000000000001"


def web_claims(fleet: str) -> str:
    """JWT claims of a web-app user of ``fleet`` (not a station: no invsync_station)."""
    return json.dumps({"role": "authenticated", "sub": WEB_USER, "app_metadata": {"fleet": fleet}})


async def web_request(
    database: CloudDatabase, fleet: str, sql: str, *args: object
) -> list[asyncpg.Record]:
    """Run ``sql`` the way PostgREST runs a web app's request: one transaction as the
    ``authenticated`` role with the user's JWT claims."""
    conn = await asyncpg.connect(database.authenticator_dsn)
    try:
        async with conn.transaction():
            await conn.execute("set local role authenticated")
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)", web_claims(fleet)
            )
            return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


_db_numbers = itertools.count(1)


async def _clone(cluster: PgCluster, template: str) -> AsyncIterator[CloudDatabase]:
    if not cluster.running:
        await asyncio.to_thread(cluster.start)
    name = f"invsync_test_{os.getpid()}_{next(_db_numbers)}"
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"create database {name} template {template}")
    finally:
        await conn.close()
    if template == TEMPLATE_DB:
        # A copy would share the template's database id; a migrated database has its own.
        conn = await asyncpg.connect(cluster.dsn(name))
        try:
            await conn.execute(
                "update invsync_private.database_instance set id = gen_random_uuid()"
            )
        finally:
            await conn.close()
    yield CloudDatabase(cluster, name)
    if not cluster.running:
        await asyncio.to_thread(cluster.start)
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"drop database if exists {name} with (force)")
    finally:
        await conn.close()


@pytest.fixture
async def cloud_db(pg_cluster: PgCluster) -> AsyncIterator[CloudDatabase]:
    """A fresh, migrated database (a copy of ``invsync_template``)."""
    async for database in _clone(pg_cluster, TEMPLATE_DB):
        yield database


@pytest.fixture
async def empty_cloud_db(pg_cluster: PgCluster) -> AsyncIterator[CloudDatabase]:
    """A fresh Supabase-shaped database without the invsync migrations."""
    async for database in _clone(pg_cluster, BASE_DB):
        yield database


CloneDatabase = Callable[[], Awaitable[CloudDatabase]]


@pytest.fixture
async def cloud_dbs(pg_cluster: PgCluster) -> AsyncIterator[CloneDatabase]:
    """Make as many fresh migrated databases as a test needs: ``db = await cloud_dbs()``."""
    clones: list[AsyncIterator[CloudDatabase]] = []

    async def _make() -> CloudDatabase:
        clone = _clone(pg_cluster, TEMPLATE_DB)
        clones.append(clone)
        return await anext(clone)

    yield _make
    for clone in clones:
        async for _ in clone:
            pass
