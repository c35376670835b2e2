"""MmioDriverTransport over InProcessBus, end to end against MmioTransport; GuestAllocator."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.mmio_devices import CounterDevice, EchoDevice
from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import COMMON_FEATURES, DeviceState
from pyvirtio.driver.memory import AllocationError, GuestAllocator, OwnedBuffers
from pyvirtio.driver.mmio import (
    DeviceProbeError,
    FeatureNegotiationError,
    MmioDriverError,
    MmioDriverTransport,
    QueueSetupError,
)
from pyvirtio.irq import INT_CONFIG, INT_VRING
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MMIO_BASE, MmioTestRig
from pyvirtio.transport.mmio import MAGIC_VALUE, Reg
from pyvirtio.virtqueue.common import DriverQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue

SPLIT = COMMON_FEATURES & ~Feature.RING_PACKED.mask


class FakeBus:
    """Registers as a plain dict, for probe failures."""

    def __init__(self, **regs: int) -> None:
        self.regs = {Reg.MAGIC_VALUE: MAGIC_VALUE, Reg.VERSION: 2, Reg.DEVICE_ID: 4}
        self.regs.update({getattr(Reg, k.upper()): v for k, v in regs.items()})

    def read(self, addr: int, size: int) -> int:
        return self.regs.get(addr, 0)

    def write(self, addr: int, size: int, value: int) -> None:
        self.regs[addr] = value


def _driver(bus: FakeBus, **kwargs: int) -> MmioDriverTransport:
    mem = GuestMemory.anonymous(0x10000)
    return MmioDriverTransport(bus, 0, mem, GuestAllocator(mem, 0, 0x10000), **kwargs)


# -- probing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regs", "message"),
    [
        ({"magic_value": 0x12345678}, "magic"),
        ({"version": 1}, "version"),
        ({"device_id": 0}, "no device"),
    ],
)
def test_probe_errors(regs: dict[str, int], message: str) -> None:
    with pytest.raises(DeviceProbeError, match=message):
        _driver(FakeBus(**regs))


def test_probe_expected_device_id() -> None:
    assert _driver(FakeBus(), device_id=4).device_id == 4
    with pytest.raises(DeviceProbeError, match="expected 2"):
        _driver(FakeBus(), device_id=2)


def test_in_process_bus_unknown_address() -> None:
    rig = MmioTestRig(EchoDevice())
    with pytest.raises(MmioDriverError, match="no device"):
        rig.bus.read(0, 4)
    assert rig.bus.read(MMIO_BASE, 4) == MAGIC_VALUE
    assert rig.driver.vendor_id == rig.transport.vendor_id


def test_reset_that_never_completes() -> None:
    class StuckBus(FakeBus):
        def read(self, addr: int, size: int) -> int:
            return 1 if addr == Reg.STATUS else super().read(addr, size)

    with pytest.raises(MmioDriverError, match="reset"):
        _driver(StuckBus()).reset()


# -- initialization ------------------------------------------------------------------------


def test_initialize_negotiates_intersection() -> None:
    rig = MmioTestRig(EchoDevice())
    wanted = Feature.VERSION_1.mask | Feature.EVENT_IDX.mask | 1 << 7
    assert rig.driver.initialize(wanted) == Feature.VERSION_1.mask | Feature.EVENT_IDX.mask
    assert rig.driver.status == DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | (
        DeviceStatus.FEATURES_OK
    )
    assert rig.device.acked_features == rig.driver.negotiated_features
    assert rig.driver.has_feature(Feature.EVENT_IDX)
    assert not rig.driver.has_feature(Feature.RING_PACKED)


def test_initialize_refused() -> None:
    device = EchoDevice()
    device.acceptable = False
    rig = MmioTestRig(device)
    with pytest.raises(FeatureNegotiationError):
        rig.driver.initialize(COMMON_FEATURES)
    assert rig.driver.status & DeviceStatus.FAILED
    device.acceptable = None  # a later initialize starts over with a reset
    assert rig.driver.initialize(COMMON_FEATURES) == COMMON_FEATURES


def test_setup_queue_errors() -> None:
    rig = MmioTestRig(EchoDevice())
    with pytest.raises(QueueSetupError, match="after feature negotiation"):
        rig.driver.setup_queue(0)
    rig.driver.initialize(SPLIT)
    with pytest.raises(QueueSetupError, match="not available"):
        rig.driver.setup_queue(5)
    with pytest.raises(QueueSetupError, match="packed ring requested"):
        rig.driver.setup_queue(0, packed_ring=True)
    with pytest.raises(QueueSetupError, match="not in"):
        rig.driver.setup_queue(0, 32)
    with pytest.raises(QueueSetupError, match="power of two"):
        rig.driver.setup_queue(0, 12)
    rig.driver.setup_queue(0)
    with pytest.raises(QueueSetupError, match="already set up"):
        rig.driver.setup_queue(0)


def test_setup_queue_refused_by_device_frees_memory() -> None:
    rig = MmioTestRig(EchoDevice())
    rig.driver.initialize(SPLIT)
    rig.driver.driver_ok()  # too late to set up queues: the device refuses QueueReady
    free = rig.allocator.free_bytes
    with pytest.raises(QueueSetupError, match="refused"):
        rig.driver.setup_queue(0)
    assert rig.allocator.free_bytes == free


def test_setup_queue_defaults() -> None:
    rig = MmioTestRig(EchoDevice(sizes=(24, 8)))
    rig.driver.initialize(SPLIT)
    assert rig.driver.queue_max_size(0) == 24
    queue = rig.driver.setup_queue(0)
    assert isinstance(queue, SplitDriverQueue)
    assert queue.size == 16  # largest power of two within QueueSizeMax
    assert rig.driver.queue(0) is queue
    rig.driver.initialize(COMMON_FEATURES)
    queue = rig.driver.setup_queue(0)
    assert isinstance(queue, PackedDriverQueue)
    assert queue.size == 24


def test_reset_frees_ring_memory() -> None:
    rig = MmioTestRig(EchoDevice())
    free = rig.allocator.free_bytes
    rig.start()
    assert rig.allocator.free_bytes < free
    rig.driver.reset()
    assert rig.allocator.free_bytes == free
    assert rig.driver.queues == {}


# -- end to end ---------------------------------------------------------------------------


def _echo_round(rig: MmioTestRig, queue: DriverQueue, index: int, count: int) -> None:
    bufs = []
    for i in range(count):
        addr = rig.allocator.alloc(96)
        payload = bytes([index, i]) * 24
        rig.mem.write(addr, payload)
        # Three readable pieces and two writable ones: indirect when allowed.
        queue.add(
            [(addr, 16), (addr + 16, 16), (addr + 32, 16)],
            [(addr + 48, 20), (addr + 68, 28)],
            (addr, payload),
        )
        bufs.append(addr)
    if queue.kick_needed():
        rig.driver.notify(index)
    assert rig.driver.wait_interrupt(timeout=1) & INT_VRING
    done = list(queue.used())
    assert len(done) == count
    for token, written in done:
        assert isinstance(token, tuple)
        addr, payload = token
        assert written == 48
        assert rig.mem.read(addr + 48, 48) == payload
        rig.allocator.free(addr)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_echo_end_to_end(packed: bool, event_idx: bool, indirect: bool) -> None:
    features = Feature.VERSION_1.mask
    if packed:
        features |= Feature.RING_PACKED.mask
    if event_idx:
        features |= Feature.EVENT_IDX.mask
    if indirect:
        features |= Feature.INDIRECT_DESC.mask
    rig = MmioTestRig(EchoDevice(sizes=(32, 16)))
    queues = rig.start(features)
    assert rig.device.state is DeviceState.ACTIVE
    device_queue = rig.device.queues[0]
    assert isinstance(device_queue, PackedDeviceQueue if packed else SplitDeviceQueue)
    assert device_queue.event_idx is event_idx
    assert device_queue.indirect is indirect
    for round_ in range(40):  # enough to wrap both rings several times
        for index, queue in enumerate(queues):
            _echo_round(rig, queue, index, 1 + round_ % 3)
    assert rig.device.echoed == sum(1 + r % 3 for r in range(40)) * 2
    assert not rig.driver.needs_reset


def test_wait_interrupt_timeout_and_polling() -> None:
    rig = MmioTestRig(EchoDevice())
    assert rig.driver.wait_interrupt(timeout=0.01) == 0
    rig.bus.controller = None  # no interrupt controller: the driver polls
    assert rig.driver.wait_interrupt(timeout=0.01) == 0
    rig.irq.trigger_config()
    assert rig.driver.wait_interrupt(timeout=0.01) == INT_CONFIG
    assert rig.driver.interrupt_status() == 0


def test_wait_interrupt_from_device_thread() -> None:
    rig = MmioTestRig(EchoDevice())
    timer = threading.Timer(0.05, rig.irq.trigger_queue)
    timer.start()
    assert rig.driver.wait_interrupt(timeout=5) == INT_VRING
    timer.join()


def test_ack_interrupt() -> None:
    rig = MmioTestRig(EchoDevice())
    rig.irq.trigger_queue()
    rig.irq.trigger_config()
    assert rig.driver.interrupt_status() == INT_VRING | INT_CONFIG
    rig.driver.ack_interrupt(INT_VRING)
    assert rig.driver.interrupt_status() == INT_CONFIG


def test_needs_reset_exposed() -> None:
    device = EchoDevice()
    device.refuse_activation = True
    rig = MmioTestRig(device)
    rig.start()
    assert rig.driver.needs_reset
    assert rig.driver.wait_interrupt(timeout=1) == INT_CONFIG
    device.refuse_activation = False
    rig.start()
    assert not rig.driver.needs_reset


# -- config space -------------------------------------------------------------------------


def test_config_reads_and_writes() -> None:
    rig = MmioTestRig(EchoDevice())
    assert rig.driver.read_config(0, 1) == 1
    assert rig.driver.read_config(0, 2) == 0x0201
    assert rig.driver.read_config(0, 4) == 0x04030201
    assert rig.driver.read_config(0, 8) == 0x0807060504030201
    assert rig.driver.read_config_bytes(1, 3) == b"\x02\x03\x04"
    rig.driver.write_config(0, 8, 0x1122334455667788)
    assert rig.driver.read_config(0, 8) == 0x1122334455667788
    rig.driver.write_config(0, 2, 0xAAAA)
    assert rig.driver.read_config(0, 4) == 0x5566AAAA
    with pytest.raises(ValueError):
        rig.driver.read_config(0, 3)
    with pytest.raises(ValueError):
        rig.driver.write_config(0, 16, 0)


def test_config_generation_retry() -> None:
    device = CounterDevice()
    rig = MmioTestRig(device)
    reads = 0

    def read() -> int:
        nonlocal reads
        reads += 1
        if reads < 3:
            device.bump()  # changed under the driver's feet
        return rig.driver.read_config(0, 4)

    assert rig.driver.consistent(read) == 2
    assert reads == 3
    assert rig.driver.config_generation == 2


def test_config_that_never_settles() -> None:
    device = CounterDevice()
    rig = MmioTestRig(device)
    with pytest.raises(MmioDriverError, match="keeps changing"):
        rig.driver.consistent(device.bump)


def test_shared_memory_region() -> None:
    rig = MmioTestRig(EchoDevice(shm=[(0x4_0000_0000, 0x20_0000)]))
    assert rig.driver.shared_memory_region(0) == (0x4_0000_0000, 0x20_0000)
    assert rig.driver.shared_memory_region(1) is None


def test_queue_reset_through_driver() -> None:
    features = SPLIT | Feature.RING_RESET.mask
    rig = MmioTestRig(EchoDevice(features))
    queues = rig.start(features)
    rig.driver.reset_queue(1)
    assert 1 not in rig.driver.queues
    queue = rig.driver.setup_queue(1, 4)
    _echo_round(rig, queue, 1, 3)
    _echo_round(rig, queues[0], 0, 3)
    rig_plain = MmioTestRig(EchoDevice())
    rig_plain.start(SPLIT)
    with pytest.raises(QueueSetupError, match="RING_RESET"):
        rig_plain.driver.reset_queue(0)


# -- allocator --------------------------------------------------------------------------------


def test_allocator_alignment_zeroing_and_exhaustion() -> None:
    mem = GuestMemory.anonymous(0x1000)
    mem.fill(0, 0x1000, 0xAA)
    alloc = GuestAllocator(mem, 0x10, 0x100)
    a = alloc.alloc(3, 1)
    assert a == 0x10
    assert mem.read(a, 3) == bytes(3)
    b = alloc.alloc(16, 64)
    assert b % 64 == 0
    assert alloc.owns(b)
    with pytest.raises(AllocationError):
        alloc.alloc(0x100)
    alloc.free(a)
    alloc.free(b)
    assert alloc.free_bytes == 0x100
    assert alloc.alloc(0x100, 16) == 0x10  # coalesced back into one block
    c = GuestAllocator(mem, 0x200, 0x10).alloc(4, zero=False)
    assert mem.read(c, 4) == b"\xaa" * 4


def test_allocator_rejects_bad_calls() -> None:
    mem = GuestMemory.anonymous(0x1000)
    with pytest.raises(ValueError):
        GuestAllocator(mem, 0x800, 0x1000)
    alloc = GuestAllocator(mem, 0, 0x1000)
    with pytest.raises(ValueError):
        alloc.alloc(0)
    with pytest.raises(ValueError):
        alloc.alloc(8, 3)
    with pytest.raises(AllocationError):
        alloc.free(0x40)
    a = alloc.alloc(8)
    alloc.free(a)
    with pytest.raises(AllocationError):
        alloc.free(a)


def test_owned_buffers_free_only_their_own() -> None:
    mem = GuestMemory.anonymous(0x1000)
    mem.fill(0, 0x1000, 0xAA)
    alloc = GuestAllocator(mem, 0, 0x1000)
    ring = alloc.alloc(0x100)  # someone else's block in the same allocator
    zeroed, unzeroed = OwnedBuffers(alloc), OwnedBuffers(alloc, zero=False)
    a = zeroed.alloc(8)
    assert mem.read(a, 8) == bytes(8)
    b = unzeroed.alloc(8)
    assert mem.read(b, 8) == b"\xaa" * 8
    c = zeroed.alloc(8)
    zeroed.free(a)
    assert not alloc.owns(a) and alloc.owns(c)
    zeroed.free_all()
    assert not alloc.owns(c) and alloc.owns(b) and alloc.owns(ring)
    zeroed.free_all()  # nothing left: freeing again frees nothing twice
    unzeroed.free_all()
    assert alloc.free_bytes == 0x1000 - 0x100


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 300), st.sampled_from([1, 2, 4, 16, 64, 4096])),
        max_size=80,
    )
)
def test_allocator_blocks_never_overlap(ops: list[tuple[bool, int, int]]) -> None:
    mem = GuestMemory.anonymous(0x4000)
    alloc = GuestAllocator(mem, 0x100, 0x3000)
    live: dict[int, int] = {}
    for is_free, size, align in ops:
        if is_free and live:
            addr = next(iter(live))
            alloc.free(addr)
            del live[addr]
            continue
        try:
            addr = alloc.alloc(size, align)
        except AllocationError:
            continue
        assert addr % align == 0
        assert addr >= 0x100 and addr + size <= 0x3100
        for other, other_size in live.items():
            assert addr + size <= other or other + other_size <= addr
        live[addr] = size
    for addr in list(live):
        alloc.free(addr)
    assert alloc.free_bytes == 0x3000
