"""virtio-net frames: what the device checks and rewrites in each one, both ways (device-types/net).

Pure: no back end, no queues, no counters; a frame that must not pass raises
:class:`Dropped`, which names the :data:`~.stats.STAT_KEYS` counter and the
log line, and the model counts and logs it.

* Transmit (device-types/net: Packet Transmission): :func:`gather_tx` checks
  a transmit chain (device-readable only, header and Ethernet header at
  least, at most :data:`~.wire.MAX_FRAME`, within the MTU without GSO) and
  its header's offload requests against the negotiated features, and
  returns what the back end gets: a header rebuilt from the checked fields
  (so bits a driver must not set, DATA_VALID and RSC_INFO, never pass) and
  the frame as views of guest memory (no copy).
* Receive (Processing of Incoming Packets): :func:`adapt_rx` checks a frame
  the back end gave (size, receive filter, MTU, GSO types the driver
  accepted) and makes its header say only what the driver negotiated,
  completing a partial checksum for a driver without GUEST_CSUM.
* :class:`GuestViews`: views of single guest buffers through the last region
  used, for one-buffer frames both ways.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from pyvirtio.devices.net.wire import (
    ETH_HLEN,
    HDR_SIZE,
    MAX_FRAME,
    Gso,
    HdrFlag,
    NetFeature,
    NetHeader,
    internet_checksum,
)
from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.common import DescriptorChain, VirtqueueError

if TYPE_CHECKING:
    from pyvirtio.devices.net.control import RxFilter

__all__ = [
    "GSO_GUEST",
    "GSO_HOST",
    "Dropped",
    "GuestViews",
    "adapt_rx",
    "gather_tx",
    "gso_allowed",
]

F = NetFeature
_HDR: Final = NetHeader.STRUCT
_CSUM_FIELDS: Final = struct.Struct("<HH")
_CSUM: Final = struct.Struct(">H")

#: gso_type (without ECN) -> the feature a driver needs to receive it / the
#: device needs negotiated to accept it from the driver.
GSO_GUEST: dict[int, int] = {
    Gso.TCPV4: F.GUEST_TSO4.mask,
    Gso.TCPV6: F.GUEST_TSO6.mask,
    Gso.UDP: F.GUEST_UFO.mask,
}
GSO_HOST: dict[int, int] = {
    Gso.TCPV4: F.HOST_TSO4.mask,
    Gso.TCPV6: F.HOST_TSO6.mask,
    Gso.UDP: F.HOST_UFO.mask,
}
# Plain ints on the per-frame paths: IntFlag arithmetic costs a call each.
_NEEDS_CSUM: Final = int(HdrFlag.NEEDS_CSUM)
_RX_FLAGS: Final = int(HdrFlag.NEEDS_CSUM | HdrFlag.DATA_VALID)
_GSO_ECN: Final = int(Gso.ECN)
_GSO_NONE: Final = int(Gso.NONE)
_F_CSUM: Final = F.CSUM.mask
_F_GUEST_CSUM: Final = F.GUEST_CSUM.mask
_F_HOST_ECN: Final = F.HOST_ECN.mask
_F_GUEST_ECN: Final = F.GUEST_ECN.mask
#: Offsets in struct virtio_net_hdr.
_GSO_TYPE: Final = 1
_CSUM_START: Final = 6


class Dropped(Exception):
    """A frame (or chain) the device drops: ``counter`` says which, the log line why."""

    def __init__(self, counter: str, message: str, *args: object) -> None:
        super().__init__(message % args)
        self.counter = counter
        self.message = message
        self.log_args = args


def gso_allowed(
    gso: int, flags: int, features: int, need_by_type: dict[int, int], ecn_feature: int
) -> bool:
    """Whether a GSO frame (``gso`` not NONE) may cross to a side with ``features``.

    Its type needs its own TSO/UFO feature (``need_by_type``), the ECN bit
    needs ``ecn_feature``, and it must ask for a checksum (device-types/net:
    Packet Transmission and Processing of Incoming Packets).  Transmit
    checks host features, receive the guest's offloads.
    """
    return (
        bool(features & need_by_type.get(gso & ~_GSO_ECN, 0))
        and (not gso & _GSO_ECN or bool(features & ecn_feature))
        and bool(flags & _NEEDS_CSUM)
    )


class GuestViews:
    """Views of ``[addr, addr + length)`` in guest memory through the last region used.

    One-buffer frames go through here instead of ``GuestMemory.views``, with
    the region kept as a :class:`~pyvirtio.memory.RegionWindow`; a buffer
    across two regions (allowed, and rare) gets None and takes the general
    path.
    """

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window = GuestMemory.NO_WINDOW

    def view(self, mem: GuestMemory, addr: int, length: int) -> memoryview | None:
        window = self._window
        if not window.covers(mem, addr, length):
            try:
                window = mem.window(addr)
            except GuestMemoryError as exc:  # regions removed since the chain was parsed
                raise VirtqueueError(str(exc)) from exc
            if addr + length > window.end:
                return None
            self._window = window
        offset = addr - window.base
        return window.view[offset : offset + length]


def gather_tx(
    chain: DescriptorChain, views: GuestViews, features: int, mtu_limit: int
) -> list[bytes | memoryview]:
    """Check a transmit chain against the negotiated ``features``; raises :class:`Dropped`.

    Returns what the back end gets: the rebuilt header, then the frame's
    views of guest memory (``chain.readable_len - HDR_SIZE`` bytes).
    ``mtu_limit`` is the largest frame without GSO (0: no MTU negotiated).
    """
    if chain.writable:
        raise Dropped("tx_dropped_bad_chain", "transmit chain has device-writable part")
    total = chain.readable_len
    if total < HDR_SIZE + ETH_HLEN:
        raise Dropped("tx_dropped_runt", "transmit of %d bytes, header included", total)
    frame_len = total - HDR_SIZE
    if frame_len > MAX_FRAME:
        raise Dropped("tx_dropped_oversize", "transmit frame of %d bytes", frame_len)
    readable = chain.readable
    # Header and frame in one buffer, as Linux sends them: one view.
    whole = None
    if len(readable) == 1:
        addr, length = readable[0]
        whole = views.view(chain.mem, addr, length)
    if whole is not None:
        flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack_from(whole)
        frame: list[memoryview] = [whole[HDR_SIZE:]]
    else:
        head = chain.read(0, HDR_SIZE)
        flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack(head)
        frame = chain.readable_views(HDR_SIZE)
    if gso & ~_GSO_ECN:
        if not gso_allowed(gso, flags, features, GSO_HOST, _F_HOST_ECN) or gso_size == 0:
            raise Dropped(
                "tx_dropped_bad_header",
                "transmit with gso_type %#x, gso_size %d not allowed",
                gso,
                gso_size,
            )
    else:
        gso = _GSO_NONE
        if mtu_limit and frame_len > mtu_limit:
            raise Dropped("tx_dropped_oversize", "transmit of %d bytes above the MTU", frame_len)
    if flags & _NEEDS_CSUM and (not features & _F_CSUM or csum_start + csum_offset + 2 > frame_len):
        raise Dropped(
            "tx_dropped_bad_header",
            "transmit asks checksum at %d+%d of a %d-byte frame%s",
            csum_start,
            csum_offset,
            frame_len,
            "" if features & _F_CSUM else " without VIRTIO_NET_F_CSUM",
        )
    header = _HDR.pack(flags & _NEEDS_CSUM, gso, hdr_len, gso_size, csum_start, csum_offset, 0)
    return [header, *frame]


def adapt_rx(
    buf: bytearray,
    n: int,
    offloads: int,
    mtu_limit: int,
    rx_filter: RxFilter | None,
    mac: bytes,
) -> bool:
    """Check the ``n``-byte frame (header included) in ``buf`` and adapt its header.

    ``buf`` is one byte longer than the largest frame, so a back end's read
    that fills it was too long.  ``rx_filter`` (None: no CTRL_RX) decides
    whether a driver at ``mac`` gets the frame.  The header is made to say
    only what the driver's ``offloads`` allow: without GUEST_CSUM ``flags``
    is 0 and a partial checksum is completed here; GSO types the driver did
    not accept are dropped (the device cannot segment); ``num_buffers`` is
    left for placing.  Returns whether a checksum was completed; raises
    :class:`Dropped`.
    """
    if n >= len(buf):
        raise Dropped("rx_dropped_oversize", "frame from the back end above %d bytes", MAX_FRAME)
    if n < HDR_SIZE + ETH_HLEN:
        raise Dropped("rx_dropped_runt", "runt frame of %d bytes from the back end", n)
    frame_len = n - HDR_SIZE
    if rx_filter is not None and not rx_filter.accepts(bytes(buf[HDR_SIZE : HDR_SIZE + 6]), mac):
        raise Dropped("rx_dropped_filter", "")
    flags = buf[0]
    gso = buf[_GSO_TYPE]
    if gso & ~_GSO_ECN:
        if not gso_allowed(gso, flags, offloads, GSO_GUEST, _F_GUEST_ECN):
            raise Dropped("rx_dropped_offload", "GSO frame (type %#x) the driver cannot take", gso)
    else:
        gso = _GSO_NONE
        if mtu_limit and frame_len > mtu_limit:
            raise Dropped("rx_dropped_oversize", "frame of %d bytes above the MTU", frame_len)
    completed = False
    if flags & _NEEDS_CSUM:
        csum_start, csum_offset = _CSUM_FIELDS.unpack_from(buf, _CSUM_START)
        if csum_start + csum_offset + 2 > frame_len:
            raise Dropped(
                "rx_dropped_bad_header",
                "checksum at %d+%d of a %d-byte frame",
                csum_start,
                csum_offset,
                frame_len,
            )
        if not offloads & _F_GUEST_CSUM:
            _complete_checksum(buf, n, csum_start, csum_offset)
            completed = True
    if not offloads & _F_GUEST_CSUM:
        flags = 0  # MUST be zero without GUEST_CSUM
    buf[0] = flags & _RX_FLAGS
    buf[_GSO_TYPE] = gso
    return completed


def _complete_checksum(buf: bytearray, n: int, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum for a driver without GUEST_CSUM.

    The field at csum_start + csum_offset holds the pseudo-header sum;
    summing from csum_start to the end with it in place gives the value to
    store (Packet Transmission, item 3).
    """
    value = internet_checksum(memoryview(buf)[HDR_SIZE + csum_start : n]) or 0xFFFF
    _CSUM.pack_into(buf, HDR_SIZE + csum_start + csum_offset, value)
