"""Join tokens and the invites they redeem.

A **join token** carries what a new station needs to enroll safely: a pin of the fleet CA
(the first 16 bytes of the SHA-256 of its certificate), a one-time 16-byte secret, when it
expires, and the inviter's addresses. It has two spellings of the same content:

- the token: ``invsync-join:1:<pin hex>:<secret hex>:<expires>:<host:port>,...`` — readable,
  and it may carry host names;
- the short form: ``INV1`` + base32 of a compact binary (IP addresses only) — upper-case
  letters and digits only, which QR codes encode in their dense alphanumeric mode.

The inviting station keeps its open invites in ``invites.json`` (0600, replaced atomically)
so a token stays single-use across restarts: an invite is marked used before the
certificate is handed out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, HostPort, parse_host_port
from .fleet import write_file

INVITES_FILE = "invites.json"
PIN_BYTES = 16
SECRET_BYTES = 16
LONG_PREFIX = "invsync-join:1:"
SHORT_PREFIX = "INV1"
MAX_TOKEN_CHARS = 2048
#: Used invites are remembered this long after they expire, then forgotten.
KEEP_USED_SECONDS = 7 * 86400


class TokenError(Exception):
    """A join token that cannot be read; the message says what is wrong with it."""


def invite_proof(secret: bytes, csr_pem: bytes) -> str:
    """The joining station's proof, and what the inviter checks it against: an HMAC keyed
    by the token's secret over exactly this certificate request."""
    return hmac.new(secret, csr_pem, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class JoinToken:
    ca_pin: bytes
    secret: bytes
    expires_at: int
    addresses: tuple[HostPort, ...]

    def pins(self, ca_fingerprint: bytes) -> bool:
        """Whether this token was made for the fleet CA with this fingerprint (the pin
        is its first ``PIN_BYTES``; a decoded token always has all of them)."""
        return len(self.ca_pin) == PIN_BYTES and hmac.compare_digest(
            ca_fingerprint[:PIN_BYTES], self.ca_pin
        )

    @property
    def invite_id(self) -> str:
        """Names the invite on the inviting station without revealing the secret."""
        return hashlib.sha256(b"invsync invite\0" + self.secret).hexdigest()[:16]

    def proof(self, csr_pem: bytes) -> str:
        """Proves possession of the secret for exactly this certificate request."""
        return invite_proof(self.secret, csr_pem)

    def encode(self) -> str:
        hosts = ",".join(str(a) for a in self.addresses)
        return f"{LONG_PREFIX}{self.ca_pin.hex()}:{self.secret.hex()}:{self.expires_at}:{hosts}"

    def short_form(self) -> str | None:
        """The QR-friendly spelling; host names (not IPs) are left out of it, so there is
        none when every address is a host name."""
        parts = [self.ca_pin, self.secret, struct.pack(">I", self.expires_at)]
        for address in self.addresses:
            try:
                ip = ipaddress.ip_address(address.host)
            except ValueError:
                continue
            parts.append(bytes([ip.version]) + ip.packed + struct.pack(">H", address.port))
        if len(parts) == 3:
            return None
        packed = base64.b32encode(b"".join(parts)).decode("ascii").rstrip("=")
        return SHORT_PREFIX + packed


def decode_token(text: str) -> JoinToken:
    """Read either spelling of a join token."""
    text = "".join(text.split())
    if not text:
        raise TokenError("the token is empty")
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError("the token is too long")
    if text.startswith(LONG_PREFIX):
        return _decode_long(text[len(LONG_PREFIX) :])
    if text.upper().startswith(SHORT_PREFIX):
        return _decode_short(text[len(SHORT_PREFIX) :].upper())
    raise TokenError("this is not an invsync join token (it starts with invsync-join: or INV1)")


def _decode_long(body: str) -> JoinToken:
    fields = body.split(":", 3)
    if len(fields) != 4:
        raise TokenError("the token is incomplete (was it cut off?)")
    pin_hex, secret_hex, expires, hosts = fields
    try:
        pin, secret = bytes.fromhex(pin_hex), bytes.fromhex(secret_hex)
        expires_at = int(expires)
    except ValueError as exc:
        raise TokenError("the token is damaged (not hex where it should be)") from exc
    addresses = []
    for host in filter(None, hosts.split(",")):
        try:
            addresses.append(parse_host_port("token address", host))
        except ConfigError as exc:
            raise TokenError(f"the token's address {host!r} is not HOST:PORT") from exc
    return _checked(pin, secret, expires_at, addresses)


def _decode_short(body: str) -> JoinToken:
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise TokenError("the short token is damaged (not base32)") from exc
    head = PIN_BYTES + SECRET_BYTES + 4
    if len(raw) < head:
        raise TokenError("the short token is incomplete (was it cut off?)")
    pin, secret = raw[:PIN_BYTES], raw[PIN_BYTES : PIN_BYTES + SECRET_BYTES]
    (expires_at,) = struct.unpack(">I", raw[PIN_BYTES + SECRET_BYTES : head])
    addresses, rest = [], raw[head:]
    while rest:
        size = {4: 4, 6: 16}.get(rest[0])
        if size is None or len(rest) < 1 + size + 2:
            raise TokenError("the short token is damaged (bad address)")
        ip = ipaddress.ip_address(rest[1 : 1 + size])
        (port,) = struct.unpack(">H", rest[1 + size : 3 + size])
        addresses.append(HostPort(str(ip), port))
        rest = rest[3 + size :]
    return _checked(pin, secret, expires_at, addresses)


def _checked(pin: bytes, secret: bytes, expires_at: int, addresses: list[HostPort]) -> JoinToken:
    if len(pin) != PIN_BYTES or len(secret) != SECRET_BYTES:
        raise TokenError("the token is damaged (wrong length)")
    if not addresses:
        raise TokenError("the token names no station to join through")
    return JoinToken(pin, secret, expires_at, tuple(addresses))


# ------------------------------------------------------------------ the inviter's side


class InviteRefused(Exception):
    """An enrollment attempt that does not redeem a valid invite."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(slots=True)
class Invite:
    invite_id: str
    secret: bytes
    expires_at: int
    created_at: int
    #: The CA the invite was made for: after the station founds or joins another fleet,
    #: old invites must not enroll anyone with the new CA.
    ca_pin: bytes = b""
    used_at: int | None = None
    used_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.invite_id,
            "ca_pin": self.ca_pin.hex(),
            "secret": self.secret.hex(),
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "used_at": self.used_at,
            "used_by": self.used_by,
        }


class InviteBook:
    """The open and used invites of a station holding the CA, kept in ``invites.json``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / INVITES_FILE
        self._invites: dict[str, Invite] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            for row in data["invites"]:
                invite = Invite(
                    row["id"],
                    bytes.fromhex(row["secret"]),
                    int(row["expires_at"]),
                    int(row["created_at"]),
                    bytes.fromhex(row.get("ca_pin", "")),
                    row.get("used_at"),
                    row.get("used_by"),
                )
                self._invites[invite.invite_id] = invite
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refusing every enrollment is safe; reusing a token is not.
            raise OSError(f"{self.path} cannot be read ({exc}); move it away to reset") from exc

    def _save(self) -> None:
        now = int(time.time())
        keep = [
            i.to_json() for i in self._invites.values() if i.expires_at + KEEP_USED_SECONDS > now
        ]
        write_file(self.path, json.dumps({"invites": keep}, indent=1).encode())

    def create(
        self, ca_pin: bytes, expires_in: float, addresses: tuple[HostPort, ...]
    ) -> JoinToken:
        now = int(time.time())
        token = JoinToken(ca_pin, os.urandom(SECRET_BYTES), now + int(expires_in), addresses)
        self._invites[token.invite_id] = Invite(
            token.invite_id, token.secret, token.expires_at, now, ca_pin
        )
        self._save()
        return token

    def redeem(
        self, invite_id: str, proof: str, csr_pem: bytes, station_id: str, ca_pin: bytes
    ) -> None:
        """Check the proof and mark the invite used (durably) — or refuse.

        The same station may redeem its invite again (its first answer may have been lost
        on the way): it gets a certificate for the same key, nobody else gets one."""
        invite = self._invites.get(invite_id) if isinstance(invite_id, str) else None
        if invite is None or not hmac.compare_digest(invite.ca_pin, ca_pin):
            raise InviteRefused("token_unknown", "this token was not issued by this station")
        expected = invite_proof(invite.secret, csr_pem)
        if not isinstance(proof, str) or not hmac.compare_digest(expected, proof):
            raise InviteRefused(
                "bad_proof", "the request was not made with this token (or was altered)"
            )
        if invite.used_at is not None:
            if invite.used_by == station_id:
                return
            raise InviteRefused("token_used", "this token was already used; ask for a new one")
        if time.time() > invite.expires_at:
            raise InviteRefused("token_expired", "this token has expired; ask for a new one")
        invite.used_at, invite.used_by = int(time.time()), station_id
        try:
            self._save()
        except OSError:
            invite.used_at = invite.used_by = None
            raise

    def open_count(self) -> int:
        now = time.time()
        return sum(1 for i in self._invites.values() if i.used_at is None and i.expires_at > now)
