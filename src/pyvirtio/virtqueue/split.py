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
    ring_need_event,
)
from pyvirtio.virtqueue.ring import (
    CHAIN_BYTES_LIMIT,
    DESC,
    DESC_SIZE,
    U64_LIMIT,
    StateReader,
    Words,
    area_view,
    check_queue_size,
    full_barrier,
    read_span,
    words,
    write_span,
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

#: Alignment of each area (split-ring.tex, "Split Virtqueues", alignment table).
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

#: Available ring flag: the driver asks for no used-buffer notifications.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: Used ring flag: the device asks for no available-buffer notifications.
VIRTQ_USED_F_NO_NOTIFY = 1

_unpack_desc = DESC.unpack_from
_new_object = object.__new__
_pack_desc = DESC.pack_into
#: Most descriptors an indirect table may hold (as many as the largest queue).
_MAX_INDIRECT_DESCS = MAX_QUEUE_SIZE

#: The four values of a descriptor's NEXT and WRITE bits.  Hot loops compare
#: flags with these (CPython 3.11 specialises int compares, not ``&``) after
#: INDIRECT and the reserved bits are dealt with.
_READ_LAST = 0
_READ_MORE = DESC_F_NEXT
_WRITE_LAST = DESC_F_WRITE
_WRITE_MORE = DESC_F_WRITE | DESC_F_NEXT

#: Batches of at least this many used elements are read or written with one
#: slice per lap of the ring; below it, the slice's fixed cost outweighs a
#: store or load per element.
_BULK_MIN = 8


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring for ``size``.

    The ring sizes include the ``used_event``/``avail_event`` trailer whether
    or not VIRTIO_F_EVENT_IDX is negotiated, as the spec's table does
    (split-ring.tex, "Split Virtqueues").
    """
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def indirect_area_size(size: int, max_indirect: int) -> int:
    """Bytes a :class:`SplitDriverQueue` needs for its indirect tables.

    One table of ``max_indirect`` descriptors per head slot, so a table is
    owned by exactly one in-flight request and needs no allocator.
    """
    return size * max_indirect * DESC_SIZE


def _check_layout(
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


def _ring_index(index: object, what: str) -> int:
    """``index`` as a 16-bit ring index; ValueError otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF:
        raise ValueError(f"{what} {index!r} is not a 16-bit ring index")
    return index


def _check_buffer(mem: GuestMemory, addr: int, length: int, where: int | str) -> None:
    """The slow bounds check, for buffers outside the cached region window."""
    if addr + length > U64_LIMIT:
        raise VirtqueueError(f"descriptor {where}: buffer {addr:#x}+{length:#x} overflows 2**64")
    if length and not mem.is_valid(addr, length):
        raise VirtqueueError(
            f"descriptor {where}: buffer [{addr:#x}, {addr + length:#x}) is outside guest memory"
        )


# -- device side ----------------------------------------------------------------


class SplitDeviceQueue:
    """The device side of a split virtqueue.

    Reads the descriptor table and available ring, writes the used ring
    (split-ring.tex, "The Virtqueue Used Ring").  Sans-IO: the owner turns
    :meth:`needs_notification` into an interrupt and calls :meth:`pop` when
    the driver notifies.

    ``event_idx`` and ``indirect`` are the negotiated VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC features (content.tex, "Reserved Feature Bits").
    Each ring area must lie inside one guest memory region (it is accessed
    through one view); buffers may be anywhere in guest memory, even across
    contiguous regions.

    With EVENT_IDX, :meth:`pop` keeps ``avail_event`` just past the last
    chain taken (as QEMU does) while notifications are enabled, so a device
    that simply pops on every notification never misses one.
    """

    __slots__ = (
        "_avail",
        "_avail_event",
        "_avail_ring",
        "_desc",
        "_heads",
        "_hi",
        "_lo",
        "_mask",
        "_next_avail",
        "_next_used",
        "_notify_enabled",
        "_signalled_used",
        "_track_avail_event",
        "_used",
        "_used_ring",
        "_window",
        "_window_table",
        "broken",
        "desc_addr",
        "device_addr",
        "driver_addr",
        "event_idx",
        "indirect",
        "mem",
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
        desc, avail, used = _check_layout(mem, size, desc_addr, driver_addr, device_addr)
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.broken = False
        self._mask = size - 1
        self._desc = desc
        # Available ring as u16 slots: flags 0, idx 1, ring 2.., used_event 2+size;
        # the ring entries alone, indexed by ``idx & mask``.
        self._avail = words(avail, "H")
        self._avail_ring = words(avail[4 : 4 + 2 * size], "H")
        # Used ring as u16 slots (flags 0, idx 1, avail_event 2+4*size), its
        # elements as u32 pairs (id, len) from byte 4, and avail_event alone.
        self._used = words(used, "H")
        self._used_ring = words(used[4 : 4 + 8 * size], "I")
        self._avail_event = words(used[4 + 8 * size : 6 + 8 * size], "H")
        self._next_avail = 0
        # Available ring entries read ahead by pop, the next one last.
        self._heads: list[int] = []
        self._next_used = 0
        self._signalled_used = 0
        self._notify_enabled = True
        # pop keeps avail_event current while this is set.
        self._track_avail_event = self.event_idx
        # Buffers are checked inline against the largest region (walk).
        self._window = GuestMemory.NO_WINDOW
        # Its fields, in slots for the hot path (NamedTuple fields load slower).
        self._window_table: object = None
        self._lo = 1
        self._hi = 0

    def __repr__(self) -> str:
        return (
            f"SplitDeviceQueue(size={self.size}, next_avail={self._next_avail}, "
            f"next_used={self._next_used}, broken={self.broken})"
        )

    # -- state ------------------------------------------------------------------

    def state(self) -> QueueState:
        """Everything needed to rebuild this queue over the same guest memory."""
        return {
            "size": self.size,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "next_avail": self._next_avail,
            "next_used": self._next_used,
            "signalled_used": self._signalled_used,
            "notifications_enabled": self._notify_enabled,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "broken": self.broken,
        }

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> SplitDeviceQueue:
        """Rebuild a queue from :meth:`state` (e.g. after migration or snapshot).

        Guest memory is not touched: the rings are wherever the snapshot left
        them.  A malformed state raises VirtqueueError.
        """
        fields = StateReader(state)
        queue = cls(
            mem,
            fields.integer("size"),
            fields.integer("desc_addr"),
            fields.integer("driver_addr"),
            fields.integer("device_addr"),
            event_idx=fields.flag("event_idx"),
            indirect=fields.flag("indirect"),
        )
        queue._next_avail = fields.u16("next_avail")
        queue._next_used = fields.u16("next_used")
        queue._signalled_used = fields.u16("signalled_used")
        queue._notify_enabled = fields.flag("notifications_enabled")
        queue._track_avail_event = queue.event_idx and queue._notify_enabled
        queue.broken = fields.flag("broken")
        return queue

    # -- ring positions, for hosts (vhost-user SET_VRING_BASE / GET_VRING_BASE) --

    @property
    def next_avail(self) -> int:
        """Available-ring index of the next chain :meth:`pop` will take."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, index: int) -> None:
        """Resume popping at available-ring index ``index`` (0..65535).

        What a host does when the ring's owner tells it where the driver's
        buffers continue (vhost-user SET_VRING_BASE).  Chains read ahead from
        the old position are forgotten.
        """
        self._next_avail = _ring_index(index, "next_avail")
        self._heads = []

    @property
    def next_used(self) -> int:
        """Used-ring index the next :meth:`add_used` will fill."""
        return self._next_used

    @next_used.setter
    def next_used(self, index: int) -> None:
        """Resume completing at used-ring index ``index`` (0..65535).

        The notification marker moves with it, so the first completion
        after the move is judged against ``index`` (split-ring.tex, "Used
        Buffer Notification Suppression").
        """
        self._next_used = self._signalled_used = _ring_index(index, "next_used")

    # -- available ring ---------------------------------------------------------

    def has_available(self) -> bool:
        """Whether :meth:`pop` would return a chain (or raise), without consuming it."""
        return self.broken or self._avail[1] != self._next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if there is none.

        The one descriptor walker of the split format: it follows the chain
        from its head (split-ring.tex, "The Virtqueue Descriptor Table"),
        into an indirect table where one ends it ("Indirect Descriptors"),
        and checks every field the driver controls; any malformation raises
        VirtqueueError and breaks the queue.  Reserved flag bits are ignored.
        """
        if self.broken:
            raise VirtqueueError("queue is broken: an earlier malformed chain was reported")
        try:
            next_avail = self._next_avail
            heads = self._heads
            if heads:
                head = heads.pop()
            else:
                # The index is read before the ring entries it covers; x86 does
                # not reorder loads with loads (split-ring.tex, "The Virtqueue
                # Available Ring").
                avail_idx = self._avail[1]
                if avail_idx == next_avail:
                    return None
                pending = (avail_idx - next_avail) & 0xFFFF
                if pending > self.size:
                    raise VirtqueueError(
                        f"available idx {avail_idx} is more than the queue size {self.size} "
                        f"ahead of the last seen idx {next_avail}"
                    )
                if pending < _BULK_MIN:
                    head = self._avail_ring[next_avail & self._mask]
                else:
                    head = self._read_ahead(next_avail, pending)
            size = self.size
            if head >= size:
                raise VirtqueueError(f"available ring head {head} >= queue size {size}")
            mem = self.mem
            # Buffers inside the largest region are checked inline against
            # its window, while the window is current (GuestMemory.window).
            if self._window_table is not mem.regions:
                self._take_window()
            lo = self._lo
            hi = self._hi
            table: memoryview | bytes = self._desc
            entries = size  # descriptors in ``table``, the bound of ``next``
            in_indirect = False
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            rlen = 0
            wlen = 0
            index = head
            count = 1
            addr, length, flags, nxt = _unpack_desc(table, head * DESC_SIZE)
            while True:
                if flags > _WRITE_MORE:
                    if flags & DESC_F_INDIRECT:
                        # The table ends the chain; walk it in place of the ring's.
                        table = self._indirect_table(addr, length, flags, index, in_indirect)
                        entries = length // DESC_SIZE
                        in_indirect = True
                        index = 0
                        count = 1
                        addr, length, flags, nxt = _unpack_desc(table, 0)
                        continue
                    flags &= _WRITE_MORE
                if addr < lo or addr + length > hi:
                    _check_buffer(mem, addr, length, f"indirect {index}" if in_indirect else index)
                if flags >= _WRITE_LAST:
                    writable.append((addr, length))
                    wlen += length
                    if flags == _WRITE_LAST:
                        break
                elif writable:
                    raise VirtqueueError(
                        f"{'indirect ' if in_indirect else ''}descriptor {index}: "
                        "device-readable buffer after a device-writable one"
                    )
                else:
                    readable.append((addr, length))
                    rlen += length
                    if flags == _READ_LAST:
                        break
                if nxt >= entries:
                    if in_indirect:
                        raise VirtqueueError(
                            f"indirect descriptor {index}: next {nxt} >= table size {entries}"
                        )
                    raise VirtqueueError(f"descriptor {index}: next {nxt} >= queue size {size}")
                count += 1
                if count > entries:
                    if in_indirect:
                        raise VirtqueueError(
                            f"indirect chain is longer than its table of {entries} (a loop?)"
                        )
                    raise VirtqueueError(
                        f"descriptor chain from head {head} is longer than the queue size "
                        f"{size} (a loop?)"
                    )
                index = nxt
                addr, length, flags, nxt = _unpack_desc(table, nxt * DESC_SIZE)
            if rlen + wlen > CHAIN_BYTES_LIMIT:
                raise VirtqueueError(
                    f"descriptor chain from head {head} totals {rlen + wlen} bytes, more than 2**32"
                )
            next_avail += 1
            if next_avail == 0x10000:
                next_avail = 0
            self._next_avail = next_avail
            if self._track_avail_event:
                # Keep avail_event just past what we consumed, so the driver
                # notifies for its next buffer (split-ring.tex, "Available
                # Buffer Notification Suppression").
                self._avail_event[0] = next_avail
        except VirtqueueError:
            self.broken = True
            raise
        except (GuestMemoryError, struct.error, IndexError, ValueError, OverflowError) as exc:
            self.broken = True
            raise VirtqueueError(f"malformed virtqueue: {exc}") from exc
        # The chain builder: slots filled directly, a Python-level __init__
        # call costs as much as the rest of a one-descriptor pop.
        # test_popped_chains_match_the_constructor_in_every_slot keeps this
        # in step with DescriptorChain.__slots__.
        chain: DescriptorChain = _new_object(DescriptorChain)
        chain.mem = mem
        chain.head = head
        chain.readable = readable
        chain.writable = writable
        chain.readable_len = rlen
        chain.writable_len = wlen
        chain.ring_slots = 1
        return chain

    def _take_window(self) -> None:
        """The region table changed: check buffers against its largest region from now on."""
        window = self._window = self.mem.largest_window()
        self._window_table = window.table
        self._lo = window.base
        self._hi = window.end

    def _read_ahead(self, next_avail: int, pending: int) -> int:
        """Read the ``pending`` ring entries from ``next_avail``; return the first.

        The others wait in ``_heads`` (next one last) for the following
        pops, so a batch costs one avail idx load and one slice per lap of
        the ring rather than two loads per chain; the idx is read again once
        they are used up.  Each head is still checked when it is popped.
        """
        start = next_avail & self._mask
        stop = start + pending
        ring = self._avail_ring
        if stop <= self.size:
            heads = read_span(ring, start, stop)
        else:  # wraps around the end of the ring
            heads = read_span(ring, start, self.size) + read_span(ring, 0, stop - self.size)
        heads.reverse()
        head = heads.pop()
        self._heads = heads
        return head

    def _indirect_table(
        self, addr: int, length: int, flags: int, index: int, in_indirect: bool
    ) -> memoryview | bytes:
        """The bytes of the indirect table a descriptor points at, after its checks.

        split-ring.tex, "Indirect Descriptors": only with
        VIRTIO_F_INDIRECT_DESC, never with NEXT, never nested, a non-zero
        multiple of 16 bytes.
        """
        if in_indirect:
            raise VirtqueueError(f"indirect descriptor {index} is itself INDIRECT (nested)")
        if flags & DESC_F_NEXT:
            raise VirtqueueError(f"descriptor {index} has both INDIRECT and NEXT flags")
        if not self.indirect:
            raise VirtqueueError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
        if length == 0 or length % DESC_SIZE:
            raise VirtqueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        if length // DESC_SIZE > _MAX_INDIRECT_DESCS:
            raise VirtqueueError(
                f"indirect table of {length // DESC_SIZE} descriptors exceeds {_MAX_INDIRECT_DESCS}"
            )
        window = self._window
        if window.covers(self.mem, addr, length):
            return window.view[addr - window.base : addr - window.base + length]
        _check_buffer(self.mem, addr, length, "(indirect table)")
        return self.mem.read(addr, length)

    # -- used ring --------------------------------------------------------------

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` with ``written`` bytes written into its writable part.

        The element is stored before the used idx that publishes it
        (split-ring.tex, "The Virtqueue Used Ring": "The device MUST set len
        prior to updating the used idx").
        """
        head = chain.head
        if not 0 <= written <= chain.writable_len:
            raise ValueError(
                f"written {written} outside 0..{chain.writable_len} (the chain's writable bytes)"
            )
        if not 0 <= head < self.size:
            raise ValueError(f"chain head {head} is not a descriptor of this queue")
        used_idx = self._next_used
        pos = (used_idx & self._mask) * 2
        ring = self._used_ring
        ring[pos] = head
        ring[pos + 1] = written
        used_idx += 1
        if used_idx == 0x10000:
            used_idx = 0
        self._next_used = used_idx
        self._used[1] = used_idx

    def add_used_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return several chains, publishing them with one used idx store.

        All elements are validated and written first; if one is invalid
        (ValueError) nothing is published.
        """
        count = len(completions)
        if not count:
            return
        size = self.size
        if count > size:
            raise ValueError(f"{count} chains returned at once to a queue of {size}")
        used_idx = self._next_used
        ring = self._used_ring
        pos = (used_idx & self._mask) * 2
        if count < _BULK_MIN:
            # A few elements: store each in place.
            end = 2 * size
            for chain, written in completions:
                head = chain.head
                if not 0 <= written <= chain.writable_len:
                    raise ValueError(
                        f"written {written} outside 0..{chain.writable_len} "
                        "(the chain's writable bytes)"
                    )
                if not 0 <= head < size:
                    raise ValueError(f"chain head {head} is not a descriptor of this queue")
                ring[pos] = head
                ring[pos + 1] = written
                pos += 2
                if pos == end:
                    pos = 0
        else:
            # Many: gather the (id, len) u32 pairs, then store them with one
            # slice assignment per lap of the ring.
            values: list[int] = []
            for chain, written in completions:
                head = chain.head
                if not 0 <= written <= chain.writable_len:
                    raise ValueError(
                        f"written {written} outside 0..{chain.writable_len} "
                        "(the chain's writable bytes)"
                    )
                if not 0 <= head < size:
                    raise ValueError(f"chain head {head} is not a descriptor of this queue")
                values.append(head)
                values.append(written)
            room = 2 * size - pos
            if len(values) <= room:
                write_span(ring, pos, values)
            else:
                write_span(ring, pos, values[:room])
                write_span(ring, 0, values[room:])
        used_idx = (used_idx + count) & 0xFFFF
        self._next_used = used_idx
        self._used[1] = used_idx

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now.

        split-ring.tex, "Used Buffer Notification Suppression": with
        EVENT_IDX, notify when the used idx moved past ``used_event`` since
        the last check; without it, unless the driver set
        VIRTQ_AVAIL_F_NO_INTERRUPT.  False when nothing was used since the
        last check.  Records the used idx as checked.
        """
        full_barrier()  # publish used idx before reading the driver's fields
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            return ring_need_event(self._avail[2 + self.size], new, old)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notifications(self) -> bool:
        """Ask the driver for available-buffer notifications again.

        Returns True if unconsumed buffers are already available, which the
        caller must process since no notification will come for them
        (split-ring.tex, "Available Buffer Notification Suppression").
        """
        self._notify_enabled = True
        self._track_avail_event = self.event_idx
        if self.event_idx:
            self._avail_event[0] = self._next_avail
        else:
            self._used[0] = 0
        full_barrier()
        return self._avail[1] != self._next_avail

    def disable_notifications(self) -> None:
        """Tell the driver that available-buffer notifications are not needed.

        Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY; with it the flags
        must stay 0, so ``avail_event`` is simply no longer advanced.
        """
        self._notify_enabled = False
        self._track_avail_event = False
        if not self.event_idx:
            self._used[0] = VIRTQ_USED_F_NO_NOTIFY


# -- driver side ----------------------------------------------------------------


class SplitDriverQueue:
    """The driver side of a split virtqueue.

    Writes descriptors and the available ring, reads the used ring
    (split-ring.tex, "Supplying Buffers to The Device" and "Receiving Used
    Buffers From The Device").  Free descriptors are kept on a private list,
    not in the guest's ``next`` fields, so a device that scribbles on the
    table cannot corrupt it; completions may arrive in any order.

    With ``indirect``, a request of 2..``max_indirect`` buffers takes one ring
    descriptor pointing at the table reserved for its head slot in the area at
    ``indirect_addr`` (see :func:`indirect_area_size`).
    """

    __slots__ = (
        "_avail",
        "_avail_idx",
        "_avail_ring",
        "_desc",
        "_free_head",
        "_ind_cache",
        "_ind_stride",
        "_ind_view",
        "_info",
        "_interrupts_enabled",
        "_kick_marker",
        "_last_used",
        "_mask",
        "_next",
        "_num_free",
        "_track_used_event",
        "_used",
        "_used_event",
        "_used_ring",
        "broken",
        "desc_addr",
        "device_addr",
        "driver_addr",
        "event_idx",
        "indirect",
        "indirect_addr",
        "max_indirect",
        "mem",
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
        # split-ring.tex, "Available Buffer Notification Suppression": the driver
        # initialises the used ring's flags to 0; idx fields start at 0 too.
        for addr, length in zip(
            (desc_addr, driver_addr, device_addr), area_sizes(size), strict=True
        ):
            mem.fill(addr, length, 0)

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
        desc, avail, used = _check_layout(mem, size, desc_addr, driver_addr, device_addr)
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.broken = False
        self._mask = size - 1
        self._desc = desc
        self._avail = words(avail, "H")
        self._avail_ring = words(avail[4 : 4 + 2 * size], "H")
        self._used_event = words(avail[4 + 2 * size : 6 + 2 * size], "H")
        self._used = words(used, "H")
        self._used_ring = words(used[4 : 4 + 8 * size], "I")
        self._ind_view: memoryview | None = None
        self._ind_stride = 0
        self.indirect_addr = 0
        self.max_indirect = 0
        if self.indirect:
            if indirect_addr is None:
                raise ValueError("indirect=True needs indirect_addr")
            if not 1 <= max_indirect <= _MAX_INDIRECT_DESCS:
                raise ValueError(f"max_indirect {max_indirect} outside 1..{_MAX_INDIRECT_DESCS}")
            if indirect_addr % DESC_ALIGN:
                raise VirtqueueError(f"indirect area {indirect_addr:#x} is not 16-byte aligned")
            length = indirect_area_size(size, max_indirect)
            try:
                self._ind_view = mem.view(indirect_addr, length)
            except GuestMemoryError as exc:
                raise VirtqueueError(
                    f"indirect area [{indirect_addr:#x}, {indirect_addr + length:#x}) is not "
                    f"inside one guest memory region: {exc}"
                ) from exc
            self.indirect_addr = indirect_addr
            self.max_indirect = max_indirect
            self._ind_stride = max_indirect * DESC_SIZE
        # Free descriptors form a private singly linked list; a chain is always
        # taken from its front, so the chain's next links are the list's.
        self._next = [*range(1, size), 0]
        self._free_head = 0
        self._num_free = size
        # Per head slot: None when free, else (token, last descriptor of the
        # chain, descriptors the chain holds, writable bytes it offered).
        self._info: list[tuple[object, int, int, int] | None] = [None] * size
        self._ind_cache: list[tuple[tuple[int, int], tuple[int, int]] | None] = [None] * size
        self._avail_idx = 0
        self._last_used = 0
        self._kick_marker = 0
        self._interrupts_enabled = True
        # used() keeps used_event current while this is set.
        self._track_used_event = self.event_idx

    def __repr__(self) -> str:
        return (
            f"SplitDriverQueue(size={self.size}, avail_idx={self._avail_idx}, "
            f"last_used={self._last_used}, in_flight={self.in_flight})"
        )

    # -- state ------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Descriptors free for new requests."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Requests added and not yet returned by :meth:`used`."""
        # Every add advances the avail idx and every returned request the
        # last-used idx, and at most ``size`` can be in flight.
        return (self._avail_idx - self._last_used) & 0xFFFF

    def state(self) -> QueueState:
        """The queue's indices and configuration, as a plain dict.

        Tokens are arbitrary objects and are not included, so only a queue
        with nothing in flight can be rebuilt with :meth:`from_state`.
        """
        return {
            "size": self.size,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "indirect_addr": self.indirect_addr,
            "max_indirect": self.max_indirect,
            "avail_idx": self._avail_idx,
            "last_used": self._last_used,
            "kick_marker": self._kick_marker,
            "interrupts_enabled": self._interrupts_enabled,
            "num_free": self._num_free,
            "in_flight": self.in_flight,
            "broken": self.broken,
        }

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> SplitDriverQueue:
        """Rebuild an idle queue (nothing in flight) from :meth:`state`.

        Guest memory is not touched, unlike the constructor, which zeroes the
        rings: the rings' indices are expected to be where the state says.
        """
        fields = StateReader(state)
        if fields.integer("in_flight") != 0:
            raise ValueError("only a queue with nothing in flight can be rebuilt from state")
        indirect = fields.flag("indirect")
        queue = cls.__new__(cls)
        queue._setup(
            mem,
            fields.integer("size"),
            fields.integer("desc_addr"),
            fields.integer("driver_addr"),
            fields.integer("device_addr"),
            event_idx=fields.flag("event_idx"),
            indirect=indirect,
            indirect_addr=fields.integer("indirect_addr") if indirect else None,
            max_indirect=fields.integer("max_indirect") if indirect else 0,
        )
        queue._avail_idx = fields.u16("avail_idx")
        queue._last_used = fields.u16("last_used")
        queue._kick_marker = fields.u16("kick_marker")
        queue._interrupts_enabled = fields.flag("interrupts_enabled")
        queue._track_used_event = queue.event_idx and queue._interrupts_enabled
        queue.broken = fields.flag("broken")
        if queue.in_flight:
            raise ValueError("queue state has avail_idx != last_used but nothing in flight")
        return queue

    # -- available ring ---------------------------------------------------------

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object,
    ) -> None:
        """Expose a request of device-readable then device-writable buffers.

        ``readable`` and ``writable`` are ``(guest address, length)`` lists.
        Raises QueueFullError when too few descriptors are free, ValueError
        for an empty request or a length/address out of range.  A request of
        2..``max_indirect`` buffers takes one ring descriptor and its head's
        indirect table, any other a direct chain along the free list.  The
        descriptors and ring entry are written before the available idx that
        publishes them (split-ring.tex, "Supplying Buffers to The Device",
        "Updating idx").
        """
        total = len(readable) + len(writable)
        head = self._free_head
        try:
            if 1 < total <= self.max_indirect:
                if not self._num_free:
                    raise QueueFullError(f"no free descriptor (queue size {self.size})")
                wlen = self._fill_indirect(head, readable, writable, total)
                last = head
                ndescs = 1
            elif 0 < total <= self._num_free:
                # A direct chain along the free list, each descriptor but the
                # last with NEXT and its link.
                last = head
                more = total  # descriptors left to write, this one included
                nbytes = 0
                wlen = 0
                for addr, length in readable:
                    more -= 1
                    nbytes += length
                    if more:
                        nxt = self._next[last]
                        _pack_desc(self._desc, last * DESC_SIZE, addr, length, _READ_MORE, nxt)
                        last = nxt
                    else:
                        _pack_desc(self._desc, last * DESC_SIZE, addr, length, _READ_LAST, 0)
                for addr, length in writable:
                    more -= 1
                    wlen += length
                    if more:
                        nxt = self._next[last]
                        _pack_desc(self._desc, last * DESC_SIZE, addr, length, _WRITE_MORE, nxt)
                        last = nxt
                    else:
                        _pack_desc(self._desc, last * DESC_SIZE, addr, length, _WRITE_LAST, 0)
                if nbytes + wlen > CHAIN_BYTES_LIMIT:
                    raise ValueError(f"request of {nbytes + wlen} bytes exceeds 2**32")
                ndescs = total
            elif not total:
                raise ValueError("a request needs at least one buffer")
            elif total > self.size:
                raise ValueError(
                    f"{total} buffers can never fit a queue of {self.size} descriptors"
                )
            else:
                raise QueueFullError(
                    f"{total} descriptors needed, {self._num_free} free (queue size {self.size})"
                )
        except struct.error as exc:
            raise ValueError(f"buffer address or length out of range: {exc}") from exc

        # Commit: nothing above changed our bookkeeping, so an error left it intact.
        self._free_head = self._next[last]
        self._num_free -= ndescs
        self._info[head] = (token, last, ndescs, wlen)
        avail_idx = self._avail_idx
        self._avail_ring[avail_idx & self._mask] = head
        avail_idx += 1
        if avail_idx == 0x10000:
            avail_idx = 0
        self._avail_idx = avail_idx
        # Publish only after the descriptors and ring entry are written
        # (split-ring.tex, "Updating idx": barrier before the idx update).
        self._avail[1] = avail_idx

    def _fill_indirect(
        self,
        head: int,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        total: int,
    ) -> int:
        """Write the indirect table of head slot ``head`` and its ring descriptor.

        Returns the writable byte count; ValueError (before the ring
        descriptor is written) if the request exceeds 2**32 bytes.  split-ring.tex, "Indirect
        Descriptors": entries chained by ``next`` from 0, ring descriptor
        with INDIRECT only.

        A three-entry table with a readable first and a writable last entry
        (a block request: header, data, status) rewrites its first and last
        entries only when they changed: a driver that gives each request
        slot its own header and status buffers hands them to the same head
        again and again, as free slots and free heads are both reused
        last-in first-out.
        """
        table = self._ind_view
        assert table is not None
        pack = DESC.pack_into
        base = head * self._ind_stride
        cache = self._ind_cache
        nread = len(readable)
        if total == 3 and 0 < nread < 3:
            if nread == 1:
                first = readable[0]
                data, last = writable
                data_flags = _WRITE_MORE
                wlen = data[1] + last[1]
            else:
                first, data = readable
                last = writable[0]
                data_flags = _READ_MORE
                wlen = last[1]
            if first[1] + data[1] + last[1] > CHAIN_BYTES_LIMIT:
                raise ValueError(f"request of {first[1] + data[1] + last[1]} bytes exceeds 2**32")
            if cache[head] != (first, last):
                cache[head] = None  # until both are written
                pack(table, base, first[0], first[1], _READ_MORE, 1)
                pack(table, base + 32, last[0], last[1], _WRITE_LAST, 0)
                cache[head] = (first, last)
            pack(table, base + 16, data[0], data[1], data_flags, 2)
            pack(self._desc, head * DESC_SIZE, self.indirect_addr + base, 48, DESC_F_INDIRECT, 0)
            return wlen
        cache[head] = None  # the entries are rewritten below
        offset = base
        position = 0
        rlen = 0
        wlen = 0
        for addr, length in readable:
            position += 1
            rlen += length
            if position < total:
                pack(table, offset, addr, length, _READ_MORE, position)
            else:
                pack(table, offset, addr, length, _READ_LAST, 0)
            offset += 16
        for addr, length in writable:
            position += 1
            wlen += length
            if position < total:
                pack(table, offset, addr, length, _WRITE_MORE, position)
            else:
                pack(table, offset, addr, length, _WRITE_LAST, 0)
            offset += 16
        if rlen + wlen > CHAIN_BYTES_LIMIT:
            raise ValueError(f"request of {rlen + wlen} bytes exceeds 2**32")
        pack(
            self._desc,
            head * 16,
            self.indirect_addr + base,
            total * DESC_SIZE,
            DESC_F_INDIRECT,
            0,
        )
        return wlen

    def kick_needed(self) -> bool:
        """Whether the device wants an available-buffer notification now.

        split-ring.tex, "Available Buffer Notification Suppression": with
        EVENT_IDX, when the avail idx moved past ``avail_event`` since the
        last check; without it, unless the device set VIRTQ_USED_F_NO_NOTIFY.
        False when nothing was added since the last check.
        """
        # "Notifying The Device": barrier between the idx store and reading
        # flags/avail_event.
        full_barrier()
        new = self._avail_idx
        old = self._kick_marker
        self._kick_marker = new
        if new == old:
            return False
        if self.event_idx:
            return ring_need_event(self._used[2 + 4 * self.size], new, old)
        return not self._used[0] & VIRTQ_USED_F_NO_NOTIFY

    # -- used ring --------------------------------------------------------------

    def used(self) -> Iterator[tuple[object, int]]:
        """Yield ``(token, written)`` for each buffer the device returned, in used-ring order.

        Checks each used element names a request in flight and reports no
        more bytes than that request offered; otherwise raises VirtqueueError
        and breaks the queue.  The bookkeeping is updated before each yield,
        so stopping early loses nothing and adding from the loop is fine.
        """
        if self.broken:
            raise VirtqueueError("queue is broken: the device returned a bad used element")
        used = self._used
        ring = self._used_ring
        infos = self._info
        links = self._next
        mask = self._mask
        size = self.size
        slots = 2 * size
        used_event = self._used_event
        while True:
            last = self._last_used
            # The used idx is read before the elements it covers; x86 does not
            # reorder loads with loads ("Receiving Used Buffers From The Device").
            used_idx = used[1]
            if used_idx == last:
                return
            count = (used_idx - last) & 0xFFFF
            if count > (self._avail_idx - last) & 0xFFFF:
                self.broken = True
                raise VirtqueueError(
                    f"used idx {used_idx} is {count} ahead of "
                    f"{last} but only {self.in_flight} requests are in flight"
                )
            # The (id, len) u32 pairs are read from ``source`` at ``k``: the
            # ring itself for a few elements, else a copy of all of them made
            # with one slice per lap (cheaper per element, dearer per call).
            k = (last & mask) * 2
            source: Words | list[int] = ring
            if count >= _BULK_MIN:
                stop = k + 2 * count
                if stop <= slots:
                    source = read_span(ring, k, stop)
                else:  # wraps around the end of the ring
                    source = read_span(ring, k, slots) + read_span(ring, 0, stop - slots)
                k = 0
            while last != used_idx:
                head = source[k]
                written = source[k + 1]
                k += 2
                if k == slots:
                    k = 0  # wrapped (a copy ends here at the latest: harmless)
                info = infos[head] if head < size else None
                if info is None:
                    self.broken = True
                    raise VirtqueueError(f"used element id {head} is not a request in flight")
                token, tail, ndescs, wlen = info
                if written > wlen:
                    self.broken = True
                    raise VirtqueueError(
                        f"used element id {head} reports {written} bytes written, more "
                        f"than the {wlen} writable bytes offered"
                    )
                infos[head] = None
                links[tail] = self._free_head
                self._free_head = head
                self._num_free += ndescs
                last += 1
                if last == 0x10000:
                    last = 0
                self._last_used = last
                if self._track_used_event:
                    # Ask to be interrupted for the next element (the driver-side
                    # mirror of avail_event; split-ring.tex, "Used Buffer
                    # Notification Suppression").
                    used_event[0] = last
                yield token, written
                if self._last_used != last:
                    break  # another used() consumed entries meanwhile: start over

    def has_used(self) -> bool:
        """Whether :meth:`used` would yield something (or raise)."""
        return self.broken or self._used[1] != self._last_used

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; True if buffers were used meanwhile.

        A True result means the caller must drain :meth:`used` since no
        notification will come for those (split-ring.tex, "Receiving Used
        Buffers From The Device", the note's re-check loop).
        """
        self._interrupts_enabled = True
        self._track_used_event = self.event_idx
        if self.event_idx:
            self._used_event[0] = self._last_used
        else:
            self._avail[0] = 0
        full_barrier()
        return self._used[1] != self._last_used

    def disable_interrupts(self) -> None:
        """Tell the device used-buffer notifications are not needed (a hint).

        Without EVENT_IDX this sets VIRTQ_AVAIL_F_NO_INTERRUPT; with it the
        flags must stay 0, so ``used_event`` is moved half the index space
        away, where the device's used idx cannot reach it while at most
        ``size`` requests are in flight.
        """
        self._interrupts_enabled = False
        self._track_used_event = False
        if self.event_idx:
            self._used_event[0] = (self._last_used + 0x8000) & 0xFFFF
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT
