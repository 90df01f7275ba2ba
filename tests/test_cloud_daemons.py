"""The cloud bridge in real ``invsyncd`` processes, against a real PostgreSQL.

Stations are real daemons on loopback, enrolled in a fleet made for the test and syncing
as peers; the cloud settings come from ``INVSYNC_CLOUD_*`` variables, as under systemd.
The cloud is a throwaway PostgreSQL cluster (``tests/pg_cluster.py``) with the SQL
contract applied; stations connect as the least-privilege ``invsync_bridge`` role. Web
edits are made as the web app makes them (an UPDATE as ``authenticated`` with the user's
JWT claims). What is checked is what people see: ``invsync`` output on each station and
the rows of the cloud table.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.daemon_harness import INVSYNC, Daemon, short_dir
from tests.pg_cluster import CloudDatabase, PgCluster, web_request
from tests.stations import Stations, peer_at, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SETTLE = 60.0
#: Short, so a test sees several rounds (and backoff capped at 10 intervals = 5 s).
PUSH_INTERVAL = "0.5s"


# ---------------------------------------------------------------------- stations


class CloudFleet(Stations):
    """Stations of one fleet under ``base``; some with cloud settings."""

    def started(self, name: str, *extra: str, cloud_url: str | None = None) -> Daemon:
        """The one place a test station is set up: enrolled in the fleet, its cloud
        settings in the environment (as a systemd unit's ``Environment=`` would), started."""
        daemon = self.station(name, *extra)
        env = daemon.env
        for variable in [v for v in env if v.startswith("INVSYNC_CLOUD_")]:
            del env[variable]
        if cloud_url is not None:
            env["INVSYNC_CLOUD_URL"] = cloud_url
            env["INVSYNC_CLOUD_PUSH_INTERVAL"] = PUSH_INTERVAL
        self.start(daemon, env=env)
        return daemon


@pytest.fixture
def fleet() -> Iterator[CloudFleet]:
    with CloudFleet(short_dir("cl")) as stations:
        yield stations


def cli(daemon: Daemon, *args: str, ok: bool = True) -> Any:
    """``invsync --json ARGS`` on a station; the JSON document it printed."""
    done = daemon.cli("--json", *args)
    if ok:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout) if done.stdout.strip() else None


def items(daemon: Daemon) -> dict[str, dict[str, Any]]:
    listed = cli(daemon, "item", "list", "--deleted", "--limit", "100000")["items"]
    return {item["id"]: item for item in listed}


def connect_peer(fleet: CloudFleet, name: str, hub: Daemon, **kwargs: Any) -> Daemon:
    return fleet.started(name, "--peer", peer_at(hub), **kwargs)


# ---------------------------------------------------------------------- the cloud


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _fetch(dsn: str, sql: str, *args: object) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def cloud_items(db: CloudDatabase) -> dict[str, dict[str, Any]]:
    rows = run(_fetch(db.admin_dsn, "select * from inventory_items"))
    return {str(row["id"]): row for row in rows}


def cloud_movement_ids(db: CloudDatabase) -> list[str]:
    return [r["id"] for r in run(_fetch(db.admin_dsn, "select id from inventory_movements"))]


def web_edit(db: CloudDatabase, fleet: str, sql: str, *args: object) -> None:
    """An edit in the web app: SQL as the ``authenticated`` role of a user of ``fleet``."""
    run(web_request(db, fleet, sql, *args))


SHOWN = ("barcode", "name", "kind", "stock", "status", "sheet", "location", "category", "notes")


def cloud_matches(db: CloudDatabase, station: Daemon) -> bool:
    """The cloud table shows every item as the station does, field by field."""
    rows = cloud_items(db)
    seen = items(station)
    if set(rows) != set(seen):
        return False
    return all(
        all(rows[i][key] == item[key] for key in SHOWN) and rows[i]["deleted"] == item["deleted"]
        for i, item in seen.items()
    )


def backlog_empty(station: Daemon) -> bool:
    status = cli(station, "cloud", "status")
    return bool(status["backlog"] == {"items": 0, "movements": 0} and status["failures"] == 0)


# ---------------------------------------------------------------------- tests


