"""Fuzz target: the vhost-user message codec (transport/vhost_user/protocol.py).

Three ways in, chosen by the first input byte:

* a raw byte stream, cut into fuzz-chosen chunks with fuzz-chosen numbers of
  file descriptors, fed to a :class:`MessageParser` of either direction
  (front-end requests, their replies, back-end requests, their replies);
* a message built field by field (any request, flags, payload structure
  with values in or out of range, fd count) and passed to ``encode``;
* ``decode_payload``, ``fds_from_ancillary`` and ``vring_fd_payload`` on
  raw values.

Properties: the parser raises :class:`ProtocolError` and nothing else, stays
broken after one, and hands back every fd it was given exactly once (in a
message, in the error, or by ``take_fds``); every parsed message encodes
again and decodes to itself; ``encode`` raises ValueError and nothing else,
and whatever it encodes parses back to the same message.  The fds here are
plain numbers: the codec never touches them.
"""

from __future__ import annotations

import struct

# Run as a script: its directory is on sys.path.
from _common import Bytes, main

TARGET = "fuzz_vhost_user_codec"
#: Fake fd numbers: the codec only carries them.
FD_BASE = 10_000
HEADER = struct.Struct("<III")


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global proto
    from pyvirtio.transport.vhost_user import protocol as proto


def _directions() -> list[tuple[type, bool]]:
    return [
        (proto.FrontendRequest, False),
        (proto.FrontendRequest, True),
        (proto.BackendRequest, False),
        (proto.BackendRequest, True),
    ]


def _check_message(msg: object, requests: type, replies: bool) -> None:
    """A parsed message re-encodes and parses back to itself."""
    assert isinstance(msg, proto.Message)
    assert isinstance(msg.request, requests)
    assert msg.is_reply == replies
    assert len(msg.fds) <= proto.MAX_FDS
    data = proto.encode(msg)  # a message the parser accepted is one we can send
    again = proto.decode(data, msg.fds, requests=requests, replies=replies)
    assert again == msg, f"{msg!r} came back as {again!r}"
    assert proto.encode(again) == data
    repr(msg)


def _stream(src: Bytes) -> None:
    """Chunks of raw bytes and fds into one parser; fds are conserved."""
    requests, replies = src.pick(_directions())
    parser = proto.MessageParser(requests, replies=replies)
    given: list[int] = []
    returned: list[int] = []
    next_fd = FD_BASE
    # Sometimes a valid header up front, so the fuzzer reaches payload checks at once.
    prefix = b""
    if src.flag():
        code = src.take(1) % 50
        flags = src.pick((1, 1 | 4, 1 | 8, src.take(4)))
        prefix = HEADER.pack(code, flags, src.take(1) % 80)
    stream = prefix + src.data[src.pos :]
    pos = 0
    chunks = 0
    while pos < len(stream) and chunks < 64:
        chunks += 1
        # Chunk sizes from the stream itself: 0 means "what the parser wants".
        if len(stream) - pos >= 2:
            size_byte = stream[pos]
            nfds = stream[pos + 1] % 11 if stream[pos + 1] & 0x80 else 0
            pos += 2
        else:
            size_byte, nfds = 0, 0
        want = parser.wanted()
        assert want > 0
        size = want if size_byte == 0 else size_byte
        chunk = stream[pos : pos + size]
        pos += size
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        given += fds
        was_broken = parser.broken
        try:
            messages = parser.feed(chunk, fds)
        except proto.ProtocolError as exc:
            returned += exc.fds
            assert parser.broken
            continue
        assert not was_broken, "a broken parser accepted more input"
        for msg in messages:
            returned += msg.fds
            _check_message(msg, requests, replies)
    returned += parser.take_fds()
    assert sorted(returned) == given, f"fds given {given}, handed back {sorted(returned)}"


