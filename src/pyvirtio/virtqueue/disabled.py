"""A stand-in for a virtqueue the driver did not enable.

``VirtioDevice.activate`` takes exactly one queue per entry of
``queue_max_sizes``, but a driver need not enable every queue a device
declares (a console driver without MULTIPORT leaves the control queues
alone; Linux only sets up the queues it asks ``find_vqs`` for).  A transport
passes a :class:`DisabledQueue` in those positions, so device models index
``self.queues`` the same way whether or not the driver set a queue up, and a
disabled queue simply never has buffers.  A model that cannot run without a
queue refuses in ``_on_activate`` with ``isinstance(queue, DisabledQueue)``.

The device MUST NOT access virtqueue contents while QueueReady is zero
(transport-mmio.tex, "MMIO Device Register Layout"): a disabled queue has no
ring in guest memory at all, so it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.common import QueueState
from pyvirtio.virtqueue.errors import VirtqueueError

__all__ = ["DisabledQueue"]


class DisabledQueue:
    """A :class:`~pyvirtio.virtqueue.common.DeviceQueue` with no ring: never any buffers."""

    size: int
    broken: bool

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.broken = False

    def __repr__(self) -> str:
        return "DisabledQueue()"

    def pop(self) -> DescriptorChain | None:
        return None

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        raise VirtqueueError("add_used on a disabled queue")

    def add_used_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        if completions:
            raise VirtqueueError("add_used_batch on a disabled queue")

    def needs_notification(self) -> bool:
        return False

    def enable_notifications(self) -> bool:
        return False

    def disable_notifications(self) -> None:
        pass

    def has_available(self) -> bool:
        return False

    def state(self) -> QueueState:
        return {"disabled": True}

    @classmethod
    def from_state(cls, state: QueueState) -> DisabledQueue:
        return cls()
