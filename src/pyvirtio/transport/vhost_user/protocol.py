"""The vhost-user wire format as a pure codec (QEMU docs/interop/vhost-user.rst).

Nothing here touches a socket.  :func:`encode` turns a :class:`Message` into
the bytes to send (the caller passes its ``fds`` as SCM_RIGHTS ancillary data
with them); :class:`MessageParser` is a sans-IO incremental decoder: feed it
bytes and the file descriptors that came with them, get whole messages back.
The payload structures live in :mod:`.payloads` and are re-exported here.

A message is a 12-byte header (vhost-user.rst "Header": ``request`` u32,
``flags`` u32, ``size`` u32, native byte order, i.e. little-endian on every
host pyvirtio runs on) followed by ``size`` payload bytes whose layout the
request fixes ("Payload").  Everything a peer sends is validated before it is
used: an unknown request, a flag bit outside the version / REPLY / NEED_REPLY
bits, a payload size the request does not allow, more regions or file
descriptors than the protocol allows, or an inconsistent count inside the
payload raises :class:`ProtocolError` and nothing else, so a back end or a
front end can log it and drop the connection.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pyvirtio.constants import FeatureBit

# The layouts' structs and field check are shared with the payload
# module (one package, one definition of each layout).
from pyvirtio.transport.vhost_user.payloads import (
    _CONFIG_HEAD,
    _REGION,
    _TABLE_HEAD,
    _U64,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    ConfigSpace,
    InflightDesc,
    LogDesc,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolError,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
    _check_fields,
)

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_RAW_PAYLOAD",
    "VERSION",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VRING_FD_INDEX_MASK",
    "VRING_FD_NOFD",
    "BackendRequest",
    "ConfigSpace",
    "FrontendRequest",
    "InflightDesc",
    "LogDesc",
    "MemoryRegionDesc",
    "MemoryTable",
    "Message",
    "MessageParser",
    "Payload",
    "PayloadKind",
    "ProtocolError",
    "ProtocolFeature",
    "SingleMemoryRegion",
    "VringAddr",
    "VringArea",
    "VringState",
    "decode",
    "decode_payload",
    "encode",
    "fds_from_ancillary",
    "has_explicit_reply",
    "vring_fd_payload",
]

_T = TypeVar("_T")

# -- header ---------------------------------------------------------------------

#: Bytes of the header (vhost-user.rst "Header").
HEADER_SIZE = 12
#: The protocol version, in the two low flag bits.
VERSION = 0x1
_VERSION_MASK = 0x3
#: Flag bit 2: the message is a reply.
FLAG_REPLY = 0x4
#: Flag bit 3: the sender wants a u64 acknowledgement (vhost-user.rst "REPLY_ACK").
FLAG_NEED_REPLY = 0x8
_KNOWN_FLAGS = _VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS

_HEADER = struct.Struct("<III")

#: Cap on payloads of requests this codec carries as opaque bytes.
MAX_RAW_PAYLOAD = 4096

#: Feature bit a back end sets in GET_FEATURES when it speaks protocol features
#: (vhost-user.rst "Communication").
VHOST_USER_F_PROTOCOL_FEATURES = 30

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 the vring index, bit 8 "no fd".
VRING_FD_INDEX_MASK = 0xFF
VRING_FD_NOFD = 0x100


class ProtocolFeature(FeatureBit):
    """Protocol feature bit numbers (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class FrontendRequest(enum.IntEnum):
    """Requests a front end sends on the main socket ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests a back end sends on the back-end channel ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


Request = FrontendRequest | BackendRequest


#: A decoded payload: None (empty), an int (u64), a structure, or opaque bytes
#: for requests this codec does not model.
Payload = (
    None
    | int
    | VringState
    | VringAddr
    | MemoryTable
    | SingleMemoryRegion
    | ConfigSpace
    | LogDesc
    | VringArea
    | InflightDesc
    | bytes
)


class PayloadKind(enum.Enum):
    """The payload layouts of "Payload", with the sizes they allow."""

    EMPTY = "empty"
    U64 = "u64"
    VRING_STATE = "vring state"
    VRING_ADDR = "vring address"
    MEM_TABLE = "memory regions"
    MEM_REGION = "single memory region"
    CONFIG = "config space"
    LOG = "log description"
    VRING_AREA = "vring area"
    INFLIGHT = "inflight description"
    #: Opaque bytes of a fixed size (IOTLB messages, UUIDs, device state).
    RAW_FIXED = "fixed-size bytes"
    #: Opaque bytes of any size up to MAX_RAW_PAYLOAD (crypto sessions).
    RAW = "bytes"


_Structure = (
    type[VringState]
    | type[VringAddr]
    | type[MemoryTable]
    | type[SingleMemoryRegion]
    | type[ConfigSpace]
    | type[LogDesc]
    | type[VringArea]
    | type[InflightDesc]
)
#: The layouts that are a structure of :mod:`.payloads`: its class, which packs and unpacks it.
_STRUCTURES: dict[PayloadKind, _Structure] = {
    PayloadKind.VRING_STATE: VringState,
    PayloadKind.VRING_ADDR: VringAddr,
    PayloadKind.MEM_TABLE: MemoryTable,
    PayloadKind.MEM_REGION: SingleMemoryRegion,
    PayloadKind.CONFIG: ConfigSpace,
    PayloadKind.LOG: LogDesc,
    PayloadKind.VRING_AREA: VringArea,
    PayloadKind.INFLIGHT: InflightDesc,
}

_FIXED_SIZES: dict[PayloadKind, tuple[int, ...]] = {
    PayloadKind.EMPTY: (0,),
    PayloadKind.U64: (_U64.size,),
    PayloadKind.MEM_REGION: (_U64.size + _REGION.size,),
    PayloadKind.VRING_STATE: VringState.SIZES,
    PayloadKind.VRING_ADDR: VringAddr.SIZES,
    PayloadKind.LOG: LogDesc.SIZES,
    PayloadKind.VRING_AREA: VringArea.SIZES,
    PayloadKind.INFLIGHT: InflightDesc.SIZES,
}


@dataclass(frozen=True)
class _Schema:
    """What a request carries: payload layouts, file descriptor counts."""

    request: PayloadKind
    #: The explicit reply, or None when the only reply is a REPLY_ACK u64.
    reply: PayloadKind | None = None
    min_fds: int = 0
    max_fds: int = 0
    #: For RAW_FIXED payloads: their size.
    raw_size: int = 0
    #: SET_VRING_KICK/CALL/ERR: one fd unless the payload's NOFD bit is set.
    vring_fd: bool = False
    #: Replies that carry file descriptors (GET_INFLIGHT_FD, ...).
    reply_max_fds: int = 0


_P = PayloadKind
_FRONTEND_SCHEMAS: dict[FrontendRequest, _Schema] = {
    FrontendRequest.GET_FEATURES: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.SET_FEATURES: _Schema(_P.U64),
    FrontendRequest.SET_OWNER: _Schema(_P.EMPTY),
    FrontendRequest.RESET_OWNER: _Schema(_P.EMPTY),
    FrontendRequest.SET_MEM_TABLE: _Schema(_P.MEM_TABLE, min_fds=0, max_fds=MAX_MEM_REGIONS),
    FrontendRequest.SET_LOG_BASE: _Schema(_P.LOG, _P.U64, min_fds=1, max_fds=1),
    FrontendRequest.SET_LOG_FD: _Schema(_P.EMPTY, min_fds=1, max_fds=1),
    FrontendRequest.SET_VRING_NUM: _Schema(_P.VRING_STATE),
    FrontendRequest.SET_VRING_ADDR: _Schema(_P.VRING_ADDR),
    FrontendRequest.SET_VRING_BASE: _Schema(_P.VRING_STATE),
    FrontendRequest.GET_VRING_BASE: _Schema(_P.VRING_STATE, _P.VRING_STATE),
    FrontendRequest.SET_VRING_KICK: _Schema(_P.U64, max_fds=1, vring_fd=True),
    FrontendRequest.SET_VRING_CALL: _Schema(_P.U64, max_fds=1, vring_fd=True),
    FrontendRequest.SET_VRING_ERR: _Schema(_P.U64, max_fds=1, vring_fd=True),
    FrontendRequest.GET_PROTOCOL_FEATURES: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.SET_PROTOCOL_FEATURES: _Schema(_P.U64),
    FrontendRequest.GET_QUEUE_NUM: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.SET_VRING_ENABLE: _Schema(_P.VRING_STATE),
    FrontendRequest.SEND_RARP: _Schema(_P.U64),
    FrontendRequest.NET_SET_MTU: _Schema(_P.U64),
    FrontendRequest.SET_BACKEND_REQ_FD: _Schema(_P.EMPTY, min_fds=1, max_fds=1),
    FrontendRequest.IOTLB_MSG: _Schema(_P.RAW_FIXED, _P.U64, raw_size=32),
    FrontendRequest.SET_VRING_ENDIAN: _Schema(_P.VRING_STATE),
    FrontendRequest.GET_CONFIG: _Schema(_P.CONFIG, _P.CONFIG),
    FrontendRequest.SET_CONFIG: _Schema(_P.CONFIG),
    FrontendRequest.CREATE_CRYPTO_SESSION: _Schema(_P.RAW, _P.RAW),
    FrontendRequest.CLOSE_CRYPTO_SESSION: _Schema(_P.U64),
    FrontendRequest.POSTCOPY_ADVISE: _Schema(_P.EMPTY, _P.EMPTY, reply_max_fds=1),
    FrontendRequest.POSTCOPY_LISTEN: _Schema(_P.EMPTY),
    FrontendRequest.POSTCOPY_END: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.GET_INFLIGHT_FD: _Schema(_P.INFLIGHT, _P.INFLIGHT, reply_max_fds=1),
    FrontendRequest.SET_INFLIGHT_FD: _Schema(_P.INFLIGHT, min_fds=1, max_fds=1),
    FrontendRequest.GPU_SET_SOCKET: _Schema(_P.EMPTY, min_fds=1, max_fds=1),
    FrontendRequest.RESET_DEVICE: _Schema(_P.EMPTY),
    FrontendRequest.VRING_KICK: _Schema(_P.VRING_STATE),
    FrontendRequest.GET_MAX_MEM_SLOTS: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.ADD_MEM_REG: _Schema(_P.MEM_REGION, min_fds=1, max_fds=1),
    # "the back-end MAY accept messages with one file descriptor" (and close it).
    FrontendRequest.REM_MEM_REG: _Schema(_P.MEM_REGION, max_fds=1),
    FrontendRequest.SET_STATUS: _Schema(_P.U64),
    FrontendRequest.GET_STATUS: _Schema(_P.EMPTY, _P.U64),
    FrontendRequest.GET_SHARED_OBJECT: _Schema(_P.RAW_FIXED, _P.U64, raw_size=16, reply_max_fds=1),
    FrontendRequest.SET_DEVICE_STATE_FD: _Schema(
        _P.RAW_FIXED, _P.U64, min_fds=1, max_fds=1, raw_size=8, reply_max_fds=1
    ),
    FrontendRequest.CHECK_DEVICE_STATE: _Schema(_P.EMPTY, _P.U64),
}

_BACKEND_SCHEMAS: dict[BackendRequest, _Schema] = {
    BackendRequest.IOTLB_MSG: _Schema(_P.RAW_FIXED, raw_size=32),
    BackendRequest.CONFIG_CHANGE_MSG: _Schema(_P.EMPTY),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: _Schema(_P.VRING_AREA, max_fds=1),
    BackendRequest.VRING_CALL: _Schema(_P.VRING_STATE),
    BackendRequest.VRING_ERR: _Schema(_P.VRING_STATE),
    BackendRequest.SHARED_OBJECT_ADD: _Schema(_P.RAW_FIXED, raw_size=16),
    BackendRequest.SHARED_OBJECT_REMOVE: _Schema(_P.RAW_FIXED, raw_size=16),
    BackendRequest.SHARED_OBJECT_LOOKUP: _Schema(_P.RAW_FIXED, _P.U64, raw_size=16),
}


def _schema(request: Request) -> _Schema:
    if isinstance(request, FrontendRequest):
        return _FRONTEND_SCHEMAS[request]
    return _BACKEND_SCHEMAS[request]


def has_explicit_reply(request: Request) -> bool:
    """Whether ``request`` always gets a reply body, NEED_REPLY or not ("Communication")."""
    return _schema(request).reply is not None


def _kind_and_fds(request: Request, is_reply: bool) -> tuple[_Schema, PayloadKind, int, int]:
    """The payload layout and fd bounds of a request or of its reply."""
    schema = _schema(request)
    if not is_reply:
        return schema, schema.request, schema.min_fds, schema.max_fds
    kind = schema.reply if schema.reply is not None else PayloadKind.U64
    return schema, kind, 0, schema.reply_max_fds


def _allowed_size(schema: _Schema, kind: PayloadKind, size: int) -> str | None:
    """Why ``size`` is not a valid payload size for ``kind`` (None when it is)."""
    if kind is PayloadKind.MEM_TABLE:
        body = size - _TABLE_HEAD.size
        if body < 0 or body % _REGION.size:
            return f"{size} bytes is not 8 + 32 * regions"
        if body // _REGION.size > MAX_MEM_REGIONS:
            return f"{body // _REGION.size} regions, at most {MAX_MEM_REGIONS}"
        return None
    if kind is PayloadKind.CONFIG:
        if not _CONFIG_HEAD.size <= size <= _CONFIG_HEAD.size + MAX_CONFIG_SIZE:
            return f"{size} bytes, expected 12 to {12 + MAX_CONFIG_SIZE}"
        return None
    if kind is PayloadKind.RAW:
        return None if size <= MAX_RAW_PAYLOAD else f"{size} bytes, at most {MAX_RAW_PAYLOAD}"
    if kind is PayloadKind.RAW_FIXED:
        return None if size == schema.raw_size else f"{size} bytes, expected {schema.raw_size}"
    sizes = _FIXED_SIZES[kind]
    if size in sizes:
        return None
    return f"{size} bytes, expected {' or '.join(map(str, sizes))}"


def decode_payload(request: Request, data: bytes, *, is_reply: bool = False) -> Payload:
    """Decode the payload of ``request`` (or of its reply); ProtocolError if malformed."""
    schema, kind, _, _ = _kind_and_fds(request, is_reply)
    problem = _allowed_size(schema, kind, len(data))
    if problem is not None:
        what = "reply to " if is_reply else ""
        raise ProtocolError(f"{what}{request.name}: payload of {problem} ({kind.value})")
    try:
        return _decode_kind(kind, data)
    except struct.error as exc:  # unreachable after the size check; keep the contract
        raise ProtocolError(f"{request.name}: {exc}") from exc


def _decode_kind(kind: PayloadKind, data: bytes) -> Payload:
    structure = _STRUCTURES.get(kind)
    if structure is not None:
        return structure.unpack(data)
    if kind is PayloadKind.EMPTY:
        return None
    if kind is PayloadKind.U64:
        value: int = _U64.unpack(data)[0]
        return value
    return bytes(data)


def _encode_kind(kind: PayloadKind, payload: Payload) -> bytes:
    structure = _STRUCTURES.get(kind)
    if structure is not None:
        if not isinstance(payload, structure):
            raise ValueError(f"expected a {structure.__name__} payload, got {payload!r}")
        return payload.pack()
    if kind is PayloadKind.EMPTY:
        if payload is not None:
            raise ValueError(f"expected no payload, got {payload!r}")
        return b""
    if kind is PayloadKind.U64:
        if not isinstance(payload, int):
            raise ValueError(f"expected a u64 payload, got {payload!r}")
        _check_fields("u64", ((payload, 64),))
        return _U64.pack(payload)
    if not isinstance(payload, bytes):
        raise ValueError(f"expected bytes, got {payload!r}")
    return payload


def _fd_bounds(request: Request, payload: Payload, is_reply: bool) -> tuple[int, int]:
    """How many fds a message may carry: the schema's bounds, or exactly what the
    payload says (SET_VRING_KICK/CALL/ERR: one unless NOFD; SET_MEM_TABLE: one a region)."""
    schema, kind, min_fds, max_fds = _kind_and_fds(request, is_reply)
    if is_reply:
        return min_fds, max_fds
    if schema.vring_fd:
        assert isinstance(payload, int)
        wanted = 0 if payload & VRING_FD_NOFD else 1
        return wanted, wanted
    if kind is PayloadKind.MEM_TABLE:
        assert isinstance(payload, MemoryTable)
        return len(payload.regions), len(payload.regions)
    return min_fds, max_fds


def vring_fd_payload(index: int, has_fd: bool) -> int:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index, and the NOFD bit when no fd."""
    if not 0 <= index <= VRING_FD_INDEX_MASK:
        raise ValueError(f"vring index {index} does not fit in 8 bits")
    return index | (0 if has_fd else VRING_FD_NOFD)


def fds_from_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors of ``recvmsg`` ancillary data (SCM_RIGHTS, native ints)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i : i + 4], "little") for i in range(usable)[::4])
    return fds


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One vhost-user message: request, flags, decoded payload, file descriptors."""

    request: FrontendRequest | BackendRequest
    payload: Payload = None
    flags: int = VERSION
    fds: tuple[int, ...] = field(default=())

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def payload_as(self, kind: type[_T]) -> _T:
        """The payload, which the request's layout makes a ``kind`` (TypeError if not)."""
        payload = self.payload
        if not isinstance(payload, kind):
            raise TypeError(f"{self.request.name}: payload {payload!r} is no {kind.__name__}")
        return payload

    def __repr__(self) -> str:
        flags = []
        if self.is_reply:
            flags.append("REPLY")
        if self.need_reply:
            flags.append("NEED_REPLY")
        extra = f", fds={list(self.fds)}" if self.fds else ""
        return (
            f"Message({self.request.name}{'|' if flags else ''}{'|'.join(flags)}, "
            f"{self.payload!r}{extra})"
        )


