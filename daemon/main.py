"""``invsyncd``: the station daemon's entry point and lifecycle.

One asyncio process. Start-up order: settings, data directory (0700) and its lock, the
station identity, the store, the control socket; then READY=1 to systemd. SIGTERM and
SIGINT only set the stop event; shutdown closes the control socket first (no new
operations), then the store (flushing pending commits), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import click

from cloud_bridge.bridge import CloudBridge
from crdt_store import Store, StoreError
from crdt_store.documents import ENROLLMENTS_ROOT

from .admin import FleetAdmin, JoinRefused
from .config import Config, ConfigError, load_config
from .control import ControlApi, ControlServer, ControlSocketError
from .discovery import Discovery
from .fleet import FleetFileError, FleetMembership, load_or_found
from .guard import FleetGuard
from .identity import StationIdentity, load_or_create
from .lock import DataDirBusy, DataDirLock
from .notify import Notifier
from .peers import PeerListenError, PeerManager

_LOGGER = logging.getLogger("invsyncd")
#: sysexits.h EX_CONFIG: the settings are wrong; restarting will not help.
EXIT_CONFIG = 78
#: How often a station refreshes its "last seen" in the fleet doc.
PRESENCE_INTERVAL = 3600.0


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (``<4>``) so journald records levels."""

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        priority = self._PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def configure_logging(level: str) -> None:
    """Logs go to stderr; under systemd (JOURNAL_STREAM set) with journal priorities."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiosqlite logs every statement at DEBUG, drowning what the station does.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLevelName(level)))


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700, or refuse one that others can read."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"cannot create data directory {data_dir}: {exc.strerror}") from exc
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode & 0o077:
        raise StartupError(
            f"data directory {data_dir} is mode {mode:04o}: other users could read the "
            f"station key and inventory; run: chmod 700 {data_dir}"
        )


async def run_station(
    config: Config,
    identity: StationIdentity,
    membership: FleetMembership,
    stop: asyncio.Event,
    notifier: Notifier,
) -> None:
    """Run every component until ``stop`` is set; each is closed on the way out."""
    async with Store.open(
        config.db_path,
        station_id=identity.station_id,
        shard_count=config.shard_count,
        max_clock_skew=config.max_clock_skew,
    ) as store:
        await store.set_station_name(config.name)
        async with FleetGuard(store, membership) as guard:
            if warning := guard.certificate_warning():
                _LOGGER.error("peers will refuse this station%s", warning)
            admin = FleetAdmin(config, guard)
            if config.join_token:
                await admin.join_on_start(config.join_token)
            if guard.membership.holds_ca and identity.station_id not in store.fleet_entries(
                ENROLLMENTS_ROOT
            ):
                await guard.record_enrollment(identity.station_id, config.name)
            async with PeerManager(
                store,
                guard=guard,
                name=config.name,
                listen=config.listen,
                static_peers=(*config.peers, *admin.remembered_peers()),
                anti_entropy_interval=config.anti_entropy_interval,
                routes=admin.desk.routes(),
            ) as peers:
                admin.peers = peers
                guard.on_revoked = peers.drop
                await _serve_control(config, identity, store, peers, admin, stop, notifier)


async def _serve_control(
    config: Config,
    identity: StationIdentity,
    store: Store,
    peers: PeerManager,
    admin: FleetAdmin,
    stop: asyncio.Event,
    notifier: Notifier,
) -> None:
    """Serve the control socket until ``stop``; the socket closes before anything else."""
    api = ControlApi(store, config, peers=peers, fleet=admin)
    async with (
        _cloud_bridge(config, store, api, lambda: admin.guard.fleet_id),
        ControlServer(api, config.socket_path),
        asyncio.TaskGroup() as tasks,
    ):
        if config.mdns:
            tasks.create_task(_discover(config, admin, peers, stop), name="mdns")
        tasks.create_task(_publish_presence(store, config.name, stop), name="presence")
        items = await store.count_items()
        _LOGGER.info(
            "station %s (%s) ready: %d items, control socket %s, fleet %s",
            identity.station_id,
            config.name,
            items,
            config.socket_path,
            admin.guard.fleet_id,
        )
        notifier.ready(f"ready: {items} items")
        if notifier.watchdog_interval:
            tasks.create_task(
                _watchdog(notifier, notifier.watchdog_interval, stop), name="watchdog"
            )
        await stop.wait()
        notifier.stopping()
        _LOGGER.info("stopping: closing the control socket, then the store")


async def _discover(
    config: Config, admin: FleetAdmin, peers: PeerManager, stop: asyncio.Event
) -> None:
    """mDNS for the fleet in force; announced afresh when the station joins another."""
    while not stop.is_set():
        discovery = Discovery(
            station_id=peers.station_id,
            fleet_id=admin.guard.fleet_id,
            port=peers.port,
            interfaces=config.mdns_interfaces,
            advertise_host=config.listen.host,
            found=lambda address, station: peers.learn(address, station, source="mdns"),
        )
        async with discovery:
            admin.fleet_changed.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, admin.fleet_changed)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()


async def _publish_presence(store: Store, name: str, stop: asyncio.Event) -> None:
    """Refresh this station's "last seen" in the fleet doc now and then."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PRESENCE_INTERVAL):
                await stop.wait()
        if not stop.is_set():
            with contextlib.suppress(StoreError):
                await store.set_station_name(name)


