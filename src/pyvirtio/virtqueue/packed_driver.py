"""The driver side of the packed ring: :class:`PackedDriverQueue` (see :mod:`.packed`)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.base import DriverRing
from pyvirtio.virtqueue.common import DESC_F_INDIRECT, DESC_F_WRITE, Buffers, QueueState
from pyvirtio.virtqueue.errors import QueueFullError, VirtqueueError
from pyvirtio.virtqueue.packed_layout import (
    AVAIL_USED,
    DESC_F_AVAIL,
    DESC_F_USED,
    MAX_INDIRECT_ENTRIES,
    READ_MORE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_ENABLE,
    WRAP_BIT,
    WRITE_LAST,
    WRITE_MORE,
    area_sizes,
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
    Words,
    words,
)

__all__ = ["PackedDriverQueue"]

_pack_desc: Final = DESC.pack_into
#: A descriptor's ``addr``, ``len`` and ``id``: everything but the flags that publish it.
_pack_desc_head: Final = struct.Struct("<QIH").pack_into
#: A used descriptor's ``len`` and ``id``, read after its flags.
_unpack_used: Final = struct.Struct("<IH").unpack_from


class PackedDriverQueue(DriverRing):
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
        "_irq_flags",
        "_next_avail",
        "_next_used",
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
    )

    def __repr__(self) -> str:
        return (
            f"PackedDriverQueue(size={self.size}, free={self._num_free}, "
            f"in_flight={self.in_flight})"
        )

    def _area_sizes(self) -> tuple[int, int, int]:
        return area_sizes(self.size)

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> PackedDriverQueue:
        """Rebuild an idle queue (nothing in flight) from :meth:`state`.

        Guest memory is not touched, unlike the constructor, which zeroes the
        ring: the ring is expected to be where the state says.
        """
        fields = packed_state(state)
        queue = cls._idle_from_state(mem, fields)
        size = queue.size
        queue._next_avail = ring_position(fields.integer("next_avail"), size, "next_avail")
        queue._avail_wrap = int(fields.flag("avail_wrap_counter"))
        queue._avail_flags = DESC_F_AVAIL if queue._avail_wrap else DESC_F_USED
        queue._next_used = ring_position(fields.integer("next_used"), size, "next_used")
        queue._used_wrap = int(fields.flag("used_wrap_counter"))
        queue._used_expect = AVAIL_USED if queue._used_wrap else 0
        if (queue._next_avail, queue._avail_wrap) != (queue._next_used, queue._used_wrap):
            raise ValueError("queue state has next_avail != next_used but nothing in flight")
        queue._added_since_kick = fields.integer("added_since_kick")
        irq_flags = fields.integer("interrupt_flags", 0, RING_EVENT_FLAGS_DESC)
        queue._set_irq_flags(irq_flags)
        return queue

    def _map_indirect(self, indirect_addr: int | None, max_indirect: int) -> None:
        if not self.indirect:
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
            table = self._indirect_area("indirect table area", indirect_addr, max_indirect)
            self._t16 = words(table, "H")
            self._t32 = words(table, "I")
            self._t64 = words(table, "Q")

    def _map_rings(self) -> None:
        size = self.size
        # The driver's event area is written by us, the device's read only.
        self._ring, self._d16, self._d32, self._d64, self._drv16, self._dev16 = map_ring(self)
        # Driver ring wrap counter starts at 1: available descriptors carry
        # AVAIL = counter and USED = !counter (packed-ring.tex, "Driver and
        # Device Ring Wrap Counters").
        self._next_avail = 0
        self._avail_wrap = 1
        self._avail_flags = DESC_F_AVAIL
        self._next_used = 0
        self._used_wrap = 1
        self._used_expect = AVAIL_USED  # used: AVAIL == USED == used wrap counter
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

    @property
    def in_flight(self) -> int:
        """Buffers made available and not yet returned by the device."""
        return self.size - len(self._free_ids)

    # -- making buffers available -----------------------------------------------

    def add(self, readable: Buffers, writable: Buffers, token: object) -> None:
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
                    avail_flags ^= AVAIL_USED
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
                            head_flags += READ_MORE
                    else:
                        flags = avail_flags + READ_MORE if remaining else avail_flags
                        _pack_desc(ring, pos * DESC_SIZE, addr, length, bid, flags)
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= AVAIL_USED
                for addr, length in writable:
                    remaining -= 1
                    if pos == head:
                        _pack_desc_head(ring, pos * DESC_SIZE, addr, length, bid)
                        head_flags += WRITE_MORE if remaining else WRITE_LAST
                    else:
                        flags = avail_flags + (WRITE_MORE if remaining else WRITE_LAST)
                        _pack_desc(ring, pos * DESC_SIZE, addr, length, bid, flags)
                    wlen += length
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail_flags ^= AVAIL_USED
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
        readable: Buffers,
        writable: Buffers,
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
        :func:`event_wanted` for the DESC comparison.
        """
        count = self._added_since_kick
        self._added_since_kick = 0
        return event_wanted(
            self._dev16, self.event_idx, self._next_avail, self._avail_wrap, count, self.size
        )

    # -- used buffers -----------------------------------------------------------

    def has_used(self) -> bool:
        """Whether :meth:`used` would yield something (or raise)."""
        return self.broken or self._used_ready()

    def _used_ready(self) -> bool:
        if self._num_free == self.size:
            return False  # nothing in flight: whatever the ring holds is not ours
        flags = self._d16[self._next_used * 8 + 7]
        return (flags & AVAIL_USED) == self._used_expect

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
            elif (flags & AVAIL_USED) == expect:
                write = bool(flags & DESC_F_WRITE)
            else:
                return
            # Declared ints: compiled, they compare and add as machine words.
            length: int
            bid: int
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
                self._used_expect ^= AVAIL_USED
            self._next_used = pos
            self._num_free += n
            if self._track_used_event:
                # Move the event to the next used descriptor we expect, or the
                # device would never pass it again (Linux does the same).
                self._drv16[0] = pos + self._used_wrap * WRAP_BIT
            yield token, written

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications; True if buffers were used meanwhile.

        With EVENT_IDX: DESC at the next used position and wrap counter
        (offset stored before the flags); otherwise ENABLE.  The re-check
        after a full barrier is the spec's guard against a lost notification
        (packed-ring.tex, "Receiving Used Buffers From The Device").
        """
        self._set_irq_flags(
            enable_events(self._drv16, self.event_idx, self._next_used, self._used_wrap)
        )
        return self._used_ready()

    def disable_interrupts(self) -> None:
        """Tell the device not to send used buffer notifications (a hint)."""
        self._set_irq_flags(disable_events(self._drv16))

    def state(self) -> QueueState:
        """Snapshot of the queue's positions and counters, as a plain dict."""
        return {
            "format": "packed",
            **self._state(
                {
                    **ring_positions(
                        self._next_avail, self._avail_wrap, self._next_used, self._used_wrap
                    ),
                    "num_free": self._num_free,
                    "in_flight": self.in_flight,
                    "added_since_kick": self._added_since_kick,
                    "interrupt_flags": self._irq_flags,
                    "indirect_addr": self.indirect_addr,
                    "max_indirect": self.max_indirect,
                }
            ),
        }
