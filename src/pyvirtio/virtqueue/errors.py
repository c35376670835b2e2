"""The errors a virtqueue raises, on either side and in either ring format."""

from __future__ import annotations

__all__ = ["QueueFullError", "VirtqueueError"]


class VirtqueueError(Exception):
    """A malformed ring or descriptor chain; the message names the problem.

    Raised by the device side for anything the driver wrote wrongly.  After
    it is raised the queue is *broken* (``queue.broken`` is true) and every
    further ``pop`` raises again, so a transport can set DEVICE_NEEDS_RESET.
    """


class QueueFullError(Exception):
    """Driver side: the ring has no room for the descriptors of this request."""
