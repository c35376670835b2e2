"""The vhost-user codec: round trips, every malformed case, and fuzzing (only ProtocolError)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.transport.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_RAW_PAYLOAD,
    VERSION,
    VRING_FD_NOFD,
    BackendRequest,
    ConfigSpace,
    FrontendRequest,
    InflightDesc,
    LogDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
    decode,
    decode_payload,
    encode,
    has_explicit_reply,
    vring_fd_payload,
)

R = FrontendRequest
REGION = MemoryRegionDesc(0x1000_0000, 0x20_0000, 0x7F12_3456_0000, 0x1000)

#: One well-formed request (payload, fds) per kind of payload.
REQUESTS: list[Message] = [
    Message(R.GET_FEATURES),
    Message(R.SET_FEATURES, 1 << 32 | 1 << 30),
    Message(R.SET_OWNER, flags=VERSION | FLAG_NEED_REPLY),
    Message(R.SET_MEM_TABLE, MemoryTable((REGION, REGION)), fds=(10, 11)),
    Message(R.SET_MEM_TABLE, MemoryTable(())),
    Message(R.SET_LOG_BASE, LogDesc(4096, 0), fds=(7,)),
    Message(R.SET_VRING_NUM, VringState(1, 256)),
    Message(R.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)),
    Message(R.GET_VRING_BASE, VringState(3, 0)),
    Message(R.SET_VRING_KICK, vring_fd_payload(2, True), fds=(9,)),
    Message(R.SET_VRING_CALL, vring_fd_payload(2, False)),
    Message(R.SET_VRING_ERR, vring_fd_payload(255, True), fds=(4,)),
    Message(R.SET_BACKEND_REQ_FD, fds=(5,)),
    Message(R.IOTLB_MSG, bytes(range(32))),
    Message(R.GET_CONFIG, ConfigSpace(0, 0, bytes(60))),
    Message(R.SET_CONFIG, ConfigSpace(32, 1, b"\x01")),
    Message(R.CREATE_CRYPTO_SESSION, b"session"),
    Message(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 2, 128)),
    Message(R.SET_INFLIGHT_FD, InflightDesc(4096, 0, 2, 128), fds=(3,)),
    Message(R.ADD_MEM_REG, SingleMemoryRegion(REGION), fds=(6,)),
    Message(R.REM_MEM_REG, SingleMemoryRegion(REGION)),
    Message(R.REM_MEM_REG, SingleMemoryRegion(REGION), fds=(6,)),
    Message(R.SET_STATUS, 0xF),
    Message(R.VRING_KICK, VringState(0, 0)),
]

REPLIES: list[Message] = [
    Message(R.GET_FEATURES, 0x1_7000_0000, VERSION | FLAG_REPLY),
    Message(R.GET_VRING_BASE, VringState(0, 0x8000_8000), VERSION | FLAG_REPLY),
    Message(R.GET_CONFIG, ConfigSpace(0, 0, b""), VERSION | FLAG_REPLY),
    Message(R.SET_MEM_TABLE, 0, VERSION | FLAG_REPLY),
    Message(R.GET_INFLIGHT_FD, InflightDesc(4096, 0, 1, 256), VERSION | FLAG_REPLY, (8,)),
    Message(R.POSTCOPY_ADVISE, None, VERSION | FLAG_REPLY, (8,)),
]


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("message", REQUESTS, ids=repr)
def test_request_round_trip(message: Message) -> None:
    data = encode(message)
    assert len(data) == HEADER_SIZE + struct.unpack_from("<I", data, 8)[0]
    assert decode(data, message.fds) == message


@pytest.mark.parametrize("message", REPLIES, ids=repr)
def test_reply_round_trip(message: Message) -> None:
    assert decode(encode(message), message.fds, replies=True) == message


def test_backend_channel_round_trip() -> None:
    for message in (
        Message(BackendRequest.CONFIG_CHANGE_MSG, flags=VERSION | FLAG_NEED_REPLY),
        Message(BackendRequest.VRING_CALL, VringState(1, 0)),
        Message(BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(1, 4096, 0), fds=(3,)),
    ):
        assert decode(encode(message), message.fds, requests=BackendRequest) == message
    ack = Message(BackendRequest.CONFIG_CHANGE_MSG, 0, VERSION | FLAG_REPLY)
    assert decode(encode(ack), requests=BackendRequest, replies=True) == ack


def test_wire_layout_matches_the_spec() -> None:
    """Field order of vhost-user.rst "A vring address description" and the region table."""
    addr = encode(Message(R.SET_VRING_ADDR, VringAddr(1, 2, 3, 4, 5, 6)))
    assert addr == header(9, 1, 40) + struct.pack("<IIQQQQ", 1, 2, 3, 4, 5, 6)
    table = encode(Message(R.SET_MEM_TABLE, MemoryTable((REGION,)), fds=(3,)))
    assert table == header(5, 1, 40) + struct.pack("<II", 1, 0) + struct.pack(
        "<QQQQ", REGION.guest_phys_addr, REGION.memory_size, REGION.userspace_addr, 0x1000
    )
    single = encode(Message(R.ADD_MEM_REG, SingleMemoryRegion(REGION), fds=(3,)))
    assert single[HEADER_SIZE : HEADER_SIZE + 8] == bytes(8)  # padding first
    config = encode(Message(R.GET_CONFIG, ConfigSpace(8, 0, b"ab")))
    assert config == header(24, 1, 14) + struct.pack("<III", 8, 2, 0) + b"ab"


def test_inflight_accepts_spec_and_c_struct_sizes() -> None:
    body = struct.pack("<QQHH", 4096, 0, 2, 128)
    for size_body in (body, body + bytes(4)):
        data = header(R.GET_INFLIGHT_FD, VERSION, len(size_body)) + size_body
        assert decode(data).payload == InflightDesc(4096, 0, 2, 128)


def test_enums_and_helpers() -> None:
    assert ProtocolFeature.MQ == 0 and ProtocolFeature.REPLY_ACK == 3
    assert ProtocolFeature.BACKEND_REQ == 5 and ProtocolFeature.CONFIG == 9
    assert ProtocolFeature.RESET_DEVICE == 13 and ProtocolFeature.INBAND_NOTIFICATIONS == 14
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 15 and ProtocolFeature.STATUS == 16
    assert ProtocolFeature.STATUS.mask == 1 << 16
    assert R.GET_MAX_MEM_SLOTS == 36 and R.ADD_MEM_REG == 37 and R.GET_STATUS == 40
    assert has_explicit_reply(R.GET_VRING_BASE) and not has_explicit_reply(R.SET_VRING_NUM)
    assert vring_fd_payload(3, False) == 3 | VRING_FD_NOFD
    with pytest.raises(ValueError):
        vring_fd_payload(256, True)


def test_parser_byte_at_a_time_and_fds_with_first_byte() -> None:
    parser = MessageParser()
    stream = b"".join(encode(m) for m in REQUESTS)
    got: list[Message] = []
    pos = 0
    fd_queue = [m.fds for m in REQUESTS]
    while pos < len(stream):
        n = parser.wanted()
        assert n > 0
        chunk = stream[pos : pos + 1]
        # A socket layer delivers a message's fds with its first byte.
        fds = fd_queue.pop(0) if parser.buffered == 0 else ()
        got += parser.feed(chunk, fds)
        pos += 1
    assert got == REQUESTS
    assert not parser.in_message


def test_parser_returns_several_messages_from_one_chunk() -> None:
    parser = MessageParser()
    data = encode(Message(R.GET_FEATURES)) + encode(Message(R.SET_OWNER))
    assert parser.feed(data) == [Message(R.GET_FEATURES), Message(R.SET_OWNER)]


def test_good_messages_before_a_bad_one_are_returned_first() -> None:
    parser = MessageParser()
    data = encode(Message(R.GET_FEATURES)) + header(999, VERSION, 0)
    assert parser.feed(data) == [Message(R.GET_FEATURES)]
    with pytest.raises(ProtocolError, match="unknown FrontendRequest 999"):
        parser.feed(b"")
    assert parser.broken


# -- malformed input ---------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, tuple[int, ...], str]] = [
    ("unknown request", header(999, VERSION, 0), (), "unknown FrontendRequest 999"),
    ("request 0", header(0, VERSION, 0), (), "unknown"),
    ("version 0", header(R.GET_FEATURES, 0, 0), (), "version 0"),
    ("version 2", header(R.GET_FEATURES, 2, 0), (), "version 2"),
    ("unknown flag", header(R.GET_FEATURES, VERSION | 0x10, 0), (), "unknown flag"),
    ("reply to back end", header(R.GET_FEATURES, VERSION | FLAG_REPLY, 8) + bytes(8), (), "reply"),
    ("u64 too short", header(R.SET_FEATURES, VERSION, 4) + bytes(4), (), "4 bytes, expected 8"),
    ("u64 too long", header(R.SET_FEATURES, VERSION, 9) + bytes(9), (), "expected 8"),
    ("empty with payload", header(R.GET_FEATURES, VERSION, 8) + bytes(8), (), "expected 0"),
    ("vring state short", header(R.SET_VRING_NUM, VERSION, 4) + bytes(4), (), "expected 8"),
    ("vring addr short", header(R.SET_VRING_ADDR, VERSION, 32) + bytes(32), (), "expected 40"),
    ("huge size", header(R.SET_OWNER, VERSION, 0xFFFF_FFFF), (), "expected 0"),
    (
        "table not 8+32n",
        header(R.SET_MEM_TABLE, VERSION, 20) + bytes(20),
        (),
        "not 8 \\+ 32",
    ),
    (
        "too many regions",
        header(R.SET_MEM_TABLE, VERSION, 8 + 32 * 9) + struct.pack("<II", 9, 0) + bytes(32 * 9),
        tuple(range(9)),
        "9 file descriptors|9 regions",
    ),
    (
        "region count disagrees",
        header(R.SET_MEM_TABLE, VERSION, 40) + struct.pack("<II", 3, 0) + bytes(32),
        (),
        "3 regions needs 104",
    ),
    (
        "table fds mismatch",
        header(R.SET_MEM_TABLE, VERSION, 40) + struct.pack("<II", 1, 0) + bytes(32),
        (),
        "0 file descriptors, expected 1",
    ),
    (
        "config size field lies",
        header(R.GET_CONFIG, VERSION, 14) + struct.pack("<III", 0, 4, 0) + b"ab",
        (),
        "says 4 bytes but carries 2",
    ),
    (
        "config too large",
        header(R.GET_CONFIG, VERSION, 12 + MAX_CONFIG_SIZE + 1),
        (),
        "expected 12 to",
    ),
    (
        "config field over max",
        header(R.GET_CONFIG, VERSION, 12) + struct.pack("<III", 0, 1000, 0),
        (),
        "at most 256",
    ),
    ("raw too large", header(R.CREATE_CRYPTO_SESSION, VERSION, MAX_RAW_PAYLOAD + 1), (), "at most"),
    ("iotlb wrong size", header(R.IOTLB_MSG, VERSION, 26) + bytes(26), (), "expected 32"),
    (
        "kick without fd",
        header(R.SET_VRING_KICK, VERSION, 8) + struct.pack("<Q", 0),
        (),
        "0 file descriptors, expected 1",
    ),
    (
        "nofd kick with fd",
        header(R.SET_VRING_KICK, VERSION, 8) + struct.pack("<Q", VRING_FD_NOFD),
        (5,),
        "1 file descriptors, expected 0",
    ),
    ("fd on plain request", header(R.SET_OWNER, VERSION, 0), (5,), "expected 0"),
    (
        "add region without fd",
        header(R.ADD_MEM_REG, VERSION, 40) + bytes(40),
        (),
        "expected 1",
    ),
    ("too many fds", header(R.SET_OWNER, VERSION, 0), tuple(range(MAX_FDS + 1)), "at most 8"),
]


@pytest.mark.parametrize(
    ("data", "fds", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_is_protocol_error(data: bytes, fds: tuple[int, ...], match: str) -> None:
    parser = MessageParser()
    with pytest.raises(ProtocolError, match=match) as info:
        parser.feed(data, fds)
    assert sorted(info.value.fds) == sorted(fds)  # handed back for closing
    assert parser.broken
    with pytest.raises(ProtocolError, match="out of step"):
        parser.feed(encode(Message(R.GET_FEATURES)))


def test_header_errors_come_before_the_payload_arrives() -> None:
    """A bogus size is refused from the header alone: no waiting for 4 GiB."""
    parser = MessageParser()
    with pytest.raises(ProtocolError):
        parser.feed(header(R.SET_VRING_NUM, VERSION, 1 << 31))


def test_front_end_parser_rejects_requests_and_reply_asking_reply() -> None:
    with pytest.raises(ProtocolError, match="request where a reply"):
        MessageParser(replies=True).feed(header(R.GET_FEATURES, VERSION, 0))
    with pytest.raises(ProtocolError, match="asking for a reply"):
        MessageParser(replies=True).feed(
            header(R.GET_FEATURES, VERSION | FLAG_REPLY | FLAG_NEED_REPLY, 8) + bytes(8)
        )
    with pytest.raises(ProtocolError, match="reply to GET_FEATURES"):
        MessageParser(replies=True).feed(header(R.GET_FEATURES, VERSION | FLAG_REPLY, 4) + bytes(4))
    with pytest.raises(ProtocolError, match="unknown BackendRequest"):
        MessageParser(BackendRequest).feed(header(R.GET_FEATURES + 50, VERSION, 0))


def test_decode_wants_exactly_one_message() -> None:
    one = encode(Message(R.GET_FEATURES))
    with pytest.raises(ProtocolError, match="exactly one"):
        decode(one + one)
    with pytest.raises(ProtocolError, match="exactly one"):
        decode(one[:5])
    with pytest.raises(ProtocolError):
        decode_payload(R.SET_VRING_NUM, b"1234")


def test_encode_refuses_what_must_never_be_sent() -> None:
    with pytest.raises(ValueError):
        encode(Message(R.SET_VRING_NUM, 5))  # int where a VringState goes
    with pytest.raises(ValueError):
        encode(Message(R.SET_FEATURES, 1 << 64))
    with pytest.raises(ValueError):
        encode(Message(R.SET_VRING_NUM, VringState(0, 1 << 32)))
    with pytest.raises(ValueError):
        encode(Message(R.GET_FEATURES, flags=0))
    with pytest.raises(ValueError):
        encode(Message(R.SET_MEM_TABLE, MemoryTable((REGION,) * 9), fds=tuple(range(9))))
    with pytest.raises(ValueError):
        encode(Message(R.SET_MEM_TABLE, MemoryTable((REGION,)), fds=()))
    with pytest.raises(ValueError):
        encode(Message(R.SET_VRING_KICK, vring_fd_payload(0, True)))
    with pytest.raises(ValueError):
        encode(Message(R.GET_CONFIG, ConfigSpace(0, 0, bytes(MAX_CONFIG_SIZE + 1))))


# -- fuzzing -----------------------------------------------------------------------------


def _feed_all(parser: MessageParser, data: bytes, cuts: list[int], fds: list[int]) -> list[Message]:
    out: list[Message] = []
    pos = 0
    for i, cut in enumerate([*sorted(c % (len(data) + 1) for c in cuts), len(data)]):
        out += parser.feed(data[pos:cut], fds if i == 0 else ())
        pos = max(pos, cut)
    return out


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    nfds=st.integers(min_value=0, max_value=10),
    replies=st.booleans(),
    backend=st.booleans(),
)
def test_random_bytes_only_raise_protocol_error(
    data: bytes, cuts: list[int], nfds: int, replies: bool, backend: bool
) -> None:
    parser = MessageParser(BackendRequest if backend else FrontendRequest, replies=replies)
    with contextlib.suppress(ProtocolError):  # anything else fails the test
        _feed_all(parser, data, cuts, list(range(100, 100 + nfds)))


@settings(max_examples=400, deadline=None)
@given(
    request=st.sampled_from(list(FrontendRequest)),
    flags=st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY, VERSION | FLAG_REPLY, 0, 0x13]),
    body=st.binary(max_size=300),
    nfds=st.integers(min_value=0, max_value=3),
)
def test_plausible_headers_decode_or_raise_protocol_error(
    request: FrontendRequest, flags: int, body: bytes, nfds: int
) -> None:
    """Valid request codes with random sizes and bodies: decoded messages round-trip."""
    data = header(request, flags, len(body)) + body
    fds = list(range(100, 100 + nfds))
    replies = bool(flags & FLAG_REPLY)
    try:
        message = decode(data, fds, replies=replies)
    except ProtocolError:
        return
    again = decode(encode(message), message.fds, replies=replies)
    assert again == message
