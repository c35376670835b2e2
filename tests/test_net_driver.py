"""NetDriver against Net devices: MMIO in process, and vhost-user.

Two Net devices share a socket pair (one wire); each sits behind an
MmioTransport driven by a NetDriver over an InProcessBus.  One thread plays
host and guests: the drivers wait by running a step of the host loop
(:func:`poll_devices`) over both devices.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.net import PEER_MAC, frame_of, udp_checksum_ok, udp_frame
from helpers.vhost_user import served
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.devices.net import Net, NetHeader, SocketPairBackend, poll_devices
from pyvirtio.devices.net.wire import GUEST_OFFLOADS, HDR_SIZE, Gso, HdrFlag, NetFeature
from pyvirtio.driver.net import CONFIG_FEATURES, MERGEABLE_BUFFER, NetDriver, NetDriverError
from pyvirtio.driver.vhost_user import DEFAULT_FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MmioTestRig
from pyvirtio.transport.vhost_user.protocol import FrontendRequest, ProtocolFeature, VringState

F = NetFeature
MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
SIZES = (64, 65, 1514, 4097, 9000, 65535)


class Wire:
    """Two Nets on one socket pair, each with an MMIO rig and a NetDriver."""

    def __init__(
        self,
        *,
        mtu: int = 65535,
        queue_pairs: int = 1,
        memory: int = 48 << 20,
        a_options: dict[str, Any] | None = None,
        b_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        end_a, end_b = SocketPairBackend.pair()
        self.a = Net(end_a, mac=MAC_A, mtu=mtu, queue_pairs=queue_pairs)
        self.b = Net(end_b, mac=MAC_B, mtu=mtu, queue_pairs=queue_pairs)
        self.rig_a = MmioTestRig(self.a, GuestMemory.anonymous(memory))
        self.rig_b = MmioTestRig(self.b, GuestMemory.anonymous(memory))
        self.da = NetDriver(self.rig_a.driver, wait=self.pump, **options, **(a_options or {}))
        self.db = NetDriver(self.rig_b.driver, wait=self.pump, **options, **(b_options or {}))

    def pump(self, timeout: float = 0.0) -> None:
        poll_devices([self.a, self.b], timeout)


def to_b(size: int, seed: int = 0) -> bytes:
    return frame_of(size, dst=bytes.fromhex(MAC_B.replace(":", "")), seed=seed)


def to_a(size: int, seed: int = 0) -> bytes:
    return frame_of(size, dst=bytes.fromhex(MAC_A.replace(":", "")), seed=seed)


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "no-mrg"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_two_devices_exchange_frames(packed: bool, event_idx: bool, mrg: bool) -> None:
    buffer = None if mrg else HDR_SIZE + 65535
    wire = Wire(
        packed=packed,
        event_idx=event_idx,
        mrg_rxbuf=mrg,
        rx_buffer_size=buffer,
        rx_buffers=None if mrg else 8,
    )
    da, db = wire.da, wire.db
    assert da.has(Feature.RING_PACKED) == packed and da.has(F.MRG_RXBUF) == mrg
    assert da.mac == bytes.fromhex("02000000000a") and da.mtu == 65535 and da.link_up
    for seed, size in enumerate(SIZES):
        da.send(to_b(size, seed))
        db.send(to_a(size, seed + 100))
    got_b = [db.recv(timeout=2.0) for _ in SIZES]
    got_a = [da.recv(timeout=2.0) for _ in SIZES]
    assert got_b == [to_b(size, seed) for seed, size in enumerate(SIZES)]
    assert got_a == [to_a(size, seed + 100) for seed, size in enumerate(SIZES)]
    assert wire.a.stats["tx_frames"] == wire.b.stats["rx_frames"] == len(SIZES)
    assert wire.b.stats["tx_bytes"] == wire.a.stats["rx_bytes"] == sum(SIZES)
    drops = {k: v for k, v in {**wire.a.stats, **wire.b.stats}.items() if "drop" in k and v}
    assert drops == {}
    da.flush()
    assert da.rx_errors == db.rx_errors == 0


def test_receiver_short_of_buffers_loses_nothing() -> None:
    """1000 frames against a receiver that posts a few buffers at a time: all arrive, in order."""
    wire = Wire(mtu=1500, b_options={"refill": False, "rx_buffers": 4})
    da, db, a, b = wire.da, wire.db, wire.a, wire.b
    # A small socket buffer, so the wire fills and the sender's device has to wait too.
    assert isinstance(a.backend, SocketPairBackend)
    a.backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    frames = [to_b(60 + i % 1400, seed=i) for i in range(1000)]
    got: list[bytes] = []
    sent = 0
    sender_waited = 0
    deadline = time.monotonic() + 20
    while len(got) < len(frames):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(frames)} frames arrived"
        while sent < len(frames) and da.try_send(frames[sent]):
            sent += 1
        sender_waited += a.wants_writable()
        wire.pump(0.001)
        got.extend(db.recv_all())
        db.post_rx(3)  # slowly: fewer buffers than frames on the wire
    assert got == frames
    assert sender_waited > 0, "the wire never filled: the test proved nothing about backpressure"
    assert b.stats["rx_frames"] == 1000
    assert not any(v for k, v in b.stats.items() if "drop" in k)
    assert not any(v for k, v in wire.a.stats.items() if "drop" in k)


def test_filtering_between_two_devices() -> None:
    wire = Wire(mtu=1500)
    da, db = wire.da, wire.db
    db.set_rx_mode(promisc=False)
    stranger = frame_of(100, dst=PEER_MAC)
    multicast = frame_of(100, dst=bytes.fromhex("01005e0000fb"))
    mine = to_b(100)
    for frame in (stranger, multicast, mine):
        da.send(frame)
    assert db.recv(timeout=2.0) == mine
    assert db.recv(timeout=0.1) is None
    assert wire.b.stats["rx_dropped_filter"] == 2
    db.set_mac_table(unicast=[PEER_MAC], multicast=["01:00:5e:00:00:fb"])
    da.send(stranger)
    da.send(multicast)
    assert [db.recv(timeout=2.0), db.recv(timeout=2.0)] == [stranger, multicast]
    db.set_mac("02:00:00:00:00:bb")
    assert db.read_mac() == bytes.fromhex("0200000000bb")
    da.send(mine)  # to the old address now
    assert db.recv(timeout=0.1) is None
    db.set_rx_mode(promisc=True, allmulti=True, alluni=True, nomulti=False)
    da.send(mine)
    assert db.recv(timeout=2.0) == mine


def test_control_errors_raise() -> None:
    wire = Wire(mtu=1500, queue_pairs=2)
    db = wire.db
    with pytest.raises(NetDriverError, match="refused"):
        db.set_mac("01:00:5e:00:00:01")  # multicast address
    with pytest.raises(ValueError):
        db.set_queue_pairs(3)
    with pytest.raises(ValueError):
        db.set_guest_offloads(1 << 40)
    assert db.control(99, 0) == 1
    no_ctrl = Wire(mtu=1500, ctrl=False).da
    with pytest.raises(NetDriverError, match="CTRL_VQ"):
        no_ctrl.set_rx_mode(promisc=False)


def test_multiqueue_through_the_driver() -> None:
    end_a, end_b = SocketPairBackend.pair()
    a = Net(end_a, mac=MAC_A, queue_pairs=2)
    b = Net(end_b, mac=MAC_B, queue_pairs=2)
    rig_a = MmioTestRig(a, GuestMemory.anonymous(16 << 20))
    rig_b = MmioTestRig(b, GuestMemory.anonymous(16 << 20))

    def pump(timeout: float) -> None:
        poll_devices([a, b], timeout)

    da = NetDriver(rig_a.driver, queue_pairs=2, wait=pump)
    db = NetDriver(rig_b.driver, queue_pairs=2, wait=pump)
    assert da.max_queue_pairs == 2 and da.queue_pairs == 2 and a.queue_pairs == 2
    for pair in (0, 1):
        da.send(to_b(200, seed=pair), pair=pair)
    assert sorted([db.recv(timeout=2.0), db.recv(timeout=2.0)]) == sorted(
        [to_b(200, 0), to_b(200, 1)]
    )


def test_checksum_and_segmentation_offload_between_devices() -> None:
    wire = Wire(mtu=1500, b_options={"features": ~GUEST_OFFLOADS})
    da, db = wire.da, wire.db
    assert da.has(F.CSUM) and da.has(F.HOST_TSO4) and not db.has(F.GUEST_CSUM)
    frame = udp_frame(
        b"partial" * 20, dst_mac=bytes.fromhex("02000000000b"), src_mac=da.mac, partial=True
    )
    da.send(frame, NetHeader(HdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 6))
    packet = db.recv_packet(timeout=2.0)
    assert packet is not None and packet.header.flags == 0
    assert udp_checksum_ok(packet.frame)
    # B cannot take a TSO super-frame: dropped and counted, never half-delivered.
    da.send(to_b(20000), NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 1448, 34, 16))
    assert db.recv(timeout=0.2) is None
    assert wire.b.stats["rx_dropped_offload"] == 1
    # A takes them: a TSO frame from B reaches A's driver whole, header intact.
    header = NetHeader(HdrFlag.NEEDS_CSUM, Gso.TCPV4, 54, 1448, 34, 16)
    db_full = Wire(mtu=1500)
    db_full.db.send(to_a(30000), header)
    packet = db_full.da.recv_packet(timeout=2.0)
    assert packet is not None and packet.frame == to_a(30000)
    assert packet.header.gso_type == Gso.TCPV4 and packet.header.num_buffers > 1
    db_full.da.set_guest_offloads(0)
    db_full.db.send(to_a(30000), header)
    assert db_full.da.recv(timeout=0.2) is None
    assert db_full.a.stats["rx_dropped_offload"] == 1


def test_default_receive_buffer_sizes() -> None:
    assert Wire(mtu=1500).da.rx_buffer_size == MERGEABLE_BUFFER
    assert Wire(mtu=1500, mrg_rxbuf=False).da.rx_buffer_size == HDR_SIZE + 65550
    no_gso = Wire(mtu=9000, mrg_rxbuf=False, features=~GUEST_OFFLOADS).da
    assert no_gso.rx_buffer_size == HDR_SIZE + 14 + 4 + 9000


def test_link_state_is_visible_to_the_driver() -> None:
    wire = Wire(mtu=1500)
    assert wire.da.link_up
    wire.a.set_link(False)
    assert not wire.da.link_up
    wire.a.close()  # the back end goes away: link stays down
    wire.a.set_link(True)
    wire.da.send(to_b(64))
    wire.pump(0.05)
    assert not wire.da.link_up


# -- vhost-user --------------------------------------------------------------------------------


@contextlib.contextmanager
def _served(
    make: Callable[[SocketPairBackend], Net],
) -> Iterator[tuple[Net, socket.socket, Path]]:
    """A Net on a socket pair, served by VhostUserBackend on its own thread."""
    backend, peer = SocketPairBackend.with_peer()
    peer.settimeout(5.0)
    net = make(backend)
    with tempfile.TemporaryDirectory(prefix="vun") as tmp:
        path = Path(tmp) / "s"
        try:
            with served(net, path):
                yield net, peer, path
        finally:
            peer.close()
            backend.close()


@pytest.fixture
def vhost_net() -> Iterator[tuple[Net, socket.socket, Path]]:
    with _served(lambda backend: Net(backend, mac=MAC_A, mtu=1500)) as served:
        yield served


def test_driver_over_vhost_user_with_the_back_end_polling_the_device_fd(
    vhost_net: tuple[Net, socket.socket, Path],
) -> None:
    """VhostUserBackend's epoll loop serves the device's socket (VirtioDevice.host_fds)."""
    net, peer, path = vhost_net
    with VhostUserFrontend(path, device_id=DeviceId.NET, timeout=5.0) as frontend:
        driver = NetDriver(frontend, timeout=5.0, ctrl=True)  # pyvirtio's back end answers it
        assert driver.mac == bytes.fromhex("02000000000a")
        driver.set_rx_mode(promisc=False)
        out = frame_of(300, dst=PEER_MAC, src=driver.mac)
        driver.send(out)
        assert peer.recv(1 << 17) == bytes(HDR_SIZE) + out
        # The network sends: only the back end's epoll can notice.
        frames = [frame_of(100 + i, dst=driver.mac, seed=i) for i in range(50)]
        for frame in frames:
            peer.send(bytes(HDR_SIZE) + frame)
        assert [driver.recv(timeout=5.0) for _ in frames] == frames
        peer.send(bytes(HDR_SIZE) + frame_of(100, dst=PEER_MAC))  # filtered out
        assert driver.recv(timeout=0.2) is None
        assert net.stats["rx_dropped_filter"] == 1
        driver.close()


def test_disabled_transmit_ring_discards_frames_and_never_sends_them_later(
    vhost_net: tuple[Net, socket.socket, Path],
) -> None:
    """vhost-user.rst "Ring states": a started but disabled ring must "process and
    discard any TX packets"; they must not reach the wire when the ring is stopped."""
    net, peer, path = vhost_net
    with VhostUserFrontend(path, device_id=DeviceId.NET, timeout=5.0) as frontend:
        driver = NetDriver(frontend, timeout=5.0)
        driver.send(frame_of(80, dst=PEER_MAC, src=driver.mac))
        assert peer.recv(1 << 17)[HDR_SIZE:] == frame_of(80, dst=PEER_MAC, src=driver.mac)
        frontend.request(FrontendRequest.SET_VRING_ENABLE, VringState(1, 0))
        frames = [frame_of(100 + i, dst=PEER_MAC, src=driver.mac, seed=i) for i in range(5)]
        assert driver.send_many(frames) == len(frames)
        driver.flush()  # every frame is used (discarded), not left waiting on the ring
        assert net.stats["tx_dropped_ring_disabled"] == len(frames)
        frontend.stop_queue(1)  # GET_VRING_BASE stops the device
        driver.close()
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(1 << 17)
    assert net.stats["tx_frames"] == 1


