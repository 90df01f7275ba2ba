"""The fleet's certificates: the fleet CA, station certificates, CSRs and revocations.

Pure functions over the ``cryptography`` package; nothing here touches files or sockets.

- The **fleet CA** is an Ed25519 key with a self-signed certificate. The fleet id is the
  short base32 SHA-256 of the CA public key (as a station id is of its key), so it cannot be
  claimed without the CA.
- A **station certificate** is issued by the CA for one station key: subject CN = station
  id, which must equal the id derived from the certificate's key (a peer cannot present
  another station's id with its own key).
- A **revocation** is a CA signature over (fleet id, station id, time); stations accept a
  revocation entry from the fleet doc only if that signature verifies, so an enrolled
  station cannot cut off others by writing to the doc.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import textwrap
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import station_id_of

CA_VALID_DAYS = 30 * 365
STATION_VALID_DAYS = 10 * 365
#: Certificates start a day early: scanner clocks drift, and a station whose clock is a few
#: hours behind must not see a fresh certificate as "not yet valid".
BACKDATE = dt.timedelta(days=1)
_REVOCATION_CONTEXT = b"invsync revocation v1\0"


class CertificateProblem(Exception):
    """A certificate, CSR or revocation entry is not what the fleet accepts."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fleet_id_of(ca_cert: x509.Certificate) -> str:
    """The fleet id: short base32 SHA-256 of the CA public key."""
    return station_id_of(public_raw(_ed25519(ca_cert.public_key(), "the fleet CA")))


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER bytes (what a join token pins)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _ed25519(key: object, what: str) -> Ed25519PublicKey:
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateProblem(f"{what} does not use an Ed25519 key")
    return key


def _serial() -> int:
    return int.from_bytes(os.urandom(16), "big") >> 1


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (Ed25519 keys do no encryption); the CA also signs certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(name: str = "invsync fleet CA") -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new fleet CA: key and self-signed certificate."""
    key = Ed25519PrivateKey.generate()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "invsync"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, algorithm=None)
    )
    return key, cert


def issue_station_certificate(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    station_key: Ed25519PublicKey,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate for one station key, signed by the fleet CA."""
    station_id = station_id_of(public_raw(station_key))
    start = not_before or _now() - BACKDATE
    end = not_after or _now() + dt.timedelta(days=STATION_VALID_DAYS)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, station_id),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"invsync fleet {fleet_id_of(ca_cert)}"),
        ]
    )
    ca_public = _ed25519(ca_cert.public_key(), "the fleet CA")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(station_key)
        .serial_number(_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca_key, algorithm=None)
    )


def station_id_of_certificate(cert: x509.Certificate) -> str:
    """The station a certificate speaks for; its CN must be the id of its own key."""
    station_id = station_id_of(public_raw(_ed25519(cert.public_key(), "the certificate")))
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != station_id:
        raise CertificateProblem("the certificate's name is not the id of its key")
    return station_id


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries a valid signature of the fleet CA."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def make_csr(station_key: Ed25519PrivateKey) -> x509.CertificateSigningRequest:
    station_id = station_id_of(public_raw(station_key.public_key()))
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, station_id)]))
        .sign(station_key, algorithm=None)
    )


