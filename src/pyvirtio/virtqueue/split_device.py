"""The device side of the split ring: :class:`SplitDeviceQueue` (see :mod:`.split`)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, Protocol

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.base import DeviceRing
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.common import DESC_F_INDIRECT, DESC_F_NEXT, QueueState, ring_need_event
from pyvirtio.virtqueue.errors import VirtqueueError
from pyvirtio.virtqueue.ring import (
    CHAIN_BYTES_LIMIT,
    DESC,
    DESC_SIZE,
    U64_LIMIT,
    StateReader,
    full_barrier,
    read_span,
)
from pyvirtio.virtqueue.split_layout import (
    BULK_MIN,
    MAX_INDIRECT_DESCS,
    READ_LAST,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    WRITE_LAST,
    WRITE_MORE,
    enable_events,
    map_rings,
)

__all__ = ["InflightRecorder", "SplitDeviceQueue"]


class InflightRecorder(Protocol):
    """What a host records for every chain a queue takes and completes.

    vhost-user's inflight tracking (vhost-user.rst "Inflight I/O tracking",
    :class:`pyvirtio.transport.vhost_user.inflight.SplitInflight`) keeps, in
    memory the front end holds across back-end restarts, which heads are in
    flight and which batch of completions was being published.
    """

    def pop(self, head: int) -> None:
        """``head`` was taken: in flight from now on."""

    def before_publish(self, heads: Sequence[int]) -> None:
        """Used elements for ``heads`` are written; the used idx is not yet."""

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        """The used idx is now ``used_idx``: ``heads`` are no longer in flight."""


_unpack_desc: Final = DESC.unpack_from


def _ring_index(index: object, what: str) -> int:
    """``index`` as a 16-bit ring index; ValueError otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF:
        raise ValueError(f"{what} {index!r} is not a 16-bit ring index")
    return index


def _check_buffer(mem: GuestMemory, addr: int, length: int, where: str) -> None:
    """The slow bounds check, for buffers outside the cached region window."""
    if addr + length > U64_LIMIT:
        raise VirtqueueError(f"{where}: buffer {addr:#x}+{length:#x} overflows 2**64")
    if length and not mem.is_valid(addr, length):
        raise VirtqueueError(
            f"{where}: buffer [{addr:#x}, {addr + length:#x}) is outside guest memory"
        )