async def _watchdog(notifier: Notifier, interval: float, stop: asyncio.Event) -> None:
    """Ping systemd's watchdog while the event loop is responsive."""
    while not stop.is_set():
        notifier.watchdog()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


@contextlib.asynccontextmanager
async def _cloud_bridge(
    config: Config, store: Store, api: ControlApi, fleet: Callable[[], str]
) -> AsyncIterator[None]:
    """The cloud bridge when ``[cloud] url`` is set (the control API reaches it through
    ``api``); it stops after the control socket and before the store."""
    if config.cloud.url is None:
        yield
        return
    async with CloudBridge(store, config.cloud, fleet=fleet) as bridge:
        api.cloud = bridge
        _LOGGER.info(
            "cloud bridge to %s, pushing every %gs", bridge.url, config.cloud.push_interval
        )
        try:
            yield
        finally:
            api.cloud = None


async def _serve(config: Config, identity: StationIdentity, membership: FleetMembership) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier()
    try:
        await run_station(config, identity, membership, stop, notifier)
    finally:
        notifier.close()


#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
#: The store's database thread takes the GIL back after every SQLite statement; with the
#: default it waited up to 5 ms each time the event loop was busy, a dozen times a commit.
GIL_SWITCH_INTERVAL = 0.0005


def start(config: Config) -> None:
    """Everything ``invsyncd`` does after parsing its settings."""
    configure_logging(config.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    prepare_data_dir(config.data_dir)
    lock = DataDirLock(config.data_dir)
    lock.acquire()
    try:
        identity = load_or_create(config.data_dir)
        membership = load_or_found(config.data_dir, identity)
        asyncio.run(_serve(config, identity, membership))
    finally:
        lock.release()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file."
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the store and keys live.")
@click.option("--socket", "socket_path", type=click.Path(), help="Control socket path.")
@click.option("--listen", help="HOST:PORT for peer connections.")
@click.option("--name", help="Display name of this station (default: host name).")
@click.option("--mdns-interface", multiple=True, help="IP to run mDNS on (repeatable).")
@click.option("--no-mdns", is_flag=True, default=None, help="Do not use mDNS discovery.")
@click.option("--peer", multiple=True, help="Static peer HOST:PORT (repeatable).")
@click.option("--join", "join_token", help="Join a fleet with a token from 'fleet invite'.")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
)
def main(
    config_file: str | None,
    data_dir: str | None,
    socket_path: str | None,
    listen: str | None,
    name: str | None,
    mdns_interface: tuple[str, ...],
    no_mdns: bool | None,
    peer: tuple[str, ...],
    join_token: str | None,
    log_level: str | None,
) -> None:
    """invsyncd: the invsync station daemon."""
    flags: dict[str, Any] = {
        "config": config_file,
        "data_dir": data_dir,
        "socket": socket_path,
        "listen": listen,
        "name": name,
        "mdns_interfaces": list(mdns_interface) or None,
        "mdns": False if no_mdns else None,
        "peers": list(peer) or None,
        "join_token": join_token,
        "log_level": log_level,
    }
    try:
        config = load_config(flags, os.environ)
    except ConfigError as exc:
        click.echo(f"invsyncd: {exc}", err=True)
        # EX_CONFIG: the unit's RestartPreventExitStatus stops systemd retrying forever.
        sys.exit(EXIT_CONFIG)
    try:
        start(config)
    except JoinRefused as exc:
        # An unreachable inviter may answer later; a refused token never will.
        click.echo(f"invsyncd: {exc}", err=True)
        sys.exit(1 if exc.retry else EXIT_CONFIG)
    except (StartupError, PeerListenError, FleetFileError) as exc:
        # Wrong permissions or a taken port: an operator must act; restarting won't help.
        click.echo(f"invsyncd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except (DataDirBusy, ControlSocketError, StoreError) as exc:
        click.echo(f"invsyncd: {exc}", err=True)
        sys.exit(1)
    _LOGGER.info("stopped")
