"""The split ring's layout, shared by its two sides (split-ring.tex, "Split Virtqueues").

Area sizes and alignments, flag values, and the geometry check; the device
side is in :mod:`.split_device`, the driver side in :mod:`.split_driver`, and
:mod:`.split` gathers the public names.
"""

from __future__ import annotations

from typing import Final

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.base import RingQueue
from pyvirtio.virtqueue.common import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
)
from pyvirtio.virtqueue.ring import (
    DESC_SIZE,
    Words,
    area_view,
    check_queue_size,
    full_barrier,
    words,
)

__all__ = [
    "AVAIL_ALIGN",
    "BULK_MIN",
    "DESC_ALIGN",
    "MAX_INDIRECT_DESCS",
    "READ_LAST",
    "READ_MORE",
    "USED_ALIGN",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_USED_F_NO_NOTIFY",
    "WRITE_LAST",
    "WRITE_MORE",
    "area_sizes",
    "check_layout",
    "enable_events",
    "map_rings",
]


#: Alignment of each area (split-ring.tex, "Split Virtqueues", alignment table).
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

#: Available ring flag: the driver asks for no used-buffer notifications.
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
#: Used ring flag: the device asks for no available-buffer notifications.
VIRTQ_USED_F_NO_NOTIFY: Final = 1

#: Most descriptors an indirect table may hold (as many as the largest queue).
MAX_INDIRECT_DESCS: Final = MAX_QUEUE_SIZE

#: The four values of a descriptor's NEXT and WRITE bits.  Hot loops compare
#: flags with these (CPython 3.11 specialises int compares, not ``&``) after
#: INDIRECT and the reserved bits are dealt with.
READ_LAST: Final = 0
READ_MORE: Final = DESC_F_NEXT
WRITE_LAST: Final = DESC_F_WRITE
WRITE_MORE: Final = DESC_F_WRITE | DESC_F_NEXT

#: At least this many available-ring entries pending are read with one slice
#: per lap of the ring; below it, the slice's fixed cost outweighs a load per
#: entry.
BULK_MIN: Final = 8


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring for ``size``.

    The ring sizes include the ``used_event``/``avail_event`` trailer whether
    or not VIRTIO_F_EVENT_IDX is negotiated, as the spec's table does
    (split-ring.tex, "Split Virtqueues").
    """
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def check_layout(
    mem: GuestMemory, size: int, desc_addr: int, driver_addr: int, device_addr: int
) -> tuple[memoryview, memoryview, memoryview]:
    """Validate queue geometry; return byte views of the three areas."""
    check_queue_size(size, power_of_two=True)
    desc_bytes, avail_bytes, used_bytes = area_sizes(size)
    return (
        area_view(mem, "descriptor table", desc_addr, desc_bytes, DESC_ALIGN),
        area_view(mem, "available ring", driver_addr, avail_bytes, AVAIL_ALIGN),
        area_view(mem, "used ring", device_addr, used_bytes, USED_ALIGN),
    )


def map_rings(queue: RingQueue) -> tuple[memoryview, Words, Words, Words, Words, Words, Words]:
    """Check a split queue's geometry (:func:`check_layout`) and map its areas.

    Returns the descriptor table as bytes; the available ring as u16 words
    (flags 0, idx 1, ring 2.., used_event 2+size), its entries alone
    (indexed by ``idx & mask``) and ``used_event`` alone; the used ring as
    u16 words (flags 0, idx 1, avail_event 2+4*size), its elements as u32
    pairs (id, len) and ``avail_event`` alone.
    """
    size = queue.size
    desc, avail, used = check_layout(
        queue.mem, size, queue.desc_addr, queue.driver_addr, queue.device_addr
    )
    return (
        desc,
        words(avail, "H"),
        words(avail[4 : 4 + 2 * size], "H"),
        words(avail[4 + 2 * size : 6 + 2 * size], "H"),
        words(used, "H"),
        words(used[4 : 4 + 8 * size], "I"),
        words(used[4 + 8 * size : 6 + 8 * size], "H"),
    )


def enable_events(event: Words, flags: Words, event_idx: bool, index: int) -> None:
    """Ask the other side for notifications again, then a full barrier.

    With EVENT_IDX the ``event`` word (``avail_event`` or ``used_event``)
    names ``index``, the next one we will consume; without it our ring's
    ``flags`` are cleared (split-ring.tex, "Available Buffer Notification
    Suppression" and "Used Buffer Notification Suppression").  The barrier
    orders that store before the caller re-checks the other side's idx for
    what arrived meanwhile.
    """
    if event_idx:
        event[0] = index
    else:
        flags[0] = 0
    full_barrier()
