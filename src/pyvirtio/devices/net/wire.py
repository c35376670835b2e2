"""The virtio-net wire format: feature bits, the packet header, config space, control commands.

Everything both sides of a virtio-net device agree on (device-types/net),
in one place: the device model (:mod:`.device`), its back ends
(:mod:`.backends`) and the driver (:mod:`pyvirtio.driver.net`) import it.
Also the few Ethernet facts they need (header length, addresses) and the
Internet checksum, which a device computes when a peer hands it a partially
checksummed frame for a driver that cannot finish it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

from pyvirtio.constants import FeatureBit

__all__ = [
    "BROADCAST",
    "CONFIG_LAYOUT",
    "ETH_HLEN",
    "FEATURE_REQUIREMENTS",
    "GUEST_OFFLOADS",
    "HDR_SIZE",
    "IMPLEMENTED_NET_FEATURES",
    "MAX_FRAME",
    "MAX_MTU",
    "MIN_MTU",
    "VLAN_HLEN",
    "CtrlAck",
    "CtrlClass",
    "CtrlMac",
    "CtrlMq",
    "CtrlRx",
    "Gso",
    "HdrFlag",
    "NetFeature",
    "NetHeader",
    "ctrl_queue_index",
    "format_mac",
    "internet_checksum",
    "is_multicast",
    "missing_requirements",
    "parse_mac",
]


class NetFeature(FeatureBit):
    """Network feature bit numbers (device-types/net: Feature bits)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


#: The device-specific features pyvirtio implements on both sides (the device
#: offers these, adding MQ for more than one queue pair; the driver accepts them).
IMPLEMENTED_NET_FEATURES = (
    NetFeature.CSUM.mask
    | NetFeature.GUEST_CSUM.mask
    | NetFeature.CTRL_GUEST_OFFLOADS.mask
    | NetFeature.MTU.mask
    | NetFeature.MAC.mask
    | NetFeature.GUEST_TSO4.mask
    | NetFeature.GUEST_TSO6.mask
    | NetFeature.GUEST_ECN.mask
    | NetFeature.GUEST_UFO.mask
    | NetFeature.HOST_TSO4.mask
    | NetFeature.HOST_TSO6.mask
    | NetFeature.HOST_ECN.mask
    | NetFeature.HOST_UFO.mask
    | NetFeature.MRG_RXBUF.mask
    | NetFeature.STATUS.mask
    | NetFeature.CTRL_VQ.mask
    | NetFeature.CTRL_RX.mask
    | NetFeature.CTRL_RX_EXTRA.mask
    | NetFeature.CTRL_MAC_ADDR.mask
)


F = NetFeature

#: "Feature bit requirements" (device-types/net: Feature bits) for the bits
#: pyvirtio knows: each feature needs at least one of the listed ones.
FEATURE_REQUIREMENTS: dict[NetFeature, tuple[NetFeature, ...]] = {
    F.GUEST_TSO4: (F.GUEST_CSUM,),
    F.GUEST_TSO6: (F.GUEST_CSUM,),
    F.GUEST_ECN: (F.GUEST_TSO4, F.GUEST_TSO6),
    F.GUEST_UFO: (F.GUEST_CSUM,),
    F.HOST_TSO4: (F.CSUM,),
    F.HOST_TSO6: (F.CSUM,),
    F.HOST_ECN: (F.HOST_TSO4, F.HOST_TSO6),
    F.HOST_UFO: (F.CSUM,),
    F.CTRL_RX: (F.CTRL_VQ,),
    F.CTRL_VLAN: (F.CTRL_VQ,),
    F.GUEST_ANNOUNCE: (F.CTRL_VQ,),
    F.MQ: (F.CTRL_VQ,),
    F.CTRL_MAC_ADDR: (F.CTRL_VQ,),
}

#: The receive offloads, which VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET toggles
#: (device-types/net: Offloads State Configuration).
GUEST_OFFLOADS = (
    F.GUEST_CSUM.mask | F.GUEST_TSO4.mask | F.GUEST_TSO6.mask | F.GUEST_ECN.mask | F.GUEST_UFO.mask
)


def missing_requirements(features: int) -> list[str]:
    """The broken "Feature bit requirements" of ``features``, as readable strings."""
    problems = []
    for feature, needs in FEATURE_REQUIREMENTS.items():
        if features & feature.mask and not any(features & need.mask for need in needs):
            problems.append(f"{feature.name} requires {' or '.join(n.name for n in needs)}")
    return problems


# -- the packet header ------------------------------------------------------------------


class HdrFlag(enum.IntFlag):
    """``virtio_net_hdr.flags`` bits."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class Gso(enum.IntEnum):
    """``virtio_net_hdr.gso_type`` values; ``ECN`` is a bit or-ed into the others."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


#: ``struct virtio_net_hdr`` as the device and driver use it without
#: HASH_REPORT and tunnel features: flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset, num_buffers (device-types/net: Device Operation).
_HDR: Final = struct.Struct("<BBHHHHH")
HDR_SIZE: Final = _HDR.size
assert HDR_SIZE == 12


