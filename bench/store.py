"""The store benchmark: what one station's ``crdt_store.Store`` costs at 10k and 100k items.

This module owns the figures behind the store's performance targets (``docs/performance.md``):
import time (``Store.import_items`` in chunks), cold open to "ready for lookups" and the RSS
after it (measured in a fresh process, so neither the import nor the benchmark's own data
inflate it), barcode lookup latency (``Store.find``), durable checkouts per second with one
and with sixteen concurrent callers, bytes of update per checkout (from
``Store.subscribe``, split by document kind), and size on disk before and after
``Store.compact()``. The store files live in a temporary directory under the project on the
real disk (not tmpfs), because ``synchronous=FULL`` commits are only honest on a real disk.

Each phase (import, cold open, the lookup/checkout/compaction workload) runs in a fresh
interpreter, ``python -m bench.store PHASE PATH --config JSON``, so every figure describes a
process that holds only the store; people run ``python -m bench store``, which drives them.
Benchmarks never assert: every target is reported as target, measured and ``met``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crdt_store import LOCAL, CommittedUpdate, NewItem, Store

PROJECT_DIR = Path(__file__).resolve().parent.parent
#: Scratch space on the project's disk; removed after each run unless ``--keep``.
SCRATCH_DIR = PROJECT_DIR / ".bench-tmp"
STATION = "bench-a"
SIZES = (10_000, 100_000)
QUICK_SIZES = (2_000,)
TARGET_ITEMS = 100_000
MIB = 1024 * 1024

Json = dict[str, Any]


def _log(message: str) -> None:
    """Progress goes to stderr so stdout stays one JSON document."""
    print(f"[bench store] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class StoreBenchConfig:
    """What one run of the store benchmark measures, and how much of it."""

    sizes: tuple[int, ...]
    chunk: int
    lookups: int
    ops: int
    callers: tuple[int, ...]
    repeat: int
    shards: int
    seed: int
    keep: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("store benchmark")
    group.add_argument(
        "--items",
        type=int,
        action="append",
        metavar="N",
        help="inventory size (repeatable; default 10000 and 100000, --quick 2000)",
    )
    group.add_argument("--chunk", type=int, default=1000, help="rows per import_items call")
    group.add_argument("--lookups", type=int, help="barcode lookups per round (default 2000)")
    group.add_argument("--ops", type=int, help="checkouts per round (default 3000)")
    group.add_argument("--repeat", type=int, help="rounds of each measurement (default 3)")
    group.add_argument("--shards", type=int, default=64, help="item shards (default 64)")
    group.add_argument("--seed", type=int, default=7, help="random seed for the catalog")
    group.add_argument("--keep", action="store_true", help="keep the store files")


def config_from_args(args: argparse.Namespace) -> StoreBenchConfig:
    quick = bool(args.quick)
    sizes: Sequence[int] = args.items or (QUICK_SIZES if quick else SIZES)
    return StoreBenchConfig(
        sizes=tuple(sizes),
        chunk=args.chunk,
        lookups=args.lookups or (500 if quick else 2000),
        ops=args.ops or (400 if quick else 3000),
        callers=(1, 16),
        repeat=args.repeat or (2 if quick else 3),
        shards=args.shards,
        seed=args.seed,
        keep=bool(args.keep),
    )


# ---------------------------------------------------------------------- a realistic catalog

# (category, barcode prefix, model names, serialized?) — what a rental warehouse holds.
_CATALOG: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    (
        "Audio",
        "AUD",
        ("QSC K10.2 Speaker", "d&b E8 Loudspeaker", "Yamaha CL5 Console", "Shure ULXD4 Receiver"),
        True,
    ),
    ("Audio", "MIC", ("Shure SM58 Microphone", "Sennheiser e935", "DPA 4099 Clip Mic"), False),
    (
        "Lighting",
        "LGT",
        ("Chauvet Rogue R2 Wash", "Martin MAC Aura XB", "ETC Source Four 26deg"),
        True,
    ),
    ("Lighting", "LMP", ("Astera AX1 Pixel Tube", "ETC HPL 575W Lamp", "Gel Frame 6.25in"), False),
    ("Video", "VID", ("Barco UDX-4K32 Projector", "Blackmagic ATEM Mini Pro"), True),
    ("Rigging", "RIG", ("CM Lodestar 1T Hoist", "Prolyte H30V Truss 2m"), True),
    ("Rigging", "HW", ("Doughty Half Coupler", "Steel Safety Bond 60cm", "Shackle 3/8in"), False),
    ("Cable", "CBL", ("XLR 10m Cable", "DMX 5-pin 3m Cable", "Cat6 EtherCON 50m Reel"), False),
    (
        "Power",
        "PWR",
        ("Powercon True1 5m", "16A Schuko Extension 10m", "63A 3-Phase Distro"),
        False,
    ),
    ("Staging", "STG", ("Litedeck 8x4 Platform", "Steeldeck Leg 1m", "Stage Skirt 4m"), False),
)
_NOTES = (
    "",
    "",
    "",
    "Check fuse before each job",
    "Includes rain cover",
    "Case has a broken latch, tape it",
    "Warranty until 2027",
    "Do not rent without the matching power cable",
)


def make_catalog(count: int, seed: int) -> list[NewItem]:
    """``count`` distinct items (unique barcodes) with the values a warehouse would type."""
    rng = random.Random(seed)
    items: list[NewItem] = []
    for number in range(count):
        category, prefix, models, serial = rng.choice(_CATALOG)
        model = rng.choice(models)
        shelf = "ABCDEF"[rng.randrange(6)]
        location = f"Aisle {rng.randint(1, 24)} / Shelf {shelf}" if rng.random() < 0.9 else "Cage 2"
        items.append(
            NewItem(
                barcode=f"{prefix}-{number:07d}",
                name=f"{model} #{number % 97 + 1}" if serial else model,
                kind="serial" if serial else "bulk",
                qty=1 if serial else rng.randint(50, 500),
                location=location,
                category=category,
                notes=rng.choice(_NOTES),
            )
        )
    return items


# ---------------------------------------------------------------------- small helpers


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation, so p99 is a value that happened)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _round(value: float, digits: int = 3) -> float:
    return round(value, digits)


def _proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (VmRSS: now, VmHWM: peak), 0 if unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _filesystem_of(path: Path) -> str:
    """The filesystem type the store files live on (to show it is not tmpfs)."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                mount_point = parts[1]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, parts[2]
    except OSError:
        pass
    return fstype