def test_disabled_receive_ring_gets_no_frames_until_enabled_again(
    vhost_net: tuple[Net, socket.socket, Path],
) -> None:
    net, peer, path = vhost_net
    with VhostUserFrontend(path, device_id=DeviceId.NET, timeout=5.0) as frontend:
        driver = NetDriver(frontend, timeout=5.0)
        frontend.request(FrontendRequest.SET_VRING_ENABLE, VringState(0, 0))
        frames = [frame_of(90 + i, dst=driver.mac, seed=i) for i in range(3)]
        for frame in frames:
            peer.send(bytes(HDR_SIZE) + frame)
        assert driver.recv(timeout=0.3) is None
        assert net.stats["rx_frames"] == 0
        frontend.request(FrontendRequest.SET_VRING_ENABLE, VringState(0, 1))
        assert [driver.recv(timeout=5.0) for _ in frames] == frames
        driver.close()


class _Ring2AsData(Net):
    """A device that, like DPDK's vhost PMD, offers CTRL_VQ but never answers ring 2."""

    def _process_queue(self, index: int, queue: Any) -> None:
        if index != 2:
            super()._process_queue(index, queue)


@pytest.fixture
def silent_ctrl_net() -> Iterator[Path]:
    with _served(lambda backend: _Ring2AsData(backend, mac=MAC_A)) as (_net, _peer, path):
        yield path


