"""The packed ring's layout, shared by its two sides (packed-ring.tex).

Area sizes and alignments, flag bits and values, wrap-counter arithmetic,
the event suppression structure and the geometry check; the device side is
in :mod:`.packed_device`, the driver side in :mod:`.packed_driver`, and
:mod:`.packed` gathers the public names.
"""

from __future__ import annotations

from typing import Final

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.base import RingQueue
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    QueueState,
    VirtqueueError,
)
from pyvirtio.virtqueue.ring import (
    DESC_SIZE,
    StateReader,
    Words,
    area_view,
    check_queue_size,
    full_barrier,
    words,
)

__all__ = [
    "AVAIL_USED",
    "DESC_ALIGN",
    "DESC_F_AVAIL",
    "DESC_F_USED",
    "EVENT_ALIGN",
    "EVENT_SIZE",
    "KIND_MASK",
    "MAX_INDIRECT_ENTRIES",
    "OFF_MASK",
    "READ_LAST",
    "READ_MORE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "WRAP_BIT",
    "WRAP_SHIFT",
    "WRITE_LAST",
    "WRITE_MORE",
    "area_sizes",
    "check_geometry",
    "disable_events",
    "enable_events",
    "event_wanted",
    "map_ring",
    "need_event",
    "packed_state",
    "ring_position",
    "ring_positions",
]


#: Alignment of the descriptor ring (packed-ring.tex, "Structure Size and Alignment").
DESC_ALIGN: Final = 16
#: Alignment of each event suppression structure (same table).
EVENT_ALIGN: Final = 4
#: Bytes per ``struct pvirtq_event_suppress``.
EVENT_SIZE: Final = 4

#: Availability flag bits (packed-ring.tex, "Driver and Device Ring Wrap Counters").
DESC_F_AVAIL: Final = 1 << 7
DESC_F_USED: Final = 1 << 15
AVAIL_USED: Final = DESC_F_AVAIL | DESC_F_USED

#: ``desc_event_flags`` values (packed-ring.tex, "Driver and Device Event Suppression").
RING_EVENT_FLAGS_ENABLE: Final = 0x0
RING_EVENT_FLAGS_DISABLE: Final = 0x1
RING_EVENT_FLAGS_DESC: Final = 0x2

#: Most entries the device accepts in one indirect table.  The spec leaves the
#: limit to the device ("The device MAY limit the number of buffers it will
#: allow in a list"); this is the largest queue size, as for a direct chain.
MAX_INDIRECT_ENTRIES: Final = MAX_QUEUE_SIZE

_U32_MAX: Final = 0xFFFF_FFFF
#: The wrap counter's bit in an event suppression ``off_wrap`` (and in the
#: ring positions vhost-user exchanges).
WRAP_SHIFT: Final = 15
WRAP_BIT: Final = 1 << WRAP_SHIFT
OFF_MASK: Final = WRAP_BIT - 1

