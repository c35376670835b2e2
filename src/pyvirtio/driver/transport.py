"""What device drivers need of a driver transport, whichever it is.

:class:`~pyvirtio.driver.mmio.MmioDriverTransport` (in-process or qtest) and
:class:`~pyvirtio.driver.vhost_user.VhostUserFrontend` both have it; device
drivers (``driver.blk``, ``driver.net``) type their transport with these
protocols so they run over either.
"""

from __future__ import annotations

from typing import Protocol

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DriverQueue

__all__ = ["BufferAllocator", "DriverTransport"]


class BufferAllocator(Protocol):
    """Guest memory for rings and buffers (e.g. :class:`~pyvirtio.driver.memory.GuestAllocator`)."""

    def alloc(self, size: int, align: int = 16) -> int: ...

    def free(self, addr: int) -> None: ...


class DriverTransport(Protocol):
    """Device initialization, queues, config space and interrupts (content.tex,
    "Device Initialization"), as every device driver uses them."""

    @property
    def mem(self) -> GuestMemory: ...

    @property
    def allocator(self) -> BufferAllocator: ...

    def initialize(self, wanted_features: int) -> int:
        """Reset .. FEATURES_OK; returns the negotiated features."""
        ...

    def setup_queue(
        self, index: int, size: int | None = None, packed_ring: bool | None = None
    ) -> DriverQueue: ...

    def driver_ok(self) -> None: ...

    def notify(self, index: int) -> None: ...

    def read_config(self, offset: int, size: int) -> int: ...

    def wait_interrupt(self, timeout: float | None = None) -> int:
        """Block until the device interrupts (or ``timeout``); 0 on timeout."""
        ...
