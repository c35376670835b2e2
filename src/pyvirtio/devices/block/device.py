"""virtio-blk: the device model (device-types/blk).

The model negotiates, answers config space and serves requests; it does no
I/O of its own.  Each request goes through :class:`~.request.RequestParser`
(pure validation, :mod:`.request`) and is carried out by the
:class:`~.io.BlockBackend` the host gives the model (:mod:`.io`:
``FileBackend`` moves data with ``preadv``/``pwritev`` straight between the
file and views of guest memory, no bounce buffer on the normal path).  The
backend's calls block: they run inside ``queue_notify`` on the host's thread,
or on the :class:`~pyvirtio.workers.IoWorkers` the host lent
(:mod:`.pipeline`).

Every notification drains the queue: all available chains are served, their
completions are published with one ``add_used_batch`` and at most one
interrupt.  In writethrough mode the writes of a batch share one flush
before any of them is completed (a group commit): the spec only requires a
write to be stable *before its completion is reported* (device-types/blk:
Device Operation, "A write becomes stable ...").

A request is finished (and its status written) before ``queue_notify``
returns, so nothing is ever in flight between calls and ``sleep`` has
nothing to drain.  With ``io_workers`` (``pyvirtio serve blk --io-threads
N``) one ``queue_notify`` serves the ring from several threads at once (see
:mod:`.pipeline`); the call still returns only when nothing is in flight.

A malformed request gets ``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP``
(:mod:`.request` says which), a host I/O error (:class:`OSError`) gets IOERR
for that request only; the device keeps serving.  A chain with no
device-writable byte cannot carry a status: it is returned with 0 bytes
written and logged.  Only a malformed *ring* (:class:`VirtqueueError`) stops
the device (DEVICE_NEEDS_RESET).

Used length (split-ring.tex "The Virtqueue Used Ring": the device "MUST
write at least len bytes, beginning at the first device-writable buffer"):
a request that was carried out is returned with its whole device-writable
part counted.  If it failed after the device may have written part of its
data area (a read that failed half way), that area is zero-filled, so a
partial read is never mistaken for data.  A request refused before anything
was touched has only its status byte written; it is returned with length 0
(or 1 when the status byte is all it has), so refusing a huge request costs
nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Final, Literal

from pyvirtio.constants import DeviceId
from pyvirtio.device import COMMON_FEATURES, VirtioDevice
from pyvirtio.devices.block import persist
from pyvirtio.devices.block.io import BlockBackend, FileBackend, is_power_of_two, zero_views
from pyvirtio.devices.block.pipeline import Pipeline
from pyvirtio.devices.block.request import BadRequest, Limits, Request, RequestParser, Served
from pyvirtio.devices.block.wire import (
    CONFIG_WRITEBACK_OFFSET,
    GET_ID_BYTES,
    S_IOERR,
    S_OK,
    SECTOR_SIZE,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    BlkConfig,
    BlkFeature,
    pack_config,
)
from pyvirtio.memory import GuestMemoryError
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, VirtqueueError
from pyvirtio.workers import IoWorkers

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_SIZE_MAX",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
    "MAX_WRITE_ZEROES_SECTORS",
    "MAX_WRITE_ZEROES_SEG",
    "Block",
    "CacheMode",
]

log = logging.getLogger(__name__)

#: Largest descriptor the device accepts, advertised in ``size_max``.
DEFAULT_SIZE_MAX: Final = 1 << 20
#: Default (and maximum offered) size of each request queue.
DEFAULT_QUEUE_SIZE: Final = 256
#: Segments per discard / write-zeroes request.
MAX_DISCARD_SEG: Final = 128
MAX_WRITE_ZEROES_SEG: Final = 128
#: Sectors per discard / write-zeroes segment (4 GiB / 1 GiB): bounds the work
#: one request can ask of the host, in particular the zero-writing fallback.
MAX_DISCARD_SECTORS: Final = 1 << 23
MAX_WRITE_ZEROES_SECTORS: Final = 1 << 21
#: Seconds between two log lines of the same kind of host I/O failure.
IO_LOG_INTERVAL: Final = 60.0

#: Requests whose data area the device writes.
_FILLS_DATA: Final = frozenset({T_IN, T_GET_ID})

CacheMode = Literal["writeback", "writethrough"]


class Block(VirtioDevice):
    """A virtio block device over a :class:`~.io.BlockBackend`.

    ``storage`` is the backend the host gives the device, or a path or file
    descriptor, from which the device makes a :class:`~.io.FileBackend`
    (with ``read_only`` and ``direct``) and which it closes in :meth:`close`
    (a descriptor passed in stays the caller's).  A backend passed in stays
    the caller's too.

    * ``read_only``: offer VIRTIO_BLK_F_RO; writes, discards and write-zeroes
      fail with IOERR and touch nothing.
    * ``serial``: the device ID string GET_ID returns (ASCII, at most 20 bytes).
    * ``cache``: the cache mode after reset.  ``"writeback"`` completes
      writes once the host has them and makes them durable on FLUSH;
      ``"writethrough"`` makes every write durable before completing it.  A
      driver that negotiates VIRTIO_BLK_F_CONFIG_WCE can switch at run time
      through the ``writeback`` config byte.
    * ``direct``: open with O_DIRECT (bypass the host page cache).
    * ``logical_block_size``: ``blk_size`` in config (VIRTIO_BLK_F_BLK_SIZE);
      the protocol's unit stays 512 bytes (device-types/blk: Device
      Initialization).
    * ``num_queues``: request queues; more than one offers VIRTIO_BLK_F_MQ.
    * ``discard`` / ``write_zeroes``: offer those commands (never on a
      read-only device).
    * ``io_workers``: worker threads (owned and closed by the caller) that
      help serve a ring while it holds a read or write of at least
      ``io_parallel_min`` bytes and more requests (see :mod:`.pipeline`).
      Worth it for large transfers with a CPU to spare; a ring of small
      requests is served by the calling thread alone.
    """

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        storage: BlockBackend | str | os.PathLike[str] | int,
        *,
        read_only: bool = False,
        serial: str = "",
        cache: CacheMode = "writeback",
        direct: bool = False,
        logical_block_size: int = 512,
        num_queues: int = 1,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        discard: bool = True,
        write_zeroes: bool = True,
        io_workers: IoWorkers | None = None,
        io_parallel_min: int = 64 * 1024,
    ) -> None:
        if io_parallel_min < 0:
            raise ValueError(f"io_parallel_min must be >= 0, not {io_parallel_min}")
        if cache not in ("writeback", "writethrough"):
            raise ValueError(f"cache must be 'writeback' or 'writethrough', not {cache!r}")
        try:
            serial_bytes = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial must be ASCII: {serial!r}") from None
        if len(serial_bytes) > GET_ID_BYTES:
            raise ValueError(f"serial is longer than {GET_ID_BYTES} bytes: {serial!r}")
        if not is_power_of_two(logical_block_size) or not (
            SECTOR_SIZE <= logical_block_size <= 65536
        ):
            raise ValueError(
                f"logical_block_size must be a power of two in [512, 65536], "
                f"not {logical_block_size}"
            )
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be in [1, 65535], not {num_queues}")
        if not 1 <= queue_size <= 32768:
            raise ValueError(f"queue_size must be in [1, 32768], not {queue_size}")

        backend: BlockBackend
        if isinstance(storage, (str, os.PathLike, int)):
            backend = FileBackend(storage, read_only=read_only, direct=direct)
            self._owns_backend = True
        else:
            backend = storage
            self._owns_backend = False
            read_only = read_only or storage.read_only
        #: The host I/O backend the device uses.
        self.backend: Final = backend
        self._logical_block_size = logical_block_size
        try:
            self._probe()
        except BaseException:
            self.close()
            raise

        self.read_only: Final = read_only
        self._serial = serial
        self._id_bytes = serial_bytes.ljust(GET_ID_BYTES, b"\0")
        self._cache: CacheMode = cache
        self._queue_size = queue_size
        self._discard = discard and not read_only
        self._write_zeroes = write_zeroes and not read_only
        self._seg_max = max(1, queue_size - 2)
        self._io_workers = io_workers
        self._ring_lock = threading.Lock()
        self._io_parallel_min = io_parallel_min
        self._parser = RequestParser(self._limits())

        features = (
            COMMON_FEATURES
            | BlkFeature.SIZE_MAX.mask
            | BlkFeature.SEG_MAX.mask
            | BlkFeature.BLK_SIZE.mask
            | BlkFeature.FLUSH.mask
            | BlkFeature.CONFIG_WCE.mask
        )
        if read_only:
            features |= BlkFeature.RO.mask
        if self._topology_applies():
            features |= BlkFeature.TOPOLOGY.mask
        if num_queues > 1:
            features |= BlkFeature.MQ.mask
        if self._discard:
            features |= BlkFeature.DISCARD.mask
        if self._write_zeroes:
            features |= BlkFeature.WRITE_ZEROES.mask
        super().__init__(features, (queue_size,) * num_queues)

        #: The ``writeback`` config byte: the cache mode in force.
        self._writeback = False
        self._reset_cache_mode()
        #: Host I/O failures, logged once a minute per errno: a failing disk
        #: fails every request the guest sends.
        self._io_log = RateLimitedLog(log, self.name, interval=IO_LOG_INTERVAL)
        #: Statistics.
        self.requests = 0
        self.bad_requests = 0
        self.io_errors = 0

    def _probe(self) -> None:
        """Read capacity and topology from the backend."""
        geometry = self.backend.geometry(self._logical_block_size)
        self._physical_block_size = geometry.physical_block_size
        self._opt_io_size = geometry.opt_io_size
        self._capacity = geometry.size // SECTOR_SIZE
        if geometry.size % SECTOR_SIZE:
            log.warning(
                "virtio-blk: backing size %d is not a multiple of %d; the last %d bytes "
                "are not visible to the driver",
                geometry.size,
                SECTOR_SIZE,
                geometry.size % SECTOR_SIZE,
            )

    def _limits(self) -> Limits:
        return Limits(
            capacity=self._capacity,
            size_max=DEFAULT_SIZE_MAX,
            seg_max=self._seg_max,
            read_only=self.read_only,
            max_discard_seg=MAX_DISCARD_SEG if self._discard else 0,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG if self._write_zeroes else 0,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
        )

    def _topology_applies(self) -> bool:
        return (
            self._physical_block_size > self._logical_block_size
            or self._opt_io_size >= self._logical_block_size
        )

    # -- resources ------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The backing file descriptor (-1 when the backend is not a file)."""
        return self.backend.fd if isinstance(self.backend, FileBackend) else -1

    @property
    def path(self) -> str | None:
        """The backing path (None when built from a descriptor or another backend)."""
        return self.backend.path if isinstance(self.backend, FileBackend) else None

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self._capacity

    @property
    def writeback(self) -> bool:
        """Whether completed writes may still be volatile (until a FLUSH)."""
        return self._writeback

    def close(self) -> None:
        """Close the backend if the device made it (idempotent).

        A device dropped without it leaks nothing: its backend closes its
        file when it is collected.
        """
        if getattr(self, "_owns_backend", False):
            self.backend.close()

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def refresh_capacity(self) -> bool:
        """Re-read the backing size; on a change, update ``capacity`` and tell the driver.

        The device MAY change ``capacity`` during operation and SHOULD then
        send a configuration change notification (device-types/blk: Device
        Operation).  Returns whether the capacity changed.
        """
        old = self._capacity
        self._probe()
        if self._capacity == old:
            return False
        self._parser = RequestParser(self._limits())
        self.config_changed()
        return True

    # -- negotiation and configuration ----------------------------------------------------

    def _reset_cache_mode(self) -> None:
        """Cache mode after reset and after feature negotiation.

        Writes are only allowed to stay volatile when the driver can flush
        them: without VIRTIO_BLK_F_FLUSH negotiated (whether or not
        CONFIG_WCE is) the device runs writethrough, as "If
        VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not,
        the device MUST initialize writeback to 0" and case 1 of the
        stability rules require (device-types/blk: Device Initialization,
        Device Operation).
        """
        self._writeback = (
            self._cache == "writeback" and self.has_feature(BlkFeature.FLUSH) and not self.read_only
        )

    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        self._reset_cache_mode()

    def reset(self) -> None:
        super().reset()
        self._reset_cache_mode()
        # The region window belongs to memory the host may now unmap.
        self._parser.forget_memory()

    def config(self) -> BlkConfig:
        """The configuration space as fields."""
        lbs = self._logical_block_size
        physical_exp = (self._physical_block_size // lbs).bit_length() - 1
        limits = self._parser.limits
        return BlkConfig(
            capacity=self._capacity,
            size_max=limits.size_max,
            seg_max=limits.seg_max,
            blk_size=lbs,
            physical_block_exp=physical_exp,
            min_io_size=self._physical_block_size // lbs,
            opt_io_size=self._opt_io_size // lbs,
            writeback=int(self._writeback),
            num_queues=self.num_queues,
            max_discard_sectors=limits.max_discard_sectors if self._discard else 0,
            max_discard_seg=limits.max_discard_seg,
            discard_sector_alignment=(
                max(self._physical_block_size, lbs) // SECTOR_SIZE if self._discard else 0
            ),
            max_write_zeroes_sectors=limits.max_write_zeroes_sectors if self._write_zeroes else 0,
            max_write_zeroes_seg=limits.max_write_zeroes_seg,
            # unmap is attempted with PUNCH_HOLE, which can deallocate.
            write_zeroes_may_unmap=int(self._write_zeroes),
        )

    def config_bytes(self) -> bytes:
        return pack_config(self.config())

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``writeback`` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE.

        (device-types/blk: Device Initialization, item 5; Driver
        Requirements: Device Operation, "the driver MAY switch to
        writethrough or writeback mode by writing respectively 0 and 1".)
        """
        if offset <= CONFIG_WRITEBACK_OFFSET < offset + len(data):
            if self.has_feature(BlkFeature.CONFIG_WCE) and not self.read_only:
                value = data[CONFIG_WRITEBACK_OFFSET - offset]
                self._writeback = value != 0
                log.debug("%s: cache mode set to %s by the driver", self.name, self.cache_mode)
            else:
                log.info("%s: write to writeback without CONFIG_WCE, ignored", self.name)
            if len(data) == 1:
                return
        log.info(
            "%s: ignored write of %d bytes to read-only config offset %#x",
            self.name,
            len(data),
            offset,
        )

    @property
    def cache_mode(self) -> CacheMode:
        return "writeback" if self._writeback else "writethrough"

    # -- lifecycle ---------------------------------------------------------------------------

    def _serve_posted(self) -> None:
        for index in range(self.num_queues):
            self.queue_notify(index)

    def _on_sleep(self) -> None:
        """Nothing to drain: every request completes inside ``queue_notify``."""

    # -- request processing ------------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        """Serve every available request, then complete them together.

        One ``add_used_batch`` and at most one interrupt per call.  In
        writethrough mode the batch's writes are made durable by one flush
        before any completion is published; if it fails they all report IOERR.
        """
        if self._io_workers is not None:
            Pipeline(self, index, queue, self._io_workers).run()
            return
        served: list[Served] = []
        take = self._take
        carry_out = self._carry_out
        try:
            while (chain := queue.pop()) is not None:
                request = take(chain)
                if isinstance(request, Served):
                    served.append(request)
                else:
                    served.append(carry_out(chain, request))
        finally:
            if served:
                self._publish(queue, served, self._sync(served))
                self.signal_used(index)

    def _take(self, chain: DescriptorChain) -> Request | Served:
        """Count and parse a popped request: what to carry out, or its refusal."""
        self.requests += 1
        try:
            return self._parser.parse(chain)
        except BadRequest as exc:
            self._bad(chain, exc.reason)
            return Served(chain, exc.status, False, False)

    def _carry_out(self, chain: DescriptorChain, request: Request) -> Served:
        """Do what ``request`` asks through the backend.

        Runs on the ring's thread or (reads and writes) on an ``io_workers``
        thread, so it touches nothing but the backend and the request's views.
        """
        req_type = request.type
        backend = self.backend
        try:
            if req_type == T_IN:
                backend.read_into(request.views, request.offset, request.length)
                return Served(chain, S_OK, False, True)
            if req_type == T_OUT:
                backend.write_from(request.views, request.offset, request.length)
                return Served(chain, S_OK, True, False)
            if req_type == T_FLUSH:
                if not self.read_only:
                    backend.flush()
                return Served(chain, S_OK, False, False)
            if req_type == T_GET_ID:
                # The data MUST be 20 bytes; a shorter buffer gets a prefix
                # and a longer one is NUL-padded.
                _copy_into(request.views, self._id_bytes)
                return Served(chain, S_OK, False, True)
            for segment in request.segments:  # DISCARD or WRITE_ZEROES
                if req_type == T_DISCARD:
                    backend.discard(segment.offset, segment.length)
                else:
                    backend.write_zeroes(segment.offset, segment.length, unmap=segment.unmap)
            return Served(chain, S_OK, True, False)
        except OSError as exc:
            self._io_log.warn(
                "io", exc.errno, "request %d (type %d) failed: %s", chain.head, req_type, exc
            )
            return Served(chain, S_IOERR, False, req_type in _FILLS_DATA)

    def _sync(self, served: list[Served]) -> bool:
        """In writethrough mode, make the served writes durable; True if that failed."""
        if self._writeback or not any(s.modified for s in served):
            return False
        try:
            self.backend.flush()
        except OSError as exc:
            log.error("%s: flush failed: %s", self.name, exc)
            return True
        return False

    def _publish(self, queue: DeviceQueue, served: list[Served], sync_failed: bool) -> None:
        """Write the status bytes and put ``served`` in the used ring.

        A write whose sync failed is IOERR; a chain that cannot carry a
        status (None) is returned with nothing written.
        """
        completions: list[tuple[DescriptorChain, int]] = []
        write_status = self._parser.write_status
        for done in served:
            chain = done.chain
            status = done.status
            if status == S_OK and not (sync_failed and done.modified):
                try:
                    write_status(chain, S_OK)
                except GuestMemoryError as exc:  # regions removed since the chain was parsed
                    raise VirtqueueError(str(exc)) from exc
                completions.append((chain, chain.writable_len))
            elif status is None:
                completions.append((chain, 0))
            else:
                self.io_errors += 1
                final = S_IOERR if sync_failed and done.modified else status
                completions.append((chain, self._write_status(chain, final, done.data_written)))
        queue.add_used_batch(completions)

    def _write_status(self, chain: DescriptorChain, status: int, data_written: bool) -> int:
        """Write a failed request's status; returns the used length."""
        try:
            return self._parser.write_failure(chain, status, data_written)
        except GuestMemoryError as exc:  # regions removed since the chain was parsed
            raise VirtqueueError(str(exc)) from exc

    def _bad(self, chain: DescriptorChain, reason: str) -> None:
        """Log a driver error (first one loudly, the rest at debug level)."""
        self.bad_requests += 1
        log.log(
            logging.WARNING if self.bad_requests == 1 else logging.DEBUG,
            "%s: request %d: %s",
            self.name,
            chain.head,
            reason,
        )

    # -- snapshot --------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "read_only": self.read_only,
            "serial": self._serial,
            "cache": self._cache,
            "direct": self.backend.direct,
            "logical_block_size": self._logical_block_size,
            "num_queues": self.num_queues,
            "queue_size": self._queue_size,
            "discard": self._discard,
            "write_zeroes": self._write_zeroes,
            "capacity": self._capacity,
        }

    def _snapshot_model(self) -> Any:
        return persist.save(self.path, self._options(), self._writeback)

    def _restore_model(self, state: Any) -> None:
        writeback = persist.load(state, self.path, self._options(), self.name)
        self._writeback = writeback and not self.read_only


def _copy_into(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` into the start of ``views`` and zero what follows."""
    pos = 0
    for view in views:
        n = min(len(view), max(0, len(data) - pos))
        view[:n] = data[pos : pos + n]
        pos += n
        if n < len(view):
            zero_views([view[n:]])
