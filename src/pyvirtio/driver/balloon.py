"""A virtio-balloon driver (device-types/balloon) over any driver transport.

:class:`BalloonDriver` does what Linux's ``virtio_balloon`` does, for a
"guest" whose free memory is a :class:`PagePool` (the driver's own page
allocator over a range of guest RAM):

* follows the target: :meth:`BalloonDriver.update` reads ``num_pages`` and
  inflates (takes pages from the pool and hands their PFNs to the device) or
  deflates (asks for pages back, and returns them to the pool once the device
  acknowledged), then writes ``actual`` (Device Operation);
* answers stats requests (Memory Statistics): when the device uses the stats
  buffer, the driver refills it with figures from ``stats_source`` (the
  caller's), on top of the pool's own free and total memory;
* :meth:`BalloonDriver.deflate_on_oom` takes pages back below the target
  when DEFLATE_ON_OOM was negotiated (the spec forbids it otherwise);
* :meth:`BalloonDriver.report_free_pages` reports the pool's free pages on
  the reporting_vq (Free Page Reporting) and puts them back once
  acknowledged;
* :meth:`BalloonDriver.hint_free_pages` answers a free page hinting round
  (Free Page Hinting): the command ID, the pool's free pages, then STOP.

Requests are pipelined: as many PFN arrays (256 PFNs each, as Linux sends)
as the ring holds go out before one kick, then the driver collects the
completions.  Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from pyvirtio.constants import COMMON_FEATURES, DeviceId, Feature
from pyvirtio.devices.balloon.wire import (
    BALLOON_PAGE_SIZE,
    CMD_ID_DONE,
    CMD_ID_STOP,
    PFN_SHIFT,
    STAT_ENTRY,
    BalloonFeature,
    BalloonQueue,
    ConfigField,
    StatTag,
    coalesce_pfns,
    encode_pfns,
    encode_stats,
    queue_layout,
)
from pyvirtio.driver.memory import GuestAllocator, OwnedBuffers
from pyvirtio.driver.transport import (
    DriverTransport,
    check_device_id,
    requested_features,
    wait_until,
)
from pyvirtio.virtqueue.common import DriverQueue

__all__ = [
    "PFNS_PER_REQUEST",
    "SUPPORTED_FEATURES",
    "BalloonDriver",
    "BalloonDriverError",
    "BalloonTransport",
    "PagePool",
]

#: PFNs per inflate/deflate request (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX).
PFNS_PER_REQUEST = 256
#: Ranges per free page report (Linux's PAGE_REPORTING_CAPACITY).
RANGES_PER_REPORT = 32
#: Most statistics the driver sends (a device reads at most 256 per buffer).
MAX_STATS = 256

SUPPORTED_FEATURES = (
    COMMON_FEATURES
    # The driver only reuses deflated pages after the device acknowledged.
    | BalloonFeature.MUST_TELL_HOST.mask
    | BalloonFeature.STATS_VQ.mask
    | BalloonFeature.DEFLATE_ON_OOM.mask
    | BalloonFeature.PAGE_REPORTING.mask
    | BalloonFeature.FREE_PAGE_HINT.mask
)

_STATS_TOKEN = "stats"


class BalloonDriverError(Exception):
    """The device needs reset, did not answer in time, or a call the features forbid."""


class BalloonTransport(DriverTransport, Protocol):
    """What :class:`BalloonDriver` needs of a driver transport (MmioDriverTransport has it)."""

    device_id: int

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    @property
    def needs_reset(self) -> bool: ...


class PagePool:
    """The guest's free memory as the driver sees it: 4 KiB pages of one guest range.

    :meth:`take` hands out pages (lowest addresses first), :meth:`give` takes
    them back.  The balloon inflates with pages from here, so a caller that
    also allocates from the pool sees the memory the balloon took.
    """

    def __init__(self, base: int, length: int) -> None:
        if base % BALLOON_PAGE_SIZE or length % BALLOON_PAGE_SIZE or length <= 0 or base < 0:
            raise ValueError(f"pool [{base:#x}, +{length:#x}) must be whole 4 KiB pages")
        self.base = base
        self.length = length
        first = base >> PFN_SHIFT
        # A stack whose top is the lowest page.
        self._free = list(range(first + (length >> PFN_SHIFT) - 1, first - 1, -1))

    @classmethod
    def from_allocator(cls, allocator: GuestAllocator, length: int) -> PagePool:
        """A pool over ``length`` bytes taken from a driver's allocator.

        Not zeroed: free memory holds whatever it held, and zeroing would
        make the host back every page of it.
        """
        return cls(allocator.alloc(length, BALLOON_PAGE_SIZE, zero=False), length)

    @property
    def total_pages(self) -> int:
        return self.length >> PFN_SHIFT

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Up to ``count`` free PFNs (fewer when the pool runs short)."""
        count = min(count, len(self._free))
        if count <= 0:
            return []
        pfns = self._free[-count:]
        del self._free[-count:]
        pfns.reverse()
        return pfns

    def give(self, pfns: Sequence[int]) -> None:
        """Return PFNs from :meth:`take`."""
        first = self.base >> PFN_SHIFT
        if pfns and (min(pfns) < first or max(pfns) >= first + self.total_pages):
            raise ValueError("PFN outside the pool")
        self._free.extend(reversed(pfns))

    def contains(self, pfn: int) -> bool:
        return self.base >> PFN_SHIFT <= pfn < (self.base + self.length) >> PFN_SHIFT


