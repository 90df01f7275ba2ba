"""Fleet security with real daemons and real TLS: who gets in, who gets nothing.

Stations are real ``invsyncd`` processes on loopback. Most are enrolled offline with a
fleet CA made by the test (``FleetCA``); the enrollment tests use the real thing — ``fleet
invite`` on one station, ``fleet join`` on another, over the network. "Gets nothing and
changes nothing" is checked on both inventories, not only on the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pycrdt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crdt_store import Store
from crdt_store.documents import REVOCATIONS_ROOT
from crdt_store.names import FLEET_DOC
from daemon import fleet, pki
from daemon.config import HostPort
from daemon.enrollment import ENROLL_PATH
from daemon.fleet import CA_CERT_FILE, CA_KEY_FILE, STATION_CERT_FILE, FleetMembership, load
from daemon.guard import FleetGuard
from daemon.identity import StationIdentity, load_or_create, station_id_of
from daemon.invites import (
    PIN_BYTES,
    InviteBook,
    InviteRefused,
    JoinToken,
    TokenError,
    decode_token,
)
from daemon.protocol import MAX_FRAME, Hello, decode_frame
from daemon.transport import CLOSE_PROTOCOL, CLOSE_REFUSED, SYNC_PATH
from tests.daemon_harness import Daemon, short_dir
from tests.fleet_ca import FleetCA
from tests.stations import (
    Stations,
    add_item,
    api,
    cli_json,
    connected,
    find,
    listen_port,
    peer_at,
    station_id,
    wait_until,
)

CONNECT_TIMEOUT = 30.0


@pytest.fixture
def site() -> Iterator[Stations]:
    with Stations(short_dir("sec")) as site:
        yield site


def barcodes(daemon: Daemon) -> set[str]:
    return {i["barcode"] for i in api(daemon, "GET", "items")["items"]}


def refusals(daemon: Daemon) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api(daemon, "GET", "peers")["refused"]
    return found


def refused_with(daemon: Daemon, words: str) -> bool:
    return any(words in r["reason"] for r in refusals(daemon))


def self_signed_station(data_dir: Path) -> None:
    """A station whose certificate it made itself (no fleet CA behind it)."""
    data_dir.mkdir(mode=0o700)
    identity = load_or_create(data_dir)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.station_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(identity.key, algorithm=None)
    )
    (data_dir / CA_CERT_FILE).write_bytes(pki.cert_pem(cert))
    (data_dir / STATION_CERT_FILE).write_bytes(pki.cert_pem(cert))


# ---------------------------------------------------------------------- who gets in


def test_only_enrolled_stations_get_the_inventory(site: Stations) -> None:
    """Enrolled stations sync. A station of another fleet, one with a self-made
    certificate, one with an expired certificate, a plain WebSocket client and a TLS
    client without a certificate each get nothing and change nothing; the refusals are
    logged and listed by ``invsync peers`` on both sides."""
    ca = FleetCA()
    a = site.station("dock-a", ca=ca, admin=True)
    a.start()
    add_item(a, "SPK-1", "QSC K10.2 Speaker", 8)
    b = site.station("dock-b", "--peer", peer_at(a), ca=ca)
    b.start()
    wait_until("SPK-1 on dock-b", CONNECT_TIMEOUT, lambda: find(b, "SPK-1"))

    stranger = site.station("stranger", "--peer", peer_at(a), ca=FleetCA())
    self_made = Daemon(site.base / "self-made", site.base / "self-made.sock", "--peer", peer_at(a))
    self_signed_station(self_made.data_dir)
    site.stations.append(self_made)
    expired = site.station("expired", "--peer", peer_at(a), own_fleet=True)
    ca.enroll(expired.data_dir, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    outsiders = [stranger, self_made, expired]
    for daemon in outsiders:
        daemon.start()
        add_item(daemon, f"EVIL-{daemon.name}", "Planted item", 1)

    wait_until(
        "dock-a refused all three",
        CONNECT_TIMEOUT,
        lambda: sum(r["direction"] == "incoming" for r in refusals(a)) >= 3,
    )
    # In TLS 1.3 the server shows its certificate first: stations of another fleet (or
    # none) hang up on dock-a's; dock-a verifies the expired one and refuses it.
    reasons = " | ".join(r["reason"] for r in refusals(a))
    assert "does not trust this fleet's CA" in reasons, reasons
    assert "certificate has expired" in reasons, reasons
    for daemon in (stranger, self_made):
        wait_until(
            f"{daemon.name} logs its refusal",
            CONNECT_TIMEOUT,
            lambda d=daemon: refused_with(d, "not issued by this fleet's CA"),  # type: ignore[misc]
        )
    wait_until("expired is told", CONNECT_TIMEOUT, lambda: refused_with(expired, "expired"))
    for daemon in outsiders:
        assert connected(daemon) == set()
    assert "refused connection" in a.log()

    # Plain WebSocket (no TLS) and TLS without a station certificate.
    port = listen_port(a)

    async def plain() -> str:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"ws://127.0.0.1:{port}{SYNC_PATH}") as ws:
                    return f"connected: {await ws.receive()}"
            except (aiohttp.ClientError, ConnectionError) as exc:
                return f"refused: {exc}"

    async def no_certificate() -> tuple[int, str]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"wss://127.0.0.1:{port}{SYNC_PATH}", ssl=context):
                    return 101, "upgraded"
            except aiohttp.WSServerHandshakeError as exc:
                headers = exc.headers
                return exc.status, headers.get("X-Invsync-Refused", "") if headers else ""

    assert asyncio.run(plain()).startswith("refused"), "a plain WebSocket got through"
    assert asyncio.run(no_certificate()) == (403, "no station certificate")
    wait_until("plain client listed", 10, lambda: refused_with(a, "not TLS"))

    assert barcodes(a) == barcodes(b) == {"SPK-1"}
    for daemon in outsiders:
        assert barcodes(daemon) == {f"EVIL-{daemon.name}"}, daemon.name
    assert connected(a) == {station_id(b)}
    peers_text = a.cli("peers").stdout
    assert "Refused connections" in peers_text and "not TLS" in peers_text


def test_a_revoked_station_is_dropped_everywhere_also_where_it_was_offline(site: Stations) -> None:
    """``fleet revoke`` on the admin station cuts the station off there at once; the
    revocation spreads through the fleet doc, so another station drops its open link to
    the revoked one, and a station that was offline when it happened learns it from the
    next peer it syncs with and refuses the revoked station from then on, also after a
    restart."""
    ca = FleetCA()
    a = site.station("office", ca=ca, admin=True)
    a.start()
    lost = site.station("lost-scanner", "--peer", peer_at(a), ca=ca)
    lost.start()
    shelf = site.station("shelf", "--peer", peer_at(a), "--peer", peer_at(lost), ca=ca)
    van = site.station("van", "--peer", peer_at(a), ca=ca)
    shelf.start()
    van.start()
    lost_id, shelf_id, van_id = station_id(lost), station_id(shelf), station_id(van)
    wait_until(
        "all connected to office",
        CONNECT_TIMEOUT,
        lambda: connected(a) == {lost_id, shelf_id, van_id},
    )
    wait_until(
        "shelf connected to the scanner", CONNECT_TIMEOUT, lambda: lost_id in connected(shelf)
    )
    add_item(a, "AMP-1", "Amp rack", 2)
    for daemon in (lost, shelf, van):
        wait_until(f"AMP-1 on {daemon.name}", CONNECT_TIMEOUT, lambda d=daemon: find(d, "AMP-1"))  # type: ignore[misc]
    assert van.stop() == 0

    not_admin = shelf.cli("--json", "fleet", "revoke", lost_id)
    assert json.loads(not_admin.stdout)["error"]["code"] == "no_ca"
    revoked = cli_json(a, "fleet", "revoke", lost_id)
    assert revoked["station_id"] == lost_id
    wait_until("office dropped the lost scanner", 10, lambda: lost_id not in connected(a))
    wait_until(
        "shelf dropped the lost scanner", CONNECT_TIMEOUT, lambda: lost_id not in connected(shelf)
    )
    add_item(a, "AFTER-1", "Added after the revocation", 1)
    add_item(lost, "STOLEN-1", "Planted by the lost scanner", 1)
    wait_until("AFTER-1 on shelf", CONNECT_TIMEOUT, lambda: find(shelf, "AFTER-1"))
    wait_until("shelf refuses the scanner", CONNECT_TIMEOUT, lambda: refused_with(shelf, "revoked"))

    # The van was offline: it learns the revocation from the office... The scanner is
    # paused meanwhile: the van still has its address, and had the scanner reached the
    # van first, the two would exchange changes until the van heard of the revocation
    # (docs/security.md, "A station that was offline"), STOLEN-1 included.
    assert lost.proc is not None
    os.kill(lost.proc.pid, signal.SIGSTOP)
    try:
        van.start()
        wait_until("van has synced with the office", CONNECT_TIMEOUT, lambda: find(van, "AFTER-1"))
        members = {m["station_id"]: m for m in cli_json(van, "fleet", "members")["members"]}
        assert members[lost_id]["revoked"] is True
    finally:
        os.kill(lost.proc.pid, signal.SIGCONT)
    assert van.stop() == 0
    # ...and refuses the scanner after a restart, even with it as its only peer.
    alone = Daemon(van.data_dir, van.socket_path, "--peer", peer_at(lost), name="van")
    site.stations.append(alone)
    alone.start()
    wait_until("van refuses the scanner", CONNECT_TIMEOUT, lambda: refused_with(alone, "revoked"))
    assert connected(alone) == set()
    assert "revoked" in alone.cli("fleet", "members").stdout

    for daemon in (a, shelf, alone):
        assert find(daemon, "STOLEN-1") is None, daemon.name
    assert find(lost, "AFTER-1") is None
    assert refused_with(lost, "revoked"), "the scanner is told why"


# ---------------------------------------------------------------------- enrollment


def invite(daemon: Daemon, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = cli_json(daemon, "fleet", "invite", *args)
    return data


def test_a_new_station_joins_with_a_token_and_keeps_its_items(site: Stations) -> None:
    """Zero-config stations each found a fleet; ``fleet join`` with a token from the
    first moves the second into it, and both inventories merge."""
    a = site.station("office", own_fleet=True)
    a.start()
    b = site.station("dock", own_fleet=True)
    b.start()
    assert cli_json(a, "fleet", "id")["holds_ca"] is True
    add_item(a, "SPK-1", "Speaker", 4)
    add_item(b, "MIX-1", "Mixer", 2)
    token = invite(a, "--expires", "15m")
    assert token["short"].startswith("INV1") and token["short"].isalnum()
    assert token["short"] == token["short"].upper()

    joined = b.cli("fleet", "join", token["short"])
    assert joined.returncode == 0, joined.stderr
    assert "Joined fleet" in joined.stdout
    assert cli_json(b, "fleet", "id")["fleet_id"] == cli_json(a, "fleet", "id")["fleet_id"]
    assert cli_json(b, "fleet", "id")["holds_ca"] is False
    for daemon in (a, b):
        wait_until(
            f"both items on {daemon.name}",
            CONNECT_TIMEOUT,
            lambda d=daemon: barcodes(d) == {"SPK-1", "MIX-1"},  # type: ignore[misc]
        )
    members = {m["station_id"]: m for m in cli_json(a, "fleet", "members")["members"]}
    assert members[station_id(b)]["name"] == "dock"
    assert members[station_id(b)]["enrolled_at"] is not None
    assert members[station_id(b)]["revoked"] is False

    # The token was single-use: a third station cannot reuse it, and stays as it was.
    c = site.station("van", own_fleet=True)
    c.start()
    before = (c.data_dir / STATION_CERT_FILE).read_bytes(), cli_json(c, "fleet", "id")
    reused = c.cli("--json", "fleet", "join", token["token"])
    assert reused.returncode == 1
    assert json.loads(reused.stdout)["error"]["code"] == "token_used"
    assert (c.data_dir / STATION_CERT_FILE).read_bytes() == before[0]
    assert cli_json(c, "fleet", "id") == before[1]


def test_a_join_that_cannot_be_done_says_why_and_changes_nothing(site: Stations) -> None:
    """A station already in the token's fleet, a CA holder with members of its own, and
    an inviter that is down: each join is refused with its code, exit status 1, and the
    station stays in the fleet it was in."""
    office, dock = office_and_dock(site)
    van = site.station("van", own_fleet=True)
    van.start()

    def refused(daemon: Daemon, token: str) -> str:
        before = cli_json(daemon, "fleet", "id")
        result = daemon.cli("--json", "fleet", "join", token)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert cli_json(daemon, "fleet", "id") == before
        code: str = json.loads(result.stdout)["error"]["code"]
        return code

    assert refused(dock, invite(office)["token"]) == "already_member"
    # The office holds its fleet's CA and the dock depends on it.
    assert refused(office, invite(van)["token"]) == "holds_ca"
    down = invite(van)["token"]
    assert van.stop() == 0
    assert refused(dock, down) == "unreachable"


def test_a_revoked_station_cannot_enroll_again(site: Stations) -> None:
    """Revocation is of the station's key: after moving to another fleet, a revoked
    station presenting a fresh invite of the fleet that revoked it is refused."""
    office, dock = office_and_dock(site)
    cli_json(office, "fleet", "revoke", station_id(dock))
    van = site.station("van", own_fleet=True)
    van.start()
    assert dock.cli("fleet", "join", invite(van)["token"]).returncode == 0
    before = cli_json(dock, "fleet", "id")
    again = dock.cli("--json", "fleet", "join", invite(office)["token"])
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert json.loads(again.stdout)["error"]["code"] == "revoked"
    assert cli_json(dock, "fleet", "id") == before
    dock_entry = next(m for m in members(office) if m["station_id"] == station_id(dock))
    assert dock_entry["revoked"] is True


def office_and_dock(site: Stations) -> tuple[Daemon, Daemon]:
    """Two zero-config stations; the dock joins the office's fleet."""
    office = site.station("office", own_fleet=True)
    office.start()
    dock = site.station("dock", own_fleet=True)
    dock.start()
    assert dock.cli("fleet", "join", invite(office)["token"]).returncode == 0
    wait_until("dock enrolled", CONNECT_TIMEOUT, lambda: len(members(office)) == 2)
    return office, dock


