"""The virtio-net device model, driven directly on its rings (the test is the driver).

Each feature of the device and each kind of bad input from the driver or the
network: what reaches the other side, what is dropped, which counter says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from helpers.net import (
    BCAST,
    DEV_MAC,
    IP_A,
    IP_B,
    MCAST,
    OTHER_MAC,
    PEER_MAC,
    NetBench,
    frame_of,
    udp_checksum_ok,
    udp_frame,
)
from pyvirtio.constants import Feature
from pyvirtio.device import DeviceState, LifecycleError
from pyvirtio.devices.net import STAT_KEYS, Net, NetHeader, SocketPairBackend, poll_devices
from pyvirtio.devices.net.backends import TUN_F_CSUM, TUN_F_TSO4, tun_offload_flags
from pyvirtio.devices.net.wire import (
    CONFIG_LAYOUT,
    GUEST_OFFLOADS,
    HDR_SIZE,
    MAX_FRAME,
    CtrlAck,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    Gso,
    HdrFlag,
    NetFeature,
    format_mac,
    internet_checksum,
    mac_table,
    missing_requirements,
    parse_mac,
)

F = NetFeature
OK, ERR = CtrlAck.OK, CtrlAck.ERR


@pytest.fixture
def bench() -> Iterator[NetBench]:
    b = NetBench()
    yield b
    b.close()


def stats_nonzero(net: Net) -> dict[str, int]:
    return {k: v for k, v in net.stats.items() if v}


# -- construction, features, config space -------------------------------------------------------


def test_constructor_validates() -> None:
    backend, _peer = SocketPairBackend.pair()
    with pytest.raises(ValueError):
        Net(backend, mtu=67)
    with pytest.raises(ValueError):
        Net(backend, mtu=65536)
    with pytest.raises(ValueError):
        Net(backend, queue_pairs=0)
    with pytest.raises(ValueError):
        Net(backend, mac="01:00:5e:00:00:01")  # multicast
    with pytest.raises(ValueError):
        Net(backend, mac="52:54:00")
    random_mac = Net(backend).mac
    assert random_mac[0] & 3 == 2  # unicast, locally administered
    assert Net(backend, mac=b"\x02" * 6).mac == b"\x02" * 6


def test_offer_and_queue_layout() -> None:
    backend, _peer = SocketPairBackend.pair()
    one = Net(backend)
    assert not one.offered_features & F.MQ.mask
    assert one.offered_features & Feature.VERSION_1.mask
    for feature in (F.MAC, F.STATUS, F.MTU, F.MRG_RXBUF, F.CTRL_VQ, F.CTRL_RX, F.GUEST_TSO4):
        assert one.offered_features & feature.mask, feature
    assert one.num_queues == 3
    four = Net(backend, queue_pairs=4, queue_size=64)
    assert four.offered_features & F.MQ.mask
    assert four.queue_max_sizes == (64,) * 9


@pytest.mark.parametrize(
    ("feature", "needs"),
    [
        (F.GUEST_TSO4, F.GUEST_CSUM),
        (F.GUEST_TSO6, F.GUEST_CSUM),
        (F.GUEST_UFO, F.GUEST_CSUM),
        (F.HOST_TSO4, F.CSUM),
        (F.HOST_TSO6, F.CSUM),
        (F.HOST_UFO, F.CSUM),
        (F.CTRL_RX, F.CTRL_VQ),
        (F.CTRL_MAC_ADDR, F.CTRL_VQ),
        (F.MQ, F.CTRL_VQ),
    ],
)
def test_features_acceptable_enforces_requirements(feature: NetFeature, needs: NetFeature) -> None:
    backend, _peer = SocketPairBackend.pair()
    net = Net(backend, queue_pairs=2)
    offer = net.offered_features
    assert net.features_acceptable(offer)
    base = Feature.VERSION_1.mask | feature.mask
    # Pull in what the feature's own requirement chain needs, except ``needs``.
    for extra in (F.GUEST_CSUM, F.CSUM, F.CTRL_VQ):
        if extra != needs:
            base |= extra.mask
    assert not net.features_acceptable(base), feature
    assert net.features_acceptable(base | needs.mask), feature
    assert not net.features_acceptable(offer & ~needs.mask)


def test_ecn_requires_a_tso_feature() -> None:
    backend, _peer = SocketPairBackend.pair()
    net = Net(backend)
    v1 = Feature.VERSION_1.mask
    assert not net.features_acceptable(v1 | F.GUEST_CSUM.mask | F.GUEST_ECN.mask)
    assert net.features_acceptable(v1 | F.GUEST_CSUM.mask | F.GUEST_TSO6.mask | F.GUEST_ECN.mask)
    assert not net.features_acceptable(v1 | F.CSUM.mask | F.HOST_ECN.mask)
    assert net.features_acceptable(v1 | F.CSUM.mask | F.HOST_TSO4.mask | F.HOST_ECN.mask)
    assert missing_requirements(F.GUEST_ECN.mask) == ["GUEST_ECN requires GUEST_TSO4 or GUEST_TSO6"]


def test_config_space_and_link(bench: NetBench) -> None:
    net = bench.net
    mac, status, pairs, mtu = CONFIG_LAYOUT.unpack(net.read_config(0, CONFIG_LAYOUT.size))
    assert (mac, status, pairs, mtu) == (DEV_MAC, 1, 1, 1500)
    generation = net.config_generation
    net.set_link(False)
    assert net.read_config(6, 2) == b"\0\0"
    assert net.config_generation != generation
    assert bench.rig.interrupt.config_changes == 1
    net.set_link(False)  # no change, no notification
    assert bench.rig.interrupt.config_changes == 1
    net.write_config(0, b"\xaa" * 6)  # read-only: ignored
    assert net.read_config(0, 6) == DEV_MAC
    net.set_link(True)
    assert net.read_config(6, 2) == b"\x01\0"


def test_mac_helpers() -> None:
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert parse_mac("52-54-00-12-34-5") == bytes.fromhex("52540012345f")[:5] + b"\x05"
    assert format_mac(bytes.fromhex("525400123456")) == "52:54:00:12:34:56"
    for bad in ("52:54:00:12:34", "52:54:00:12:34:zz", "525400123456"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError):
        parse_mac(b"\0" * 5)


def test_tun_offload_mapping() -> None:
    assert tun_offload_flags(0) == 0
    assert tun_offload_flags(F.GUEST_TSO4.mask) == 0  # no TSO without checksum offload
    assert tun_offload_flags(F.GUEST_CSUM.mask | F.GUEST_TSO4.mask) == TUN_F_CSUM | TUN_F_TSO4
    assert tun_offload_flags(GUEST_OFFLOADS) == 0x1F


# -- transmit ----------------------------------------------------------------------------------


def test_transmit_reaches_the_wire_with_a_clean_header(bench: NetBench) -> None:
    frame = frame_of(100, dst=PEER_MAC, src=DEV_MAC)
    # DATA_VALID and RSC_INFO are for the device to set; num_buffers is unused on transmit.
    token = bench.transmit(frame, NetHeader(flags=HdrFlag.DATA_VALID | 4, num_buffers=7))
    assert bench.tx_used() == [(token, 0)]
    (sent,) = bench.wire()
    assert sent == bytes(HDR_SIZE) + frame
    assert bench.net.stats["tx_frames"] == 1 and bench.net.stats["tx_bytes"] == 100
    assert bench.rig.interrupt.used == [1]


def test_transmit_with_header_split_across_descriptors(bench: NetBench) -> None:
    frame = frame_of(300, dst=PEER_MAC)
    for split_at in (5, 12, 40):
        bench.transmit(frame, split_at=split_at)
    assert bench.wire() == [bytes(HDR_SIZE) + frame] * 3


def test_transmit_offload_header_is_forwarded(bench: NetBench) -> None:
    frame = udp_frame(b"x" * 3000, dst_mac=PEER_MAC, partial=True)
    header = NetHeader(
        flags=HdrFlag.NEEDS_CSUM,
        gso_type=Gso.UDP,
        hdr_len=42,
        gso_size=1400,
        csum_start=34,
        csum_offset=6,
    )
    bench.transmit(frame, header)
    (sent,) = bench.wire()
    assert NetHeader.unpack(sent) == header and sent[HDR_SIZE:] == frame


@pytest.mark.parametrize(
    ("case", "counter"),
    [
        ("shorter-than-header", "tx_dropped_runt"),
        ("runt-frame", "tx_dropped_runt"),
        ("oversize", "tx_dropped_oversize"),
        ("above-mtu", "tx_dropped_oversize"),
        ("gso-not-negotiated", "tx_dropped_bad_header"),
        ("gso-without-needs-csum", "tx_dropped_bad_header"),
        ("gso-size-zero", "tx_dropped_bad_header"),
        ("unknown-gso-type", "tx_dropped_bad_header"),
        ("ecn-without-host-ecn", "tx_dropped_bad_header"),
        ("csum-without-feature", "tx_dropped_bad_header"),
        ("csum-beyond-frame", "tx_dropped_bad_header"),
        ("writable-descriptor", "tx_dropped_bad_chain"),
    ],
)
def test_bad_transmits_are_dropped_and_counted(
    case: str, counter: str, caplog: pytest.LogCaptureFixture
) -> None:
    drop = {
        "gso-not-negotiated": F.HOST_TSO4.mask | F.HOST_ECN.mask,
        "ecn-without-host-ecn": F.HOST_ECN.mask,
        "csum-without-feature": F.CSUM.mask
        | F.HOST_TSO4.mask
        | F.HOST_TSO6.mask
        | F.HOST_UFO.mask
        | F.HOST_ECN.mask,
    }.get(case, 0)
    bench = NetBench(drop=drop)
    frame = frame_of(200, dst=PEER_MAC)
    tso = NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 1448, 34, 16)
    cases: dict[str, tuple[bytes, NetHeader | bytes | None, list[int]]] = {
        "shorter-than-header": (b"", b"\0" * 5, []),
        "runt-frame": (frame[:13], None, []),
        "oversize": (frame_of(MAX_FRAME + 1, dst=PEER_MAC), tso, []),
        "above-mtu": (frame_of(1500 + 14 + 4 + 1, dst=PEER_MAC), None, []),
        "gso-not-negotiated": (frame, tso, []),
        "gso-without-needs-csum": (frame, NetHeader(0, Gso.TCPV4, 54, 1448), []),
        "gso-size-zero": (frame, NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 0, 34, 16), []),
        "unknown-gso-type": (frame, NetHeader(HdrFlag.NEEDS_CSUM, 0x25, 54, 100, 34, 16), []),
        "ecn-without-host-ecn": (
            frame,
            NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4 | Gso.ECN, 54, 1448, 34, 16),
            [],
        ),
        "csum-without-feature": (frame, NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 6), []),
        "csum-beyond-frame": (frame, NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 190, 9), []),
        "writable-descriptor": (frame, None, [16]),
    }
    data, header, writable = cases[case]
    with caplog.at_level(logging.WARNING):
        token = bench.transmit(data, header, writable=writable)
        again = bench.transmit(data, header, writable=writable)  # counted, not logged again
    assert bench.tx_used() == [(token, 0), (again, 0)]
    assert bench.wire() == []
    assert bench.net.stats[counter] == 2
    assert bench.net.stats["tx_frames"] == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # The device goes on serving.
    good = frame_of(60, dst=PEER_MAC)
    bench.transmit(good)
    assert bench.wire() == [bytes(HDR_SIZE) + good]
    assert not bench.net.needs_reset


def test_mtu_limit_applies_only_when_negotiated() -> None:
    size = 1500 + 14 + 4 + 1
    without = NetBench(drop=F.MTU.mask)
    without.transmit(frame_of(size, dst=PEER_MAC))
    assert len(without.wire()) == 1
    with_mtu = NetBench()
    with_mtu.transmit(frame_of(size - 1, dst=PEER_MAC))  # VLAN-tagged full-size frame
    assert len(with_mtu.wire()) == 1


def test_transmit_backpressure_keeps_frames_and_order() -> None:
    bench = NetBench(size=256, mtu=9000)
    net = bench.net
    frames = [frame_of(9000, dst=PEER_MAC, seed=i) for i in range(200)]
    for frame in frames:
        bench.transmit(frame)
    # The peer does not read: the socket fills and the device holds the rest.
    assert net.wants_writable()
    ((fd, events),) = net.host_fds()
    assert fd == bench.backend.fileno() and events & select.POLLOUT
    used_before = len(bench.tx_used())
    assert 0 < used_before < 200
    got = []
    while len(got) < 200:
        got.extend(bench.wire(timeout=1.0))
        poll_devices([net], 0)
    assert got == [bytes(HDR_SIZE) + f for f in frames]
    assert not net.wants_writable()
    assert len(bench.tx_used()) == 200 - used_before
    assert net.stats["tx_frames"] == 200


def test_transmit_while_link_down_is_dropped(bench: NetBench) -> None:
    bench.net.set_link(False)
    token = bench.transmit(frame_of(100, dst=PEER_MAC))
    assert bench.tx_used() == [(token, 0)]
    assert bench.wire() == []
    assert bench.net.stats["tx_dropped_link_down"] == 1


def test_backend_errors_are_counted() -> None:
    bench = NetBench(kind=socket.SOCK_DGRAM)
    bench.backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    # A datagram larger than the socket can ever send: EMSGSIZE, not "would block".
    bench.transmit(frame_of(MAX_FRAME, dst=PEER_MAC), NetHeader(1, Gso.TCPV4, 54, 1448, 34, 16))
    assert bench.net.stats["tx_backend_errors"] == 1
    assert not bench.net.wants_writable()


# -- receive -----------------------------------------------------------------------------------


def test_receive_into_posted_buffer(bench: NetBench) -> None:
    (token,) = bench.post_rx()
    frame = frame_of(500)
    bench.inject(frame, NetHeader(flags=HdrFlag.DATA_VALID, num_buffers=9))
    ((header, got),) = bench.received()
    assert got == frame
    assert header == NetHeader(flags=HdrFlag.DATA_VALID, num_buffers=1)
    assert bench.net.stats["rx_frames"] == 1 and bench.net.stats["rx_bytes"] == 500
    assert bench.rig.interrupt.used == [0]
    del token


def test_no_buffers_leaves_frames_in_the_back_end(bench: NetBench) -> None:
    net = bench.net
    frames = [frame_of(100 + i, seed=i) for i in range(5)]
    for frame in frames:
        bench.inject(frame)
    # Nothing taken: the frames wait in the socket, and the device stopped
    # asking for POLLIN, so a level-triggered loop does not spin.
    assert bench.backend_has_data()
    assert net.host_fds() == []
    assert net.stats["rx_frames"] == 0
    bench.post_rx(3)
    assert [f for _, f in bench.received()] == frames[:3]
    assert net.host_fds() == []  # out of buffers again, two frames still waiting
    bench.post_rx(3)
    assert [f for _, f in bench.received()] == frames[3:]
    assert not bench.backend_has_data()
    assert net.host_fds() == [(bench.backend.fileno(), select.POLLIN)]


def test_mergeable_buffers_spread_a_frame() -> None:
    bench = NetBench()
    tokens = bench.post_rx(8, size=256)
    frame = frame_of(1000)
    bench.inject(frame)
    used = bench.rx_used()
    assert [t for t, _ in used] == tokens[:4]  # 1012 bytes: 3 full buffers and a part
    assert [w for _, w in used] == [256, 256, 256, 1012 - 3 * 256]
    first = bench.rx_data(used[0][0], used[0][1])
    assert NetHeader.unpack(first).num_buffers == 4
    data = b"".join(bench.rx_data(t, w) for t, w in used)
    assert data[HDR_SIZE:] == frame


def test_mergeable_buffers_run_out_mid_frame() -> None:
    bench = NetBench()
    bench.post_rx(2, size=256)
    frame = frame_of(1000)
    bench.inject(frame)
    assert bench.rx_used() == []  # two buffers taken, waiting for more
    assert bench.net.host_fds() == []
    bench.post_rx(1, size=256)
    assert bench.rx_used() == []
    bench.post_rx(2, size=1024)
    ((header, got),) = bench.received()
    assert header.num_buffers == 4 and got == frame


def test_without_mergeable_buffers_a_frame_needs_one_chain() -> None:
    bench = NetBench(drop=F.MRG_RXBUF.mask)
    small, big = bench.post_rx(1, size=600) + bench.post_rx(1, size=2048)
    bench.inject(frame_of(1000, seed=1))  # does not fit the 600-byte chain: dropped
    bench.inject(frame_of(500, seed=2))  # goes into that same chain
    bench.inject(frame_of(1000, seed=3))
    frames = bench.received()
    assert [f for _, f in frames] == [frame_of(500, seed=2), frame_of(1000, seed=3)]
    assert all(h.num_buffers == 1 for h, _ in frames)
    assert bench.net.stats["rx_dropped_no_room"] == 1
    assert [t for t, _ in bench.rx_used()] == []
    del small, big


def test_mergeable_frame_larger_than_the_whole_queue_is_dropped() -> None:
    bench = NetBench(size=4)
    bench.post_rx(4, size=64)
    bench.inject(frame_of(1000))
    assert bench.net.stats["rx_dropped_no_room"] == 1
    bench.inject(frame_of(100))
    ((header, got),) = bench.received()
    assert got == frame_of(100) and header.num_buffers == 2


def test_bad_receive_chains_are_returned_and_counted(bench: NetBench) -> None:
    readable = bench.rig.post(0, [b"junk"], [2048], "readable")
    tiny = bench.rig.post(0, (), [8], "tiny")
    (good,) = bench.post_rx()
    frame = frame_of(300)
    bench.inject(frame)
    used = bench.rx_used()
    assert used[:2] == [("readable", 0), ("tiny", 0)]
    assert used[2][0] == good
    assert bench.rx_data(good, used[2][1])[HDR_SIZE:] == frame
    assert bench.net.stats["rx_bad_chain"] == 2
    del readable, tiny


@pytest.mark.parametrize(
    ("frame", "header", "counter"),
    [
        (b"\x01" * 13, None, "rx_dropped_runt"),
        (b"", b"\0" * 4, "rx_dropped_runt"),
        (frame_of(MAX_FRAME + 1), NetHeader(1, Gso.TCPV4, 54, 1448, 34, 16), "rx_dropped_oversize"),
        (frame_of(1500 + 18 + 1), None, "rx_dropped_oversize"),
        (frame_of(3000), NetHeader(1, Gso.TCPV6, 74, 1428, 54, 16), "rx_dropped_offload"),
        (frame_of(3000), NetHeader(1, Gso.UDP_L4, 42, 1400, 34, 6), "rx_dropped_offload"),
        (frame_of(3000), NetHeader(0, Gso.TCPV4, 54, 1448, 0, 0), "rx_dropped_offload"),
        (frame_of(100), NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 90, 9), "rx_dropped_bad_header"),
    ],
)
def test_bad_frames_from_the_network_are_dropped(
    frame: bytes, header: NetHeader | bytes | None, counter: str
) -> None:
    bench = NetBench(drop=F.GUEST_TSO6.mask | F.GUEST_ECN.mask)
    bench.post_rx(4, size=4096)
    bench.inject(frame, header)
    assert bench.received() == []
    assert bench.net.stats[counter] == 1
    good = frame_of(64)
    bench.inject(good)
    assert [f for _, f in bench.received()] == [good]


def test_gso_frames_reach_a_driver_that_takes_them() -> None:
    bench = NetBench(size=64)
    bench.post_rx(40, size=2048)
    header = NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4 | Gso.ECN, 54, 1448, 34, 16)
    frame = frame_of(60000)
    bench.inject(frame, header)
    ((got_header, got),) = bench.received()
    assert got == frame
    assert got_header.gso_type == Gso.TCPV4 | Gso.ECN and got_header.gso_size == 1448
    assert got_header.flags == HdrFlag.NEEDS_CSUM


def test_partial_checksum_is_completed_for_a_driver_without_guest_csum() -> None:
    drop = GUEST_OFFLOADS
    bench = NetBench(drop=drop)
    bench.post_rx(2)
    frame = udp_frame(b"hello, checksum" * 7, partial=True)
    assert not udp_checksum_ok(frame)
    bench.inject(frame, NetHeader(HdrFlag.NEEDS_CSUM | HdrFlag.DATA_VALID, 0, 0, 0, 34, 6))
    ((header, got),) = bench.received()
    assert header.flags == 0  # MUST be zero without GUEST_CSUM
    assert udp_checksum_ok(got)
    assert got == udp_frame(b"hello, checksum" * 7)
    assert bench.net.stats["rx_checksums_completed"] == 1


def test_partial_checksum_passes_to_a_driver_with_guest_csum(bench: NetBench) -> None:
    bench.post_rx(1)
    frame = udp_frame(b"abc", partial=True)
    header = NetHeader(HdrFlag.NEEDS_CSUM | HdrFlag.RSC_INFO, 0, 0, 0, 34, 6)
    bench.inject(frame, header)
    ((got_header, got),) = bench.received()
    assert got == frame and got_header.flags == HdrFlag.NEEDS_CSUM


def test_mtu_on_receive(bench: NetBench) -> None:
    bench.post_rx(2, size=4096)
    bench.inject(frame_of(1518))  # full-size VLAN-tagged frame
    bench.inject(frame_of(1519))
    assert [len(f) for _, f in bench.received()] == [1518]
    assert bench.net.stats["rx_dropped_oversize"] == 1


def test_receive_batches_one_interrupt(bench: NetBench) -> None:
    bench.post_rx(10)
    for i in range(5):
        bench.peer.send(bytes(HDR_SIZE) + frame_of(80, seed=i))
    bench.net.backend_readable()
    assert len(bench.received()) == 5
    assert bench.rig.interrupt.used == [0]


# -- receive filter ------------------------------------------------------------------------------


def deliver(bench: NetBench, dst: bytes) -> bool:
    before = bench.net.stats["rx_frames"]
    bench.post_rx(1)
    bench.inject(frame_of(64, dst=dst))
    bench.rx_used()
    return bench.net.stats["rx_frames"] > before


def test_filter_is_promiscuous_until_the_driver_says_otherwise(bench: NetBench) -> None:
    assert deliver(bench, OTHER_MAC)
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0])) == OK
    assert not deliver(bench, OTHER_MAC)
    assert bench.net.stats["rx_dropped_filter"] == 1
    assert deliver(bench, DEV_MAC)
    assert deliver(bench, BCAST)
    assert not deliver(bench, MCAST)


def test_without_ctrl_rx_every_frame_is_delivered() -> None:
    bench = NetBench(drop=F.CTRL_RX.mask | F.CTRL_RX_EXTRA.mask)
    assert deliver(bench, OTHER_MAC)
    assert deliver(bench, MCAST)
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0])) == ERR


def test_filter_modes(bench: NetBench) -> None:
    def rx(command: CtrlRx, on: bool) -> None:
        assert bench.ctrl(bytes([CtrlClass.RX, command, int(on)])) == OK

    rx(CtrlRx.PROMISC, False)
    rx(CtrlRx.ALLMULTI, True)
    assert deliver(bench, MCAST)
    rx(CtrlRx.NOMULTI, True)  # beats ALLMULTI, not broadcast
    assert not deliver(bench, MCAST)
    assert deliver(bench, BCAST)
    rx(CtrlRx.NOBCAST, True)
    assert not deliver(bench, BCAST)
    rx(CtrlRx.ALLUNI, True)
    assert deliver(bench, OTHER_MAC)
    rx(CtrlRx.NOUNI, True)  # beats ALLUNI
    assert not deliver(bench, OTHER_MAC)
    assert not deliver(bench, DEV_MAC)
    rx(CtrlRx.PROMISC, True)  # beats everything
    for dst in (OTHER_MAC, DEV_MAC, MCAST, BCAST):
        assert deliver(bench, dst)


def test_mac_tables_and_address(bench: NetBench) -> None:
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0])) == OK
    table = mac_table([OTHER_MAC], [MCAST])
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + table) == OK
    assert deliver(bench, OTHER_MAC) and deliver(bench, MCAST)
    assert not deliver(bench, bytes.fromhex("01005e000002"))
    new = bytes.fromhex("020000000042")
    generation = bench.net.config_generation
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.ADDR_SET]) + new) == OK
    assert bench.net.read_config(0, 6) == new and bench.net.config_generation != generation
    assert deliver(bench, new) and not deliver(bench, DEV_MAC)
    # More addresses than the table holds: that kind is accepted wholesale.
    many = [bytes([1, 0, 0x5E, 0, 1, i]) for i in range(65)]
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + mac_table([], many)) == OK
    assert deliver(bench, bytes.fromhex("01005e7f0001"))
    assert not deliver(bench, OTHER_MAC)  # the unicast table was replaced by an empty one


# -- control queue: bad commands -------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        b"",
        bytes([CtrlClass.RX]),
        bytes([CtrlClass.RX, CtrlRx.PROMISC]),
        bytes([CtrlClass.RX, CtrlRx.PROMISC, 1, 1]),
        bytes([CtrlClass.RX, 9, 1]),
        bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]),
        bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + struct.pack("<I", 2) + OTHER_MAC,
        bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + mac_table([], []) + b"x",
        bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + struct.pack("<I", 0xFFFFFFFF),
        bytes([CtrlClass.MAC, CtrlMac.ADDR_SET]) + DEV_MAC[:5],
        bytes([CtrlClass.MAC, CtrlMac.ADDR_SET]) + MCAST,
        bytes([CtrlClass.MAC, 7]),
        bytes([CtrlClass.VLAN, 0, 1, 0]),
        bytes([CtrlClass.ANNOUNCE, 0]),
        bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, 1, 0]),  # MQ not offered (one pair)
        bytes([CtrlClass.GUEST_OFFLOADS, 0]) + struct.pack("<Q", 1 << 20),
        bytes([CtrlClass.GUEST_OFFLOADS, 0]) + struct.pack("<Q", F.GUEST_TSO4.mask),
        bytes([CtrlClass.GUEST_OFFLOADS, 0, 1]),
        bytes([CtrlClass.GUEST_OFFLOADS, 1]) + bytes(8),
        bytes([42, 0]),
        bytes([CtrlClass.RX, CtrlRx.PROMISC]) + bytes(70000),
    ],
)
def test_malformed_control_commands_get_err(bench: NetBench, command: bytes) -> None:
    assert bench.ctrl(command) == ERR
    assert bench.net.stats["ctrl_errors"] == 1
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.ALLMULTI, 1])) == OK
    assert not bench.net.needs_reset


def test_rx_extra_commands_need_their_feature() -> None:
    bench = NetBench(drop=F.CTRL_RX_EXTRA.mask)
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.ALLMULTI, 1])) == OK
    for command in (CtrlRx.ALLUNI, CtrlRx.NOMULTI, CtrlRx.NOUNI, CtrlRx.NOBCAST):
        assert bench.ctrl(bytes([CtrlClass.RX, command, 1])) == ERR


def test_control_command_without_room_for_the_ack(bench: NetBench) -> None:
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0]), ack_room=0) is None
    assert bench.net.stats["ctrl_bad_chain"] == 1
    assert bench.net.rx_filter.promisc  # not applied


def test_guest_offloads_command() -> None:
    bench = NetBench()
    assert bench.backend.guest_features == GUEST_OFFLOADS  # all acked at activation
    only_csum = F.GUEST_CSUM.mask
    command = bytes([CtrlClass.GUEST_OFFLOADS, 0]) + struct.pack("<Q", only_csum)
    assert bench.ctrl(command) == OK
    assert bench.backend.guest_features == only_csum and bench.net.guest_offloads == only_csum
    bench.post_rx(2, size=4096)
    bench.inject(frame_of(3000), NetHeader(1, Gso.TCPV4, 54, 1448, 34, 16))
    assert bench.net.stats["rx_dropped_offload"] == 1


# -- multiqueue ------------------------------------------------------------------------------------


def test_multiqueue_pairs_and_steering() -> None:
    bench = NetBench(queue_pairs=2)
    net = bench.net
    assert bench.ctrl_index == 4
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 3)) == ERR
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 0)) == ERR
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 2)) == OK
    assert net.queue_pairs == 2
    bench.post_rx(8, pair=0)
    bench.post_rx(8, pair=1)
    # Each flow's replies go to the pair it was last transmitted from.
    for pair in (1, 0):
        for sport in range(5):
            out = udp_frame(b"q", dst_mac=PEER_MAC, src_mac=DEV_MAC, src=IP_B, dst=IP_A,
                            sport=2000 + sport, dport=7 + pair)  # fmt: skip
            bench.transmit(out, pair=pair)
            reply = udp_frame(b"r", src=IP_A, dst=IP_B, sport=7 + pair, dport=2000 + sport)
            bench.inject(reply)
        assert len(bench.received(pair)) == 5, pair
    assert len(bench.wire()) == 10
    # A flow never transmitted goes to some pair in use; non-IP frames to pair 0.
    bench.inject(udp_frame(b"new", sport=1, dport=2))
    bench.inject(frame_of(70))
    assert len(bench.received(0)) + len(bench.received(1)) == 2
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 1)) == OK
    bench.post_rx(8, pair=0)
    for sport in range(5):
        bench.inject(udp_frame(b"r", src=IP_A, dst=IP_B, sport=8, dport=2000 + sport))
    assert len(bench.received(0)) == 5 and bench.received(1) == []


def test_a_frame_waiting_for_a_receiveq_that_gets_disabled_goes_to_an_enabled_pair() -> None:
    """A front end that chooses pairs by enabling rings (QEMU's virtio-net, DPDK's
    virtio-user) may disable the receiveq a frame was steered to while the frame
    waits for buffers there.  The frame is steered afresh, at once: waiting would
    hold every later frame of every pair behind it until that ring came back,
    and nothing says it will (vhost-user.rst "Ring states")."""
    bench = NetBench(queue_pairs=2)
    net = bench.net
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 2)) == OK
    bench.post_rx(4, pair=0)  # pair 1 has no receive buffers yet
    out = udp_frame(b"q", dst_mac=PEER_MAC, src_mac=DEV_MAC, src=IP_B, dst=IP_A, sport=9, dport=7)
    bench.transmit(out, pair=1)
    assert len(bench.wire()) == 1
    reply = udp_frame(b"r", src=IP_A, dst=IP_B, sport=7, dport=9)
    bench.inject(reply)  # steered to pair 1, where it waits
    bench.inject(frame_of(70))  # behind it, in the back end
    assert bench.received(0) == [] and net.stats["rx_frames"] == 0
    net.set_queue_enabled(2, False)  # the front end stops using pair 1
    assert [f for _, f in bench.received(0)] == [reply, frame_of(70)]
    assert bench.received(1) == []


# -- lifecycle -------------------------------------------------------------------------------------


def test_snapshot_round_trip_and_validation(bench: NetBench) -> None:
    net = bench.net
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0])) == OK
    table = mac_table([OTHER_MAC], [MCAST])
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.TABLE_SET]) + table) == OK
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.ADDR_SET]) + PEER_MAC) == OK
    net.set_link(False)
    resources = net.sleep()
    snap = net.snapshot()
    model = json.loads(snap)["model"]
    assert model["mac"] == format_mac(PEER_MAC) and model["link_up"] is False
    assert model["filter"]["promisc"] is False and model["stats"]["ctrl_commands"] == 3
    fresh = Net(SocketPairBackend.pair()[0], mac=DEV_MAC)
    fresh.sleep()
    fresh.restore(snap)
    assert fresh.snapshot() == snap
    assert fresh.mac == PEER_MAC and not fresh.link_up and fresh.rx_filter == net.rx_filter
    for bad in (
        Net(SocketPairBackend.pair()[0], mac=PEER_MAC),  # other configured address
        Net(SocketPairBackend.pair()[0], mac=DEV_MAC, mtu=9000),
    ):
        bad.sleep()
        with pytest.raises(ValueError, match="differently configured"):
            bad.restore(snap)
    doc = json.loads(snap)
    for key, value in (
        ("mac", "zz"),
        ("pairs", 0),
        ("stats", {"no_such_counter": 1}),
        ("stats", {"tx_frames": -1}),
        ("rx_pending", "!"),
        ("guest_offloads", 1 << 40),
        ("filter", {"promisc": 1}),
    ):
        broken = json.loads(snap)
        broken["model"][key] = value
        target = Net(SocketPairBackend.pair()[0], mac=DEV_MAC)
        target.sleep()
        with pytest.raises((ValueError, LifecycleError)):
            target.restore(json.dumps(broken).encode())
    # A snapshot from before a counter existed restores with that counter at 0.
    del doc["model"]["stats"]["tx_dropped_ring_disabled"]
    older = Net(SocketPairBackend.pair()[0], mac=DEV_MAC)
    older.sleep()
    older.restore(json.dumps(doc).encode())
    assert older.stats["tx_dropped_ring_disabled"] == 0
    assert older.stats["ctrl_commands"] == 3
    net.wake(resources)
    assert net.state is DeviceState.ACTIVE


def test_sleep_finishes_transmit_and_returns_early_taken_buffers() -> None:
    bench = NetBench(size=256, mtu=9000)
    net = bench.net
    for i in range(200):
        bench.transmit(frame_of(9000, dst=PEER_MAC, seed=i))
    assert net.wants_writable()
    (early,) = bench.post_rx(1, size=256)
    bench.inject(frame_of(1000))  # takes the one buffer, waits for more
    bench.tx_used()
    resources = net.sleep()
    assert net.host_fds() == []
    assert len(bench.tx_used()) == 1  # the blocked frame was completed
    assert net.stats["tx_dropped_sleep"] == 1
    assert bench.rx_used() == [(early, 0)]  # handed back unused
    assert net.stats["rx_buffers_returned"] == 1
    model = json.loads(net.snapshot())["model"]
    assert model["rx_pending"]  # the frame itself is kept
    net.wake(resources)
    bench.post_rx(1, size=2048)
    ((_, got),) = bench.received()
    assert got == frame_of(1000)


def test_reset_restores_defaults_and_drops_the_pending_frame() -> None:
    bench = NetBench()
    net = bench.net
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 0])) == OK
    assert bench.ctrl(bytes([CtrlClass.MAC, CtrlMac.ADDR_SET]) + PEER_MAC) == OK
    bench.post_rx(1, size=256)
    bench.inject(frame_of(1000, dst=PEER_MAC))
    net.reset()
    assert net.state is DeviceState.INACTIVE
    assert net.mac == DEV_MAC and net.rx_filter.promisc
    assert net.stats["rx_dropped_reset"] == 1
    assert bench.backend.guest_features == 0
    assert net.host_fds() == []


def test_peer_hangup_takes_the_link_down(bench: NetBench, caplog: pytest.LogCaptureFixture) -> None:
    net = bench.net
    bench.post_rx(2)
    bench.peer.close()
    assert net.host_fds()
    ((fd, _),) = net.host_fds()
    with caplog.at_level(logging.ERROR):
        poll_devices([net], 1.0)
    assert net.stats["backend_gone"] == 1
    assert not net.link_up and net.read_config(6, 2) == b"\0\0"
    assert bench.rig.interrupt.config_changes == 1
    assert net.host_fds() == []
    token = bench.transmit(frame_of(64, dst=PEER_MAC))
    assert bench.tx_used() == [(token, 0)]
    assert net.stats["tx_dropped_link_down"] == 1
    net.host_fd_ready(fd, select.POLLHUP)  # again: no new log, no exception
    assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1


def test_link_down_stops_reading(bench: NetBench) -> None:
    bench.post_rx(2)
    bench.net.set_link(False)
    assert bench.net.host_fds() == []
    bench.inject(frame_of(64))
    assert bench.received() == [] and bench.backend_has_data()
    bench.net.set_link(True)
    assert [f for _, f in bench.received()] == [frame_of(64)]


def test_host_fds_only_while_active() -> None:
    backend, _peer = SocketPairBackend.pair()
    net = Net(backend)
    assert net.host_fds() == []
    net.backend_readable()  # not active: nothing happens
    net.backend_writable()
    assert poll_devices([net], 0) == 0


def test_stats_keys_are_stable(bench: NetBench) -> None:
    assert tuple(bench.net.stats) == STAT_KEYS
    assert stats_nonzero(bench.net) == {}


def test_packed_ring_and_event_idx() -> None:
    bench = NetBench(packed=True, event_idx=True)
    for round_ in range(40):  # wraps the 16-entry ring
        bench.post_rx(1)
        frame = frame_of(200 + round_, seed=round_)
        bench.inject(frame)
        assert [f for _, f in bench.received()] == [frame]
        token = bench.transmit(frame_of(90, dst=PEER_MAC, seed=round_))
        assert bench.wire() == [bytes(HDR_SIZE) + frame_of(90, dst=PEER_MAC, seed=round_)]
        assert bench.tx_used() == [(token, 0)]


def test_internet_checksum_matches_rfc1071() -> None:
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6")) == 0x2304


def test_random_input_never_breaks_the_device() -> None:
    """Seeded garbage into every input: transmit chains, control commands, receive
    chains and frames from the network.  Nothing raises; the device keeps working."""
    rng = random.Random(20240607)
    bench = NetBench(size=64, queue_pairs=2)
    bench.peer.setblocking(False)
    net = bench.net
    for _ in range(300):
        length = rng.choice([0, 1, 11, 12, 13, 25, 26, 200, 1600, 9000])
        pair = rng.randrange(2)
        if bench.rig.driver_queues[2 * pair + 1].num_free:
            header = rng.randbytes(HDR_SIZE) if rng.random() < 0.5 else bytes(HDR_SIZE)
            bench.transmit(rng.randbytes(length), header, pair=pair)
        command = bytes([rng.randrange(7), rng.randrange(3)]) + rng.randbytes(rng.randrange(12))
        assert bench.ctrl(command[: rng.randrange(len(command) + 1)]) in (OK, ERR)
        writable = [rng.choice([1, 8, 12, 64, 2048])]
        readable = [rng.randbytes(4)] if rng.random() < 0.1 else []
        rx_index = 2 * rng.randrange(2)
        if bench.rig.driver_queues[rx_index].num_free:  # pair 1 fills while one pair is in use
            bench.post_raw_rx(readable, writable, pair=rx_index // 2)
        header = rng.randbytes(HDR_SIZE) if rng.random() < 0.5 else bytes(HDR_SIZE)
        with contextlib.suppress(BlockingIOError):  # the device stopped reading: socket full
            bench.peer.send(header + rng.randbytes(rng.randrange(3000)))
        net.backend_readable()
        for pair in (0, 1):
            bench.rx_used(pair)
            bench.tx_used(pair)
        bench.wire()
    assert not net.needs_reset
    assert net.stats["ctrl_commands"] == 300
    # Still a working device: promiscuous, one pair, a buffer, a frame.
    assert bench.ctrl(bytes([CtrlClass.RX, CtrlRx.PROMISC, 1])) == OK
    assert bench.ctrl(bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET]) + struct.pack("<H", 1)) == OK
    offloads = bytes([CtrlClass.GUEST_OFFLOADS, 0]) + struct.pack("<Q", GUEST_OFFLOADS)
    assert bench.ctrl(offloads) == OK
    bench.received(0)
    bench.post_rx(bench.rig.driver_queues[0].num_free, size=2048)
    bench.inject(frame_of(1000, seed=9))
    assert frame_of(1000, seed=9) in [f for _, f in bench.received(0)]


def test_host_loop_lives_outside_the_model_and_the_driver_loads_no_model() -> None:
    import subprocess
    import sys

    import pyvirtio.devices.net as net_package
    from pyvirtio.vmm import host_loop

    assert net_package.poll_devices is host_loop.poll_devices  # re-exported for users
    code = (
        "import sys, pyvirtio.driver.net\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyvirtio.devices.net')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert out.strip() == "['pyvirtio.devices.net', 'pyvirtio.devices.net.wire']"


def test_control_features_without_ctrl_vq_when_the_front_end_owns_the_control_queue() -> None:
    """DPDK's virtio-user acks CTRL_RX, CTRL_MAC_ADDR and MQ without CTRL_VQ: it
    answers the control queue itself, as vhost-user front ends do."""
    acked = (
        Feature.VERSION_1.mask
        | NetFeature.MQ.mask
        | NetFeature.CTRL_RX.mask
        | NetFeature.CTRL_MAC_ADDR.mask
    )
    backend, _peer = SocketPairBackend.pair()
    assert not Net(backend, queue_pairs=2).features_acceptable(acked)
    net = Net(backend, queue_pairs=2, front_end_control=True)
    assert net.features_acceptable(acked)
    assert not net.features_acceptable(Feature.VERSION_1.mask | NetFeature.GUEST_TSO4.mask)
