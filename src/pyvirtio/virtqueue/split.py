"""The split virtqueue: both sides of the ring format of VIRTIO 1.0 and earlier.

A split queue is three guest areas (split-ring.tex, "Split Virtqueues"):

* the descriptor table (Descriptor Area), written by the driver only;
* the available ring (Driver Area): ``flags, idx, ring[size], used_event``,
  written by the driver only;
* the used ring (Device Area): ``flags, idx, ring[size] of (id, len),
  avail_event``, written by the device only.

:class:`SplitDeviceQueue` is the device side: it pops descriptor chains the
driver made available and returns them through the used ring.  Everything it
reads from guest memory is untrusted, so every malformation is reported as a
:class:`~pyvirtio.virtqueue.common.VirtqueueError` and leaves the queue
``broken``.  :class:`SplitDriverQueue` is the driver side: it fills
descriptors and the available ring and collects used buffers, and it checks
what the device wrote just as carefully.

Speed matters here (every request of every device crosses a queue), so the
ring areas are mapped once at construction as ``memoryview`` casts indexed by
16- and 32-bit slot, descriptors are packed and unpacked with one
precompiled :class:`struct.Struct` call each, and buffer bounds are checked
against a cached guest region before falling back to the general
:meth:`GuestMemory.is_valid`.

Memory ordering: the other side may run in another process on shared memory
(vhost-user).  CPython performs our stores and loads in program order, and
x86 keeps stores ordered with stores and loads with loads, so it is enough to
write ring entries before the index that publishes them and to read an index
before the entries it covers.  The one reordering x86 allows, a later load
passing an earlier store, matters where the spec asks for a full barrier
(publishing an index, then reading the other side's suppression fields);
there :func:`~pyvirtio.virtqueue.ring.full_barrier` is used.
"""

from __future__ import annotations

from pyvirtio.virtqueue.ring import indirect_area_size
from pyvirtio.virtqueue.split_device import SplitDeviceQueue
from pyvirtio.virtqueue.split_driver import SplitDriverQueue
from pyvirtio.virtqueue.split_layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    area_sizes,
)

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "USED_ALIGN",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_USED_F_NO_NOTIFY",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "area_sizes",
    "indirect_area_size",
]
