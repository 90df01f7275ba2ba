"""The two cloud transports against a real PostgreSQL: same results, same error classes.

The Postgres transport connects as the ``invsync_bridge`` role. The REST transport talks
to ``tests/rest_standin.py``, whose HTTP front stands in for PostgREST and Supabase Auth
while the SQL runs for real in the same PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cloud_bridge.postgres import PostgresTransport
from cloud_bridge.rest import RestTransport, check_url
from cloud_bridge.transport import (
    CloudConfigError,
    CloudDataError,
    CloudTransport,
    CloudUnavailable,
    open_transport,
)
from daemon.config import CloudConfig
from tests.pg_cluster import CloneDatabase, CloudDatabase, PgCluster
from tests.rest_standin import RestStandIn

FLEET = "FLEETAAAAAAAAAAA"
OTHER_FLEET = "FLEETBBBBBBBBBBB"
EMAIL = "station-a@example.test"
PASSWORD = "correct horse battery staple"
T = 1_000_000 << 11
IDS = [f"0190a000-0000-7000-8000-{n:012d}" for n in range(1, 4)]


def item(ident: str, hlc: int, name: str, stock: int) -> dict[str, Any]:
    return {
        "id": ident,
        "fields": {
            "barcode": [f"B-{ident[-1]}", T],
            "name": [name, hlc, "STATIONA"],
            "kind": ["bulk", T],
        },
        "stock": [stock, hlc],
    }


def batch(*items: dict[str, Any], movements: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "fleet": FLEET,
        "origin": "station:STATIONA",
        "items": list(items),
        "movements": [
            {
                "id": ident,
                "hlc": T,
                "station": "STATIONA",
                "operator": "ana",
                "item": IDS[0],
                "barcode": "B-1",
                "op": "checkout",
                "qty": 1,
                "sheet": None,
            }
            for ident in movements
        ],
    }


class Clock:
    """A clock that only moves when told (tests expire tokens without sleeping)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "station-password"
    path.write_text(PASSWORD + "\n")
    return path


def rest_config(standin: RestStandIn, password_file: Path) -> CloudConfig:
    return standin.station_config(EMAIL, password_file)


async def _web_edit(database: CloudDatabase, ident: str, name: str) -> None:
    """What a person in the web app does: an UPDATE as PostgREST runs it."""
    conn = await asyncpg.connect(database.authenticator_dsn)
    try:
        async with conn.transaction():
            await conn.execute("set local role authenticated")
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)",
                json.dumps({"role": "authenticated", "app_metadata": {"fleet": FLEET}}),
            )
            await conn.execute(
                "update public.inventory_items set name = $2 where id = $1", ident, name
            )
    finally:
        await conn.close()


async def _scenario(transport: CloudTransport, database: CloudDatabase) -> list[object]:
    """One push/pull story; returns what a caller sees, without server clocks and cursors."""
    seen: list[object] = []
    first = batch(item(IDS[0], T, "Hammer", 5), item(IDS[1], T, "Saw", 2), movements=("m-1", "m-2"))
    seen.append(await transport.merge(first))
    seen.append(await transport.merge(first))  # replay
    seen.append(await transport.merge(batch(item(IDS[0], T - 1, "Stale", 1))))
    seen.append(await transport.merge(batch(item(IDS[0], T + 1, "Claw hammer", 4))))
    start = await transport.pull(FLEET, None, 10)
    seen.append((start["changes"], start["more"]))
    await _web_edit(database, IDS[1], "Web saw")
    page = await transport.pull(FLEET, start["cursor"], 10)
    seen.append([(c["item"], {f: v for f, (v, _) in c["fields"].items()}) for c in page["changes"]])
    again = await transport.pull(FLEET, page["cursor"], 10)
    seen.append((again["changes"], again["more"]))
    with pytest.raises(CloudDataError) as bad:
        await transport.merge(batch(item(IDS[2], T, "x" * 500, 1)))
    seen.append(bad.value.code)
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        final = await conn.fetch(
            "select id::text, name, stock, origin from public.inventory_items order by id"
        )
        seen.append([tuple(row) for row in final])
        seen.append(await conn.fetchval("select count(*) from public.inventory_movements"))
    finally:
        await conn.close()
    return seen


@pytest.fixture
async def standin(cloud_db: CloudDatabase) -> AsyncIterator[RestStandIn]:
    async with RestStandIn(cloud_db.authenticator_dsn) as api:
        api.add_user(EMAIL, PASSWORD, FLEET)
        yield api


