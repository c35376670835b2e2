"""Virtqueues: one module per ring format, each holding the device and driver side."""

from __future__ import annotations

from pyvirtio.virtqueue.common import (
    MAX_QUEUE_SIZE,
    DescriptorChain,
    DeviceQueue,
    DriverQueue,
    QueueFullError,
    QueueState,
    VirtqueueError,
    ring_need_event,
)

__all__ = [
    "MAX_QUEUE_SIZE",
    "DescriptorChain",
    "DeviceQueue",
    "DriverQueue",
    "QueueFullError",
    "QueueState",
    "VirtqueueError",
    "ring_need_event",
]
