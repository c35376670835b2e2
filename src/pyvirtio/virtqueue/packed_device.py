"""The device side of the packed ring: :class:`PackedDeviceQueue` (see :mod:`.packed`)."""

from __future__ import annotations

import array
import struct
from collections.abc import Sequence
from typing import Final, Protocol

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.base import DeviceRing
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.common import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueState
from pyvirtio.virtqueue.errors import VirtqueueError
from pyvirtio.virtqueue.packed_layout import (
    AVAIL_USED,
    DESC_F_AVAIL,
    DESC_F_USED,
    KIND_MASK,
    MAX_INDIRECT_ENTRIES,
    READ_LAST,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_ENABLE,
    WRAP_BIT,
    WRITE_LAST,
    WRITE_MORE,
    disable_events,
    enable_events,
    event_wanted,
    map_ring,
    packed_state,
    ring_position,
    ring_positions,
)
from pyvirtio.virtqueue.ring import (
    DESC,
    DESC_SIZE,
    U64_LIMIT,
)

__all__ = ["PackedDeviceQueue", "PackedInflightRecorder"]

#: A ring descriptor as the packed format lays it out: (addr, len, id, flags).
RingDescriptor = tuple[int, int, int, int]


class PackedInflightRecorder(Protocol):
    """What a host records for every chain a packed queue takes and completes.

    vhost-user's inflight tracking (vhost-user.rst "Inflight I/O tracking",
    :class:`pyvirtio.transport.vhost_user.inflight.PackedInflight`): a copy
    of each chain in flight, in memory the front end keeps across back-end
    restarts, since the device overwrites ring slots with used descriptors
    out of order.  Chains are named by their buffer ID (``chain.head``).
    """

    def pop(self, descriptors: Sequence[RingDescriptor]) -> object:
        """A chain was taken: its ring descriptors, in ring order."""

    def before_publish(self, ids: Sequence[int]) -> None:
        """Used descriptors for ``ids`` are written but for the first one's flags."""

    def after_publish(self, ids: Sequence[int]) -> None:
        """The batch is published: ``ids`` are no longer in flight."""


_unpack_desc: Final = DESC.unpack_from

#: Batches of at least this many used descriptors are stored with strided
#: slice assignments; below it, their fixed cost outweighs a store per field.
_BULK_MIN = 16


def _beyond_popped(total: int, limit: int, chain: DescriptorChain) -> ValueError:
    """A batch of used descriptors would cover more ring slots than were popped."""
    return ValueError(
        f"used descriptors for {total} ring slots, {limit} in flight "
        f"({chain!r} occupies {chain.ring_slots})"
    )


def _beyond_writable(written: int, chain: DescriptorChain) -> ValueError:
    """A completion reports more bytes written than the chain can take."""
    return ValueError(f"written={written} for a chain with {chain.writable_len} writable bytes")


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


