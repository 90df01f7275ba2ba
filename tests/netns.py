"""A LAN of stations on one machine: network namespaces joined by a bridge, with faults.

Each host is a network namespace with one veth (``eth0``, 198.51.100.1N/24); the other
end of every veth is a port of one bridge that lives in its own namespace, with multicast
snooping off so mDNS floods to every port. Faults are nftables rules: at the bridge
(frames to or from one host dropped, or only frames between two hosts) or inside a host
(random loss of incoming TCP segments). Nothing here touches the machine's own network:
every address is in 198.51.100.0/24 (TEST-NET-2) and lives only inside the namespaces,
and tearing down a namespace removes its links and rules with it.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); :func:`unavailable` says why not.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon_harness import INVSYNCD, Daemon
from tests.fleet_ca import FleetCA

SUBNET_PREFIX = "198.51.100."
SYNC_PORT = 7420
_counter = itertools.count()
#: Variables that would make a daemon started here talk to systemd or look elsewhere.
_FOREIGN_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
)


class NetnsError(Exception):
    """An ``ip`` or ``nft`` command failed; the message holds the command and its stderr."""


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (creating namespaces, veths and nft rules)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian package {package}; see .ci/system-deps.sh)"
    return None


def run(*args: str) -> str:
    """Run a command, return its stdout; :class:`NetnsError` with stderr on failure."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def nft(namespace: str, *args: str) -> str:
    return run("ip", "netns", "exec", namespace, "nft", *args)


@dataclass(frozen=True, slots=True)
class Host:
    """One machine on the LAN: its namespace, address and the bridge port it hangs off."""

    namespace: str
    address: str
    port_name: str


@dataclass
class Lan:
    """Hosts on one bridge. Build it with :func:`lan`; faults are added and removed here."""

    bridge: str
    hosts: list[Host] = field(default_factory=list)

    def cut_off(self, host: Host) -> None:
        """Partition ``host`` from everyone: the bridge drops its frames both ways."""
        self._drop("partition", [("iifname", host.port_name), ("oifname", host.port_name)])

    def block(self, one: Host, other: Host) -> None:
        """Drop only the frames between ``one`` and ``other`` (both still reach the rest)."""
        self._drop(
            f"block_{one.port_name}_{other.port_name}",
            [
                ("iifname", one.port_name, "oifname", other.port_name),
                ("iifname", other.port_name, "oifname", one.port_name),
            ],
        )

    def heal(self) -> None:
        """Remove every fault at the bridge."""
        for table in self._tables():
            nft(self.bridge, "delete", "table", "bridge", table)

    def dropped_frames(self) -> int:
        """Frames the bridge's fault rules have dropped so far."""
        return sum(
            _counted_packets(nft(self.bridge, "list", "table", "bridge", t)) for t in self._tables()
        )

    def _drop(self, table: str, matches: list[tuple[str, ...]]) -> None:
        nft(self.bridge, "add", "table", "bridge", table)
        # A chain may not be named "fwd" (an nft keyword).
        chain = "{ type filter hook forward priority 0; policy accept; }"
        nft(self.bridge, "add", "chain", "bridge", table, "pfwd", chain)
        for match in matches:
            nft(self.bridge, "add", "rule", "bridge", table, "pfwd", *match, "counter", "drop")

    def _tables(self) -> list[str]:
        listing = nft(self.bridge, "list", "tables", "bridge")
        return [line.split()[-1] for line in listing.splitlines() if line.startswith("table")]


def add_tcp_loss(host: Host, percent: int) -> None:
    """Drop ``percent``% of the TCP segments arriving at ``host``, at random."""
    chain = "{ type filter hook input priority 0; policy accept; }"
    nft(host.namespace, "add", "table", "inet", "fault")
    nft(host.namespace, "add", "chain", "inet", "fault", "in", chain)
    nft(
        *(host.namespace, "add", "rule", "inet", "fault", "in"),
        *("meta", "l4proto", "tcp", "numgen", "random", "mod", "100", "<", str(percent)),
        *("counter", "drop"),
    )


def tcp_segments_lost(host: Host) -> int:
    return _counted_packets(nft(host.namespace, "list", "table", "inet", "fault"))


def _counted_packets(listing: str) -> int:
    words = listing.split()
    return sum(int(words[i + 1]) for i, word in enumerate(words[:-1]) if word == "packets")


@contextmanager
def lan(count: int) -> Iterator[Lan]:
    """``count`` hosts on one bridge, each namespace removed on exit (even after errors).

    Namespace names carry the pid and a counter, so parallel runs and debris of a crashed
    run never collide.
    """
    tag = f"invs{os.getpid()}n{next(_counter)}"
    network = Lan(bridge=f"{tag}br")
    created: list[str] = []
    try:
        _add_namespace(network.bridge, created)
        bridge = ("ip", "-n", network.bridge)
        run(*bridge, "link", "add", "br0", "type", "bridge")
        # Without snooping the bridge floods multicast (mDNS) to every port.
        run(*bridge, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        run(*bridge, "link", "set", "br0", "up")
        for number in range(1, count + 1):
            host = Host(f"{tag}h{number}", f"{SUBNET_PREFIX}{10 + number}", f"vb{number}")
            _add_namespace(host.namespace, created)
            run(
                *("ip", "link", "add", "eth0", "netns", host.namespace, "type", "veth"),
                *("peer", "name", host.port_name, "netns", network.bridge),
            )
            run(*bridge, "link", "set", host.port_name, "master", "br0")
            run(*bridge, "link", "set", host.port_name, "up")
            run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
            network.hosts.append(host)
        yield network
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def _add_namespace(name: str, created: list[str]) -> None:
    run("ip", "netns", "add", name)
    created.append(name)
    run("ip", "-n", name, "link", "set", "lo", "up")


class Station(Daemon):
    """``invsyncd`` running inside a host's namespace, listening and doing mDNS there.

    The control socket is a path on the shared file system, so the CLI reaches it from
    the test's own namespace.
    """

    def __init__(self, host: Host, base: Path, name: str, ca: FleetCA) -> None:
        data_dir = base / name
        ca.enroll(data_dir)
        # An empty settings file keeps a machine-wide /etc/invsync/invsync.toml out.
        self.config_file = base / f"{name}.toml"
        self.config_file.write_text("")
        super().__init__(data_dir, base / f"{name}.sock", name=name)
        self.host = host

    @property
    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("INVSYNC_") and key not in _FOREIGN_ENV
        }
        env["INVSYNC_SOCKET"] = str(self.socket_path)
        return env

    def start(self, *, timeout: float = 20.0, env: dict[str, str] | None = None) -> None:
        self.launch(env)
        self.wait_ready(timeout)

    def launch(self, env: dict[str, str] | None = None) -> None:
        """Start the process without waiting (stations start in parallel, ~3 s each)."""
        args = [
            *("ip", "netns", "exec", self.host.namespace, INVSYNCD),
            *("--config", str(self.config_file)),
            *("--data-dir", str(self.data_dir)),
            *("--socket", str(self.socket_path)),
            *("--name", self.name),
            *("--listen", f"{self.host.address}:{SYNC_PORT}"),
            *("--mdns-interface", self.host.address),
        ]
        with self.log_path.open("ab") as log:
            # ``ip netns exec`` execs the daemon: signals sent to this pid reach it.
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env or self.env
            )
