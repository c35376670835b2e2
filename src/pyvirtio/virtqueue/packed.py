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

import array
import struct
from collections.abc import Iterator, Sequence

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    DescriptorChain,
    QueueFullError,
    QueueState,
    VirtqueueError,
)
from pyvirtio.virtqueue.ring import (
    DESC,
    DESC_SIZE,
    U64_LIMIT,
    StateReader,
    Words,
    area_view,
    check_queue_size,
    full_barrier,
    words,
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

_U32_MAX = 0xFFFF_FFFF
#: The wrap counter's bit in an event suppression ``off_wrap`` (and in the
#: ring positions vhost-user exchanges).
_WRAP_SHIFT = 15
_WRAP_BIT = 1 << _WRAP_SHIFT
_OFF_MASK = _WRAP_BIT - 1

#: A descriptor's NEXT, WRITE and INDIRECT bits, and the values of the first
#: two that hot loops compare with (CPython 3.11 specialises int compares,
#: not ``&``); anything above ``_WRITE_MORE`` has INDIRECT set.
_KIND_MASK = DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT
_READ_LAST = 0
_READ_MORE = DESC_F_NEXT
_WRITE_LAST = DESC_F_WRITE
_WRITE_MORE = DESC_F_WRITE | DESC_F_NEXT

#: One ``struct pvirtq_desc`` (packed-ring.tex, "The Virtqueue Descriptor Format").
_unpack_desc = DESC.unpack_from
_new_object = object.__new__
_pack_desc = DESC.pack_into
#: A descriptor's ``addr``, ``len`` and ``id``: everything but the flags that publish it.
_pack_desc_head = struct.Struct("<QIH").pack_into
#: A used descriptor's ``len`` and ``id``, read after its flags.
_unpack_used = struct.Struct("<IH").unpack_from

#: Batches of at least this many used descriptors are stored with strided
#: slice assignments; below it, their fixed cost outweighs a store per field.
_BULK_MIN = 16


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


def _ring_position(position: object, size: int, what: str) -> int:
    """``position`` as a slot of a ring of ``size``; ValueError otherwise."""
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < size:
        raise ValueError(f"{what} {position!r} is not a position in a ring of {size}")
    return position


def _check_geometry(
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


def _enable_events(area: Words, event_idx: bool, position: int, wrap: int) -> int:
    """Ask the other side for notifications through an event suppression ``area``.

    With EVENT_IDX, DESC at ``position`` and ``wrap`` (the offset stored
    before the flags that make it count); otherwise ENABLE
    (packed-ring.tex, "Event Suppression Structure Format").  Returns the
    flags written.
    """
    if event_idx:
        area[0] = position + wrap * _WRAP_BIT
        area[1] = RING_EVENT_FLAGS_DESC
        return RING_EVENT_FLAGS_DESC
    area[1] = RING_EVENT_FLAGS_ENABLE
    return RING_EVENT_FLAGS_ENABLE


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
        "_ring",
        "_track_avail_event",
        "_used_since_signal",
        "_used_wrap",
        "_window",
        "_window_table",
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
        self._d16 = words(ring, "H")
        self._d32 = words(ring, "I")
        self._d64 = words(ring, "Q")
        self._drv16 = words(drv, "H")  # read only: [0] off_wrap, [1] flags
        self._dev16 = words(dev, "H")  # written by us
        self._next_used = 0
        self._used_wrap = 1
        self._set_avail(0, 1)
        self._used_since_signal = 0  # ring slots used since needs_notification()
        self._set_notify_flags(RING_EVENT_FLAGS_ENABLE)
        # Buffers are checked inline against the largest region (pop).
        self._window = GuestMemory.NO_WINDOW
        # Its fields, in slots for the hot path (NamedTuple fields load slower).
        self._window_table: object = None
        self._lo = 1
        self._hi = 0

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

        The one descriptor walker of the packed format: a chain of
        NEXT-linked ring descriptors, or one INDIRECT descriptor whose table
        is flattened (packed-ring.tex, "Scatter-Gather Support" and
        "Indirect Flag").  ``chain.head`` is the buffer ID, which the driver
        stores in the last descriptor of a chain ("Next Flag: Descriptor
        Chaining"); ``chain.ring_slots`` is how many ring descriptors it took.
        """
        if self.broken:
            raise VirtqueueError("packed virtqueue is broken; the device needs a reset")
        head = self._next_avail
        d16 = self._d16
        # Flags first: they publish the rest of the descriptor.
        flags = d16[head * 8 + 7]
        expect = self._avail_expect
        if (flags & _AVAIL_USED) != expect:
            return None
        try:
            size = self.size
            ring = self._ring
            mem = self._mem
            # Buffers inside the largest region are checked inline against
            # its window, while the window is current (GuestMemory.window).
            if self._window_table is not mem.regions:
                self._take_window()
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
                addr, length, bid, _ = _unpack_desc(ring, pos * DESC_SIZE)
                kind = flags & _KIND_MASK
                if kind > _WRITE_MORE:  # DESC_F_INDIRECT
                    if not self.indirect:
                        raise self._fail(
                            f"descriptor {pos}: INDIRECT flag but VIRTIO_F_INDIRECT_DESC "
                            "was not negotiated"
                        )
                    if slots > 1 or kind & DESC_F_NEXT:
                        raise self._fail(
                            f"descriptor {pos}: INDIRECT descriptor in a NEXT-linked chain"
                        )
                    readable_len, writable_len = self._walk_indirect(
                        pos, addr, length, readable, writable
                    )
                    break
                if addr < lo or addr + length > hi:
                    self._check_range(addr, length, pos)
                if kind >= _WRITE_LAST:
                    writable.append((addr, length))
                    writable_len += length
                    if kind == _WRITE_LAST:
                        break
                elif writable:
                    raise self._fail(
                        f"descriptor chain at {head}: readable descriptor {pos} after a "
                        "writable one"
                    )
                else:
                    readable.append((addr, length))
                    readable_len += length
                    if kind == _READ_LAST:
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
        except VirtqueueError:
            self.broken = True
            raise
        except (GuestMemoryError, struct.error, IndexError, ValueError, OverflowError) as exc:
            raise self._fail(f"descriptor chain at {head}: {exc}") from exc
        pos = head + slots
        if pos >= size:
            self._set_avail(pos - size, self._avail_wrap ^ 1)
        else:
            self._next_avail = pos
        if self._track_avail_event:
            # Keep asking for the descriptor after the ones consumed, or the
            # driver's next additions would pass the old offset unnoticed.
            self._dev16[0] = self._next_avail + self._avail_wrap * _WRAP_BIT
        # The chain builder: slots filled directly (the buffer ID is in the
        # last descriptor of the list); a Python-level __init__ call costs as
        # much as the rest of a one-descriptor pop.  The chain-shape tests
        # keep this in step with DescriptorChain.__slots__.
        chain: DescriptorChain = _new_object(DescriptorChain)
        chain.mem = mem
        chain.head = bid
        chain.readable = readable
        chain.writable = writable
        chain.readable_len = readable_len
        chain.writable_len = writable_len
        chain.ring_slots = slots
        return chain

    def _take_window(self) -> None:
        """The region table changed: check buffers against its largest region from now on."""
        window = self._window = self._mem.largest_window()
        self._window_table = window.table
        self._lo = window.base
        self._hi = window.end

    def _fail(self, message: str) -> VirtqueueError:
        self.broken = True
        return VirtqueueError(message)

    def _check_range(self, addr: int, length: int, pos: int) -> None:
        """The slow bounds check, for buffers outside the cached region window."""
        end = addr + length
        if end > U64_LIMIT:
            raise self._fail(
                f"descriptor {pos}: buffer {addr:#x}+{length:#x} overflows the address space"
            )
        if not self._mem.is_valid(addr, length):
            raise self._fail(
                f"descriptor {pos}: buffer [{addr:#x}, {end:#x}) is outside guest memory"
            )

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
        window = self._window  # made current by pop
        lo = window.base
        hi = window.end
        table: bytes | memoryview
        if lo <= addr and addr + length <= hi:
            # Zero copy from the window's region; each entry is read once.
            table = window.view[addr - lo : addr - lo + length]
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
        for index, (baddr, blen, _id, bflags) in enumerate(DESC.iter_unpack(table)):
            # Only WRITE is valid in a table entry; NEXT and the ID are ignored.
            if bflags & DESC_F_INDIRECT:
                raise self._fail(
                    f"descriptor {pos}: indirect table entry {index} is itself INDIRECT"
                )
            if baddr < lo or baddr + blen > hi:
                self._check_range(baddr, blen, pos)
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
        full_barrier()  # used descriptors visible before reading the driver's area
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
        self._set_notify_flags(
            _enable_events(self._dev16, self.event_idx, self._next_avail, self._avail_wrap)
        )
        full_barrier()
        return self.has_available()

    def disable_notifications(self) -> None:
        """Tell the driver not to send available buffer notifications (a hint)."""
        self._dev16[1] = RING_EVENT_FLAGS_DISABLE
        self._set_notify_flags(RING_EVENT_FLAGS_DISABLE)

    # -- ring positions, for hosts (vhost-user SET_VRING_BASE / GET_VRING_BASE) --

    @property
    def next_avail(self) -> int:
        """Ring position of the next descriptor :meth:`pop` will look at."""
        return self._next_avail

    @property
    def avail_wrap_counter(self) -> bool:
        """The driver ring wrap counter as the device tracks it (starts True)."""
        return bool(self._avail_wrap)

    @property
    def next_used(self) -> int:
        """Ring position the next used descriptor will be written to."""
        return self._next_used

    @property
    def used_wrap_counter(self) -> bool:
        """The device ring wrap counter (starts True)."""
        return bool(self._used_wrap)

    def set_next_avail(self, position: int, wrap_counter: bool) -> None:
        """Resume popping at ring ``position`` with the driver wrap counter ``wrap_counter``.

        What a host does when told where the driver's buffers continue
        (vhost-user SET_VRING_BASE: position in bits 0..14, wrap counter in
        bit 15 for packed rings).  ValueError for a position outside the ring.
        """
        self._set_avail(_ring_position(position, self.size, "next_avail"), int(bool(wrap_counter)))

    def set_next_used(self, position: int, wrap_counter: bool) -> None:
        """Resume completing at ring ``position`` with device wrap counter ``wrap_counter``.

        The notification count restarts there.
        """
        self._next_used = _ring_position(position, self.size, "next_used")
        self._used_wrap = int(bool(wrap_counter))
        self._used_since_signal = 0

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
        fields = StateReader(state)
        if state.get("format", "packed") != "packed":
            raise VirtqueueError(f"invalid packed queue state: format {state['format']!r}")
        queue = cls(
            mem,
            fields.integer("size"),
            fields.integer("desc_addr"),
            fields.integer("driver_addr"),
            fields.integer("device_addr"),
            event_idx=fields.flag("event_idx"),
            indirect=fields.flag("indirect"),
        )
        size = queue.size
        next_avail = fields.integer("next_avail")
        next_used = fields.integer("next_used")
        avail_wrap = int(fields.flag("avail_wrap_counter"))
        used_wrap = int(fields.flag("used_wrap_counter"))
        used_since_signal = fields.integer("used_since_signal")
        notify_flags = fields.integer("notify_flags")
        broken = fields.flag("broken")
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
        self._setup(
            mem,
            size,
            desc_addr,
            driver_addr,
            device_addr,
            event_idx=event_idx,
            indirect=indirect,
            indirect_addr=indirect_addr,
            max_indirect=max_indirect,
        )
        # "The descriptor ring is zero-initialized" (packed-ring.tex, "The
        # Virtqueue Descriptor Format"); zeroed event areas mean ENABLE.
        for addr, length in zip(
            (desc_addr, driver_addr, device_addr), area_sizes(size), strict=True
        ):
            mem.fill(addr, length, 0)

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> PackedDriverQueue:
        """Rebuild an idle queue (nothing in flight) from :meth:`state`.

        Guest memory is not touched, unlike the constructor, which zeroes the
        ring: the ring is expected to be where the state says.  Tokens are
        arbitrary objects and not part of the state, hence the idle rule.
        """
        fields = StateReader(state)
        if state.get("format", "packed") != "packed":
            raise VirtqueueError(f"invalid packed queue state: format {state['format']!r}")
        if fields.integer("in_flight") != 0:
            raise ValueError("only a queue with nothing in flight can be rebuilt from state")
        indirect = fields.flag("indirect")
        max_indirect = fields.integer("max_indirect")
        queue = cls.__new__(cls)
        queue._setup(
            mem,
            fields.integer("size"),
            fields.integer("desc_addr"),
            fields.integer("driver_addr"),
            fields.integer("device_addr"),
            event_idx=fields.flag("event_idx"),
            indirect=indirect,
            indirect_addr=fields.integer("indirect_addr") if indirect and max_indirect else None,
            max_indirect=max_indirect,
        )
        size = queue.size
        queue._next_avail = _ring_position(fields.integer("next_avail"), size, "next_avail")
        queue._avail_wrap = int(fields.flag("avail_wrap_counter"))
        queue._avail_flags = DESC_F_AVAIL if queue._avail_wrap else DESC_F_USED
        queue._next_used = _ring_position(fields.integer("next_used"), size, "next_used")
        queue._used_wrap = int(fields.flag("used_wrap_counter"))
        queue._used_expect = _AVAIL_USED if queue._used_wrap else 0
        if (queue._next_avail, queue._avail_wrap) != (queue._next_used, queue._used_wrap):
            raise ValueError("queue state has next_avail != next_used but nothing in flight")
        queue._added_since_kick = fields.integer("added_since_kick")
        irq_flags = fields.integer("interrupt_flags", 0, RING_EVENT_FLAGS_DESC)
        queue._set_irq_flags(irq_flags)
        queue.broken = fields.flag("broken")
        return queue

    def _setup(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        indirect_addr: int | None,
        max_indirect: int,
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
        self._t16: Words | None = None
        self._t32: Words | None = None
        self._t64: Words | None = None
        if max_indirect:
            if indirect_addr is None:
                raise VirtqueueError("indirect tables need indirect_addr")
            table = area_view(
                mem,
                "indirect table area",
                indirect_addr,
                indirect_area_size(size, max_indirect),
                DESC_ALIGN,
            )
            self._t16 = words(table, "H")
            self._t32 = words(table, "I")
            self._t64 = words(table, "Q")
        self._ring = ring  # bytes, for packing a descriptor's fields at once
        self._d16 = words(ring, "H")
        self._d32 = words(ring, "I")
        self._d64 = words(ring, "Q")
        self._drv16 = words(drv, "H")  # written by us: [0] off_wrap, [1] flags
        self._dev16 = words(dev, "H")  # read only
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
        chain.  A request of 2..``max_indirect`` elements takes one ring slot
        and its buffer ID's indirect table instead.  Raises QueueFullError
        when the ring lacks room, ValueError for an empty request, one that
        could never fit, or out-of-range fields; nothing the device can see
        changes then.
        """
        n = len(readable) + len(writable)
        indirect = 1 < n <= self.max_indirect
        slots = 1 if indirect else n
        if slots > self._num_free or not n:
            if not n:
                raise ValueError("a buffer needs at least one element")
            if slots > self.size:
                raise ValueError(f"{n} descriptors can never fit a queue of size {self.size}")
            raise QueueFullError(f"{slots} ring descriptors needed, {self._num_free} free")
        size = self.size
        bid = self._free_ids[-1]
        head = self._next_avail
        head_flags = self._avail_flags
        try:
            if indirect:
                wlen = self._write_table(bid, readable, writable)
                _pack_desc_head(
                    self._ring,
                    head * DESC_SIZE,
                    self._indirect_base + bid * self.max_indirect * DESC_SIZE,
                    n * DESC_SIZE,
                    bid,
                )
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
                ring = self._ring
                wlen = 0
                pos = head
                avail_flags = head_flags
                remaining = n
                for addr, length in readable:
                    remaining -= 1
                    if pos == head:
                        _pack_desc_head(ring, pos * DESC_SIZE, addr, length, bid)
                        if remaining:
                            head_flags += _READ_MORE
                    else:
                        flags = avail_flags + _READ_MORE if remaining else avail_flags
                        _pack_desc(ring, pos * DESC_SIZE, addr, length, bid, flags)
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= _AVAIL_USED
                for addr, length in writable:
                    remaining -= 1
                    if pos == head:
                        _pack_desc_head(ring, pos * DESC_SIZE, addr, length, bid)
                        head_flags += _WRITE_MORE if remaining else _WRITE_LAST
                    else:
                        flags = avail_flags + (_WRITE_MORE if remaining else _WRITE_LAST)
                        _pack_desc(ring, pos * DESC_SIZE, addr, length, bid, flags)
                    wlen += length
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= _AVAIL_USED
        except (ValueError, OverflowError, TypeError, struct.error) as exc:
            raise ValueError(f"invalid buffer element: {exc}") from exc
        self._free_ids.pop()
        self._tokens[bid] = token
        self._slots[bid] = slots
        self._wlen[bid] = wlen
        # packed-ring.tex, "Updating flags": the head's flags go last.
        self._d16[head * 8 + 7] = head_flags
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
        full_barrier()
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

    def has_used(self) -> bool:
        """Whether :meth:`used` would yield something (or raise)."""
        return self.broken or self._used_ready()

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
                self._drv16[0] = pos + self._used_wrap * _WRAP_BIT
            yield token, written

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications; True if buffers were used meanwhile.

        With EVENT_IDX: DESC at the next used position and wrap counter
        (offset stored before the flags); otherwise ENABLE.  The re-check
        after a full barrier is the spec's guard against a lost notification
        (packed-ring.tex, "Receiving Used Buffers From The Device").
        """
        self._set_irq_flags(
            _enable_events(self._drv16, self.event_idx, self._next_used, self._used_wrap)
        )
        full_barrier()
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
