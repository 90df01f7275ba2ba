"""The peer sync wire format: binary frames, each with a type byte and a hard size limit.

Pure functions only (``encode_frame(frame) -> bytes``, ``decode_frame(data) -> frame``),
so every frame can be fuzzed without sockets. A frame that does not decode, or is larger
than its type allows, raises :class:`FrameError`; the session then closes that one
connection with the reason.

Frames, in the order a session uses them:

``HELLO``  JSON: protocol version, station id and name, fleet id, shard count, schema
           version, listening port. Any mismatch closes the connection with a reason.
``DIGEST`` SHA-256 over all (document, state vector) pairs: equal digests mean nothing
           to exchange, so periodic anti-entropy costs 33 bytes when stations agree.
``STATE``  the state vector of every document (flag: "send me yours too").
``UPDATE`` one document's update (a diff the other side lacks, or a live change).
``ACK``    after an UPDATE is durably stored: that document's new state vector, so the
           sender knows exactly what the peer has.
``PEERS``  addresses of other stations this one knows (peer exchange).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

PROTOCOL_VERSION = 1
MAX_DOC_NAME = 64
_DOC_NAME_RE = re.compile(r"^[a-z~][a-z0-9/~-]{0,63}$")
_STATION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FrameType(IntEnum):
    HELLO = 1
    DIGEST = 2
    STATE = 3
    UPDATE = 4
    ACK = 5
    PEERS = 6


#: Largest encoded frame of each type, type byte included.
LIMITS: Mapping[FrameType, int] = {
    FrameType.HELLO: 4 * 1024,
    FrameType.DIGEST: 1 + 32,
    FrameType.STATE: 1024 * 1024,
    FrameType.UPDATE: 64 * 1024 * 1024,
    FrameType.ACK: 64 * 1024,
    FrameType.PEERS: 64 * 1024,
}
MAX_FRAME = max(LIMITS.values())
MAX_PEERS_LISTED = 256


class FrameError(Exception):
    """A frame that must close the connection; ``reason`` is logged by both sides."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    station_id: str
    name: str
    fleet_id: str
    shard_count: int
    schema_version: int
    port: int


@dataclass(frozen=True, slots=True)
class Digest:
    value: bytes


@dataclass(frozen=True, slots=True)
class State:
    vectors: tuple[tuple[str, bytes], ...]
    reply: bool = False


@dataclass(frozen=True, slots=True)
class Update:
    doc: str
    update: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    doc: str
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class PeerAddress:
    station_id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Peers:
    peers: tuple[PeerAddress, ...]


Frame = Hello | Digest | State | Update | Ack | Peers


# ---------------------------------------------------------------------- varints


def write_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def varint(self) -> int:
        value = 0
        shift = 0
        while True:
            if self.pos >= len(self.data):
                raise FrameError("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise FrameError("varint too long")

    def take(self, length: int) -> bytes:
        if length > len(self.data) - self.pos:
            raise FrameError("truncated field")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk

    def blob(self) -> bytes:
        return self.take(self.varint())

    def text(self, limit: int) -> str:
        length = self.varint()
        if length > limit:
            raise FrameError(f"text field longer than {limit} bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("text field is not UTF-8") from None

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.data):
            raise FrameError("trailing bytes after frame")


def _blob(data: bytes) -> bytes:
    return write_varint(len(data)) + data


def _text(value: str) -> bytes:
    return _blob(value.encode("utf-8"))


def _check_doc(name: str) -> str:
    if not _DOC_NAME_RE.match(name):
        raise FrameError(f"bad document name {name[:40]!r}")
    return name


# ---------------------------------------------------------------------- encode / decode


def encode_frame(frame: Frame) -> bytes:
    """Serialize a frame; raises ``FrameError`` if it would exceed its type's limit."""
    if isinstance(frame, Hello):
        kind = FrameType.HELLO
        body = json.dumps(
            {
                "v": frame.version,
                "id": frame.station_id,
                "name": frame.name,
                "fleet": frame.fleet_id,
                "shards": frame.shard_count,
                "schema": frame.schema_version,
                "port": frame.port,
            },
            separators=(",", ":"),
        ).encode()
    elif isinstance(frame, Digest):
        kind, body = FrameType.DIGEST, frame.value
    elif isinstance(frame, State):
        kind = FrameType.STATE
        parts = [bytes([1 if frame.reply else 0]), write_varint(len(frame.vectors))]
        for name, vector in frame.vectors:
            parts += [_text(_check_doc(name)), _blob(vector)]
        body = b"".join(parts)
    elif isinstance(frame, Update):
        kind, body = FrameType.UPDATE, _text(_check_doc(frame.doc)) + frame.update
    elif isinstance(frame, Ack):
        kind, body = FrameType.ACK, _text(_check_doc(frame.doc)) + frame.state_vector
    else:
        kind = FrameType.PEERS
        body = json.dumps(
            [[p.station_id, p.host, p.port] for p in frame.peers[:MAX_PEERS_LISTED]],
            separators=(",", ":"),
        ).encode()
    data = bytes([kind]) + body
    if len(data) > LIMITS[kind]:
        raise FrameError(f"{kind.name} frame of {len(data)} bytes is over its limit")
    return data


def decode_frame(data: bytes) -> Frame:
    """Parse one frame; anything malformed or oversized raises ``FrameError``."""
    if not data:
        raise FrameError("empty frame")
    try:
        kind = FrameType(data[0])
    except ValueError:
        raise FrameError(f"unknown frame type {data[0]}") from None
    if len(data) > LIMITS[kind]:
        raise FrameError(f"{kind.name} frame of {len(data)} bytes is over its limit")
    reader = _Reader(data, 1)
    if kind is FrameType.HELLO:
        return _decode_hello(data[1:])
    if kind is FrameType.DIGEST:
        value = reader.take(32)
        reader.end()
        return Digest(value)
    if kind is FrameType.STATE:
        flags = reader.take(1)[0]
        if flags > 1:
            raise FrameError("unknown STATE flags")
        count = reader.varint()
        if count > 4096:
            raise FrameError("too many documents in STATE")
        vectors = []
        for _ in range(count):
            name = _check_doc(reader.text(MAX_DOC_NAME))
            vectors.append((name, reader.blob()))
        reader.end()
        return State(tuple(vectors), reply=bool(flags))
    if kind is FrameType.UPDATE:
        name = _check_doc(reader.text(MAX_DOC_NAME))
        return Update(name, reader.rest())
    if kind is FrameType.ACK:
        name = _check_doc(reader.text(MAX_DOC_NAME))
        return Ack(name, reader.rest())
    return _decode_peers(data[1:])


def _json(body: bytes) -> Any:
    # ValueError covers bad UTF-8, bad JSON and integers too long to parse (over 4300
    # digits); RecursionError is what deeply nested arrays raise. Both come from the peer.
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"bad JSON: {str(exc)[:80]}") from None


