"""The fleet operations behind ``invsync fleet``: invite, join, revoke, members, and moving
the CA to another admin station.

Joining replaces this station's certificates, drops every open peer connection (they
belong to the old fleet), announces the new fleet id by mDNS and dials the inviter. The
inventory is not touched: items this station already had merge into the fleet's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from crdt_store.documents import ENROLLMENTS_ROOT

from . import fleet, pki
from .config import Config, ConfigError, HostPort, parse_host_port
from .discovery import local_addresses
from .enrollment import EnrollmentDesk, EnrollmentFailed, enroll
from .guard import FleetGuard
from .invites import PIN_BYTES, InviteBook, JoinToken, TokenError, decode_token

if TYPE_CHECKING:
    from .peers import PeerManager

_LOGGER = logging.getLogger(__name__)

MIN_PASSPHRASE = 12
#: The addresses of the station this one joined through, dialed on every start.
JOINED_VIA_FILE = "joined-via"
MIN_INVITE_SECONDS = 5
MAX_INVITE_SECONDS = 7 * 86400
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\s*", re.DOTALL)


class FleetError(Exception):
    """A fleet command that cannot be done; nothing changed. ``code`` names why for
    scripts and ``status`` is the control API's answer (its error middleware maps it)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)

    @property
    def status(self) -> int:
        return 400


class JoinRefused(FleetError):
    """Joining a fleet did not work; the station is as it was. ``retry`` says whether
    trying again later may help (the inviter was unreachable)."""

    def __init__(self, code: str, message: str, *, retry: bool = False) -> None:
        self.retry = retry
        super().__init__(code, f"cannot join the fleet: {message}")

    @property
    def status(self) -> int:
        return 502 if self.retry else 403


class CaProblem(FleetError):
    """An invite, revocation or CA export/import that cannot be done."""

    @property
    def status(self) -> int:
        return {"no_ca": 409, "not_found": 404}.get(self.code, 400)