def members(daemon: Daemon) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = cli_json(daemon, "fleet", "members")["members"]
    return found


def test_bad_tokens_are_refused_and_change_nothing(site: Stations) -> None:
    a = site.station("office", own_fleet=True)
    a.start()
    other = site.station("elsewhere", own_fleet=True)
    other.start()
    c = site.station("van", own_fleet=True)
    c.start()
    add_item(c, "VAN-1", "Van kit", 1)
    before = cli_json(c, "fleet", "id"), (c.data_dir / STATION_CERT_FILE).read_bytes()

    def refused(token: str) -> str:
        result = c.cli("--json", "fleet", "join", token)
        assert result.returncode == 1, result.stdout
        error: dict[str, str] = json.loads(result.stdout)["error"]
        assert error["message"], error
        return error["code"]

    # Damaged, expired (both sides check), and for another fleet.
    assert refused("INV1NOTATOKEN") == "bad_token"
    assert refused("hello") == "bad_token"
    short_lived = invite(a, "--expires", "5s")
    expiring = decode_token(short_lived["token"])
    wait_until("the invite expired", 15, lambda: expiring.expires_at < time.time() - 1)
    assert refused(short_lived["token"]) == "token_expired"
    forged = dataclasses.replace(expiring, expires_at=expiring.expires_at + 3600)
    assert refused(forged.encode()) == "token_expired"  # the inviter keeps its own expiry
    # A token of the other fleet pointed at this fleet's station: the pin does not match.
    theirs = invite(other, "--address", peer_at(a))
    assert refused(theirs["token"]) == "wrong_fleet"
    # A secret the inviter never issued.
    good = decode_token(invite(a)["token"])
    wrong_secret = good.encode().replace(good.secret.hex(), "00" * 16)
    assert refused(wrong_secret) == "token_unknown"

    assert (cli_json(c, "fleet", "id"), (c.data_dir / STATION_CERT_FILE).read_bytes()) == before
    assert barcodes(c) == {"VAN-1"}
    # The good token still works after all that.
    assert c.cli("fleet", "join", good.encode()).returncode == 0