def encode(message: Message) -> bytes:
    """The header and payload bytes of ``message`` (its fds travel as ancillary data).

    Raises ValueError for a message this process should never build (wrong
    payload type, a value that does not fit its field, too many fds).
    """
    is_reply = message.is_reply
    schema, kind, _, _ = _kind_and_fds(message.request, is_reply)
    if message.flags & ~_KNOWN_FLAGS or message.flags & _VERSION_MASK != VERSION:
        raise ValueError(f"invalid flags {message.flags:#x}")
    body = _encode_kind(kind, message.payload)
    problem = _allowed_size(schema, kind, len(body))
    if problem is not None:
        raise ValueError(f"{message.request.name}: payload of {problem}")
    nfds = len(message.fds)
    min_fds, max_fds = _fd_bounds(message.request, message.payload, is_reply)
    if not min_fds <= nfds <= max_fds:
        raise ValueError(f"{message.request.name}: {nfds} fds, expected {min_fds}..{max_fds}")
    return _HEADER.pack(int(message.request), message.flags, len(body)) + body


def decode(
    data: bytes,
    fds: Sequence[int] = (),
    *,
    requests: type[FrontendRequest] | type[BackendRequest] = FrontendRequest,
    replies: bool = False,
) -> Message:
    """Decode exactly one whole message (header and payload) from ``data``."""
    parser = MessageParser(requests, replies=replies)
    messages = parser.feed(data, fds)
    if len(messages) != 1 or parser.buffered:
        raise ProtocolError(
            f"expected exactly one message, got {len(messages)} and "
            f"{parser.buffered} bytes left over",
            parser.take_fds(),
        )
    return messages[0]


