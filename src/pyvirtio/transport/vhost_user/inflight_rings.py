"""Attaching an inflight region to a running ring (vhost-user.rst "Inflight I/O tracking").

:mod:`.inflight` knows the region's bytes: its layouts, recovery and the
trackers that keep it current.  This module joins one queue's region to one
device queue, split or packed: it recovers what the previous back end left,
puts the ring's positions where that recovery says, queues the chains left in
flight for resubmission ahead of any new request, and installs the tracker in
the queue's one pop/complete hook.  Like the session that calls it, it does no
I/O of its own: it reads guest memory and writes the region, both mapped.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user.inflight import (
    PackedInflight,
    SplitInflight,
    recover_packed,
    recover_split,
)
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

__all__ = ["Attached", "attach"]


class Attached(NamedTuple):
    """What attaching found: chains queued again, and whether a batch was repaired."""

    resubmitted: int
    #: Split: the last batch of used elements was rewritten; packed: a
    #: completion caught in progress was committed.
    repaired: bool


def attach(
    region: memoryview, queue: SplitDeviceQueue | PackedDeviceQueue, memory: GuestMemory
) -> Attached:
    """Recover ``queue`` from ``region`` and track it from now on.

    Raises InflightError (a region that does not check out) or
    GuestMemoryError (a ring outside guest memory) before changing the queue.
    """
    if isinstance(queue, PackedDeviceQueue):
        return _attach_packed(region, queue)
    return _attach_split(region, queue, memory)


def _attach_split(region: memoryview, queue: SplitDeviceQueue, memory: GuestMemory) -> Attached:
    avail_idx = memory.read_u16(queue.driver_addr + 2)
    recovery = recover_split(region, queue.size, queue.next_used, avail_idx)
    # Every chain the previous owner took is completed (below the used
    # index) or in flight: resume at the used index with those first.
    queue.next_avail = (recovery.next_avail - len(recovery.resubmit)) & 0xFFFF
    queue.resubmit(recovery.resubmit)
    queue.inflight = SplitInflight(region, queue.size, recovery.next_counter)
    return Attached(len(recovery.resubmit), recovery.repaired_batch)


def _attach_packed(region: memoryview, queue: PackedDeviceQueue) -> Attached:
    # The region says where the ring is: after a crash QEMU 7.2 sends back
    # the packed base of the ring's last start, not where it got to.
    recovery = recover_packed(
        region, queue.size, queue.slot_flags, queue.next_used, queue.used_wrap_counter
    )
    tracker = PackedInflight(region, queue.size, recovery)
    queue.set_next_used(recovery.used_idx, recovery.used_wrap)
    queue.set_next_avail(recovery.used_idx, recovery.used_wrap)
    queue.resubmit([descriptors for _, descriptors in recovery.resubmit])
    queue.inflight = tracker
    return Attached(len(recovery.resubmit), recovery.committed_batch)
