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
there :func:`_full_barrier` is used.
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
    ring_need_event,
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

_DESC_SIZE = 16
#: ``struct virtq_desc``: le64 addr, le32 len, le16 flags, le16 next.
_DESC = struct.Struct("<QIHH")
_unpack_desc = _DESC.unpack_from
_pack_desc = _DESC.pack_into
_U64_LIMIT = 1 << 64
#: split-ring.tex, "The Virtqueue Descriptor Table": a chain is at most 2**32 bytes.
_CHAIN_BYTES_LIMIT = 1 << 32
#: Most descriptors an indirect table may hold (as many as the largest queue).
_MAX_INDIRECT_DESCS = MAX_QUEUE_SIZE

_new_object = object.__new__  # the inline fast paths (see common.INLINE_CHAIN)

#: Batches of at least this many used elements are read or written with one
#: slice per lap of the ring; below it, the slice's fixed cost outweighs a
#: store or load per element.
_BULK_MIN = 8

#: Ring areas are read through native-order memoryview casts on little-endian
#: hosts; elsewhere through a slower struct-based stand-in with the same
#: indexing.  A module variable so tests can exercise the fallback.
_NATIVE_LITTLE = sys.byteorder == "little"


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring for ``size``.

    The ring sizes include the ``used_event``/``avail_event`` trailer whether
    or not VIRTIO_F_EVENT_IDX is negotiated, as the spec's table does
    (split-ring.tex, "Split Virtqueues").
    """
    return _DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def indirect_area_size(size: int, max_indirect: int) -> int:
    """Bytes a :class:`SplitDriverQueue` needs for its indirect tables.

    One table of ``max_indirect`` descriptors per head slot, so a table is
    owned by exactly one in-flight request and needs no allocator.
    """
    return size * max_indirect * _DESC_SIZE


# -- ring area access -----------------------------------------------------------


class _IntArray(Protocol):
    """What the ring code needs of a memoryview cast: int slots by index."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...

    def __len__(self) -> int: ...


class _LittleEndianArray:
    """Little-endian integer slots over a byte view, for big-endian hosts."""

    __slots__ = ("_count", "_fmt", "_view", "_width")

    def __init__(self, view: memoryview, code: str) -> None:
        self._fmt = struct.Struct("<" + code)
        self._width = self._fmt.size
        self._view = view
        self._count = len(view) // self._width

    def __getitem__(self, index: int, /) -> int:
        if not 0 <= index < self._count:
            raise IndexError("ring slot out of range")
        value: int = self._fmt.unpack_from(self._view, index * self._width)[0]
        return value

    def __setitem__(self, index: int, value: int, /) -> None:
        if not 0 <= index < self._count:
            raise IndexError("ring slot out of range")
        try:
            self._fmt.pack_into(self._view, index * self._width, value)
        except struct.error as exc:
            raise ValueError(str(exc)) from exc

    def __len__(self) -> int:
        return self._count


def _int_array(view: memoryview, code: Literal["H", "I"]) -> _IntArray:
    """Integer slots (``code`` "H" or "I") over ``view``, little-endian."""
    if _NATIVE_LITTLE:
        return view.cast(code)
    return _LittleEndianArray(view, code)


def _read_span(words: _IntArray, start: int, stop: int) -> list[int]:
    """Slots ``[start, stop)`` of ``words`` as a list, in one call where possible."""
    if isinstance(words, memoryview):
        return words[start:stop].tolist()
    return [words[index] for index in range(start, stop)]


def _write_u32_span(words: _IntArray, start: int, values: list[int]) -> None:
    """Store ``values`` in the u32 slots from ``start``; ValueError if one is out of range.

    One slice assignment on native views: a fraction of the cost of a store
    per slot.
    """
    if isinstance(words, memoryview):
        try:
            packed = array.array("I", values)
        except OverflowError as exc:
            raise ValueError(f"value out of range for a 32-bit field: {exc}") from exc
        words[start : start + len(values)] = packed
    else:
        for offset, value in enumerate(values):
            words[start + offset] = value


