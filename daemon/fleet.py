"""This station's membership of a fleet: the CA certificate, its own certificate, and (on
an admin station) the CA key — the files, their permissions, and the TLS contexts.

Files in the data directory (all written atomically, keys 0600):
- ``station.key``   the station's Ed25519 key (identity.py);
- ``station.crt``   its certificate, issued by the fleet CA;
- ``fleet-ca.crt``  the fleet CA certificate every peer is verified against;
- ``fleet-ca.key``  only on stations that hold the CA (the first one, or after
  ``fleet import-ca``): they can enroll and revoke stations.

A station with none of them founds a new one-station fleet on first start, so a single
station needs no set-up; joining a fleet later replaces the certificates (a CA key of the
old fleet is kept under a ``retired-`` name, never deleted).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import pki
from .identity import KEY_FILE, StationIdentity

STATION_CERT_FILE = "station.crt"
CA_CERT_FILE = "fleet-ca.crt"
CA_KEY_FILE = "fleet-ca.key"


class FleetFileError(Exception):
    """The fleet files are missing, unreadable, too open, or do not fit together."""


def check_private(path: Path) -> None:
    """Refuse a key file that other users could read."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise FleetFileError(
            f"{path} is mode {mode:04o}: other users could read this key; run: chmod 600 {path}"
        )


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically and durably (a crash leaves the old or the new file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (they live in the directory's entries)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True, slots=True)
class FleetMembership:
    """What this station proves itself with, and what it verifies peers against."""

    data_dir: Path
    identity: StationIdentity
    ca_cert: x509.Certificate
    station_cert: x509.Certificate
    ca_key: Ed25519PrivateKey | None

    @property
    def fleet_id(self) -> str:
        return pki.fleet_id_of(self.ca_cert)

    @property
    def holds_ca(self) -> bool:
        return self.ca_key is not None

    @property
    def ca_fingerprint(self) -> bytes:
        return pki.fingerprint(self.ca_cert)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        server = purpose is ssl.Purpose.CLIENT_AUTH
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.data_dir / STATION_CERT_FILE, self.data_dir / KEY_FILE)
        context.load_verify_locations(cadata=pki.cert_pem(self.ca_cert).decode("ascii"))
        if server:
            # Optional at the TLS layer only so an enrolling station (no certificate yet)
            # can reach the enrollment endpoint; a certificate that is presented is always
            # verified, and the sync endpoint refuses a connection without one.
            context.verify_mode = ssl.CERT_OPTIONAL
            # No session tickets: a resumed session would skip the certificate checks
            # (expiry) that a full handshake makes.
            context.num_tickets = 0
        else:
            # Peers are reached by IP address; who they are is the station id in their
            # certificate, checked against the hello (transport.peer_station).
            context.check_hostname = False
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)


def load_or_found(data_dir: Path, identity: StationIdentity) -> FleetMembership:
    """This station's fleet membership; a station in no fleet founds a new one."""
    finish_install(data_dir)
    if not (data_dir / STATION_CERT_FILE).exists() or not (data_dir / CA_CERT_FILE).exists():
        found_fleet(data_dir, identity)
    return load(data_dir, identity)


def found_fleet(data_dir: Path, identity: StationIdentity) -> None:
    """Create a fleet CA here and issue this station its certificate."""
    ca_key, ca_cert = pki.create_ca()
    cert = pki.issue_station_certificate(ca_key, ca_cert, identity.key.public_key())
    write_file(data_dir / CA_KEY_FILE, pki.key_pem(ca_key))
    write_file(data_dir / CA_CERT_FILE, pki.cert_pem(ca_cert), 0o644)
    write_file(data_dir / STATION_CERT_FILE, pki.cert_pem(cert), 0o644)


def load(data_dir: Path, identity: StationIdentity) -> FleetMembership:
    try:
        ca_cert = pki.load_cert((data_dir / CA_CERT_FILE).read_bytes(), CA_CERT_FILE)
        station_cert = pki.load_cert((data_dir / STATION_CERT_FILE).read_bytes(), STATION_CERT_FILE)
        ca_key = None
        ca_key_path = data_dir / CA_KEY_FILE
        if ca_key_path.exists():
            check_private(ca_key_path)
            ca_key = pki.load_key(ca_key_path.read_bytes(), CA_KEY_FILE)
        check_private(data_dir / KEY_FILE)
    except OSError as exc:
        raise FleetFileError(f"cannot read the fleet files in {data_dir}: {exc}") from exc
    except pki.CertificateProblem as exc:
        raise FleetFileError(f"{data_dir}: {exc}") from exc
    membership = FleetMembership(data_dir, identity, ca_cert, station_cert, ca_key)
    _check_fits(membership)
    return membership