class LoopLagMonitor:
    """The longest time the event loop was unavailable while the monitor ran.

    A task that asks to wake every millisecond; any lateness beyond that is a stall some
    other code caused (a compaction snapshot, a large ``get_update``...).
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.max_lag = max(self.max_lag, loop.time() - before - self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench: loop lag monitor")

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.max_lag


# ---------------------------------------------------------------------- disk


def _disk_usage(path: Path) -> Json:
    """Checkpoint the WAL into the database, then report the files and what fills them.

    The checkpoint runs on a separate connection while the store is open, which is what a
    periodic checkpoint in the daemon would see.
    """
    with contextlib.closing(sqlite3.connect(path)) as db:
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        tables: dict[str, int] = {}
        try:
            for name, size in db.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 8"
            ):
                tables[str(name)] = int(size)
        except sqlite3.Error:
            tables = {}
        blobs = {
            "updates_rows": db.execute("SELECT count(*) FROM updates").fetchone()[0],
            "updates_bytes": db.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM updates"
            ).fetchone()[0],
            "snapshot_bytes": db.execute(
                "SELECT coalesce(sum(length(state)), 0) FROM snapshots"
            ).fetchone()[0],
        }
    db_bytes = path.stat().st_size
    wal = path.with_name(path.name + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    return {
        "db_bytes": db_bytes,
        "wal_bytes": wal_bytes,
        "total_mib": _round((db_bytes + wal_bytes) / MIB, 1),
        "free_pages_mib": _round(free * page_size / MIB, 1),
        "live_mib": _round((pages - free) * page_size / MIB, 1),
        # 1 if a reader kept the checkpoint from finishing (the WAL then still holds data).
        "checkpoint_busy": busy,
        # The eight largest tables and indexes (SQLite's dbstat).
        "tables_mib": {name: _round(size / MIB, 1) for name, size in tables.items()},
        "log": blobs,
    }


# ---------------------------------------------------------------------- phases
#
# Every phase runs in a fresh interpreter (``python -m bench.store PHASE ...``), so no phase
# measures a heap another phase left behind: the importer's catalog does not lengthen the
# garbage collector's passes during lookups, and RSS is the store's own.


def _spawn(phase: str, path: Path, cfg: StoreBenchConfig, *extra: str) -> Json:
    """Run one phase in a fresh process and return the JSON it prints."""
    command = [sys.executable, "-m", "bench.store", phase, str(path), "--config"]
    command += [json.dumps(asdict(cfg)), *extra]
    done = subprocess.run(
        command, cwd=PROJECT_DIR, capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:] or f"exit {done.returncode}"}
    report: Json = json.loads(done.stdout)
    return report


def _rss() -> Json:
    return {
        "rss_mib": _round(_proc_status_kib("VmRSS") / 1024, 1),
        "peak_rss_mib": _round(_proc_status_kib("VmHWM") / 1024, 1),
    }


async def _import_phase(path: Path, cfg: StoreBenchConfig, count: int) -> Json:
    catalog = make_catalog(count, cfg.seed)
    store = await Store.connect(path, station_id=STATION, shard_count=cfg.shards)
    chunk_times: list[float] = []
    gc.collect()
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        for start in range(0, len(catalog), cfg.chunk):
            before = time.perf_counter()
            await store.import_items(catalog[start : start + cfg.chunk], operator="bench")
            chunk_times.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        before_close = time.perf_counter()
        await store.close()
        close_time = time.perf_counter() - before_close
    tenth = max(1, len(chunk_times) // 10)
    return {
        "items": len(catalog),
        "chunk_rows": cfg.chunk,
        "seconds": _round(elapsed, 2),
        # CPU of this process (all threads): steadier than wall time on a busy machine.
        "cpu_s": _round(cpu, 2),
        "items_per_s": round(len(catalog) / elapsed),
        "chunk_s": {
            "median": _round(_median(chunk_times)),
            "max": _round(max(chunk_times)),
            # The last chunks costing more than the first means a cost that grows with
            # the inventory, so the import as a whole is worse than linear.
            "first_tenth_median": _round(_median(chunk_times[:tenth])),
            "last_tenth_median": _round(_median(chunk_times[-tenth:])),
        },
        "close_s": _round(close_time, 3),
        # Includes the benchmark's own catalog of NewItem values (tens of MiB at 100k).
        "importer_peak_rss_mib": _round(_proc_status_kib("VmHWM") / 1024, 1),
    }


async def _open_phase(path: Path, cfg: StoreBenchConfig, barcode: str) -> Json:
    gc.collect()
    baseline_kib = _proc_status_kib("VmRSS")
    started = time.perf_counter()
    cpu_started = time.process_time()
    store = await Store.connect(path, station_id=STATION, shard_count=cfg.shards)
    connected = time.perf_counter()
    cpu = time.process_time() - cpu_started
    found = await store.find(barcode)
    first_lookup = time.perf_counter()
    rss = _rss()
    stats = store.stats()
    before_close = time.perf_counter()
    await store.close()
    closed = time.perf_counter()
    return {
        "connect_s": _round(connected - started),
        "connect_cpu_s": _round(cpu),
        "first_lookup_ms": _round((first_lookup - connected) * 1000, 3),
        "found": len(found),
        **rss,
        # The interpreter with crdt_store, pycrdt and aiosqlite imported, before opening.
        "baseline_rss_mib": _round(baseline_kib / 1024, 1),
        "close_s": _round(closed - before_close),
        "store": stats,
    }


def _cold_open(path: Path, cfg: StoreBenchConfig, barcode: str) -> Json:
    runs = [_spawn("open", path, cfg, "--barcode", barcode) for _ in range(cfg.repeat)]
    if any("error" in run for run in runs):
        return {"runs": runs}
    return {
        "connect_s": _round(_median([run["connect_s"] for run in runs])),
        "connect_cpu_s": _round(_median([run["connect_cpu_s"] for run in runs])),
        "first_lookup_ms": _round(_median([run["first_lookup_ms"] for run in runs])),
        "rss_mib": _round(_median([run["rss_mib"] for run in runs]), 1),
        "peak_rss_mib": _round(_median([run["peak_rss_mib"] for run in runs]), 1),
        "baseline_rss_mib": _round(_median([run["baseline_rss_mib"] for run in runs]), 1),
        "close_s": _round(_median([run["close_s"] for run in runs])),
        "runs": runs,
    }


async def _lookups(store: Store, barcodes: Sequence[str], cfg: StoreBenchConfig) -> Json:
    rng = random.Random(cfg.seed + 1)
    rounds: list[Json] = []
    missing = 0
    for _ in range(cfg.repeat):
        sample = [rng.choice(barcodes) for _ in range(cfg.lookups)]
        times: list[float] = []
        for barcode in sample:
            before = time.perf_counter_ns()
            found = await store.find(barcode)
            times.append((time.perf_counter_ns() - before) / 1e6)
            missing += not found
        rounds.append(
            {
                "p50_ms": _round(percentile(times, 0.50), 4),
                "p99_ms": _round(percentile(times, 0.99), 4),
                "max_ms": _round(max(times), 3),
            }
        )
    return {
        "lookups_per_round": cfg.lookups,
        "p50_ms": _round(_median([r["p50_ms"] for r in rounds]), 4),
        "p99_ms": _round(_median([r["p99_ms"] for r in rounds]), 4),
        "not_found": missing,
        "rounds": rounds,
    }


async def _checkouts(
    store: Store, item_ids: Sequence[str], callers: int, ops: int, rng: random.Random
) -> Json:
    """``ops`` durable checkouts of one unit, spread over ``callers`` concurrent tasks."""
    per_caller = [ops // callers + (1 if n < ops % callers else 0) for n in range(callers)]
    plans = [[rng.choice(item_ids) for _ in range(count)] for count in per_caller]
    latencies: list[float] = []

    async def caller(plan: list[str]) -> None:
        for item_id in plan:
            before = time.perf_counter()
            await store.checkout(item_id, 1, operator="bench")
            latencies.append(time.perf_counter() - before)

    lag = LoopLagMonitor()
    lag.start()
    started = time.perf_counter()
    cpu_started = time.process_time()
    async with asyncio.TaskGroup() as group:
        for number, plan in enumerate(plans):
            group.create_task(caller(plan), name=f"bench: checkout caller {number}")
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    max_lag = await lag.stop()
    return {
        "ops_per_s": round(ops / elapsed),
        "cpu_ms_per_op": _round(cpu * 1000 / ops, 3),
        "latency_p50_ms": _round(percentile(latencies, 0.50) * 1000, 2),
        "latency_p99_ms": _round(percentile(latencies, 0.99) * 1000, 2),
        "latency_max_ms": _round(max(latencies) * 1000, 1),
        "max_loop_stall_ms": _round(max_lag * 1000, 1),
    }


def _doc_kind(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else name


async def _durable_checkouts(store: Store, bulk_ids: Sequence[str], cfg: StoreBenchConfig) -> Json:
    sizes: dict[str, list[int]] = {}

    def capture(update: CommittedUpdate) -> None:
        if update.origin == LOCAL:
            sizes.setdefault(_doc_kind(update.doc), []).append(len(update.update))

    unsubscribe = store.subscribe(capture)
    rng = random.Random(cfg.seed + 2)
    by_callers: Json = {}
    total_ops = 0
    try:
        for callers in cfg.callers:
            rounds = []
            for _ in range(cfg.repeat):
                rounds.append(await _checkouts(store, bulk_ids, callers, cfg.ops, rng))
                total_ops += cfg.ops
            by_callers[str(callers)] = {
                "ops_per_round": cfg.ops,
                "ops_per_s": round(_median([r["ops_per_s"] for r in rounds])),
                "cpu_ms_per_op": _round(_median([r["cpu_ms_per_op"] for r in rounds]), 3),
                "latency_p50_ms": _round(_median([r["latency_p50_ms"] for r in rounds]), 2),
                "latency_p99_ms": _round(_median([r["latency_p99_ms"] for r in rounds]), 2),
                "max_loop_stall_ms": _round(_median([r["max_loop_stall_ms"] for r in rounds]), 1),
                "rounds": rounds,
            }
    finally:
        unsubscribe()
    per_kind = {
        kind: {
            "updates_per_checkout": _round(len(found) / total_ops, 2),
            "bytes_per_checkout": _round(sum(found) / total_ops, 1),
            "update_bytes_median": _median(found),
        }
        for kind, found in sorted(sizes.items())
    }
    combined = sum(sum(found) for found in sizes.values()) / total_ops
    return {
        "callers": by_callers,
        "update_bytes": {
            "checkouts": total_ops,
            "item_doc_bytes": per_kind.get("items", {}).get("bytes_per_checkout", 0.0),
            "ledger_doc_bytes": per_kind.get("ledger", {}).get("bytes_per_checkout", 0.0),
            "combined_bytes": _round(combined, 1),
            "by_doc_kind": per_kind,
        },
    }


async def _compact(store: Store, path: Path) -> Json:
    before = _disk_usage(path)
    lag = LoopLagMonitor()
    lag.start()
    started = time.perf_counter()
    await store.compact()
    elapsed = time.perf_counter() - started
    max_lag = await lag.stop()
    after = _disk_usage(path)
    return {
        "compact_s": _round(elapsed, 2),
        "compact_max_loop_stall_ms": _round(max_lag * 1000, 1),
        "before_compact": before,
        "after_compact": after,
    }


def _indexed_items(path: Path) -> list[tuple[str, str, str]]:
    """(barcode, id, kind) of every live item, read with plain sqlite3 before the store opens."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT barcode, id, kind FROM items WHERE NOT deleted ORDER BY id")
        return [(str(barcode), str(ident), str(kind)) for barcode, ident, kind in rows]


