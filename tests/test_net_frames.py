"""virtio-net frame checks, both ways, without a device: chains in, a frame or a Dropped out.

Transmit chains are real descriptor chains popped from a split ring in guest
memory; received frames are bounce buffers as the model's.
"""

from __future__ import annotations

import pytest

from helpers.net import DEV_MAC, OTHER_MAC, frame_of, udp_checksum_ok, udp_frame
from helpers.queues import make_pair
from pyvirtio.devices.net.control import RxFilter
from pyvirtio.devices.net.frames import (
    GSO_HOST,
    Dropped,
    GuestViews,
    adapt_rx,
    gather_tx,
    gso_allowed,
)
from pyvirtio.devices.net.wire import MAX_FRAME, Gso, HdrFlag, NetFeature, NetHeader
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DescriptorChain

F = NetFeature
CSUM_TSO4 = F.CSUM.mask | F.HOST_TSO4.mask


class Ring:
    """A split ring in guest memory: the test adds buffers, the device side pops chains."""

    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(1 << 20)
        self.alloc = GuestAllocator(self.mem, 0x10000, (1 << 20) - 0x10000)
        self.driver, self.device = make_pair(
            self.mem, 0x1000, 16, packed_ring=False, event_idx=False, indirect=False,
            indirect_addr=None,
        )  # fmt: skip

    def chain(self, *readable: bytes, writable: int = 0) -> DescriptorChain:
        ranges = []
        for data in readable:
            addr = self.alloc.alloc(len(data))
            self.mem.write(addr, data)
            ranges.append((addr, len(data)))
        wr = [(self.alloc.alloc(writable), writable)] if writable else []
        self.driver.add(ranges, wr, None)
        chain = self.device.pop()
        assert chain is not None
        return chain


@pytest.fixture
def ring() -> Ring:
    return Ring()


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize(
    ("gso", "flags", "features", "allowed"),
    [
        (Gso.TCPV4, HdrFlag.NEEDS_CSUM, F.HOST_TSO4.mask, True),
        (Gso.TCPV4, HdrFlag.NEEDS_CSUM, F.HOST_TSO6.mask, False),  # wrong TSO feature
        (Gso.TCPV4, 0, F.HOST_TSO4.mask, False),  # GSO without a checksum request
        (Gso.TCPV6 | Gso.ECN, HdrFlag.NEEDS_CSUM, F.HOST_TSO6.mask, False),  # ECN not acked
        (Gso.TCPV6 | Gso.ECN, HdrFlag.NEEDS_CSUM, F.HOST_TSO6.mask | F.HOST_ECN.mask, True),
        (Gso.UDP, HdrFlag.NEEDS_CSUM, F.HOST_UFO.mask, True),
        (Gso.UDP_L4, HdrFlag.NEEDS_CSUM, F.HOST_TSO4.mask | F.HOST_UFO.mask, False),  # unknown
    ],
)
def test_gso_allowed_by_type_ecn_and_checksum(
    gso: int, flags: int, features: int, allowed: bool
) -> None:
    assert gso_allowed(gso, flags, features, GSO_HOST, F.HOST_ECN.mask) is allowed


# -- transmit -------------------------------------------------------------------------------------


def test_a_one_buffer_frame_is_sent_as_a_view_of_guest_memory_with_a_clean_header(
    ring: Ring,
) -> None:
    frame = frame_of(100)
    dirty = NetHeader(flags=HdrFlag.DATA_VALID | HdrFlag.RSC_INFO, num_buffers=7)
    chain = ring.chain(dirty.pack() + frame)
    header, view = gather_tx(chain, GuestViews(), 0, 0)
    assert NetHeader.unpack(header) == NetHeader()  # the bits a driver must not set are gone
    assert isinstance(view, memoryview) and bytes(view) == frame
    ring.mem.write(chain.readable[0][0] + NetHeader.SIZE, b"\xaa")
    assert bytes(view)[0] == 0xAA  # no copy: the guest's own bytes


def test_header_and_frame_in_several_buffers(ring: Ring) -> None:
    frame = frame_of(300)
    header = NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 1448, 34, 16)
    chain = ring.chain(header.pack()[:5], header.pack()[5:] + frame[:50], frame[50:])
    assert joined(gather_tx(chain, GuestViews(), CSUM_TSO4, 0)) == header.pack() + frame


