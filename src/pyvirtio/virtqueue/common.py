"""What the split and packed ring formats share: errors, descriptor chains, interfaces.

Each ring format lives in its own module (:mod:`.split`, :mod:`.packed`) with
both of its sides; this module only holds the types both formats return and
the two protocols a transport or driver programs against, so the rest of
pyvirtio never needs to know which format a queue uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

from pyvirtio.memory import GuestMemory, GuestMemoryError

__all__ = [
    "MAX_QUEUE_SIZE",
    "Buffers",
    "DescriptorChain",
    "DeviceQueue",
    "DriverQueue",
    "QueueFullError",
    "QueueState",
    "VirtqueueError",
    "ring_need_event",
]

#: Largest queue size either format allows (split-ring.tex / packed-ring.tex).
MAX_QUEUE_SIZE: Final = 32768

#: Descriptor flags, identical in both formats (VIRTQ_DESC_F_*).
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4

#: A scatter-gather list: ``(guest address, length)`` pairs, in order.
Buffers: TypeAlias = Sequence[tuple[int, int]]

#: Plain-dict form of a queue's state, for snapshots (values are ints and bools).
QueueState = dict[str, Any]


class VirtqueueError(Exception):
    """A malformed ring or descriptor chain; the message names the problem.

    Raised by the device side for anything the driver wrote wrongly.  After
    it is raised the queue is *broken* (``queue.broken`` is true) and every
    further ``pop`` raises again, so a transport can set DEVICE_NEEDS_RESET.
    """


class QueueFullError(Exception):
    """Driver side: the ring has no room for the descriptors of this request."""


def ring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event``: did the index move past ``event_idx``?

    True when ``event_idx`` lies in ``[old_idx, new_idx)`` modulo 2**16
    (split-ring.tex, "Used Buffer Notification Suppression").
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class DescriptorChain:
    """One available buffer as the device sees it.

    ``head`` is the identifier the device hands back in ``add_used``: the head
    descriptor index for split rings, the buffer ID for packed rings.
    ``readable`` and ``writable`` are the driver-to-device and
    device-to-driver parts as ordered ``(guest address, length)`` lists, with
    indirect tables already flattened.  ``ring_slots`` is how many ring
    descriptors the chain occupied (packed rings need it to skip them).
    Every range was checked against guest memory when the chain was parsed.
    """

    __slots__ = (
        "head",
        "mem",
        "readable",
        "readable_len",
        "ring_slots",
        "writable",
        "writable_len",
    )

    def __init__(
        self,
        mem: GuestMemory,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
        ring_slots: int = 1,
    ) -> None:
        self.mem = mem
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.ring_slots = ring_slots

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B/"
            f"{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )

    # -- readable part --------------------------------------------------------

    def read_all(self) -> bytes:
        """Every readable byte, gathered."""
        readable = self.readable
        if len(readable) == 1:
            addr, length = readable[0]
            return self.mem.read(addr, length)
        return self.mem.readv(readable)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` readable bytes from ``offset`` (fewer if the part is shorter)."""
        return b"".join(bytes(v) for v in _slice_views(self.mem, self.readable, offset, length))

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the readable part (optionally a sub-range), e.g. for pwritev."""
        if length is None:
            length = max(0, self.readable_len - offset)
        return _slice_views(self.mem, self.readable, offset, length)

    # -- writable part --------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable part at ``offset``; returns bytes written."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in _slice_views(self.mem, self.writable, offset, len(src)):
            n = len(view)
            view[:] = src[pos : pos + n]
            pos += n
        return pos

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the writable part (optionally a sub-range), e.g. for preadv."""
        if length is None:
            length = max(0, self.writable_len - offset)
        return _slice_views(self.mem, self.writable, offset, length)


def _slice_views(
    mem: GuestMemory, ranges: Sequence[tuple[int, int]], offset: int, length: int
) -> list[memoryview]:
    """Views covering ``length`` bytes from ``offset`` of a scatter-gather list."""
    out: list[memoryview] = []
    if length <= 0:
        return out
    for addr, size in ranges:
        if offset >= size:
            offset -= size
            continue
        n = min(size - offset, length)
        try:
            out.extend(mem.views([(addr + offset, n)]))
        except GuestMemoryError as exc:  # regions removed since the chain was parsed
            raise VirtqueueError(str(exc)) from exc
        length -= n
        offset = 0
        if length == 0:
            break
    return out


@runtime_checkable
class DeviceQueue(Protocol):
    """The device side of a virtqueue, whatever its ring format.

    Sans-IO: it reads and writes guest memory and nothing else.  Whoever owns
    the queue (a transport host, a vhost-user back end) turns a True from
    :meth:`needs_notification` into an interrupt or an eventfd write.
    """

    size: int
    broken: bool

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises VirtqueueError if malformed."""

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written into it."""

    def add_used_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return several chains with one index update."""

    def needs_notification(self) -> bool:
        """After add_used: must the driver be notified?  Records that it was asked."""

    def enable_notifications(self) -> bool:
        """Ask the driver to notify on new buffers; True if some arrived meanwhile."""

    def disable_notifications(self) -> None:
        """Tell the driver that notifications are not needed (a hint)."""

    def has_available(self) -> bool:
        """Whether pop would return a chain (or raise), without consuming it."""

    def state(self) -> QueueState:
        """Snapshot of everything needed to rebuild the queue, as a plain dict."""


@runtime_checkable
class DriverQueue(Protocol):
    """The driver side of a virtqueue, whatever its ring format."""

    size: int

    @property
    def num_free(self) -> int:
        """Ring descriptors free for new requests."""

    def add(self, readable: Buffers, writable: Buffers, token: object) -> None:
        """Expose a buffer to the device.  Raises QueueFullError when there is no room."""

    def kick_needed(self) -> bool:
        """After add: must the device be notified?  Records that it was asked."""

    def used(self) -> Iterator[tuple[object, int]]:
        """Yield ``(token, written)`` for every buffer the device has returned."""

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; True if buffers were used meanwhile."""

    def disable_interrupts(self) -> None:
        """Tell the device that used-buffer notifications are not needed (a hint)."""

    def state(self) -> QueueState:
        """Snapshot of the queue's state, as a plain dict."""