def test_stations_push_and_pull_through_the_cloud(
    fleet: CloudFleet, cloud_db: CloudDatabase
) -> None:
    """Two stations with the bridge and one without, syncing as peers: the table follows
    the merged inventory; a web edit reaches a bridge station and then the third one."""
    a = fleet.started("dock-a", cloud_url=cloud_db.bridge_dsn)
    b = connect_peer(fleet, "dock-b", a, cloud_url=cloud_db.bridge_dsn)
    c = connect_peer(fleet, "office-c", a)
    cli(a, "item", "add", "SPK001", "--name", "QSC K10.2 Speaker", "--qty", "8")
    cli(a, "item", "add", "MIC001", "--name", "SM58", "--serial")
    wait_until("B sees the items", SETTLE, lambda: len(items(b)) == 2)
    cli(b, "checkout", "SPK001", "--qty", "3", "--sheet", "JOB-1")
    cli(a, "checkout", "MIC001", "--sheet", "JOB-1")
    cli(b, "item", "edit", "SPK001", "--location", "Aisle 3")
    wait_until("the cloud shows the merged inventory", SETTLE, lambda: cloud_matches(cloud_db, a))
    assert cloud_items(cloud_db) and cloud_matches(cloud_db, b)
    rows = {row["barcode"]: row for row in cloud_items(cloud_db).values()}
    assert (rows["SPK001"]["stock"], rows["SPK001"]["location"]) == (5, "Aisle 3")
    assert (rows["MIC001"]["status"], rows["MIC001"]["sheet"]) == ("out", "JOB-1")
    movements = cloud_movement_ids(cloud_db)
    assert len(movements) == len(set(movements)) == 5  # 2 adds, 2 checkouts, 1 edit

    status = cli(a, "status")["cloud"]
    assert status["configured"] and status["transport"] == "postgres"
    assert cli(c, "cloud", "status") == {"configured": False}

    spk = rows["SPK001"]["id"]
    web_edit(
        cloud_db, fleet.fleet_id, "update inventory_items set notes = 'Web note' where id = $1", spk
    )

    def everywhere() -> bool:
        return all(items(s)[str(spk)]["notes"] == "Web note" for s in (a, b, c))

    wait_until("the web edit on every station", SETTLE, everywhere)
    history = cli(c, "history", "SPK001")["movements"]
    assert [(m["op"], m["operator"]) for m in history][-1] == ("edit", "web")
    wait_until("the cloud settles", SETTLE, lambda: cloud_matches(cloud_db, c))

    human = c.cli("cloud", "push")
    assert human.returncode == 1 and "no cloud bridge" in human.stderr


def test_outage_backlog_drains_and_peers_keep_syncing(
    fleet: CloudFleet, cloud_db: CloudDatabase, pg_cluster: PgCluster
) -> None:
    a = fleet.started("dock-a", cloud_url=cloud_db.bridge_dsn)
    b = connect_peer(fleet, "dock-b", a)
    for i in range(20):
        cli(a, "item", "add", f"CBL{i:03d}", "--name", f"Cable {i}", "--qty", "40")
    wait_until("pushed", SETTLE, lambda: backlog_empty(a) and cloud_matches(cloud_db, a))
    pg_cluster.stop()
    try:
        for i in range(20):
            cli(a if i % 2 else b, "checkout", f"CBL{i:03d}", "--qty", "2")
        cli(b, "item", "add", "NEW001", "--name", "Added during the outage", "--qty", "5")
        # Peer sync carries on: each station sees the other's work.
        wait_until("A and B agree", SETTLE, lambda: items(a) == items(b) and len(items(a)) == 21)
        # A retry may be running at any moment (state "pushing"): wait for the backoff
        # between two, rather than expect to land in one.
        status = wait_until(
            "the bridge backs off after the outage",
            SETTLE,
            lambda: (
                (s := cli(a, "cloud", "status"))["last_error"]
                and s["next_retry"]
                and s["state"] == "backing_off"
                and s
            ),
        )
        assert status["backlog"]["items"] > 0 and status["backlog"]["movements"] > 0
        human = a.cli("cloud", "status")
        assert human.returncode == 0 and "Next retry" in human.stdout
        failed = a.cli("cloud", "push")
        assert failed.returncode == 1 and "Push failed" in failed.stdout
    finally:
        pg_cluster.start()
    wait_until("the backlog drains", SETTLE, lambda: backlog_empty(a))
    assert cloud_matches(cloud_db, a)
    movements = cloud_movement_ids(cloud_db)
    assert len(movements) == len(set(movements)) == 20 + 20 + 1
    assert cli(a, "status")["cloud"]["next_retry"] is None