async def _post_enrollment(port: int, body: object) -> tuple[int, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession() as http:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with http.post(
            f"https://127.0.0.1:{port}{ENROLL_PATH}", data=payload, ssl=context
        ) as response:
            return response.status, await response.json(content_type=None)


def test_a_tampered_certificate_request_is_refused(site: Stations) -> None:
    """The proof binds the token to one CSR: a CSR altered on the way, or one whose name
    is not its key's id, gets no certificate — and does not use up the token."""
    a = site.station("office", own_fleet=True)
    a.start()
    port = listen_port(a)
    token = decode_token(invite(a)["token"])
    key = Ed25519PrivateKey.generate()
    csr_pem = pki.cert_pem_csr(pki.make_csr(key))

    swapped = pki.cert_pem_csr(pki.make_csr(Ed25519PrivateKey.generate()))
    status, body = asyncio.run(
        _post_enrollment(
            port,
            {
                "invite": token.invite_id,
                "proof": token.proof(csr_pem),
                "csr": swapped.decode(),
                "name": "x",
            },
        )
    )
    assert (status, body["error"]["code"]) == (403, "bad_proof")

    lying = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AAAAAAAAAAAAAAAA")]))
        .sign(key, algorithm=None)
        .public_bytes(serialization.Encoding.PEM)
    )
    status, body = asyncio.run(
        _post_enrollment(
            port,
            {
                "invite": token.invite_id,
                "proof": token.proof(lying),
                "csr": lying.decode(),
                "name": "x",
            },
        )
    )
    assert (status, body["error"]["code"]) == (403, "bad_csr")

    status, body = asyncio.run(
        _post_enrollment(
            port,
            {
                "invite": token.invite_id,
                "proof": token.proof(csr_pem),
                "csr": csr_pem.decode(),
                "name": "ok",
            },
        )
    )
    assert status == 200, body
    issued = pki.load_cert(body["certificate"].encode(), "issued")
    assert pki.station_id_of_certificate(issued) == station_id_of(pki.public_raw(key.public_key()))


