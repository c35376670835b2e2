"""What device drivers need of a driver transport, whichever it is.

:class:`~pyvirtio.driver.mmio.MmioDriverTransport` (in-process or qtest) and
:class:`~pyvirtio.driver.vhost_user.VhostUserFrontend` both have it; device
drivers (``driver.blk``, ``driver.net``) type their transport with these
protocols so they run over either.

:class:`DriverTransportBase` is what both transports keep alike: the
negotiated features, the queues set up with the guest memory they own, and
the choice of ring size, format and indirect tables for a new queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, NamedTuple, Protocol, TypeVar

from pyvirtio.constants import DeviceStatus, Feature, FeatureBit
from pyvirtio.driver.memory import GuestAllocator, allocate_driver_queue
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DriverQueue

__all__ = [
    "DEFAULT_MAX_INDIRECT",
    "WAIT_STEP",
    "BufferAllocator",
    "DriverTransport",
    "DriverTransportBase",
    "FeatureChoice",
    "FeatureNegotiationError",
    "MmioDriverError",
    "QueueRecord",
    "QueueSetupError",
    "RingPlan",
    "check_device_id",
    "check_required_features",
    "requested_features",
    "wait_until",
]

#: Default indirect-table entries per request when INDIRECT_DESC is negotiated.
DEFAULT_MAX_INDIRECT = 16
#: Longest one wait for an interrupt lasts in :func:`wait_until`, in seconds: what a
#: driver waits for is checked again at least this often, since a completion need
#: not come with an interrupt (suppressed notifications, a lost edge).
WAIT_STEP = 0.05


class MmioDriverError(Exception):
    """Something the driver cannot work with (over any driver transport: the
    name is historical, virtio-MMIO was the first)."""


class FeatureNegotiationError(MmioDriverError):
    """The device did not keep FEATURES_OK set: it refused the feature subset."""


class QueueSetupError(MmioDriverError):
    """A queue cannot be set up (nonexistent, already in use, bad size, wrong state)."""


def check_device_id(
    found: int | None,
    expected: int,
    error: type[Exception],
    what: str,
    *,
    unknown_ok: bool = False,
) -> None:
    """Raise ``error`` unless the device behind a transport is of type ``expected``.

    ``found`` is the transport's device ID; ``unknown_ok`` lets an unknown one
    (0 or None) pass, for drivers that run over vhost-user, where the protocol
    carries no device type.
    """
    if found != expected and not (unknown_ok and not found):
        raise error(f"device ID {found} is not {what}")


#: A driver's option for one feature: True requires it, False refuses it,
#: None takes it if the device offers it.
FeatureChoice = tuple[bool | None, FeatureBit]


def requested_features(
    supported: int, limit: int | None = None, choices: Iterable[FeatureChoice] = ()
) -> int:
    """The features a driver asks for: ``supported``, within ``limit`` (None: no
    limit), without every feature whose choice is False."""
    wanted = supported if limit is None else limit & supported
    for choice, feature in choices:
        if choice is False:
            wanted &= ~feature.mask
    return wanted


def check_required_features(
    negotiated: int, choices: Iterable[FeatureChoice], error: Callable[[str], Exception]
) -> None:
    """Raise ``error`` for a feature whose choice is True and that was not negotiated."""
    for choice, feature in choices:
        if choice and not negotiated & feature.mask:
            raise error(f"the device does not offer {feature.name}")


def wait_until(transport: DriverTransport, done: Callable[[], bool], deadline: float) -> bool:
    """Wait for the device's interrupts until ``done()``; False once ``deadline`` has passed.

    ``done`` is asked first and after every interrupt (or :data:`WAIT_STEP`);
    it reaps what the device used, so it is where a driver makes progress.
    """
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        transport.wait_interrupt(min(remaining, WAIT_STEP))
    return True


class BufferAllocator(Protocol):
    """Guest memory for rings and buffers (e.g. :class:`~pyvirtio.driver.memory.GuestAllocator`)."""

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int: ...

    def free(self, addr: int) -> None: ...


class DriverTransport(Protocol):
    """Device initialization, queues, config space and interrupts (content.tex,
    "Device Initialization"), as every device driver uses them."""

    @property
    def mem(self) -> GuestMemory: ...

    @property
    def allocator(self) -> BufferAllocator: ...

    def initialize(self, wanted_features: int) -> int:
        """Reset .. FEATURES_OK; returns the negotiated features."""
        ...

    def setup_queue(
        self, index: int, size: int | None = None, packed_ring: bool | None = None
    ) -> DriverQueue: ...

    def driver_ok(self) -> None: ...

    def notify(self, index: int) -> None: ...

    def read_config(self, offset: int, size: int) -> int: ...

    def wait_interrupt(self, timeout: float | None = None) -> int:
        """Block until the device interrupts (or ``timeout``); 0 on timeout."""
        ...


class QueueRecord(Protocol):
    """What a transport keeps of a queue it set up: the driver side and its ring memory."""

    queue: DriverQueue
    allocations: list[int]


QueueRecordT = TypeVar("QueueRecordT", bound=QueueRecord)


class RingPlan(NamedTuple):
    """The shape of a queue about to be set up."""

    size: int
    packed: bool
    indirect: bool
    max_indirect: int


class DriverTransportBase(Generic[QueueRecordT]):
    """Negotiated features and set-up queues, as every driver transport keeps them.

    Subclasses set ``mem``, ``allocator``, ``_lock``, ``_features`` and
    ``_queues``, and implement :attr:`status`, :meth:`add_status`,
    :meth:`_queue_size_bounds` and :meth:`_program_queue` (how the transport
    tells the device about a new ring); :meth:`_queue_added` is theirs to
    override.
    """

    mem: GuestMemory
    allocator: GuestAllocator
    _lock: threading.RLock
    _features: int
    _queues: dict[int, QueueRecordT]

    @property
    def status(self) -> int:
        """The device status."""
        raise NotImplementedError

    def add_status(self, bits: int) -> int:
        """Set device status bits; returns the status afterwards."""
        raise NotImplementedError

    def _queue_size_bounds(self, index: int) -> tuple[int, int]:
        """(default size, largest size) of new queue ``index``; raises
        :class:`QueueSetupError` when the queue does not exist or is in use."""
        raise NotImplementedError

    def _program_queue(self, index: int, plan: RingPlan) -> QueueRecordT:
        """Allocate the rings of ``plan`` and hand them to the device; frees them on failure."""
        raise NotImplementedError

    def setup_queue(
        self,
        index: int,
        size: int | None = None,
        packed_ring: bool | None = None,
        *,
        max_indirect: int | None = None,
    ) -> DriverQueue:
        """Allocate, program and enable queue ``index``; returns its driver side.

        ``size`` defaults to the device's largest (a power of two for a split
        ring); the ring format follows the negotiated VIRTIO_F_RING_PACKED
        unless ``packed_ring`` says otherwise (and then it must agree with
        it); EVENT_IDX and indirect descriptors follow the negotiated
        features (``max_indirect`` entries per indirect table).
        """
        with self._lock:
            if not self.status & DeviceStatus.FEATURES_OK:
                raise QueueSetupError("queues are set up after feature negotiation")
            if index in self._queues:
                raise QueueSetupError(f"queue {index} is already set up")
            use_packed = self._ring_format(packed_ring)
            max_size, size_limit = self._queue_size_bounds(index)
            plan = self._plan_ring(use_packed, size, max_size, size_limit, max_indirect)
            record = self._program_queue(index, plan)
            self._queues[index] = record
            self._queue_added(index)
            return record.queue

    def _queue_added(self, index: int) -> None:
        """Called once queue ``index`` is recorded as set up."""

    @property
    def negotiated_features(self) -> int:
        return self._features

    def has_feature(self, feature: Feature | int) -> bool:
        return bool(self._features >> int(feature) & 1)

    def fail(self) -> None:
        """Set FAILED: the driver gave up on the device."""
        self.add_status(DeviceStatus.FAILED)

    def queue(self, index: int) -> DriverQueue:
        """The driver side of a queue set up earlier."""
        return self._queues[index].queue

    @property
    def queues(self) -> dict[int, DriverQueue]:
        return {index: record.queue for index, record in self._queues.items()}

    def _ring_format(self, packed_ring: bool | None) -> bool:
        """Whether the new queue is packed: the negotiated VIRTIO_F_RING_PACKED decides,
        and a caller's ``packed_ring`` must agree with it."""
        use_packed = self.has_feature(Feature.RING_PACKED)
        if packed_ring is not None and packed_ring != use_packed:
            raise QueueSetupError(
                f"{'packed' if packed_ring else 'split'} ring requested but RING_PACKED "
                f"was {'' if use_packed else 'not '}negotiated"
            )
        return use_packed

    def _plan_ring(
        self,
        use_packed: bool,
        size: int | None,
        max_size: int,
        size_limit: int,
        max_indirect: int | None,
    ) -> RingPlan:
        """Size, format and indirect tables of a new queue.

        ``size`` defaults to ``max_size``, rounded down to a power of two for
        a split ring (split sizes are powers of two, packed ones need not be);
        it must lie in 1..``size_limit``.  Indirect tables follow the
        negotiated INDIRECT_DESC, ``max_indirect`` entries each.
        """
        if size is None:
            size = max_size if use_packed else 1 << (max_size.bit_length() - 1)
        if not 0 < size <= size_limit:
            raise QueueSetupError(f"queue size {size} not in 1..{size_limit}")
        if not use_packed and size & (size - 1):
            raise QueueSetupError(f"split queue size {size} is not a power of two")
        indirect = self.has_feature(Feature.INDIRECT_DESC)
        if max_indirect is None:
            max_indirect = DEFAULT_MAX_INDIRECT if indirect else 0
        return RingPlan(size, use_packed, indirect, max_indirect)

    def _allocate_ring(self, plan: RingPlan) -> tuple[DriverQueue, list[int]]:
        """Ring areas from the allocator and the driver side over them."""
        return allocate_driver_queue(
            self.mem,
            self.allocator,
            plan.size,
            packed_ring=plan.packed,
            event_idx=self.has_feature(Feature.EVENT_IDX),
            indirect=plan.indirect,
            max_indirect=plan.max_indirect,
        )

    def _free_allocations(self, allocations: list[int]) -> None:
        for addr in allocations:
            self.allocator.free(addr)