def test_a_poison_row_is_parked_and_shown_in_cloud_status(
    fleet: CloudFleet, cloud_db: CloudDatabase
) -> None:
    run(
        _fetch(
            cloud_db.admin_dsn,
            "alter table inventory_items add constraint no_poison check (name <> 'POISON')",
        )
    )
    a = fleet.started("dock-a", cloud_url=cloud_db.bridge_dsn)
    for i in range(10):
        cli(a, "item", "add", f"CBL{i:03d}", "--name", f"Cable {i}", "--qty", "4")
    cli(a, "item", "add", "BAD001", "--name", "POISON", "--qty", "1")
    status = wait_until(
        "the row is parked", SETTLE, lambda: (s := cli(a, "cloud", "status"))["parked_count"] and s
    )
    (parked,) = status["parked"]
    assert parked["barcode"] == "BAD001" and "no_poison" in parked["error"]
    wait_until("the others land", SETTLE, lambda: len(cloud_items(cloud_db)) == 10)
    human = a.cli("cloud", "status")
    assert "BAD001" in human.stdout and "Parked      1 rows" in human.stdout
    assert "1 parked" in a.cli("status").stdout
    # A manual push tries it again, fails again, and says so.
    again = a.cli("cloud", "push")
    assert again.returncode == 1 and "parked" in again.stdout
    # Fixed at the station: the item is pushed and leaves the list.
    cli(a, "item", "edit", "BAD001", "--name", "Cable 10")
    wait_until("fixed", SETTLE, lambda: cli(a, "cloud", "status")["parked_count"] == 0)
    wait_until("all in the cloud", SETTLE, lambda: cloud_matches(cloud_db, a))


def test_cloud_push_and_pull_report_what_they_did(
    fleet: CloudFleet, cloud_db: CloudDatabase
) -> None:
    a = fleet.started("dock-a", cloud_url=cloud_db.bridge_dsn)
    cli(a, "item", "add", "SPK001", "--name", "Speaker", "--qty", "8")
    pushed = cli(a, "cloud", "push")
    assert pushed["ok"] and pushed["kind"] == "push"
    spk = next(iter(items(a)))
    web_edit(
        cloud_db, fleet.fleet_id, "update inventory_items set category = 'Audio' where id = $1", spk
    )
    pulled = cli(a, "cloud", "pull")
    assert pulled["ok"] and pulled["kind"] == "pull"
    assert items(a)[spk]["category"] == "Audio"
    assert "Pulled" in a.cli("cloud", "pull").stdout


# ---------------------------------------------------------------------- migrate


def invsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INVSYNC, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_cloud_migrate_applies_the_contract_once(empty_cloud_db: CloudDatabase) -> None:
    first = invsync("--json", "cloud", "migrate", empty_cloud_db.admin_dsn)
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout)["applied"]
    assert applied and applied == sorted(applied)
    again = invsync("cloud", "migrate", empty_cloud_db.admin_dsn)
    assert again.returncode == 0 and "up to date" in again.stdout
    tables = run(
        _fetch(
            empty_cloud_db.admin_dsn,
            "select tablename from pg_tables where schemaname = 'public' order by 1",
        )
    )
    assert {"inventory_items", "inventory_movements", "inventory_changes"} <= {
        t["tablename"] for t in tables
    }


def test_cloud_migrate_errors_are_clear(pg_cluster: PgCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVSYNC_CLOUD_")}
    missing = invsync("cloud", "migrate", env=env)
    assert missing.returncode == 2 and "admin URL" in missing.stderr
    https = invsync("cloud", "migrate", "https://abc.supabase.co", env=env)
    assert https.returncode == 2 and "SQL editor" in https.stderr
    down = invsync("cloud", "migrate", f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/nodb")
    assert down.returncode == 1 and "invsync:" in down.stderr and "Traceback" not in down.stderr
    from_env = invsync(
        "cloud", "migrate", env={**env, "INVSYNC_CLOUD_URL": "postgres://x@127.0.0.1:1/db"}
    )
    assert from_env.returncode == 1 and "127.0.0.1:1" in from_env.stderr
