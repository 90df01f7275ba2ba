"""The cloud SQL contract, checked in a real PostgreSQL shaped like a Supabase project.

Stations push through ``merge_inventory`` as the least-privilege ``invsync_bridge`` role;
web users act as Supabase's ``authenticated`` role with JWT claims, exactly as PostgREST
sets them (``set local role``, ``request.jwt.claims``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import pytest

from cloud_bridge.migrate import load_migrations, migrate
from tests.pg_cluster import CloudDatabase

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

FLEET = "FLEETAAAAAAAAAAA"
OTHER_FLEET = "FLEETBBBBBBBBBBB"
ITEM = "0190a000-0000-7000-8000-000000000001"
ITEM_2 = "0190a000-0000-7000-8000-000000000002"
ITEM_3 = "0190a000-0000-7000-8000-000000000003"
T = 1_000_000 << 11  # a station HLC, far below any server HLC of today

# What a row holds for the contract (everything but bookkeeping columns).
ROW_COLUMNS = (
    "id, fleet, barcode, barcode_hlc, name, name_hlc, kind, kind_hlc, location, location_hlc,"
    " category, category_hlc, notes, notes_hlc, status, status_hlc, sheet, sheet_hlc,"
    " deleted, deleted_hlc, stock, stock_version"
)


def item(
    ident: str, stock: tuple[int, int] | None = None, **fields: tuple[object, ...]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": ident, "fields": {k: list(v) for k, v in fields.items()}}
    if stock is not None:
        entry["stock"] = list(stock)
    return entry


def movement(ident: str, item_id: str = ITEM, qty: int = 1, hlc: int = T) -> dict[str, Any]:
    return {
        "id": ident,
        "hlc": hlc,
        "station": "STATIONA",
        "operator": "ana",
        "item": item_id,
        "barcode": "B-1",
        "op": "checkout",
        "qty": qty,
        "sheet": None,
    }


def batch(
    *items: dict[str, Any], movements: tuple[dict[str, Any], ...] = (), fleet: str = FLEET
) -> dict[str, Any]:
    return {
        "fleet": fleet,
        "origin": "station:STATIONA",
        "items": list(items),
        "movements": list(movements),
    }


def new_item(ident: str = ITEM, hlc: int = T, **extra: tuple[object, ...]) -> dict[str, Any]:
    fields: dict[str, tuple[object, ...]] = {
        "barcode": (f"B-{ident[-1]}", hlc),
        "name": ("Hammer", hlc),
        "kind": ("bulk", hlc),
        "location": ("A1", hlc),
        "status": ("in", hlc),
        "deleted": (False, hlc),
        **extra,
    }
    return item(ident, stock=(5, hlc), **fields)


async def merge(conn: Conn, payload: dict[str, Any]) -> dict[str, Any]:
    result = await conn.fetchval(
        "select public.merge_inventory($1::jsonb)::text", json.dumps(payload)
    )
    decoded: dict[str, Any] = json.loads(result)
    return decoded


async def pull(
    conn: Conn, cursor: str | None = None, max_rows: int = 100, fleet: str = FLEET
) -> dict[str, Any]:
    result = await conn.fetchval(
        "select public.pull_changes($1, $2, $3)::text", fleet, cursor, max_rows
    )
    decoded: dict[str, Any] = json.loads(result)
    return decoded


async def rows(conn: Conn) -> list[dict[str, Any]]:
    found = await conn.fetch(f"select {ROW_COLUMNS} from public.inventory_items order by id")
    return [dict(row) for row in found]


def claims(fleet: str = FLEET, role: str = "authenticated", *, station: bool = False) -> str:
    metadata: dict[str, Any] = {"fleet": fleet}
    if station:
        metadata["invsync_station"] = True
    return json.dumps(
        {"sub": "7d0b3c3e-1111-4a4a-9f9f-000000000001", "role": role, "app_metadata": metadata}
    )


@asynccontextmanager
async def as_web_user(
    conn: Conn, fleet: str = FLEET, role: str = "authenticated", *, station: bool = False
) -> AsyncIterator[Conn]:
    """One transaction as PostgREST runs a request: its role and JWT claims, local.
    ``station`` makes it a station's user (``app_metadata.invsync_station``)."""
    async with conn.transaction():
        await conn.execute(f"set local role {role}")
        await conn.execute(
            "select set_config('request.jwt.claims', $1, true)",
            claims(fleet, role, station=station),
        )
        yield conn


