"""What the split and packed ring formats share: errors, descriptor chains, interfaces.

Each ring format lives in its own modules (:mod:`.split`, :mod:`.packed`) with
both of its sides; this module holds the constants and types both formats
use and the two protocols a transport or driver programs against, so the
rest of pyvirtio never needs to know which format a queue uses.  The errors
(:mod:`.errors`) and :class:`DescriptorChain` (:mod:`.chain`) have modules of
their own and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.errors import QueueFullError, VirtqueueError

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


def ring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event``: did the index move past ``event_idx``?

    True when ``event_idx`` lies in ``[old_idx, new_idx)`` modulo 2**16
    (split-ring.tex, "Used Buffer Notification Suppression").
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


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