class MessageParser:
    """Sans-IO incremental decoder of one direction of a vhost-user stream.

    ``requests`` is the request enum of the stream (:class:`FrontendRequest`
    on the main socket, :class:`BackendRequest` on the back-end channel);
    ``replies`` says whether this side reads replies (a front end) or
    requests (a back end).  A reply must carry the REPLY flag and a request
    must not, so a confused peer is caught at once.

    File descriptors belong to the message being assembled when they are
    fed, i.e. the one that contains the first byte of the same ``feed``
    call.  Reading at most :meth:`wanted` bytes per ``recvmsg``, as a socket
    layer should, makes that unambiguous: vhost-user peers send a message's
    fds with its first byte.

    After a :class:`ProtocolError` the stream is out of step for good: the
    parser is *broken* and every later ``feed`` raises again.
    """

    def __init__(
        self,
        requests: type[FrontendRequest] | type[BackendRequest] = FrontendRequest,
        *,
        replies: bool = False,
    ) -> None:
        self._requests = requests
        self._replies = replies
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[Request, int, int] | None = None
        self._deferred: ProtocolError | None = None
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """Whether part of a message has been received (a disconnect now is mid-message)."""
        return bool(self._buf) or bool(self._fds)

    def wanted(self) -> int:
        """Bytes still missing from the current header or payload (never 0)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return HEADER_SIZE + self._header[2] - len(self._buf)

    def take_fds(self) -> list[int]:
        """Hand over fds received for an incomplete message (the caller closes them)."""
        fds, self._fds = self._fds, []
        return fds

    def _fail(self, reason: str) -> ProtocolError:
        self.broken = True
        self._buf.clear()
        self._header = None
        return ProtocolError(reason, self.take_fds())

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes (and the fds received with them); return finished messages."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            error.fds.extend(fds)
            raise error
        if self.broken:
            raise ProtocolError("stream is out of step after an earlier error", list(fds))
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise self._fail(
                f"{len(self._fds)} file descriptors with one message, at most {MAX_FDS}"
            )
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                if self._header is None:
                    if len(self._buf) < HEADER_SIZE:
                        break
                    self._header = self._parse_header(bytes(self._buf[:HEADER_SIZE]))
                request, flags, size = self._header
                if len(self._buf) < HEADER_SIZE + size:
                    break
                payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + size])
                del self._buf[: HEADER_SIZE + size]
                self._header = None
                out.append(self._finish(request, flags, payload))
        except ProtocolError as exc:
            if not out:
                raise
            # Hand over the good messages before the bad one; the error is
            # raised by the next call.
            self._deferred = exc
        return out

    def _parse_header(self, header: bytes) -> tuple[Request, int, int]:
        code, flags, size = _HEADER.unpack(header)
        try:
            request: Request = self._requests(code)
        except ValueError:
            raise self._fail(f"unknown {self._requests.__name__} {code}") from None
        if flags & _VERSION_MASK != VERSION:
            raise self._fail(
                f"{request.name}: protocol version {flags & _VERSION_MASK}, expected 1"
            )
        if flags & ~_KNOWN_FLAGS:
            raise self._fail(f"{request.name}: unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
        is_reply = bool(flags & FLAG_REPLY)
        if is_reply != self._replies:
            raise self._fail(
                f"{request.name}: {'reply' if is_reply else 'request'} where a "
                f"{'reply' if self._replies else 'request'} was expected"
            )
        if is_reply and flags & FLAG_NEED_REPLY:
            raise self._fail(f"{request.name}: a reply asking for a reply")
        schema, kind, _, _ = _kind_and_fds(request, is_reply)
        problem = _allowed_size(schema, kind, size)
        if problem is not None:
            what = "reply to " if is_reply else ""
            raise self._fail(f"{what}{request.name}: payload of {problem} ({kind.value})")
        return request, flags, size

    def _finish(self, request: Request, flags: int, data: bytes) -> Message:
        is_reply = bool(flags & FLAG_REPLY)
        fds = self.take_fds()
        try:
            payload = decode_payload(request, data, is_reply=is_reply)
        except ProtocolError as exc:
            self._fds = fds
            raise self._fail(str(exc)) from None
        min_fds, max_fds = _fd_bounds(request, payload, is_reply)
        if not min_fds <= len(fds) <= max_fds:
            self._fds = fds
            expected = str(min_fds) if min_fds == max_fds else f"{min_fds} to {max_fds}"
            raise self._fail(f"{request.name}: {len(fds)} file descriptors, expected {expected}")
        return Message(request, payload, flags, tuple(fds))