class _HeaderLayout:
    """:class:`NetHeader`'s class attributes, kept out of the dataclass: mypyc
    would make class variables of a dataclass fields."""

    STRUCT: ClassVar[struct.Struct] = _HDR
    SIZE: ClassVar[int] = HDR_SIZE


@dataclass(slots=True, eq=False, repr=False)
class NetHeader(_HeaderLayout):
    """One ``struct virtio_net_hdr`` (12 bytes, VIRTIO 1.x: ``num_buffers`` always present).

    Fields in wire order, so ``NetHeader(*STRUCT.unpack(...))`` builds one.
    Equal headers pack to the same bytes.
    """

    flags: int = 0
    gso_type: int = Gso.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> NetHeader:
        return cls(*_HDR.unpack_from(data, offset))

    def pack(self) -> bytes:
        return _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetHeader) and self.pack() == other.pack()

    def __hash__(self) -> int:
        return hash(self.pack())

    def __repr__(self) -> str:
        return (
            f"NetHeader(flags={self.flags:#x}, gso_type={self.gso_type:#x}, "
            f"hdr_len={self.hdr_len}, gso_size={self.gso_size}, csum_start={self.csum_start}, "
            f"csum_offset={self.csum_offset}, num_buffers={self.num_buffers})"
        )


# -- Ethernet ----------------------------------------------------------------------------

ETH_HLEN: Final = 14
VLAN_HLEN: Final = 4
#: Largest frame (without the virtio header) either direction carries: a
#: 64 KiB GSO super-frame with its Ethernet and VLAN headers, the bound
#: Linux's tun and the rust-vmm devices use (65562 with the header).
MAX_FRAME: Final = 65550
#: Bounds of the ``mtu`` config field (device-types/net: Device configuration layout).
MIN_MTU: Final = 68
MAX_MTU: Final = 65535
BROADCAST = b"\xff" * 6


def is_multicast(mac: bytes | bytearray | memoryview) -> bool:
    """Group address bit (broadcast included)."""
    return bool(mac[0] & 1)


def parse_mac(mac: str | bytes | bytearray) -> bytes:
    """``"52:54:00:12:34:56"`` (or 6 raw bytes) as 6 bytes; ValueError otherwise."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        return bytes(mac)
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {mac!r}") from None


def format_mac(mac: bytes | bytearray | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit ones' complement of the ones' complement sum (RFC 1071), big-endian value.

    The sum is taken over native 16-bit words and byte-swapped at the end,
    which RFC 1071 section 2(B) shows is equivalent and lets ``memoryview.cast``
    do the work.
    """
    view = memoryview(data).cast("B")
    if len(view) % 2:
        view = memoryview(bytes(view) + b"\0")
    total = sum(view.cast("H")) if view else 0
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if struct.pack("=H", 1) == b"\x01\x00":  # little-endian host: words were read swapped
        total = ((total & 0xFF) << 8) | (total >> 8)
    total += initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- configuration space -------------------------------------------------------------------

#: ``struct virtio_net_config`` up to ``mtu``: mac, status, max_virtqueue_pairs,
#: mtu (speed/duplex and the RSS fields belong to features not offered).
CONFIG_LAYOUT = struct.Struct("<6sHHH")
CONFIG_MAC = 0
CONFIG_STATUS = 6
CONFIG_MAX_PAIRS = 8
CONFIG_MTU = 10
S_LINK_UP = 1
S_ANNOUNCE = 2


# -- control virtqueue ---------------------------------------------------------------------


class CtrlClass(enum.IntEnum):
    """``virtio_net_ctrl.class`` (device-types/net: Control Virtqueue)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class CtrlRx(enum.IntEnum):
    """Commands of class RX (Packet Receive Filtering); data: one byte, 0 off / 1 on."""

    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    """Commands of class MAC (Setting MAC Address Filtering)."""

    TABLE_SET = 0
    ADDR_SET = 1


class CtrlMq(enum.IntEnum):
    """Commands of class MQ (Automatic receive steering in multiqueue mode)."""

    VQ_PAIRS_SET = 0


#: The only command of class GUEST_OFFLOADS; data: le64 offload bitmask.
CTRL_GUEST_OFFLOADS_SET = 0
#: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN / _MAX.
MQ_PAIRS_MIN = 1
MQ_PAIRS_MAX = 0x8000


class CtrlAck(enum.IntEnum):
    OK = 0
    ERR = 1


def ctrl_queue_index(max_pairs: int, mq: bool) -> int:
    """Index of controlq: 2N, with N = max_virtqueue_pairs under MQ, else 1 (Virtqueues)."""
    return 2 * max_pairs if mq else 2


def mac_table(unicast: Iterable[bytes], multicast: Iterable[bytes]) -> bytes:
    """Command data of VIRTIO_NET_CTRL_MAC_TABLE_SET: two struct virtio_net_ctrl_mac."""
    uni, multi = list(unicast), list(multicast)
    return (
        struct.pack("<I", len(uni))
        + b"".join(uni)
        + struct.pack("<I", len(multi))
        + b"".join(multi)
    )
