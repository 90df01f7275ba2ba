"""The cloud SQL contract, checked in a real PostgreSQL shaped like a Supabase project.

Stations push through ``merge_inventory`` as the least-privilege ``invsync_bridge`` role;
web users act as Supabase's ``authenticated`` role with JWT claims, exactly as PostgREST
sets them (``set local role``, ``request.jwt.claims``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import pytest

from cloud_bridge.migrate import load_migrations, migrate
from cloud_bridge.postgres import is_data_error
from tests.pg_cluster import CloneDatabase, CloudDatabase

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
    ident: str, stock: tuple[int, ...] | None = None, **fields: tuple[object, ...]
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
        # Refused on the object itself, not on becoming anon (that would refuse all).
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for"):
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
    # A UUIDv4: stations take only UUIDv7 item ids.
    (item("0190a000-0000-4000-8000-000000000001", name=("x", T)), "23514"),
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


async def web_changes(bridge: Conn, cursor: str | None = None) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = (await pull(bridge, cursor))["changes"]
    return changes


async def test_a_web_upsert_logs_only_what_it_really_changed(
    bridge: Conn, web: Conn, admin: Conn
) -> None:
    await merge(bridge, batch(new_item()))
    before = (await rows(admin))[0]
    # What supabase-js's upsert() sends: the whole object, most of it unchanged.
    async with as_web_user(web):
        await web.execute(
            "insert into public.inventory_items as t (id, barcode, name, location, stock)"
            " values ($1, 'B-1', 'Hammer', 'B7', 5)"
            " on conflict (id) do update set barcode = excluded.barcode,"
            " name = excluded.name, location = excluded.location, stock = excluded.stock",
            ITEM,
        )
    (change,) = await web_changes(bridge)
    row = (await rows(admin))[0]
    assert change["fields"] == {"location": ["B7", row["location_hlc"]]}
    assert row["location_hlc"] > T
    assert {k: v for k, v in row.items() if not k.startswith("location")} == {
        k: v for k, v in before.items() if not k.startswith("location")
    }
    cursor = (await pull(bridge))["cursor"]

    # Only some columns (a partial object): the rest of the proposed row is never written.
    async with as_web_user(web):
        await web.execute(
            "insert into public.inventory_items (id, notes) values ($1, 'fragile')"
            " on conflict (id) do update set notes = excluded.notes",
            ITEM,
        )
    (change,) = await web_changes(bridge, cursor)
    assert list(change["fields"]) == ["notes"]
    cursor = (await pull(bridge, cursor))["cursor"]

    # ON CONFLICT DO NOTHING on an existing row: nothing happened, nothing is logged.
    async with as_web_user(web):
        done = await web.execute(
            "insert into public.inventory_items (id, barcode, name, stock)"
            " values ($1, 'OTHER', 'Other', 99) on conflict (id) do nothing",
            ITEM,
        )
    assert done == "INSERT 0 0"
    assert await web_changes(bridge, cursor) == []
    assert (await rows(admin))[0]["stock"] == 5

    # An upsert of a new id is a real insert: every field is logged.
    async with as_web_user(web):
        await web.execute(
            "insert into public.inventory_items (id, barcode, name, stock)"
            " values ($1, 'NEW-2', 'Saw', 2) on conflict (id) do nothing",
            ITEM_2,
        )
    (change,) = await web_changes(bridge, cursor)
    assert change["item"] == ITEM_2
    assert change["fields"]["stock"][::2] == [2, 0]
    assert len(change["fields"]) == 10


async def test_every_web_edit_of_a_row_gets_a_newer_hlc(
    bridge: Conn, web: Conn, admin: Conn
) -> None:
    # The station's clock is an hour ahead: the server clock alone is behind the row.
    ahead = (int(time.time() * 1000) + 3_600_000) << 11
    await merge(bridge, batch(new_item(hlc=ahead)))
    async with as_web_user(web):  # one transaction: the same millisecond, or nearly
        await web.execute("update public.inventory_items set stock = 7 where id = $1", ITEM)
        await web.execute("update public.inventory_items set stock = 8 where id = $1", ITEM)
        await web.execute("update public.inventory_items set notes = 'x' where id = $1", ITEM)
        await web.execute("update public.inventory_items set stock = 6 where id = $1", ITEM)
    changes = await web_changes(bridge)
    clocks = [next(iter(c["fields"].values()))[1] for c in changes]
    assert [c["fields"].get("stock", [None, 0, None])[::2] for c in changes] == [
        [7, 5],
        [8, 7],
        [None, None],
        [6, 8],
    ]
    assert ahead < clocks[0] < clocks[1] < clocks[2] < clocks[3]
    row = await admin.fetchrow(
        "select stock_web_hlc, stock_version from public.inventory_items where id = $1", ITEM
    )
    assert row is not None
    assert (row["stock_web_hlc"], row["stock_version"]) == (clocks[3], ahead)


async def test_stock_moves_to_a_newer_kind_whatever_its_version(bridge: Conn, admin: Conn) -> None:
    async def stock() -> tuple[int, int]:
        row = (await rows(admin))[0]
        return row["stock"], row["stock_version"]

    # A bulk item counted at two stations: version = the sum of the two counter HLCs.
    bulk = (T + 1) + (T + 2)
    await merge(bridge, batch(item(ITEM, stock=(12, bulk, T), kind=("bulk", T))))
    # It becomes a serialized unit: its version is now the status HLC, far below the sum.
    serial = item(ITEM, stock=(1, T + 5, T + 10), kind=("serial", T + 10), status=("in", T + 5))
    assert (await merge(bridge, batch(serial)))["items_changed"] == 1
    assert await stock() == (1, T + 5)
    # A station that has not seen the kind change (or sends no kind HLC) cannot undo it...
    for stale in (item(ITEM, stock=(20, 3 * T, T)), item(ITEM, stock=(30, 4 * T))):
        assert (await merge(bridge, batch(stale)))["items_changed"] == 0
        assert await stock() == (1, T + 5)
    # ...while versions of the same kind still order as before.
    assert (await merge(bridge, batch(item(ITEM, stock=(0, T + 4, T + 10)))))["items_changed"] == 0
    await merge(bridge, batch(item(ITEM, stock=(0, T + 6, T + 10))))
    assert await stock() == (0, T + 6)


# (SET clause of a web edit, what the error says). Each is a value a station refuses
# (crdt_store.model.check_field; a count's stock bounds).
REFUSED_WEB_EDITS = (
    ("name = ''", "name must not be empty"),
    ("name = '   '", "name must not be empty"),
    ("name = ' Hammer'", "name must not start or end with spaces"),
    ("name = 'Hammer' || chr(160)", "name must not start or end with spaces"),
    ("name = 'Ham' || chr(7) || 'mer'", "name must not contain control characters"),
    ("name = 'Ham' || chr(10) || 'mer'", "name must not contain control characters"),
    ("name = repeat('x', 201)", "name must be at most 200 characters"),
    ("location = 'A1 '", "location must not start or end with spaces"),
    ("location = repeat('x', 101)", "location must be at most 100 characters"),
    ("category = 'a' || chr(9) || 'b'", "category must not contain control characters"),
    ("category = repeat('x', 101)", "category must be at most 100 characters"),
    ("notes = chr(10) || 'x'", "notes must not start or end with spaces"),
    ("notes = 'a' || chr(13) || 'b'", "notes must not contain control characters"),
    ("notes = 'a' || chr(155) || 'b'", "notes must not contain control characters"),
    ("notes = repeat('x', 2001)", "notes must be at most 2000 characters"),
    ("barcode = ''", "barcode must be 1-64 printable ASCII characters, no spaces"),
    ("barcode = 'has space'", "barcode: 1-64 printable ASCII characters, no spaces"),
    ("barcode = repeat('b', 65)", "barcode: 1-64 printable ASCII characters, no spaces"),
    ("kind = 'weird'", "kind must be bulk or serial"),
    ("status = 'gone'", "status must be in, out, repair or lost"),
    ("stock = -1", "stock must be a count between 0 and 1000000000"),
    ("stock = 1000000001", "stock must be within +-1000000000"),
    ("sheet = ''", "sheet must be null or 1-64 characters"),
    ("sheet = ' S-1'", "sheet must not start or end with spaces"),
    ("sheet = repeat('s', 65)", "sheet must be null or 1-64 characters"),
)

ACCEPTED_WEB_EDITS = (
    "name = 'Claw hammer, 16 oz'",
    "name = 'Hämmerchen'",
    "notes = 'line 1' || chr(10) || chr(9) || 'line 2'",
    "sheet = 'S-1'",
    "sheet = null",
    "stock = 0",
    "stock = 1000000000",
    "barcode = 'B-9'",
    "kind = 'serial'",
    "status = 'repair'",
    "location = ''",
)


async def test_web_values_the_stations_would_refuse_are_refused(
    bridge: Conn, web: Conn, admin: Conn
) -> None:
    await merge(bridge, batch(new_item()))
    before = await rows(admin)
    for assignment, message in REFUSED_WEB_EDITS:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            async with as_web_user(web):
                await web.execute(f"update public.inventory_items set {assignment}")
        assert message in str(refused.value), assignment
    assert await rows(admin) == before
    assert await web_changes(bridge) == []

    for assignment in ACCEPTED_WEB_EDITS:
        async with as_web_user(web):
            assert await web.execute(f"update public.inventory_items set {assignment}") == (
                "UPDATE 1"
            )
    assert len(await web_changes(bridge)) == len(ACCEPTED_WEB_EDITS)

    # A new row is checked whole: no name, no barcode, a UUIDv4.
    for columns, values, message in (
        ("barcode", "'NEW-1'", "name must not be empty"),
        ("name", "'Drill'", "barcode must be 1-64 printable ASCII characters"),
        (
            "id, barcode, name",
            "'0190a000-0000-4000-8000-000000000009', 'NEW-1', 'Drill'",
            "id must be a UUIDv7",
        ),
    ):
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            async with as_web_user(web):
                await web.execute(
                    f"insert into public.inventory_items ({columns}) values ({values})"
                )
        assert message in str(refused.value), columns
    assert await admin.fetchval("select count(*) from public.inventory_items") == 1


async def test_a_web_user_cannot_pass_for_the_bridge(bridge: Conn, web: Conn, admin: Conn) -> None:
    await merge(bridge, batch(new_item()))
    async with as_web_user(web):
        await web.execute("select set_config('invsync.bridge', 'on', true)")
        await web.execute(
            "update public.inventory_items set name = 'Mine', name_hlc = 9e15 where id = $1",
            ITEM,
        )
        await web.execute(
            "insert into public.inventory_items (id, barcode, name, name_hlc)"
            " values ($1, 'NEW-2', 'Saw', 9e15)",
            ITEM_2,
        )
    stamped = {
        row["id"]: row
        for row in await admin.fetch(
            "select id::text, name_hlc, name_writer, origin from public.inventory_items"
        )
    }
    for ident in (ITEM, ITEM_2):
        assert T < stamped[ident]["name_hlc"] < 9e15
        assert (stamped[ident]["name_writer"], stamped[ident]["origin"]) == ("cloud", "web")
    assert sorted(c["item"] for c in await web_changes(bridge)) == [ITEM, ITEM_2]
    # ...and the bridge's own writes are still not taken for web edits.
    assert (await merge(bridge, batch(item(ITEM, notes=("n", 2 * T)))))["items_changed"] == 1
    assert len(await web_changes(bridge)) == 2


async def test_a_malformed_request_is_not_a_data_error(bridge: Conn) -> None:
    # No row is at fault, so the bridge must not bisect and park every row of the batch.
    requests = (
        merge(bridge, {"items": [new_item()]}),
        merge(bridge, {"fleet": "", "items": []}),
        merge(bridge, {"fleet": FLEET, "items": {"id": ITEM}}),
        merge(bridge, {"fleet": FLEET, "movements": "m-1"}),
        pull(bridge, fleet=""),
    )
    for request in requests:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await request
        assert raised.value.sqlstate == "P0001"
        assert not is_data_error(raised.value.sqlstate)
        assert "invsync: " in str(raised.value)


async def test_pull_starts_over_for_a_cursor_this_database_never_gave(
    cloud_dbs: CloneDatabase,
) -> None:
    first, second = await cloud_dbs(), await cloud_dbs()
    one = await asyncpg.connect(first.bridge_dsn, statement_cache_size=0)
    two = await asyncpg.connect(second.bridge_dsn, statement_cache_size=0)
    web = await asyncpg.connect(first.authenticator_dsn)
    try:
        database = str(await one.fetchval("select public.invsync_database_id()"))
        assert database != str(await two.fetchval("select public.invsync_database_id()"))
        await merge(one, batch(new_item()))
        start = await pull(one)
        assert (start["database"], start["reset"]) == (database, False)
        await _web_update(web, "update public.inventory_items set name = 'Web'")
        page = await pull(one, start["cursor"])
        assert (len(page["changes"]), page["reset"]) == (1, False)
        assert (await pull(one, page["cursor"]))["changes"] == []

        txid, change, _ = page["cursor"].split(":")
        for cursor in (
            f"{2**40}:0:{database}",  # a restored backup: behind the cursor's transaction
            f"{txid}:{change}:{uuid.uuid4()}",  # another database at the same URL
            f"{2**70}:0:{database}",
            "not a cursor",
        ):
            again = await pull(one, cursor)
            assert again["reset"], cursor
            assert [c["fields"]["name"][0] for c in again["changes"]] == ["Web"], cursor
        # A cursor of the first database means nothing to the second.
        other = await pull(two, page["cursor"])
        assert (other["reset"], other["database"]) != (False, database)
        assert other["reset"]
    finally:
        for conn in (one, two, web):
            await conn.close()


async def test_only_the_owner_sees_the_migrations_and_bridge_logins_are_members(
    cloud_db: CloudDatabase, admin: Conn
) -> None:
    for role in ("anon", "authenticated", "service_role", "invsync_bridge"):
        for privilege in ("select", "insert", "update", "delete", "truncate"):
            assert not await admin.fetchval(
                "select has_table_privilege($1, 'public.invsync_migrations', $2)",
                role,
                privilege,
            ), (role, privilege)
    # invsync_bridge is a group: stations log in as its members, never as it.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(cloud_db.cluster.dsn(cloud_db.name, "invsync_bridge"))


STATION_A = "7d0b3c3e-1111-4a4a-9f9f-0000000000aa"


async def station_pull(conn: Conn, user: str, cursor: str | None = None) -> dict[str, Any]:
    """``pull_changes`` as the Supabase station user ``user`` (one bridge of the fleet)."""
    async with conn.transaction():
        await conn.execute("set local role authenticated")
        station_claims = {
            "sub": user,
            "role": "authenticated",
            "app_metadata": {"fleet": FLEET, "invsync_station": True},
        }
        await conn.execute(
            "select set_config('request.jwt.claims', $1, true)", json.dumps(station_claims)
        )
        return await pull(conn, cursor)


async def logged_changes(admin: Conn) -> list[str]:
    """Names the web edits still in the change log set, oldest first."""
    found = await admin.fetch(
        "select fields -> 'name' ->> 0 as name from public.inventory_changes order by change_id"
    )
    return [row["name"] for row in found]


async def age(admin: Conn, table: str, column: str, days: int, where: str = "true") -> None:
    await admin.execute(
        f"update {table} set {column} = now() - interval '{days} days' where {where}"
    )


async def test_web_edits_every_bridge_has_pulled_are_deleted_after_the_retention(
    bridge: Conn, web: Conn, admin: Conn
) -> None:
    """Two bridges (a Supabase station user and a direct login role): an edit leaves the
    change log only when it is older than the retention and both have pulled it."""
    await merge(bridge, batch(new_item()))
    for name in ("W1", "W2", "W3"):
        await _web_update(web, f"update public.inventory_items set name = '{name}'")
    station = await station_pull(web, STATION_A)
    direct = await pull(bridge)
    assert len(station["changes"]) == len(direct["changes"]) == 3
    await age(admin, "public.inventory_changes", "recorded_at", 31)

    # The station user has all three; the direct bridge has not said so yet.
    station = await station_pull(web, STATION_A, station["cursor"])
    assert await logged_changes(admin) == ["W1", "W2", "W3"]
    direct = await pull(bridge, direct["cursor"])
    assert direct["changes"] == [] and await logged_changes(admin) == []

    # A recent edit stays after both have pulled it; pulling goes on as before.
    await _web_update(web, "update public.inventory_items set name = 'W4'")
    station = await station_pull(web, STATION_A, station["cursor"])
    direct = await pull(bridge, direct["cursor"])
    assert [c["fields"]["name"][0] for c in direct["changes"]] == ["W4"]
    await station_pull(web, STATION_A, station["cursor"])
    await pull(bridge, direct["cursor"])
    assert await logged_changes(admin) == ["W4"]


async def test_a_bridge_that_stopped_pulling_holds_edits_back_only_for_the_retention(
    bridge: Conn, web: Conn, admin: Conn
) -> None:
    await merge(bridge, batch(new_item()))
    stopped = await pull(bridge)  # the direct bridge pulls once, then goes quiet
    await _web_update(web, "update public.inventory_items set name = 'W1'")
    station = await station_pull(web, STATION_A)
    await age(admin, "public.inventory_changes", "recorded_at", 31)
    station = await station_pull(web, STATION_A, station["cursor"])
    assert await logged_changes(admin) == ["W1"]

    # Quiet for longer than the retention: it no longer holds the edit back.
    await age(admin, "invsync_private.bridge_pulls", "pulled_at", 31, "caller like 'role:%'")
    station = await station_pull(web, STATION_A, station["cursor"])
    assert await logged_changes(admin) == []
    # Back again, it pulls what is left and carries on (W1 reaches it by peer sync).
    direct = await pull(bridge, stopped["cursor"])
    assert direct["changes"] == []

    # Both bridges have W2, 31 days old: a retention of 60 days, set by the owner, keeps
    # it; the default 30 days does not.
    await _web_update(web, "update public.inventory_items set name = 'W2'")
    station = await station_pull(web, STATION_A, station["cursor"])
    direct = await pull(bridge, direct["cursor"])
    await age(admin, "public.inventory_changes", "recorded_at", 31)
    await admin.execute("update invsync_private.change_retention set keep = '60 days'")
    station = await station_pull(web, STATION_A, station["cursor"])
    await pull(bridge, direct["cursor"])
    assert await logged_changes(admin) == ["W2"]
    await admin.execute("update invsync_private.change_retention set keep = '30 days'")
    await station_pull(web, STATION_A, station["cursor"])
    assert await logged_changes(admin) == []