def _value(src: Bytes, bits: int) -> int:
    """A field value: mostly in range, sometimes just beyond, or negative."""
    sel = src.take(1)
    if sel < 200:
        return src.take((bits + 7) // 8)
    if sel < 240:
        return (1 << bits) + src.take(1)
    return -1 - src.take(1)


def _region(src: Bytes) -> object:
    return proto.MemoryRegionDesc(
        _value(src, 64), _value(src, 64), _value(src, 64), _value(src, 64)
    )


def _payload(src: Bytes) -> object:
    """A payload of a kind the fuzzer picks (maybe not the one the request takes)."""
    kind = src.take(1) % 13
    match kind:
        case 0:
            return None
        case 1:
            return _value(src, 64)
        case 2:
            return proto.VringState(_value(src, 32), _value(src, 32))
        case 3:
            return proto.VringAddr(
                _value(src, 32),
                _value(src, 32),
                _value(src, 64),
                _value(src, 64),
                _value(src, 64),
                _value(src, 64),
            )
        case 4:
            return proto.MemoryTable(tuple(_region(src) for _ in range(src.take(1) % 11)))
        case 5:
            return proto.SingleMemoryRegion(_region(src))
        case 6:
            size = src.take(2) % (proto.MAX_CONFIG_SIZE + 8)
            return proto.ConfigSpace(_value(src, 32), _value(src, 32), src.raw(size))
        case 7:
            return proto.LogDesc(_value(src, 64), _value(src, 64))
        case 8:
            return proto.VringArea(_value(src, 64), _value(src, 64), _value(src, 64))
        case 9:
            return proto.InflightDesc(
                _value(src, 64), _value(src, 64), _value(src, 16), _value(src, 16)
            )
        case 10:
            return src.raw(src.take(2) % 80)
        case 11:
            return src.raw(src.take(2) % (proto.MAX_RAW_PAYLOAD + 16))
        case _:
            return "not a payload"


def _encode(src: Bytes) -> None:
    """A message built from fields: encode refuses with ValueError or round-trips."""
    requests, replies = src.pick(_directions())
    request = src.pick(list(requests))
    flags = src.pick((1, 1 | 4, 1 | 8, 1 | 4 | 8, src.take(4)))
    if replies:
        flags |= proto.FLAG_REPLY
    payload = _payload(src)
    fds = tuple(range(FD_BASE, FD_BASE + src.take(1) % 10))
    msg = proto.Message(request, payload, flags, fds)  # type: ignore[arg-type]
    repr(msg)
    try:
        data = proto.encode(msg)
    except ValueError:
        return
    parser = proto.MessageParser(requests, replies=msg.is_reply)
    try:
        out = parser.feed(data, list(fds))
    except proto.ProtocolError as exc:
        # The one thing encode allows that a receiver refuses: a reply that
        # also asks for a reply, or a request where the parser wants replies.
        assert msg.is_reply and msg.need_reply, f"encoded {msg!r} does not parse: {exc}"
        return
    assert out == [msg], f"{msg!r} came back as {out!r}"
    assert proto.has_explicit_reply(request) in (True, False)


def _helpers(src: Bytes) -> None:
    """decode_payload, fds_from_ancillary and vring_fd_payload on raw values."""
    requests, replies = src.pick(_directions())
    request = src.pick(list(requests))
    data = src.raw(src.take(2) % 300)
    try:
        payload = proto.decode_payload(request, data, is_reply=replies)
    except proto.ProtocolError:
        pass
    else:
        repr(payload)
    ancdata = [
        (src.pick((1, 0, src.take(4))), src.pick((1, 2, src.take(4))), src.raw(src.take(1) % 40))
        for _ in range(src.take(1) % 4)
    ]
    fds = proto.fds_from_ancillary(ancdata)
    assert all(0 <= fd < 1 << 32 for fd in fds)
    index = _value(src, 8)
    try:
        value = proto.vring_fd_payload(index, src.flag())
    except ValueError:
        assert not 0 <= index <= proto.VRING_FD_INDEX_MASK
    else:
        assert value & proto.VRING_FD_INDEX_MASK == index


def run_one(data: bytes) -> None:
    src = Bytes(data)
    mode = src.take(1) % 4
    if mode <= 1:
        _stream(src)
    elif mode == 2:
        _encode(src)
    else:
        _helpers(src)


if __name__ == "__main__":
    main(TARGET, "Fuzz the vhost-user message codec.", run_one, _load, max_len=2048)