class PackedDeviceQueue(DeviceRing):
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
        "_inflight",
        "_next_avail",
        "_next_used",
        "_notify_flags",
        "_pop_extras",
        "_ring",
        "_track_avail_event",
        "_used_since_signal",
        "_used_wrap",
    )

    def _map_rings(self) -> None:
        # The driver's event area is read only, the device's written by us.
        self._ring, self._d16, self._d32, self._d64, self._drv16, self._dev16 = map_ring(self)
        self._next_used = 0
        self._used_wrap = 1
        self._set_avail(0, 1)
        self._used_since_signal = 0  # ring slots used since needs_notification()
        self._inflight: PackedInflightRecorder | None = None  # see the inflight property
        self._set_notify_flags(RING_EVENT_FLAGS_ENABLE)
        # Buffers are checked inline against the largest region (pop).
        self._forget_window()

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
        self._update_pop_extras()

    def _update_pop_extras(self) -> None:
        # pop tests one flag for everything it may have to do after a walk.
        self._pop_extras = self._track_avail_event or self._inflight is not None

    @property
    def inflight(self) -> PackedInflightRecorder | None:
        """The recorder a host set to record chains in flight (None: nothing recorded)."""
        return self._inflight

    @inflight.setter
    def inflight(self, recorder: PackedInflightRecorder | None) -> None:
        self._inflight = recorder
        self._update_pop_extras()

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
        return (flags & AVAIL_USED) == self._avail_expect

    def slot_flags(self, slot: int) -> int:
        """The flags word of ring slot ``slot`` now (for a host repairing a ring)."""
        return self._d16[ring_position(slot, self.size, "slot") * 8 + 7]

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
        if (flags & AVAIL_USED) != expect:
            return None
        try:
            size = self.size
            ring = self._ring
            mem = self.mem
            # Buffers inside the largest region are checked inline against
            # its window, while the window is current (GuestMemory.window).
            if self._window_table is not mem.regions:
                self._take_window()
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            readable_len = 0
            writable_len = 0
            pos = head
            slots = 1
            # Declared ints: compiled, they compare and add as machine words.
            addr: int
            length: int
            bid: int
            while True:
                # The flags were read (and found available) first.
                addr, length, bid, _ = _unpack_desc(ring, pos * DESC_SIZE)
                kind = flags & KIND_MASK
                # Dispatch on the NEXT and WRITE bits (READ_* < WRITE_LAST <=
                # WRITE_MORE); anything above has INDIRECT.  Window bounds
                # are read from slots: most chains are one descriptor.
                if kind < WRITE_LAST:
                    if addr < self._lo or addr + length > self._hi:
                        self._check_range(addr, length, pos)
                    if writable:
                        raise self._fail(
                            f"descriptor chain at {head}: readable descriptor {pos} after a "
                            "writable one"
                        )
                    readable.append((addr, length))
                    readable_len += length
                    if kind == READ_LAST:
                        break
                elif kind <= WRITE_MORE:
                    if addr < self._lo or addr + length > self._hi:
                        self._check_range(addr, length, pos)
                    writable.append((addr, length))
                    writable_len += length
                    if kind == WRITE_LAST:
                        break
                else:  # DESC_F_INDIRECT
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
                if slots >= size:
                    raise self._fail(
                        f"descriptor chain at {head} is longer than the queue size {size}"
                    )
                pos += 1
                if pos == size:
                    pos = 0
                    expect ^= AVAIL_USED
                # The driver makes the head available last (packed-ring.tex,
                # "Scatter-Gather Support", driver requirements), so the rest
                # of a chain whose head is available must be available too.
                flags = d16[pos * 8 + 7]
                if (flags & AVAIL_USED) != expect:
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
        if self._pop_extras:
            self._after_pop(head, slots, bid)
        # The buffer ID is in the last descriptor of the list.
        return DescriptorChain(mem, bid, readable, writable, readable_len, writable_len, slots)

    def _after_pop(self, head: int, slots: int, buffer_id: int) -> None:
        """What pop does only when asked to: the event offset, the inflight record."""
        if self._track_avail_event:
            # Keep asking for the descriptor after the ones consumed, or the
            # driver's next additions would pass the old offset unnoticed.
            self._dev16[0] = self._next_avail + self._avail_wrap * WRAP_BIT
        if self._inflight is not None:
            try:
                self._inflight.pop(self._ring_descriptors(head, slots, buffer_id))
            except ValueError as exc:  # a driver that reused a buffer ID in flight
                raise self._fail(f"descriptor chain at {head}: {exc}") from exc

    def _ring_descriptors(self, pos: int, slots: int, buffer_id: int) -> list[RingDescriptor]:
        """The ``slots`` ring descriptors of the chain at ``pos``, for the inflight recorder.

        The buffer ID recorded is the one :meth:`pop` read (the ring may have
        changed since, under a driver that breaks the rules).
        """
        ring = self._ring
        size = self.size
        descriptors: list[RingDescriptor] = []
        for _ in range(slots):
            descriptors.append(_unpack_desc(ring, pos * DESC_SIZE))
            pos += 1
            if pos == size:
                pos = 0
        addr, length, _id, flags = descriptors[-1]
        descriptors[-1] = (addr, length, buffer_id, flags)
        return descriptors

    def _check_range(self, addr: int, length: int, pos: int) -> None:
        """The slow bounds check, for buffers outside the cached region window."""
        end = addr + length
        if end > U64_LIMIT:
            raise self._fail(
                f"descriptor {pos}: buffer {addr:#x}+{length:#x} overflows the address space"
            )
        if not self.mem.is_valid(addr, length):
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
        mem = self.mem
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

        That store is the one place a batch is published, whichever way the
        rest was stored: an inflight recorder (:attr:`inflight`) hears of the
        batch just before and just after it.
        """
        count = len(completions)
        if not count:
            return
        limit = self._slots_in_flight()
        d16 = self._d16
        first_index = self._next_used * 8 + 7  # the first element's flags word, stored last
        first_flags = -1
        if count >= _BULK_MIN and isinstance(d16, memoryview):
            # -1 for chains of different lengths: the loop below (which validates again).
            first_flags = self._add_used_uniform(completions, limit)
        if first_flags < 0:
            size = self.size
            d32 = self._d32
            pos = self._next_used
            wrap = self._used_wrap
            # Used flags: AVAIL == USED == the used wrap counter, WRITE if written.
            used_flags = AVAIL_USED if wrap else 0
            total = 0
            try:
                for chain, written in completions:
                    slots = chain.ring_slots
                    total += slots
                    if total > limit or slots < 1:
                        raise _beyond_popped(total, limit, chain)
                    if written > chain.writable_len:
                        raise _beyond_writable(written, chain)
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
                        used_flags ^= AVAIL_USED
            except (ValueError, OverflowError, TypeError) as exc:
                raise ValueError(
                    f"add_used: written count or buffer ID out of range ({exc})"
                ) from exc
            self._next_used = pos
            self._used_wrap = wrap
            self._used_since_signal += total
        inflight = self._inflight
        if inflight is None:
            d16[first_index] = first_flags  # publishes the whole batch
            return
        # vhost-user.rst "Inflight I/O tracking": the batch is recorded as
        # completing, published, then cleared, so a crash between any two
        # steps can be repaired.
        ids = [chain.head for chain, _ in completions]
        inflight.before_publish(ids)
        d16[first_index] = first_flags
        inflight.after_publish(ids)

    def _add_used_uniform(
        self, completions: Sequence[tuple[DescriptorChain, int]], limit: int
    ) -> int:
        """add_used_batch's stores for a large batch of chains of one length: strided slices.

        Chains that each took ``step`` ring slots have their used descriptors
        ``step`` apart, so each lap's part of the batch is a few strided
        slice stores instead of three stores per chain.  Stores all but the
        first descriptor's flags, moves the used position past the batch and
        returns those flags for :meth:`add_used_batch` to publish the batch
        with; or -1 without storing anything when the chains' lengths
        differ.  Everything is validated before the first store, as in
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
                raise _beyond_popped(total, limit, chain)
            if slots != step:
                return -1
            if not 0 <= written <= chain.writable_len:
                raise _beyond_writable(written, chain)
            heads.append(chain.head)
            lens.append(written)
        size = self.size
        pos = self._next_used
        wrap = self._used_wrap
        used_flags = AVAIL_USED if wrap else 0  # AVAIL == USED == the used wrap counter
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
                        used_flags ^ AVAIL_USED,
                        False,
                    )
        except OverflowError as exc:
            raise ValueError(f"add_used: written count or buffer ID out of range ({exc})") from exc
        self._next_used = pos
        self._used_wrap = wrap
        self._used_since_signal += total
        return used_flags + DESC_F_WRITE if lens[0] else used_flags

    # -- notifications ----------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether to send a used buffer notification now; resets the count since the last.

        Reads the driver event suppression structure (packed-ring.tex, "Event
        Suppression Structure Format"): see :func:`event_wanted`.
        """
        count = self._used_since_signal
        self._used_since_signal = 0
        return event_wanted(
            self._drv16, self.event_idx, self._next_used, self._used_wrap, count, self.size
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
            enable_events(self._dev16, self.event_idx, self._next_avail, self._avail_wrap)
        )
        return self.has_available()

    def disable_notifications(self) -> None:
        """Tell the driver not to send available buffer notifications (a hint)."""
        self._set_notify_flags(disable_events(self._dev16))

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

    def set_next_avail(self, position: object, wrap_counter: bool) -> None:
        """Resume popping at ring ``position`` with the driver wrap counter ``wrap_counter``.

        What a host does when told where the driver's buffers continue
        (vhost-user SET_VRING_BASE: position in bits 0..14, wrap counter in
        bit 15 for packed rings).  ValueError for a position outside the ring.
        """
        self._set_avail(ring_position(position, self.size, "next_avail"), int(bool(wrap_counter)))

    def set_next_used(self, position: object, wrap_counter: bool) -> None:
        """Resume completing at ring ``position`` with device wrap counter ``wrap_counter``.

        The notification count restarts there.
        """
        self._next_used = ring_position(position, self.size, "next_used")
        self._used_wrap = int(bool(wrap_counter))
        self._used_since_signal = 0

    def resubmit(self, chains: Sequence[Sequence[RingDescriptor]]) -> None:
        """Make ``chains`` the next ones :meth:`pop` takes, in order, ahead of the driver's.

        For a host that restarts a ring whose chains were taken but not
        completed by a previous owner (vhost-user inflight tracking), from
        copies of their ring descriptors (addr, len, id, flags): put both
        positions where the previous owner's used position was
        (:meth:`set_next_used`, :meth:`set_next_avail`), then pass them here.
        They are written back into the ring from there, as available
        descriptors of each slot's lap, and go through the one walker as if
        the driver had made them available.  Those slots are the device's:
        the previous owner took them and wrote no used descriptor past the
        used position, and the driver only polls the flags of the first,
        which stay available, not used (packed-ring.tex, "Receiving Used
        Buffers From The Device").  ValueError, with nothing written, for
        chains that do not fit in the ring.
        """
        total = sum(len(chain) for chain in chains)
        if total > self.size or not all(chains):
            raise ValueError(
                f"{len(chains)} resubmitted chains of {total} descriptors for a ring of {self.size}"
            )
        ring = self._ring
        pos = self._next_avail
        expect = self._avail_expect
        for chain in chains:
            for addr, length, buffer_id, flags in chain:
                DESC.pack_into(ring, pos * DESC_SIZE, addr, length, buffer_id, flags)
                # The flags last, marked available in this slot's lap.
                self._d16[pos * 8 + 7] = (flags & ~AVAIL_USED & 0xFFFF) | expect
                pos += 1
                if pos == self.size:
                    pos = 0
                    expect ^= AVAIL_USED

    # -- state ----------------------------------------------------------------

    def state(self) -> QueueState:
        """Everything needed to rebuild the queue with :meth:`from_state`, ints and bools.

        ``used_since_signal`` and ``notify_flags`` are the signalling markers:
        ring slots used since the last :meth:`needs_notification`, and what
        the device last wrote to its event suppression area.
        """
        return {
            "format": "packed",
            **self._state(
                {
                    **ring_positions(
                        self._next_avail, self._avail_wrap, self._next_used, self._used_wrap
                    ),
                    "used_since_signal": self._used_since_signal,
                    "notify_flags": self._notify_flags,
                }
            ),
        }

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> PackedDeviceQueue:
        """Rebuild a queue from :meth:`state`; guest memory holds the ring itself.

        Nothing is written to guest memory.  An inconsistent state raises
        :class:`VirtqueueError`.
        """
        fields = packed_state(state)
        queue = cls._from_geometry(mem, fields)
        size = queue.size
        next_avail = fields.integer("next_avail")
        next_used = fields.integer("next_used")
        avail_wrap = int(fields.flag("avail_wrap_counter"))
        used_wrap = int(fields.flag("used_wrap_counter"))
        used_since_signal = fields.integer("used_since_signal")
        notify_flags = fields.integer("notify_flags")
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
        return queue