async def test_both_transports_give_the_same_results(
    cloud_dbs: CloneDatabase, password_file: Path
) -> None:
    direct_db, rest_db = await cloud_dbs(), await cloud_dbs()
    direct = open_transport(CloudConfig(url=direct_db.bridge_dsn))
    async with RestStandIn(rest_db.authenticator_dsn) as api:
        api.add_user(EMAIL, PASSWORD, FLEET)
        rest = open_transport(rest_config(api, password_file))
        assert (direct.name, rest.name) == ("postgres", "rest")
        try:
            through_postgres = await _scenario(direct, direct_db)
            through_rest = await _scenario(rest, rest_db)
        finally:
            await direct.close()
            await rest.close()
    assert through_rest == through_postgres
    assert through_postgres[:4] == [
        {"items_changed": 2, "movements_inserted": 2},
        {"items_changed": 0, "movements_inserted": 0},
        {"items_changed": 0, "movements_inserted": 0},
        {"items_changed": 1, "movements_inserted": 0},
    ]
    assert through_postgres[5] == [(IDS[1], {"name": "Web saw"})]
    assert through_postgres[7] == "23514"


@pytest.mark.parametrize("kind", ["postgres", "rest"])
async def test_a_stopped_server_is_unavailable_until_it_is_back(
    pg_cluster: PgCluster,
    cloud_db: CloudDatabase,
    standin: RestStandIn,
    password_file: Path,
    kind: str,
) -> None:
    transport: CloudTransport = (
        PostgresTransport(cloud_db.bridge_dsn, connect_timeout=2)
        if kind == "postgres"
        else RestTransport.from_config(rest_config(standin, password_file))
    )
    try:
        assert (await transport.merge(batch(item(IDS[0], T, "Hammer", 1))))["items_changed"] == 1
        await asyncio.to_thread(pg_cluster.stop)
        try:
            for _ in range(2):  # the broken connection, then the refused reconnect
                with pytest.raises(CloudUnavailable):
                    await transport.merge(batch(item(IDS[0], T + 1, "Claw hammer", 1)))
        finally:
            await asyncio.to_thread(pg_cluster.start)
        # Reconnects by itself on the next call.
        result = await transport.merge(batch(item(IDS[0], T + 1, "Claw hammer", 1)))
        assert result["items_changed"] == 1
    finally:
        await transport.close()


async def test_an_unreachable_rest_front_is_unavailable(
    cloud_db: CloudDatabase, password_file: Path
) -> None:
    async with RestStandIn(cloud_db.authenticator_dsn) as api:
        api.add_user(EMAIL, PASSWORD, FLEET)
        transport = RestTransport.from_config(rest_config(api, password_file))
        gone = api.url
    try:
        # Unavailable because nothing answers there, not for a sign-in or file problem.
        with pytest.raises(CloudUnavailable, match=re.escape(gone)):
            await transport.pull(FLEET, None, 10)
    finally:
        await transport.close()


@pytest.mark.parametrize("kind", ["postgres", "rest"])
async def test_a_bad_row_is_a_data_error_and_the_rest_still_lands(
    cloud_db: CloudDatabase, standin: RestStandIn, password_file: Path, kind: str
) -> None:
    transport = open_transport(
        CloudConfig(url=cloud_db.bridge_dsn)
        if kind == "postgres"
        else rest_config(standin, password_file)
    )
    poison = item(IDS[1], T, "Saw", 1)
    poison["fields"]["kind"] = ["weird", T]
    try:
        with pytest.raises(CloudDataError) as raised:
            await transport.merge(batch(item(IDS[0], T, "Hammer", 1), poison))
        assert raised.value.code == "23514"
        # A malformed request is no row's fault: nothing to bisect, so not a data error.
        with pytest.raises(CloudUnavailable) as unavailable:
            await transport.merge({**batch(item(IDS[0], T, "Hammer", 1)), "fleet": ""})
        assert "needs a fleet" in str(unavailable.value)
        # A cursor this database never gave starts the pull over.
        assert (await transport.pull(FLEET, "not a cursor", 10))["reset"] is True
        # What the push loop does next: the halves without the bad row go through.
        assert (await transport.merge(batch(item(IDS[0], T, "Hammer", 1))))["items_changed"] == 1
    finally:
        await transport.close()


