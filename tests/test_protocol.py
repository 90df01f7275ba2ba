"""The peer sync wire format (``daemon/protocol.py``), without sockets.

Every frame type round-trips through ``encode_frame``/``decode_frame``; random bytes and
damaged valid frames (bits flipped, cut short, extended, spliced) only ever decode to a
frame or raise :class:`FrameError`, the one error a session turns into "close this link
with a reason" (anything else would escape the session and skip the clean close). Size
limits hold in both directions. State vectors come from real pycrdt documents, so the
digest and the "lacking" counts shown by ``invsync peers`` are checked against what Yjs
itself reports.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.protocol import (
    LIMITS,
    MAX_FRAME,
    MAX_PEERS_LISTED,
    PROTOCOL_VERSION,
    Ack,
    Digest,
    Frame,
    FrameError,
    FrameType,
    Hello,
    PeerAddress,
    Peers,
    State,
    Update,
    decode_frame,
    decode_state_vector,
    digest,
    encode_frame,
    missing_from,
    write_varint,
)

# ---------------------------------------------------------------------- strategies

_LOWER = "abcdefghijklmnopqrstuvwxyz"
station_ids = st.text(_LOWER + _LOWER.upper() + "0123456789_-", min_size=1, max_size=64)
doc_names = st.builds(
    str.__add__,
    st.sampled_from(_LOWER + "~"),
    st.text(_LOWER + "0123456789/~-", max_size=63),
)
small_ints = st.integers(min_value=0, max_value=2**31 - 1)
short_text = st.text(max_size=128)

hellos = st.builds(
    Hello,
    version=small_ints,
    station_id=station_ids,
    name=short_text,
    fleet_id=short_text,
    shard_count=small_ints,
    schema_version=small_ints,
    port=small_ints,
)
digests = st.builds(Digest, st.binary(min_size=32, max_size=32))
states = st.builds(
    State,
    st.lists(st.tuples(doc_names, st.binary(max_size=64)), max_size=20).map(tuple),
    reply=st.booleans(),
)
updates = st.builds(Update, doc_names, st.binary(max_size=2048))
acks = st.builds(Ack, doc_names, st.binary(max_size=256))
peer_addresses = st.builds(
    PeerAddress,
    station_ids,
    st.text(min_size=1, max_size=253),
    st.integers(min_value=1, max_value=65535),
)
peer_lists = st.builds(Peers, st.lists(peer_addresses, max_size=20).map(tuple))
frames: st.SearchStrategy[Frame] = st.one_of(hellos, digests, states, updates, acks, peer_lists)


def decodes_or_refuses(data: bytes) -> Frame | None:
    """Decode ``data``; only :class:`FrameError` may be raised. A decoded frame must be
    stable: encoding it again decodes to the same frame."""
    try:
        frame = decode_frame(data)
    except FrameError as exc:
        if not exc.reason:
            raise AssertionError("a FrameError must say why") from exc
        return None
    assert decode_frame(encode_frame(frame)) == frame
    return frame


# ---------------------------------------------------------------------- round trips


@given(frames)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    data = encode_frame(frame)
    assert len(data) <= LIMITS[FrameType(data[0])]
    assert decode_frame(data) == frame


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (Hello(PROTOCOL_VERSION, "S1", "dock-1", "ABCDEFGHIJKLMNOP", 64, 1, 7420), 1),
        (Digest(b"\x00" * 32), 2),
        (State((("items/00", b"\x00"),), reply=True), 3),
        (Update("items/00", b"\x00\x00"), 4),
        (Ack("items/00", b"\x00"), 5),
        (Peers((PeerAddress("S2", "10.0.0.5", 7420),)), 6),
    ],
)
def test_type_byte_is_stable(frame: Frame, kind: int) -> None:
    """The first byte is what another version of invsync reads first: it must not move."""
    assert encode_frame(frame)[0] == kind


def test_hello_carries_non_ascii_station_names() -> None:
    hello = Hello(PROTOCOL_VERSION, "S1", "Lager Süd 🚚", "F" * 16, 64, 1, 7420)
    assert decode_frame(encode_frame(hello)) == hello


def test_peer_exchange_lists_at_most_the_limit() -> None:
    many = tuple(PeerAddress(f"S{i}", "10.0.0.1", 1000 + i) for i in range(MAX_PEERS_LISTED + 5))
    decoded = decode_frame(encode_frame(Peers(many)))
    assert decoded == Peers(many[:MAX_PEERS_LISTED])


# ---------------------------------------------------------------------- damaged input


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_frame_error(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=300)
@given(st.sampled_from(list(FrameType)), st.binary(max_size=256))
def test_random_body_after_each_type_byte(kind: FrameType, body: bytes) -> None:
    decodes_or_refuses(bytes([kind]) + body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.data())
def test_mutated_valid_frames_only_ever_raise_frame_error(
    frame: Frame, data: st.DataObject
) -> None:
    raw = bytearray(encode_frame(frame))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mutation == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif mutation == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    decodes_or_refuses(bytes(raw))


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 3000,  # nesting deeper than the JSON decoder's recursion limit
        b"[" * 3000 + b"]" * 3000,
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b"\xff\xfe",
        b"{}",
        b"null",
        b"NaN",
    ],
)
@pytest.mark.parametrize("kind", [FrameType.HELLO, FrameType.PEERS])
def test_hostile_json_is_a_frame_error(kind: FrameType, body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(bytes([kind]) + body)


def test_integer_too_long_to_parse_in_peers_is_a_frame_error() -> None:
    """Python refuses to parse integers of more than 4300 digits with ValueError."""
    body = b'[["S1","10.0.0.5",' + b"7" * 5000 + b"]]"
    with pytest.raises(FrameError):
        decode_frame(bytes([FrameType.PEERS]) + body)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty frame"),
        (b"\x00", "unknown frame type"),
        (b"\x07", "unknown frame type"),
        (bytes([FrameType.DIGEST]) + b"\x00" * 31, "truncated"),
        (bytes([FrameType.STATE, 2, 0]), "unknown STATE flags"),
        (bytes([FrameType.STATE, 0]) + write_varint(4097), "too many documents"),
        (bytes([FrameType.STATE, 0, 1, 3]) + b"BAD\x00", "bad document name"),
        (bytes([FrameType.STATE, 0, 0, 0]), "trailing bytes"),
        (bytes([FrameType.UPDATE]) + b"\x80" * 10, "varint too long"),
        (bytes([FrameType.UPDATE, 65]) + b"a" * 65, "longer than 64"),
        (bytes([FrameType.ACK, 2]) + b"\xc3\x28", "not UTF-8"),
        (bytes([FrameType.HELLO]) + b'{"v":1}', "small whole number"),
        (bytes([FrameType.HELLO]) + b'{"v":1,"shards":1,"schema":1,"port":1}', "must be text"),
        (bytes([FrameType.HELLO]) + b"[]", "JSON object"),
        (bytes([FrameType.HELLO]) + b"{", "bad JSON"),
        (bytes([FrameType.PEERS]) + b'[["S1","h",0]]', "PEERS entry"),
        (bytes([FrameType.PEERS]) + b'[["S1","h",true]]', "PEERS entry"),
    ],
)
def test_malformed_frames_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(data)


def test_hello_must_carry_every_field_as_the_right_type() -> None:
    good = {"v": 1, "id": "S1", "name": "n", "fleet": "F", "shards": 64, "schema": 1, "port": 1}
    for key, bad in [("v", True), ("port", -1), ("shards", 2**31), ("id", "bad id"), ("name", 5)]:
        raw = bytes([FrameType.HELLO]) + json.dumps({**good, key: bad}).encode()
        with pytest.raises(FrameError):
            decode_frame(raw)
    for key in good:
        partial = {k: v for k, v in good.items() if k != key}
        with pytest.raises(FrameError):
            decode_frame(bytes([FrameType.HELLO]) + json.dumps(partial).encode())
    assert decode_frame(bytes([FrameType.HELLO]) + json.dumps(good).encode())


# ---------------------------------------------------------------------- size limits


@pytest.mark.parametrize("kind", list(FrameType))
def test_a_frame_one_byte_over_its_limit_is_refused(kind: FrameType) -> None:
    data = bytes([kind]) + b"\x00" * LIMITS[kind]
    with pytest.raises(FrameError, match="over its limit"):
        decode_frame(data)


def test_largest_limit_is_the_transport_limit() -> None:
    assert max(LIMITS.values()) == MAX_FRAME == LIMITS[FrameType.UPDATE]


@pytest.mark.parametrize(
    "frame",
    [
        Update("items/00", b"\x00" * LIMITS[FrameType.UPDATE]),
        Ack("items/00", b"\x00" * LIMITS[FrameType.ACK]),
        State((("items/00", b"\x00" * LIMITS[FrameType.STATE]),)),
        Peers(tuple(PeerAddress("S" * 64, "h" * 253, 65535) for _ in range(MAX_PEERS_LISTED))),
    ],
)
def test_encoder_refuses_what_the_peer_would_refuse(frame: Frame) -> None:
    """A station never sends a frame its peer must refuse; it fails here instead."""
    with pytest.raises(FrameError, match="over its limit"):
        encode_frame(frame)


def test_the_largest_hello_fits() -> None:
    """Every text field at its longest, in characters JSON escapes to 12 bytes each."""
    wide = "\U0001f69a" * 64
    hello = Hello(2**31 - 1, "S" * 64, wide * 2, wide * 2, 2**31 - 1, 2**31 - 1, 2**31 - 1)
    assert decode_frame(encode_frame(hello)) == hello


def test_update_exactly_at_the_limit_is_accepted() -> None:
    header = b"\x08items/00"
    room = LIMITS[FrameType.UPDATE] - 1 - len(header)
    frame = Update("items/00", b"\x01" * room)
    data = encode_frame(frame)
    assert len(data) == LIMITS[FrameType.UPDATE]
    assert decode_frame(data) == frame


# ---------------------------------------------------------------------- state vectors

#: Operations of one replica: (Yjs client id, number of map writes it makes).
client_ops = st.dictionaries(
    st.integers(min_value=1, max_value=2**53 - 1), st.integers(1, 12), min_size=1, max_size=4
)


def replica_with(ops: dict[int, int]) -> pycrdt.Doc:  # type: ignore[type-arg]
    """A document holding ``n`` map writes by each client id, merged like peers would."""
    merged: pycrdt.Doc = pycrdt.Doc()  # type: ignore[type-arg]
    for client, count in ops.items():
        author: pycrdt.Doc = pycrdt.Doc(client_id=client)  # type: ignore[type-arg]
        shelf = author.get("shelf", type=pycrdt.Map)
        for i in range(count):
            shelf[f"{client}-{i}"] = i
        merged.apply_update(author.get_update())
    return merged


@settings(max_examples=60, deadline=None)
@given(client_ops)
def test_decode_state_vector_reads_real_pycrdt_vectors(ops: dict[int, int]) -> None:
    doc = replica_with(ops)
    assert decode_state_vector(doc.get_state()) == ops


def test_state_vector_of_an_empty_doc_is_empty() -> None:
    assert decode_state_vector(pycrdt.Doc().get_state()) == {}


def test_text_edits_count_one_clock_tick_per_character() -> None:
    doc: pycrdt.Doc = pycrdt.Doc(client_id=7)  # type: ignore[type-arg]
    notes = doc.get("notes", type=pycrdt.Text)
    notes += "black, 3-pin"
    assert decode_state_vector(doc.get_state()) == {7: 12}


@pytest.mark.parametrize(
    "data", [b"", b"\x01", b"\x01\x05", b"\x00\x00", b"\xff" * 12, write_varint(2_000_000)]
)
def test_malformed_state_vectors_are_frame_errors(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_state_vector(data)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_random_state_vectors_only_ever_raise_frame_error(data: bytes) -> None:
    try:
        vector = decode_state_vector(data)
    except FrameError:
        return
    assert all(client >= 0 and clock >= 0 for client, clock in vector.items())


@settings(max_examples=60, deadline=None)
@given(client_ops, st.data())
def test_missing_from_counts_the_writes_the_other_replica_lacks(
    ops: dict[int, int], data: st.DataObject
) -> None:
    """A replica that has seen only the first k writes of each client lacks exactly the
    rest; after applying our diff it lacks nothing."""
    seen = {client: data.draw(st.integers(0, count)) for client, count in ops.items()}
    ours = replica_with(ops)
    theirs = replica_with({c: k for c, k in seen.items() if k})
    our_vector = decode_state_vector(ours.get_state())
    their_vector = decode_state_vector(theirs.get_state())
    expected = sum(ops[c] - seen[c] for c in ops)
    assert missing_from(our_vector, their_vector) == expected
    assert missing_from(their_vector, our_vector) == 0
    theirs.apply_update(ours.get_update(theirs.get_state()))
    assert missing_from(our_vector, decode_state_vector(theirs.get_state())) == 0


def test_missing_from_ignores_what_only_the_other_side_has() -> None:
    assert missing_from({1: 5, 2: 3}, {1: 2, 9: 100}) == 3 + 3
    assert missing_from({}, {1: 5}) == 0
    assert missing_from({1: 5}, {1: 8}) == 0


# ---------------------------------------------------------------------- digest


def encode_vector(pairs: list[tuple[int, int]]) -> bytes:
    return write_varint(len(pairs)) + b"".join(write_varint(c) + write_varint(k) for c, k in pairs)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(doc_names, client_ops, min_size=1, max_size=4),
    st.randoms(use_true_random=False),
)
def test_digest_ignores_document_and_client_order(
    docs: dict[str, dict[int, int]], rnd: random.Random
) -> None:
    vectors = [(name, replica_with(ops).get_state()) for name, ops in docs.items()]
    shuffled = []
    for name, ops in docs.items():
        pairs = list(ops.items())
        rnd.shuffle(pairs)
        shuffled.append((name, encode_vector(pairs)))
    rnd.shuffle(shuffled)
    assert digest(vectors) == digest(shuffled)
    assert digest(iter(vectors)) == digest(vectors)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(doc_names, client_ops, max_size=4), st.lists(doc_names, max_size=5))
def test_digest_ignores_empty_documents(
    docs: dict[str, dict[int, int]], empty_names: list[str]
) -> None:
    """A station that has opened an empty shard agrees with one that never touched it."""
    vectors = [(name, replica_with(ops).get_state()) for name, ops in docs.items()]
    empties = [(name, b"\x00") for name in empty_names if name not in docs]
    assert digest(vectors + empties) == digest(vectors)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(doc_names, client_ops, min_size=1, max_size=4), st.data())
def test_digest_changes_when_any_document_gains_a_write(
    docs: dict[str, dict[int, int]], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(docs)))
    client = data.draw(st.sampled_from(sorted(docs[name])))
    before = [(n, encode_vector(sorted(ops.items()))) for n, ops in docs.items()]
    grown = dict(docs[name])
    grown[client] += 1
    after = [
        (n, encode_vector(sorted((grown if n == name else ops).items()))) for n, ops in docs.items()
    ]
    assert digest(before) != digest(after)


def test_digest_of_nothing_is_the_empty_hash() -> None:
    """Two stations with no data agree, whatever empty documents each holds."""
    empty = hashlib.sha256().digest()
    assert digest([]) == empty
    assert digest([("items/00", b"\x00"), ("fleet", b"\x00")]) == empty


def test_digest_depends_on_which_document_holds_the_writes() -> None:
    vector = encode_vector([(1, 3)])
    assert digest([("items/00", vector)]) != digest([("items/01", vector)])


def test_digest_fits_a_digest_frame() -> None:
    value = digest([("items/00", encode_vector([(1, 3)]))])
    frame = Digest(value)
    assert len(encode_frame(frame)) == LIMITS[FrameType.DIGEST]
    assert decode_frame(encode_frame(frame)) == frame


def test_permutations_of_three_documents_agree() -> None:
    vectors = [(f"items/0{i}", encode_vector([(i + 1, i + 2)])) for i in range(3)]
    assert len({digest(list(p)) for p in itertools.permutations(vectors)}) == 1
