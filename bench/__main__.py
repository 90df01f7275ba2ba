"""Run the benchmarks and print one JSON document (``python -m bench [NAME...] [options]``).

This module owns the command line of ``make bench``: which benchmarks run (all by default,
or those named), the shared ``--quick`` mode (small sizes, for a smoke run in seconds), and
the envelope of the output (when, on what machine, with which library versions), so a
figure can always be traced to the run that produced it. Progress goes to stderr; stdout
carries only the JSON document. Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

from bench import cloud, stations, store, tls

Json = dict[str, Any]
Runner = Callable[[argparse.Namespace], Json]

#: Every benchmark by name; ``python -m bench`` runs them in this order.
BENCHMARKS: dict[str, Runner] = {
    "store": store.run,
    "daemon": stations.run_daemon,
    "sync": stations.run_sync,
    "partition": stations.run_partition,
    "cloud": cloud.run,
    "tls": tls.run,
}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=store.PROJECT_DIR, capture_output=True, text=True, check=True
    ).stdout.strip()


def _revision() -> str:
    """The commit measured, with ``+dirty`` when tracked files differ from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _load() -> list[float]:
    """1/5/15-minute load averages: other work on the machine shows up in the figures."""
    return [round(value, 2) for value in os.getloadavg()]


def _machine() -> Json:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "pycrdt": _version("pycrdt"),
        "aiosqlite": _version("aiosqlite"),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run invsync benchmarks and print one JSON document on stdout.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke run")
    store.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    names: list[str] = list(dict.fromkeys(args.names)) or list(BENCHMARKS)
    started = time.perf_counter()
    document: Json = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "revision": _revision(),
        "machine": _machine(),
        "load_average_before": _load(),
        "benchmarks": {},
    }
    failed = False
    for name in names:
        try:
            document["benchmarks"][name] = BENCHMARKS[name](args)
        except Exception as exc:
            # One broken benchmark must not cost the figures of the others.
            traceback.print_exc()
            document["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
    document["load_average_after"] = _load()
    document["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(document, sys.stdout, indent=2)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
