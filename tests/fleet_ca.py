"""A fleet CA for tests: stations are enrolled offline (``daemon.fleet.provision``) so
tests about sync need not run an enrollment first. Enrollment itself is tested for real
in test_security.py."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from daemon import pki
from daemon.fleet import STATION_CERT_FILE, provision
from daemon.identity import KEY_FILE, load_or_create


class FleetCA:
    def __init__(self) -> None:
        self.key, self.cert = pki.create_ca()

    @property
    def fleet_id(self) -> str:
        return pki.fleet_id_of(self.cert)

    def enroll(
        self, data_dir: Path, *, holds_ca: bool = False, not_after: dt.datetime | None = None
    ) -> str:
        """Create ``data_dir`` (0700) with a station key and a certificate of this fleet;
        returns the station id."""
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = load_or_create(data_dir)
        provision(data_dir, identity, self.key, self.cert, holds_ca=holds_ca, not_after=not_after)
        return identity.station_id

    def client(self, directory: Path) -> tuple[ssl.SSLContext, str]:
        """A TLS client context with a certificate of this fleet for a made-up station
        (a hand-written peer in tests); returns it and the station id."""
        station_id = self.enroll(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_cert_chain(directory / STATION_CERT_FILE, directory / KEY_FILE)
        context.load_verify_locations(cadata=pki.cert_pem(self.cert).decode("ascii"))
        return context, station_id