def test_join_on_first_start_and_ca_custody(site: Stations) -> None:
    """``invsyncd --join TOKEN`` enrolls on first start (and is a no-op on later
    starts); ``export-ca``/``import-ca`` make another station an admin that can invite."""
    a = site.station("office", own_fleet=True)
    a.start()
    add_item(a, "SPK-1", "Speaker", 4)
    token = invite(a)["token"]
    b = site.station("dock", "--join", token, own_fleet=True)
    b.start()
    wait_until("dock has SPK-1", CONNECT_TIMEOUT, lambda: find(b, "SPK-1"))
    assert b.stop() == 0
    b.start()  # the used token on the command line does not stop a member from starting
    assert cli_json(b, "fleet", "id")["fleet_id"] == cli_json(a, "fleet", "id")["fleet_id"]

    secret = site.base / "passphrase"
    secret.write_text("correct horse battery\n")
    exported = site.base / "fleet-ca.pem"
    result = a.cli("fleet", "export-ca", str(exported), "--passphrase-file", str(secret))
    assert result.returncode == 0, result.stderr
    assert exported.stat().st_mode & 0o777 == 0o600
    assert b"INVSYNC ENCRYPTED FLEET CA KEY" in exported.read_bytes()
    assert b"PRIVATE KEY-----" not in exported.read_bytes()

    short = site.base / "short"
    short.write_text("too short\n")
    refused = a.cli(
        "--json", "fleet", "export-ca", str(site.base / "x.pem"), "--passphrase-file", str(short)
    )
    assert json.loads(refused.stdout)["error"]["code"] == "invalid"
    assert "at least 12 characters" in json.loads(refused.stdout)["error"]["message"]
    assert not (site.base / "x.pem").exists()

    wrong = site.base / "wrong"
    wrong.write_text("not the passphrase\n")
    bad = b.cli("--json", "fleet", "import-ca", str(exported), "--passphrase-file", str(wrong))
    assert json.loads(bad.stdout)["error"]["code"] == "bad_passphrase"
    no_ca = b.cli("--json", "fleet", "invite")
    assert json.loads(no_ca.stdout)["error"]["code"] == "no_ca"

    elsewhere = site.station("elsewhere", own_fleet=True)
    elsewhere.start()
    foreign = site.base / "foreign.pem"
    assert (
        elsewhere.cli(
            "fleet", "export-ca", str(foreign), "--passphrase-file", str(secret)
        ).returncode
        == 0
    )
    mismatch = b.cli("--json", "fleet", "import-ca", str(foreign), "--passphrase-file", str(secret))
    assert json.loads(mismatch.stdout)["error"]["code"] == "wrong_fleet"

    imported = b.cli("fleet", "import-ca", str(exported), "--passphrase-file", str(secret))
    assert imported.returncode == 0, imported.stderr
    assert cli_json(b, "fleet", "id")["holds_ca"] is True
    # The office is lost; the dock enrolls a new station on its own.
    assert a.stop() == 0
    c = site.station("van", own_fleet=True)
    c.start()
    assert c.cli("fleet", "join", invite(b)["token"]).returncode == 0
    wait_until("van has SPK-1 from the dock", CONNECT_TIMEOUT, lambda: find(c, "SPK-1"))