def test_driver_over_vhost_user_takes_no_control_queue_unless_asked(silent_ctrl_net: Path) -> None:
    """The front end owns a vhost-user net control queue by convention: by default
    the driver does not negotiate it, and says so at once instead of timing out."""
    with VhostUserFrontend(silent_ctrl_net, device_id=DeviceId.NET, timeout=5.0) as frontend:
        driver = NetDriver(frontend, timeout=5.0)
        assert not driver.has(F.CTRL_VQ)
        assert not frontend.negotiated_features & F.CTRL_VQ.mask
        start = time.monotonic()
        with pytest.raises(NetDriverError, match="ctrl=True"):
            driver.set_rx_mode(promisc=False)
        assert time.monotonic() - start < 1.0
        driver.close()


def test_unanswered_control_command_turns_control_off_with_a_clear_error(
    silent_ctrl_net: Path,
) -> None:
    with VhostUserFrontend(silent_ctrl_net, device_id=DeviceId.NET, timeout=5.0) as frontend:
        driver = NetDriver(frontend, timeout=0.5, ctrl=True)
        start = time.monotonic()
        with pytest.raises(NetDriverError, match=r"unanswered.*not served"):
            driver.set_rx_mode(promisc=False)
        assert time.monotonic() - start < 2.0
        with pytest.raises(NetDriverError, match="unanswered"):  # at once from now on
            driver.set_mac(MAC_B)
        assert time.monotonic() - start < 2.0
        driver.close()


def test_driver_negotiates_no_config_features_without_the_config_protocol_feature(
    vhost_net: tuple[Net, socket.socket, Path],
) -> None:
    """DPDK's vhost PMD offers MTU, STATUS and MQ without the CONFIG protocol feature:
    the driver takes none of what it cannot read, and works."""
    net, peer, path = vhost_net
    protocol = DEFAULT_FRONTEND_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG.mask
    with VhostUserFrontend(
        path, device_id=DeviceId.NET, timeout=5.0, protocol_features=protocol
    ) as frontend:
        assert not frontend.config_readable
        driver = NetDriver(frontend, timeout=5.0)
        assert not driver.features & CONFIG_FEATURES
        assert driver.mac[0] & 3 == 2  # its own random, local, unicast address
        out = frame_of(200, dst=PEER_MAC, src=driver.mac)
        driver.send(out)
        assert peer.recv(1 << 17)[HDR_SIZE:] == out
        peer.send(bytes(HDR_SIZE) + frame_of(120, dst=driver.mac))
        assert driver.recv(timeout=5.0) == frame_of(120, dst=driver.mac)
        driver.close()
    assert net.stats["tx_frames"] == 1
