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
event structure) :func:`_full_barrier` issues a locked instruction via a
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

import array
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, Protocol

from pyvirtio.memory import GuestMemory, GuestMemoryError, MemoryRegion
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    INLINE_CHAIN,
    MAX_QUEUE_SIZE,
    DescriptorChain,
    QueueFullError,
    QueueState,
    VirtqueueError,
    make_chain,
)

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

#: Alignment of the descriptor ring (packed-ring.tex, "Structure Size and Alignment").
DESC_ALIGN = 16
#: Alignment of each event suppression structure (same table).
EVENT_ALIGN = 4
#: Bytes per ``struct pvirtq_desc``.
DESC_SIZE = 16
#: Bytes per ``struct pvirtq_event_suppress``.
EVENT_SIZE = 4

#: Availability flag bits (packed-ring.tex, "Driver and Device Ring Wrap Counters").
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15
_AVAIL_USED = DESC_F_AVAIL | DESC_F_USED

#: ``desc_event_flags`` values (packed-ring.tex, "Driver and Device Event Suppression").
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2

#: Most entries the device accepts in one indirect table.  The spec leaves the
#: limit to the device ("The device MAY limit the number of buffers it will
#: allow in a list"); this is the largest queue size, as for a direct chain.
MAX_INDIRECT_ENTRIES = MAX_QUEUE_SIZE

_U64_LIMIT = 1 << 64
_U32_MAX = 0xFFFF_FFFF
_WRAP_SHIFT = 15
_OFF_MASK = 0x7FFF

#: One ``struct pvirtq_desc`` (packed-ring.tex, "The Virtqueue Descriptor Format").
_DESC = struct.Struct("<QIHH")
_unpack_desc = _DESC.unpack_from
_pack_desc = _DESC.pack_into
#: A descriptor's ``addr``, ``len`` and ``id``: everything but the flags that publish it.
_pack_desc_head = struct.Struct("<QIH").pack_into
#: A used descriptor's ``len`` and ``id``, read after its flags.
_unpack_used = struct.Struct("<IH").unpack_from

#: Native casts of little-endian ring words are only right on little-endian
#: hosts; elsewhere :class:`_LEWords` stands in.  A module variable so tests
#: can exercise the fallback.
_NATIVE_LE = sys.byteorder == "little"

_new_object = object.__new__  # the inline fast paths (see common.INLINE_CHAIN)

_barrier_lock = threading.Lock()

#: Batches of at least this many used descriptors are stored with strided
#: slice assignments; below it, their fixed cost outweighs a store per field.
_BULK_MIN = 16


def _full_barrier() -> None:
    """Order earlier stores before later loads (the spec's "memory barrier").

    Acquiring a lock executes an atomic read-modify-write, a full fence on
    x86-64.  Needed before reading the other side's event suppression
    structure after publishing descriptors (packed-ring.tex, "Sending
    Available Buffer Notifications") and before re-checking the ring after
    enabling notifications.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver event area, device event area) for ``size``.

    packed-ring.tex, "Structure Size and Alignment".
    """
    return DESC_SIZE * size, EVENT_SIZE, EVENT_SIZE


def indirect_area_size(size: int, max_indirect: int) -> int:
    """Bytes a :class:`PackedDriverQueue` needs for its indirect tables.

    One table of ``max_indirect`` descriptors per buffer ID, so a table is
    free exactly when its buffer ID is.
    """
    return size * max_indirect * DESC_SIZE


# -- word access ---------------------------------------------------------------

_WordFormat = Literal["H", "I", "Q"]