def test_key_files_other_users_could_read_stop_the_daemon(site: Stations) -> None:
    a = site.station("office", own_fleet=True)
    a.start()
    assert a.stop() == 0
    for path, mode, fix in (
        (a.data_dir / "station.key", 0o640, "chmod 600"),
        (a.data_dir / "fleet-ca.key", 0o644, "chmod 600"),
        (a.data_dir, 0o755, "chmod 700"),
    ):
        path.chmod(mode)
        a.launch()
        assert a.proc is not None
        assert a.proc.wait(20) == 78, path
        a.proc = None
        assert f"{fix} {path}" in a.log(), path
        path.chmod(0o700 if path.is_dir() else 0o600)
    a.start()  # fixed: starts again


# ---------------------------------------------------------------------- the wire


class Recorder:
    """A TCP relay on loopback that keeps every byte it forwards: what someone on the
    Wi-Fi could capture of a sync session."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


def test_a_capture_of_a_sync_session_holds_no_item_names_or_barcodes(site: Stations) -> None:
    ca = FleetCA()
    a = site.station("office", ca=ca, admin=True)
    a.start()
    names = {f"WIRE-{i:03d}": f"Confidential Speaker Model {i}" for i in range(50)}
    for barcode, name in names.items():
        add_item(a, barcode, name, 3)
    recorder = Recorder(listen_port(a))
    try:
        b = site.station("dock", "--peer", f"127.0.0.1:{recorder.port}", ca=ca)
        b.start()
        wait_until("all items on dock", CONNECT_TIMEOUT, lambda: len(barcodes(b)) == 50)
        add_item(b, "WIRE-LIVE", "Confidential live edit", 1)
        wait_until("live edit on office", CONNECT_TIMEOUT, lambda: find(a, "WIRE-LIVE"))
    finally:
        recorder.close()
    captured = bytes(recorder.captured)
    assert len(captured) > 5000, "the relay saw the sync session"
    for text in [*names, *names.values(), "WIRE-LIVE", "Confidential"]:
        assert text.encode() not in captured, text


# ---------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def lone_station() -> Iterator[tuple[Daemon, FleetCA, Path]]:
    with Stations(short_dir("fz")) as site:
        daemon = site.station("office", admin=True)
        site.start(daemon)
        add_item(daemon, "KEEP-1", "Kept", 1)
        yield daemon, site.ca, site.base


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
enrollment_bodies = st.one_of(
    st.binary(max_size=300),
    json_values,
    st.fixed_dictionaries(
        {"invite": json_values, "proof": json_values, "csr": json_values, "name": json_values}
    ),
    st.fixed_dictionaries(
        {
            "invite": st.text(max_size=20),
            "proof": st.text(alphabet="0123456789abcdef", max_size=64),
            "csr": st.text(max_size=400).map(
                lambda t: (
                    f"-----BEGIN CERTIFICATE REQUEST-----\n{t}\n-----END CERTIFICATE REQUEST-----\n"
                )
            ),
            "name": st.text(max_size=70),
        }
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(body=b"[" * 15000)
@given(body=enrollment_bodies)
def test_fuzzed_enrollment_requests_get_clean_refusals(
    lone_station: tuple[Daemon, FleetCA, Path], body: object
) -> None:
    daemon, _, _ = lone_station
    status, answer = asyncio.run(_post_enrollment(listen_port(daemon), body))
    assert status == 403, (status, answer)
    assert set(answer["error"]) == {"code", "message"}
    assert daemon.proc is not None and daemon.proc.poll() is None


async def _hello_exchange(port: int, context: ssl.SSLContext, frame: bytes) -> int | None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"wss://127.0.0.1:{port}{SYNC_PATH}", ssl=context, max_msg_size=MAX_FRAME
        ) as ws,
    ):
        theirs = decode_frame(await asyncio.wait_for(ws.receive_bytes(), 20))
        assert isinstance(theirs, Hello)
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await ws.send_bytes(frame)
        while True:
            message = await asyncio.wait_for(ws.receive(), 20)
            if message.type is not aiohttp.WSMsgType.BINARY:
                return ws.close_code


hello_fields = st.fixed_dictionaries(
    {
        "v": json_values,
        "id": json_values,
        "name": json_values,
        "fleet": json_values,
        "shards": json_values,
        "schema": json_values,
        "port": json_values,
    }
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    frame=st.one_of(
        st.binary(max_size=200), hello_fields.map(lambda h: b"\x01" + json.dumps(h).encode())
    )
)
def test_fuzzed_hello_frames_close_only_that_link(
    lone_station: tuple[Daemon, FleetCA, Path], frame: bytes
) -> None:
    daemon, ca, base = lone_station
    context, _ = ca.client(base / "peer")
    code = asyncio.run(_hello_exchange(listen_port(daemon), context, frame))
    assert code in (CLOSE_PROTOCOL, CLOSE_REFUSED), code
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert barcodes(daemon) == {"KEEP-1"}


def test_join_tokens_round_trip_and_garbage_is_a_clean_error() -> None:
    token = JoinToken(
        b"\x01" * 16,
        b"\x02" * 16,
        1_900_000_000,
        (HostPort("198.51.100.7", 7400), HostPort("::1", 7401)),
    )
    short = token.short_form()
    assert short is not None
    assert decode_token(token.encode()) == token
    assert decode_token(short) == token
    assert decode_token(short.lower()) == token
    named = JoinToken(token.ca_pin, token.secret, token.expires_at, (HostPort("office", 7400),))
    assert named.short_form() is None  # the short form carries IP addresses only
    assert decode_token(named.encode()) == named
    # A token pins the CA whose fingerprint starts with its pin, and no other.
    assert token.pins(b"\x01" * 32)
    assert not token.pins(b"\x01" * 15 + b"\x03" * 17)
    cut = JoinToken(b"\x01" * 4, token.secret, token.expires_at, token.addresses)
    assert not cut.pins(b"\x01" * 32)  # a short pin pins nothing

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def garbage(text: str) -> None:
        try:
            token = decode_token(text)
        except TokenError:
            return
        assert decode_token(token.encode()) == token  # whatever decodes is a real token

    garbage()


def office_holding_ca(tmp_path: Path) -> tuple[FleetCA, StationIdentity, FleetMembership]:
    """A station data dir under ``tmp_path/office`` that holds its fleet's CA."""
    ca = FleetCA()
    ca.enroll(tmp_path / "office", holds_ca=True)
    identity = load_or_create(tmp_path / "office")
    return ca, identity, load(tmp_path / "office", identity)


async def test_a_revocation_overwritten_by_another_station_stays_in_force(
    tmp_path: Path,
) -> None:
    """Every enrolled station can write the fleet doc; one that overwrites (or deletes) a
    revocation entry must not un-revoke anyone: the guard keeps what it verified, writes
    the entry back, and remembers it across restarts."""
    ca, identity, membership = office_holding_ca(tmp_path)
    lost = ca.enroll(tmp_path / "lost")
    async with (
        Store.open(tmp_path / "office" / "inventory.db", station_id=identity.station_id) as store,
        FleetGuard(store, membership) as guard,
    ):
        await guard.revoke(lost)
        assert guard.authorize(lost) is not None
        # Another station's copy of the fleet doc, with the entry replaced.
        rogue: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
        rogue.apply_update(store.diff(FLEET_DOC))
        rogue.get(REVOCATIONS_ROOT, type=pycrdt.Map)[lost] = {"at": 0, "sig": "00" * 64}
        await store.apply_remote(
            FLEET_DOC, rogue.get_update(store.state_vector(FLEET_DOC)), "rogue"
        )
        assert guard.authorize(lost) is not None
        await _written_back(store, membership, lost)
        # Deleted outright: the same.
        rogue.apply_update(store.diff(FLEET_DOC, rogue.get_state()))
        del rogue.get(REVOCATIONS_ROOT, type=pycrdt.Map)[lost]
        await store.apply_remote(
            FLEET_DOC, rogue.get_update(store.state_vector(FLEET_DOC)), "rogue"
        )
        assert guard.authorize(lost) is not None
        await _written_back(store, membership, lost)
        # Overwritten once more just before the station stops: the write-back is
        # finished before the store closes.
        rogue.apply_update(store.diff(FLEET_DOC, rogue.get_state()))
        rogue.get(REVOCATIONS_ROOT, type=pycrdt.Map)[lost] = {"at": 1, "sig": "00" * 64}
        await store.apply_remote(
            FLEET_DOC, rogue.get_update(store.state_vector(FLEET_DOC)), "rogue"
        )
    async with Store.open(
        tmp_path / "office" / "inventory.db", station_id=identity.station_id
    ) as store:
        entry = store.fleet_entries(REVOCATIONS_ROOT).get(lost)
        assert entry is not None and pki.verified_revocation(membership.ca_cert, lost, entry)
    # A restart reads what was verified from revoked.json, whatever the doc says: the
    # entry is deleted again while the station is down.
    async with Store.open(
        tmp_path / "office" / "inventory.db", station_id=identity.station_id
    ) as store:
        rogue.apply_update(store.diff(FLEET_DOC, rogue.get_state()))
        del rogue.get(REVOCATIONS_ROOT, type=pycrdt.Map)[lost]
        await store.apply_remote(
            FLEET_DOC, rogue.get_update(store.state_vector(FLEET_DOC)), "rogue"
        )
        assert lost not in store.fleet_entries(REVOCATIONS_ROOT)
        async with FleetGuard(store, membership) as guard:
            assert guard.authorize(lost) is not None


async def _written_back(store: Store, membership: FleetMembership, station: str) -> None:
    """Wait (bounded) until the fleet doc holds a valid revocation of ``station`` again;
    the guard writes it back from a task."""
    for _ in range(100):
        entry = store.fleet_entries(REVOCATIONS_ROOT).get(station)
        if entry is not None and pki.verified_revocation(membership.ca_cert, station, entry):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the revocation was not restored in the fleet doc")


async def test_a_forged_revocation_in_the_fleet_doc_revokes_nobody(tmp_path: Path) -> None:
    """Any enrolled station can write the fleet doc, but only entries signed by the
    fleet CA revoke: a station cannot shut out another by writing an entry for it."""
    ca, identity, membership = office_holding_ca(tmp_path)
    colleague = ca.enroll(tmp_path / "colleague")
    async with (
        Store.open(tmp_path / "office" / "inventory.db", station_id=identity.station_id) as store,
        FleetGuard(store, membership) as guard,
    ):
        assert guard.authorize(colleague) is None
        rogue: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
        rogue.apply_update(store.diff(FLEET_DOC))
        forged = {"at": 0, "sig": "00" * 64}
        rogue.get(REVOCATIONS_ROOT, type=pycrdt.Map)[colleague] = forged
        await store.apply_remote(
            FLEET_DOC, rogue.get_update(store.state_vector(FLEET_DOC)), "rogue"
        )
        assert colleague in store.fleet_entries(REVOCATIONS_ROOT)
        assert guard.authorize(colleague) is None


def test_an_invite_is_single_use_across_restarts_and_bound_to_its_ca(tmp_path: Path) -> None:
    """The inviter records a redeemed token on disk before answering: after a restart it
    still enrolls nobody else (the same station may fetch its answer again), and after
    the station moves to another CA its old tokens enroll nobody."""
    pin, new_pin = b"\x01" * PIN_BYTES, b"\x02" * PIN_BYTES
    book = InviteBook(tmp_path)
    token = book.create(pin, 3600, ())
    spare = book.create(pin, 3600, ())
    request = b"-----BEGIN CERTIFICATE REQUEST----- van -----END CERTIFICATE REQUEST-----"
    book.redeem(token.invite_id, token.proof(request), request, "VAN", pin)

    restarted = InviteBook(tmp_path)  # what the daemon reads after a restart
    restarted.redeem(token.invite_id, token.proof(request), request, "VAN", pin)
    other = b"-----BEGIN CERTIFICATE REQUEST----- truck -----END CERTIFICATE REQUEST-----"
    with pytest.raises(InviteRefused) as used:
        restarted.redeem(token.invite_id, token.proof(other), other, "TRUCK", pin)
    assert used.value.code == "token_used"
    with pytest.raises(InviteRefused) as moved:
        restarted.redeem(spare.invite_id, spare.proof(other), other, "TRUCK", new_pin)
    assert moved.value.code == "token_unknown"
    assert restarted.open_count() == 1  # the spare is still open for this CA


class _PowerCut(Exception):
    """The machine stopped here."""


class _CutAfterRenames:
    """``os`` for daemon.fleet, where the power goes after ``renames`` renames."""

    def __init__(self, renames: int) -> None:
        self.left = renames

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, source: Path, target: Path) -> None:
        if self.left == 0:
            raise _PowerCut
        self.left -= 1
        os.replace(source, target)


#: Renames in a whole switch: two staged certificates written, the CA key retired, the
#: station certificate and the CA certificate put in place.
_SWITCH_RENAMES = 5


@pytest.mark.parametrize("renames", range(_SWITCH_RENAMES + 1))
def test_a_fleet_switch_cut_short_anywhere_ends_in_one_fleet_with_the_ca_key_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames: int
) -> None:
    """Power lost at any step of joining another fleet: the next start finds this station
    wholly in the old fleet (before both new certificates were written) or wholly in the
    new one, never a certificate of one beside the CA of the other, and the old fleet's
    CA key is still on disk, in place or retired under its fleet's name."""
    old_ca, identity, membership = office_holding_ca(tmp_path)
    data_dir = membership.data_dir
    old_key = (data_dir / CA_KEY_FILE).read_bytes()
    new_ca = FleetCA()
    new_cert = pki.issue_station_certificate(new_ca.key, new_ca.cert, identity.key.public_key())
    monkeypatch.setattr(fleet, "os", _CutAfterRenames(renames))
    if renames < _SWITCH_RENAMES:
        with pytest.raises(_PowerCut):
            fleet.install(membership, new_ca.cert, new_cert)
    else:
        fleet.install(membership, new_ca.cert, new_cert)
    monkeypatch.setattr(fleet, "os", os)

    started = fleet.load_or_found(data_dir, identity)  # what the next start reads
    retired = data_dir / f"retired-{old_ca.fleet_id}-{CA_KEY_FILE}"
    if renames < 2:  # the new certificates were not both written yet
        assert started.ca_cert == old_ca.cert
        assert started.ca_key is not None
        assert (data_dir / CA_KEY_FILE).read_bytes() == old_key
        assert not retired.exists()
    else:
        assert (started.ca_cert, started.station_cert) == (new_ca.cert, new_cert)
        assert started.ca_key is None
        assert not (data_dir / CA_KEY_FILE).exists()
        assert retired.read_bytes() == old_key
    assert not list(data_dir.glob("*.new"))
