"""virtio-net control commands: parsing and the receive filter they set (device-types/net:
Control Virtqueue).

Pure: :func:`parse_command` turns the device-readable part of a controlq
chain into one typed command, checked against the negotiated features and
the device's pairs, or raises :class:`CtrlError` (the driver gets
VIRTIO_NET_ERR); the model carries the command out.  Commands:

* Packet Receive Filtering (CTRL_RX, CTRL_RX_EXTRA): :class:`RxMode`;
* Setting MAC Address Filtering: :class:`MacTable` (CTRL_RX) and
  :class:`MacAddr` (CTRL_MAC_ADDR);
* Automatic receive steering in multiqueue mode: :class:`QueuePairs` (MQ);
* Offloads State Configuration: :class:`GuestOffloads` (CTRL_GUEST_OFFLOADS).

:class:`RxFilter` is the receive filter the first two set and the receive
path applies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from pyvirtio.device import expect_bool, expect_object, expect_str
from pyvirtio.devices.net.wire import (
    BROADCAST,
    CTRL_GUEST_OFFLOADS_SET,
    GUEST_OFFLOADS,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    NetFeature,
    format_mac,
    missing_requirements,
    parse_mac,
)

__all__ = [
    "MAC_TABLE_ENTRIES",
    "MAX_CTRL_COMMAND",
    "Command",
    "CtrlError",
    "GuestOffloads",
    "MacAddr",
    "MacTable",
    "QueuePairs",
    "RxFilter",
    "RxMode",
    "parse_command",
]

F = NetFeature

#: Addresses per MAC filter table; beyond that the device accepts every
#: address of that kind, as the spec's footnote allows (and QEMU does).
MAC_TABLE_ENTRIES = 64
#: Longest control command read (a full MAC table set is about 800 bytes).
MAX_CTRL_COMMAND = 1 << 16

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAC_LEN = 6

#: RX command -> the RxFilter field it sets and the feature it needs.
_RX_COMMANDS: dict[int, tuple[str, NetFeature]] = {
    CtrlRx.PROMISC: ("promisc", F.CTRL_RX),
    CtrlRx.ALLMULTI: ("allmulti", F.CTRL_RX),
    CtrlRx.ALLUNI: ("alluni", F.CTRL_RX_EXTRA),
    CtrlRx.NOMULTI: ("nomulti", F.CTRL_RX_EXTRA),
    CtrlRx.NOUNI: ("nouni", F.CTRL_RX_EXTRA),
    CtrlRx.NOBCAST: ("nobcast", F.CTRL_RX_EXTRA),
}


class CtrlError(Exception):
    """A control command answered with VIRTIO_NET_ERR; the message says why."""


@dataclass
class RxFilter:
    """The receive filter (device-types/net: Packet Receive Filtering, MAC Address Filtering).

    The defaults are the state after reset: promiscuous (as in QEMU; drivers
    set their mode when they start), empty tables (the spec's "MUST have an
    empty MAC filtering table on reset").
    """

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    #: More addresses than MAC_TABLE_ENTRIES were set: accept that kind.
    unicast_overflow: bool = False
    multicast_overflow: bool = False

    def accepts(self, dst: bytes, mac: bytes) -> bool:
        """Whether a frame to ``dst`` reaches a driver whose address is ``mac``."""
        if self.promisc:
            return True  # SHOULD take effect whatever the other modes say
        if dst == BROADCAST:
            return not self.nobcast  # NOMULTI does not apply to broadcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multicast_overflow or dst in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.unicast_overflow or dst == mac or dst in self.unicast

    def set_tables(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET: a table too long accepts its whole kind."""
        self.unicast_overflow = len(unicast) > MAC_TABLE_ENTRIES
        self.multicast_overflow = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = [] if self.unicast_overflow else unicast
        self.multicast = [] if self.multicast_overflow else multicast

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            doc[f.name] = [format_mac(m) for m in value] if f.name in _TABLES else value
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> RxFilter:
        doc = expect_object(doc, "filter state")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in _TABLES:
                values[f.name] = expect_bool(doc[f.name])
                continue
            entries = doc[f.name]
            if not isinstance(entries, list) or len(entries) > MAC_TABLE_ENTRIES:
                raise ValueError(f"bad {f.name} table {entries!r}")
            values[f.name] = [parse_mac(expect_str(e)) for e in entries]
        return cls(**values)


_TABLES = ("unicast", "multicast")


# -- commands ----------------------------------------------------------------------------------


class RxMode(NamedTuple):
    """Turn one receive mode of :class:`RxFilter` (its field ``name``) on or off."""

    name: str
    on: bool


class MacTable(NamedTuple):
    """Replace the unicast and multicast filter tables."""

    unicast: list[bytes]
    multicast: list[bytes]


class MacAddr(NamedTuple):
    """The device's address (``mac`` in config space) becomes ``mac``."""

    mac: bytes


class QueuePairs(NamedTuple):
    """Use ``pairs`` receiveq/transmitq pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)."""

    pairs: int


class GuestOffloads(NamedTuple):
    """The receive offloads in force become ``offloads`` (GUEST_* feature bits)."""

    offloads: int


Command = RxMode | MacTable | MacAddr | QueuePairs | GuestOffloads


def parse_command(command: bytes, features: int, max_pairs: int) -> Command:
    """``struct virtio_net_ctrl``'s class, command and data, checked; raises :class:`CtrlError`.

    ``features`` are the negotiated ones, ``max_pairs`` the device's
    ``max_virtqueue_pairs``.
    """
    if len(command) < 2:
        raise CtrlError(f"{len(command)}-byte command")
    cls, cmd, data = command[0], command[1], command[2:]
    try:
        if cls == CtrlClass.RX:
            return _rx(cmd, data, features)
        if cls == CtrlClass.MAC:
            return _mac(cmd, data, features)
        if cls == CtrlClass.MQ:
            return _mq(cmd, data, features, max_pairs)
        if cls == CtrlClass.GUEST_OFFLOADS:
            return _offloads(cmd, data, features)
        raise CtrlError(f"unsupported class {cls}")
    except CtrlError as exc:
        raise CtrlError(f"class {cls} command {cmd}: {exc}") from None


def _require(features: int, feature: NetFeature) -> None:
    if not features & feature.mask:
        raise CtrlError(f"{feature.name} not negotiated")


def _data_of(data: bytes, size: int) -> None:
    if len(data) != size:
        raise CtrlError(f"{len(data)} bytes of data, not {size}")


def _rx(cmd: int, data: bytes, features: int) -> RxMode:
    """Packet Receive Filtering: one byte, 0 off / non-zero on."""
    entry = _RX_COMMANDS.get(cmd)
    if entry is None:
        raise CtrlError("unknown RX command")
    name, feature = entry
    _require(features, feature)
    _data_of(data, 1)
    return RxMode(name, bool(data[0]))


def _mac(cmd: int, data: bytes, features: int) -> MacTable | MacAddr:
    if cmd == CtrlMac.TABLE_SET:
        # Two struct virtio_net_ctrl_mac back to back: unicast, multicast.
        _require(features, F.CTRL_RX)
        tables: list[list[bytes]] = []
        pos = 0
        for _ in range(2):
            if pos + _U32.size > len(data):
                raise CtrlError("MAC table truncated")
            (entries,) = _U32.unpack_from(data, pos)
            pos += _U32.size
            end = pos + _MAC_LEN * entries
            if end > len(data):
                raise CtrlError(f"MAC table of {entries} entries truncated")
            tables.append([data[i : i + _MAC_LEN] for i in range(pos, end, _MAC_LEN)])
            pos = end
        if pos != len(data):
            raise CtrlError(f"{len(data) - pos} bytes after the MAC tables")
        return MacTable(*tables)
    if cmd == CtrlMac.ADDR_SET:
        _require(features, F.CTRL_MAC_ADDR)
        if len(data) != _MAC_LEN:
            raise CtrlError(f"address of {len(data)} bytes")
        if data[0] & 1:
            raise CtrlError(f"{format_mac(data)} is a multicast address")
        return MacAddr(bytes(data))
    raise CtrlError("unknown MAC command")


def _mq(cmd: int, data: bytes, features: int, max_pairs: int) -> QueuePairs:
    if cmd != CtrlMq.VQ_PAIRS_SET:
        raise CtrlError("unknown MQ command")
    _require(features, F.MQ)
    _data_of(data, _U16.size)
    (pairs,) = _U16.unpack(data)
    if not 1 <= pairs <= max_pairs:
        raise CtrlError(f"{pairs} pairs requested, the device has {max_pairs}")
    return QueuePairs(pairs)


def _offloads(cmd: int, data: bytes, features: int) -> GuestOffloads:
    if cmd != CTRL_GUEST_OFFLOADS_SET:
        raise CtrlError("unknown GUEST_OFFLOADS command")
    _require(features, F.CTRL_GUEST_OFFLOADS)
    _data_of(data, _U64.size)
    (offloads,) = _U64.unpack(data)
    allowed = features & GUEST_OFFLOADS
    if offloads & ~allowed:
        raise CtrlError(f"offloads {offloads & ~allowed:#x} not negotiated")
    problems = missing_requirements(offloads)
    if problems:
        raise CtrlError("; ".join(problems))
    return GuestOffloads(offloads)