class BalloonDriver:
    """Initializes the balloon behind ``transport`` and keeps it at the host's target.

    * ``pool``: the pages the balloon may take.
    * ``stats_source``: called for each stats request; returns ``{tag: value}``
      (:class:`~pyvirtio.devices.balloon.wire.StatTag` or any number), merged
      over the pool's free and total memory.
    * ``features``: limits what is negotiated (default: all the driver supports).
    """

    def __init__(
        self,
        transport: BalloonTransport,
        pool: PagePool,
        *,
        stats_source: Callable[[], Mapping[int, int]] | None = None,
        features: int | None = None,
        queue_size: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        check_device_id(transport.device_id, DeviceId.BALLOON, BalloonDriverError, "a balloon")
        self.transport = transport
        self.pool = pool
        self.stats_source = stats_source
        self.timeout = timeout
        wanted = requested_features(SUPPORTED_FEATURES, features)
        self.features = transport.initialize(wanted)
        self.layout = queue_layout(self.features)
        self.queues: dict[BalloonQueue, DriverQueue] = {
            role: transport.setup_queue(index, queue_size) for role, index in self.layout.items()
        }
        #: PFNs in the balloon, in the order they went in.
        self._balloon: list[int] = []
        #: Every buffer the driver allocated and has not freed (a buffer the
        #: device did not use in time stays here until close).
        self._buffers = OwnedBuffers(transport.allocator)
        #: PFN-array buffers the device has used, ready for the next request.
        self._free_buffers: list[int] = []
        self._hinted_cmd_id: int | None = None
        #: Statistics answered so far.
        self.stats_answered = 0
        self._stats_buffer: int | None = None
        if self.has(BalloonFeature.STATS_VQ):
            self._stats_buffer = self._buffers.alloc(MAX_STATS * STAT_ENTRY.size)
            # Device Initialization: one buffer on the statsq before DRIVER_OK,
            # notified after it.
            self._post_stats()
        transport.driver_ok()
        if self._stats_buffer is not None:
            transport.notify(self.layout[BalloonQueue.STATS])

    def has(self, feature: BalloonFeature | Feature) -> bool:
        return bool(self.features & feature.mask)

    # -- the target ----------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        """The device's ``num_pages``."""
        return self.transport.read_config(ConfigField.NUM_PAGES, 4)

    @property
    def actual_pages(self) -> int:
        """Pages in the balloon."""
        return len(self._balloon)

    def update(self) -> int:
        """Inflate or deflate to the target (as far as the pool allows); returns ``actual``."""
        self._service_stats()
        target = self.target_pages
        actual = len(self._balloon)
        if target > actual:
            self._inflate(target - actual)
        elif target < actual:
            self._deflate(actual - target)
        return len(self._balloon)

    def poll(self, timeout: float = 0.0) -> int:
        """Wait up to ``timeout`` for an interrupt, then answer stats and follow the target.

        Returns the interrupt status seen (0 if none).
        """
        status = self.transport.wait_interrupt(timeout) if timeout > 0 else 0
        self._check_device()
        self.update()
        return status

    def deflate_on_oom(self, pages: int) -> int:
        """Take up to ``pages`` back from the balloon below the target (guest out of memory).

        Only with DEFLATE_ON_OOM: without it the driver MUST NOT use balloon
        pages while ``num_pages`` <= ``actual`` (Device Operation).
        """
        if not self.has(BalloonFeature.DEFLATE_ON_OOM):
            raise BalloonDriverError("DEFLATE_ON_OOM was not negotiated")
        count = min(pages, len(self._balloon))
        if count > 0:
            self._deflate(count)
        return count

    def _inflate(self, count: int) -> None:
        pfns = self.pool.take(count)
        if not pfns:
            return
        # The pages are the device's from now on (MUST NOT use them until
        # the inflate request is acknowledged, and not after either).
        self._transfer(BalloonQueue.INFLATE, pfns)
        self._balloon.extend(pfns)
        self._write_actual()

    def _deflate(self, count: int) -> None:
        pfns = self._balloon[-count:]
        self._transfer(BalloonQueue.DEFLATE, pfns)
        del self._balloon[-count:]
        # Usable again now that the device acknowledged (MUST_TELL_HOST).
        self.pool.give(pfns)
        self._write_actual()

    def _write_actual(self) -> None:
        self.transport.write_config(ConfigField.ACTUAL, 4, len(self._balloon))

    def _transfer(self, role: BalloonQueue, pfns: Sequence[int]) -> None:
        """Send ``pfns`` on the inflate or deflate queue and wait for every request's use."""
        queue = self.queues[role]
        index = self.layout[role]
        transport = self.transport
        mem = transport.mem
        pending = 0
        pos = 0

        def used_some() -> bool:
            nonlocal pending
            before = pending
            for token, _ in queue.used():
                assert isinstance(token, int)
                self._free_buffers.append(token)
                pending -= 1
            if pending != before:
                return True
            self._service_stats()
            self._check_device()
            return False

        while pos < len(pfns) or pending:
            added = False
            while pos < len(pfns) and queue.num_free >= 1:
                chunk = pfns[pos : pos + PFNS_PER_REQUEST]
                data = encode_pfns(chunk)
                buffer = self._buffer()
                mem.write(buffer, data)
                queue.add([(buffer, len(data))], [], token=buffer)
                pos += len(chunk)
                pending += 1
                added = True
            if added and queue.kick_needed():
                transport.notify(index)
            # Each request used restarts the clock: a long transfer is not a late one.
            if not wait_until(transport, used_some, time.monotonic() + self.timeout):
                raise BalloonDriverError(
                    f"{role.value}: {pending} requests not used within {self.timeout} s"
                )

    def _buffer(self) -> int:
        """A PFN-array buffer (recycled after the device used it)."""
        if self._free_buffers:
            return self._free_buffers.pop()
        return self._buffers.alloc(PFNS_PER_REQUEST * 4)

    # -- statistics ----------------------------------------------------------------

    def stats(self) -> dict[int, int]:
        """The figures the driver reports: the pool's, overridden by ``stats_source``'s."""
        figures: dict[int, int] = {
            StatTag.MEMFREE: self.pool.free_pages * BALLOON_PAGE_SIZE,
            StatTag.MEMTOT: self.pool.total_pages * BALLOON_PAGE_SIZE,
        }
        if self.stats_source is not None:
            figures.update(self.stats_source())
        return figures

    def _post_stats(self) -> None:
        buffer = self._stats_buffer
        assert buffer is not None
        entries = list(self.stats().items())[:MAX_STATS]
        data = encode_stats(entries)
        self.transport.mem.write(buffer, data)
        self.queues[BalloonQueue.STATS].add([(buffer, len(data))], [], token=_STATS_TOKEN)

    def _service_stats(self) -> bool:
        """Answer a stats request if the device used the stats buffer; whether it did."""
        queue = self.queues.get(BalloonQueue.STATS)
        if queue is None:
            return False
        answered = False
        for _token, _ in queue.used():
            answered = True
        if answered:
            # Memory Statistics: pop the used buffer, collect, add, notify.
            self._post_stats()
            self.stats_answered += 1
            if queue.kick_needed():
                self.transport.notify(self.layout[BalloonQueue.STATS])
        return answered

    # -- free page reporting ------------------------------------------------------------

    def report_free_pages(self, max_pages: int | None = None) -> int:
        """Report the pool's free pages to the device; returns how many were reported.

        The pages leave the pool until the device acknowledges each report
        (the driver MUST NOT use them before: Free Page Reporting).
        """
        if not self.has(BalloonFeature.PAGE_REPORTING):
            raise BalloonDriverError("PAGE_REPORTING was not negotiated")
        pfns = self.pool.take(self.pool.free_pages if max_pages is None else max_pages)
        if not pfns:
            return 0
        for ranges in self._range_batches(BalloonQueue.REPORTING, pfns):
            # Linux adds the ranges as device-writable buffers.
            self._send(BalloonQueue.REPORTING, [], ranges)
        # Only now (and not after a timeout) may the pages be used again.
        self.pool.give(pfns)
        return len(pfns)

    # -- free page hinting ------------------------------------------------------------

    def hint_free_pages(self) -> int:
        """Answer the device's free page hinting round, if a new one is open.

        When ``free_page_hint_cmd_id`` holds a command ID not answered yet,
        sends it, then the pool's free pages, then STOP (Free Page Hinting:
        driver requirements), and returns the number of pages hinted (0 when
        there is no new round).  The pages go back to the pool once the
        device used their buffers; until the device says DONE their contents
        count as uninitialized, so users of the pool must initialize them.
        """
        if not self.has(BalloonFeature.FREE_PAGE_HINT):
            raise BalloonDriverError("FREE_PAGE_HINT was not negotiated")
        cmd_id = self.transport.read_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4)
        if cmd_id <= CMD_ID_DONE or cmd_id == self._hinted_cmd_id:
            return 0
        self._hinted_cmd_id = cmd_id
        self._send(BalloonQueue.FREE_PAGE, [cmd_id.to_bytes(4, "little")], [])
        pfns = self.pool.take(self.pool.free_pages)
        try:
            for ranges in self._range_batches(BalloonQueue.FREE_PAGE, pfns):
                self._send(BalloonQueue.FREE_PAGE, [], ranges)
            self._send(BalloonQueue.FREE_PAGE, [CMD_ID_STOP.to_bytes(4, "little")], [])
        finally:
            self.pool.give(pfns)
        return len(pfns)

    def _send(
        self, role: BalloonQueue, readable: list[bytes], writable: list[tuple[int, int]]
    ) -> None:
        """One buffer on ``role``'s queue (readable parts copied in), waited for."""
        transport = self.transport
        queue = self.queues[role]
        copies = []
        for data in readable:
            addr = self._buffers.alloc(len(data))
            transport.mem.write(addr, data)
            copies.append((addr, len(data)))
        token = object()
        queue.add(copies, writable, token=token)
        if queue.kick_needed():
            transport.notify(self.layout[role])

        def used() -> bool:
            if any(used is token for used, _ in queue.used()):
                return True
            self._service_stats()
            self._check_device()
            return False

        if not wait_until(transport, used, time.monotonic() + self.timeout):
            # The copies stay allocated until close: the device may still read them.
            raise BalloonDriverError(f"{role.value}: buffer not used within {self.timeout} s")
        for addr, _ in copies:
            self._buffers.free(addr)

    def _range_batches(
        self, role: BalloonQueue, pfns: Sequence[int]
    ) -> list[list[tuple[int, int]]]:
        """``pfns`` as page ranges, in groups that fit one buffer of ``role``'s queue."""
        runs = coalesce_pfns(sorted(pfns))
        per_buffer = max(1, min(RANGES_PER_REPORT, self.queues[role].num_free))
        return [
            [(first << PFN_SHIFT, count << PFN_SHIFT) for first, count in runs[i : i + per_buffer]]
            for i in range(0, len(runs), per_buffer)
        ]

    # -- the rest ---------------------------------------------------------------------

    def _check_device(self) -> None:
        if self.transport.needs_reset:
            raise BalloonDriverError("device needs reset")

    def close(self) -> None:
        """Reset the device; balloon pages go back to the pool, buffers to the allocator."""
        self.transport.reset()
        self.pool.give(self._balloon)
        self._balloon.clear()
        self._buffers.free_all()
        self._free_buffers.clear()
        self._stats_buffer = None