async def _workload_phase(path: Path, cfg: StoreBenchConfig) -> Json:
    """Lookups, then checkouts, then compaction, on one store opened in this process."""
    items = _indexed_items(path)
    barcodes = [barcode for barcode, _, _ in items]
    bulk_ids = [ident for _, ident, kind in items if kind == "bulk"]
    del items
    gc.collect()
    started = time.perf_counter()
    store = await Store.connect(path, station_id=STATION, shard_count=cfg.shards)
    result: Json = {"connect_s": _round(time.perf_counter() - started), "after_open": _rss()}
    try:
        result["lookup"] = await _lookups(store, barcodes, cfg)
        result["checkout"] = await _durable_checkouts(store, bulk_ids, cfg)
        result["after_checkouts"] = _rss()
        result["disk"] = await _compact(store, path)
        result["after_compact"] = _rss()
    finally:
        await store.close()
    return result


def _probe_barcode(path: Path) -> str:
    """A barcode from the middle of the index, for the first lookup after a cold open."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        count = db.execute("SELECT count(*) FROM items").fetchone()[0]
        row = db.execute(
            "SELECT barcode FROM items ORDER BY id LIMIT 1 OFFSET ?", (count // 2,)
        ).fetchone()
    return str(row[0])


def _run_size(count: int, cfg: StoreBenchConfig, workdir: Path) -> Json:
    path = workdir / f"store-{count}.db"
    result: Json = {"items": count, "shards": cfg.shards}

    _log(f"{count} items: import in chunks of {cfg.chunk}")
    result["import"] = _spawn("import", path, cfg, "--items", str(count))
    if "error" in result["import"]:
        return result
    result["disk_after_import"] = _disk_usage(path)
    barcode = _probe_barcode(path)

    _log(f"{count} items: cold open in a fresh process x{cfg.repeat}")
    result["cold_open"] = _cold_open(path, cfg, barcode)

    _log(
        f"{count} items: {cfg.lookups} lookups, then {cfg.ops} checkouts with "
        f"{'/'.join(map(str, cfg.callers))} callers, x{cfg.repeat}; then compaction"
    )
    workload = _spawn("workload", path, cfg)
    result["workload_error"] = workload.get("error")
    result["lookup"] = workload.get("lookup")
    result["checkout"] = workload.get("checkout")
    result["disk"] = workload.get("disk")
    result["workload_rss_mib"] = {
        phase: workload.get(phase) for phase in ("after_open", "after_checkouts", "after_compact")
    }

    _log(f"{count} items: cold open after compaction x{cfg.repeat}")
    result["cold_open_compacted"] = _cold_open(path, cfg, barcode)
    result["targets"] = _targets(result)
    return result


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    unit: str
    limit: float
    at_most: bool
    #: Where the measured figure sits in one size's result.
    path: tuple[str, ...]
    #: The target is stated for this inventory size only (``None``: for every size).
    items: int | None = None


TARGETS = (
    Target("import_s", "s", 15.0, True, ("import", "seconds"), items=TARGET_ITEMS),
    Target("cold_open_s", "s", 2.0, True, ("cold_open", "connect_s")),
    Target("rss_after_open_mib", "MiB", 500.0, True, ("cold_open", "rss_mib")),
    Target("lookup_p99_ms", "ms", 1.0, True, ("lookup", "p99_ms")),
    Target(
        "checkouts_per_s_16_callers",
        "ops/s",
        3000,
        False,
        ("checkout", "callers", "16", "ops_per_s"),
    ),
    Target(
        "update_bytes_per_checkout",
        "bytes",
        80,
        True,
        ("checkout", "update_bytes", "combined_bytes"),
    ),
)


def _lookup_path(result: Json, path: tuple[str, ...]) -> float | None:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _targets(result: Json) -> list[Json]:
    items = int(result["items"])
    rows: list[Json] = []
    for target in TARGETS:
        measured = _lookup_path(result, target.path)
        applies = target.items is None or target.items == items
        met: bool | None = None
        if measured is not None and applies:
            met = measured <= target.limit if target.at_most else measured >= target.limit
        row: Json = {
            "name": target.name,
            "target": f"{'<=' if target.at_most else '>='} {target.limit:g} {target.unit}",
            "measured": measured,
            "met": met,
        }
        if not applies:
            row["note"] = f"target is stated for {target.items} items"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- entry points


def run(args: argparse.Namespace) -> Json:
    """Run the store benchmark for every configured size; returns its JSON section."""
    cfg = config_from_args(args)
    SCRATCH_DIR.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="store-", dir=SCRATCH_DIR))
    report: Json = {
        "config": {
            "sizes": list(cfg.sizes),
            "import_chunk_rows": cfg.chunk,
            "lookups_per_round": cfg.lookups,
            "checkouts_per_round": cfg.ops,
            "callers": list(cfg.callers),
            "repeat": cfg.repeat,
            "shards": cfg.shards,
            "filesystem": _filesystem_of(workdir),
            "workdir": str(workdir),
        },
        "sizes": {},
    }
    try:
        for count in cfg.sizes:
            report["sizes"][str(count)] = _run_size(count, cfg, workdir)
            if not cfg.keep:
                for leftover in workdir.glob(f"store-{count}.db*"):
                    leftover.unlink()
    finally:
        if not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            # Leave no empty scratch directory behind either.
            with contextlib.suppress(OSError):
                SCRATCH_DIR.rmdir()
    largest = max(cfg.sizes)
    report["targets"] = {
        "evaluated_at_items": largest,
        "results": report["sizes"][str(largest)].get("targets", []),
    }
    return report


def phase_main(argv: Sequence[str]) -> int:
    """One phase of the benchmark in this (fresh) process; prints its JSON report."""
    parser = argparse.ArgumentParser(prog="python -m bench.store")
    parser.add_argument("phase", choices=("import", "open", "workload"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--config", required=True, help="StoreBenchConfig as JSON")
    parser.add_argument("--items", type=int, default=0, help="import: catalog size")
    parser.add_argument("--barcode", default="", help="open: barcode of the first lookup")
    args = parser.parse_args(argv)
    raw = json.loads(args.config)
    cfg = StoreBenchConfig(
        **{**raw, "sizes": tuple(raw["sizes"]), "callers": tuple(raw["callers"])}
    )
    report: Json
    if args.phase == "import":
        report = asyncio.run(_import_phase(args.path, cfg, args.items))
    elif args.phase == "open":
        report = asyncio.run(_open_phase(args.path, cfg, args.barcode))
    else:
        report = asyncio.run(_workload_phase(args.path, cfg))
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(phase_main(sys.argv[1:]))
