"""``invsyncd``: the station daemon's entry point.

For now it opens the station's store in its data directory (creating the station identity
and the store on first start) and runs until SIGTERM/SIGINT, then closes the store
cleanly. The control API, peer sync and the cloud bridge attach here as they arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from crdt_store import Store, StoreError

from .identity import StationIdentity, load_or_create

_LOGGER = logging.getLogger("invsyncd")


def default_data_dir() -> Path:
    for variable in ("INVSYNC_DATA_DIR", "STATE_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0])
    return Path.home() / ".local" / "share" / "invsync"


async def serve(data_dir: Path, identity: StationIdentity) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Store.open(data_dir / "inventory.db", station_id=identity.station_id) as store:
        _LOGGER.info(
            "station %s ready: %d items in %s",
            identity.station_id,
            store.stats()["items"],
            data_dir,
        )
        await stop.wait()
        _LOGGER.info("stopping")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="invsyncd", description="invsync station daemon")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the store lives")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        data_dir = args.data_dir or default_data_dir()
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        asyncio.run(serve(data_dir, load_or_create(data_dir)))
    except StoreError as exc:
        _LOGGER.error("%s", exc)
        sys.exit(1)
