"""The driver side of the split ring: :class:`SplitDriverQueue` (see :mod:`.split`)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.base import DriverRing
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    Buffers,
    QueueState,
    ring_need_event,
)
from pyvirtio.virtqueue.errors import QueueFullError, VirtqueueError
from pyvirtio.virtqueue.ring import (
    CHAIN_BYTES_LIMIT,
    DESC,
    DESC_SIZE,
    StateReader,
    full_barrier,
    read_span,
)
from pyvirtio.virtqueue.split_layout import (
    MAX_INDIRECT_DESCS,
    READ_MORE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    WRITE_LAST,
    WRITE_MORE,
    area_sizes,
    enable_events,
    map_rings,
)

__all__ = ["SplitDriverQueue"]

_pack_desc: Final = DESC.pack_into


class SplitDriverQueue(DriverRing):
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
        "_track_used_event",
        "_used",
        "_used_event",
        "_used_ring",
    )

    def _area_sizes(self) -> tuple[int, int, int]:
        return area_sizes(self.size)

    def _map_rings(self) -> None:
        size = self.size
        # Every area but avail_event, which only the device writes.
        (
            self._desc,
            self._avail,
            self._avail_ring,
            self._used_event,
            self._used,
            self._used_ring,
            _,
        ) = map_rings(self)
        self._mask = size - 1
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

    def _map_indirect(self, indirect_addr: int | None, max_indirect: int) -> None:
        self._ind_view: memoryview | None = None
        self._ind_stride = 0
        self.indirect_addr = self._indirect_base = 0
        self.max_indirect = 0
        if self.indirect:
            if indirect_addr is None:
                raise ValueError("indirect=True needs indirect_addr")
            if not 1 <= max_indirect <= MAX_INDIRECT_DESCS:
                raise ValueError(f"max_indirect {max_indirect} outside 1..{MAX_INDIRECT_DESCS}")
            self._ind_view = self._indirect_area("indirect area", indirect_addr, max_indirect)
            self.indirect_addr = self._indirect_base = indirect_addr
            self.max_indirect = max_indirect
            self._ind_stride = max_indirect * DESC_SIZE

    def __repr__(self) -> str:
        return (
            f"SplitDriverQueue(size={self.size}, avail_idx={self._avail_idx}, "
            f"last_used={self._last_used}, in_flight={self.in_flight})"
        )

    # -- state ------------------------------------------------------------------

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
        return self._state(
            {
                "indirect_addr": self.indirect_addr,
                "max_indirect": self.max_indirect,
                "avail_idx": self._avail_idx,
                "last_used": self._last_used,
                "kick_marker": self._kick_marker,
                "interrupts_enabled": self._interrupts_enabled,
                "num_free": self._num_free,
                "in_flight": self.in_flight,
            }
        )

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> SplitDriverQueue:
        """Rebuild an idle queue (nothing in flight) from :meth:`state`.

        Guest memory is not touched, unlike the constructor, which zeroes the
        rings: the rings' indices are expected to be where the state says.
        """
        fields = StateReader(state)
        queue = cls._idle_from_state(mem, fields)
        queue._avail_idx = fields.u16("avail_idx")
        queue._last_used = fields.u16("last_used")
        queue._kick_marker = fields.u16("kick_marker")
        queue._interrupts_enabled = fields.flag("interrupts_enabled")
        queue._track_used_event = queue.event_idx and queue._interrupts_enabled
        if queue.in_flight:
            raise ValueError("queue state has avail_idx != last_used but nothing in flight")
        return queue

    # -- available ring ---------------------------------------------------------

    def add(self, readable: Buffers, writable: Buffers, token: object) -> None:
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
        nwrite = len(writable)
        total = len(readable) + nwrite
        head = self._free_head
        try:
            if total > 1 and total <= self.max_indirect:
                if not self._num_free:
                    raise QueueFullError(f"no free descriptor (queue size {self.size})")
                wlen = self._fill_indirect(head, readable, writable, total)
                last = head
                ndescs = 1
            elif total <= self._num_free and total:
                # A direct chain along the free list: readable buffers, then
                # writable ones, each descriptor but the last with NEXT and
                # its link.
                desc = self._desc
                last = head
                more = total  # descriptors left to write, this one included
                flags = READ_MORE
                nbytes = 0
                rlen = 0
                for addr, length in (
                    writable if not readable else readable if not nwrite else [*readable, *writable]
                ):
                    if more == nwrite:  # the first writable buffer
                        flags = WRITE_MORE
                        rlen = nbytes
                    more -= 1
                    nbytes += length
                    if more:
                        nxt = self._next[last]
                        _pack_desc(desc, last * DESC_SIZE, addr, length, flags, nxt)
                        last = nxt
                    else:
                        _pack_desc(desc, last * DESC_SIZE, addr, length, flags - DESC_F_NEXT, 0)
                # One buffer is below 2**32 by its u32 length field.
                if total > 1 and nbytes > CHAIN_BYTES_LIMIT:
                    raise ValueError(f"request of {nbytes} bytes exceeds 2**32")
                wlen = nbytes - rlen if nwrite else 0
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
        readable: Buffers,
        writable: Buffers,
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
                data_flags = WRITE_MORE
                wlen = data[1] + last[1]
            else:
                first, data = readable
                last = writable[0]
                data_flags = READ_MORE
                wlen = last[1]
            if first[1] + data[1] + last[1] > CHAIN_BYTES_LIMIT:
                raise ValueError(f"request of {first[1] + data[1] + last[1]} bytes exceeds 2**32")
            if cache[head] != (first, last):
                cache[head] = None  # until both are written
                pack(table, base, first[0], first[1], READ_MORE, 1)
                pack(table, base + 32, last[0], last[1], WRITE_LAST, 0)
                cache[head] = (first, last)
            pack(table, base + 16, data[0], data[1], data_flags, 2)
            pack(self._desc, head * DESC_SIZE, self._indirect_base + base, 48, DESC_F_INDIRECT, 0)
            return wlen
        cache[head] = None  # the entries are rewritten below
        # Readable then writable entries in one loop, the WRITE bit set from
        # the first writable one on.
        nread = total - len(writable)
        flags = READ_MORE
        offset = base
        position = 0
        nbytes = 0
        rlen = 0
        for addr, length in [*readable, *writable]:
            if position == nread:
                flags = WRITE_MORE
                rlen = nbytes
            position += 1
            nbytes += length
            if position < total:
                pack(table, offset, addr, length, flags, position)
            else:
                pack(table, offset, addr, length, flags - DESC_F_NEXT, 0)
            offset += DESC_SIZE
        if nbytes > CHAIN_BYTES_LIMIT:
            raise ValueError(f"request of {nbytes} bytes exceeds 2**32")
        wlen = nbytes - rlen if position > nread else 0
        pack(
            self._desc,
            head * 16,
            self._indirect_base + base,
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
            # The (id, len) u32 pairs, copied with one slice per lap of the
            # ring and taken two at a time.
            k = (last & mask) * 2
            stop = k + 2 * count
            if stop <= slots:
                values = read_span(ring, k, stop)
            else:  # wraps around the end of the ring
                values = read_span(ring, k, slots) + read_span(ring, 0, stop - slots)
            pairs = iter(values)
            for head, written in zip(pairs, pairs, strict=True):
                try:
                    info = infos[head]
                except IndexError:
                    info = None
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
        enable_events(self._used_event, self._avail, self.event_idx, self._last_used)
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
