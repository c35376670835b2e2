"""Inflight I/O tracking: the shared region a back end resubmits from after a restart.

vhost-user.rst "Inflight I/O tracking".  A back end that completes requests
out of order cannot be restarted from the rings alone: when it dies, QEMU
rewinds the next available index to the used index, so requests taken after
the oldest unfinished one are served twice and some below it never.  With
``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`` the back end allocates a region
(GET_INFLIGHT_FD), the front end keeps it across back-end restarts and hands
it back (SET_INFLIGHT_FD), and the back end records in it every descriptor it
has taken and not yet completed.

Layout: one region per queue, back to back (``mmap_size // num_queues`` bytes
each, the convention libvhost-user and DPDK share, so a region from either
reads here)::

    split   QueueRegionSplit  {u64 features, u16 version, u16 desc_num,
                               u16 last_batch_head, u16 used_idx}       16 bytes
            DescStateSplit    {u8 inflight, u8 padding[5], u16 next,
                               u64 counter}                  16 bytes, per descriptor
    packed  QueueRegionPacked {u64 features, u16 version, u16 desc_num,
                               u16 free_head, u16 old_free_head, u16 used_idx,
                               u16 old_used_idx, u8 used_wrap_counter,
                               u8 old_used_wrap_counter, u8 padding[7]}
                               32 bytes (the C layout aligns desc[] to 8)
            DescStatePacked   {u8 inflight, u8 padding, u16 next, u16 last,
                               u16 num, u64 counter, u16 id, u16 flags,
                               u32 len, u64 addr}            32 bytes, per entry

This module is pure: it lays out, validates and updates a buffer it is given
(the host maps the memfd).  The region is shared with the front end, which
may be hostile: :func:`recover_split` / :func:`recover_packed` read it once
into a snapshot, validate everything they use and raise
:class:`InflightError` on anything inconsistent; the trackers afterwards keep
their own copy of every link they follow and only *write* the region, so a
front end that scribbles on it concurrently can corrupt nothing but its own
recovery data.

Writes follow the spec's order so that a crash between any two stores is
repairable: on pop the counter is written before the ``inflight`` byte; on
completion the batch list is linked before the ring's used index is
published, and the ``inflight`` bytes are cleared and ``used_idx`` recorded
only after it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from pyvirtio.virtqueue.common import DESC_F_INDIRECT, DESC_F_NEXT
from pyvirtio.virtqueue.packed_layout import AVAIL_USED, DESC_F_AVAIL, DESC_F_USED

__all__ = [
    "INFLIGHT_ALIGNMENT",
    "INFLIGHT_VERSION",
    "PACKED_DESC_SIZE",
    "PACKED_HEADER_SIZE",
    "SPLIT_DESC_SIZE",
    "SPLIT_HEADER_SIZE",
    "InflightError",
    "InflightGeometry",
    "PackedDescriptor",
    "PackedInflight",
    "PackedRecovery",
    "SplitInflight",
    "SplitRecovery",
    "allocation_geometry",
    "check_geometry",
    "in_use",
    "packed_queue_region_size",
    "queue_region",
    "recover_packed",
    "recover_split",
    "split_queue_region_size",
]

#: vhost-user.rst: "The version of this region. It's 1 currently.  Zero value
#: indicates an uninitialized buffer".
INFLIGHT_VERSION = 1
#: Per-queue regions are rounded up to a cache line, as libvhost-user and DPDK do.
INFLIGHT_ALIGNMENT = 64
#: Largest region a back end accepts from a front end: 32 queues of 32768
#: packed descriptors fit with room to spare; anything larger is refused
#: before it is mapped.
MAX_MMAP_SIZE = 1 << 30

_SPLIT_HEADER = struct.Struct("<QHHHH")
_SPLIT_DESC = struct.Struct("<B5xHQ")
_PACKED_HEADER = struct.Struct("<QHHHHHHBB7x")
_PACKED_DESC = struct.Struct("<BxHHHQHHIQ")
SPLIT_HEADER_SIZE = _SPLIT_HEADER.size
SPLIT_DESC_SIZE = _SPLIT_DESC.size
#: sizeof(QueueRegionPacked): 29 bytes of fields, desc[] aligned to its u64 members.
PACKED_HEADER_SIZE = 32
PACKED_DESC_SIZE = _PACKED_DESC.size
assert _PACKED_HEADER.size == 29 and SPLIT_DESC_SIZE == 16 and PACKED_DESC_SIZE == 32

# Field offsets, named so that the hot paths store single fields in spec order.
_SPLIT_OFF_LAST_BATCH_HEAD = 12
_SPLIT_OFF_USED_IDX = 14
_SPLIT_DESC_OFF_NEXT = 6
_SPLIT_DESC_OFF_COUNTER = 8
# The same fields as indexes into u16 / u64 views of a split region:
# descriptor i's field is at FIRST + STRIDE * i.
_SPLIT_NEXT_U16 = (SPLIT_HEADER_SIZE + _SPLIT_DESC_OFF_NEXT) // 2
_SPLIT_STRIDE_U16 = SPLIT_DESC_SIZE // 2
_SPLIT_COUNTER_U64 = (SPLIT_HEADER_SIZE + _SPLIT_DESC_OFF_COUNTER) // 8
_SPLIT_STRIDE_U64 = SPLIT_DESC_SIZE // 8
_PACKED_OFF_FREE_HEAD = 12
_PACKED_OFF_USED_IDX = 16
_PACKED_OFF_USED_WRAP = 20
_PACKED_DESC_OFF_NEXT = 2

_U16 = struct.Struct("<H")
# Old copies (old_free_head .. old_used_wrap_counter are not contiguous, so
# they are stored field by field; see PackedInflight.complete).
_PACKED_OFF_OLD_FREE_HEAD = 14
_PACKED_OFF_OLD_USED_IDX = 18
_PACKED_OFF_OLD_USED_WRAP = 21


class InflightError(ValueError):
    """An inflight region or description that cannot be trusted; nothing was resubmitted."""


def _align(value: int) -> int:
    return (value + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def split_queue_region_size(queue_size: int) -> int:
    """Bytes one split queue's region needs (header and ``queue_size`` DescStateSplit)."""
    return _align(SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * queue_size)


