"""VhostUserBackend against real peers: VhostUserFrontend and a scripted raw front end.

The back end runs in a thread of this process; every wait is bounded.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.vhost_user import F_PROTOCOL, TIMEOUT, RawFrontend, eventfd, served, wait_until
from pyvirtio.constants import DeviceId, DeviceStatus, Feature
from pyvirtio.device import (
    COMMON_FEATURES,
    ActivationError,
    DeviceState,
    QueueResources,
    VirtioDevice,
)
from pyvirtio.devices.block import Block
from pyvirtio.devices.entropy import Entropy
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.entropy import EntropyDriver
from pyvirtio.driver.vhost_user import RequestRefused, VhostUserError, VhostUserFrontend
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from pyvirtio.transport.vhost_user.protocol import (
    VERSION,
    BackendRequest,
    ConfigSpace,
    FrontendRequest,
    MemoryRegionDesc,
    Message,
    MessageParser,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    encode,
    vring_fd_payload,
)
from pyvirtio.virtqueue import split
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.vmm.backends import ServedDevice

R = FrontendRequest


def open_fds() -> int:
    # mmap objects keep a dup of their fd until their last exported view
    # (held by queues, often in reference cycles) is collected.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class TwoQueueDevice(VirtioDevice):
    """Fills writable buffers of queue i with 0xA0 + i; may demand both queues."""

    device_id = DeviceId.CONSOLE

    def __init__(self, *, require_all: bool) -> None:
        super().__init__(COMMON_FEATURES, (64, 64))
        self.require_all = require_all
        self.refusals = 0
        self.config = bytearray(b"pyvirtio-config!")

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def _on_activate(self, resources: QueueResources) -> None:
        if self.require_all and any(isinstance(q, DisabledQueue) for q in resources.queues):
            self.refusals += 1
            raise ActivationError("needs both queues")

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        done: list[tuple[DescriptorChain, int]] = []
        while (chain := queue.pop()) is not None:
            done.append((chain, chain.write(bytes([0xA0 + index]) * chain.writable_len)))
        if done:
            queue.add_used_batch(done)
            self.signal_used(index)


def wait_fd(fd: int, timeout: float = TIMEOUT) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    if readable:
        os.eventfd_read(fd)
    return bool(readable)


# -- with VhostUserFrontend ------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_entropy_through_a_queue(sock_path: Path, packed: bool) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        frontend = VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY, timeout=TIMEOUT)
        features = None if packed else ~Feature.RING_PACKED.mask
        driver = EntropyDriver(frontend, features=features, buffer_size=4096, timeout=TIMEOUT)
        assert driver.packed_ring is packed
        data = driver.read(20000)
        assert len(data) == 20000 and len(set(data)) > 200
        assert device.state is DeviceState.ACTIVE and device.bytes_served >= 20000
        # Ring addresses were user addresses (the front end's mmap), not guest-physical.
        region = backend.memory.regions[0] if backend.memory else None
        assert region is not None and region.guest_base == frontend.mem.regions[0].guest_base
        assert "ADD_MEM_REG" in backend.received and "SET_MEM_TABLE" not in backend.received
        driver.close()
        assert device.state is DeviceState.INACTIVE
        frontend.close()
        wait_until(lambda: not backend.connected)


def test_set_mem_table_and_no_reply_ack(sock_path: Path) -> None:
    device = Entropy()
    offer = DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    with served(device, sock_path, protocol_features=offer) as backend:
        frontend = VhostUserFrontend(
            sock_path,
            device_id=DeviceId.ENTROPY,
            protocol_features=ProtocolFeature.MQ.mask,  # no REPLY_ACK: fire and forget
        )
        with frontend:
            driver = EntropyDriver(frontend, timeout=TIMEOUT)
            assert len(driver.read(5000)) == 5000
        assert "SET_MEM_TABLE" in backend.received and "ADD_MEM_REG" not in backend.received


def test_blk_driver_over_the_backend(sock_path: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with (
        Block(image) as device,
        served(device, sock_path),
        VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK) as frontend,
    ):
        blk = BlkDriver(frontend)
        assert blk.config.capacity == (1 << 20) // 512  # GET_CONFIG through the device
        data = (b"vhost-user!" * 200)[:2048]
        blk.write(4096, data)
        assert blk.read(4096, 2048) == data
        blk.flush()
    assert image.read_bytes()[4096 : 4096 + 11] == b"vhost-user!"


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_busy_polling_back_end_saves_kicks(
    sock_path: Path, tmp_path: Path, event_idx: bool
) -> None:
    """``serve --poll-us``: requests inside the window need no kick; after it, kicks again.

    The back end runs in its own process, as polling is meant to (in a
    thread of this process it would hold the GIL the driver needs).  The
    window (1 s) is far longer than a request takes even on a loaded
    machine.  Only the first request needs a kick, with or without
    EVENT_IDX: the back end turns notifications off before it serves that
    request, so the driver, woken by its completion, finds them off already
    (turning them off only after the completion was signalled let a quick
    driver kick again, and with EVENT_IDX it always did).
    """
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    window = 1.0
    args = ["--file", str(image), "--poll-us", str(window * 1e6)]
    with (
        ServedDevice("blk", sock_path, args, log_path=tmp_path / "serve.log"),
        VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK) as frontend,
    ):
        blk = BlkDriver(frontend, packed=False, event_idx=event_idx, timeout=TIMEOUT)
        kicks = 0
        notify = frontend.notify

        def counting_notify(index: int) -> None:
            nonlocal kicks
            kicks += 1
            notify(index)

        frontend.notify = counting_notify  # type: ignore[method-assign]
        for i in range(20):
            blk.write(i * 4096, bytes([i + 1]) * 4096)
        first_window = 1
        assert kicks == first_window  # the back end was polling for all the others
        time.sleep(window * 2)  # the window closes: notifications are on again
        assert blk.read(0, 4096) == b"\x01" * 4096
        assert kicks == first_window + 1
        assert blk.read(19 * 4096, 4096) == bytes([20]) * 4096
        assert kicks <= first_window + 2  # polling again
        blk.flush()
    assert image.read_bytes()[5 * 4096 : 6 * 4096] == b"\x06" * 4096


def test_serve_blk_with_io_threads_pipelines_large_transfers(
    sock_path: Path, tmp_path: Path
) -> None:
    """``serve blk --io-threads 2``: many large reads and writes in flight at once
    come back right, and the data is in the file."""
    size = 256 * 1024
    image = tmp_path / "disk.raw"
    original = os.urandom(8 * size)
    image.write_bytes(original)
    args = ["--file", str(image), "--io-threads", "2"]
    with (
        ServedDevice("blk", sock_path, args, log_path=tmp_path / "serve.log") as served_blk,
        VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK) as frontend,
    ):
        blk = BlkDriver(frontend, timeout=TIMEOUT)
        bufs = [blk.alloc_buffer(size) for _ in range(8)]
        for i, buf in enumerate(bufs[:4]):  # write new data to the first half
            buf.view[:] = bytes([0x10 + i]) * size
        tokens = {
            blk.submit_write(i * size, buf.addr, size, kick=False): i
            for i, buf in enumerate(bufs[:4])
        }
        tokens |= {
            blk.submit_read((i + 4) * size, buf.addr, size, kick=False): i + 4
            for i, buf in enumerate(bufs[4:])
        }
        blk.kick()
        results: dict[int, int] = {}
        while len(results) < len(tokens):
            for token, result in blk.wait(1, TIMEOUT):
                results[tokens[token]] = result
        assert results == dict.fromkeys(range(8), 0)
        for i, buf in enumerate(bufs[4:]):
            assert bytes(buf.view) == original[(i + 4) * size : (i + 5) * size]
        blk.flush()
        log = served_blk.log()
        assert "(2 I/O threads)" in log and "failed" not in log
    data = image.read_bytes()
    for i in range(4):
        assert data[i * size : (i + 1) * size] == bytes([0x10 + i]) * size
    assert data[4 * size :] == original[4 * size :]


def test_activation_waits_for_a_device_that_needs_all_queues(sock_path: Path) -> None:
    """Ring 0 enabled first: the device refuses, and is activated when ring 1 is ready."""
    device = TwoQueueDevice(require_all=True)
    with served(device, sock_path), VhostUserFrontend(sock_path) as frontend:
        frontend.initialize(Feature.VERSION_1.mask)
        q0 = frontend.setup_queue(0, 16)
        frontend.driver_ok()  # ENABLE 0 and DRIVER_OK: an attempt, refused
        assert device.refusals >= 1 and device.state is not DeviceState.ACTIVE
        q1 = frontend.setup_queue(1, 16)  # enabled at once: now it starts
        assert device.state is DeviceState.ACTIVE
        for index, queue in ((0, q0), (1, q1)):
            buf = frontend.allocator.alloc(64)
            queue.add([], [(buf, 64)], buf)
            frontend.notify(index)
            [(token, written)] = frontend.wait_used(index, TIMEOUT)
            assert (token, written) == (buf, 64)
            assert frontend.mem.read(buf, 64) == bytes([0xA0 + index]) * 64


def test_a_ring_enabled_later_joins_the_running_device(sock_path: Path) -> None:
    device = TwoQueueDevice(require_all=False)
    with served(device, sock_path), VhostUserFrontend(sock_path) as frontend:
        frontend.initialize(Feature.VERSION_1.mask)
        frontend.setup_queue(0, 16)
        frontend.driver_ok()
        assert device.state is DeviceState.ACTIVE
        assert isinstance(device.queues[1], DisabledQueue)
        q1 = frontend.setup_queue(1, 8)
        assert not isinstance(device.queues[1], DisabledQueue)
        buf = frontend.allocator.alloc(32)
        q1.add([], [(buf, 32)], "t")
        frontend.notify(1)
        assert frontend.wait_used(1, TIMEOUT) == [("t", 32)]


def test_config_space_and_refusals(sock_path: Path) -> None:
    device = TwoQueueDevice(require_all=False)
    with served(device, sock_path), VhostUserFrontend(sock_path) as frontend:
        assert frontend.read_config_bytes(0, 16) == b"pyvirtio-config!"
        assert frontend.read_config(0, 8) == int.from_bytes(b"pyvirtio", "little")
        assert frontend.read_config_bytes(14, 2) == b"g!"
        with pytest.raises(VhostUserError, match="refused GET_CONFIG"):
            frontend.read_config_bytes(14, 4)  # beyond config space: refused, not zeros
        frontend.write_config(0, 2, 0x5858)
        assert device.config[:2] == b"XX"
        assert frontend.num_queues == 2 and frontend.max_mem_slots == 32
        with pytest.raises(RequestRefused):  # a ring that does not exist: NACK, not a drop
            frontend.request(R.SET_VRING_NUM, VringState(7, 16))
        frontend.initialize(Feature.VERSION_1.mask)  # still usable


def test_device_needing_reset_signals_the_error_eventfd(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path), VhostUserFrontend(sock_path) as frontend:
        frontend.initialize(Feature.VERSION_1.mask)
        queue = frontend.setup_queue(0, 16)
        frontend.driver_ok()
        assert not frontend.needs_reset
        queue.add([], [(0xDEAD_0000_0000, 64)], "bad")  # outside guest memory
        frontend.notify(0)
        wait_until(lambda: frontend.needs_reset)
        assert device.needs_reset
        assert frontend.add_status(0) & DeviceStatus.DEVICE_NEEDS_RESET  # GET_STATUS agrees


# -- QEMU's message order, scripted --------------------------------------------------------

#: What QEMU 7.2 sends when it creates a vhost-user device, before any driver starts it.
QEMU_DEVICE_CREATION = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "GET_FEATURES",
]


def test_qemu_72_message_order_start_stop_restart(sock_path: Path) -> None:
    """The sequence QEMU 7.2 sends (platform facts), a request, a stop and a restart."""
    device = TwoQueueDevice(require_all=False)
    mem = GuestMemory.memfd(1 << 20, base=0x4000_0000)
    user = 0x7F00_1234_0000  # the front end's "user address" of the region
    gpa = mem.regions[0].guest_base

    def to_user(addr: int) -> int:
        return addr - gpa + user

    with served(device, sock_path) as backend:
        f = RawFrontend(sock_path)
        features = f.call(R.GET_FEATURES)
        assert isinstance(features, int) and features & F_PROTOCOL
        assert features & Feature.VERSION_1.mask
        offered = f.call(R.GET_PROTOCOL_FEATURES)
        assert offered == DEFAULT_PROTOCOL_FEATURES
        f.send(R.SET_PROTOCOL_FEATURES, offered)
        assert f.call(R.GET_QUEUE_NUM) == 2
        assert f.call(R.GET_MAX_MEM_SLOTS) == 32
        channel, backend_end = socket.socketpair()
        channel.settimeout(TIMEOUT)
        f.send(R.SET_BACKEND_REQ_FD, fds=[backend_end.fileno()])
        backend_end.close()
        f.send(R.SET_OWNER)
        f.call(R.GET_FEATURES)
        for i in range(2):
            f.send(R.SET_VRING_CALL, vring_fd_payload(i, False))
            f.send(R.SET_VRING_ERR, vring_fd_payload(i, False))
        config = f.call(R.GET_CONFIG, ConfigSpace(0, 0, bytes(16)))
        assert config == ConfigSpace(0, 0, b"pyvirtio-config!")

        # The guest driver starts the device.
        negotiated = Feature.VERSION_1.mask | F_PROTOCOL
        f.send(R.SET_FEATURES, negotiated)
        calls = [eventfd(), eventfd()]
        for i in range(2):
            f.send(R.SET_VRING_CALL, vring_fd_payload(i, True), [calls[i]])
        region = mem.regions[0]
        assert region.fd is not None
        desc = MemoryRegionDesc(gpa, region.size, user, 0)
        assert f.call(R.ADD_MEM_REG, SingleMemoryRegion(desc), [region.fd]) == 0
        queues = []
        for i in range(2):
            d, a, u = (
                gpa + 0x1000 + i * 0x2000,
                gpa + 0x1800 + i * 0x2000,
                gpa + 0x2000 + i * 0x2000,
            )
            queues.append(split.SplitDriverQueue(mem, 16, d, a, u))
            f.send(R.SET_VRING_NUM, VringState(i, 16))
            f.send(R.SET_VRING_BASE, VringState(i, 0))
            f.send(R.SET_VRING_ADDR, VringAddr(i, 0, to_user(d), to_user(u), to_user(a), 0))
        kicks = [eventfd(), eventfd()]
        for i in range(2):
            f.send(R.SET_VRING_KICK, vring_fd_payload(i, True), [kicks[i]])
        assert f.call(R.SET_VRING_ENABLE, VringState(0, 1)) == 0
        # Ring 1 is started but not enabled yet: no activation until it is.
        assert device.state is not DeviceState.ACTIVE
        assert f.call(R.SET_VRING_ENABLE, VringState(1, 1)) == 0
        assert device.state is DeviceState.ACTIVE

        def request(i: int, addr: int) -> bytes:
            queues[i].add([], [(addr, 32)], addr)
            os.eventfd_write(kicks[i], 1)
            deadline = time.monotonic() + TIMEOUT
            while not (done := list(queues[i].used())):
                assert time.monotonic() < deadline, "no completion"
                wait_fd(calls[i], 0.05)
            assert done == [(addr, 32)]
            return mem.read(addr, 32)

        assert request(0, gpa + 0x8000) == b"\xa0" * 32
        assert request(1, gpa + 0x9000) == b"\xa1" * 32

        device.config_changed()  # reaches the front end on the back-end channel
        note = MessageParser(BackendRequest).feed(channel.recv(64))
        assert note == [Message(BackendRequest.CONFIG_CHANGE_MSG)]

        # QEMU stops: SET_VRING_ENABLE 0, then GET_VRING_BASE of each ring.
        for i in range(2):
            f.send(R.SET_VRING_ENABLE, VringState(i, 0))
        assert f.call(R.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 1)
        assert device.state is DeviceState.INACTIVE
        assert f.call(R.GET_VRING_BASE, VringState(1, 0)) == VringState(1, 1)

        # ... and starts again where it stopped.
        f.send(R.SET_FEATURES, negotiated)
        kicks = [eventfd(), eventfd()]
        for i in range(2):
            f.send(R.SET_VRING_NUM, VringState(i, 16))
            f.send(R.SET_VRING_BASE, VringState(i, 1))
            q = queues[i]
            f.send(
                R.SET_VRING_ADDR,
                VringAddr(
                    i, 0, to_user(q.desc_addr), to_user(q.device_addr), to_user(q.driver_addr)
                ),
            )
            f.send(R.SET_VRING_KICK, vring_fd_payload(i, True), [kicks[i]])
        for i in range(2):
            assert f.call(R.SET_VRING_ENABLE, VringState(i, 1)) == 0
        assert device.state is DeviceState.ACTIVE
        assert request(0, gpa + 0xA000) == b"\xa0" * 32

        assert list(backend.received)[:11] == [
            *QEMU_DEVICE_CREATION,
            "SET_VRING_CALL",
            "SET_VRING_ERR",
            "SET_VRING_CALL",
        ]
        f.close()
        wait_until(lambda: not backend.connected)
        assert device.state is not DeviceState.ACTIVE
        channel.close()
        for fd in calls + kicks:
            os.close(fd)
    mem.close()


def test_packed_ring_base_carries_wrap_counters(sock_path: Path) -> None:
    """GET_VRING_BASE of a packed ring: avail idx|wrap << 15 in bits 0-15, used in 16-31."""
    device = Entropy()
    with served(device, sock_path), VhostUserFrontend(sock_path) as frontend:
        frontend.initialize(Feature.VERSION_1.mask | Feature.RING_PACKED.mask)
        queue = frontend.setup_queue(0, 4)
        frontend.driver_ok()
        buf = frontend.allocator.alloc(16)
        for _ in range(5):  # one lap and one more: the wrap counters flip to 0
            queue.add([], [(buf, 16)], buf)
            frontend.notify(0)
            assert frontend.wait_used(0, TIMEOUT) == [(buf, 16)]
        base = frontend.stop_queue(0)
        assert base == 1 | 1 << 16  # index 1, both wrap counters 0


# -- malformed front ends, disconnects, reconnects ---------------------------------------------

HEADER = struct.Struct("<III")


def _too_many_fds(f: RawFrontend) -> None:
    fds = [eventfd() for _ in range(9)]
    f.send_raw(HEADER.pack(R.SET_MEM_TABLE, VERSION, 8) + struct.pack("<II", 0, 0), fds)
    for fd in fds:
        os.close(fd)


def _far_too_many_fds(f: RawFrontend) -> None:
    fds = [eventfd() for _ in range(70)]  # more than the receive buffer has room for
    f.send_raw(HEADER.pack(R.SET_OWNER, VERSION, 0), fds)
    for fd in fds:
        os.close(fd)


def _kick_without_fd(f: RawFrontend) -> None:
    f.send_raw(HEADER.pack(R.SET_VRING_KICK, VERSION, 8) + struct.pack("<Q", 0))


MALFORMED: dict[str, Callable[[RawFrontend], None]] = {
    "garbage": lambda f: f.send_raw(b"\xde\xad\xbe\xef" * 16),
    "unknown request": lambda f: f.send_raw(HEADER.pack(77, VERSION, 0)),
    "wrong payload size": lambda f: f.send_raw(HEADER.pack(R.SET_VRING_NUM, VERSION, 4) + bytes(4)),
    "absurd payload size": lambda f: f.send_raw(HEADER.pack(R.GET_CONFIG, VERSION, 1 << 30)),
    "too many fds": _too_many_fds,
    "far too many fds": _far_too_many_fds,
    "kick without fd": _kick_without_fd,
    "reply flag": lambda f: f.send_raw(HEADER.pack(R.GET_FEATURES, VERSION | 4, 8) + bytes(8)),
}


@pytest.mark.parametrize("send", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_drops_the_connection_only(
    sock_path: Path, send: Callable[[RawFrontend], None], caplog: pytest.LogCaptureFixture
) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        baseline = open_fds()
        f = RawFrontend(sock_path)
        f.call(R.GET_FEATURES)
        with caplog.at_level(logging.WARNING, logger="pyvirtio.transport.vhost_user.backend"):
            send(f)
            f.wait_eof()
            wait_until(lambda: not backend.connected)
        assert any("malformed message from front end" in r.getMessage() for r in caplog.records)
        f.close()
        assert open_fds() == baseline  # every fd the bad message carried was closed
        with VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY) as frontend:
            assert len(EntropyDriver(frontend).read(1000)) == 1000


@pytest.mark.parametrize("cut", [5, 12, 30], ids=["in header", "after header", "in payload"])
def test_disconnect_mid_message(
    sock_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        baseline = open_fds()
        f = RawFrontend(sock_path)
        message = encode(Message(R.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3)))
        with caplog.at_level(logging.WARNING, logger="pyvirtio.transport.vhost_user.backend"):
            f.send_raw(message[:cut])
            time.sleep(0.05)
            f.close()
            wait_until(lambda: not backend.connected)
        assert any("middle of a message" in r.getMessage() for r in caplog.records)
        assert open_fds() == baseline
        with VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY) as frontend:
            assert len(EntropyDriver(frontend).read(100)) == 100


def test_garbage_from_a_running_session_resets_and_unmaps(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        frontend = VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY)
        EntropyDriver(frontend).read(100)
        assert device.state is DeviceState.ACTIVE and backend.memory is not None
        frontend._sock.sendall(b"\xff" * 12)  # the connection goes bad mid-session
        wait_until(lambda: not backend.connected)
        assert device.state is DeviceState.INACTIVE and device.acked_features == 0
        assert backend.memory is None
        with pytest.raises(VhostUserError):
            frontend.read_config(0, 1)
        frontend.abort()
        with VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY) as again:
            assert len(EntropyDriver(again).read(100)) == 100


def test_reconnect_after_a_front_end_crash(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        baseline = open_fds()
        first = VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY)
        EntropyDriver(first).read(1000)
        first.abort()  # rings running, no GET_VRING_BASE: as if QEMU died
        wait_until(lambda: not backend.connected)
        assert device.state is DeviceState.INACTIVE
        assert open_fds() == baseline
        second = VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY)
        assert len(EntropyDriver(second).read(1000)) == 1000
        assert backend.connections == 2
        second.close()


def test_fatal_request_errors_drop_the_connection(sock_path: Path) -> None:
    with served(Entropy(), sock_path) as backend:
        f = RawFrontend(sock_path)
        f.send(R.GET_VRING_BASE, VringState(9, 0))  # a reply is owed but impossible
        f.wait_eof()
        wait_until(lambda: not backend.connected)
        f.close()
        f = RawFrontend(sock_path)
        assert f.call(R.SET_VRING_NUM, VringState(0, 100_000)) == 1  # NACK, connection kept
        assert f.call(R.SET_LOG_FD, fds=[eventfd()]) == 1  # unsupported: NACK
        assert isinstance(f.call(R.GET_FEATURES), int)
        f.close()


# -- the loop itself -------------------------------------------------------------------------


def test_run_once_and_stop(sock_path: Path) -> None:
    backend = VhostUserBackend(Entropy(), sock_path)
    try:
        assert backend.run_once(0.01) is False
        backend.stop()
        start = time.monotonic()
        backend.serve_forever()  # returns at once: the stop request was pending
        assert time.monotonic() - start < 1
        thread = threading.Thread(target=backend.serve_forever)
        thread.start()
        time.sleep(0.05)
        backend.stop()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        backend.close()
    assert not sock_path.exists()


def test_stop_from_a_signal_handler(sock_path: Path) -> None:
    backend = VhostUserBackend(Entropy(), sock_path)
    previous = signal.signal(signal.SIGALRM, lambda *_: backend.stop())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        backend.serve_forever()
        assert time.monotonic() - start < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        backend.close()


def test_stale_socket_file_is_replaced_but_not_other_files(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    VhostUserBackend(Entropy(), sock_path).close()
    sock_path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        VhostUserBackend(Entropy(), sock_path)


# -- QEMU as the front end ---------------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
MMIO_SLOTS = [0xFEB0_0000 + i * 0x200 for i in range(24)]  # microvm's virtio-mmio windows


class QTest:
    """QEMU's qtest protocol on stdio: MMIO and memory access with no guest code of ours."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._buf = b""

    def _line(self, deadline: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError("QEMU's qtest did not answer in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(f"QEMU exited: {err}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, line: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._line(deadline)
            if reply.startswith(("OK", "FAIL", "ERR")):
                assert reply.startswith("OK"), f"{line}: {reply}"
                return reply[3:]

    def readl(self, addr: int) -> int:
        return int(self.cmd(f"readl {addr:#x}"), 16)

    def writel(self, addr: int, value: int) -> None:
        self.cmd(f"writel {addr:#x} {value:#x}")

    def read(self, addr: int, size: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read {addr:#x} {size}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write {addr:#x} {len(data)} 0x{data.hex()}")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.terminate()
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_vhost_user_rng_drives_the_backend(sock_path: Path) -> None:
    """QEMU 7.2's vhost-user-rng, driven through virtio-mmio by qtest, serves entropy from us."""
    assert QEMU is not None
    device = Entropy()
    with served(device, sock_path) as backend:
        qtest = QTest(
            [
                QEMU,
                "-M",
                "microvm,x-option-roms=off,isa-serial=off,rtc=off,memory-backend=mem",
                "-accel",
                "tcg",  # Debian's QEMU has no qtest accelerator; the firmware idles
                "-qtest",
                "stdio",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-m",
                "64M",
                "-object",
                "memory-backend-memfd,id=mem,size=64M,share=on",
                "-chardev",
                f"socket,id=vu,path={sock_path}",
                "-device",
                "vhost-user-rng,chardev=vu",
            ]
        )
        try:
            base = next(
                b for b in MMIO_SLOTS if qtest.readl(b) == 0x74726976 and qtest.readl(b + 8) == 4
            )
            # Device creation: QEMU's handshake is over once the device is visible.
            assert list(backend.received)[:8] == QEMU_DEVICE_CREATION
            seen = len(backend.received)
            # content.tex "Device Initialization" through the virtio-mmio registers.
            status = base + 0x70
            qtest.writel(status, 0)
            qtest.writel(status, 1 | 2)
            qtest.writel(base + 0x24, 1)  # DriverFeaturesSel = 1: VERSION_1
            qtest.writel(base + 0x20, 1)
            qtest.writel(status, 1 | 2 | 8)
            assert qtest.readl(status) & 8
            desc, avail, used, buf = 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000
            qtest.writel(base + 0x30, 0)  # QueueSel
            qtest.writel(base + 0x38, 4)  # QueueNum
            for reg, addr in ((0x80, desc), (0x90, avail), (0xA0, used)):
                qtest.writel(base + reg, addr)
                qtest.writel(base + reg + 4, 0)
            qtest.writel(base + 0x44, 1)  # QueueReady
            qtest.writel(status, 1 | 2 | 8 | 4)  # DRIVER_OK: QEMU starts the back end
            wait_until(lambda: device.state is DeviceState.ACTIVE)
            start = list(backend.received)[seen:]
            assert start.index("SET_FEATURES") < start.index("SET_VRING_KICK")
            assert start.index("ADD_MEM_REG") < start.index("SET_VRING_ADDR")
            assert start.index("SET_VRING_KICK") < start.index("SET_VRING_ENABLE")

            qtest.write(desc, struct.pack("<QIHH", buf, 64, 2, 0))  # one writable buffer
            qtest.write(avail, struct.pack("<HHH", 0, 1, 0))
            qtest.writel(base + 0x50, 0)  # QueueNotify -> QEMU's ioeventfd -> our kick fd
            wait_until(lambda: qtest.read(used + 2, 2) == b"\x01\x00")
            assert struct.unpack("<II", qtest.read(used + 4, 8)) == (0, 64)
            assert len(set(qtest.read(buf, 64))) > 8  # random bytes, not zeros
            wait_until(lambda: qtest.readl(base + 0x60) & 1 == 1)  # our call fd -> IRQ

            seen = len(backend.received)
            qtest.writel(status, 0)  # driver reset: QEMU stops the back end
            wait_until(lambda: "GET_VRING_BASE" in list(backend.received)[seen:])
            assert device.state is DeviceState.INACTIVE
        finally:
            qtest.close()
        wait_until(lambda: not backend.connected)