def _decode_hello(body: bytes) -> Hello:
    data = _json(body)
    if not isinstance(data, dict):
        raise FrameError("HELLO must be a JSON object")
    ints = {key: data.get(key) for key in ("v", "shards", "schema", "port")}
    for key, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise FrameError(f"HELLO field {key} must be a small whole number")
    texts = {key: data.get(key) for key in ("id", "name", "fleet")}
    for key, value in texts.items():
        if not isinstance(value, str) or len(value) > 128:
            raise FrameError(f"HELLO field {key} must be text")
    station = str(texts["id"])
    if not _STATION_RE.match(station):
        raise FrameError("HELLO carries a malformed station id")
    return Hello(
        version=int(data["v"]),
        station_id=station,
        name=str(texts["name"]),
        fleet_id=str(texts["fleet"]),
        shard_count=int(data["shards"]),
        schema_version=int(data["schema"]),
        port=int(data["port"]),
    )


def _decode_peers(body: bytes) -> Peers:
    data = _json(body)
    if not isinstance(data, list) or len(data) > MAX_PEERS_LISTED:
        raise FrameError("PEERS must be a short JSON list")
    peers = []
    for entry in data:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not _STATION_RE.match(entry[0])
            or not isinstance(entry[1], str)
            or not 0 < len(entry[1]) <= 253
            or isinstance(entry[2], bool)
            or not isinstance(entry[2], int)
            or not 0 < entry[2] < 65536
        ):
            raise FrameError("PEERS entry must be [station id, host, port]")
        peers.append(PeerAddress(entry[0], entry[1], entry[2]))
    return Peers(tuple(peers))


# ---------------------------------------------------------------------- state vectors


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector: a count, then (client id, clock) varint pairs."""
    reader = _Reader(data)
    count = reader.varint()
    if count > 1_000_000:
        raise FrameError("state vector too long")
    vector: dict[int, int] = {}
    for _ in range(count):
        client = reader.varint()
        vector[client] = reader.varint()
    reader.end()
    return vector


def missing_from(ours: Mapping[int, int], theirs: Mapping[int, int]) -> int:
    """How many of our operations (Yjs clock ticks) the other side has not seen."""
    return sum(max(0, clock - theirs.get(client, 0)) for client, clock in ours.items())


def digest(vectors: Iterable[tuple[str, bytes]]) -> bytes:
    """One hash of every document's state vector: equal means nothing to exchange.

    Vectors are decoded and sorted first (two replicas may encode one vector in different
    client orders), and empty documents are left out (empty equals absent).
    """
    hasher = hashlib.sha256()
    for name, vector in sorted(vectors):
        pairs = sorted(decode_state_vector(vector).items())
        if not pairs:
            continue
        hasher.update(_text(name))
        for client, clock in pairs:
            hasher.update(write_varint(client) + write_varint(clock))
    return hasher.digest()
