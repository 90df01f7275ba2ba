"""Benchmark of the cloud bridge against a local PostgreSQL (``python -m bench cloud``).

A throwaway PostgreSQL cluster (the test fixture's ``PgCluster``, with ``fsync=off``) gets
the SQL contract; a station's store on the real disk is filled with a rental catalog and
pushed by a ``CloudBridge`` over asyncpg as a member of the ``invsync_bridge`` role:

- ``push``: wall time of the first push of N items and their N "add" movements;
- ``one_change``: rows written in the database when 1 item of N changes (a checkout):
  what the bridge sent and what ``merge_inventory`` reported changing;
- ``pull_latency``: a web edit (UPDATE as the ``authenticated`` role) until the station's
  store shows it, with the bridge's loop running (``push_interval`` 1 s), and for an
  explicit ``pull_now``.

Reports figures and targets; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.store import SCRATCH_DIR
from cloud_bridge.bridge import CloudBridge
from cloud_bridge.migrate import migrate
from crdt_store import NewItem, Store
from daemon.config import CloudConfig
from tests.pg_cluster import PgCluster, find_bindir

Json = dict[str, Any]
FLEET = "BENCHCLOUDFLEET2"
DATABASE = "invsync_bench"


def _log(message: str) -> None:
    print(f"[bench cloud] {message}", file=sys.stderr, flush=True)


def _target(name: str, measured: float, limit: float) -> Json:
    return {"name": name, "target": limit, "measured": measured, "met": measured <= limit}


def _catalog(count: int) -> list[NewItem]:
    return [
        NewItem(
            barcode=f"CBL-{i:07d}",
            name=f"XLR cable {i % 50 + 1} m",
            qty=50 + i % 450,
            location=f"Aisle {i % 12 + 1} / Shelf {chr(65 + i % 6)}",
            category="Cables",
            notes="",
        )
        for i in range(count)
    ]


async def _web_update(dsn: str, item_id: str, notes: str) -> None:
    claims = json.dumps({"role": "authenticated", "app_metadata": {"fleet": FLEET}})
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("set local role authenticated")
            await conn.execute("select set_config('request.jwt.claims', $1, true)", claims)
            await conn.execute(
                "update inventory_items set notes = $1 where id = $2", notes, item_id
            )
    finally:
        await conn.close()


async def _pull_latency(
    store: Store, dsn: str, item_id: str, samples: int, bridge: CloudBridge | None
) -> list[float]:
    """Seconds from a committed web edit until the store shows it."""
    latencies: list[float] = []
    for n in range(samples):
        notes = f"web note {n} {time.time()}"
        started = time.perf_counter()
        await _web_update(dsn, item_id, notes)
        if bridge is not None:
            await bridge.pull_now()
        # Polling the store is the measurement: what a lookup at the station would see.
        while (await store.item(item_id)).notes != notes:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        latencies.append(time.perf_counter() - started)
    return latencies


def _summary(samples: list[float]) -> Json:
    ordered = sorted(samples)
    return {
        "samples": len(samples),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def _measure(cluster: PgCluster, items: int, samples: int, scratch: Path) -> Json:
    admin = cluster.dsn()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"drop database if exists {DATABASE} with (force)")
        await conn.execute(f"create database {DATABASE}")
    finally:
        await conn.close()
    for role in ("anon", "authenticated", "service_role", "authenticator"):
        conn = await asyncpg.connect(admin)
        try:
            if not await conn.fetchval("select 1 from pg_roles where rolname = $1", role):
                await conn.execute(f"create role {role} nologin noinherit")
        finally:
            await conn.close()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute("alter role authenticator login")
        await conn.execute("grant anon, authenticated, service_role to authenticator")
    finally:
        await conn.close()
    await migrate(cluster.dsn(DATABASE))
    conn = await asyncpg.connect(admin)
    try:
        # invsync_bridge is a group role: stations log in as a member of it.
        if not await conn.fetchval("select 1 from pg_roles where rolname = 'bench_station'"):
            await conn.execute("create role bench_station login in role invsync_bridge")
    finally:
        await conn.close()
    bridge_dsn = cluster.dsn(DATABASE, "bench_station")
    web_dsn = cluster.dsn(DATABASE, "authenticator")
    result: Json = {"items": items}
    async with Store.open(scratch / "station.db", station_id="bench-a") as store:
        _log(f"importing {items} items")
        catalog = _catalog(items)
        for start in range(0, items, 1000):
            await store.import_items(catalog[start : start + 1000])
        config = CloudConfig(url=bridge_dsn, push_interval=1.0)
        # Manual runs only (no loop) while the push is measured.
        bridge = CloudBridge(store, config, fleet=FLEET)
        await bridge.start(loop=False)
        try:
            _log("first push")
            started = time.perf_counter()
            report = await bridge.push_now()
            seconds = time.perf_counter() - started
            result["push"] = {
                "seconds": round(seconds, 2),
                "items": report.items,
                "movements": report.movements,
                "rows_per_s": round((report.items + report.movements) / seconds),
                "ok": report.ok,
            }
            result["targets"] = [_target(f"push {items} items (s)", round(seconds, 2), 30.0)]

            views = await store.list_items(limit=1)
            await store.checkout(views[0].id, 1)
            started = time.perf_counter()
            report = await bridge.push_now()
            result["one_change"] = {
                "items_sent": report.items,
                "movements_sent": report.movements,
                "rows_changed_in_db": report.rows_changed,
                "seconds": round(time.perf_counter() - started, 3),
            }
            result["targets"].append(
                _target("rows written when 1 item changes", report.rows_changed, 2)
            )
            _log("pull latency, manual pull")
            manual = await _pull_latency(store, web_dsn, views[0].id, samples, bridge)
        finally:
            await bridge.close()
        _log("pull latency, loop with push_interval 1s")
        async with CloudBridge(store, config, fleet=FLEET):
            await asyncio.sleep(1.5)
            looped = await _pull_latency(store, web_dsn, views[0].id, samples, None)
        result["pull_latency"] = {
            "pull_now": _summary(manual),
            "loop_push_interval_1s": _summary(looped),
        }
    return result


def run(args: argparse.Namespace) -> Json:
    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "PostgreSQL server binaries not installed (make system-deps)"}
    items = 2000 if args.quick else 100_000
    samples = 5 if args.quick else 20
    cluster = PgCluster.create(bindir)
    SCRATCH_DIR.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cloud-", dir=SCRATCH_DIR))
    try:
        cluster.start()
        return asyncio.run(_measure(cluster, items, samples, scratch))
    finally:
        cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