#: A descriptor's NEXT, WRITE and INDIRECT bits, and the values of the first
#: two that hot loops compare with (CPython 3.11 specialises int compares,
#: not ``&``); anything above ``WRITE_MORE`` has INDIRECT set.
KIND_MASK: Final = DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT
READ_LAST: Final = 0
READ_MORE: Final = DESC_F_NEXT
WRITE_LAST: Final = DESC_F_WRITE
WRITE_MORE: Final = DESC_F_WRITE | DESC_F_NEXT


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver event area, device event area) for ``size``.

    packed-ring.tex, "Structure Size and Alignment".
    """
    return DESC_SIZE * size, EVENT_SIZE, EVENT_SIZE


def packed_state(state: QueueState) -> StateReader:
    """The fields of a packed queue's state dict; VirtqueueError if it is another format's.

    Packed states say ``"format": "packed"`` (older ones said nothing).
    """
    fields = StateReader(state)
    if state.get("format", "packed") != "packed":
        raise VirtqueueError(f"invalid packed queue state: format {state['format']!r}")
    return fields


def ring_position(position: object, size: int, what: str) -> int:
    """``position`` as a slot of a ring of ``size``; ValueError otherwise."""
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < size:
        raise ValueError(f"{what} {position!r} is not a position in a ring of {size}")
    return position


def ring_positions(next_avail: int, avail_wrap: int, next_used: int, used_wrap: int) -> QueueState:
    """The ring positions and wrap counters of either side, as its state dict has them."""
    return {
        "next_avail": next_avail,
        "avail_wrap_counter": bool(avail_wrap),
        "next_used": next_used,
        "used_wrap_counter": bool(used_wrap),
    }


def check_geometry(
    mem: GuestMemory, size: int, desc_addr: int, driver_addr: int, device_addr: int
) -> tuple[memoryview, memoryview, memoryview]:
    """Validate size and alignment, return views of the three areas.

    packed-ring.tex: at most 2**15 entries, any value (not only powers of
    two); "Structure Size and Alignment" for the alignments.
    """
    check_queue_size(size, power_of_two=False)
    return (
        area_view(mem, "descriptor ring", desc_addr, DESC_SIZE * size, DESC_ALIGN),
        area_view(mem, "driver event area", driver_addr, EVENT_SIZE, EVENT_ALIGN),
        area_view(mem, "device event area", device_addr, EVENT_SIZE, EVENT_ALIGN),
    )


def map_ring(queue: RingQueue) -> tuple[memoryview, Words, Words, Words, Words, Words]:
    """Check a packed queue's geometry and map its areas (:func:`check_geometry`).

    Returns the descriptor ring as bytes (for whole-descriptor packs and
    unpacks) and as u16, u32 and u64 words, then the driver and device event
    suppression areas as u16 words (``[0]`` off_wrap, ``[1]`` flags).
    """
    ring, drv, dev = check_geometry(
        queue.mem, queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr
    )
    return (
        ring,
        words(ring, "H"),
        words(ring, "I"),
        words(ring, "Q"),
        words(drv, "H"),
        words(dev, "H"),
    )


def event_wanted(
    area: Words | tuple[int, int], event_idx: bool, new: int, wrap: int, count: int, size: int
) -> bool:
    """Whether the other side asked to be notified, given ``count`` new ring slots.

    Reads the other side's event suppression ``area`` after a full barrier,
    so that our new descriptors are visible before its fields are read
    (packed-ring.tex, "Sending Available Buffer Notifications"); flags first,
    then off_wrap, which is then at least as new as the DESC it goes with.

    packed-ring.tex, "Event Suppression Structure Format": DISABLE never,
    ENABLE always, DESC (only with VIRTIO_F_EVENT_IDX) when the descriptor at
    ``off_wrap`` is among the ``count`` slots just made available/used,
    which end at position ``new`` with wrap counter ``wrap``.  This is
    Linux's packed-ring test: an offset whose wrap bit differs from ours lies
    in the previous lap, so it moves there (``off - size``) before the split
    ring's ``vring_need_event`` comparison.  DESC without EVENT_IDX and the
    reserved value 3 count as ENABLE: an extra notification is always safe.
    """
    full_barrier()
    flags = area[1]
    off_wrap = area[0]
    mode = flags & 0x3
    if mode == RING_EVENT_FLAGS_DISABLE:
        return False
    if mode != RING_EVENT_FLAGS_DESC or not event_idx:
        return True
    if count > size:
        return True  # more than a lap went by: the wrap bit is ambiguous, notify
    off = off_wrap & OFF_MASK
    if (off_wrap >> WRAP_SHIFT) != wrap:
        off -= size
    return ((new - off - 1) & 0xFFFF) < count


def need_event(
    flags: int, off_wrap: int, event_idx: bool, new: int, wrap: int, count: int, size: int
) -> bool:
    """:func:`event_wanted` for an event suppression structure's field values."""
    return event_wanted((off_wrap, flags), event_idx, new, wrap, count, size)


def enable_events(area: Words, event_idx: bool, position: int, wrap: int) -> int:
    """Ask the other side for notifications through an event suppression ``area``.

    With EVENT_IDX, DESC at ``position`` and ``wrap`` (the offset stored
    before the flags that make it count); otherwise ENABLE
    (packed-ring.tex, "Event Suppression Structure Format"), then a full
    barrier.  Returns the flags written.
    """
    if event_idx:
        area[0] = position + wrap * WRAP_BIT
        area[1] = flags = RING_EVENT_FLAGS_DESC
    else:
        area[1] = flags = RING_EVENT_FLAGS_ENABLE
    # Enabled before the caller re-checks the ring for what arrived meanwhile
    # (packed-ring.tex, "Receiving Used Buffers From The Device").
    full_barrier()
    return flags


def disable_events(area: Words) -> int:
    """Tell the other side notifications are not needed (a hint); returns the flags written."""
    area[1] = RING_EVENT_FLAGS_DISABLE
    return RING_EVENT_FLAGS_DISABLE