def _full_barrier(lock: threading.Lock) -> None:
    """A store-load barrier, as far as CPython can give one.

    The spec asks for a full barrier between publishing an index and reading
    the other side's suppression fields (split-ring.tex, "Notifying The
    Device" and "Used Buffer Notification Suppression"), or a notification
    can be lost.  Python has no fence primitive; an uncontended lock round
    trip runs locked read-modify-write instructions (sem_wait/sem_post on
    Linux), which x86 orders as full fences.
    """
    lock.acquire()
    lock.release()


def _check_layout(
    mem: GuestMemory, size: int, desc_addr: int, driver_addr: int, device_addr: int
) -> tuple[memoryview, memoryview, memoryview]:
    """Validate queue geometry; return byte views of the three areas.

    Each area has to lie inside one guest region, since it is accessed
    through a single zero-copy view.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise VirtqueueError(f"queue size {size!r} is not an integer")
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
    desc_bytes, avail_bytes, used_bytes = area_sizes(size)
    views: list[memoryview] = []
    for name, addr, length, align in (
        ("descriptor table", desc_addr, desc_bytes, DESC_ALIGN),
        ("available ring", driver_addr, avail_bytes, AVAIL_ALIGN),
        ("used ring", device_addr, used_bytes, USED_ALIGN),
    ):
        if isinstance(addr, bool) or not isinstance(addr, int):
            raise VirtqueueError(f"{name} address {addr!r} is not an integer")
        if addr % align:
            raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        try:
            views.append(mem.view(addr, length))
        except GuestMemoryError as exc:
            raise VirtqueueError(
                f"{name} [{addr:#x}, {addr + length:#x}) is not inside one guest memory "
                f"region: {exc}"
            ) from exc
    return views[0], views[1], views[2]


def _fast_region(regions: tuple[MemoryRegion, ...]) -> tuple[int, int, memoryview | None]:
    """``(base, end, view)`` of the largest region, for the inline bounds check."""
    if not regions:
        return 1, 0, None  # an empty range: every check takes the slow path
    region = max(regions, key=lambda r: r.size)
    return region.guest_base, region.guest_end, region.view


def _require(state: QueueState, key: str, kind: type) -> int:
    """One typed field of a state dict, or VirtqueueError naming it."""
    try:
        value = state[key]
    except (KeyError, TypeError) as exc:
        raise VirtqueueError(f"queue state lacks {key!r}") from exc
    if kind is bool:
        if not isinstance(value, bool):
            raise VirtqueueError(f"queue state {key!r} is not a bool: {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise VirtqueueError(f"queue state {key!r} is not an int: {value!r}")
    return int(value)


def _require_u16(state: QueueState, key: str) -> int:
    value = _require(state, key, int)
    if not 0 <= value <= 0xFFFF:
        raise VirtqueueError(f"queue state {key!r} = {value} is not a 16-bit index")
    return value


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
        "_fast_base",
        "_fast_end",
        "_fast_view",
        "_fence",
        "_heads",
        "_mask",
        "_next_avail",
        "_next_used",
        "_notify_enabled",
        "_regions",
        "_signalled_used",
        "_track_avail_event",
        "_used",
        "_used_ring",
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
        self._avail = _int_array(avail, "H")
        self._avail_ring = _int_array(avail[4 : 4 + 2 * size], "H")
        # Used ring as u16 slots (flags 0, idx 1, avail_event 2+4*size), its
        # elements as u32 pairs (id, len) from byte 4, and avail_event alone.
        self._used = _int_array(used, "H")
        self._used_ring = _int_array(used[4 : 4 + 8 * size], "I")
        self._avail_event = _int_array(used[4 + 8 * size : 6 + 8 * size], "H")
        self._next_avail = 0
        # Available ring entries read ahead by pop, the next one last.
        self._heads: list[int] = []
        self._next_used = 0
        self._signalled_used = 0
        self._notify_enabled = True
        # pop keeps avail_event current while this is set.
        self._track_avail_event = self.event_idx
        self._fence = threading.Lock()
        self._regions: tuple[MemoryRegion, ...] = ()
        self._fast_base, self._fast_end, self._fast_view = _fast_region(())

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
        queue = cls(
            mem,
            _require(state, "size", int),
            _require(state, "desc_addr", int),
            _require(state, "driver_addr", int),
            _require(state, "device_addr", int),
            event_idx=bool(_require(state, "event_idx", bool)),
            indirect=bool(_require(state, "indirect", bool)),
        )
        queue._next_avail = _require_u16(state, "next_avail")
        queue._next_used = _require_u16(state, "next_used")
        queue._signalled_used = _require_u16(state, "signalled_used")
        queue._notify_enabled = bool(_require(state, "notifications_enabled", bool))
        queue._track_avail_event = queue.event_idx and queue._notify_enabled
        queue.broken = bool(_require(state, "broken", bool))
        return queue

    @property
    def next_avail(self) -> int:
        """Available-ring index of the next chain :meth:`pop` will take."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """Used-ring index the next :meth:`add_used` will fill."""
        return self._next_used

    # -- available ring ---------------------------------------------------------

    def has_available(self) -> bool:
        """Whether :meth:`pop` would return a chain (or raise), without consuming it."""
        return self.broken or self._avail[1] != self._next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if there is none.

        Walks the chain (split-ring.tex, "The Virtqueue Descriptor Table" and
        "Indirect Descriptors") and checks every field the driver controls;
        any malformation raises VirtqueueError and breaks the queue.
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
            if head >= self.size:
                raise VirtqueueError(f"available ring head {head} >= queue size {self.size}")
            addr, length, flags, nxt = _unpack_desc(self._desc, head * 16)
            mem = self.mem
            # Fast path: one direct descriptor (flags 0, or 2 = WRITE) inside
            # the cached region, while the region table is the one cached (it
            # is replaced as a whole on any change).  Everything else,
            # including a stale cache, goes to _walk.
            if (
                flags in {0, 2}
                and self._fast_base <= addr
                and addr + length <= self._fast_end
                and mem._regions is self._regions
            ):
                if INLINE_CHAIN:
                    # The chain's slots are filled directly: a third cheaper
                    # than the constructor call, and this runs once per request.
                    chain = _new_object(DescriptorChain)
                    chain.mem = mem
                    chain.head = head
                    chain.ring_slots = 1
                    if flags:
                        chain.readable = []
                        chain.writable = [(addr, length)]
                        chain.readable_len = 0
                        chain.writable_len = length
                    else:
                        chain.readable = [(addr, length)]
                        chain.writable = []
                        chain.readable_len = length
                        chain.writable_len = 0
                elif flags:
                    chain = DescriptorChain(mem, head, [], [(addr, length)], 0, length)
                else:
                    chain = DescriptorChain(mem, head, [(addr, length)], [], length, 0)
            else:
                chain = self._walk(head, addr, length, flags, nxt)
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
        return chain

    def _read_ahead(self, next_avail: int, pending: int) -> int:
        """Read the ``pending`` ring entries from ``next_avail``; return the first.

        The others wait in ``_heads`` (next one last) for the following
        pops, so a batch costs one avail idx load and one slice per lap of
        the ring rather than two loads per chain; the idx is read again once
        they are used up.  Each head is still checked when it is popped.
        """
        heads = self._avail_entries(next_avail, pending)
        heads.reverse()
        head = heads.pop()
        self._heads = heads
        return head

    def _avail_entries(self, next_avail: int, count: int) -> list[int]:
        """The ``count`` available ring entries from index ``next_avail``, in order."""
        start = next_avail & self._mask
        stop = start + count
        ring = self._avail_ring
        if count == 1:
            return [ring[start]]
        if stop <= self.size:
            return _read_span(ring, start, stop)
        # Wraps around the end of the ring.
        return _read_span(ring, start, self.size) + _read_span(ring, 0, stop - self.size)

    def pop_batch(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every available chain (at most ``limit``), in ring order.

        What calling :meth:`pop` until it returns None gives, for less work
        per chain: a device that serves all available buffers on each
        notification (the block device does) can take them in one call.
        Each chain is parsed and checked exactly as by :meth:`pop`.  With
        EVENT_IDX, avail_event is stored once per avail idx read, just past
        the chains it covered, before the idx is read again: a buffer added
        meanwhile is either taken or notified (split-ring.tex, "Available
        Buffer Notification Suppression").  A malformed chain raises
        VirtqueueError and breaks the queue, as :meth:`pop` does; the chains
        taken before it in the same call are consumed with the queue.
        """
        if self.broken:
            raise VirtqueueError("queue is broken: an earlier malformed chain was reported")
        chains: list[DescriptorChain] = []
        if not INLINE_CHAIN:  # DescriptorChain changed: let pop build each chain
            while (limit is None or len(chains) < limit) and (chain := self.pop()) is not None:
                chains.append(chain)
            return chains
        size = self.size
        room = sys.maxsize if limit is None else limit
        start = next_avail = self._next_avail
        self._heads = []  # pop's read-ahead: the same entries are read again below
        avail = self._avail
        desc = self._desc
        mem = self.mem
        # The cached region is made current once per call (pop checks it per
        # chain): a table replaced later in the call is like one replaced
        # just after it.
        if mem._regions is not self._regions:
            self._refresh_region()
        lo = self._fast_base
        hi = self._fast_end
        try:
            while room > 0:
                # The index is read before the ring entries it covers.
                avail_idx = avail[1]
                pending = (avail_idx - next_avail) & 0xFFFF
                if not pending:
                    break
                if pending > size:
                    raise VirtqueueError(
                        f"available idx {avail_idx} is more than the queue size {size} "
                        f"ahead of the last seen idx {next_avail}"
                    )
                pending = min(pending, room)
                for head in self._avail_entries(next_avail, pending):
                    if head >= size:
                        raise VirtqueueError(f"available ring head {head} >= queue size {size}")
                    addr, length, flags, nxt = _unpack_desc(desc, head * 16)
                    # The fast path of pop, inline: see there.
                    if flags in {0, 2} and lo <= addr and addr + length <= hi:
                        chain = _new_object(DescriptorChain)
                        chain.mem = mem
                        chain.head = head
                        chain.ring_slots = 1
                        if flags:
                            chain.readable = []
                            chain.writable = [(addr, length)]
                            chain.readable_len = 0
                            chain.writable_len = length
                        else:
                            chain.readable = [(addr, length)]
                            chain.writable = []
                            chain.readable_len = length
                            chain.writable_len = 0
                    else:
                        chain = self._walk(head, addr, length, flags, nxt)
                        # _walk refreshes the cached region if the table changed.
                        lo = self._fast_base
                        hi = self._fast_end
                    chains.append(chain)
                next_avail = (next_avail + pending) & 0xFFFF
                room -= pending
                if self._track_avail_event:
                    # As pop does: ask for a notification past what was taken,
                    # before looking at the idx again.
                    self._avail_event[0] = next_avail
        except VirtqueueError:
            self._next_avail = (start + len(chains)) & 0xFFFF
            self.broken = True
            raise
        except (GuestMemoryError, struct.error, IndexError, ValueError, OverflowError) as exc:
            self._next_avail = (start + len(chains)) & 0xFFFF
            self.broken = True
            raise VirtqueueError(f"malformed virtqueue: {exc}") from exc
        self._next_avail = next_avail
        return chains

    def _walk(self, head: int, addr: int, length: int, flags: int, nxt: int) -> DescriptorChain:
        """Parse the chain at ``head`` whose first descriptor is already unpacked.

        This loop runs once per descriptor, so flags are tested by comparing
        with literals (CPython 3.11 specialises int compares, not ``&``):
        after the rare INDIRECT/reserved bits are handled, 0 is readable,
        1 readable+NEXT, 2 writable, 3 writable+NEXT.  Reserved flag bits are
        ignored.
        """
        if self.mem._regions is not self._regions:
            self._refresh_region()
        mem = self.mem
        size = self.size
        lo = self._fast_base
        hi = self._fast_end
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = 0
        wlen = 0
        desc = self._desc
        index = head
        count = 1
        while True:
            if flags > 3:
                if flags & DESC_F_INDIRECT:  # the table ends the chain
                    if flags & DESC_F_NEXT:
                        raise VirtqueueError(f"descriptor {index} has both INDIRECT and NEXT flags")
                    rlen, wlen = self._walk_indirect(addr, length, readable, writable, rlen, wlen)
                    break
                flags &= DESC_F_NEXT | DESC_F_WRITE
            if addr < lo or addr + length > hi:
                self._check_buffer(addr, length, index)
            if flags >= 2:  # DESC_F_WRITE
                writable.append((addr, length))
                wlen += length
                if flags == 2:  # no DESC_F_NEXT: end of chain
                    break
            elif writable:
                raise VirtqueueError(
                    f"descriptor {index}: device-readable buffer after a device-writable one"
                )
            else:
                readable.append((addr, length))
                rlen += length
                if flags == 0:
                    break
            if nxt >= size:
                raise VirtqueueError(f"descriptor {index}: next {nxt} >= queue size {size}")
            count += 1
            if count > size:
                raise VirtqueueError(
                    f"descriptor chain from head {head} is longer than the queue size "
                    f"{size} (a loop?)"
                )
            index = nxt
            addr, length, flags, nxt = _unpack_desc(desc, nxt * 16)
        if rlen + wlen > _CHAIN_BYTES_LIMIT:
            raise VirtqueueError(
                f"descriptor chain from head {head} totals {rlen + wlen} bytes, more than 2**32"
            )
        return make_chain(mem, head, readable, writable, rlen, wlen)

    def _refresh_region(self) -> None:
        """The region table changed: cache the new one and its largest region."""
        self._regions = self.mem._regions
        self._fast_base, self._fast_end, self._fast_view = _fast_region(self._regions)

    def _check_buffer(self, addr: int, length: int, where: int | str) -> None:
        """The slow bounds check, for buffers outside the cached region."""
        if addr + length > _U64_LIMIT:
            raise VirtqueueError(
                f"descriptor {where}: buffer {addr:#x}+{length:#x} overflows 2**64"
            )
        if length and not self.mem.is_valid(addr, length):
            raise VirtqueueError(
                f"descriptor {where}: buffer [{addr:#x}, {addr + length:#x}) is outside "
                "guest memory"
            )

    def _walk_indirect(
        self,
        addr: int,
        length: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        rlen: int,
        wlen: int,
    ) -> tuple[int, int]:
        """Append an indirect table's buffers; return the new (rlen, wlen).

        split-ring.tex, "Indirect Descriptors": the table is ``len / 16``
        descriptors chained by ``next`` from entry 0; it may not contain
        another INDIRECT descriptor.
        """
        if not self.indirect:
            raise VirtqueueError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
        if length == 0 or length % _DESC_SIZE:
            raise VirtqueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        entries = length // _DESC_SIZE
        if entries > _MAX_INDIRECT_DESCS:
            raise VirtqueueError(
                f"indirect table of {entries} descriptors exceeds {_MAX_INDIRECT_DESCS}"
            )
        lo = self._fast_base
        hi = self._fast_end
        table: memoryview | bytes
        fast_view = self._fast_view
        if fast_view is not None and lo <= addr and addr + length <= hi:
            table = fast_view[addr - lo : addr - lo + length]
        else:
            self._check_buffer(addr, length, "(indirect table)")
            table = self.mem.read(addr, length)
        index = 0
        count = 1
        while True:
            daddr, dlen, flags, nxt = _unpack_desc(table, index * 16)
            if flags > 3:  # flag tests as in _walk
                if flags & DESC_F_INDIRECT:
                    raise VirtqueueError(f"indirect descriptor {index} is itself INDIRECT (nested)")
                flags &= DESC_F_NEXT | DESC_F_WRITE
            if daddr < lo or daddr + dlen > hi:
                self._check_buffer(daddr, dlen, f"indirect {index}")
            if flags >= 2:  # DESC_F_WRITE
                writable.append((daddr, dlen))
                wlen += dlen
                if flags == 2:  # no DESC_F_NEXT
                    return rlen, wlen
            elif writable:
                raise VirtqueueError(
                    f"indirect descriptor {index}: device-readable buffer after a "
                    "device-writable one"
                )
            else:
                readable.append((daddr, dlen))
                rlen += dlen
                if flags == 0:
                    return rlen, wlen
            if nxt >= entries:
                raise VirtqueueError(
                    f"indirect descriptor {index}: next {nxt} >= table size {entries}"
                )
            count += 1
            if count > entries:
                raise VirtqueueError(
                    f"indirect chain is longer than its table of {entries} (a loop?)"
                )
            index = nxt

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
                _write_u32_span(ring, pos, values)
            else:
                _write_u32_span(ring, pos, values[:room])
                _write_u32_span(ring, 0, values[room:])
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
        _full_barrier(self._fence)  # publish used idx before reading the driver's fields
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
        _full_barrier(self._fence)
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
        "_fence",
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
        self._avail = _int_array(avail, "H")
        self._avail_ring = _int_array(avail[4 : 4 + 2 * size], "H")
        self._used_event = _int_array(avail[4 + 2 * size : 6 + 2 * size], "H")
        self._used = _int_array(used, "H")
        self._used_ring = _int_array(used[4 : 4 + 8 * size], "I")
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
            self._ind_stride = max_indirect * _DESC_SIZE
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
        self._fence = threading.Lock()

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
        if _require(state, "in_flight", int) != 0:
            raise ValueError("only a queue with nothing in flight can be rebuilt from state")
        indirect = bool(_require(state, "indirect", bool))
        queue = cls.__new__(cls)
        queue._setup(
            mem,
            _require(state, "size", int),
            _require(state, "desc_addr", int),
            _require(state, "driver_addr", int),
            _require(state, "device_addr", int),
            event_idx=bool(_require(state, "event_idx", bool)),
            indirect=indirect,
            indirect_addr=_require(state, "indirect_addr", int) if indirect else None,
            max_indirect=_require(state, "max_indirect", int) if indirect else 0,
        )
        queue._avail_idx = _require_u16(state, "avail_idx")
        queue._last_used = _require_u16(state, "last_used")
        queue._kick_marker = _require_u16(state, "kick_marker")
        queue._interrupts_enabled = bool(_require(state, "interrupts_enabled", bool))
        queue._track_used_event = queue.event_idx and queue._interrupts_enabled
        queue.broken = bool(_require(state, "broken", bool))
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
        for an empty request or a length/address out of range.  The
        descriptors and ring entry are written before the available idx that
        publishes them (split-ring.tex, "Supplying Buffers to The Device",
        "Updating idx").
        """
        nread = len(readable)
        total = nread + len(writable)
        head = self._free_head
        if total == 1 and self._num_free:
            # Fast path: one direct descriptor, published at once.
            try:
                if nread:
                    addr, length = readable[0]
                    _pack_desc(self._desc, head * 16, addr, length, 0, 0)
                    wlen = 0
                else:
                    addr, length = writable[0]
                    _pack_desc(self._desc, head * 16, addr, length, DESC_F_WRITE, 0)
                    wlen = length
            except struct.error as exc:
                raise ValueError(f"buffer address or length out of range: {exc}") from exc
            self._free_head = self._next[head]
            self._num_free -= 1
            self._info[head] = (token, head, 1, wlen)
            avail_idx = self._avail_idx
            self._avail_ring[avail_idx & self._mask] = head
            avail_idx += 1
            if avail_idx == 0x10000:
                avail_idx = 0
            self._avail_idx = avail_idx
            # Publish only after the descriptor and ring entry are written
            # (split-ring.tex, "Updating idx": barrier before the idx update).
            self._avail[1] = avail_idx
            return
        try:
            if total == 1:
                raise QueueFullError(f"no free descriptor (queue size {self.size})")
            elif total == 0:
                raise ValueError("a request needs at least one buffer")
            elif total <= self.max_indirect:
                if not self._num_free:
                    raise QueueFullError(f"no free descriptor (queue size {self.size})")
                wlen = self._fill_indirect(head, readable, writable, total)
                last = head
                ndescs = 1
            else:
                if total > self.size:
                    raise ValueError(
                        f"{total} buffers can never fit a queue of {self.size} descriptors"
                    )
                if self._num_free < total:
                    raise QueueFullError(
                        f"{total} descriptors needed, {self._num_free} free "
                        f"(queue size {self.size})"
                    )
                last, wlen = self._write_chain(head, readable, writable, total)
                ndescs = total
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

    def add_batch(
        self,
        requests: Iterable[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]], object]],
    ) -> int:
        """Expose several ``(readable, writable, token)`` requests with one avail idx store.

        What calling :meth:`add` for each gives, for less work per request:
        a driver with several requests queued adds them at once, then asks
        :meth:`kick_needed`.  Returns how many were added, in order: all of
        them, or fewer when the next did not fit (it and the rest were not
        touched).  A malformed request raises ValueError once the ones
        before it are published.
        """
        desc = self._desc
        links = self._next
        infos = self._info
        ring = self._avail_ring
        mask = self._mask
        direct_min = self.max_indirect + 1  # requests this long are direct chains
        head = self._free_head
        num_free = self._num_free
        avail_idx = self._avail_idx
        count = 0
        try:
            for readable, writable, token in requests:
                total = len(readable) + len(writable)
                if total == 1 and num_free:
                    # The fast path of add, inline: see there.
                    try:
                        if readable:
                            addr, length = readable[0]
                            _pack_desc(desc, head * 16, addr, length, 0, 0)
                            wlen = 0
                        else:
                            addr, length = writable[0]
                            _pack_desc(desc, head * 16, addr, length, DESC_F_WRITE, 0)
                            wlen = length
                    except struct.error as exc:
                        raise ValueError(f"buffer address or length out of range: {exc}") from exc
                    infos[head] = (token, head, 1, wlen)
                    ring[avail_idx & mask] = head
                    avail_idx += 1
                    if avail_idx == 0x10000:
                        avail_idx = 0
                    head = links[head]
                    num_free -= 1
                elif direct_min <= total <= num_free and total > 1:
                    # A direct chain, as add writes it.
                    try:
                        last, wlen = self._write_chain(head, readable, writable, total)
                    except struct.error as exc:
                        raise ValueError(f"buffer address or length out of range: {exc}") from exc
                    infos[head] = (token, last, total, wlen)
                    ring[avail_idx & mask] = head
                    avail_idx += 1
                    if avail_idx == 0x10000:
                        avail_idx = 0
                    head = links[last]
                    num_free -= total
                else:
                    # Indirect tables, a full ring and errors: add itself
                    # (which publishes what came before this request too).
                    self._free_head = head
                    self._num_free = num_free
                    self._avail_idx = avail_idx
                    try:
                        self.add(readable, writable, token)
                    except QueueFullError:
                        break
                    head = self._free_head
                    num_free = self._num_free
                    avail_idx = self._avail_idx
                count += 1
        finally:
            self._free_head = head
            self._num_free = num_free
            self._avail_idx = avail_idx
            if count:
                # One store publishes them all, after every descriptor and ring
                # entry (split-ring.tex, "Updating idx").
                self._avail[1] = avail_idx
        return count

    def _write_chain(
        self,
        head: int,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        total: int,
    ) -> tuple[int, int]:
        """Write ``total`` descriptors chained from ``head`` along the free list.

        Returns (last descriptor, writable bytes); ValueError (or
        struct.error) for a request the ring cannot describe.  Nothing is
        committed: the caller updates the free list.
        """
        pack = _DESC.pack_into
        links = self._next
        desc = self._desc
        index = head
        remaining = total
        rlen = 0
        wlen = 0
        # Flags as literals: 1 NEXT, 2 WRITE, 3 WRITE|NEXT (once per buffer).
        for addr, length in readable:
            remaining -= 1
            rlen += length
            if remaining:
                nxt = links[index]
                pack(desc, index * 16, addr, length, 1, nxt)
                index = nxt
            else:
                pack(desc, index * 16, addr, length, 0, 0)
        for addr, length in writable:
            remaining -= 1
            wlen += length
            if remaining:
                nxt = links[index]
                pack(desc, index * 16, addr, length, 3, nxt)
                index = nxt
            else:
                pack(desc, index * 16, addr, length, 2, 0)
        if rlen + wlen > _CHAIN_BYTES_LIMIT:
            raise ValueError(f"request of {rlen + wlen} bytes exceeds 2**32")
        return index, wlen

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
        pack = _DESC.pack_into
        base = head * self._ind_stride
        cache = self._ind_cache
        nread = len(readable)
        if total == 3 and 0 < nread < 3:
            if nread == 1:
                first = readable[0]
                data, last = writable
                data_flags = 3  # WRITE | NEXT
                wlen = data[1] + last[1]
            else:
                first, data = readable
                last = writable[0]
                data_flags = 1  # NEXT
                wlen = last[1]
            if first[1] + data[1] + last[1] > _CHAIN_BYTES_LIMIT:
                raise ValueError(f"request of {first[1] + data[1] + last[1]} bytes exceeds 2**32")
            if cache[head] != (first, last):
                cache[head] = None  # until both are written
                pack(table, base, first[0], first[1], 1, 1)
                pack(table, base + 32, last[0], last[1], 2, 0)
                cache[head] = (first, last)
            pack(table, base + 16, data[0], data[1], data_flags, 2)
            pack(self._desc, head * 16, self.indirect_addr + base, 48, DESC_F_INDIRECT, 0)
            return wlen
        cache[head] = None  # the entries are rewritten below
        offset = base
        position = 0
        rlen = 0
        wlen = 0
        # Flags as literals: 1 NEXT, 2 WRITE, 3 WRITE|NEXT (once per buffer).
        for addr, length in readable:
            position += 1
            rlen += length
            if position < total:
                pack(table, offset, addr, length, 1, position)
            else:
                pack(table, offset, addr, length, 0, 0)
            offset += 16
        for addr, length in writable:
            position += 1
            wlen += length
            if position < total:
                pack(table, offset, addr, length, 3, position)
            else:
                pack(table, offset, addr, length, 2, 0)
            offset += 16
        if rlen + wlen > _CHAIN_BYTES_LIMIT:
            raise ValueError(f"request of {rlen + wlen} bytes exceeds 2**32")
        pack(
            self._desc,
            head * 16,
            self.indirect_addr + base,
            total * _DESC_SIZE,
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
        _full_barrier(self._fence)
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
            source: _IntArray | list[int] = ring
            if count >= _BULK_MIN:
                stop = k + 2 * count
                if stop <= slots:
                    source = _read_span(ring, k, stop)
                else:  # wraps around the end of the ring
                    source = _read_span(ring, k, slots) + _read_span(ring, 0, stop - slots)
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
        _full_barrier(self._fence)
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
