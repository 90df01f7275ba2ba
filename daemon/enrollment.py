"""Enrollment: a new station trades a join token for a certificate of the fleet.

The joining station (:func:`enroll`):
1. fetches the fleet CA certificate from one of the token's addresses (``GET
   /invsync/enroll/ca``; this first TLS connection is not verified) and checks it against
   the token's pin — a token of another fleet, or anyone in between, stops here;
2. opens a second TLS connection verified against that CA and posts a CSR for its own key
   with an HMAC of the CSR keyed by the token's secret (``POST /invsync/enroll``), so the
   secret never crosses the wire and a CSR altered on the way does not verify;
3. receives its certificate, issued by the CA.

The inviting station (:class:`EnrollmentDesk`, routes on the peer port) checks the CSR,
the proof, and that the invite is unused and unexpired; it marks the invite used before
answering, records the enrollment in the fleet doc, and never enrolls a revoked station.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from . import pki
from .config import HostPort
from .guard import FleetGuard
from .identity import StationIdentity
from .invites import PIN_BYTES, InviteBook, InviteRefused, JoinToken

_LOGGER = logging.getLogger(__name__)

CA_PATH = "/invsync/enroll/ca"
ENROLL_PATH = "/invsync/enroll"
ENROLL_TIMEOUT = 10.0
MAX_REQUEST = 16 * 1024


class EnrollmentFailed(Exception):
    """Joining did not work; the station is unchanged. ``code`` names why for scripts."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Enrolled:
    ca_cert: x509.Certificate
    station_cert: x509.Certificate
    via: HostPort


# ------------------------------------------------------------------ the inviter's side


class EnrollmentDesk:
    """Serves the enrollment endpoints on the peer port of a station."""

    def __init__(self, guard: FleetGuard, invites: InviteBook) -> None:
        self.guard = guard
        self.invites = invites
        self._lock = asyncio.Lock()

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", CA_PATH, self.ca_certificate), ("POST", ENROLL_PATH, self.enroll)]

    async def ca_certificate(self, request: web.Request) -> web.Response:
        return web.Response(
            body=pki.cert_pem(self.guard.membership.ca_cert), content_type="application/x-pem-file"
        )

    async def enroll(self, request: web.Request) -> web.Response:
        remote = request.remote or "unknown"
        try:
            certificate = await self._enroll(request)
        except InviteRefused as exc:
            _LOGGER.warning("enrollment from %s refused: %s", remote, exc)
            return _refusal(403, exc.code, str(exc))
        return web.json_response(
            {
                "fleet_id": self.guard.fleet_id,
                "certificate": pki.cert_pem(certificate).decode("ascii"),
                "ca": pki.cert_pem(self.guard.membership.ca_cert).decode("ascii"),
            }
        )

    async def _enroll(self, request: web.Request) -> x509.Certificate:
        membership = self.guard.membership
        if membership.ca_key is None:
            raise InviteRefused("no_ca", "this station does not hold the fleet CA")
        if request.content_length is None or request.content_length > MAX_REQUEST:
            raise InviteRefused("bad_request", "the request is too large (or of unknown size)")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InviteRefused("bad_request", "the request is not JSON") from exc
        if not isinstance(body, dict):
            raise InviteRefused("bad_request", "the request is not a JSON object")
        invite_id, proof, csr_text, name = (
            body.get("invite"),
            body.get("proof"),
            body.get("csr"),
            body.get("name", ""),
        )
        if not all(isinstance(v, str) for v in (invite_id, proof, csr_text, name)):
            raise InviteRefused("bad_request", "invite, proof, csr and name must be strings")
        assert isinstance(csr_text, str) and isinstance(invite_id, str)
        assert isinstance(proof, str) and isinstance(name, str)
        csr_pem = csr_text.encode("utf-8", "replace")
        try:
            station_id, station_key = pki.check_csr(csr_pem)
        except pki.CertificateProblem as exc:
            raise InviteRefused("bad_csr", str(exc)) from exc
        if station_id in self.guard.revoked:
            raise InviteRefused("revoked", "this station key was revoked; it cannot rejoin")
        async with self._lock:  # one redemption at a time: single use is checked and saved
            try:
                self.invites.redeem(
                    invite_id, proof, csr_pem, station_id, membership.ca_fingerprint[:PIN_BYTES]
                )
            except OSError as exc:
                raise InviteRefused("unavailable", f"cannot record the invite: {exc}") from exc
        certificate = pki.issue_station_certificate(
            membership.ca_key, membership.ca_cert, station_key
        )
        shown = " ".join(name.split())[:64]
        await self.guard.record_enrollment(station_id, shown)
        _LOGGER.info("enrolled station %s (%r)", station_id, shown)
        return certificate


def _refusal(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# ------------------------------------------------------------------ the joining side


def _unverified_context() -> ssl.SSLContext:
    # Only used to fetch the CA certificate, which is then checked against the token's pin.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pinned_context(ca_cert: x509.Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pki.cert_pem(ca_cert).decode("ascii"))
    return context


def _url(address: HostPort, path: str) -> str:
    return f"https://{address}{path}"


async def enroll(token: JoinToken, identity: StationIdentity, name: str) -> Enrolled:
    """Enroll through the first of the token's addresses that answers."""
    csr_pem = pki.cert_pem_csr(pki.make_csr(identity.key))
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=ENROLL_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for address in token.addresses:
            try:
                return await _enroll_via(session, address, token, csr_pem, name)
            except EnrollmentFailed as exc:
                if exc.code not in ("unreachable",):
                    raise
                failures.append(f"{address}: {exc}")
    raise EnrollmentFailed("unreachable", "no inviting station answered: " + "; ".join(failures))


async def _enroll_via(
    session: aiohttp.ClientSession, address: HostPort, token: JoinToken, csr_pem: bytes, name: str
) -> Enrolled:
    try:
        async with session.get(_url(address, CA_PATH), ssl=_unverified_context()) as response:
            if response.status != 200:
                raise EnrollmentFailed(
                    "unreachable", f"HTTP {response.status} for the fleet certificate"
                )
            ca_pem = await response.content.read(MAX_REQUEST)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise EnrollmentFailed("unreachable", f"cannot connect ({exc})") from exc
    try:
        ca_cert = pki.load_cert(ca_pem, "the fleet certificate")
    except pki.CertificateProblem as exc:
        raise EnrollmentFailed("wrong_fleet", str(exc)) from exc
    if not token.pins(pki.fingerprint(ca_cert)):
        raise EnrollmentFailed(
            "wrong_fleet",
            f"the station at {address} belongs to another fleet than this token "
            "(its CA certificate does not match the token)",
        )
    body = {
        "invite": token.invite_id,
        "proof": token.proof(csr_pem),
        "csr": csr_pem.decode("ascii"),
        "name": name,
    }
    try:
        async with session.post(
            _url(address, ENROLL_PATH), json=body, ssl=_pinned_context(ca_cert)
        ) as response:
            data = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise EnrollmentFailed("unreachable", f"enrollment request failed ({exc})") from exc
    if status != 200:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise EnrollmentFailed(
            str(error.get("code", "refused")), str(error.get("message", f"HTTP {status}"))
        )
    try:
        station_cert = pki.load_cert(str(data["certificate"]).encode(), "the new certificate")
    except (KeyError, TypeError, pki.CertificateProblem) as exc:
        raise EnrollmentFailed(
            "bad_answer", f"the inviting station answered nonsense: {exc}"
        ) from exc
    if not pki.issued_by(station_cert, ca_cert):
        raise EnrollmentFailed("bad_answer", "the certificate received was not issued by the CA")
    return Enrolled(ca_cert, station_cert, address)