def check_csr(pem: bytes) -> tuple[str, Ed25519PublicKey]:
    """The station id and key a CSR asks a certificate for, if the CSR is sound."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CertificateProblem("the certificate request is not a PEM CSR") from exc
    key = _ed25519(csr.public_key(), "the certificate request")
    if not csr.is_signature_valid:
        raise CertificateProblem("the certificate request's signature does not verify")
    station_id = station_id_of(public_raw(key))
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != station_id:
        raise CertificateProblem("the certificate request names another station than its key")
    return station_id, key


# ------------------------------------------------------------------ revocations


@dataclass(frozen=True, slots=True)
class Revocation:
    """A CA-signed statement that a station is cut off the fleet."""

    station_id: str
    at_ms: int
    signature: bytes

    def to_entry(self) -> dict[str, object]:
        return {"at": self.at_ms, "sig": self.signature.hex()}


def _revocation_message(fleet_id: str, station_id: str, at_ms: int) -> bytes:
    return _REVOCATION_CONTEXT + f"{fleet_id}\0{station_id}\0{at_ms}".encode()


def sign_revocation(
    ca_key: Ed25519PrivateKey, fleet_id: str, station_id: str, at_ms: int
) -> Revocation:
    signature = ca_key.sign(_revocation_message(fleet_id, station_id, at_ms))
    return Revocation(station_id, at_ms, signature)


def verified_revocation(
    ca_cert: x509.Certificate, station_id: str, entry: object
) -> Revocation | None:
    """The revocation in a fleet-doc entry if the CA signed it; ``None`` for anything else
    (a forged or malformed entry is ignored, never trusted)."""
    if not isinstance(entry, dict):
        return None
    at, sig = entry.get("at"), entry.get("sig")
    if not isinstance(at, int | float) or not isinstance(sig, str) or len(sig) != 128:
        return None
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        return None
    ca_public = _ed25519(ca_cert.public_key(), "the fleet CA")
    try:
        ca_public.verify(signature, _revocation_message(fleet_id_of(ca_cert), station_id, int(at)))
    except InvalidSignature:
        return None
    return Revocation(station_id, int(at), signature)


# ------------------------------------------------------------------ PEM helpers


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateProblem(f"{what} is not a PEM certificate") from exc


def key_pem(key: Ed25519PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (files on the station are protected by their
    mode; exports are sealed with a passphrase by :func:`seal_key`)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes, what: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (TypeError, ValueError) as exc:
        raise CertificateProblem(f"{what} cannot be read: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CertificateProblem(f"{what} is not an Ed25519 key")
    return key


def cert_pem_csr(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ CA key export

SEALED_LABEL = "INVSYNC ENCRYPTED FLEET CA KEY"
#: scrypt cost: 64 MiB and about a quarter of a second per guess on a small PC, so a
#: stolen export file resists offline guessing far better than PKCS#8's PBKDF2 defaults.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1
_SEAL_CONTEXT = b"invsync fleet CA key v1"


def _kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def seal_key(key: Ed25519PrivateKey, passphrase: bytes) -> bytes:
    """The key encrypted with a passphrase (scrypt + AES-256-GCM), as a PEM-style block."""
    salt, nonce = os.urandom(16), os.urandom(12)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    sealed = AESGCM(_kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, raw, _SEAL_CONTEXT
    )
    body = json.dumps(
        {
            "v": 1,
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "key": base64.b64encode(sealed).decode(),
        }
    ).encode()
    lines = textwrap.wrap(base64.b64encode(body).decode(), 64)
    return "\n".join(
        [f"-----BEGIN {SEALED_LABEL}-----", *lines, f"-----END {SEALED_LABEL}-----", ""]
    ).encode()


def open_sealed_key(block: bytes, passphrase: bytes) -> Ed25519PrivateKey:
    """The key of a :func:`seal_key` block; :class:`CertificateProblem` if the passphrase
    is wrong or the block damaged."""
    text = block.decode("ascii", "replace")
    inner = "".join(
        line for line in text.splitlines() if line.strip() and not line.startswith("-----")
    )
    try:
        data = json.loads(base64.b64decode(inner, validate=True))
        n, r, p = int(data["n"]), int(data["r"]), int(data["p"])
        if (
            data.get("v") != 1
            or data.get("kdf") != "scrypt"
            or not (2**14 <= n <= 2**20 and 1 <= r <= 16 and 1 <= p <= 4)
        ):
            raise ValueError("unsupported parameters")
        salt, nonce = base64.b64decode(data["salt"]), base64.b64decode(data["nonce"])
        sealed = base64.b64decode(data["key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CertificateProblem("the CA key block is damaged") from exc
    try:
        raw = AESGCM(_kek(passphrase, salt, n, r, p)).decrypt(nonce, sealed, _SEAL_CONTEXT)
    except InvalidTag as exc:
        raise CertificateProblem("wrong passphrase (or a damaged file)") from exc
    return Ed25519PrivateKey.from_private_bytes(raw)
