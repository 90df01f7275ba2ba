"""Finding the other stations on the LAN with mDNS (python-zeroconf).

Each station registers ``<station id>._invsync._tcp.local.`` with TXT keys ``fleet``
(the fleet id), ``id`` (station id) and ``v`` (protocol version) — no names and no
inventory data — and browses for the others. Stations of other fleets or other protocol
versions are ignored. Warehouse Wi-Fi often blocks multicast: if mDNS cannot start, this
logs once and the daemon carries on with static peers and peer exchange.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .config import HostPort
from .protocol import PROTOCOL_VERSION

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_invsync._tcp.local."
RESOLVE_TIMEOUT_MS = 3000

Found = Callable[[HostPort, str], None]


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host, to advertise when listening on 0.0.0.0."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                address = ipaddress.ip_address(ip.ip)
                if not address.is_loopback and not address.is_link_local:
                    found.append(ip.ip)
    return found


class Discovery:
    """Registers this station and reports others of the same fleet to ``found``."""

    def __init__(
        self,
        *,
        station_id: str,
        fleet_id: str,
        port: int,
        interfaces: Sequence[str],
        advertise_host: str,
        found: Found,
    ) -> None:
        self.station_id = station_id
        self.fleet_id = fleet_id
        self.port = port
        self.interfaces = list(interfaces)
        self.advertise_host = advertise_host
        self._found = found
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = False

    def _advertised(self) -> list[str]:
        if self.advertise_host not in ("0.0.0.0", "", "::"):
            return [self.advertise_host]
        if self.interfaces:
            return [i for i in self.interfaces if _is_ipv4(i)]
        return local_addresses()

    async def __aenter__(self) -> Discovery:
        try:
            await self._start()
        except Exception as exc:
            # Fail soft: no multicast here means static peers and peer exchange only.
            _LOGGER.warning("mDNS discovery unavailable (%s); using static peers only", exc)
            await self.close()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _start(self) -> None:
        interfaces: list[str | int] | None = list(self.interfaces) or None
        if interfaces:
            self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        else:
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
        addresses = self._advertised()
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.station_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=self.port,
            properties={"fleet": self.fleet_id, "id": self.station_id, "v": str(PROTOCOL_VERSION)},
            server=f"invsync-{self.station_id.lower()}.local.",
        )
        await self._zeroconf.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        self.active = True
        _LOGGER.info("mDNS: announcing %s on %s", self.station_id, ", ".join(addresses) or "-")

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.create_task(self._resolve(name), name=f"mdns: resolve {name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zeroconf is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        props = {
            (k.decode(errors="replace") if isinstance(k, bytes) else str(k)): (
                v.decode(errors="replace") if isinstance(v, bytes) else ""
            )
            for k, v in info.properties.items()
        }
        station = props.get("id", "")
        if not station or station == self.station_id:
            return
        if props.get("fleet") != self.fleet_id:
            _LOGGER.debug("mDNS: ignoring %s of another fleet", station)
            return
        if props.get("v") != str(PROTOCOL_VERSION):
            _LOGGER.debug("mDNS: ignoring %s speaking protocol %s", station, props.get("v"))
            return
        if info.port is None:
            return
        for address in info.parsed_addresses(IPVersion.V4Only):
            self._found(HostPort(address, info.port), station)

    async def close(self) -> None:
        self.active = False
        for task in list(self._tasks):
            task.cancel("discovery closing")
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            if self._info is not None:
                try:
                    await asyncio.wait_for(zeroconf.async_unregister_service(self._info), 2.0)
                except Exception as exc:
                    _LOGGER.debug("mDNS: unregister failed: %s", exc)
            await zeroconf.async_close()


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