async def test_the_token_is_refreshed_before_it_expires(
    cloud_db: CloudDatabase, password_file: Path
) -> None:
    server_clock, client_clock = Clock(1_800_000_000.0), Clock(1000.0)
    async with RestStandIn(
        cloud_db.authenticator_dsn, token_lifetime=60, clock=server_clock
    ) as api:
        api.add_user(EMAIL, PASSWORD, FLEET)
        transport = RestTransport(
            api.url,
            anon_key=api.anon_key,
            email=EMAIL,
            password_file=password_file,
            clock=client_clock,
        )
        try:
            await transport.pull(FLEET, None, 10)
            await transport.pull(FLEET, None, 10)
            assert dict(api.grants) == {"password": 1}

            def advance(seconds: float) -> None:
                server_clock.now += seconds
                client_clock.now += seconds

            advance(50)  # 10 s left of 60: refresh now, before the server would refuse
            await transport.pull(FLEET, None, 10)
            assert dict(api.grants) == {"password": 1, "refresh_token": 1}
            advance(600)  # long asleep: the refresh token still works
            await transport.pull(FLEET, None, 10)
            assert dict(api.grants) == {"password": 1, "refresh_token": 2}
            assert api.rejected_tokens == 0
        finally:
            await transport.close()


async def test_a_token_refused_early_is_renewed_once(
    cloud_db: CloudDatabase, password_file: Path
) -> None:
    server_clock = Clock(1_800_000_000.0)
    async with RestStandIn(
        cloud_db.authenticator_dsn, token_lifetime=60, clock=server_clock
    ) as api:
        api.add_user(EMAIL, PASSWORD, FLEET)
        transport = RestTransport.from_config(rest_config(api, password_file))
        try:
            await transport.pull(FLEET, None, 10)
            server_clock.now += 120  # the server thinks the token is stale; we do not
            await transport.pull(FLEET, None, 10)
            assert api.rejected_tokens == 1
            assert dict(api.grants) == {"password": 1, "refresh_token": 1}

            # A refresh token the server no longer knows: sign in with the password again.
            api._refresh_tokens.clear()
            server_clock.now += 120
            await transport.pull(FLEET, None, 10)
            assert dict(api.grants) == {"password": 2, "refresh_token": 1}
        finally:
            await transport.close()


async def test_a_refused_sign_in_is_unavailable_not_a_data_error(
    standin: RestStandIn, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    transport = RestTransport.from_config(rest_config(standin, wrong))
    try:
        with pytest.raises(CloudUnavailable, match="refused the sign-in"):
            await transport.merge(batch(item(IDS[0], T, "Hammer", 1)))
    finally:
        await transport.close()
    missing = RestTransport.from_config(rest_config(standin, tmp_path / "absent"))
    try:
        with pytest.raises(CloudUnavailable, match="station_password_file"):
            await missing.pull(FLEET, None, 10)
    finally:
        await missing.close()


async def test_a_station_user_acts_only_for_its_fleet(
    standin: RestStandIn, password_file: Path
) -> None:
    transport = RestTransport.from_config(rest_config(standin, password_file))
    try:
        # A permission problem must not be bisected as if a row were bad.
        with pytest.raises(CloudUnavailable, match="403"):
            await transport.pull(OTHER_FLEET, None, 10)
        other = batch(item(IDS[0], T, "Hammer", 1))
        other["fleet"] = OTHER_FLEET
        with pytest.raises(CloudUnavailable, match="403"):
            await transport.merge(other)
    finally:
        await transport.close()


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        (CloudConfig(), "url"),
        (CloudConfig(url="ftp://example.test"), "url"),
        (CloudConfig(url="http://example.test", anon_key="k", station_email="e"), "url"),
        (CloudConfig(url="https://x.supabase.co"), "anon_key"),
        (CloudConfig(url="https://x.supabase.co", anon_key="k"), "station_email"),
        (
            CloudConfig(url="https://x.supabase.co", anon_key="k", station_email="e"),
            "station_password_file",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_up_front(config: CloudConfig, setting: str) -> None:
    with pytest.raises(CloudConfigError) as raised:
        open_transport(config)
    assert raised.value.setting == setting


def test_plain_http_only_to_loopback() -> None:
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("https://abc.supabase.co") == "https://abc.supabase.co"
    with pytest.raises(CloudConfigError):
        check_url("http://10.0.0.5:8000")