def packed_queue_region_size(queue_size: int) -> int:
    """Bytes one packed queue's region needs (header and ``queue_size`` DescStatePacked)."""
    return _align(PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size)


class InflightGeometry(NamedTuple):
    """Where each queue's region lies in the shared buffer."""

    num_queues: int
    queue_size: int
    #: Bytes from one queue's region to the next (``mmap_size // num_queues``).
    queue_region_size: int

    @property
    def mmap_size(self) -> int:
        return self.num_queues * self.queue_region_size


def allocation_geometry(num_queues: int, queue_size: int) -> InflightGeometry:
    """The region GET_INFLIGHT_FD allocates for ``num_queues`` queues of ``queue_size``.

    GET_INFLIGHT_FD may arrive before SET_FEATURES says which ring format the
    driver picked (QEMU's vhost-user-blk sends it first), so each queue gets
    room for the larger, packed, layout; a split queue uses the front of it.
    """
    _check_counts(num_queues, queue_size)
    return InflightGeometry(num_queues, queue_size, packed_queue_region_size(queue_size))


def _check_counts(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= 0xFFFF:
        raise InflightError(f"inflight region for {num_queues} queues")
    if not 1 <= queue_size <= 32768:
        raise InflightError(f"inflight region for queues of {queue_size} descriptors")


def check_geometry(
    mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, fd_size: int
) -> InflightGeometry:
    """Validate a SET_INFLIGHT_FD description against the size of the fd it came with.

    Refuses a region too large to map, one that ends past the end of the fd,
    and per-queue regions too small for ``queue_size`` split descriptors (the
    smaller layout; the packed size is checked when a packed ring attaches).
    """
    _check_counts(num_queues, queue_size)
    if mmap_size == 0 or mmap_size > MAX_MMAP_SIZE:
        raise InflightError(f"inflight mmap_size {mmap_size} outside 1..{MAX_MMAP_SIZE}")
    if mmap_offset < 0 or mmap_offset > fd_size or mmap_size > fd_size - mmap_offset:
        raise InflightError(
            f"inflight region [{mmap_offset:#x}, +{mmap_size:#x}) ends past its fd "
            f"of {fd_size} bytes"
        )
    # Any stride that holds the header and every descriptor is accepted,
    # aligned or not: the front end may have it from another back end.
    stride = mmap_size // num_queues
    if stride < SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * queue_size:
        raise InflightError(
            f"inflight mmap_size {mmap_size} gives {stride} bytes per queue, too small "
            f"for {queue_size} descriptors"
        )
    return InflightGeometry(num_queues, queue_size, stride)


def queue_region(buffer: memoryview, geometry: InflightGeometry, queue: int) -> memoryview:
    """The slice of ``buffer`` that holds queue ``queue``'s region."""
    if not 0 <= queue < geometry.num_queues:
        raise InflightError(f"queue {queue} has no inflight region ({geometry.num_queues} queues)")
    start = queue * geometry.queue_region_size
    return buffer[start : start + geometry.queue_region_size]


def in_use(region: memoryview) -> bool:
    """Whether a back end initialised this queue region (a non-zero version), i.e. a restart."""
    return len(region) >= SPLIT_HEADER_SIZE and _U16.unpack_from(region, 8)[0] != 0


def _check_header(
    region: memoryview, ring_size: int, header_size: int, desc_size: int, kind: str
) -> tuple[int, int]:
    """(version, desc_num) of a queue region, checked against the ring it tracks."""
    if len(region) < header_size + desc_size * ring_size:
        raise InflightError(
            f"{kind} inflight region of {len(region)} bytes cannot hold {ring_size} descriptors"
        )
    features, version, desc_num = struct.unpack_from("<QHH", region, 0)
    if version == 0:
        return 0, desc_num
    if version != INFLIGHT_VERSION:
        raise InflightError(
            f"{kind} inflight region version {version}, expected {INFLIGHT_VERSION}"
        )
    if features != 0:
        raise InflightError(f"{kind} inflight region features {features:#x}, expected 0")
    if desc_num != ring_size:
        raise InflightError(
            f"{kind} inflight region tracks {desc_num} descriptors, the ring has {ring_size}"
        )
    return version, desc_num


# --------------------------------------------------------------------------
# Split rings
# --------------------------------------------------------------------------


class SplitRecovery(NamedTuple):
    """What a reconnecting back end does with a split queue's region."""

    #: Head descriptor indexes still in flight, oldest (lowest counter) first:
    #: resubmitted, each completed exactly once, before any new request.
    resubmit: tuple[int, ...]
    #: The ring's next available index: every descriptor the previous back
    #: end took is either completed (counted in the used index) or in flight.
    next_avail: int
    #: True if the last batch was published but not recorded, and was repaired.
    repaired_batch: bool
    #: The counter the tracker continues from (above every one still in flight).
    next_counter: int


def recover_split(
    region: memoryview, ring_size: int, ring_used_idx: int, ring_avail_idx: int
) -> SplitRecovery:
    """Validate and repair a split queue region (vhost-user.rst "When reconnecting").

    ``ring_used_idx`` / ``ring_avail_idx`` are the ``idx`` words of the ring's
    used and available rings as the back end reads them now.  A fresh region
    (version 0) is initialised and yields nothing to resubmit.  Anything
    inconsistent raises :class:`InflightError` and leaves the region as it was.
    """
    version, _ = _check_header(region, ring_size, SPLIT_HEADER_SIZE, SPLIT_DESC_SIZE, "split")
    if version == 0:
        _init_split(region, ring_size)
        return SplitRecovery((), ring_used_idx, False, 0)
    # One snapshot: the front end may write the shared region while we read it.
    snapshot = bytes(region[: SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * ring_size])
    _, _, _, last_batch_head, used_idx = _SPLIT_HEADER.unpack_from(snapshot, 0)
    inflight: list[bool] = []
    nexts: list[int] = []
    counters: list[int] = []
    for index in range(ring_size):
        flag, next_, counter = _SPLIT_DESC.unpack_from(
            snapshot, SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * index
        )
        if flag > 1:
            raise InflightError(f"split inflight descriptor {index}: inflight byte {flag}")
        inflight.append(flag == 1)
        nexts.append(next_)
        counters.append(counter)
    batch = (ring_used_idx - used_idx) & 0xFFFF
    repaired_batch = batch != 0
    if repaired_batch:
        # The ring's used index moved past used_idx: the last batch was
        # published but its inflight bytes were not cleared yet.
        if batch > ring_size:
            raise InflightError(
                f"split inflight used_idx {used_idx} is {batch} behind the ring's {ring_used_idx}, "
                f"more than the ring's {ring_size} descriptors"
            )
        head = last_batch_head
        for _ in range(batch):
            if head >= ring_size:
                raise InflightError(f"split inflight last batch links to descriptor {head}")
            inflight[head] = False
            head = nexts[head]
    pending = sorted((counters[i], i) for i in range(ring_size) if inflight[i])
    for (first, _), (second, index) in itertools.pairwise(pending):
        if first == second:
            raise InflightError(f"split inflight descriptor {index} repeats counter {first}")
    in_avail = (ring_avail_idx - ring_used_idx) & 0xFFFF
    if len(pending) > in_avail:
        raise InflightError(
            f"split inflight region marks {len(pending)} descriptors in flight, but only "
            f"{in_avail} are available beyond the used index"
        )
    # Repair only once everything checked out.
    if repaired_batch:
        head = last_batch_head
        for _ in range(batch):
            region[SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * head] = 0
            head = nexts[head]
        _U16.pack_into(region, _SPLIT_OFF_USED_IDX, ring_used_idx)
    next_counter = pending[-1][0] + 1 if pending else 0
    return SplitRecovery(
        tuple(index for _, index in pending),
        (ring_used_idx + len(pending)) & 0xFFFF,
        repaired_batch,
        next_counter,
    )


def _init_split(region: memoryview, ring_size: int) -> None:
    region[: SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * ring_size] = bytes(
        SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * ring_size
    )
    _SPLIT_HEADER.pack_into(region, 0, 0, INFLIGHT_VERSION, ring_size, 0, 0)


class SplitInflight:
    """Records a split queue's descriptors in its region as they are taken and completed.

    Built after :func:`recover_split` (which initialises a fresh region), with
    the counter it returned.  ``pop`` runs for every head taken from the
    available ring (a resubmitted head too: it is re-marked with a fresh
    counter, in the same order); ``before_publish`` runs after the used
    elements are written and before the used index is published;
    ``after_publish`` runs after.  Fields are stored through typed views of
    the region (one store each, no struct call on the hot path).
    """

    __slots__ = ("_bytes", "_counter", "_last_batch_head", "_u16", "_u64")

    def __init__(self, region: memoryview, ring_size: int, next_counter: int) -> None:
        length = SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * ring_size
        if len(region) < length:
            raise InflightError(f"split inflight region too small for {ring_size} descriptors")
        window = region[:length]
        self._bytes = window.cast("B")
        self._u16 = window.cast("H")
        self._u64 = window.cast("Q")
        self._counter = next_counter
        self._last_batch_head: int = self._u16[_SPLIT_OFF_LAST_BATCH_HEAD // 2]

    def pop(self, head: int) -> None:
        """``head`` was taken from the available ring: it is in flight from now on."""
        self._u64[_SPLIT_COUNTER_U64 + _SPLIT_STRIDE_U64 * head] = self._counter
        self._counter += 1
        self._bytes[SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * head] = 1

    def before_publish(self, heads: Sequence[int]) -> None:
        """Link the batch about to be published (its used elements are written)."""
        u16 = self._u16
        last = self._last_batch_head
        for head in heads:
            u16[_SPLIT_NEXT_U16 + _SPLIT_STRIDE_U16 * head] = last
            last = head
        self._last_batch_head = last
        u16[_SPLIT_OFF_LAST_BATCH_HEAD // 2] = last

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        """The ring's used index is now ``used_idx``: the batch is no longer in flight."""
        flags = self._bytes
        for head in heads:
            flags[SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * head] = 0
        self._u16[_SPLIT_OFF_USED_IDX // 2] = used_idx


# --------------------------------------------------------------------------
# Packed rings
# --------------------------------------------------------------------------


class PackedDescriptor(NamedTuple):
    """One descriptor as the region keeps it (the ring slot may be reused by then)."""

    addr: int
    len: int
    id: int
    flags: int


class PackedRecovery(NamedTuple):
    """What a reconnecting back end does with a packed queue's region."""

    #: (entry, descriptors) of every chain still in flight, oldest first.  The
    #: descriptors are the ones the previous back end took from the ring,
    #: copied into the region because the device overwrites ring slots with
    #: used elements out of order.
    resubmit: tuple[tuple[int, tuple[PackedDescriptor, ...]], ...]
    #: The ring position (index, wrap counter) where the next available
    #: descriptor is: past every descriptor completed or in flight.
    next_avail: int
    next_avail_wrap: bool
    #: The used position (index, wrap counter) the device writes next.
    used_idx: int
    used_wrap: bool
    #: True if an in-progress completion was found published and committed.
    committed_batch: bool
    next_counter: int


def recover_packed(
    region: memoryview,
    ring_size: int,
    read_ring_flags: Callable[[int], int],
    used_idx: int = 0,
    used_wrap: bool = True,
) -> PackedRecovery:
    """Validate, repair and read a packed queue region ("When reconnecting").

    ``read_ring_flags(slot)`` returns the flags word of descriptor ring slot
    ``slot`` (the host reads guest memory).  A fresh region (version 0) is
    initialised (free list 0, 1, ...) at the ring's used position
    ``used_idx``/``used_wrap`` (what the front end said; wrap counters start
    at 1) and yields nothing.  Otherwise the region, not the front end, says
    where the ring is: QEMU keeps no packed ring position of its own across a
    back end's crash.
    """
    version, _ = _check_header(region, ring_size, PACKED_HEADER_SIZE, PACKED_DESC_SIZE, "packed")
    if version == 0:
        if not 0 <= used_idx < ring_size:
            raise InflightError(f"packed used position {used_idx} outside a ring of {ring_size}")
        _init_packed(region, ring_size, used_idx, used_wrap)
        return PackedRecovery((), used_idx, used_wrap, used_idx, used_wrap, False, 0)
    snapshot = bytes(region[: PACKED_HEADER_SIZE + PACKED_DESC_SIZE * ring_size])
    (
        _,
        _,
        _,
        free_head,
        old_free_head,
        used_idx,
        old_used_idx,
        used_wrap,
        old_used_wrap,
    ) = _PACKED_HEADER.unpack_from(snapshot, 0)
    for name, value, limit in (
        ("free_head", free_head, ring_size),
        ("old_free_head", old_free_head, ring_size),
        ("used_idx", used_idx, ring_size - 1),
        ("old_used_idx", old_used_idx, ring_size - 1),
        ("used_wrap_counter", used_wrap, 1),
        ("old_used_wrap_counter", old_used_wrap, 1),
    ):
        if value > limit:
            raise InflightError(f"packed inflight {name} {value} beyond {limit}")
    entries = [
        _PACKED_DESC.unpack_from(snapshot, PACKED_HEADER_SIZE + PACKED_DESC_SIZE * index)
        for index in range(ring_size)
    ]
    committed = False
    if (used_idx, used_wrap) != (old_used_idx, old_used_wrap):
        # A completion was in progress.  If the ring slot at old_used_idx no
        # longer looks available in the old wrap, the device had published it.
        flags = read_ring_flags(old_used_idx) & AVAIL_USED
        available = DESC_F_AVAIL if old_used_wrap else DESC_F_USED
        if flags != available:
            committed = True
            old_free_head, old_used_idx, old_used_wrap = free_head, used_idx, used_wrap
    free_head, used_idx, used_wrap = old_free_head, old_used_idx, old_used_wrap
    # Entries on the free list are not in flight, whatever their byte says.
    free = [False] * ring_size
    entry = free_head
    steps = 0
    while entry != ring_size:
        if entry > ring_size:
            raise InflightError(f"packed inflight free list links to entry {entry}")
        if free[entry]:
            raise InflightError(f"packed inflight free list loops at entry {entry}")
        free[entry] = True
        entry = entries[entry][1]
        steps += 1
    chains: list[tuple[int, int, tuple[PackedDescriptor, ...]]] = []
    owned = free[:]
    ids: set[int] = set()
    total = 0
    for index, (flag, _, last, num, counter, _, _, _, _) in enumerate(entries):
        if flag > 1:
            raise InflightError(f"packed inflight entry {index}: inflight byte {flag}")
        if flag == 0 or free[index]:
            continue
        if not 1 <= num <= ring_size:
            raise InflightError(f"packed inflight entry {index}: chain of {num} descriptors")
        descriptors: list[PackedDescriptor] = []
        link = index
        for position in range(num):
            if link >= ring_size or owned[link]:
                raise InflightError(
                    f"packed inflight entry {index}: chain reaches entry {link} "
                    "twice or out of range"
                )
            owned[link] = True
            _, next_, _, _, _, id_, flags, length, addr = entries[link]
            descriptors.append(PackedDescriptor(addr, length, id_, flags))
            if position + 1 < num:
                link = next_
        if link != last:
            raise InflightError(f"packed inflight entry {index}: last {last}, chain ends at {link}")
        _check_chain_shape(index, descriptors)
        # The buffer ID is in the last descriptor; the driver keeps it unique
        # among its buffers in flight, and completions name chains by it.
        if descriptors[-1].id in ids:
            raise InflightError(
                f"packed inflight entry {index}: buffer ID {descriptors[-1].id} is in flight twice"
            )
        ids.add(descriptors[-1].id)
        total += num
        chains.append((counter, index, tuple(descriptors)))
    chains.sort()
    for (first, _, _), (second, index, _) in itertools.pairwise(chains):
        if first == second:
            raise InflightError(f"packed inflight entry {index} repeats counter {first}")
    if total > ring_size:
        raise InflightError(f"packed inflight region holds {total} descriptors in flight")
    # Everything checked: commit or roll back the header, clear the free list's bytes.
    _PACKED_HEADER.pack_into(
        region,
        0,
        0,
        INFLIGHT_VERSION,
        ring_size,
        free_head,
        free_head,
        used_idx,
        used_idx,
        used_wrap,
        used_wrap,
    )
    for index in range(ring_size):
        if free[index]:
            region[PACKED_HEADER_SIZE + PACKED_DESC_SIZE * index] = 0
    next_avail = used_idx + total
    next_wrap = bool(used_wrap)
    if next_avail >= ring_size:
        next_avail -= ring_size
        next_wrap = not next_wrap
    return PackedRecovery(
        tuple((index, descriptors) for _, index, descriptors in chains),
        next_avail,
        next_wrap,
        used_idx,
        bool(used_wrap),
        committed,
        chains[-1][0] + 1 if chains else 0,
    )


def _check_chain_shape(index: int, descriptors: Sequence[PackedDescriptor]) -> None:
    """A stored chain must be one the ring walker takes in exactly ``num`` slots.

    NEXT on every descriptor but the last, and INDIRECT only alone
    (packed-ring.tex, "Scatter-Gather Support" and "Indirect Flag"), so that
    a resubmitted chain occupies the ring slots the region accounts for.
    """
    for position, descriptor in enumerate(descriptors):
        chained = bool(descriptor.flags & DESC_F_NEXT)
        if chained != (position + 1 < len(descriptors)):
            raise InflightError(
                f"packed inflight entry {index}: descriptor {position} of {len(descriptors)} "
                f"{'has' if chained else 'lacks'} the NEXT flag"
            )
        if descriptor.flags & DESC_F_INDIRECT and len(descriptors) > 1:
            raise InflightError(f"packed inflight entry {index}: INDIRECT in a chain")


def _init_packed(region: memoryview, ring_size: int, used_idx: int, used_wrap: bool) -> None:
    region[: PACKED_HEADER_SIZE + PACKED_DESC_SIZE * ring_size] = bytes(
        PACKED_HEADER_SIZE + PACKED_DESC_SIZE * ring_size
    )
    wrap = int(used_wrap)
    _PACKED_HEADER.pack_into(
        region, 0, 0, INFLIGHT_VERSION, ring_size, 0, 0, used_idx, used_idx, wrap, wrap
    )
    for index in range(ring_size):
        _U16.pack_into(
            region, PACKED_HEADER_SIZE + PACKED_DESC_SIZE * index + _PACKED_DESC_OFF_NEXT, index + 1
        )


class PackedInflight:
    """Records a packed queue's chains in its region as they are taken and completed.

    Built from the region after :func:`recover_packed`: the free list and
    every in-flight chain's links are read back once (they were validated) and
    kept here; from then on the region is only written.  Chains are named by
    their buffer ID, as the device queue completes them (the ID is in a
    chain's last descriptor, packed-ring.tex "Next Flag: Descriptor
    Chaining").  ``pop`` runs for every chain taken from the ring, with its
    ring descriptors as (addr, len, id, flags); ``before_publish`` runs when
    the batch's used descriptors are written but for the first one's flags,
    which publish it; ``after_publish`` runs after.

    After a recovery the queue takes the resubmitted chains first, in order,
    from the ring slots it rewrote (:meth:`PackedDeviceQueue.resubmit
    <pyvirtio.virtqueue.packed_device.PackedDeviceQueue.resubmit>`): they are
    in the region already, so ``pop`` checks them against their entries and
    writes nothing, and a crash while they are resubmitted recovers them
    again the same way.
    """

    __slots__ = (
        "_counter",
        "_entry_of",
        "_free_head",
        "_last",
        "_next",
        "_num",
        "_region",
        "_resubmitted",
        "_ring_size",
        "_taken",
        "_used_idx",
        "_used_wrap",
    )

    def __init__(self, region: memoryview, ring_size: int, recovery: PackedRecovery) -> None:
        if len(region) < PACKED_HEADER_SIZE + PACKED_DESC_SIZE * ring_size:
            raise InflightError(f"packed inflight region too small for {ring_size} descriptors")
        self._region = region
        self._ring_size = ring_size
        self._counter = recovery.next_counter
        snapshot = bytes(region[: PACKED_HEADER_SIZE + PACKED_DESC_SIZE * ring_size])
        self._free_head: int = _U16.unpack_from(snapshot, _PACKED_OFF_FREE_HEAD)[0]
        self._used_idx = recovery.used_idx
        self._used_wrap = recovery.used_wrap
        #: Entries holding descriptors in flight; the rest are on the free list.
        self._taken = sum(len(descriptors) for _, descriptors in recovery.resubmit)
        #: The head entry of every chain in flight, by buffer ID.
        self._entry_of = {descriptors[-1].id: entry for entry, descriptors in recovery.resubmit}
        #: (entry, descriptor count) of the chains still to be taken again, next one last.
        self._resubmitted = [
            (entry, len(descriptors)) for entry, descriptors in reversed(recovery.resubmit)
        ]
        self._next: list[int] = []
        self._last: list[int] = []
        self._num: list[int] = []
        for index in range(ring_size):
            _, next_, last, num, *_ = _PACKED_DESC.unpack_from(
                snapshot, PACKED_HEADER_SIZE + PACKED_DESC_SIZE * index
            )
            self._next.append(next_)
            self._last.append(last)
            self._num.append(num)

    def pop(self, descriptors: Sequence[tuple[int, int, int, int]]) -> int:
        """A chain was taken from the ring: copy it into free entries; return its head entry.

        ``descriptors`` are its ring descriptors, (addr, len, id, flags) each.
        InflightError, with nothing written, for a chain the region cannot
        hold or whose buffer ID is already in flight (a driver that breaks
        packed-ring.tex's rules), or a resubmitted chain that came back
        different.
        """
        count = len(descriptors)
        if self._resubmitted:
            entry, num = self._resubmitted.pop()
            if count != num or self._entry_of.get(descriptors[-1][2]) != entry:
                raise InflightError(
                    f"resubmitted packed chain (entry {entry}, {num} descriptors) came back as "
                    f"{count} descriptors"
                )
            return entry
        if not 1 <= count <= self._ring_size - self._taken:
            # Only a driver that makes slots available twice gets here.
            raise InflightError(
                f"packed chain of {count} descriptors with {self._taken} of "
                f"{self._ring_size} already in flight"
            )
        buffer_id = descriptors[-1][2]
        if buffer_id in self._entry_of:
            raise InflightError(f"packed chain with buffer ID {buffer_id}, already in flight")
        # The copy goes into free entries first, then the head's fields and
        # inflight byte, then free_head, and last old_free_head, which
        # recovery goes by: killed before that, the entries are still free.
        region = self._region
        head = self._free_head
        entry = head
        last = head
        for addr, length, id_, flags in descriptors:
            offset = PACKED_HEADER_SIZE + PACKED_DESC_SIZE * entry
            struct.pack_into("<HHIQ", region, offset + 16, id_, flags, length, addr)
            last = entry
            entry = self._next[entry]
        base = PACKED_HEADER_SIZE + PACKED_DESC_SIZE * head
        struct.pack_into("<HHQ", region, base + 4, last, count, self._counter)  # last, num, counter
        self._counter += 1
        region[base] = 1
        _U16.pack_into(region, _PACKED_OFF_FREE_HEAD, entry)
        _U16.pack_into(region, _PACKED_OFF_OLD_FREE_HEAD, entry)
        self._last[head] = last
        self._num[head] = count
        self._free_head = entry
        self._taken += count
        self._entry_of[buffer_id] = head
        return head

    def _entries(self, ids: Sequence[int]) -> list[int]:
        """The head entries of the chains ``ids`` name; InflightError if one is not in flight."""
        try:
            entries = [self._entry_of[buffer_id] for buffer_id in ids]
        except KeyError as exc:
            raise InflightError(f"completion of buffer ID {exc.args[0]}, not in flight") from None
        if len(set(entries)) != len(entries):
            raise InflightError(f"one batch completes a buffer ID twice: {list(ids)}")
        return entries

    def before_publish(self, ids: Sequence[int]) -> None:
        """Return the batch's entries to the free list and advance the used position.

        InflightError, with nothing changed, if an ID is not in flight.
        """
        region = self._region
        used = self._used_idx
        wrap = self._used_wrap
        for head in self._entries(ids):
            last = self._last[head]
            self._next[last] = self._free_head
            _U16.pack_into(
                region,
                PACKED_HEADER_SIZE + PACKED_DESC_SIZE * last + _PACKED_DESC_OFF_NEXT,
                self._free_head,
            )
            self._free_head = head
            self._taken -= self._num[head]
            used += self._num[head]
            if used >= self._ring_size:
                used -= self._ring_size
                wrap = not wrap
        self._used_idx = used
        self._used_wrap = wrap
        _U16.pack_into(region, _PACKED_OFF_FREE_HEAD, self._free_head)
        _U16.pack_into(region, _PACKED_OFF_USED_IDX, used)
        region[_PACKED_OFF_USED_WRAP] = int(wrap)

    def after_publish(self, ids: Sequence[int]) -> None:
        """The batch's used flags are written: clear it and make the new positions the old ones."""
        region = self._region
        entry_of = self._entry_of
        for buffer_id in ids:
            region[PACKED_HEADER_SIZE + PACKED_DESC_SIZE * entry_of.pop(buffer_id)] = 0
        _U16.pack_into(region, _PACKED_OFF_OLD_FREE_HEAD, self._free_head)
        _U16.pack_into(region, _PACKED_OFF_OLD_USED_IDX, self._used_idx)
        region[_PACKED_OFF_OLD_USED_WRAP] = int(self._used_wrap)
