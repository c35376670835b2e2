"""Packed virtqueues: the device side and the driver side of one ring format.

A packed virtqueue (packed-ring.tex, negotiated with VIRTIO_F_RING_PACKED)
is one descriptor ring that both sides read and write, plus two 4-byte event
suppression structures:

* the *descriptor ring*: ``size`` descriptors of 16 bytes (``le64 addr``,
  ``le32 len``, ``le16 id``, ``le16 flags``), 16-byte aligned;
* the *driver event suppression* area (the transport's "driver area"),
  written by the driver to throttle used buffer notifications;
* the *device event suppression* area (the "device area"), written by the
  device to throttle available buffer notifications.

Availability is signalled in place by the VIRTQ_DESC_F_AVAIL and
VIRTQ_DESC_F_USED flag bits compared with each side's ring wrap counter
(packed-ring.tex, "Driver and Device Ring Wrap Counters"), so each side polls
exactly one descriptor: the next one after those it processed.

Memory ordering.  The other side may be another thread or another process
(vhost-user) sharing the ring.  Both sides here publish a descriptor by
storing its ``flags`` after everything else it covers, and read ``flags``
before the rest of a descriptor.  Every ring access is a separate aligned
load or store through a ``memoryview`` in program order, which x86-64's
memory model (TSO) keeps in order for store/store and load/load.  Where the
spec asks for a full barrier (a store followed by a load of the other side's
event structure) :func:`~pyvirtio.virtqueue.ring.full_barrier` issues a locked instruction via a
lock acquire/release, the strongest fence pure CPython can reach.  Weaker
memory models (e.g. AArch64) may reorder plain accesses between processes;
pure Python has no portable barrier for that.  Within one process the two
sides are ordered by the interpreter.

Speed.  The hot paths index ``memoryview.cast`` arrays of the ring made once
at construction, use ``*``/``+`` for index arithmetic (CPython 3.11
specialises those, not ``<<``/``|``) and keep per-buffer state in
preallocated lists, so a single-buffer round trip allocates little besides
the :class:`DescriptorChain`.

Neither side is thread-safe on its own: one thread drives one side.
"""

from __future__ import annotations

from pyvirtio.virtqueue.packed_device import PackedDeviceQueue
from pyvirtio.virtqueue.packed_driver import PackedDriverQueue
from pyvirtio.virtqueue.packed_layout import (
    DESC_ALIGN,
    DESC_F_AVAIL,
    DESC_F_USED,
    EVENT_ALIGN,
    EVENT_SIZE,
    MAX_INDIRECT_ENTRIES,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    area_sizes,
)
from pyvirtio.virtqueue.ring import DESC_SIZE, indirect_area_size

__all__ = [
    "DESC_ALIGN",
    "DESC_F_AVAIL",
    "DESC_F_USED",
    "DESC_SIZE",
    "EVENT_ALIGN",
    "EVENT_SIZE",
    "MAX_INDIRECT_ENTRIES",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "area_sizes",
    "indirect_area_size",
]