@pytest.fixture
async def admin(cloud_db: CloudDatabase) -> AsyncIterator[Conn]:
    conn = await asyncpg.connect(cloud_db.admin_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def bridge(cloud_db: CloudDatabase) -> AsyncIterator[Conn]:
    conn = await asyncpg.connect(cloud_db.bridge_dsn, statement_cache_size=0)
    yield conn
    await conn.close()


@pytest.fixture
async def web(cloud_db: CloudDatabase) -> AsyncIterator[Conn]:
    conn = await asyncpg.connect(cloud_db.authenticator_dsn)
    yield conn
    await conn.close()


async def test_fields_only_move_forward(bridge: Conn, admin: Conn) -> None:
    await merge(bridge, batch(new_item()))
    stale = item(ITEM, stock=(2, T - 1), name=("Old name", T - 1), location=("B2", T + 5))
    assert (await merge(bridge, batch(stale)))["items_changed"] == 1
    row = (await rows(admin))[0]
    assert (row["name"], row["name_hlc"]) == ("Hammer", T)
    assert (row["location"], row["location_hlc"]) == ("B2", T + 5)
    assert (row["stock"], row["stock_version"]) == (5, T)

    newer = item(ITEM, stock=(7, 2 * T), name=("Claw hammer", T + 9), sheet=("S-1", T + 9))
    await merge(bridge, batch(newer))
    row = (await rows(admin))[0]
    assert (row["name"], row["sheet"], row["location"], row["stock"]) == (
        "Claw hammer",
        "S-1",
        "B2",
        7,
    )
    # Setting a nullable field back to null is a write like any other.
    await merge(bridge, batch(item(ITEM, sheet=(None, T + 10))))
    assert (await rows(admin))[0]["sheet"] is None


async def test_equal_hlcs_break_ties_by_writer_like_the_crdt(bridge: Conn, admin: Conn) -> None:
    await merge(bridge, batch(item(ITEM, name=("From B", T, "STATIONB"))))
    await merge(bridge, batch(item(ITEM, name=("From A", T, "STATIONA"))))
    assert (await rows(admin))[0]["name"] == "From B"
    await merge(bridge, batch(item(ITEM, name=("From C", T, "STATIONC"))))
    assert (await rows(admin))[0]["name"] == "From C"


async def test_replayed_and_stale_batches_change_nothing(bridge: Conn, admin: Conn) -> None:
    first = batch(new_item(), new_item(ITEM_2), movements=(movement("m-1"),))
    second = batch(
        item(ITEM, stock=(4, 2 * T), name=("Claw hammer", T + 1)),
        movements=(movement("m-2", qty=-1, hlc=T + 1),),
    )
    await merge(bridge, first)
    await merge(bridge, second)
    before = await admin.fetch(
        "select id, xmin::text, updated_at, name, stock from public.inventory_items order by id"
    )

    for replay in (first, second, first):
        assert await merge(bridge, replay) == {"items_changed": 0, "movements_inserted": 0}
    after = await admin.fetch(
        "select id, xmin::text, updated_at, name, stock from public.inventory_items order by id"
    )
    assert [dict(row) for row in after] == [dict(row) for row in before]
    assert await admin.fetchval("select count(*) from public.inventory_movements") == 2
    assert (await pull(bridge))["changes"] == []  # bridge writes are not web edits


async def test_one_id_twice_in_a_batch_merges_both(bridge: Conn, admin: Conn) -> None:
    result = await merge(
        bridge,
        batch(
            new_item(),
            item(ITEM, name=("Renamed", T + 2)),
            item(ITEM, name=("Older rename", T + 1), notes=("fragile", T + 1)),
        ),
    )
    assert result["items_changed"] == 3
    row = (await rows(admin))[0]
    assert (row["name"], row["notes"]) == ("Renamed", "fragile")


async def test_concurrent_merges_from_two_bridges_converge(
    cloud_db: CloudDatabase, admin: Conn
) -> None:
    ids = [f"0190a000-0000-7000-8000-{n:012d}" for n in range(1, 41)]
    first = await asyncpg.connect(cloud_db.bridge_dsn, statement_cache_size=0)
    second = await asyncpg.connect(cloud_db.bridge_dsn, statement_cache_size=0)
    try:
        # Station A knows newer names, station B newer locations and stock; each sends
        # the ids in a different order, which would deadlock without ordered writes.
        for round_ in range(5):
            hlc = T + round_ * 10
            a = batch(
                *(
                    item(
                        i, stock=(n, hlc + 1), name=(f"A{round_}-{n}", hlc + 2), location=("A", hlc)
                    )
                    for n, i in enumerate(ids)
                )
            )
            b = batch(
                *(
                    item(
                        i,
                        stock=(-n, hlc + 3),
                        name=(f"B{round_}-{n}", hlc + 1),
                        location=("B", hlc + 1),
                    )
                    for n, i in reversed(list(enumerate(ids)))
                )
            )
            await asyncio.gather(merge(first, a), merge(second, b))
            await asyncio.gather(merge(first, b), merge(second, a))  # each also sees the other's
    finally:
        await first.close()
        await second.close()
    final = await rows(admin)
    assert len(final) == len(ids)
    for n, row in enumerate(final):
        assert (row["name"], row["location"], row["stock"]) == (f"A4-{n}", "B", -n)


async def test_movements_are_idempotent_by_id(bridge: Conn, admin: Conn) -> None:
    moves = (movement("m-1"), movement("m-2", qty=3))
    assert (await merge(bridge, batch(movements=moves)))["movements_inserted"] == 2
    assert (await merge(bridge, batch(movements=moves)))["movements_inserted"] == 0
    assert (await merge(bridge, batch(movements=(movement("m-2", qty=99),))))[
        "movements_inserted"
    ] == 0
    assert await admin.fetchval("select sum(qty) from public.inventory_movements") == 4


async def test_web_edit_gets_server_hlc_and_is_pulled(bridge: Conn, web: Conn, admin: Conn) -> None:
    await merge(bridge, batch(new_item(), new_item(ITEM_2)))
    start = await pull(bridge)
    assert start["changes"] == []

    async with as_web_user(web):
        updated = await web.execute(
            "update public.inventory_items set name = 'Web name', stock = 9 where id = $1", ITEM
        )
    assert updated == "UPDATE 1"
    row = await admin.fetchrow("select * from public.inventory_items where id = $1", ITEM)
    assert row is not None
    assert row["origin"] == "web"
    assert row["name"] == "Web name" and row["name_hlc"] > T
    assert row["location_hlc"] == T  # unchanged fields keep their clocks
    assert row["stock_version"] == T  # stock stays the stations' counter

    page = await pull(bridge, start["cursor"])
    assert [(c["item"], c["fields"]) for c in page["changes"]] == [
        # stock: the count, its clock, and the stock the cloud showed before it
        (ITEM, {"name": ["Web name", row["name_hlc"]], "stock": [9, row["name_hlc"], 5]})
    ]
    assert (await pull(bridge, page["cursor"]))["changes"] == []

    # The station applies it and pushes back its merged view: an echo changes nothing...
    echo = item(ITEM, name=("Web name", row["name_hlc"], "cloud"))
    assert (await merge(bridge, batch(echo)))["items_changed"] == 0
    # ...and a later station edit wins over the web edit, without being logged as one.
    later = item(ITEM, name=("Station name", row["name_hlc"] + 1, "STATIONA"))
    assert (await merge(bridge, batch(later)))["items_changed"] == 1
    assert (await rows(admin))[0]["name"] == "Station name"
    assert (await pull(bridge, page["cursor"]))["changes"] == []


async def test_web_insert_gets_an_item_id_and_every_field(bridge: Conn, web: Conn) -> None:
    async with as_web_user(web):
        ident = await web.fetchval(
            "insert into public.inventory_items (barcode, name, stock) "
            "values ('NEW-1', 'Drill', 3) returning id::text"
        )
    assert ident[14] == "7"  # a UUIDv7, the only id form a station accepts
    (change,) = (await pull(bridge))["changes"]
    assert change["item"] == ident
    fields = change["fields"]
    assert fields["stock"][2] == 0  # a new row: the count starts from nothing
    assert {name: value[0] for name, value in fields.items()} == {
        "barcode": "NEW-1",
        "name": "Drill",
        "kind": "bulk",
        "location": "",
        "category": "",
        "notes": "",
        "status": "in",
        "sheet": None,
        "deleted": False,
        "stock": 3,
    }
    assert len({value[1] for value in fields.values()}) == 1


async def test_concurrent_web_edits_of_different_fields_both_survive(
    cloud_db: CloudDatabase, bridge: Conn, admin: Conn
) -> None:
    await merge(bridge, batch(new_item()))
    one = await asyncpg.connect(cloud_db.authenticator_dsn)
    two = await asyncpg.connect(cloud_db.authenticator_dsn)
    try:
        async with as_web_user(one):
            await one.execute("update public.inventory_items set name = 'N' where id = $1", ITEM)
            blocked = asyncio.create_task(
                _web_update(two, "update public.inventory_items set notes = 'X'")
            )
            await asyncio.sleep(0.2)
            assert not blocked.done()  # waits for the row lock
        await blocked
    finally:
        await one.close()
        await two.close()
    row = (await rows(admin))[0]
    assert (row["name"], row["notes"]) == ("N", "X")
    assert row["notes_hlc"] > row["name_hlc"] > T
    changes = (await pull(bridge))["changes"]
    assert sorted(tuple(c["fields"]) for c in changes) == [("name",), ("notes",)]


async def _web_update(conn: Conn, statement: str) -> None:
    async with as_web_user(conn):
        await conn.execute(statement)


async def test_a_late_committing_web_edit_is_not_skipped(
    cloud_db: CloudDatabase, bridge: Conn
) -> None:
    await merge(bridge, batch(new_item(), new_item(ITEM_2)))
    cursor = (await pull(bridge))["cursor"]
    slow = await asyncpg.connect(cloud_db.authenticator_dsn)
    fast = await asyncpg.connect(cloud_db.authenticator_dsn)
    seen: list[str] = []
    try:
        async with as_web_user(slow):
            # The slow edit takes its transaction id first, then commits last.
            await slow.execute(
                "update public.inventory_items set name = 'slow' where id = $1", ITEM
            )
            await _web_update(
                fast, f"update public.inventory_items set name = 'fast' where id = '{ITEM_2}'"
            )
            page = await pull(bridge, cursor)
            seen += [c["fields"]["name"][0] for c in page["changes"]]
            cursor = page["cursor"]
        for _ in range(2):
            page = await pull(bridge, cursor)
            seen += [c["fields"]["name"][0] for c in page["changes"]]
            cursor = page["cursor"]
    finally:
        await slow.close()
        await fast.close()
    assert sorted(set(seen)) == ["fast", "slow"]


async def test_pull_pages_through_one_big_transaction(bridge: Conn, admin: Conn) -> None:
    ids = [f"0190a000-0000-7000-8000-{n:012d}" for n in range(1, 11)]
    await merge(bridge, batch(*(new_item(i) for i in ids)))
    await admin.execute("update public.inventory_items set category = 'tools'")
    pages, cursor, got = 0, None, []
    while True:
        page = await pull(bridge, cursor, max_rows=3)
        got += [c["item"] for c in page["changes"]]
        cursor, pages = page["cursor"], pages + 1
        if not page["more"]:
            break
    assert sorted(got) == ids
    assert pages == 4


async def test_web_users_only_reach_their_own_fleet(bridge: Conn, web: Conn) -> None:
    await merge(bridge, batch(new_item(ITEM)))
    await merge(bridge, batch(new_item(ITEM_2), fleet=OTHER_FLEET))
    async with as_web_user(web):
        visible = await web.fetch("select id::text, fleet from public.inventory_items")
        assert [(r["id"], r["fleet"]) for r in visible] == [(ITEM, FLEET)]
        assert await web.execute("update public.inventory_items set name = 'x'") == "UPDATE 1"
        assert (
            await web.execute("update public.inventory_items set name = 'x' where id = $1", ITEM_2)
            == "UPDATE 0"
        )
        assert await web.fetchval("select count(*) from public.inventory_movements") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web):
            await web.execute(
                "insert into public.inventory_items (fleet, barcode, name) values ($1, 'Z', 'z')",
                OTHER_FLEET,
            )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web):
            await web.execute("delete from public.inventory_items")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web):
            await web.fetch("select * from public.inventory_changes")
    # The bridge functions are for station users: a web user of the fleet cannot push
    # (it could otherwise write made-up clocks that no later edit overtakes)...
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web):
            await merge(web, batch(new_item(ITEM_3)))
    # ...and a station user acts only for the fleet in its claims.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web, station=True):
            await merge(web, batch(new_item(ITEM_3), fleet=OTHER_FLEET))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_web_user(web, station=True):
            await pull(web, fleet=OTHER_FLEET)
    async with as_web_user(web, station=True):
        assert (await merge(web, batch(new_item(ITEM_3))))["items_changed"] == 1
        assert (await pull(web))["changes"] != []


