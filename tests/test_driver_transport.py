"""DriverTransportBase: features, ring planning and queue records both driver transports share;
the device ID check and the interrupt wait every device driver uses."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from pyvirtio.constants import DeviceStatus, Feature, feature_mask
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.transport import (
    DEFAULT_MAX_INDIRECT,
    WAIT_STEP,
    DriverTransportBase,
    MmioDriverError,
    QueueSetupError,
    RingPlan,
    check_device_id,
    check_required_features,
    requested_features,
    wait_until,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DriverQueue
from pyvirtio.virtqueue.packed import PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDriverQueue

MEM_SIZE = 1 << 20


@dataclass
class _Record:
    queue: DriverQueue
    allocations: list[int] = field(default_factory=list)


class _Transport(DriverTransportBase[_Record]):
    """The smallest transport: status kept in memory, every queue of size up to 64."""

    def __init__(self, features: int) -> None:
        self.mem = GuestMemory.anonymous(MEM_SIZE)
        self.allocator = GuestAllocator(self.mem, 0, MEM_SIZE)
        self._lock = threading.RLock()
        self._features = features
        self._queues = {}
        self._status = 0
        self.added: list[int] = []

    @property
    def status(self) -> int:
        return self._status

    def add_status(self, bits: int) -> int:
        self._status |= bits
        return self._status

    def _queue_size_bounds(self, index: int) -> tuple[int, int]:
        if index > 3:
            raise QueueSetupError(f"queue {index} is not available")
        return 48, 64

    def _program_queue(self, index: int, plan: RingPlan) -> _Record:
        return _Record(*self._allocate_ring(plan))

    def _queue_added(self, index: int) -> None:
        self.added.append(index)

    def set_up(self, index: int, plan: RingPlan) -> DriverQueue:
        record = self._program_queue(index, plan)
        self._queues[index] = record
        return record.queue


def test_features_and_fail() -> None:
    transport = _Transport(Feature.VERSION_1.mask | Feature.EVENT_IDX.mask)
    assert transport.negotiated_features == Feature.VERSION_1.mask | Feature.EVENT_IDX.mask
    assert transport.has_feature(Feature.EVENT_IDX)
    assert not transport.has_feature(Feature.RING_PACKED)
    transport.fail()
    assert transport.status == DeviceStatus.FAILED


@pytest.mark.parametrize("packed", [False, True])
def test_ring_format_follows_negotiation(packed: bool) -> None:
    transport = _Transport(Feature.RING_PACKED.mask if packed else 0)
    assert transport._ring_format(None) is packed
    assert transport._ring_format(packed) is packed
    with pytest.raises(QueueSetupError, match="RING_PACKED"):
        transport._ring_format(not packed)


def test_default_size_is_the_maximum_rounded_to_a_power_of_two_for_split() -> None:
    split = _Transport(0)
    assert split._plan_ring(False, None, 300, 300, None).size == 256
    packed = _Transport(Feature.RING_PACKED.mask)
    assert packed._plan_ring(True, None, 300, 300, None).size == 300


@pytest.mark.parametrize("size", [0, 513])
def test_size_outside_the_limit_is_refused(size: int) -> None:
    with pytest.raises(QueueSetupError, match=r"not in 1\.\.512"):
        _Transport(0)._plan_ring(False, size, 256, 512, None)


def test_split_size_must_be_a_power_of_two() -> None:
    with pytest.raises(QueueSetupError, match="power of two"):
        _Transport(0)._plan_ring(False, 24, 256, 256, None)
    assert _Transport(Feature.RING_PACKED.mask)._plan_ring(True, 24, 256, 256, None).size == 24


def test_indirect_tables_follow_the_negotiated_feature() -> None:
    plain = _Transport(0)._plan_ring(False, 8, 8, 8, None)
    assert (plain.indirect, plain.max_indirect) == (False, 0)
    transport = _Transport(Feature.INDIRECT_DESC.mask)
    assert transport._plan_ring(False, 8, 8, 8, None).max_indirect == DEFAULT_MAX_INDIRECT
    assert transport._plan_ring(False, 8, 8, 8, 4) == RingPlan(8, False, True, 4)


@pytest.mark.parametrize("packed", [False, True])
def test_allocated_rings_are_recorded_and_freed(packed: bool) -> None:
    transport = _Transport(Feature.RING_PACKED.mask if packed else 0)
    free_before = transport.allocator.free_bytes
    queue = transport.set_up(3, transport._plan_ring(packed, 16, 16, 16, None))
    assert isinstance(queue, PackedDriverQueue if packed else SplitDriverQueue)
    assert queue.size == 16
    assert transport.queue(3) is queue
    assert transport.queues == {3: queue}
    assert transport.allocator.free_bytes < free_before
    transport._free_allocations(transport._queues.pop(3).allocations)
    assert transport.allocator.free_bytes == free_before


def test_setup_queue_after_features_ok_once_per_index() -> None:
    transport = _Transport(Feature.INDIRECT_DESC.mask)
    with pytest.raises(QueueSetupError, match="after feature negotiation"):
        transport.setup_queue(0)
    transport.add_status(DeviceStatus.FEATURES_OK)
    queue = transport.setup_queue(0)
    assert queue.size == 32  # the default 48, rounded down for a split ring
    assert transport.queue(0) is queue and transport.added == [0]
    with pytest.raises(QueueSetupError, match="already set up"):
        transport.setup_queue(0)
    with pytest.raises(QueueSetupError, match="not available"):
        transport.setup_queue(4)
    with pytest.raises(QueueSetupError, match=r"not in 1\.\.64"):
        transport.setup_queue(1, 128)
    assert transport.setup_queue(1, 64, max_indirect=2).size == 64
    assert transport.added == [0, 1]


def test_check_device_id() -> None:
    check_device_id(4, 4, MmioDriverError, "an entropy device")
    with pytest.raises(MmioDriverError, match="device ID 3 is not an entropy device"):
        check_device_id(3, 4, MmioDriverError, "an entropy device")
    # A transport that cannot tell passes only where the driver allows it.
    for unknown in (0, None):
        check_device_id(unknown, 1, ValueError, "a network device", unknown_ok=True)
        with pytest.raises(ValueError, match=f"device ID {unknown} is not a network device"):
            check_device_id(unknown, 1, ValueError, "a network device")
    with pytest.raises(ValueError, match="device ID 2 is not a network device"):
        check_device_id(2, 1, ValueError, "a network device", unknown_ok=True)


def test_feature_mask() -> None:
    assert feature_mask() == 0
    assert feature_mask(Feature.VERSION_1, Feature.EVENT_IDX) == 1 << 32 | 1 << 29


def test_requested_features_limit_and_refuse() -> None:
    supported = feature_mask(Feature.VERSION_1, Feature.RING_PACKED, Feature.EVENT_IDX)
    assert requested_features(supported) == supported
    # A limit only narrows: bits outside ``supported`` are never asked for.
    limit = feature_mask(Feature.VERSION_1, Feature.INDIRECT_DESC)
    assert requested_features(supported, limit) == Feature.VERSION_1.mask
    # False refuses a feature; True and None leave it to negotiation.
    choices = ((False, Feature.RING_PACKED), (True, Feature.EVENT_IDX), (None, Feature.VERSION_1))
    assert requested_features(supported, None, choices) == feature_mask(
        Feature.VERSION_1, Feature.EVENT_IDX
    )


def test_check_required_features() -> None:
    choices = ((True, Feature.RING_PACKED), (None, Feature.EVENT_IDX), (False, Feature.VERSION_1))
    check_required_features(Feature.RING_PACKED.mask, choices, ValueError)
    with pytest.raises(ValueError, match="the device does not offer RING_PACKED"):
        check_required_features(Feature.EVENT_IDX.mask, choices, ValueError)


class _Interrupts:
    """Records each wait; an interrupt never comes, so every wait sleeps its timeout."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait_interrupt(self, timeout: float | None = None) -> int:
        assert timeout is not None
        self.waits.append(timeout)
        time.sleep(timeout)
        return 0


def test_wait_until_asks_before_waiting_and_after_every_wait() -> None:
    interrupts = _Interrupts()
    answers = iter([False, False, True])
    assert wait_until(interrupts, lambda: next(answers), time.monotonic() + 10)  # type: ignore[arg-type]
    assert len(interrupts.waits) == 2
    assert all(0 < w <= WAIT_STEP for w in interrupts.waits)
    # Done at once: no wait at all.
    interrupts.waits.clear()
    assert wait_until(interrupts, lambda: True, time.monotonic() - 1)  # type: ignore[arg-type]
    assert interrupts.waits == []


def test_wait_until_gives_up_at_the_deadline() -> None:
    interrupts = _Interrupts()
    asked = 0

    def never() -> bool:
        nonlocal asked
        asked += 1
        return False

    start = time.monotonic()
    assert not wait_until(interrupts, never, start + 0.12)  # type: ignore[arg-type]
    assert time.monotonic() - start >= 0.12
    # Waits are capped at WAIT_STEP, and the last one ends at the deadline.
    assert len(interrupts.waits) >= 3 and max(interrupts.waits) <= WAIT_STEP
    assert asked == len(interrupts.waits) + 1
