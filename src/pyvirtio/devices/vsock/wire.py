"""The virtio-vsock wire format, shared by the device and the driver (device-types/vsock).

Every packet on the RX and TX queues starts with the 44-byte little-endian
``struct virtio_vsock_hdr`` (device-types/vsock: Device Operation), followed by
``len`` bytes of payload for RW packets.  The event queue carries 4-byte
``struct virtio_vsock_event``.  The configuration space is one le64,
``guest_cid``.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pyvirtio.constants import FeatureBit

__all__ = [
    "CONFIG_SIZE",
    "EVENT_SIZE",
    "HEADER_SIZE",
    "HOST_CID",
    "MAX_PKT_PAYLOAD",
    "VMADDR_CID_ANY",
    "EventId",
    "Header",
    "Op",
    "SeqFlag",
    "ShutdownFlag",
    "SockType",
    "VsockFeature",
    "pack_config",
    "pack_event",
    "unpack_event",
]

#: Size of ``struct virtio_vsock_hdr``.
HEADER_SIZE = 44
#: Size of ``struct virtio_vsock_event``.
EVENT_SIZE = 4
#: Size of ``struct virtio_vsock_config``.
CONFIG_SIZE = 8
#: The host's CID (device-types/vsock: Device configuration layout; 0-2 are reserved).
HOST_CID = 2
#: The wildcard CID; never a valid source or destination on the wire.
VMADDR_CID_ANY = 0xFFFF_FFFF
#: Largest payload one packet carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE);
#: longer ``len`` fields are malformed.
MAX_PKT_PAYLOAD = 64 * 1024

_HEADER = struct.Struct("<QQIIIHHIII")
_EVENT = struct.Struct("<I")
_CONFIG = struct.Struct("<Q")


class VsockFeature(FeatureBit):
    """Feature bit numbers (device-types/vsock: Feature bits)."""

    STREAM = 0
    SEQPACKET = 1
    NO_IMPLIED_STREAM = 2


class SockType(enum.IntEnum):
    """``type`` (VIRTIO_VSOCK_TYPE_*)."""

    STREAM = 1
    SEQPACKET = 2


class Op(enum.IntEnum):
    """``op`` (VIRTIO_VSOCK_OP_*)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag:
    """``flags`` of a SHUTDOWN packet: the sender will receive / send no more.

    Plain ints, not an enum.IntFlag: these are tested on every packet, and
    IntFlag's operators run in Python.
    """

    RCV = 1
    SEND = 2
    BOTH = 3


class SeqFlag:
    """``flags`` of a SEQPACKET RW packet: end of message, end of record (MSG_EOR)."""

    EOM = 1
    EOR = 2


class EventId(enum.IntEnum):
    """``id`` of ``struct virtio_vsock_event``."""

    TRANSPORT_RESET = 0


class Header(NamedTuple):
    """``struct virtio_vsock_hdr``; CIDs are u64 on the wire (only the low 32 bits are used)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return _HEADER.pack(*self)

    def pack_into(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        _HEADER.pack_into(buffer, offset, *self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """The header at the start of ``data`` (at least HEADER_SIZE bytes)."""
        return cls._make(_HEADER.unpack_from(data))

    def reply(
        self,
        op: Op,
        *,
        flags: int = 0,
        length: int = 0,
        buf_alloc: int = 0,
        fwd_cnt: int = 0,
    ) -> Header:
        """A packet back to this packet's sender, its addresses swapped."""
        return Header(
            self.dst_cid,
            self.src_cid,
            self.dst_port,
            self.src_port,
            length,
            self.type,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )


def pack_config(guest_cid: int) -> bytes:
    """``struct virtio_vsock_config``."""
    return _CONFIG.pack(guest_cid)


def pack_event(event: EventId) -> bytes:
    return _EVENT.pack(event)


def unpack_event(data: bytes | bytearray | memoryview) -> int:
    """The ``id`` of an event buffer."""
    value: int = _EVENT.unpack_from(data)[0]
    return value