# One database for all the statements (a copy per case would cost more than the checks).
ANON_STATEMENTS = (
    "select count(*) from public.inventory_items",
    "select count(*) from public.inventory_movements",
    "select public.merge_inventory('{}'::jsonb)",
    "select public.pull_changes('x', null, 1)",
    "select invsync_private.jwt_fleet()",
)


async def test_anon_gets_nothing(web: Conn) -> None:
    for statement in ANON_STATEMENTS:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_web_user(web, role="anon"):
                await web.fetchval(statement)


BRIDGE_REFUSED = (
    "select count(*) from public.inventory_items",
    "update public.inventory_items set name = 'x'",
    "insert into public.inventory_items (fleet, name) values ('FLEETAAAAAAAAAAA', 'x')",
    "select count(*) from public.inventory_movements",
    "select count(*) from public.inventory_changes",
    "select invsync_private.server_hlc(0)",
    "select count(*) from public.invsync_migrations",
)


async def test_bridge_role_may_only_execute_the_functions(bridge: Conn) -> None:
    for statement in BRIDGE_REFUSED:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await bridge.execute(statement)
    assert (await merge(bridge, batch(new_item())))["items_changed"] == 1


async def test_only_bridge_members_call_without_claims(
    cloud_db: CloudDatabase, admin: Conn
) -> None:
    await admin.execute("create role invsync_outsider login")
    await admin.execute(
        "grant execute on function public.merge_inventory(jsonb) to invsync_outsider"
    )
    await admin.execute("create role invsync_station_a login in role invsync_bridge")
    try:
        outsider = await asyncpg.connect(cloud_db.cluster.dsn(cloud_db.name, "invsync_outsider"))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await merge(outsider, batch(new_item()))
        await outsider.close()
        station = await asyncpg.connect(cloud_db.cluster.dsn(cloud_db.name, "invsync_station_a"))
        assert (await merge(station, batch(new_item())))["items_changed"] == 1
        await station.close()
    finally:
        await admin.execute("drop owned by invsync_outsider")
        await admin.execute("drop role invsync_outsider")
        await admin.execute("drop role invsync_station_a")