def _check_fits(m: FleetMembership) -> None:
    where = m.data_dir
    try:
        if pki.station_id_of_certificate(m.station_cert) != m.identity.station_id:
            raise FleetFileError(f"{where / STATION_CERT_FILE} was issued for another station key")
    except pki.CertificateProblem as exc:
        raise FleetFileError(f"{where / STATION_CERT_FILE}: {exc}") from exc
    if not pki.issued_by(m.station_cert, m.ca_cert):
        raise FleetFileError(f"{where / STATION_CERT_FILE} was not issued by {CA_CERT_FILE}")
    if m.ca_key is not None and pki.public_raw(m.ca_key.public_key()) != pki.public_raw(
        m.ca_cert.public_key()  # type: ignore[arg-type]
    ):
        raise FleetFileError(f"{where / CA_KEY_FILE} is not the key of {CA_CERT_FILE}")


def install(
    current: FleetMembership, ca_cert: x509.Certificate, station_cert: x509.Certificate
) -> FleetMembership:
    """Switch this station to the fleet of ``ca_cert`` (after a successful enrollment).

    Crash-safe: both new certificates are first written completely under ``.new`` names;
    then the files are renamed into place. A start that finds ``.new`` files finishes the
    switch (``finish_install``), so a crash never leaves a certificate of one fleet beside
    the CA of another."""
    data_dir = current.data_dir
    candidate = FleetMembership(data_dir, current.identity, ca_cert, station_cert, None)
    _check_fits(candidate)
    write_file(_staged(data_dir / STATION_CERT_FILE), pki.cert_pem(station_cert), 0o644)
    write_file(_staged(data_dir / CA_CERT_FILE), pki.cert_pem(ca_cert), 0o644)
    finish_install(data_dir)
    return load(data_dir, current.identity)


def _staged(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def finish_install(data_dir: Path) -> None:
    """Complete a switch of fleets that a crash interrupted (see :func:`install`)."""
    staged_ca = _staged(data_dir / CA_CERT_FILE)
    if not staged_ca.exists():
        _staged(data_dir / STATION_CERT_FILE).unlink(missing_ok=True)  # never completed
        return
    ca_key = data_dir / CA_KEY_FILE
    if ca_key.exists():
        old_fleet = pki.fleet_id_of(pki.load_cert((data_dir / CA_CERT_FILE).read_bytes(), "CA"))
        os.replace(ca_key, data_dir / f"retired-{old_fleet}-{CA_KEY_FILE}")
    staged_station = _staged(data_dir / STATION_CERT_FILE)
    if staged_station.exists():
        os.replace(staged_station, data_dir / STATION_CERT_FILE)
    os.replace(staged_ca, data_dir / CA_CERT_FILE)
    fsync_dir(data_dir)


def install_ca_key(current: FleetMembership, ca_key: Ed25519PrivateKey) -> FleetMembership:
    """Make this station an admin station of its fleet (``fleet import-ca``)."""
    candidate = FleetMembership(
        current.data_dir, current.identity, current.ca_cert, current.station_cert, ca_key
    )
    _check_fits(candidate)
    write_file(current.data_dir / CA_KEY_FILE, pki.key_pem(ca_key))
    return load(current.data_dir, current.identity)


def provision(
    data_dir: Path,
    identity: StationIdentity,
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    *,
    holds_ca: bool = False,
    not_after: dt.datetime | None = None,
) -> FleetMembership:
    """Enroll a station offline, with the CA key at hand: for preparing many stations
    from one image, and for tests and benchmarks. Joining with a token does the same
    over the network without the CA key leaving its station."""
    cert = pki.issue_station_certificate(
        ca_key, ca_cert, identity.key.public_key(), not_after=not_after
    )
    write_file(data_dir / CA_CERT_FILE, pki.cert_pem(ca_cert), 0o644)
    write_file(data_dir / STATION_CERT_FILE, pki.cert_pem(cert), 0o644)
    if holds_ca:
        write_file(data_dir / CA_KEY_FILE, pki.key_pem(ca_key))
    return load(data_dir, identity)
