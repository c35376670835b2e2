"""BlkDriver end to end: BlkDriver -> MmioDriverTransport -> InProcessBus ->
MmioTransport -> Block, over real files, with split and packed rings; and
completion polling against a device the tests complete requests of by hand."""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from pyvirtio.constants import Feature
from pyvirtio.devices.block import BlkFeature, Block, RequestType
from pyvirtio.driver.blk import BlkDriver, BlkError, QueueFullError
from pyvirtio.driver.memory import GuestAllocator, allocate_driver_queue
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import RIG_MEMORY_SIZE, MmioTestRig
from pyvirtio.virtqueue.common import DescriptorChain, DriverQueue
from pyvirtio.virtqueue.packed import RING_EVENT_FLAGS_DISABLE, PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

SECTOR = 512
DISK_SIZE = 4 << 20


def pattern(length: int, seed: int = 1) -> bytes:
    period = bytes((i * 13 + seed) & 0xFF for i in range(256))
    return (period * (length // 256 + 1))[:length]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SIZE))
    return path


class Setup:
    def __init__(self, device: Block, **driver: object) -> None:
        self.device = device
        self.rig = MmioTestRig(device)
        self.driver = BlkDriver(self.rig.driver, **driver)  # type: ignore[arg-type]


@pytest.fixture
def setup(image: Path) -> Iterator[Setup]:
    s = Setup(Block(image, serial="e2e-serial"))
    yield s
    s.device.close()


# -- end to end over every ring variant -----------------------------------------------------

RING_VARIANTS = [
    pytest.param(packed, event_idx, indirect, id=f"{name}-evidx{int(event_idx)}-ind{int(indirect)}")
    for name, packed in (("split", False), ("packed", True))
    for event_idx in (False, True)
    for indirect in (False, True)
]


@pytest.mark.parametrize("poll_us", [0.0, 20.0], ids=["irq", "poll"])
@pytest.mark.parametrize(("packed", "event_idx", "indirect"), RING_VARIANTS)
def test_end_to_end(
    image: Path, packed: bool, event_idx: bool, indirect: bool, poll_us: float
) -> None:
    s = Setup(
        Block(image, serial="ring"),
        packed=packed,
        event_idx=event_idx,
        indirect=indirect,
        poll_us=poll_us,
    )
    drv = s.driver
    assert drv.has(Feature.RING_PACKED) is packed
    assert drv.has(Feature.EVENT_IDX) is event_idx
    assert drv.has(Feature.INDIRECT_DESC) is indirect
    assert drv.capacity == DISK_SIZE // SECTOR
    assert drv.block_size == SECTOR
    expected = bytearray(pattern(DISK_SIZE))
    rng = random.Random(f"{packed}{event_idx}{indirect}")
    for i in range(30):
        offset = rng.randrange(0, DISK_SIZE // SECTOR - 16) * SECTOR
        length = rng.randint(1, 16) * SECTOR
        data = pattern(length, i)
        drv.write(offset, data)
        expected[offset : offset + length] = data
        assert drv.read(offset, length) == data
    # Scatter-gather through caller buffers.
    bufs = [drv.alloc_buffer(n) for n in (SECTOR, 3 * SECTOR, 2 * SECTOR)]
    for i, buf in enumerate(bufs):
        buf.view[:] = pattern(buf.length, 100 + i)
    drv.writev(8 * SECTOR, [(b.addr, b.length) for b in bufs])
    joined = b"".join(bytes(b.view) for b in bufs)
    expected[8 * SECTOR : 14 * SECTOR] = joined
    for buf in bufs:
        buf.view[:] = bytes(buf.length)
    drv.readv(8 * SECTOR, [(b.addr, b.length) for b in bufs])
    assert b"".join(bytes(b.view) for b in bufs) == joined
    for buf in bufs:
        drv.free_buffer(buf)
    drv.write_zeroes(64 * SECTOR, 8 * SECTOR)
    drv.write_zeroes(80 * SECTOR, 8 * SECTOR, unmap=True)
    expected[64 * SECTOR : 72 * SECTOR] = bytes(8 * SECTOR)
    expected[80 * SECTOR : 88 * SECTOR] = bytes(8 * SECTOR)
    drv.flush()
    assert drv.get_id() == "ring"
    assert drv.read(0, DISK_SIZE) == bytes(expected)  # several max_transfer requests
    assert image.read_bytes() == bytes(expected)
    drv.discard(96 * SECTOR, 8 * SECTOR)  # contents undefined afterwards
    assert drv.in_flight == 0
    assert not s.rig.driver.needs_reset
    s.device.close()


@pytest.mark.parametrize("poll_us", [0.0, 20.0], ids=["irq", "poll"])
def test_queue_depth_32_with_one_kick(setup: Setup, poll_us: float) -> None:
    drv = setup.driver
    drv.poll_us = poll_us
    bufs = [drv.alloc_buffer(4096) for _ in range(32)]
    offsets = random.Random(3).sample(range(DISK_SIZE // 4096), 32)
    tokens = {
        drv.submit_read(off * 4096, buf.addr, 4096, kick=False): (off, buf)
        for off, buf in zip(offsets, bufs, strict=True)
    }
    assert drv.poll() == []  # nothing was kicked yet
    assert drv.in_flight == 32
    drv.kick()
    done = drv.wait(32, timeout=5)
    assert sorted(t for t, _ in done) == sorted(tokens)
    assert all(result == 0 for _, result in done)
    disk = pattern(DISK_SIZE)
    for token, _ in done:
        off, buf = tokens[token]
        assert bytes(buf.view) == disk[off * 4096 : off * 4096 + 4096]
    assert drv.in_flight == 0


def test_queue_full(image: Path) -> None:
    s = Setup(Block(image), queue_size=4, indirect=False)
    drv = s.driver
    buf = drv.alloc_buffer(SECTOR)
    drv.submit_read(0, buf.addr, SECTOR, kick=False)  # 3 descriptors of 4
    with pytest.raises(QueueFullError):
        drv.submit_read(0, buf.addr, SECTOR, kick=False)
    drv.kick()
    assert [r for _, r in drv.wait()] == [0]
    drv.submit_flush()
    assert [r for _, r in drv.wait()] == [0]
    s.device.close()


def test_blocking_helper_waits_for_room(image: Path) -> None:
    s = Setup(Block(image), queue_size=4, indirect=False)
    drv = s.driver
    buf = drv.alloc_buffer(SECTOR)
    early = drv.submit_read(SECTOR, buf.addr, SECTOR, kick=False)
    assert drv.read(0, SECTOR) == pattern(SECTOR)  # kicked the queue to make room
    assert drv.poll() == [(early, 0)]
    assert bytes(buf.view) == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]
    s.device.close()


@pytest.mark.parametrize("poll_us", [0.0, 1e6], ids=["irq", "poll-past-timeout"])
def test_timeout(image: Path, poll_us: float) -> None:
    s = Setup(Block(image), timeout=0.05, poll_us=poll_us)
    drv = s.driver
    s.rig.transport.sleep()  # notifications are ignored while asleep
    with pytest.raises(BlkError) as info:
        drv.read(0, SECTOR)
    assert info.value.errno == errno.ETIMEDOUT
    assert drv.in_flight == 1
    s.rig.transport.wake()  # serves what was posted meanwhile
    assert [r for _, r in drv.wait(1, timeout=1)] == [0]
    assert drv.read(SECTOR, SECTOR) == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]
    s.device.close()


def test_multiqueue(image: Path) -> None:
    s = Setup(Block(image, num_queues=4), num_queues=8)
    drv = s.driver
    assert drv.has(BlkFeature.MQ)
    assert drv.num_queues == 4  # capped by the device's num_queues
    buf = drv.alloc_buffer(SECTOR)
    for q in range(4):
        drv.write(q * SECTOR, pattern(SECTOR, q), queue=q)
    tokens = [drv.submit_read(q * SECTOR, buf.addr, SECTOR, queue=q) for q in range(1)]
    assert drv.wait(1)[0] == (tokens[0], 0)
    for q in range(4):
        assert drv.read(q * SECTOR, SECTOR, queue=(q + 1) % 4) == pattern(SECTOR, q)
    with pytest.raises(ValueError, match="no queue 4"):
        drv.read(0, SECTOR, queue=4)
    s.device.close()
    # A single-queue device: MQ is not offered, one queue.
    s = Setup(Block(image), num_queues=3)
    assert s.driver.num_queues == 1
    assert not s.driver.has(BlkFeature.MQ)
    s.device.close()


def test_large_block_size(image: Path) -> None:
    s = Setup(Block(image, logical_block_size=4096))
    drv = s.driver
    assert drv.block_size == 4096
    with pytest.raises(ValueError, match="block size 4096"):
        drv.read(512, 4096)
    with pytest.raises(ValueError, match="block size 4096"):
        drv.write(0, bytes(512))
    drv.write(4096, pattern(8192, 5))
    assert drv.read(4096, 8192) == pattern(8192, 5)
    s.device.close()


# -- validation before sending --------------------------------------------------------------


def test_invalid_requests_are_refused_before_sending(setup: Setup) -> None:
    drv, dev = setup.driver, setup.device
    before = dev.requests
    buf = drv.alloc_buffer(4096)
    cases = [
        lambda: drv.read(1, SECTOR),
        lambda: drv.read(0, 100),
        lambda: drv.read(-SECTOR, SECTOR),
        lambda: drv.read(DISK_SIZE, SECTOR),
        lambda: drv.read(DISK_SIZE - SECTOR, 2 * SECTOR),
        lambda: drv.write(DISK_SIZE, bytes(SECTOR)),
        lambda: drv.write(0, bytes(SECTOR + 1)),
        lambda: drv.submit_read(0, buf.addr, 100),
        lambda: drv.submit_read(0, 1 << 40, SECTOR),  # not guest memory
        lambda: drv.submit_writev(SECTOR, [(buf.addr, 256), (buf.addr, 100)]),
        lambda: drv.submit_readv(0, [(buf.addr, 8)] * (drv.seg_max + 1)),  # seg_max
        lambda: drv.discard(SECTOR, 100),
        lambda: drv.write_zeroes(DISK_SIZE - SECTOR, 2 * SECTOR),
        lambda: drv.submit_discard(0, 0),
        lambda: drv.submit_get_id(1 << 40),
        lambda: drv.submit_flush(queue=1),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
    assert dev.requests == before
    assert drv.in_flight == 0


def test_read_only_device(image: Path) -> None:
    s = Setup(Block(image, read_only=True))
    drv = s.driver
    assert drv.read_only
    before = s.device.requests
    for call in (
        lambda: drv.write(0, bytes(SECTOR)),
        lambda: drv.discard(0, SECTOR),
        lambda: drv.write_zeroes(0, SECTOR),
    ):
        with pytest.raises(BlkError) as info:
            call()
        assert info.value.errno == errno.EROFS
    assert s.device.requests == before
    assert drv.read(0, SECTOR) == pattern(SECTOR)
    drv.flush()
    assert image.read_bytes() == pattern(DISK_SIZE)
    s.device.close()


def test_commands_not_offered(image: Path) -> None:
    s = Setup(Block(image, discard=False, write_zeroes=False))
    drv = s.driver
    for call in (lambda: drv.discard(0, SECTOR), lambda: drv.write_zeroes(0, SECTOR)):
        with pytest.raises(BlkError) as info:
            call()
        assert info.value.errno == errno.ENOTSUP
    s.device.close()


# -- errors from the device ------------------------------------------------------------------


def test_ioerr_becomes_eio(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    drv = setup.driver

    def fail(*args: object) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(BlkError) as info:
        drv.read(0, SECTOR)
    assert info.value.errno == errno.EIO
    assert "read at offset 0" in str(info.value)
    buf = drv.alloc_buffer(SECTOR)
    token = drv.submit_read(0, buf.addr, SECTOR)
    assert drv.wait() == [(token, -errno.EIO)]
    monkeypatch.undo()
    assert drv.read(0, SECTOR) == pattern(SECTOR)  # the device kept serving


def test_unsupp_becomes_enotsup(setup: Setup) -> None:
    drv = setup.driver
    # No public API sends GET_LIFETIME (the device does not offer LIFETIME).
    token = drv._submit(0, RequestType.GET_LIFETIME, 0, (), [], True)
    assert drv.wait() == [(token, -errno.ENOTSUP)]


def test_write_failure_raises(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)  # writes on it fail with EBADF
    s = Setup(Block(fd))
    with pytest.raises(BlkError) as info:
        s.driver.write(0, bytes(SECTOR))
    assert info.value.errno == errno.EIO
    assert s.driver.read(0, SECTOR) == pattern(SECTOR)
    os.close(fd)


# -- cache modes --------------------------------------------------------------------------------


def test_writeback_switch(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    drv, dev = setup.driver, setup.device
    assert drv.writeback and dev.writeback
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    drv.write(0, bytes(SECTOR))
    assert syncs == []
    drv.flush()
    assert len(syncs) == 1
    drv.set_writeback(False)
    assert not dev.writeback
    assert not drv.writeback
    drv.write(0, bytes(SECTOR))
    assert len(syncs) == 2
    drv.set_writeback(True)
    assert dev.writeback


def test_flush_without_flush_feature_is_local(image: Path) -> None:
    dev = Block(image)
    rig = MmioTestRig(dev)
    # A transport wrapper that hides FLUSH and CONFIG_WCE from the offer.
    initialize = rig.driver.initialize
    hidden = BlkFeature.FLUSH.mask | BlkFeature.CONFIG_WCE.mask
    rig.driver.initialize = lambda wanted: initialize(wanted & ~hidden)  # type: ignore[method-assign]
    drv = BlkDriver(rig.driver)
    assert not drv.has(BlkFeature.FLUSH)
    assert not dev.writeback  # stability case 1: writes are synced
    before = dev.requests
    drv.flush()
    assert dev.requests == before
    dev.close()


def test_capacity_change(setup: Setup, image: Path) -> None:
    os.truncate(image, 2 * DISK_SIZE)
    assert setup.device.refresh_capacity()
    assert setup.rig.driver.wait_interrupt(1) & 2  # configuration change
    assert setup.driver.refresh_capacity() == 2 * DISK_SIZE // SECTOR
    setup.driver.write(DISK_SIZE, bytes(SECTOR))


# -- durability across SIGKILL ------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pyvirtio.devices.block import Block
    from pyvirtio.driver.blk import BlkDriver
    from pyvirtio.testing import MmioTestRig

    path, mode = sys.argv[1], sys.argv[2]
    device = Block(path, cache="writethrough" if mode == "writethrough" else "writeback")
    driver = BlkDriver(MmioTestRig(device).driver)
    data = bytes(range(256)) * 1024
    for i in range(4):
        driver.write(i * len(data), data)
    if mode == "flush":
        driver.flush()
    sys.stdout.write("done\\n")
    sys.stdout.flush()
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["flush", "writethrough"])
def test_completed_writes_survive_sigkill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "durable.img"
    path.write_bytes(bytes(2 << 20))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"done\n", line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert data[: 1 << 20] == bytes(range(256)) * 4096
    assert data[1 << 20 :] == bytes(1 << 20)


# -- completion polling (poll_us) ----------------------------------------------------------------


def notifications_on(queue: DriverQueue) -> bool:
    """Whether a driver queue asks for used-buffer notifications (either ring format)."""
    state = queue.state()
    if "interrupts_enabled" in state:  # split
        return bool(state["interrupts_enabled"])
    return bool(state["interrupt_flags"] != RING_EVENT_FLAGS_DISABLE)


class HookedQueue:
    """A driver queue with hooks where a device completing a request races
    with the driver: just before ``enable_interrupts``, just after
    ``disable_interrupts`` and before each look at the used ring."""

    def __init__(self, queue: DriverQueue) -> None:
        self.queue = queue
        self.before_enable: Callable[[], object] | None = None
        self.after_disable: Callable[[], object] | None = None
        self.before_used: Callable[[], object] | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.queue, name)

    def used(self) -> Iterator[tuple[object, int]]:
        if self.before_used is not None:
            self.before_used()
        return self.queue.used()

    def enable_interrupts(self) -> bool:
        if self.before_enable is not None:
            self.before_enable()
        return self.queue.enable_interrupts()

    def disable_interrupts(self) -> None:
        self.queue.disable_interrupts()
        if self.after_disable is not None:
            self.after_disable()


class HandDevice:
    """A virtio-blk device over a RAM disk that the test drives by hand (a BlkTransport).

    Requests complete only when the test (or a hook) calls :meth:`complete`,
    in whatever order it asks, and interrupts follow the driver's
    notification suppression (the device queue's ``needs_notification``).
    :meth:`wait_interrupt` never blocks: it runs ``on_sleep`` (the device
    working while the driver sleeps), and otherwise returns 0 as a timeout
    would.  Before that it checks what a sleeping driver relies on: it only
    sleeps with notifications on, and never while a completion it was not
    told about sits in the used ring (it would sleep until its timeout).
    """

    def __init__(self, *, packed: bool, event_idx: bool, sectors: int = 2048) -> None:
        self.mem = GuestMemory.anonymous(RIG_MEMORY_SIZE)
        self.allocator = GuestAllocator(self.mem, 0x1000, RIG_MEMORY_SIZE - 0x1000)
        self.disk = bytearray(pattern(sectors * SECTOR))
        self.offered = Feature.VERSION_1.mask | Feature.INDIRECT_DESC.mask | BlkFeature.FLUSH.mask
        if packed:
            self.offered |= Feature.RING_PACKED.mask
        if event_idx:
            self.offered |= Feature.EVENT_IDX.mask
        self.features = 0
        self.device_queues: list[SplitDeviceQueue | PackedDeviceQueue] = []
        self.driver_queues: list[HookedQueue] = []
        self.held: list[DescriptorChain] = []
        self.irq = False
        self.interrupts = 0
        self.sleeps = 0
        self.on_sleep: Callable[[], object] | None = None
        self.driver: BlkDriver | None = None

    # -- BlkTransport ---------------------------------------------------------------------------

    def initialize(self, wanted_features: int) -> int:
        self.features = wanted_features & self.offered
        return self.features

    def has(self, feature: Feature) -> bool:
        return bool(self.features & feature.mask)

    def setup_queue(
        self, index: int, size: int | None = None, packed_ring: bool | None = None
    ) -> DriverQueue:
        size = size or 64
        packed = self.has(Feature.RING_PACKED)
        event_idx = self.has(Feature.EVENT_IDX)
        indirect = self.has(Feature.INDIRECT_DESC)
        queue, (desc, driver, device, *_) = allocate_driver_queue(
            self.mem,
            self.allocator,
            size,
            packed_ring=packed,
            event_idx=event_idx,
            indirect=indirect,
            max_indirect=8,
        )
        kind = PackedDeviceQueue if packed else SplitDeviceQueue
        self.device_queues.append(
            kind(self.mem, size, desc, driver, device, event_idx=event_idx, indirect=indirect)
        )
        hooked = HookedQueue(queue)
        self.driver_queues.append(hooked)
        return cast(DriverQueue, hooked)

    def driver_ok(self) -> None:
        pass

    def notify(self, index: int) -> None:
        pass  # requests wait for complete()

    def read_config(self, offset: int, size: int) -> int:
        assert (offset, size) == (0, 8), "only capacity is offered"
        return len(self.disk) // SECTOR

    def write_config(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("nothing to write")

    def wait_interrupt(self, timeout: float | None = None) -> int:
        self.sleeps += 1
        assert all(notifications_on(q.queue) for q in self.driver_queues), (
            "the driver sleeps with used-buffer notifications off"
        )
        if self.on_sleep is not None:
            self.on_sleep()
        if self.irq:
            self.irq = False
            return 1
        self.take()
        assert self.driver is not None
        assert self.driver.in_flight == len(self.held), (
            "the driver sleeps although a completion waits in the used ring"
        )
        assert timeout is not None, "the driver would sleep forever"
        return 0

    # -- the device -----------------------------------------------------------------------------

    def take(self) -> None:
        """Pop every available request (without completing it)."""
        self.held += iter(self.device_queues[0].pop, None)

    def complete(self, count: int | None = None, order: str = "fifo") -> int:
        """Complete ``count`` held requests (all by default), in ``order``
        ("fifo", "lifo" or "shuffle"); returns how many."""
        self.take()
        chains = self.held[: len(self.held) if count is None else count]
        del self.held[: len(chains)]
        if order == "lifo":
            chains.reverse()
        elif order == "shuffle":
            random.Random(len(chains)).shuffle(chains)
        queue = self.device_queues[0]
        for chain in chains:  # one by one, as a device finishing them in turn would
            queue.add_used(chain, self.serve(chain))
            if queue.needs_notification():
                self.irq = True
                self.interrupts += 1
        return len(chains)

    def serve(self, chain: DescriptorChain) -> int:
        kind, _, sector = struct.unpack("<IIQ", chain.read(0, 16))
        offset = sector * SECTOR
        if kind == RequestType.IN:
            length = chain.writable_len - 1
            chain.write(self.disk[offset : offset + length])
            chain.write(b"\0", length)
            return length + 1
        if kind == RequestType.OUT:
            data = chain.read(16, chain.readable_len - 16)
            self.disk[offset : offset + len(data)] = data
        chain.write(b"\0")
        return 1


POLL_RINGS = [
    pytest.param(packed, event_idx, id=f"{name}-evidx{int(event_idx)}")
    for name, packed in (("split", False), ("packed", True))
    for event_idx in (False, True)
]


def hand_driver(packed: bool, event_idx: bool, **options: object) -> tuple[HandDevice, BlkDriver]:
    device = HandDevice(packed=packed, event_idx=event_idx)
    driver = BlkDriver(device, packed=packed, event_idx=event_idx, **options)  # type: ignore[arg-type]
    device.driver = driver
    return device, driver


@pytest.mark.parametrize("poll_us", [0.0, 50.0])
@pytest.mark.parametrize(("packed", "event_idx"), POLL_RINGS)
def test_polling_many_in_flight_out_of_order(packed: bool, event_idx: bool, poll_us: float) -> None:
    """Polling or not, requests completed in any order come back right."""
    device, drv = hand_driver(packed, event_idx, poll_us=poll_us)
    bufs = [drv.alloc_buffer(4096) for _ in range(32)]
    for i, buf in enumerate(bufs):
        buf.view[:] = pattern(4096, 50 + i)
    writes = {
        drv.submit_write(i * 8192, buf.addr, 4096, kick=False): i for i, buf in enumerate(bufs)
    }
    drv.kick()
    assert device.complete(order="lifo") == 32
    done = drv.wait(32, timeout=5)
    assert sorted(done) == sorted((token, 0) for token in writes)
    for buf in bufs:
        buf.view[:] = bytes(4096)
    reads = {drv.submit_read(i * 8192, buf.addr, 4096): i for i, buf in enumerate(bufs)}
    flush = drv.submit_flush()
    device.complete(12, order="shuffle")
    first = drv.wait(1, timeout=5)
    assert len(first) == 12  # wait returns all that is there, not just the one asked for
    device.complete(order="shuffle")
    rest = drv.wait(21, timeout=5)
    assert sorted(first + rest) == sorted((token, 0) for token in [*reads, flush])
    for i, buf in enumerate(bufs):
        assert bytes(buf.view) == pattern(4096, 50 + i)
    assert drv.in_flight == 0
    assert device.sleeps == 0  # every completion was there before the wait


@pytest.mark.parametrize("poll_us", [0.0, 1.0, 50.0])
@pytest.mark.parametrize(("packed", "event_idx"), POLL_RINGS)
def test_polling_blocking_helpers_while_device_works_during_sleep(
    packed: bool, event_idx: bool, poll_us: float
) -> None:
    """The device answers only while the driver sleeps: every wait spins (if
    polling), turns notifications back on, sleeps and is woken by an interrupt."""
    device, drv = hand_driver(packed, event_idx, poll_us=poll_us, timeout=5)
    device.on_sleep = device.complete
    for i in range(20):
        drv.write(i * 4096, pattern(4096, i))
        assert drv.read(i * 4096, 4096) == pattern(4096, i)
    drv.flush()
    assert device.disk[: 20 * 4096] == b"".join(pattern(4096, i) for i in range(20))
    assert device.sleeps == 41
    assert device.interrupts == 41  # each sleep ended by an interrupt, none lost
    on = [notifications_on(q.queue) for q in device.driver_queues]
    assert on == [True]  # the last wait slept, so with notifications on


@pytest.mark.parametrize(("packed", "event_idx"), POLL_RINGS)
def test_polling_completion_just_before_notifications_return(packed: bool, event_idx: bool) -> None:
    """A request completed after the poll window's last look but before
    notifications are back on raises no interrupt: the re-check must find it."""
    device, drv = hand_driver(packed, event_idx, poll_us=1.0)
    buf = drv.alloc_buffer(4096)
    token = drv.submit_read(4096, buf.addr, 4096)
    [queue] = device.driver_queues

    def complete_late() -> None:
        queue.before_enable = None
        assert not notifications_on(queue.queue)  # off while polling
        assert device.complete() == 1

    queue.before_enable = complete_late
    assert drv.wait(1, timeout=5) == [(token, 0)]
    assert device.interrupts == 0  # suppressed: nothing would have woken a sleeper
    assert device.sleeps == 0  # reaped on the re-check, not slept on
    assert bytes(buf.view) == pattern(DISK_SIZE)[4096:8192]


@pytest.mark.parametrize(("packed", "event_idx"), POLL_RINGS)
def test_polling_reaps_completions_without_interrupts(packed: bool, event_idx: bool) -> None:
    """Requests completed while the driver spins are reaped without an interrupt
    or a sleep; notifications stay off between waits until the driver sleeps."""
    device, drv = hand_driver(packed, event_idx, poll_us=60e6)  # the window outlasts the test
    [queue] = device.driver_queues
    buf = drv.alloc_buffer(4096)
    looks = 0

    def complete_on_third_look() -> None:
        nonlocal looks
        looks += 1
        if looks == 3:
            assert not notifications_on(queue.queue)
            assert device.complete() == 1

    queue.before_used = complete_on_third_look
    for i in range(5):
        token = drv.submit_read(i * 4096, buf.addr, 4096)
        looks = 0
        assert drv.wait(1, timeout=5) == [(token, 0)]
        assert looks == 3  # wait's own look, then two of the spin's
        assert not notifications_on(queue.queue)
    assert device.interrupts == 0
    assert device.sleeps == 0
    # Once the driver has to sleep, notifications are on again.
    queue.before_used = None
    device.on_sleep = device.complete
    drv.poll_us = 0
    assert drv.read(0, 4096) == pattern(4096)
    assert device.sleeps == 1 and device.interrupts == 1
    assert notifications_on(queue.queue)


def test_polling_off_never_touches_notifications() -> None:
    device, drv = hand_driver(False, True)
    [queue] = device.driver_queues
    device.on_sleep = device.complete

    def fail() -> None:
        raise AssertionError("notifications turned off without polling")

    queue.after_disable = fail
    queue.before_enable = fail
    drv.write(0, bytes(4096))
    assert drv.read(0, 4096) == bytes(4096)
    assert notifications_on(queue.queue)


@pytest.mark.parametrize(("packed", "event_idx"), POLL_RINGS)
def test_polling_wait_is_bounded_by_its_timeout(packed: bool, event_idx: bool) -> None:
    """A poll window far longer than the timeout still ends at the timeout."""
    device, drv = hand_driver(packed, event_idx, poll_us=60e6, timeout=0.05)
    buf = drv.alloc_buffer(4096)
    start = time.monotonic()
    token = drv.submit_read(0, buf.addr, 4096)
    assert drv.wait(1, timeout=0.05) == []
    with pytest.raises(BlkError) as info:
        drv.read(4096, 4096)
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < 30  # not the 60 s poll window
    assert drv.in_flight == 2
    device.complete()
    assert sorted(drv.wait(2, timeout=5))[0] == (token, 0)


def test_poll_us_must_be_finite_and_not_negative(setup: Setup) -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="poll_us"):
            setup.driver.poll_us = bad
    setup.driver.poll_us = 25
    assert setup.driver.poll_us == pytest.approx(25)
    with pytest.raises(ValueError, match="poll_us"):
        BlkDriver(setup.rig.driver, poll_us=-5)


def test_driver_imports_the_wire_format_not_the_device_model() -> None:
    """driver/blk.py shares only devices/block/wire.py with the device: importing
    it loads no model, host backend or pipeline (in a fresh interpreter)."""
    code = (
        "import sys, pyvirtio.driver.blk\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pyvirtio.devices'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["pyvirtio.devices", "pyvirtio.devices.block", "pyvirtio.devices.block.wire"]