class FleetAdmin:
    def __init__(self, config: Config, guard: FleetGuard) -> None:
        self.config = config
        self.guard = guard
        self.invites = InviteBook(config.data_dir)
        self.desk = EnrollmentDesk(guard, self.invites)
        self.peers: PeerManager | None = None
        #: Set when the station switched fleets (mDNS re-announces).
        self.fleet_changed = asyncio.Event()
        self._joining = asyncio.Lock()

    # ------------------------------------------------------------ invite

    def invite_addresses(self, port: int) -> tuple[HostPort, ...]:
        host = self.config.listen.host
        if host not in ("", "0.0.0.0", "::"):
            return (HostPort(host, port),)
        hosts = list(self.config.mdns_interfaces) or local_addresses() or ["127.0.0.1"]
        return tuple(HostPort(h, port) for h in hosts)

    def invite(self, expires_in: float, addresses: tuple[HostPort, ...] = ()) -> JoinToken:
        if not self.guard.membership.holds_ca:
            raise CaProblem(
                "no_ca",
                "this station does not hold the fleet CA: invite from an admin station, "
                "or move the CA here with 'fleet export-ca' / 'fleet import-ca'",
            )
        if not MIN_INVITE_SECONDS <= expires_in <= MAX_INVITE_SECONDS:
            raise CaProblem("invalid", "an invite expires after 5 seconds to 7 days")
        port = self.peers.port if self.peers is not None else self.config.listen.port
        where = addresses or self.invite_addresses(port)
        token = self.invites.create(
            self.guard.membership.ca_fingerprint[:PIN_BYTES], expires_in, where
        )
        _LOGGER.info("created an invite (expires in %ds)", int(expires_in))
        return token

    # ------------------------------------------------------------ join

    def _check_may_leave(self, *, force: bool) -> None:
        membership = self.guard.membership
        if membership.holds_ca and not force:
            others = [
                s
                for s in self.guard.store.fleet_entries(ENROLLMENTS_ROOT)
                if s != self.guard.station_id and s not in self.guard.revoked
            ]
            if others:
                raise JoinRefused(
                    "holds_ca",
                    f"this station holds the CA of fleet {membership.fleet_id}, which has "
                    f"{len(others)} other station(s); move the CA first ('fleet export-ca') "
                    "or join with --force",
                )

    async def join(self, token_text: str, *, force: bool = False) -> dict[str, Any]:
        """Enroll with the token's fleet and switch to it."""
        try:
            token = decode_token(token_text)
        except TokenError as exc:
            raise JoinRefused("bad_token", str(exc)) from exc
        async with self._joining:
            if token.pins(self.guard.membership.ca_fingerprint):
                raise JoinRefused("already_member", "this station is already in that fleet")
            if time.time() > token.expires_at:
                raise JoinRefused("token_expired", "this token has expired; ask for a new one")
            self._check_may_leave(force=force)
            try:
                enrolled = await enroll(token, self.guard.membership.identity, self.config.name)
            except EnrollmentFailed as exc:
                raise JoinRefused(exc.code, str(exc), retry=exc.code == "unreachable") from exc
            old_fleet = self.guard.fleet_id
            membership = fleet.install(
                self.guard.membership, enrolled.ca_cert, enrolled.station_cert
            )
            self.guard.switch(membership)
            _LOGGER.warning(
                "joined fleet %s (was %s) via %s", membership.fleet_id, old_fleet, enrolled.via
            )
            self._remember_inviter(token.addresses)
            if self.peers is not None:
                self.peers.drop_all("this station joined another fleet")
                for address in token.addresses:
                    self.peers.learn(address, None, source="join")
            self.fleet_changed.set()
            return {
                "fleet_id": membership.fleet_id,
                "previous_fleet_id": old_fleet,
                "via": str(enrolled.via),
            }

    def _remember_inviter(self, addresses: tuple[HostPort, ...]) -> None:
        """Keep the inviter's addresses as peers to dial, also after restarts (mDNS may be
        blocked on the Wi-Fi, and no static peers may be configured)."""
        text = "".join(f"{address}\n" for address in addresses)
        fleet.write_file(self.config.data_dir / JOINED_VIA_FILE, text.encode(), 0o600)

    def remembered_peers(self) -> tuple[HostPort, ...]:
        path = self.config.data_dir / JOINED_VIA_FILE
        found = []
        with contextlib.suppress(OSError):
            for line in path.read_text().split():
                with contextlib.suppress(ConfigError):
                    found.append(parse_host_port("joined via", line))
        return tuple(found)

    async def join_on_start(self, token_text: str) -> None:
        """``invsyncd --join TOKEN``: join unless already in that fleet."""
        try:
            token = decode_token(token_text)
        except TokenError as exc:
            raise JoinRefused("bad_token", str(exc)) from exc
        if token.pins(self.guard.membership.ca_fingerprint):
            _LOGGER.info("join token: already a member of fleet %s", self.guard.fleet_id)
            return
        if (self.config.data_dir / JOINED_VIA_FILE).exists():
            # The token is for a first start. A station that has joined a fleet since (or
            # moved to a new CA) must not stop starting because an old token is still set.
            _LOGGER.warning(
                "join token ignored: this station already joined fleet %s; remove "
                "join_token / --join from its settings",
                self.guard.fleet_id,
            )
            return
        await self.join(token_text)

    # ------------------------------------------------------------ revoke, members

    async def revoke(self, station_id: str) -> dict[str, Any]:
        if station_id == self.guard.station_id:
            raise CaProblem("invalid", "a station cannot revoke itself")
        known = set(self.guard.store.fleet_members()) | set(
            self.guard.store.fleet_entries(ENROLLMENTS_ROOT)
        )
        if station_id not in known:
            raise CaProblem("not_found", f"no station {station_id} in this fleet")
        try:
            revocation = await self.guard.revoke(station_id)
        except PermissionError as exc:
            raise CaProblem("no_ca", f"{exc}: revoke from an admin station") from exc
        return {"station_id": station_id, "revoked_at": revocation.at_ms / 1000}

    def members(self) -> list[dict[str, Any]]:
        store = self.guard.store
        named = store.fleet_members()
        enrolled = store.fleet_entries(ENROLLMENTS_ROOT)
        connected = {}
        if self.peers is not None:
            connected = {p["station_id"]: p for p in self.peers.status()}
        rows = []
        for station in sorted(set(named) | set(enrolled) | set(self.guard.revoked)):
            entry, enrollment = named.get(station, {}), enrolled.get(station, {})
            seen = entry.get("seen")
            last_seen = seen / 1000 if isinstance(seen, int | float) else None
            peer = connected.get(station)
            if station == self.guard.station_id or (peer and peer["state"] == "connected"):
                last_seen = time.time()
            revocation = self.guard.revoked.get(station)
            at = enrollment.get("at")
            rows.append(
                {
                    "station_id": station,
                    "name": str(entry.get("name") or enrollment.get("name") or ""),
                    "enrolled_at": at / 1000 if isinstance(at, int | float) else None,
                    "last_seen": last_seen,
                    "revoked": revocation is not None,
                    "revoked_at": revocation.at_ms / 1000 if revocation else None,
                    "this_station": station == self.guard.station_id,
                }
            )
        return rows

    # ------------------------------------------------------------ CA custody

    async def export_ca(self, passphrase: str) -> bytes:
        """The CA certificate and its key, encrypted with ``passphrase``, as one file."""
        ca_key = self.guard.membership.ca_key
        if ca_key is None:
            raise CaProblem("no_ca", "this station does not hold the fleet CA")
        _check_passphrase(passphrase)
        # scrypt takes a quarter of a second on purpose: not on the event loop.
        sealed = await asyncio.to_thread(pki.seal_key, ca_key, passphrase.encode())
        return pki.cert_pem(self.guard.membership.ca_cert) + sealed

    async def import_ca(self, bundle: bytes, passphrase: str) -> dict[str, Any]:
        """Make this station an admin station with an exported CA of its own fleet."""
        cert_pem = key_block = None
        for block in _PEM_BLOCK.finditer(bundle):
            if block.group(1) == b"CERTIFICATE":
                cert_pem = block.group(0)
            elif block.group(1) == pki.SEALED_LABEL.encode():
                key_block = block.group(0)
        if cert_pem is None or key_block is None:
            raise CaProblem("invalid", "the file does not hold a CA certificate and key")
        try:
            ca_cert = pki.load_cert(cert_pem, "the CA certificate")
        except pki.CertificateProblem as exc:
            raise CaProblem("invalid", str(exc)) from exc
        if pki.fingerprint(ca_cert) != self.guard.membership.ca_fingerprint:
            raise CaProblem(
                "wrong_fleet",
                f"that CA is not the CA of this station's fleet ({self.guard.fleet_id}); "
                "join its fleet first",
            )
        try:
            ca_key = await asyncio.to_thread(pki.open_sealed_key, key_block, passphrase.encode())
        except pki.CertificateProblem as exc:
            raise CaProblem("bad_passphrase", str(exc)) from exc
        try:
            membership = fleet.install_ca_key(self.guard.membership, ca_key)
        except fleet.FleetFileError as exc:
            raise CaProblem("invalid", str(exc)) from exc
        self.guard.switch(membership)
        return {"fleet_id": membership.fleet_id, "holds_ca": True}


def _check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise CaProblem("invalid", f"use a passphrase of at least {MIN_PASSPHRASE} characters")
