"""A device model activated directly on ring pairs in one guest memory, no transport.

For unit tests of device models: each queue's driver side and device side
share rings placed at fixed addresses, the device is activated with the
device sides and a recording interrupt, and the test plays the driver.

Also the checks both ring layouts' tests use: :func:`assert_chain` (a popped
DescriptorChain), :func:`pop_error` and :func:`driver_error` (a queue that breaks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from pyvirtio.constants import Feature
from pyvirtio.device import VirtioDevice
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed, split
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, DriverQueue, VirtqueueError
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue

#: Rings of queue i live at RING_BASE + i * RING_STRIDE.
RING_BASE = 0x1_0000
RING_STRIDE = 0x1_0000
DATA_BASE = 0x40_0000
MEMORY_SIZE = 16 << 20
MAX_INDIRECT = 8

#: Every field of a DescriptorChain.
CHAIN_FIELDS = ("mem", "head", "readable", "writable", "readable_len", "writable_len", "ring_slots")


def assert_chain(chain: object, expected: DescriptorChain) -> None:
    """``chain`` is a plain DescriptorChain equal to ``expected`` in every field."""
    assert type(chain) is DescriptorChain
    for field in CHAIN_FIELDS:
        assert getattr(chain, field) == getattr(expected, field), (expected.head, field)


def pop_error(queue: SplitDeviceQueue | PackedDeviceQueue, match: str) -> None:
    """pop raises VirtqueueError matching ``match``, then the queue stays broken."""
    with pytest.raises(VirtqueueError, match=match):
        queue.pop()
    assert queue.broken
    assert queue.has_available()
    with pytest.raises(VirtqueueError, match="broken"):
        queue.pop()


def driver_error(queue: SplitDriverQueue | PackedDriverQueue, match: str) -> None:
    """used raises VirtqueueError matching ``match``, then the queue stays broken."""
    with pytest.raises(VirtqueueError, match=match):
        list(queue.used())
    assert queue.broken
    with pytest.raises(VirtqueueError, match="broken"):
        list(queue.used())


class RecordingInterrupt:
    """A DeviceInterrupt that records what the device signalled."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config_changes = 0

    def signal_used_queue(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config_changes += 1


def make_pair(
    mem: GuestMemory,
    base: int,
    size: int,
    *,
    packed_ring: bool,
    event_idx: bool,
    indirect: bool,
    indirect_addr: int | None,
) -> tuple[DriverQueue, DeviceQueue]:
    """A driver queue and a device queue over the same rings at ``base``."""
    module = packed if packed_ring else split
    desc_len, driver_len, _ = module.area_sizes(size)
    desc = base
    driver = (desc + desc_len + 63) & ~63
    device = (driver + driver_len + 63) & ~63
    drv_cls, dev_cls = (
        (packed.PackedDriverQueue, packed.PackedDeviceQueue)
        if packed_ring
        else (split.SplitDriverQueue, split.SplitDeviceQueue)
    )
    drv: DriverQueue = drv_cls(
        mem,
        size,
        desc,
        driver,
        device,
        event_idx=event_idx,
        indirect=indirect,
        indirect_addr=indirect_addr,
        max_indirect=MAX_INDIRECT if indirect else 0,
    )
    dev: DeviceQueue = dev_cls(
        mem, size, desc, driver, device, event_idx=event_idx, indirect=indirect
    )
    return drv, dev


#: DirectRig options for a test run once per ring layout and feature mix (``mode``).
RING_MODES = [
    pytest.param({}, id="split"),
    pytest.param({"packed_ring": True}, id="packed"),
    pytest.param({"event_idx": True, "indirect": True}, id="split-event-idx-indirect"),
    pytest.param({"packed_ring": True, "event_idx": True, "indirect": True}, id="packed-all"),
]


class DirectRig:
    """``device`` negotiated and activated on ring pairs; the test is the driver.

    ``features`` defaults to the device's offer minus the ring features;
    ``packed_ring``/``event_idx``/``indirect`` add those.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        packed_ring: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        size: int = 16,
        features: int | None = None,
    ) -> None:
        ring_bits = Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        if features is None:
            features = device.offered_features & ~ring_bits
        for flag, feature in (
            (packed_ring, Feature.RING_PACKED),
            (event_idx, Feature.EVENT_IDX),
            (indirect, Feature.INDIRECT_DESC),
        ):
            if flag:
                features |= feature.mask
        self.device = device
        self.mem = GuestMemory.anonymous(MEMORY_SIZE)
        self.alloc = GuestAllocator(self.mem, DATA_BASE, MEMORY_SIZE - DATA_BASE)
        self.interrupt = RecordingInterrupt()
        device.ack_features(features)
        self.driver_queues: list[DriverQueue] = []
        device_queues: list[DeviceQueue] = []
        module = packed if packed_ring else split
        for index in range(device.num_queues):
            indirect_addr = (
                self.alloc.alloc(module.indirect_area_size(size, MAX_INDIRECT), 16)
                if indirect
                else None
            )
            drv, dev = make_pair(
                self.mem,
                RING_BASE + index * RING_STRIDE,
                size,
                packed_ring=packed_ring,
                event_idx=event_idx,
                indirect=indirect,
                indirect_addr=indirect_addr,
            )
            self.driver_queues.append(drv)
            device_queues.append(dev)
        self.device_queues = device_queues

    def activate(self) -> None:
        self.device.activate(self.mem, self.interrupt, self.device_queues)

    def post(
        self,
        index: int,
        readable: Iterable[bytes] = (),
        writable: Sequence[int] = (),
        token: object = None,
        *,
        notify: bool = True,
    ) -> list[tuple[int, int]]:
        """Add a request to queue ``index``; returns its writable ranges.

        ``readable`` are the payloads of device-readable buffers, ``writable``
        the lengths of device-writable ones.  Notifies the device when the
        queue asks for it (and ``notify``).
        """
        rd = []
        for data in readable:
            addr = self.alloc.alloc(max(1, len(data)))
            self.mem.write(addr, data)
            rd.append((addr, len(data)))
        wr = [(self.alloc.alloc(max(1, length)), length) for length in writable]
        queue = self.driver_queues[index]
        queue.add(rd, wr, token)
        if queue.kick_needed() and notify:
            self.device.queue_notify(index)
        return wr

    def used(self, index: int) -> list[tuple[object, int]]:
        return list(self.driver_queues[index].used())

    def read(self, ranges: Sequence[tuple[int, int]], written: int) -> bytes:
        """The first ``written`` bytes of a request's writable ranges."""
        return self.mem.readv(ranges)[:written]