class _Words(Protocol):
    """Indexable little-endian words: a native ``memoryview.cast`` or :class:`_LEWords`."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class _LEWords:
    """Little-endian words through ``struct``, for big-endian hosts."""

    __slots__ = ("_struct", "_view", "_width")

    def __init__(self, view: memoryview, fmt: str) -> None:
        self._view = view
        self._struct = struct.Struct("<" + fmt)
        self._width = self._struct.size

    def __getitem__(self, index: int) -> int:
        value: int = self._struct.unpack_from(self._view, index * self._width)[0]
        return value

    def __setitem__(self, index: int, value: int) -> None:
        try:
            self._struct.pack_into(self._view, index * self._width, value)
        except struct.error as exc:
            raise ValueError(str(exc)) from exc


def _words(view: memoryview, fmt: _WordFormat) -> _Words:
    """``view`` as an array of little-endian ``fmt`` words ("H", "I" or "Q")."""
    if _NATIVE_LE:
        return view.cast(fmt)
    return _LEWords(view, fmt)


def _ring_view(mem: GuestMemory, addr: int, length: int, what: str) -> memoryview:
    try:
        return mem.view(addr, length)
    except GuestMemoryError as exc:
        raise VirtqueueError(
            f"{what} [{addr:#x}, +{length:#x}) is not inside one guest memory region: {exc}"
        ) from exc


def _check_geometry(
    mem: GuestMemory, size: int, desc_addr: int, driver_addr: int, device_addr: int
) -> tuple[memoryview, memoryview, memoryview]:
    """Validate size and alignment, return views of the three areas.

    packed-ring.tex: at most 2**15 entries, any value (not only powers of
    two); "Structure Size and Alignment" for the alignments.
    """
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise VirtqueueError(f"queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    if desc_addr % DESC_ALIGN:
        raise VirtqueueError(f"descriptor ring {desc_addr:#x} is not {DESC_ALIGN}-byte aligned")
    for name, addr in (("driver event area", driver_addr), ("device event area", device_addr)):
        if addr % EVENT_ALIGN:
            raise VirtqueueError(f"{name} {addr:#x} is not {EVENT_ALIGN}-byte aligned")
    ring = _ring_view(mem, desc_addr, DESC_SIZE * size, "descriptor ring")
    drv = _ring_view(mem, driver_addr, EVENT_SIZE, "driver event area")
    dev = _ring_view(mem, device_addr, EVENT_SIZE, "device event area")
    return ring, drv, dev


def _largest_region(regions: tuple[MemoryRegion, ...]) -> tuple[int, int, memoryview]:
    """``(base, end, view)`` of the largest region, for the inline bounds check."""
    if not regions:
        return 1, 0, memoryview(b"")  # an empty range: every check takes the slow path
    region = max(regions, key=lambda r: r.size)
    return region.guest_base, region.guest_end, region.view


def _need_event(
    flags: int, off_wrap: int, event_idx: bool, new: int, wrap: int, count: int, size: int
) -> bool:
    """Whether the other side asked to be notified, given ``count`` new ring slots.

    packed-ring.tex, "Event Suppression Structure Format": DISABLE never,
    ENABLE always, DESC (only with VIRTIO_F_EVENT_IDX) when the descriptor at
    ``off_wrap`` is among the ``count`` slots just made available/used,
    which end at position ``new`` with wrap counter ``wrap``.  This is
    Linux's packed-ring test: an offset whose wrap bit differs from ours lies
    in the previous lap, so it moves there (``off - size``) before the split
    ring's ``vring_need_event`` comparison.  DESC without EVENT_IDX and the
    reserved value 3 count as ENABLE: an extra notification is always safe.
    """
    mode = flags & 0x3
    if mode == RING_EVENT_FLAGS_DISABLE:
        return False
    if mode != RING_EVENT_FLAGS_DESC or not event_idx:
        return True
    if count > size:
        return True  # more than a lap went by: the wrap bit is ambiguous, notify
    off = off_wrap & _OFF_MASK
    if (off_wrap >> _WRAP_SHIFT) != wrap:
        off -= size
    return ((new - off - 1) & 0xFFFF) < count


def _store_used_run(
    d16: memoryview,
    d32: memoryview,
    start: int,
    step: int,
    heads: list[int],
    lens: list[int],
    used_flags: int,
    skip_first_flags: bool,
) -> None:
    """Used descriptors at positions ``start``, ``start + step``, ...: id and len, then flags.

    ``used_flags`` are the lap's AVAIL/USED bits (WRITE is added where bytes
    were written).  With ``skip_first_flags`` the first descriptor's flags
    are left to the caller, which publishes the batch with them.  Raises
    OverflowError for an ID or length that does not fit its field.
    """
    stop = start + len(heads) * step
    d32[start * 4 + 2 : stop * 4 : step * 4] = array.array("I", lens)
    d16[start * 8 + 6 : stop * 8 : step * 8] = array.array("H", heads)
    write_flags = used_flags + DESC_F_WRITE
    unwritten = lens.count(0)  # a batch is mostly all one or the other
    if not unwritten:
        flags = array.array("H", (write_flags,)) * len(lens)
    elif unwritten == len(lens):
        flags = array.array("H", (used_flags,)) * len(lens)
    else:
        flags = array.array("H", [write_flags if written else used_flags for written in lens])
    if skip_first_flags:
        d16[(start + step) * 8 + 7 : stop * 8 : step * 8] = flags[1:]
    else:
        d16[start * 8 + 7 : stop * 8 : step * 8] = flags


# -- device side -----------------------------------------------------------------


class PackedDeviceQueue:
    """The device side of a packed virtqueue: parses available chains, writes used ones.

    Everything read from the ring is validated (packed-ring.tex, "Scatter-
    Gather Support" and "Indirect Flag"); any fault raises
    :class:`VirtqueueError` and leaves the queue ``broken``, after which
    :meth:`pop` raises at once so the transport can ask for a reset.
    """

    __slots__ = (
        "_avail_expect",
        "_avail_wrap",
        "_d16",
        "_d32",
        "_d64",
        "_dev16",
        "_drv16",
        "_hi",
        "_lo",
        "_mem",
        "_next_avail",
        "_next_used",
        "_notify_flags",
        "_regions_seen",
        "_ring",
        "_track_avail_event",
        "_used_since_signal",
        "_used_wrap",
        "_view",
        "broken",
        "desc_addr",
        "device_addr",
        "driver_addr",
        "event_idx",
        "indirect",
        "size",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        ring, drv, dev = _check_geometry(mem, size, desc_addr, driver_addr, device_addr)
        self._mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.broken = False
        self._ring = ring  # bytes, for whole-descriptor unpacks
        self._d16 = _words(ring, "H")
        self._d32 = _words(ring, "I")
        self._d64 = _words(ring, "Q")
        self._drv16 = _words(drv, "H")  # read only: [0] off_wrap, [1] flags
        self._dev16 = _words(dev, "H")  # written by us
        self._next_used = 0
        self._used_wrap = 1
        self._set_avail(0, 1)
        self._used_since_signal = 0  # ring slots used since needs_notification()
        self._set_notify_flags(RING_EVENT_FLAGS_ENABLE)
        # Cached guest range for the inline buffer bounds check: the region
        # table is replaced as a whole on any change, so an identity check of
        # it keeps the cached bounds honest (see _check_range).
        self._regions_seen = mem.regions
        self._lo, self._hi, self._view = _largest_region(self._regions_seen)

    def _set_avail(self, pos: int, wrap: int) -> None:
        """Set the next available position and the device's view of the driver wrap counter.

        Wrap counters start at 1 (packed-ring.tex, "Driver and Device Ring
        Wrap Counters"); an available descriptor has AVAIL == counter and
        USED != counter, i.e. those two flag bits equal ``_avail_expect``.
        A plain descriptor has exactly those flags (plus WRITE): the fast path.
        """
        self._next_avail = pos
        self._avail_wrap = wrap
        self._avail_expect = DESC_F_AVAIL if wrap else DESC_F_USED

    def _set_notify_flags(self, flags: int) -> None:
        """Record what the device last wrote to its event suppression area.

        With DESC, :meth:`pop` keeps the event offset just past what it consumed.
        """
        self._notify_flags = flags
        self._track_avail_event = flags == RING_EVENT_FLAGS_DESC

    def __repr__(self) -> str:
        return (
            f"PackedDeviceQueue(size={self.size}, next_avail={self._next_avail}/"
            f"{self._avail_wrap}, next_used={self._next_used}/{self._used_wrap}, "
            f"broken={self.broken})"
        )

    # -- available descriptors ----------------------------------------------

    def has_available(self) -> bool:
        """Whether :meth:`pop` would return a chain (or raise, when broken)."""
        if self.broken:
            return True
        flags = self._d16[self._next_avail * 8 + 7]
        return (flags & _AVAIL_USED) == self._avail_expect

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; :class:`VirtqueueError` if malformed.

        ``chain.head`` is the buffer ID, which the driver stores in the last
        descriptor of a chain (packed-ring.tex, "Next Flag: Descriptor
        Chaining"); ``chain.ring_slots`` is how many ring descriptors it took.
        """
        if self.broken:
            raise VirtqueueError("packed virtqueue is broken; the device needs a reset")
        pos = self._next_avail
        # Flags first: they publish the rest of the descriptor.
        flags = self._d16[pos * 8 + 7]
        expect = self._avail_expect
        if flags == expect or flags == expect + 2:  # + DESC_F_WRITE
            # Fast path: one plain descriptor, read whole after its flags.
            addr, length, bid, _ = _unpack_desc(self._ring, pos * 16)
            mem = self._mem
            # mem._regions backs mem.regions; read directly, it saves a call.
            if not (
                self._lo <= addr
                and addr + length <= self._hi
                and mem._regions is self._regions_seen
            ):
                self._check_range(addr, length, pos)
            if INLINE_CHAIN:
                chain = _new_object(DescriptorChain)
                chain.mem = mem
                chain.head = bid
                chain.ring_slots = 1
                if flags == expect:
                    chain.readable = [(addr, length)]
                    chain.writable = []
                    chain.readable_len = length
                    chain.writable_len = 0
                else:
                    chain.readable = []
                    chain.writable = [(addr, length)]
                    chain.readable_len = 0
                    chain.writable_len = length
            elif flags == expect:
                chain = DescriptorChain(mem, bid, [(addr, length)], [], length, 0)
            else:
                chain = DescriptorChain(mem, bid, [], [(addr, length)], 0, length)
            pos += 1
        elif (flags & _AVAIL_USED) != expect:
            return None
        else:
            chain = self._pop_chain(pos, flags, expect)
            pos += chain.ring_slots
        if pos >= self.size:
            self._set_avail(pos - self.size, self._avail_wrap ^ 1)
        else:
            self._next_avail = pos
        if self._track_avail_event:
            # Keep asking for the descriptor after the ones consumed, or the
            # driver's next additions would pass the old offset unnoticed.
            self._dev16[0] = self._next_avail + self._avail_wrap * 0x8000
        return chain

    def pop_batch(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every available chain (at most ``limit``), in ring order.

        What calling :meth:`pop` until it returns None gives, for less work
        per chain: a device that serves all available buffers on each
        notification (the block device does) can take them in one call.
        Each chain is parsed and checked exactly as by :meth:`pop`.  With
        DESC event suppression, the event offset is stored once, past the
        chains taken, and the next descriptor is looked at again afterwards,
        so a buffer made available meanwhile is either taken or notified.  A
        malformed chain raises VirtqueueError and breaks the queue, as
        :meth:`pop` does; the chains taken before it in the same call are
        consumed with the queue.
        """
        if self.broken:
            raise VirtqueueError("packed virtqueue is broken; the device needs a reset")
        chains: list[DescriptorChain] = []
        if not INLINE_CHAIN:  # DescriptorChain changed: let pop build each chain
            while (limit is None or len(chains) < limit) and (chain := self.pop()) is not None:
                chains.append(chain)
            return chains
        room = sys.maxsize if limit is None else limit
        size = self.size
        d16 = self._d16
        ring = self._ring
        mem = self._mem
        pos = self._next_avail
        wrap = self._avail_wrap
        expect = self._avail_expect
        # The event offset (position and wrap counter) as this call last
        # stored it; the starting one stands for "nothing taken yet".
        published = pos + wrap * 0x8000
        # The cached region is made current once per call (pop checks it per
        # chain): a table replaced later in the call is like one replaced
        # just after it.
        if mem._regions is not self._regions_seen:
            self._regions_seen = mem._regions
            self._lo, self._hi, self._view = _largest_region(self._regions_seen)
        lo = self._lo
        hi = self._hi
        try:
            while room > 0:
                # Flags first: they publish the rest of the descriptor.
                flags = d16[pos * 8 + 7]
                if flags == expect or flags == expect + 2:  # + DESC_F_WRITE
                    # The fast path of pop, inline: see there.
                    addr, length, bid, _ = _unpack_desc(ring, pos * 16)
                    if not (lo <= addr and addr + length <= hi):
                        self._check_range(addr, length, pos)
                        lo = self._lo
                        hi = self._hi
                    chain = _new_object(DescriptorChain)
                    chain.mem = mem
                    chain.head = bid
                    chain.ring_slots = 1
                    if flags == expect:
                        chain.readable = [(addr, length)]
                        chain.writable = []
                        chain.readable_len = length
                        chain.writable_len = 0
                    else:
                        chain.readable = []
                        chain.writable = [(addr, length)]
                        chain.readable_len = 0
                        chain.writable_len = length
                    pos += 1
                elif (flags & _AVAIL_USED) != expect:
                    if not self._track_avail_event or pos + wrap * 0x8000 == published:
                        break
                    # As pop does: ask for a notification past what was taken,
                    # then look at the next descriptor once more.
                    published = pos + wrap * 0x8000
                    self._dev16[0] = published
                    continue
                else:
                    chain = self._pop_chain(pos, flags, expect)
                    pos += chain.ring_slots
                chains.append(chain)
                room -= 1
                if pos >= size:
                    pos -= size
                    wrap ^= 1
                    expect = DESC_F_AVAIL if wrap else DESC_F_USED
        except VirtqueueError:
            self._set_avail(pos, wrap)  # past the chains taken, as pop would be
            raise
        self._set_avail(pos, wrap)
        if self._track_avail_event and pos + wrap * 0x8000 != published:
            self._dev16[0] = pos + wrap * 0x8000  # stopped by ``limit``
        return chains

    def _fail(self, message: str) -> VirtqueueError:
        self.broken = True
        return VirtqueueError(message)

    def _check_range(self, addr: int, length: int, pos: int) -> None:
        """Slow path of the buffer bounds check: refresh the cache, then look up.

        The inline check compares against the largest region and the
        identity of the region table, so it never accepts a range a fresh
        look-up would refuse; ranges elsewhere (or spanning two contiguous
        regions) come here.
        """
        mem = self._mem
        regions = mem.regions
        if regions is not self._regions_seen:
            self._regions_seen = regions
            self._lo, self._hi, self._view = _largest_region(regions)
            if self._lo <= addr and addr + length <= self._hi:
                return
        end = addr + length
        if end > _U64_LIMIT:
            raise self._fail(
                f"descriptor {pos}: buffer {addr:#x}+{length:#x} overflows the address space"
            )
        if not mem.is_valid(addr, length):
            raise self._fail(
                f"descriptor {pos}: buffer [{addr:#x}, {end:#x}) is outside guest memory"
            )

    def _pop_chain(self, head: int, flags: int, expect: int) -> DescriptorChain:
        """Walk a chain of several descriptors, or one indirect descriptor.

        ``expect`` is the AVAIL/USED pattern of an available descriptor at
        ``head`` (see :meth:`_set_avail`).  Any fault becomes a
        :class:`VirtqueueError` and breaks the queue.
        """
        try:
            size = self.size
            d16 = self._d16
            ring = self._ring
            mem = self._mem
            fresh = mem._regions is self._regions_seen
            lo = self._lo
            hi = self._hi
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            readable_len = 0
            writable_len = 0
            pos = head
            slots = 1
            while True:
                # The flags were read (and found available) first.
                addr, length, bid, _ = _unpack_desc(ring, pos * 16)
                # NEXT 1, WRITE 2, INDIRECT 4, compared as literals below
                # (CPython 3.11 specialises int compares, not ``&``).
                kind = flags & 7
                if kind >= 4:  # DESC_F_INDIRECT
                    if not self.indirect:
                        raise self._fail(
                            f"descriptor {pos}: INDIRECT flag but VIRTIO_F_INDIRECT_DESC "
                            "was not negotiated"
                        )
                    if slots > 1 or kind in {5, 7}:  # ... or DESC_F_NEXT
                        raise self._fail(
                            f"descriptor {pos}: INDIRECT descriptor in a NEXT-linked chain"
                        )
                    readable_len, writable_len = self._walk_indirect(
                        pos, addr, length, readable, writable
                    )
                    break
                if not (fresh and lo <= addr and addr + length <= hi):
                    self._check_range(addr, length, pos)
                    fresh = True
                    lo = self._lo
                    hi = self._hi
                if kind >= 2:  # DESC_F_WRITE
                    writable.append((addr, length))
                    writable_len += length
                    if kind == 2:  # no DESC_F_NEXT: the end
                        break
                elif writable:
                    raise self._fail(
                        f"descriptor chain at {head}: readable descriptor {pos} after a "
                        "writable one"
                    )
                else:
                    readable.append((addr, length))
                    readable_len += length
                    if kind == 0:
                        break
                if slots >= size:
                    raise self._fail(
                        f"descriptor chain at {head} is longer than the queue size {size}"
                    )
                pos += 1
                if pos == size:
                    pos = 0
                    expect ^= _AVAIL_USED
                # The driver makes the head available last (packed-ring.tex,
                # "Scatter-Gather Support", driver requirements), so the rest
                # of a chain whose head is available must be available too.
                flags = d16[pos * 8 + 7]
                if (flags & _AVAIL_USED) != expect:
                    raise self._fail(
                        f"descriptor chain at {head}: descriptor {pos} continues the "
                        f"chain but is not available (flags {flags:#06x})"
                    )
                slots += 1
            # The buffer ID is in the last descriptor of the list.
            return make_chain(mem, bid, readable, writable, readable_len, writable_len, slots)
        except VirtqueueError:
            self.broken = True
            raise
        except (GuestMemoryError, struct.error, IndexError, ValueError, OverflowError) as exc:
            raise self._fail(f"descriptor chain at {head}: {exc}") from exc

    def _walk_indirect(
        self,
        pos: int,
        addr: int,
        length: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
    ) -> tuple[int, int]:
        """Flatten an indirect table (packed-ring.tex, "Indirect Flag: Scatter-Gather Support")."""
        if length == 0 or length % DESC_SIZE:
            raise self._fail(
                f"descriptor {pos}: indirect table length {length} is not a non-zero "
                f"multiple of {DESC_SIZE}"
            )
        if length > MAX_INDIRECT_ENTRIES * DESC_SIZE:
            raise self._fail(
                f"descriptor {pos}: indirect table of {length // DESC_SIZE} entries exceeds "
                f"the limit of {MAX_INDIRECT_ENTRIES}"
            )
        mem = self._mem
        fresh = mem._regions is self._regions_seen
        lo = self._lo
        hi = self._hi
        table: bytes | memoryview
        if fresh and lo <= addr and addr + length <= hi:
            # Zero copy from the cached region; each entry is read once.
            table = self._view[addr - lo : addr - lo + length]
        else:
            try:
                table = mem.read(addr, length)
            except GuestMemoryError as exc:
                raise self._fail(
                    f"descriptor {pos}: indirect table [{addr:#x}, +{length:#x}) is outside "
                    "guest memory"
                ) from exc
        readable_len = 0
        writable_len = 0
        for index, (baddr, blen, _id, bflags) in enumerate(_DESC.iter_unpack(table)):
            # Only WRITE is valid in a table entry; NEXT and the ID are ignored.
            if bflags & DESC_F_INDIRECT:
                raise self._fail(
                    f"descriptor {pos}: indirect table entry {index} is itself INDIRECT"
                )
            if not (fresh and lo <= baddr and baddr + blen <= hi):
                self._check_range(baddr, blen, pos)
                fresh = True
                lo = self._lo
                hi = self._hi
            if bflags & DESC_F_WRITE:
                writable.append((baddr, blen))
                writable_len += blen
            elif writable:
                raise self._fail(
                    f"descriptor {pos}: indirect table entry {index} is readable after a "
                    "writable one"
                )
            else:
                readable.append((baddr, blen))
                readable_len += blen
        return readable_len, writable_len

    # -- used descriptors -----------------------------------------------------

    def _slots_in_flight(self) -> int:
        """Ring slots popped and not yet used: the distance from used to avail position.

        The wrap counters give each position's lap parity, so the distance is
        exact over a cycle of two laps (and it never exceeds one).
        """
        size = self.size
        lap_avail = self._next_avail + (0 if self._avail_wrap else size)
        lap_used = self._next_used + (0 if self._used_wrap else size)
        return (lap_avail - lap_used) % (2 * size)

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        """Write a used descriptor for ``chain`` at the next used position.

        packed-ring.tex, "Receiving Used Buffers From The Device" and "Next
        Flag": one used descriptor per chain, carrying the buffer ID; ``id``
        and ``len`` are stored before ``flags``, whose AVAIL and USED bits
        both equal the device's used wrap counter, and WRITE says whether
        bytes were written ("Write Flag").  The used position then skips the
        chain's ring slots.  Raises ValueError for a ``written`` beyond the
        chain's writable part or more ring slots than were popped: device
        model bugs, not the driver's.
        """
        self.add_used_batch(((chain, written),))

    def add_used_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return several chains; the driver sees the whole batch at once.

        Each later descriptor is written whole (flags after its ``id`` and
        ``len``) and the first one's flags last (packed-ring.tex, "Multi-buffer
        requests"): the driver only polls the first position, so it finds the
        batch complete.  An invalid element (ValueError, see :meth:`add_used`)
        is found before the first flags are stored, so the driver sees nothing
        of a refused batch, and no descriptor beyond those popped is touched.
        """
        count = len(completions)
        if not count:
            return
        limit = self._slots_in_flight()
        if count >= _BULK_MIN and isinstance(self._d16, memoryview):
            step = self._add_used_uniform(completions, limit)
            if step:
                return
            # Chains of different lengths: the loop below (which validates again).
        size = self.size
        d16 = self._d16
        d32 = self._d32
        pos = self._next_used
        wrap = self._used_wrap
        # Used flags: AVAIL == USED == the used wrap counter, WRITE if written.
        used_flags = _AVAIL_USED if wrap else 0
        first_index = pos * 8 + 7  # the first element's flags word, stored last
        first_flags = -1
        total = 0
        try:
            for chain, written in completions:
                slots = chain.ring_slots
                total += slots
                if total > limit or slots < 1:
                    raise ValueError(
                        f"used descriptors for {total} ring slots, {limit} in flight "
                        f"({chain!r} occupies {slots})"
                    )
                if written > chain.writable_len:
                    raise ValueError(
                        f"written={written} for a chain with {chain.writable_len} writable bytes"
                    )
                d32[pos * 4 + 2] = written  # ValueError unless 0 <= written < 2**32
                d16[pos * 8 + 6] = chain.head
                flags = used_flags + DESC_F_WRITE if written else used_flags
                if first_flags < 0:
                    first_flags = flags
                else:
                    d16[pos * 8 + 7] = flags
                pos += slots
                if pos >= size:
                    pos -= size
                    wrap ^= 1
                    used_flags ^= _AVAIL_USED
        except (ValueError, OverflowError, TypeError) as exc:
            raise ValueError(f"add_used: written count or buffer ID out of range ({exc})") from exc
        d16[first_index] = first_flags  # publishes the whole batch
        self._next_used = pos
        self._used_wrap = wrap
        self._used_since_signal += total

    def _add_used_uniform(
        self, completions: Sequence[tuple[DescriptorChain, int]], limit: int
    ) -> int:
        """add_used_batch for a large batch of chains of one length: strided slice stores.

        Chains that each took ``step`` ring slots have their used descriptors
        ``step`` apart, so each lap's part of the batch is a few strided
        slice stores instead of three stores per chain.  Returns ``step``, or
        0 without storing anything when the chains' lengths differ.
        Everything is validated before the first store, as in
        :meth:`add_used_batch`.
        """
        d16 = self._d16
        d32 = self._d32
        assert isinstance(d16, memoryview) and isinstance(d32, memoryview)
        heads: list[int] = []
        lens: list[int] = []
        step = completions[0][0].ring_slots
        total = 0
        for chain, written in completions:
            slots = chain.ring_slots
            total += slots
            if total > limit or slots < 1:
                raise ValueError(
                    f"used descriptors for {total} ring slots, {limit} in flight "
                    f"({chain!r} occupies {slots})"
                )
            if slots != step:
                return 0
            if not 0 <= written <= chain.writable_len:
                raise ValueError(
                    f"written={written} for a chain with {chain.writable_len} writable bytes"
                )
            heads.append(chain.head)
            lens.append(written)
        size = self.size
        pos = self._next_used
        wrap = self._used_wrap
        used_flags = _AVAIL_USED if wrap else 0  # AVAIL == USED == the used wrap counter
        first = pos * 8 + 7  # the first element's flags word, stored last
        count = min(len(heads), (size - pos + step - 1) // step)  # on this lap
        try:
            _store_used_run(d16, d32, pos, step, heads[:count], lens[:count], used_flags, True)
            pos += total
            if pos >= size:
                pos -= size
                wrap ^= 1
                if count < len(heads):  # the rest, on the next lap
                    _store_used_run(
                        d16,
                        d32,
                        pos - (len(heads) - count) * step,
                        step,
                        heads[count:],
                        lens[count:],
                        used_flags ^ _AVAIL_USED,
                        False,
                    )
        except OverflowError as exc:
            raise ValueError(f"add_used: written count or buffer ID out of range ({exc})") from exc
        d16[first] = used_flags + DESC_F_WRITE if lens[0] else used_flags  # publishes the batch
        self._next_used = pos
        self._used_wrap = wrap
        self._used_since_signal += total
        return step

    # -- notifications ----------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether to send a used buffer notification now; resets the count since the last.

        Reads the driver event suppression structure (packed-ring.tex, "Event
        Suppression Structure Format"): see :func:`_need_event`.
        """
        _full_barrier()  # used descriptors visible before reading the driver's area
        drv16 = self._drv16
        flags = drv16[1]
        off_wrap = drv16[0]  # after flags: at least as new as the DESC it goes with
        count = self._used_since_signal
        self._used_since_signal = 0
        return _need_event(
            flags, off_wrap, self.event_idx, self._next_used, self._used_wrap, count, self.size
        )

    def enable_notifications(self) -> bool:
        """Ask for available buffer notifications; True if a chain arrived meanwhile.

        With EVENT_IDX: DESC with the offset and wrap counter of the next
        descriptor to be made available (offset stored before the flags);
        otherwise ENABLE.  The re-check of the ring afterwards closes the race
        with a driver that added a chain while notifications were off, as in
        packed-ring.tex, "Receiving Used Buffers From The Device".
        """
        dev16 = self._dev16
        if self.event_idx:
            dev16[0] = self._next_avail + self._avail_wrap * 0x8000
            dev16[1] = RING_EVENT_FLAGS_DESC
            self._set_notify_flags(RING_EVENT_FLAGS_DESC)
        else:
            dev16[1] = RING_EVENT_FLAGS_ENABLE
            self._set_notify_flags(RING_EVENT_FLAGS_ENABLE)
        _full_barrier()
        return self.has_available()

    def disable_notifications(self) -> None:
        """Tell the driver not to send available buffer notifications (a hint)."""
        self._dev16[1] = RING_EVENT_FLAGS_DISABLE
        self._set_notify_flags(RING_EVENT_FLAGS_DISABLE)

    # -- state ----------------------------------------------------------------

    def state(self) -> QueueState:
        """Everything needed to rebuild the queue with :meth:`from_state`, ints and bools.

        ``used_since_signal`` and ``notify_flags`` are the signalling markers:
        ring slots used since the last :meth:`needs_notification`, and what
        the device last wrote to its event suppression area.
        """
        return {
            "format": "packed",
            "size": self.size,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "next_avail": self._next_avail,
            "avail_wrap_counter": bool(self._avail_wrap),
            "next_used": self._next_used,
            "used_wrap_counter": bool(self._used_wrap),
            "used_since_signal": self._used_since_signal,
            "notify_flags": self._notify_flags,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "broken": self.broken,
        }

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> PackedDeviceQueue:
        """Rebuild a queue from :meth:`state`; guest memory holds the ring itself.

        Nothing is written to guest memory.  An inconsistent state raises
        :class:`VirtqueueError`.
        """
        try:
            if state.get("format", "packed") != "packed":
                raise ValueError(f"format {state['format']!r}")
            queue = cls(
                mem,
                _as_int(state["size"]),
                _as_int(state["desc_addr"]),
                _as_int(state["driver_addr"]),
                _as_int(state["device_addr"]),
                event_idx=_as_bool(state["event_idx"]),
                indirect=_as_bool(state["indirect"]),
            )
            size = queue.size
            next_avail = _as_int(state["next_avail"])
            next_used = _as_int(state["next_used"])
            avail_wrap = int(_as_bool(state["avail_wrap_counter"]))
            used_wrap = int(_as_bool(state["used_wrap_counter"]))
            used_since_signal = _as_int(state["used_since_signal"])
            notify_flags = _as_int(state["notify_flags"])
            broken = _as_bool(state["broken"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VirtqueueError(f"invalid packed queue state: {exc!r}") from exc
        if not (0 <= next_avail < size and 0 <= next_used < size):
            raise VirtqueueError(
                f"invalid packed queue state: positions {next_avail}/{next_used} for size {size}"
            )
        if used_since_signal < 0 or notify_flags not in (0, 1, 2):
            raise VirtqueueError("invalid packed queue state: signalling markers out of range")
        queue._set_avail(next_avail, avail_wrap)
        queue._next_used = next_used
        queue._used_wrap = used_wrap
        if queue._slots_in_flight() > size:
            raise VirtqueueError(
                "invalid packed queue state: the used position is ahead of the available one"
            )
        queue._used_since_signal = used_since_signal
        queue._set_notify_flags(notify_flags)
        queue.broken = broken
        return queue


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {value!r}")
    return value


# -- driver side -----------------------------------------------------------------


class PackedDriverQueue:
    """The driver side of a packed virtqueue: makes buffers available, collects used ones.

    Buffer IDs come from a free list, so the device may complete buffers in
    any order.  With ``indirect`` (VIRTIO_F_INDIRECT_DESC negotiated) and
    ``max_indirect`` > 1, a request of 2..max_indirect elements takes one
    ring slot and a table in the caller-reserved area at ``indirect_addr``
    (:func:`indirect_area_size` bytes; buffer ID ``i`` owns the table at
    ``indirect_addr + i * max_indirect * 16``).  Whatever the device writes
    is validated: a bad buffer ID or length raises :class:`VirtqueueError`
    (and sets ``broken``) rather than corrupting the driver's state.
    """

    __slots__ = (
        "_added_since_kick",
        "_avail_flags",
        "_avail_wrap",
        "_d16",
        "_d32",
        "_d64",
        "_dev16",
        "_drv16",
        "_free_ids",
        "_indirect_base",
        "_irq_flags",
        "_next_avail",
        "_next_used",
        "_num_free",
        "_ring",
        "_slots",
        "_t16",
        "_t32",
        "_t64",
        "_tokens",
        "_track_used_event",
        "_used_expect",
        "_used_wrap",
        "_wlen",
        "broken",
        "desc_addr",
        "device_addr",
        "driver_addr",
        "event_idx",
        "indirect",
        "indirect_addr",
        "max_indirect",
        "size",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_addr: int | None = None,
        max_indirect: int = 0,
    ) -> None:
        ring, drv, dev = _check_geometry(mem, size, desc_addr, driver_addr, device_addr)
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.broken = False
        if not indirect:
            max_indirect = 0
        if not 0 <= max_indirect <= MAX_INDIRECT_ENTRIES:
            raise VirtqueueError(f"max_indirect {max_indirect} not in 0..{MAX_INDIRECT_ENTRIES}")
        self.max_indirect = max_indirect
        self.indirect_addr = indirect_addr if max_indirect else None
        self._indirect_base = indirect_addr if indirect_addr is not None and max_indirect else 0
        self._t16: _Words | None = None
        self._t32: _Words | None = None
        self._t64: _Words | None = None
        if max_indirect:
            if indirect_addr is None:
                raise VirtqueueError("indirect tables need indirect_addr")
            table = _ring_view(
                mem, indirect_addr, indirect_area_size(size, max_indirect), "indirect table area"
            )
            self._t16 = _words(table, "H")
            self._t32 = _words(table, "I")
            self._t64 = _words(table, "Q")
        # "The descriptor ring is zero-initialized" (packed-ring.tex, "The
        # Virtqueue Descriptor Format"); zeroed event areas mean ENABLE.
        ring[:] = bytes(len(ring))
        drv[:] = bytes(EVENT_SIZE)
        dev[:] = bytes(EVENT_SIZE)
        self._ring = ring  # bytes, for packing a descriptor's fields at once
        self._d16 = _words(ring, "H")
        self._d32 = _words(ring, "I")
        self._d64 = _words(ring, "Q")
        self._drv16 = _words(drv, "H")  # written by us: [0] off_wrap, [1] flags
        self._dev16 = _words(dev, "H")  # read only
        # Driver ring wrap counter starts at 1: available descriptors carry
        # AVAIL = counter and USED = !counter (packed-ring.tex, "Driver and
        # Device Ring Wrap Counters").
        self._next_avail = 0
        self._avail_wrap = 1
        self._avail_flags = DESC_F_AVAIL
        self._next_used = 0
        self._used_wrap = 1
        self._used_expect = _AVAIL_USED  # used: AVAIL == USED == used wrap counter
        self._num_free = size
        self._added_since_kick = 0
        self._set_irq_flags(RING_EVENT_FLAGS_ENABLE)
        self._free_ids = list(range(size - 1, -1, -1))
        # Per buffer ID: token, ring slots (0 = not in flight), writable bytes.
        self._tokens: list[object] = [None] * size
        self._slots = [0] * size
        self._wlen = [0] * size

    def _set_irq_flags(self, flags: int) -> None:
        """Record what the driver last wrote to its event suppression area.

        With DESC, :meth:`used` keeps the event offset at the next used position.
        """
        self._irq_flags = flags
        self._track_used_event = flags == RING_EVENT_FLAGS_DESC

    def __repr__(self) -> str:
        return (
            f"PackedDriverQueue(size={self.size}, free={self._num_free}, "
            f"in_flight={self.in_flight})"
        )

    @property
    def num_free(self) -> int:
        """Ring descriptors free for new requests."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Buffers made available and not yet returned by the device."""
        return self.size - len(self._free_ids)

    # -- making buffers available -----------------------------------------------

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object,
    ) -> None:
        """Make a buffer available: readable elements, then writable ones.

        Follows packed-ring.tex, "Placing Available Buffers Into The
        Descriptor Ring": every descriptor but the head is written completely,
        the buffer ID goes in each (the device reads it from the last), and
        the head's flags are stored last so the device never sees a partial
        chain.  Raises QueueFullError when the ring lacks room, ValueError for
        an empty request, one that could never fit, or out-of-range fields.
        """
        if len(readable) + len(writable) == 1 and self._num_free:
            # Fast path: one direct descriptor.
            if readable:
                addr, length = readable[0]
                flags = self._avail_flags
                wlen = 0
            else:
                addr, length = writable[0]
                flags = self._avail_flags + DESC_F_WRITE
                wlen = length
            pos = self._next_avail
            bid = self._free_ids.pop()
            try:
                # addr, len and id in one call; the flags go after them.
                _pack_desc_head(self._ring, pos * 16, addr, length, bid)
            except struct.error as exc:
                self._free_ids.append(bid)
                raise ValueError(f"invalid buffer ({addr!r}, {length!r}): {exc}") from exc
            self._tokens[bid] = token
            self._slots[bid] = 1
            self._wlen[bid] = wlen
            self._d16[pos * 8 + 7] = flags  # publishes the descriptor
            pos += 1
            if pos == self.size:
                pos = 0
                self._avail_wrap ^= 1
                self._avail_flags ^= _AVAIL_USED
            self._next_avail = pos
            self._num_free -= 1
            self._added_since_kick += 1
            return
        self._add_slow(readable, writable, token)

    def add_batch(
        self,
        requests: Iterable[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]], object]],
    ) -> int:
        """Make several ``(readable, writable, token)`` requests available, in order.

        What calling :meth:`add` for each gives (each request's head flags
        are stored last, publishing it), for less work per request: a driver
        with several requests queued adds them at once, then asks
        :meth:`kick_needed`.  Returns how many were added: all of them, or
        fewer when the next did not fit (it and the rest were not touched).
        A malformed request raises ValueError, the ones before it added.
        """
        ring = self._ring
        d16 = self._d16
        free_ids = self._free_ids
        tokens = self._tokens
        slots = self._slots
        wlens = self._wlen
        size = self.size
        pos = self._next_avail
        avail_flags = self._avail_flags
        num_free = start_free = self._num_free  # slots added = start_free - num_free
        count = 0
        try:
            for readable, writable, token in requests:
                if len(readable) + len(writable) == 1 and num_free:
                    # The fast path of add, inline: see there.
                    if readable:
                        addr, length = readable[0]
                        flags = avail_flags
                        wlen = 0
                    else:
                        addr, length = writable[0]
                        flags = avail_flags + DESC_F_WRITE
                        wlen = length
                    bid = free_ids.pop()
                    try:
                        _pack_desc_head(ring, pos * 16, addr, length, bid)
                    except struct.error as exc:
                        free_ids.append(bid)
                        raise ValueError(f"invalid buffer ({addr!r}, {length!r}): {exc}") from exc
                    tokens[bid] = token
                    slots[bid] = 1
                    wlens[bid] = wlen
                    d16[pos * 8 + 7] = flags  # publishes the descriptor
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= _AVAIL_USED
                    num_free -= 1
                else:
                    # Chains, indirect tables and errors: as add does.
                    self._next_avail = pos
                    if avail_flags != self._avail_flags:
                        self._avail_flags = avail_flags
                        self._avail_wrap ^= 1
                    self._num_free = num_free
                    self._added_since_kick += start_free - num_free
                    start_free = num_free
                    try:
                        self._add_slow(readable, writable, token)
                    except QueueFullError:
                        break
                    pos = self._next_avail
                    avail_flags = self._avail_flags
                    num_free = start_free = self._num_free
                count += 1
        finally:
            self._next_avail = pos
            if avail_flags != self._avail_flags:
                self._avail_flags = avail_flags
                self._avail_wrap ^= 1
            self._num_free = num_free
            self._added_since_kick += start_free - num_free
        return count

    def _add_slow(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object,
    ) -> None:
        """Several elements (a chain or an indirect table), or the error cases.

        Nothing the device can see changes until the head's flags are
        stored, so a bad element found midway leaves the queue as it was.
        """
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("a buffer needs at least one element")
        indirect = 1 < n <= self.max_indirect
        slots = 1 if indirect else n
        if slots > self.size:
            raise ValueError(f"{n} descriptors can never fit a queue of size {self.size}")
        if slots > self._num_free:
            raise QueueFullError(f"{slots} ring descriptors needed, {self._num_free} free")
        size = self.size
        d16, d32, d64 = self._d16, self._d32, self._d64
        bid = self._free_ids[-1]
        head = self._next_avail
        head_flags = self._avail_flags
        try:
            if indirect:
                wlen = self._write_table(bid, readable, writable)
                d64[head * 2] = self._indirect_base + bid * self.max_indirect * DESC_SIZE
                d32[head * 4 + 2] = n * DESC_SIZE
                d16[head * 8 + 6] = bid
                avail_flags = head_flags
                head_flags += DESC_F_INDIRECT
                pos = head + 1
                if pos == size:
                    pos = 0
                    avail_flags ^= _AVAIL_USED
            else:
                # packed-ring.tex, "Placing Available Buffers Into The
                # Descriptor Ring": all but the head are written whole, each
                # with NEXT but the last; the head's flags wait for the end.
                # Flags as literals: 1 NEXT, 2 WRITE, 3 WRITE|NEXT.
                ring = self._ring
                wlen = 0
                pos = head
                avail_flags = head_flags
                remaining = n
                for addr, length in readable:
                    remaining -= 1
                    if pos == head:
                        _pack_desc_head(ring, pos * 16, addr, length, bid)
                    else:
                        flags = avail_flags + 1 if remaining else avail_flags
                        _pack_desc(ring, pos * 16, addr, length, bid, flags)
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= _AVAIL_USED
                for addr, length in writable:
                    remaining -= 1
                    if pos == head:
                        _pack_desc_head(ring, pos * 16, addr, length, bid)
                    else:
                        flags = avail_flags + 3 if remaining else avail_flags + 2
                        _pack_desc(ring, pos * 16, addr, length, bid, flags)
                    wlen += length
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= _AVAIL_USED
                head_flags += DESC_F_NEXT if readable else DESC_F_NEXT + DESC_F_WRITE
        except (ValueError, OverflowError, TypeError, struct.error) as exc:
            raise ValueError(f"invalid buffer element: {exc}") from exc
        self._free_ids.pop()
        self._tokens[bid] = token
        self._slots[bid] = slots
        self._wlen[bid] = wlen
        # packed-ring.tex, "Updating flags": the head's flags go last.
        d16[head * 8 + 7] = head_flags
        self._next_avail = pos
        if avail_flags != self._avail_flags:
            self._avail_flags = avail_flags
            self._avail_wrap ^= 1
        self._num_free -= slots
        self._added_since_kick += slots

    def _write_table(
        self,
        bid: int,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
    ) -> int:
        """Fill buffer ID ``bid``'s indirect table; returns the writable byte count.

        Only WRITE may be set in a table entry (packed-ring.tex, "Indirect
        Descriptors", driver requirements).
        """
        t16, t32, t64 = self._t16, self._t32, self._t64
        assert t16 is not None and t32 is not None and t64 is not None
        k = bid * self.max_indirect
        for addr, length in readable:
            t64[k * 2] = addr
            t32[k * 4 + 2] = length
            t16[k * 8 + 6] = 0
            t16[k * 8 + 7] = 0
            k += 1
        wlen = 0
        for addr, length in writable:
            t64[k * 2] = addr
            t32[k * 4 + 2] = length
            t16[k * 8 + 6] = 0
            t16[k * 8 + 7] = DESC_F_WRITE
            wlen += length
            k += 1
        return wlen

    def kick_needed(self) -> bool:
        """Whether to send an available buffer notification; resets the count since the last.

        Reads the device event suppression structure after a full barrier
        (packed-ring.tex, "Sending Available Buffer Notifications"); see
        :func:`_need_event` for the DESC comparison.
        """
        _full_barrier()
        dev16 = self._dev16
        flags = dev16[1]
        off_wrap = dev16[0]  # after flags: at least as new as the DESC it goes with
        count = self._added_since_kick
        self._added_since_kick = 0
        return _need_event(
            flags, off_wrap, self.event_idx, self._next_avail, self._avail_wrap, count, self.size
        )

    # -- used buffers -----------------------------------------------------------

    def _fail(self, message: str) -> VirtqueueError:
        self.broken = True
        return VirtqueueError(message)

    def _used_ready(self) -> bool:
        if self._num_free == self.size:
            return False  # nothing in flight: whatever the ring holds is not ours
        flags = self._d16[self._next_used * 8 + 7]
        return (flags & _AVAIL_USED) == self._used_expect

    def used(self) -> Iterator[tuple[object, int]]:
        """Yield ``(token, written)`` for each buffer the device returned.

        packed-ring.tex, "Receiving Used Buffers From The Device": a used
        descriptor has AVAIL == USED == the driver's used wrap counter; its
        flags are read before its ID and length, and the position then skips
        the ring slots the buffer took.  ``written`` is the descriptor's
        length ("Element Address and Length"); with WRITE set it must fit
        the buffer, without it (as QEMU 7.2 sends) it is capped to fit.
        """
        if self.broken:
            raise VirtqueueError("packed virtqueue is broken; the device needs a reset")
        d16 = self._d16
        ring = self._ring
        size = self.size
        slots = self._slots
        tokens = self._tokens
        wlens = self._wlen
        free_ids = self._free_ids
        while self._num_free != size:
            pos = self._next_used
            flags = d16[pos * 8 + 7]
            expect = self._used_expect
            # Compares first (CPython 3.11 specialises them, not ``&``): a used
            # descriptor nearly always has exactly AVAIL|USED, maybe WRITE.
            if flags == expect:
                write = False
            elif flags == expect + 2:  # + DESC_F_WRITE
                write = True
            elif (flags & _AVAIL_USED) == expect:
                write = bool(flags & DESC_F_WRITE)
            else:
                return
            length, bid = _unpack_used(ring, pos * 16 + 8)  # after the flags
            n = slots[bid] if bid < size else 0
            if not n:
                raise self._fail(
                    f"device returned buffer ID {bid} at {pos}, which is not in flight"
                )
            wlen = wlens[bid]
            if write:
                if length > wlen:
                    raise self._fail(
                        f"device wrote {length} bytes into buffer ID {bid} of {wlen} writable bytes"
                    )
                written = length
            else:
                # Devices such as QEMU 7.2's leave WRITE clear in used
                # descriptors; like Linux, take the length anyway, capped at
                # what the buffer offered.
                written = length if length < wlen else wlen
            token = tokens[bid]
            tokens[bid] = None
            slots[bid] = 0
            free_ids.append(bid)
            pos += n
            if pos >= size:
                pos -= size
                self._used_wrap ^= 1
                self._used_expect ^= _AVAIL_USED
            self._next_used = pos
            self._num_free += n
            if self._track_used_event:
                # Move the event to the next used descriptor we expect, or the
                # device would never pass it again (Linux does the same).
                self._drv16[0] = pos + self._used_wrap * 0x8000
            yield token, written

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications; True if buffers were used meanwhile.

        With EVENT_IDX: DESC at the next used position and wrap counter
        (offset stored before the flags); otherwise ENABLE.  The re-check
        after a full barrier is the spec's guard against a lost notification
        (packed-ring.tex, "Receiving Used Buffers From The Device").
        """
        drv16 = self._drv16
        if self.event_idx:
            drv16[0] = self._next_used + self._used_wrap * 0x8000
            drv16[1] = RING_EVENT_FLAGS_DESC
            self._set_irq_flags(RING_EVENT_FLAGS_DESC)
        else:
            drv16[1] = RING_EVENT_FLAGS_ENABLE
            self._set_irq_flags(RING_EVENT_FLAGS_ENABLE)
        _full_barrier()
        return self._used_ready()

    def disable_interrupts(self) -> None:
        """Tell the device not to send used buffer notifications (a hint)."""
        self._drv16[1] = RING_EVENT_FLAGS_DISABLE
        self._set_irq_flags(RING_EVENT_FLAGS_DISABLE)

    def state(self) -> QueueState:
        """Snapshot of the queue's positions and counters, as a plain dict."""
        return {
            "format": "packed",
            "size": self.size,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "next_avail": self._next_avail,
            "avail_wrap_counter": bool(self._avail_wrap),
            "next_used": self._next_used,
            "used_wrap_counter": bool(self._used_wrap),
            "num_free": self._num_free,
            "in_flight": self.in_flight,
            "added_since_kick": self._added_since_kick,
            "interrupt_flags": self._irq_flags,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "indirect_addr": self.indirect_addr,
            "max_indirect": self.max_indirect,
            "broken": self.broken,
        }