@pytest.mark.parametrize(
    ("header", "size", "features", "mtu_limit", "counter"),
    [
        (NetHeader(), 13, 0, 0, "tx_dropped_runt"),
        (NetHeader(), MAX_FRAME + 1, 0, 0, "tx_dropped_oversize"),
        (NetHeader(), 1519, 0, 1518, "tx_dropped_oversize"),
        (NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 0, 1448, 34, 16), 2000, 0, 0,
         "tx_dropped_bad_header"),  # TSO not negotiated
        (NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 0, 0, 34, 16), 2000, CSUM_TSO4, 0,
         "tx_dropped_bad_header"),  # gso_size 0
        (NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 90, 9), 100, F.CSUM.mask, 0,
         "tx_dropped_bad_header"),  # checksum field beyond the frame
        (NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 6), 100, 0, 0,
         "tx_dropped_bad_header"),  # checksum without CSUM
    ],
)  # fmt: skip
def test_transmit_refusals(
    ring: Ring, header: NetHeader, size: int, features: int, mtu_limit: int, counter: str
) -> None:
    chain = ring.chain(header.pack() + frame_of(size))
    with pytest.raises(Dropped) as dropped:
        gather_tx(chain, GuestViews(), features, mtu_limit)
    assert dropped.value.counter == counter and dropped.value.message


def test_a_gso_frame_may_exceed_the_mtu_and_a_writable_chain_is_refused(ring: Ring) -> None:
    header = NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 1448, 34, 16)
    assert gather_tx(ring.chain(header.pack() + frame_of(4000)), GuestViews(), CSUM_TSO4, 1518)
    with pytest.raises(Dropped) as dropped:
        gather_tx(ring.chain(NetHeader().pack() + frame_of(60), writable=8), GuestViews(), 0, 0)
    assert dropped.value.counter == "tx_dropped_bad_chain"


# -- receive --------------------------------------------------------------------------------------


def bounce(header: NetHeader, frame: bytes) -> tuple[bytearray, int]:
    buf = bytearray(NetHeader.SIZE + MAX_FRAME + 1)
    data = header.pack() + frame
    buf[: len(data)] = data
    return buf, len(data)


def test_a_partial_checksum_is_completed_for_a_driver_without_guest_csum() -> None:
    frame = udp_frame(b"payload" * 10, partial=True)
    buf, n = bounce(NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 6), frame)
    assert adapt_rx(buf, n, 0, 0, None, DEV_MAC) is True
    assert NetHeader.unpack(buf).flags == 0  # MUST be zero without GUEST_CSUM
    assert udp_checksum_ok(bytes(buf[NetHeader.SIZE : n]))


def test_with_guest_csum_the_header_keeps_what_the_driver_may_see() -> None:
    frame = udp_frame(b"x" * 40, partial=True)
    flags = HdrFlag.NEEDS_CSUM | HdrFlag.RSC_INFO
    buf, n = bounce(NetHeader(flags, 0, 0, 0, 34, 6), frame)
    assert adapt_rx(buf, n, F.GUEST_CSUM.mask, 0, None, DEV_MAC) is False
    assert NetHeader.unpack(buf).flags == HdrFlag.NEEDS_CSUM
    assert bytes(buf[NetHeader.SIZE : n]) == frame  # left for the driver to finish


@pytest.mark.parametrize(
    ("header", "size", "offloads", "mtu_limit", "counter"),
    [
        (NetHeader(), 13, 0, 0, "rx_dropped_runt"),
        (NetHeader(), MAX_FRAME + 1, 0, 0, "rx_dropped_oversize"),
        (NetHeader(), 1519, 0, 1518, "rx_dropped_oversize"),
        (NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 0, 1448, 34, 16), 4000, F.GUEST_CSUM.mask, 0,
         "rx_dropped_offload"),  # the driver did not accept TSO4
        (NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 95, 4), 100, 0, 0, "rx_dropped_bad_header"),
    ],
)  # fmt: skip
def test_receive_refusals(
    header: NetHeader, size: int, offloads: int, mtu_limit: int, counter: str
) -> None:
    buf, n = bounce(header, frame_of(size))
    with pytest.raises(Dropped) as dropped:
        adapt_rx(buf, min(n, len(buf)), offloads, mtu_limit, None, DEV_MAC)
    assert dropped.value.counter == counter and dropped.value.message


def test_the_receive_filter_drops_quietly() -> None:
    strict = RxFilter(promisc=False)
    buf, n = bounce(NetHeader(), frame_of(60, dst=OTHER_MAC))
    with pytest.raises(Dropped) as dropped:
        adapt_rx(buf, n, 0, 0, strict, DEV_MAC)
    assert dropped.value.counter == "rx_dropped_filter" and not dropped.value.message
    assert adapt_rx(buf, n, 0, 0, None, DEV_MAC) is False  # no CTRL_RX: no filter
    buf, n = bounce(NetHeader(), frame_of(60, dst=DEV_MAC))
    assert adapt_rx(buf, n, 0, 0, strict, DEV_MAC) is False


def test_guest_views_take_the_general_path_across_regions() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, 0x1000)
    mem.add_anonymous(0x1000, 0x1000)
    views = GuestViews()
    view = views.view(mem, 0x800, 0x100)
    assert view is not None and len(view) == 0x100
    assert views.view(mem, 0xF00, 0x200) is None
    mem.write(0x1800, b"second")
    view = views.view(mem, 0x1800, 6)
    assert view is not None and bytes(view) == b"second"
