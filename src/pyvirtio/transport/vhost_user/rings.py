"""What a vhost-user front end configures for one ring, and the device queue built from it.

Pure bookkeeping for :mod:`.session`: a :class:`Vring` collects SET_VRING_NUM,
SET_VRING_ADDR, SET_VRING_BASE and the started/enabled state
(vhost-user.rst "Ring states"), within the limits :func:`check_queue_count`,
:func:`max_ring_size` and :func:`check_base` set; :func:`build_queue` turns a ready one into a
:class:`~pyvirtio.virtqueue.common.DeviceQueue` positioned at its base, and
:func:`ring_position` reads a stopped queue's position back as the
GET_VRING_BASE value.  :func:`build_queue` is the one place a ring's queue is
made: per-ring work on every pop and completion (e.g. inflight tracking)
hooks in there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.constants import Feature
from pyvirtio.device import VirtioDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user.protocol import VRING_FD_INDEX_MASK, VringAddr
from pyvirtio.virtqueue.common import MAX_QUEUE_SIZE, DeviceQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

__all__ = [
    "QEMU_MAX_RING_SIZE",
    "RingError",
    "Vring",
    "build_queue",
    "check_base",
    "check_queue_count",
    "max_ring_size",
    "ring_position",
]

#: Packed ring positions: a 15-bit index and the wrap counter in bit 15, as
#: QEMU encodes them (avail half in bits 0-15, used half in bits 16-31).
PACKED_WRAP = 0x8000
PACKED_INDEX = 0x7FFF
#: A split ring's base is its 16-bit next-avail index.
SPLIT_BASE_LIMIT = 0xFFFF
#: QEMU's VIRTQUEUE_MAX_SIZE: the largest ring QEMU's device models configure.
QEMU_MAX_RING_SIZE = 1024


class RingError(Exception):
    """A ring configuration the back end cannot use (the request is refused)."""


@dataclass
class Vring:
    """What the front end configured for one ring (vhost-user.rst "Ring states")."""

    index: int
    num: int | None = None
    addr: VringAddr | None = None
    #: SET_VRING_BASE value (or the position saved when the ring stopped).
    base: int = 0
    started: bool = False
    enabled: bool = False
    #: The device queue while the device runs on this ring.
    queue: DeviceQueue | None = None

    def ready(self) -> bool:
        return self.num is not None and self.addr is not None and self.started and self.enabled

    def reset(self) -> None:
        """Back to unconfigured (RESET_OWNER, RESET_DEVICE)."""
        self.num = None
        self.addr = None
        self.base = 0
        self.started = False
        self.enabled = False
        self.queue = None


def check_queue_count(device: VirtioDevice) -> None:
    """vhost-user addresses rings by an 8-bit index (VRING_FD_INDEX_MASK)."""
    if device.num_queues > VRING_FD_INDEX_MASK + 1:
        raise ValueError(f"{device.name}: {device.num_queues} queues, vhost-user allows 256")


def max_ring_size(device: VirtioDevice, index: int) -> int:
    """The largest SET_VRING_NUM accepted for ring ``index`` of ``device``.

    vhost-user has no message to tell the front end a maximum: QEMU sizes
    rings from its own device model (virtio-net's tx/rx_queue_size, up to
    VIRTQUEUE_MAX_SIZE).  So the limit is the device's own maximum or
    QEMU's, whichever is larger; beyond it a size is refused.
    """
    return min(max(device.queue_max_sizes[index], QEMU_MAX_RING_SIZE), MAX_QUEUE_SIZE)


def check_base(index: int, base: int, num: int | None, *, packed: bool) -> None:
    """Refuse a SET_VRING_BASE value that is no position in the ring.

    Split: a 16-bit index.  Packed: avail and used halves, each a 15-bit
    index below the ring size plus a wrap counter (bit 15).
    """
    if not packed:
        if base > SPLIT_BASE_LIMIT:
            raise RingError(f"ring {index}: split ring base {base:#x} is not a 16-bit index")
        return
    for half in (base & 0xFFFF, base >> 16):
        if num is not None and half & PACKED_INDEX >= num:
            raise RingError(
                f"ring {index}: packed ring base {base:#x} has an index outside a ring of {num}"
            )


def build_queue(
    mem: GuestMemory,
    vring: Vring,
    features: int,
    to_guest: Callable[[int, str], int],
) -> DeviceQueue:
    """A device queue for a ready ring, positioned at its base.

    ``to_guest`` translates the front end's user addresses to guest-physical
    (vhost-user.rst "Memory access"), raising for one in no region.
    """
    assert vring.num is not None and vring.addr is not None
    addr = vring.addr
    desc = to_guest(addr.desc_user_addr, f"ring {vring.index} descriptor")
    driver = to_guest(addr.avail_user_addr, f"ring {vring.index} driver")
    device = to_guest(addr.used_user_addr, f"ring {vring.index} device")
    event_idx = bool(features & Feature.EVENT_IDX.mask)
    indirect = bool(features & Feature.INDIRECT_DESC.mask)
    base = vring.base
    if features & Feature.RING_PACKED.mask:
        check_base(vring.index, base, vring.num, packed=True)
        packed = PackedDeviceQueue(
            mem, vring.num, desc, driver, device, event_idx=event_idx, indirect=indirect
        )
        avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
        if used == 0:
            used = avail  # a front end that sends only the avail half: nothing in flight
        packed.set_next_avail(avail & PACKED_INDEX, bool(avail & PACKED_WRAP))
        packed.set_next_used(used & PACKED_INDEX, bool(used & PACKED_WRAP))
        return packed
    split = SplitDeviceQueue(
        mem, vring.num, desc, driver, device, event_idx=event_idx, indirect=indirect
    )
    # The used index lives in guest memory: resume from it (a reconnect or a
    # restart after GET_VRING_BASE), and from the base for the avail side.
    split.next_avail = base & 0xFFFF
    split.next_used = mem.read_u16(device + 2)
    return split


def ring_position(queue: DeviceQueue) -> int:
    """The GET_VRING_BASE value of a stopped queue."""
    if isinstance(queue, PackedDeviceQueue):
        avail = queue.next_avail | (PACKED_WRAP if queue.avail_wrap_counter else 0)
        used = queue.next_used | (PACKED_WRAP if queue.used_wrap_counter else 0)
        return avail | used << 16
    assert isinstance(queue, SplitDeviceQueue)
    return queue.next_avail