BAD_ITEMS = (
    (item(ITEM, kind=("weird", T)), "23514"),
    (item(ITEM, name=("x" * 201, T)), "23514"),
    (item(ITEM, barcode=("has space", T)), "23514"),
    (item(ITEM, name=(None, T)), "23502"),
    (item(ITEM, deleted=("maybe", T)), "22P02"),
    (item("not-a-uuid", name=("x", T)), "22P02"),
    (item(ITEM, name=("x", "soon")), "22P02"),
    (item(ITEM, stock=(2**40, T)), "22003"),
)


async def test_a_bad_value_is_a_data_error_and_changes_nothing(bridge: Conn, admin: Conn) -> None:
    for bad, sqlstate in BAD_ITEMS:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await merge(bridge, batch(new_item(ITEM_2), bad, movements=(movement("m-1"),)))
        assert raised.value.sqlstate == sqlstate, bad
        assert sqlstate[:2] in {"22", "23"}  # what the transports report as CloudDataError
        assert await rows(admin) == []
        assert await admin.fetchval("select count(*) from public.inventory_movements") == 0


async def test_an_item_of_another_fleet_is_refused(bridge: Conn, admin: Conn) -> None:
    await merge(bridge, batch(new_item(), fleet=OTHER_FLEET))
    with pytest.raises(asyncpg.CheckViolationError):
        await merge(bridge, batch(item(ITEM, name=("mine now", 2 * T))))
    assert (await rows(admin))[0]["fleet"] == OTHER_FLEET


async def test_migrate_applies_each_file_once(empty_cloud_db: CloudDatabase) -> None:
    names = [migration.name for migration in load_migrations()]
    assert names == sorted(names) and names[0].startswith("001_")
    assert await migrate(empty_cloud_db.admin_dsn) == names
    assert await migrate(empty_cloud_db.admin_dsn) == []
    conn = await asyncpg.connect(empty_cloud_db.admin_dsn)
    try:
        recorded = await conn.fetch("select name from public.invsync_migrations order by name")
        assert [row["name"] for row in recorded] == names
    finally:
        await conn.close()
