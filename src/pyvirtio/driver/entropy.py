"""A minimal virtio-rng driver over virtio-MMIO (device-types/entropy).

It does what Linux's ``virtio-rng`` does: one device-writable buffer on the
requestq at a time, and the used length says how many random bytes arrived
(device-types/entropy: Driver Requirements: Device Operation: the driver
"MUST examine the length written").  A device may return fewer bytes than
asked, or none (pyvirtio's device does when its source fails), so
:meth:`EntropyDriver.read` keeps asking until it has ``n`` bytes, and gives
up after ``max_empty`` empty completions in a row rather than spinning.
"""

from __future__ import annotations

import time

from pyvirtio.constants import COMMON_FEATURES, DeviceId, Feature
from pyvirtio.driver.memory import OwnedBuffers
from pyvirtio.driver.mmio import MmioDriverError, MmioDriverTransport
from pyvirtio.driver.transport import check_device_id, requested_features, wait_until

__all__ = ["DEFAULT_BUFFER_SIZE", "EntropyDriver", "EntropyDriverError"]

#: Bytes asked for per request (the device may cap a request lower).
DEFAULT_BUFFER_SIZE = 64 * 1024

#: What the driver can use: ring features are all handled by pyvirtio.virtqueue.
SUPPORTED_FEATURES = COMMON_FEATURES

REQUESTQ = 0


class EntropyDriverError(MmioDriverError):
    """The device stopped delivering (needs reset, timed out or keeps returning nothing)."""


class EntropyDriver:
    """Initializes the entropy device behind ``transport`` and reads random bytes from it.

    ``features`` limits what is negotiated (default: everything the driver
    supports).  ``timeout`` bounds the wait for one request's completion.
    """

    def __init__(
        self,
        transport: MmioDriverTransport,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        timeout: float = 5.0,
        max_empty: int = 100,
    ) -> None:
        check_device_id(transport.device_id, DeviceId.ENTROPY, MmioDriverError, "an entropy device")
        if buffer_size <= 0 or max_empty <= 0:
            raise ValueError("buffer_size and max_empty must be positive")
        self.transport = transport
        self.timeout = timeout
        self.max_empty = max_empty
        wanted = requested_features(SUPPORTED_FEATURES, features)
        transport.initialize(wanted)
        self.queue = transport.setup_queue(REQUESTQ, queue_size)
        self.buffer_size = buffer_size
        #: The request buffer, and those of requests that timed out (the device still has them).
        self._buffers = OwnedBuffers(transport.allocator, zero=False)
        self._buffer = self._buffers.alloc(buffer_size)
        transport.driver_ok()

    @property
    def packed_ring(self) -> bool:
        return self.transport.has_feature(Feature.RING_PACKED)

    def read(self, n: int) -> bytes:
        """Exactly ``n`` random bytes from the device."""
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        out = bytearray()
        empty = 0
        while len(out) < n:
            got = self._request(min(n - len(out), self.buffer_size))
            if not got:
                empty += 1
                if empty >= self.max_empty:
                    raise EntropyDriverError(
                        f"device returned no bytes for {empty} requests in a row"
                    )
                continue
            empty = 0
            out += got
        return bytes(out)

    def _request(self, length: int) -> bytes:
        """One request of ``length`` bytes; returns what the device wrote."""
        transport = self.transport
        if transport.needs_reset:
            raise EntropyDriverError("device needs reset")
        buffer = self._buffer
        self.queue.add([], [(buffer, length)], token=buffer)
        if self.queue.kick_needed():
            transport.notify(REQUESTQ)
        got: list[bytes] = []

        def completed() -> bool:
            for token, written in self.queue.used():
                if token == buffer:
                    got.append(transport.mem.read(buffer, written))
                    return True
                # A request abandoned after a timeout: its buffer is free now.
                assert isinstance(token, int)
                self._buffers.free(token)
            if transport.needs_reset:
                raise EntropyDriverError("device needs reset")
            return False

        if wait_until(transport, completed, time.monotonic() + self.timeout):
            return got[0]
        # The buffer stays with the device: do not reuse it.
        self._buffer = self._buffers.alloc(self.buffer_size)
        raise EntropyDriverError(f"no completion within {self.timeout} s")

    def close(self) -> None:
        """Reset the device (freeing the rings) and free the request buffers."""
        self.transport.reset()
        self._buffers.free_all()
