"""The station's identity: an Ed25519 key created on first start, and the id derived from it.

Station id = the first 16 characters of the base32 SHA-256 of the raw public key, so an id
cannot be claimed without the key (the fleet security layer checks it against the peer's
certificate). The key file is created 0600 and never rewritten.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "station.key"


def station_id_of(public_raw: bytes) -> str:
    digest = hashlib.sha256(public_raw).digest()
    return base64.b32encode(digest).decode("ascii")[:16]


@dataclass(frozen=True, slots=True)
class StationIdentity:
    station_id: str
    key: Ed25519PrivateKey


def load_or_create(data_dir: Path) -> StationIdentity:
    """Read the station key, creating it (0600) on first start."""
    path = data_dir / KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    raw = loaded.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return StationIdentity(station_id_of(raw), loaded)