class SplitDeviceQueue(DeviceRing):
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
        "_mask",
        "_next_avail",
        "_next_used",
        "_notify_enabled",
        "_signalled_used",
        "_track_avail_event",
        "_used",
        "_used_ring",
        "inflight",
    )

    def _map_rings(self) -> None:
        # Every area but used_event, which only the driver writes.
        (
            self._desc,
            self._avail,
            self._avail_ring,
            _,
            self._used,
            self._used_ring,
            self._avail_event,
        ) = map_rings(self)
        self._mask = self.size - 1
        self._next_avail = 0
        # Available ring entries read ahead by pop, the next one last.
        self._heads: list[int] = []
        self._next_used = 0
        self._signalled_used = 0
        self._notify_enabled = True
        # pop keeps avail_event current while this is set.
        self._track_avail_event = self.event_idx
        # Buffers are checked inline against the largest region (pop).
        self._forget_window()
        #: Set by a host that records chains in flight (None: nothing recorded).
        self.inflight: InflightRecorder | None = None

    def __repr__(self) -> str:
        return (
            f"SplitDeviceQueue(size={self.size}, next_avail={self._next_avail}, "
            f"next_used={self._next_used}, broken={self.broken})"
        )

    # -- state ------------------------------------------------------------------

    def state(self) -> QueueState:
        """Everything needed to rebuild this queue over the same guest memory."""
        return self._state(
            {
                "next_avail": self._next_avail,
                "next_used": self._next_used,
                "signalled_used": self._signalled_used,
                "notifications_enabled": self._notify_enabled,
            }
        )

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> SplitDeviceQueue:
        """Rebuild a queue from :meth:`state` (e.g. after migration or snapshot).

        Guest memory is not touched: the rings are wherever the snapshot left
        them.  A malformed state raises VirtqueueError.
        """
        fields = StateReader(state)
        queue = cls._from_geometry(mem, fields)
        queue._next_avail = fields.u16("next_avail")
        queue._next_used = fields.u16("next_used")
        queue._signalled_used = fields.u16("signalled_used")
        queue._notify_enabled = fields.flag("notifications_enabled")
        queue._track_avail_event = queue.event_idx and queue._notify_enabled
        return queue

    # -- ring positions, for hosts (vhost-user SET_VRING_BASE / GET_VRING_BASE) --

    @property
    def next_avail(self) -> int:
        """Available-ring index of the next chain :meth:`pop` will take."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, index: object) -> None:
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
    def next_used(self, index: object) -> None:
        """Resume completing at used-ring index ``index`` (0..65535).

        The notification marker moves with it, so the first completion
        after the move is judged against ``index`` (split-ring.tex, "Used
        Buffer Notification Suppression").
        """
        self._next_used = self._signalled_used = _ring_index(index, "next_used")

    def resubmit(self, heads: Sequence[int]) -> None:
        """Take ``heads`` next, in order, before the available ring's next entries.

        For a host that restarts a ring whose chains were taken but not
        completed by a previous owner (vhost-user inflight tracking): put
        :attr:`next_avail` where the first of them was, then pass them here.
        Each goes through the one walker as if read from the ring, and
        advances :attr:`next_avail` by one.
        """
        for head in heads:
            if not 0 <= head < self.size:
                raise ValueError(f"resubmitted head {head} outside a queue of {self.size}")
        self._heads = list(reversed(heads))

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
                if pending < BULK_MIN:
                    head = self._avail_ring[next_avail & self._mask]
                else:
                    head = self._read_ahead(next_avail, pending)
            size = self.size
            if head >= size:
                raise VirtqueueError(f"available ring head {head} >= queue size {size}")
            mem = self.mem
            # Buffers inside the largest region are checked inline against
            # its window, while the window is current (GuestMemory.window).
            # The bounds are read from slots: most chains are one descriptor.
            if self._window_table is not mem.regions:
                self._take_window()
            lo = self._lo
            hi = self._hi
            table: memoryview | bytes = self._desc
            entries = size  # descriptors in ``table``, the bound of ``next``
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            rlen = 0
            wlen = 0
            index = head
            count = 1
            slots = 0  # descriptors of the ring's table, once an indirect one ends the chain
            # Declared ints: compiled, they compare and add as machine words.
            addr: int
            length: int
            flags: int
            nxt: int
            addr, length, flags, nxt = _unpack_desc(table, head * DESC_SIZE)
            while True:
                # Dispatch on the NEXT and WRITE bits (READ_* < WRITE_LAST <=
                # WRITE_MORE); anything above is INDIRECT or reserved bits.
                if flags < WRITE_LAST:
                    if addr < lo or addr + length > hi:
                        _check_buffer(mem, addr, length, self._where(table, index))
                    if writable:
                        raise VirtqueueError(
                            f"{self._where(table, index)}: "
                            "device-readable buffer after a device-writable one"
                        )
                    readable.append((addr, length))
                    rlen += length
                    if flags == READ_LAST:
                        break
                elif flags <= WRITE_MORE:
                    if addr < lo or addr + length > hi:
                        _check_buffer(mem, addr, length, self._where(table, index))
                    writable.append((addr, length))
                    wlen += length
                    if flags == WRITE_LAST:
                        break
                elif flags & DESC_F_INDIRECT:
                    # The table ends the chain; walk it in place of the ring's.
                    table = self._indirect_table(addr, length, flags, index, table)
                    entries = length // DESC_SIZE
                    index = 0
                    slots = count
                    count = 1
                    addr, length, flags, nxt = _unpack_desc(table, 0)
                    continue
                else:
                    flags &= WRITE_MORE  # reserved bits are ignored
                    continue
                if nxt >= entries:
                    if table is not self._desc:
                        raise VirtqueueError(
                            f"indirect descriptor {index}: next {nxt} >= table size {entries}"
                        )
                    raise VirtqueueError(f"descriptor {index}: next {nxt} >= queue size {size}")
                count += 1
                if count > entries:
                    if table is not self._desc:
                        raise VirtqueueError(
                            f"indirect chain is longer than its table of {entries} (a loop?)"
                        )
                    raise VirtqueueError(
                        f"descriptor chain from head {head} is longer than the queue size "
                        f"{size} (a loop?)"
                    )
                index = nxt
                addr, length, flags, nxt = _unpack_desc(table, nxt * DESC_SIZE)
            # One buffer is below 2**32 by its u32 length field.
            if count > 1 and rlen + wlen > CHAIN_BYTES_LIMIT:
                raise VirtqueueError(
                    f"descriptor chain from head {head} totals {rlen + wlen} bytes, more than 2**32"
                )
            if self.inflight is not None:
                self.inflight.pop(head)
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
        return DescriptorChain(mem, head, readable, writable, rlen, wlen, slots or count)

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

    def _where(self, table: memoryview | bytes, index: int) -> str:
        """How error messages name descriptor ``index`` of ``table``."""
        if table is self._desc:
            return f"descriptor {index}"
        return f"indirect descriptor {index}"

    def _indirect_table(
        self, addr: int, length: int, flags: int, index: int, table: memoryview | bytes
    ) -> memoryview | bytes:
        """The bytes of the indirect table a descriptor points at, after its checks.

        split-ring.tex, "Indirect Descriptors": only with
        VIRTIO_F_INDIRECT_DESC, never with NEXT, never nested, a non-zero
        multiple of 16 bytes.
        """
        if table is not self._desc:
            raise VirtqueueError(f"indirect descriptor {index} is itself INDIRECT (nested)")
        if flags & DESC_F_NEXT:
            raise VirtqueueError(f"descriptor {index} has both INDIRECT and NEXT flags")
        if not self.indirect:
            raise VirtqueueError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
        if length == 0 or length % DESC_SIZE:
            raise VirtqueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        if length // DESC_SIZE > MAX_INDIRECT_DESCS:
            raise VirtqueueError(
                f"indirect table of {length // DESC_SIZE} descriptors exceeds {MAX_INDIRECT_DESCS}"
            )
        # pop took the window for the current region table: its bounds suffice.
        lo = self._lo
        if lo <= addr and addr + length <= self._hi:
            return self._window.view[addr - lo : addr - lo + length]
        _check_buffer(self.mem, addr, length, "descriptor (indirect table)")
        return self.mem.read(addr, length)

    # -- used ring --------------------------------------------------------------

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` with ``written`` bytes written into its writable part.

        The element is stored before the used idx that publishes it
        (split-ring.tex, "The Virtqueue Used Ring": "The device MUST set len
        prior to updating the used idx").
        """
        self.add_used_batch(((chain, written),))

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
        end = 2 * size
        # Each (id, len) pair is checked and stored in its slot.  Slots past
        # the used idx are the device's (split-ring.tex, "The Virtqueue Used
        # Ring"): if one element is invalid the idx is not moved, and the
        # driver sees none of them.
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
        used_idx = (used_idx + count) & 0xFFFF
        self._next_used = used_idx
        inflight = self.inflight
        if inflight is None:
            self._used[1] = used_idx
            return
        # vhost-user.rst "Inflight I/O tracking": link the batch, publish,
        # then clear it, so a crash between any two steps can be repaired.
        heads = [chain.head for chain, _ in completions]
        inflight.before_publish(heads)
        self._used[1] = used_idx
        inflight.after_publish(heads, used_idx)

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
        enable_events(self._avail_event, self._used, self.event_idx, self._next_avail)
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
