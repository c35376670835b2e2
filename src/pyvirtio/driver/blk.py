"""A virtio-blk driver library: requests from a host program to any virtio-blk device.

:class:`BlkDriver` sits on a *driver transport*: anything shaped like
:class:`~pyvirtio.driver.mmio.MmioDriverTransport` (see :class:`BlkTransport`
for exactly what is used, so a vhost-user front end can stand in).  It
negotiates features, reads the configuration (device-types/blk: Device
Initialization), sets up the request queues and then offers two layers:

* submission and completion, after libblkio: ``submit_read`` /
  ``submit_write`` / ``submit_readv`` / ``submit_writev`` / ``submit_flush``
  / ``submit_discard`` / ``submit_write_zeroes`` / ``submit_get_id`` put a
  request on a queue and return a token at once; :meth:`BlkDriver.poll` and
  :meth:`BlkDriver.wait` return ``(token, result)`` pairs, where ``result``
  is 0 or a negative errno (``-EIO`` for VIRTIO_BLK_S_IOERR, ``-ENOTSUP``
  for VIRTIO_BLK_S_UNSUPP).  Data moves between the device and caller
  buffers in guest memory (:meth:`BlkDriver.alloc_buffer`), no copies;
* blocking helpers (``read``, ``write``, ``flush``, ...) over a scratch
  buffer, which raise :class:`BlkError` (an :class:`OSError`) on failure.

Every ``submit_*`` notifies the device if it wants to be (``kick=True``,
the default).  ``kick=False`` lets several submissions share one
notification, sent by :meth:`BlkDriver.kick`; at a deep queue, kick every
few submissions (8 is a good start) rather than once per batch, so that
the device works on the first requests while the driver submits the rest.

Completion polling (``poll_us``, after libblkio's poll queues and Linux's
io_poll) is opt-in: :meth:`BlkDriver.wait` and the blocking helpers then
reap the used rings in a loop, without system calls, for up to ``poll_us``
microseconds without a completion before sleeping in the transport's
``wait_interrupt``.  Used-buffer notifications are off while the driver
polls (and stay off between waits, so the device does not signal
completions nobody sleeps for); they are turned back on, and the rings
checked once more, before every sleep.  A caller that sleeps on the
transport itself rather than in :meth:`BlkDriver.wait` should keep
``poll_us`` at 0.

Everything the device would refuse and the spec forbids the driver to send
is refused here first with :class:`ValueError`: offsets and lengths that are
not multiples of the block size, ranges beyond ``capacity`` ("A driver MUST
NOT submit a request which would cause a read or write beyond capacity"),
too many segments (device-types/blk: Driver Requirements: Device
Operation).  Writes to a read-only device raise :class:`BlkError` with
``EROFS`` and commands the device did not offer ``ENOTSUP``, without being
sent.

Not thread-safe: use one driver from one thread (or lock around it).
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, NamedTuple, Protocol

from pyvirtio.constants import COMMON_FEATURES, Feature, feature_mask
from pyvirtio.devices.block.wire import (
    CONFIG_WRITEBACK_OFFSET,
    DISCARD_SEGMENT_SIZE,
    GET_ID_BYTES,
    HEADER_SIZE,
    S_OK,
    SECTOR_SIZE,
    SEGMENT,
    T_IN,
    T_OUT,
    BlkConfig,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.driver.transport import (
    DriverTransport,
    FeatureChoice,
    check_required_features,
    requested_features,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import Buffers, DriverQueue, QueueFullError

__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "BlkDriver",
    "BlkError",
    "BlkTransport",
    "Buffer",
    "QueueFullError",
]

#: Largest transfer of one blocking ``read``/``write`` request (bigger ones are split).
DEFAULT_MAX_TRANSFER = 1 << 20
#: Per-request slot in the driver's header area: header, then the status byte.
_SLOT = 32
_STATUS_OFFSET = HEADER_SIZE
#: Status byte value before the device answers, to tell "never written" apart.
_STATUS_UNSET = 0xFF
#: What this driver can use: the ring features and the device-specific
#: features it understands (MQ is asked for only with more than one queue).
SUPPORTED_FEATURES = COMMON_FEATURES | feature_mask(
    BlkFeature.SIZE_MAX,
    BlkFeature.SEG_MAX,
    BlkFeature.RO,
    BlkFeature.BLK_SIZE,
    BlkFeature.FLUSH,
    BlkFeature.TOPOLOGY,
    BlkFeature.CONFIG_WCE,
    BlkFeature.MQ,
    BlkFeature.DISCARD,
    BlkFeature.WRITE_ZEROES,
)
_U32_MAX = 0xFFFF_FFFF

#: A slot's header and its status byte (at _STATUS_OFFSET), written at once.
_HEADER_AND_STATUS = struct.Struct("<IIQB")


class BlkError(OSError):
    """A request failed (``errno`` says how) or cannot be made on this device."""


class Buffer(NamedTuple):
    """A buffer in guest memory: its guest address and a zero-copy view of it."""

    addr: int
    view: memoryview

    @property
    def length(self) -> int:
        return len(self.view)


class BlkTransport(DriverTransport, Protocol):
    """What :class:`BlkDriver` needs of a driver transport (MmioDriverTransport has it)."""

    def write_config(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class _Queue:
    queue: DriverQueue
    #: The slot area, for writing headers and reading status bytes directly.
    slots: memoryview
    free_slots: list[int]
    #: Per slot, its header and status byte as ring buffers, built once
    #: rather than per request.
    segments: list[tuple[tuple[int, int], tuple[int, int]]]


def _status_result(status: int, written: int) -> int:
    """A device status as libblkio reports it: 0 or a negative errno."""
    if written == 0 or status == _STATUS_UNSET:
        return -errno.EIO  # the device could not (or did not) answer
    if status == Status.OK:
        return 0
    if status == Status.UNSUPP:
        return -errno.ENOTSUP
    return -errno.EIO


class BlkDriver:
    """A virtio-blk driver over ``transport``; sets the device up at construction.

    * ``num_queues``: request queues wanted; more than one needs
      VIRTIO_BLK_F_MQ, and the device's ``num_queues`` caps it (see
      :attr:`num_queues` for what was set up).
    * ``queue_size``: ring size of each queue (default: the device's maximum).
    * ``packed``: True requires packed rings, False forbids them, None takes
      them if offered.  ``event_idx`` and ``indirect`` likewise for
      VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC.
    * ``timeout``: how long a blocking helper waits for its completion before
      raising :class:`BlkError` with ``ETIMEDOUT`` (None: forever).
    * ``poll_us``: how long waits spin on the used rings, without a
      completion, before sleeping (0: sleep at once); see the module
      docstring.  Worth it when the device runs on another CPU and answers
      within a few tens of microseconds; it burns this CPU meanwhile.
    """

    def __init__(
        self,
        transport: BlkTransport,
        *,
        num_queues: int = 1,
        queue_size: int | None = None,
        packed: bool | None = None,
        event_idx: bool | None = None,
        indirect: bool | None = None,
        timeout: float | None = None,
        poll_us: float = 0.0,
    ) -> None:
        if num_queues < 1:
            raise ValueError(f"num_queues must be at least 1, not {num_queues}")
        self.transport = transport
        self.mem = transport.mem
        #: Seconds a blocking helper waits for its request (None: forever).
        self.timeout = timeout
        self._poll_s = 0.0
        self.poll_us = poll_us
        # Whether the queues ask for used-buffer notifications (they start so);
        # polling turns them off, and every sleep needs them on.
        self._notifying = True
        # The window of the region last checked, for _in_memory.
        self._fast_range = GuestMemory.NO_WINDOW
        choices: tuple[FeatureChoice, ...] = (
            (packed, Feature.RING_PACKED),
            (event_idx, Feature.EVENT_IDX),
            (indirect, Feature.INDIRECT_DESC),
        )
        wanted = requested_features(SUPPORTED_FEATURES, None, choices)
        if num_queues == 1:
            wanted &= ~BlkFeature.MQ.mask
        features = transport.initialize(wanted)
        check_required_features(features, choices, partial(BlkError, errno.ENOTSUP))
        self.features = features
        self.config = self._read_config()
        # Read once, at Device Initialization: fixed for the driver's lifetime.
        #: The logical block size: requests are multiples of it.
        self.block_size: Final = self.config.blk_size
        #: Most data segments in one request (0: no limit advertised).
        self.seg_max: Final = self.config.seg_max
        #: Largest data segment (0: no limit advertised).
        self.size_max: Final = self.config.size_max
        #: Whether the device offered VIRTIO_BLK_F_RO: writes are refused here.
        self.read_only: Final = self.has(BlkFeature.RO)
        self.num_queues = (
            max(1, min(num_queues, self.config.num_queues)) if self.has(BlkFeature.MQ) else 1
        )
        self._queues: list[_Queue] = []
        for index in range(self.num_queues):
            queue = transport.setup_queue(index, queue_size)
            slots = transport.allocator.alloc(queue.size * _SLOT, _SLOT)
            self._queues.append(
                _Queue(
                    queue,
                    self.mem.view(slots, queue.size * _SLOT),
                    list(range(queue.size - 1, -1, -1)),
                    [
                        ((base, HEADER_SIZE), (base + _STATUS_OFFSET, 1))
                        for base in range(slots, slots + queue.size * _SLOT, _SLOT)
                    ],
                )
            )
        transport.driver_ok()

        self._tokens = itertools.count(1)
        #: Requests in flight: token -> header slot.
        self._in_flight: dict[int, int] = {}
        #: Guest blocks to free when a request completes, for the few that have any.
        self._allocations: dict[int, tuple[int, ...]] = {}
        self._done: list[tuple[int, int]] = []
        self._scratch: Buffer | None = None
        limit = DEFAULT_MAX_TRANSFER
        if self.size_max and self.seg_max:
            limit = min(limit, self.size_max * self.seg_max)
        #: Largest transfer one blocking request makes (bigger ones are split).
        self.max_transfer = max(self.block_size, limit - limit % self.block_size)
        # For the one-buffer fast path of submit_read/submit_write: a buffer
        # up to this long is one segment (no size_max split).
        self._one_segment = self.size_max or _U32_MAX

    # -- configuration -----------------------------------------------------------------

    @property
    def poll_us(self) -> float:
        """Microseconds a wait spins on the used rings before sleeping (0: no polling)."""
        return self._poll_s * 1e6

    @poll_us.setter
    def poll_us(self, value: float) -> None:
        if not 0 <= value < float("inf"):
            raise ValueError(f"poll_us must be a finite number >= 0, not {value}")
        self._poll_s = value / 1e6

    def has(self, feature: BlkFeature | Feature) -> bool:
        """Whether ``feature`` was negotiated."""
        return bool(self.features >> int(feature) & 1)

    def _read_config(self) -> BlkConfig:
        """The fields that exist with the negotiated features (device-types/blk:
        Device configuration layout, Device Initialization)."""
        read = self.transport.read_config
        cfg = BlkConfig(capacity=read(0, 8), num_queues=1, blk_size=SECTOR_SIZE)
        if self.has(BlkFeature.SIZE_MAX):
            cfg.size_max = read(8, 4)
        if self.has(BlkFeature.SEG_MAX):
            cfg.seg_max = read(12, 4)
        if self.has(BlkFeature.BLK_SIZE):
            blk_size = read(20, 4)
            # Only a performance hint; an odd value is ignored rather than trusted.
            if blk_size >= SECTOR_SIZE and blk_size & (blk_size - 1) == 0:
                cfg.blk_size = blk_size
        if self.has(BlkFeature.TOPOLOGY):
            cfg.physical_block_exp = read(24, 1)
            cfg.alignment_offset = read(25, 1)
            cfg.min_io_size = read(26, 2)
            cfg.opt_io_size = read(28, 4)
        if self.has(BlkFeature.CONFIG_WCE):
            # Read only after FEATURES_OK, as the driver MUST.
            cfg.writeback = read(CONFIG_WRITEBACK_OFFSET, 1)
        else:
            cfg.writeback = int(self.has(BlkFeature.FLUSH))
        if self.has(BlkFeature.MQ):
            cfg.num_queues = read(34, 2)
        if self.has(BlkFeature.DISCARD):
            cfg.max_discard_sectors = read(36, 4)
            cfg.max_discard_seg = read(40, 4)
            cfg.discard_sector_alignment = read(44, 4)
        if self.has(BlkFeature.WRITE_ZEROES):
            cfg.max_write_zeroes_sectors = read(48, 4)
            cfg.max_write_zeroes_seg = read(52, 4)
            cfg.write_zeroes_may_unmap = read(56, 1)
        return cfg

    def refresh_capacity(self) -> int:
        """Re-read ``capacity`` (after a configuration change interrupt); returns it."""
        self.config.capacity = self.transport.read_config(0, 8)
        return self.config.capacity

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self.config.capacity

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.config.capacity * SECTOR_SIZE

    @property
    def writeback(self) -> bool:
        """Whether the device caches writes until a flush."""
        if self.has(BlkFeature.CONFIG_WCE):
            self.config.writeback = self.transport.read_config(CONFIG_WRITEBACK_OFFSET, 1)
        return bool(self.config.writeback)

    def set_writeback(self, enabled: bool) -> None:
        """Switch the device's cache mode (needs VIRTIO_BLK_F_CONFIG_WCE)."""
        if not self.has(BlkFeature.CONFIG_WCE):
            raise BlkError(errno.ENOTSUP, "the device cannot switch its cache mode")
        self.transport.write_config(CONFIG_WRITEBACK_OFFSET, 1, int(enabled))
        self.config.writeback = int(enabled)

    # -- buffers ------------------------------------------------------------------------

    def alloc_buffer(self, size: int, align: int = 4096) -> Buffer:
        """A zeroed buffer in guest memory for requests; free it with :meth:`free_buffer`."""
        addr = self.transport.allocator.alloc(size, align)
        return Buffer(addr, self.mem.view(addr, size))

    def free_buffer(self, buf: Buffer | int) -> None:
        """Return a buffer; it must not be part of a request in flight."""
        if isinstance(buf, Buffer):
            buf.view.release()
            addr = buf.addr
        else:
            addr = buf
        self.transport.allocator.free(addr)

    # -- validation --------------------------------------------------------------------------

    def _in_memory(self, addr: int, length: int) -> bool:
        """Whether a buffer lies in guest memory (the last region seen is cached)."""
        if self._fast_range.covers(self.mem, addr, length):
            return True
        if not self.mem.is_valid(addr, length):
            return False
        self._fast_range = self.mem.window(addr)
        return True

    def _check_range(self, offset: int, length: int, what: str) -> None:
        bs = self.block_size
        if offset < 0 or length < 0:
            raise ValueError(f"{what}: negative offset or length ({offset}, {length})")
        if offset % bs or length % bs:
            raise ValueError(
                f"{what}: offset {offset} and length {length} must be multiples of the "
                f"block size {bs}"
            )
        if offset + length > self.size:
            raise ValueError(
                f"{what}: [{offset}, {offset + length}) is beyond the device's {self.size} bytes"
            )

    def _check_queue(self, queue: int) -> _Queue:
        if not 0 <= queue < len(self._queues):
            raise ValueError(f"no queue {queue} (the driver set up {len(self._queues)})")
        return self._queues[queue]

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise BlkError(errno.EROFS, f"{what}: the device is read-only")

    def _segments(
        self, iovecs: Iterable[tuple[int, int]], what: str
    ) -> tuple[list[tuple[int, int]], int]:
        """Split buffers at ``size_max`` and check them; returns (segments, total bytes)."""
        size_max = self.size_max or _U32_MAX
        out: list[tuple[int, int]] = []
        total = 0
        for addr, length in iovecs:
            if length < 0 or not self._in_memory(addr, length):
                raise ValueError(f"{what}: buffer {addr:#x}+{length:#x} is not in guest memory")
            total += length
            if length <= size_max:
                if length:
                    out.append((addr, length))
            else:
                out.extend(
                    (addr + pos, min(size_max, length - pos)) for pos in range(0, length, size_max)
                )
        if self.seg_max and len(out) > self.seg_max:
            raise ValueError(
                f"{what}: {len(out)} segments, more than the device's seg_max {self.seg_max}"
            )
        return out, total

    # -- submission ------------------------------------------------------------------------------

    def _submit(
        self,
        queue: int,
        req_type: int,
        sector: int,
        readable: Buffers,
        writable: Buffers,
        kick: bool,
        allocations: Sequence[int] = (),
    ) -> int:
        q = self._check_queue(queue)
        if not q.free_slots:
            raise QueueFullError(f"queue {queue}: {q.queue.size} requests in flight")
        slot = q.free_slots.pop()
        _HEADER_AND_STATUS.pack_into(q.slots, slot * _SLOT, req_type, 0, sector, _STATUS_UNSET)
        header, status = q.segments[slot]
        token = next(self._tokens)
        try:
            q.queue.add([header, *readable], [*writable, status], token)
        except BaseException:
            q.free_slots.append(slot)
            raise
        self._in_flight[token] = slot
        if allocations:
            self._allocations[token] = tuple(allocations)
        if kick:
            self.kick(queue)
        return token

    def kick(self, queue: int | None = None) -> None:
        """Notify the device of new requests (on ``queue``, or every queue) if it wants to be.

        Needed after ``submit_*(..., kick=False)``, which lets a batch of
        submissions share one notification.
        """
        indices = range(len(self._queues)) if queue is None else (queue,)
        for index in indices:
            if self._queues[index].queue.kick_needed():
                self.transport.notify(index)

    def submit_read(
        self, offset: int, addr: int, length: int, *, queue: int = 0, kick: bool = True
    ) -> int:
        """Read ``length`` bytes at ``offset`` into guest memory at ``addr``."""
        return self._submit_one(T_IN, offset, addr, length, queue, kick)

    def _submit_one(
        self, req_type: int, offset: int, addr: int, length: int, queue: int, kick: bool
    ) -> int:
        """submit_read/submit_write of one buffer: the hot path, checks inlined.

        Anything unusual (an empty or oversized buffer, a bad argument) goes
        the general way, which raises the precise error.
        """
        write = req_type == T_OUT
        window = self._fast_range
        if (
            0 < length <= self._one_segment
            and offset >= 0
            and not (offset | length) % self.block_size
            and offset + length <= self.config.capacity * SECTOR_SIZE
            and 0 <= queue < self.num_queues
            and window.table is self.mem.regions
            and window.base <= addr
            and addr + length <= window.end
            and not (write and self.read_only)
        ):
            q = self._queues[queue]
            free = q.free_slots
            if not free:
                raise QueueFullError(f"queue {queue}: {q.queue.size} requests in flight")
            slot = free.pop()
            _HEADER_AND_STATUS.pack_into(
                q.slots, slot * _SLOT, req_type, 0, offset >> 9, _STATUS_UNSET
            )
            header, status = q.segments[slot]
            token = next(self._tokens)
            try:
                if write:
                    q.queue.add((header, (addr, length)), (status,), token)
                else:
                    q.queue.add((header,), ((addr, length), status), token)
            except BaseException:
                free.append(slot)
                raise
            self._in_flight[token] = slot
            if kick and q.queue.kick_needed():
                self.transport.notify(queue)
            return token
        if write:
            return self.submit_writev(offset, [(addr, length)], queue=queue, kick=kick)
        return self.submit_readv(offset, [(addr, length)], queue=queue, kick=kick)

    def submit_readv(
        self, offset: int, iovecs: Iterable[tuple[int, int]], *, queue: int = 0, kick: bool = True
    ) -> int:
        """Read into a scatter list of ``(guest address, length)`` buffers."""
        segments, total = self._segments(iovecs, "read")
        self._check_range(offset, total, "read")
        return self._submit(queue, RequestType.IN, offset // SECTOR_SIZE, (), segments, kick)

    def submit_write(
        self, offset: int, addr: int, length: int, *, queue: int = 0, kick: bool = True
    ) -> int:
        """Write ``length`` bytes from guest memory at ``addr`` to ``offset``."""
        return self._submit_one(T_OUT, offset, addr, length, queue, kick)

    def submit_writev(
        self, offset: int, iovecs: Iterable[tuple[int, int]], *, queue: int = 0, kick: bool = True
    ) -> int:
        """Write a gather list of ``(guest address, length)`` buffers."""
        self._check_writable("write")
        segments, total = self._segments(iovecs, "write")
        self._check_range(offset, total, "write")
        return self._submit(queue, RequestType.OUT, offset // SECTOR_SIZE, segments, (), kick)

    def submit_flush(self, *, queue: int = 0, kick: bool = True) -> int:
        """Make completed writes durable.

        Without VIRTIO_BLK_F_FLUSH negotiated the device commits every write
        before completing it (device-types/blk: Device Operation, stability
        case 1), so nothing is sent and the flush completes at once.
        """
        if not self.has(BlkFeature.FLUSH):
            self._check_queue(queue)
            token = next(self._tokens)
            self._done.append((token, 0))
            return token
        return self._submit(queue, RequestType.FLUSH, 0, (), (), kick)

    def submit_discard(self, offset: int, length: int, *, queue: int = 0, kick: bool = True) -> int:
        """Tell the device ``[offset, offset + length)`` is unused (contents become undefined)."""
        return self._submit_ranges(RequestType.DISCARD, offset, length, False, queue, kick)

    def submit_write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        unmap: bool = False,
        queue: int = 0,
        kick: bool = True,
    ) -> int:
        """Zero ``[offset, offset + length)``; ``unmap`` lets the device deallocate it."""
        return self._submit_ranges(RequestType.WRITE_ZEROES, offset, length, unmap, queue, kick)

    def _range_limits(self, req_type: int) -> tuple[int, int]:
        """(sectors per segment, segments per request) for discard / write-zeroes."""
        cfg = self.config
        if req_type == RequestType.DISCARD:
            sectors, segs = cfg.max_discard_sectors, cfg.max_discard_seg
        else:
            sectors, segs = cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg
        per_seg = sectors or _U32_MAX
        # Keep segments whole blocks.
        per_seg -= per_seg % (self.block_size // SECTOR_SIZE)
        return max(per_seg, self.block_size // SECTOR_SIZE), max(segs, 1)

    def _submit_ranges(
        self, req_type: int, offset: int, length: int, unmap: bool, queue: int, kick: bool
    ) -> int:
        if req_type == RequestType.DISCARD:
            op, feature = "discard", BlkFeature.DISCARD
        else:
            op, feature = "write_zeroes", BlkFeature.WRITE_ZEROES
        self._check_writable(op)
        if not self.has(feature):
            raise BlkError(errno.ENOTSUP, f"{op}: the device does not offer it")
        self._check_range(offset, length, op)
        if length == 0:
            raise ValueError(f"{op}: length must be positive")
        per_seg, max_segs = self._range_limits(req_type)
        segments: list[bytes] = []
        sector, remaining = offset // SECTOR_SIZE, length // SECTOR_SIZE
        flags = 1 if unmap else 0
        while remaining:
            n = min(per_seg, remaining)
            segments.append(SEGMENT.pack(sector, n, flags))
            sector += n
            remaining -= n
        if len(segments) > max_segs:
            raise ValueError(
                f"{op}: {length} bytes need {len(segments)} segments, more than the device's "
                f"{max_segs}; split the request"
            )
        data = b"".join(segments)
        addr = self.transport.allocator.alloc(len(data), DISCARD_SEGMENT_SIZE)
        try:
            self.mem.write(addr, data)
            return self._submit(
                queue, req_type, 0, [(addr, len(data))], (), kick, allocations=[addr]
            )
        except BaseException:
            self.transport.allocator.free(addr)
            raise

    def submit_get_id(self, addr: int, *, queue: int = 0, kick: bool = True) -> int:
        """Fetch the device ID string (20 bytes, NUL-padded) into guest memory at ``addr``."""
        if not self._in_memory(addr, GET_ID_BYTES):
            raise ValueError(f"get_id: buffer {addr:#x}+{GET_ID_BYTES} is not in guest memory")
        return self._submit(queue, RequestType.GET_ID, 0, (), [(addr, GET_ID_BYTES)], kick)

    # -- completion ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet returned by poll/wait."""
        return len(self._in_flight)

    def _reap(self) -> None:
        in_flight = self._in_flight
        allocations = self._allocations
        done = self._done
        for q in self._queues:
            slots = q.slots
            free_slots = q.free_slots
            for token, written in q.queue.used():
                assert isinstance(token, int)
                slot = in_flight.pop(token)
                status = slots[slot * _SLOT + _STATUS_OFFSET]
                if status == S_OK and written:
                    done.append((token, 0))
                else:
                    done.append((token, _status_result(status, written)))
                if allocations and token in allocations:
                    for addr in allocations.pop(token):
                        self.transport.allocator.free(addr)
                free_slots.append(slot)

    def poll(self) -> list[tuple[int, int]]:
        """Completions available now, as ``(token, result)``; never blocks."""
        self._reap()
        done, self._done = self._done, []
        return done

    def wait(self, min_completions: int = 1, timeout: float | None = None) -> list[tuple[int, int]]:
        """Block until at least ``min_completions`` requests completed (or ``timeout``).

        Returns every completion available (possibly more, or fewer on timeout).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._reap()
        while len(self._done) < min_completions:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not self._in_flight:
                raise ValueError(
                    f"waiting for {min_completions} completions with only "
                    f"{len(self._done)} possible"
                )
            if not self._wait_some(deadline):
                break
        done, self._done = self._done, []
        return done

    def _wait_for(self, token: int, deadline: float | None) -> int | None:
        """Block until ``token`` completes (None at ``deadline``); other completions
        stay for poll/wait."""
        while True:
            for i, (done_token, result) in enumerate(self._done):
                if done_token == token:
                    del self._done[i]
                    return result
            if token not in self._in_flight:
                raise ValueError(f"token {token} is not in flight")
            if not self._wait_some(deadline):
                return None

    def _wait_some(self, deadline: float | None) -> bool:
        """Wait for completions and reap them; False once past ``deadline``.

        With ``poll_us``, spin on the used rings first; sleep only when that
        found nothing, and only with notifications on.
        """
        if self._poll_s and self._spin(deadline):
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if not self._notifying and self._enable_notifications():
            # Used while notifications were off: no notification will come
            # for these, so reap instead of sleeping (split-ring.tex /
            # packed-ring.tex, "Receiving Used Buffers From The Device").
            self._reap()
            return True
        self.transport.wait_interrupt(remaining)
        self._reap()
        return True

    def _spin(self, deadline: float | None) -> bool:
        """Reap in a loop for up to ``poll_us`` (not past ``deadline``), no system calls.

        True as soon as something completed.  Used-buffer notifications are
        turned off first, as the driver watches the rings anyway; that is
        only a hint to the device (split-ring.tex, "Used Buffer Notification
        Suppression"), so nothing needs re-checking here.
        """
        if self._notifying:
            for q in self._queues:
                q.queue.disable_interrupts()
            self._notifying = False
        done = self._done
        before = len(done)
        reap = self._reap
        clock = time.monotonic
        end = clock() + self._poll_s
        if deadline is not None and deadline < end:
            end = deadline
        while True:
            reap()
            if len(done) != before:
                return True
            if clock() >= end:
                return False

    def _enable_notifications(self) -> bool:
        """Ask every queue for used-buffer notifications; True if some were used meanwhile.

        Each queue re-checks its ring after a full barrier, so a buffer used
        before the device saw notifications on is reported here instead of
        being signalled (or lost).
        """
        used = False
        for q in self._queues:
            if q.queue.enable_interrupts():
                used = True
        self._notifying = True
        return used

    # -- blocking helpers -------------------------------------------------------------------------

    def _scratch_buffer(self) -> Buffer:
        if self._scratch is None:
            self._scratch = self.alloc_buffer(self.max_transfer)
        return self._scratch

    def _run(
        self, submit: Callable[[], int], op: str, offset: int, *, scratch: bool = False
    ) -> None:
        """Submit (waiting for room if the queue is full), wait, raise BlkError on failure.

        On timeout the request stays in flight; if it used the scratch
        buffer, that buffer is abandoned (never reused or freed) since the
        device may still write to it.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self._reap()
        while True:
            try:
                token = submit()
                break
            except QueueFullError:
                # Requests submitted with kick=False may be what fills it.
                self.kick()
                if not self._in_flight or not self._wait_some(deadline):
                    raise
        result = self._wait_for(token, deadline)
        if result is None:
            if scratch:
                self._scratch = None
            raise BlkError(
                errno.ETIMEDOUT, f"{op} at offset {offset}: no completion in {self.timeout} s"
            )
        if result < 0:
            raise BlkError(-result, f"{op} at offset {offset}: {os.strerror(-result)}")

    def read(self, offset: int, length: int, *, queue: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset`` (split into ``max_transfer`` requests)."""
        self._check_range(offset, length, "read")
        self._check_queue(queue)
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(self.max_transfer, length - pos)
            buf = self._scratch_buffer()
            self._run(
                partial(self.submit_read, offset + pos, buf.addr, n, queue=queue),
                "read",
                offset + pos,
                scratch=True,
            )
            out[pos : pos + n] = buf.view[:n]
            pos += n
        return bytes(out)

    def readv(self, offset: int, iovecs: Buffers, *, queue: int = 0) -> None:
        """Read into guest buffers and wait (one request)."""
        self._run(lambda: self.submit_readv(offset, iovecs, queue=queue), "read", offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, queue: int = 0) -> None:
        """Write ``data`` at ``offset`` (split into ``max_transfer`` requests)."""
        src = memoryview(data).cast("B")
        self._check_writable("write")
        self._check_range(offset, len(src), "write")
        self._check_queue(queue)
        pos = 0
        while pos < len(src):
            n = min(self.max_transfer, len(src) - pos)
            buf = self._scratch_buffer()
            buf.view[:n] = src[pos : pos + n]
            self._run(
                partial(self.submit_write, offset + pos, buf.addr, n, queue=queue),
                "write",
                offset + pos,
                scratch=True,
            )
            pos += n

    def writev(self, offset: int, iovecs: Buffers, *, queue: int = 0) -> None:
        """Write from guest buffers and wait (one request)."""
        self._run(lambda: self.submit_writev(offset, iovecs, queue=queue), "write", offset)

    def flush(self, *, queue: int = 0) -> None:
        """Make every completed write durable."""
        self._run(lambda: self.submit_flush(queue=queue), "flush", 0)

    def discard(self, offset: int, length: int, *, queue: int = 0) -> None:
        """Discard a range (split into as many requests as the device's limits need)."""
        self._ranges(RequestType.DISCARD, offset, length, False, queue)

    def write_zeroes(
        self, offset: int, length: int, *, unmap: bool = False, queue: int = 0
    ) -> None:
        """Zero a range (split into as many requests as the device's limits need)."""
        self._ranges(RequestType.WRITE_ZEROES, offset, length, unmap, queue)

    def _ranges(self, req_type: int, offset: int, length: int, unmap: bool, queue: int) -> None:
        op = "discard" if req_type == RequestType.DISCARD else "write_zeroes"
        self._check_range(offset, length, op)
        per_seg, max_segs = self._range_limits(req_type)
        step = per_seg * max_segs * SECTOR_SIZE
        pos = 0
        while pos < length:
            n = min(step, length - pos)
            self._run(
                partial(self._submit_ranges, req_type, offset + pos, n, unmap, queue, True),
                op,
                offset + pos,
            )
            pos += n

    def get_id(self, *, queue: int = 0) -> str:
        """The device ID string (serial), without its NUL padding."""
        buf = self._scratch_buffer()
        self._run(lambda: self.submit_get_id(buf.addr, queue=queue), "get_id", 0, scratch=True)
        return bytes(buf.view[:GET_ID_BYTES]).split(b"\0", 1)[0].decode("ascii", "replace")
