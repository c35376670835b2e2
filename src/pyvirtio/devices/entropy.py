"""virtio-rng: the entropy device (device-types/entropy).

One virtqueue, the requestq (device-types/entropy: Virtqueues).  The driver
posts device-writable buffers; the device fills them with random bytes and
returns them with the count written (device-types/entropy: Device
Operation).  There are no feature bits and no configuration space.

Bounds a guest cannot push past:

* each request is filled with at most ``max_request`` bytes (the spec lets
  the device "use less than the entire buffer length"), so one huge buffer
  cannot make the host spend unbounded time and memory in the source;
* a request with device-readable descriptors breaks a driver MUST NOT
  (device-types/entropy: Driver Requirements: Device Operation).  It is
  returned with 0 bytes written and logged; the device keeps serving the
  well-formed requests, which is what a driver that made one mistake needs.
  (Returning 0 bytes bends the device MUST "place one or more random bytes",
  but filling a buffer the driver declared read-only is not an option.)

A source that raises :class:`OSError` (say, an exhausted hardware RNG or a
closed pipe) is logged and the request is completed with 0 bytes, which
tells the driver to try again later; the device keeps serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pyvirtio.constants import DeviceId
from pyvirtio.device import (
    COMMON_FEATURES,
    VirtioDevice,
    expect_object,
    expect_uint,
)
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue

__all__ = ["DEFAULT_MAX_REQUEST", "REQUESTQ", "Entropy"]

log = logging.getLogger(__name__)

#: Index of the request queue.
REQUESTQ = 0

#: Default cap on the bytes produced for one request.
DEFAULT_MAX_REQUEST = 64 * 1024

#: Default (and maximum offered) size of the request queue.
DEFAULT_QUEUE_SIZE = 256


class Entropy(VirtioDevice):
    """The entropy device, reading random bytes from ``source(n)``.

    ``source`` is called with the number of bytes wanted and may return
    fewer (never more are used).  ``max_request`` caps the bytes produced for
    one request.
    """

    device_id = DeviceId.ENTROPY

    def __init__(
        self,
        source: Callable[[int], bytes] = os.urandom,
        max_request: int = DEFAULT_MAX_REQUEST,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if max_request <= 0:
            raise ValueError(f"max_request must be positive, not {max_request}")
        super().__init__(COMMON_FEATURES, (queue_size,))
        self.source = source
        self.max_request = max_request
        #: Random bytes handed to the driver since construction (a statistic).
        self.bytes_served = 0
        #: Requests completed with 0 bytes because the driver made them wrong.
        self.bad_requests = 0
        #: Requests completed with 0 bytes because the source failed.
        self.source_failures = 0
        self._source_failing = False

    # -- lifecycle ---------------------------------------------------------------

    def _serve_posted(self) -> None:
        self.queue_notify(REQUESTQ)

    # -- request processing --------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        """Serve every available request; one index update and one interrupt per call."""
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while (chain := queue.pop()) is not None:
                completions.append((chain, self._serve(chain)))
        finally:
            # Even if the ring turned out malformed half way, return what
            # was served (the device needs a reset either way).
            self._return_used(index, queue, completions)

    def _serve(self, chain: DescriptorChain) -> int:
        """Fill one request; returns the bytes written."""
        if chain.readable:
            self.bad_requests += 1
            log.log(
                logging.WARNING if self.bad_requests == 1 else logging.DEBUG,
                "%s: request %d has %d device-readable bytes (driver error), "
                "returned with 0 bytes written",
                self.name,
                chain.head,
                chain.readable_len,
            )
            return 0
        wanted = min(chain.writable_len, self.max_request)
        if wanted == 0:
            return 0
        try:
            data = self.source(wanted)
        except OSError as exc:
            self.source_failures += 1
            # One warning per run of failures: the guest retries at once and
            # must not be able to flood the log.
            log.log(
                logging.DEBUG if self._source_failing else logging.WARNING,
                "%s: entropy source failed: %s",
                self.name,
                exc,
            )
            self._source_failing = True
            return 0
        if self._source_failing:
            self._source_failing = False
            log.info("%s: entropy source works again", self.name)
        written = chain.write(memoryview(data)[:wanted])
        self.bytes_served += written
        return written

    # -- snapshot ------------------------------------------------------------------

    def _snapshot_model(self) -> Any:
        # Requests are completed synchronously, so nothing is in flight; the
        # counters are all the model has.
        return {
            "bytes_served": self.bytes_served,
            "bad_requests": self.bad_requests,
            "source_failures": self.source_failures,
        }

    def _restore_model(self, state: Any) -> None:
        state = expect_object(state, "entropy state")
        bytes_served = expect_uint(state.get("bytes_served"))
        bad_requests = expect_uint(state.get("bad_requests"))
        source_failures = expect_uint(state.get("source_failures"))
        self.bytes_served = bytes_served
        self.bad_requests = bad_requests
        self.source_failures = source_failures
