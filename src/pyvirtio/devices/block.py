"""virtio-blk: a block device over a host file or block device (device-types/blk).

Requests (device-types/blk: Device Operation) are ``struct virtio_blk_req``:
a 16-byte device-readable header (``type``, ``reserved``, ``sector``), the
data, and a one-byte device-writable ``status`` as the very last byte of the
chain.  Data moves with :func:`os.preadv` / :func:`os.pwritev` straight
between the backing file and zero-copy views of guest memory
(:meth:`DescriptorChain.readable_views` / ``writable_views``): no bounce
buffer on the normal path.

Every notification drains the queue: all available chains are served, their
completions are published with one ``add_used_batch`` and at most one
interrupt.  In writethrough mode the writes of a batch share one
``fdatasync`` before any of them is completed (a group commit): the spec
only requires a write to be stable *before its completion is reported*
(device-types/blk: Device Operation, "A write becomes stable ...").

Everything is synchronous: a request is finished (and its status written)
before ``queue_notify`` returns, so nothing is ever in flight between calls
and ``sleep`` has nothing to drain.

With ``io_workers`` (:class:`~pyvirtio.workers.IoWorkers`, threads the host
owns: ``pyvirtio serve blk --io-threads N``) one ``queue_notify`` serves the
ring from several threads at once: when a large read or write is taken and
more requests wait, workers are called in as extra consumers.  Each consumer
takes a request, carries it out and completes it on its own (no request
is handed between threads); the ring, its used entries and the statistics
are touched only under the device's ring lock, the copies run outside it
and in parallel.  While requests wait in the ring a few completions share
one interrupt; once it is empty every completion is signalled at once (the
driver is waiting).  In writethrough mode each write is synced on its own,
before its completion.  The call still returns only when nothing is in flight,
so the lifecycle above holds unchanged.  Requests in flight together have
no order between them (the driver's concern: device-types/blk gives none);
a FLUSH covers the writes completed before it, which are the only ones a
driver can have seen.

What a driver cannot make the device do, whatever it puts in a chain:

* touch a byte of the file outside ``[0, capacity * 512)``: sector and
  length are checked (as unbounded Python integers, so they cannot overflow)
  before any I/O;
* raise: a malformed request gets ``VIRTIO_BLK_S_IOERR`` (driver error) or
  ``VIRTIO_BLK_S_UNSUPP`` (where the spec says so: unknown types, unknown
  discard/write-zeroes flags, ``unmap`` on a discard), and a host I/O error
  (:class:`OSError`) gets ``IOERR`` for that request only; the device keeps
  serving.  A chain with no device-writable byte cannot carry a status: it
  is returned with 0 bytes written and logged.  Only a malformed *ring*
  (:class:`VirtqueueError`) stops the device (DEVICE_NEEDS_RESET).

Used length: an answered request is returned with the whole device-writable
part counted as written (the spec's "MUST write at least len bytes,
beginning at the first device-writable buffer", split-ring.tex "The Virtqueue
Used Ring").  To keep that true for failed requests too, the data area of a
failed request that has one (an ``IN`` or ``GET_ID``) is zero-filled, which
also keeps a partial read from being mistaken for data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import mmap
import os
import queue as _queue
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pyvirtio.constants import DeviceId
from pyvirtio.device import COMMON_FEATURES, QueueResources, VirtioDevice
from pyvirtio.irq import DeviceInterrupt
from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, VirtqueueError
from pyvirtio.workers import IoWorkers, Outcome

__all__ = [
    "CONFIG_SIZE",
    "CONFIG_WRITEBACK_OFFSET",
    "DISCARD_SEGMENT_SIZE",
    "GET_ID_BYTES",
    "HEADER_SIZE",
    "SECTOR_SIZE",
    "BlkConfig",
    "BlkFeature",
    "Block",
    "RequestType",
    "Status",
    "pack_config",
    "unpack_config",
]

log = logging.getLogger(__name__)


class BlkFeature(enum.IntEnum):
    """Block feature bit numbers (device-types/blk: Feature bits)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17

    @property
    def mask(self) -> int:
        return 1 << self.value


class RequestType(enum.IntEnum):
    """``virtio_blk_req.type`` values (device-types/blk: Device Operation)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """``virtio_blk_req.status`` values (device-types/blk: Device Operation)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: The protocol's unit for ``sector``, ``capacity`` and data lengths.
SECTOR_SIZE = 512
#: ``type``, ``reserved``, ``sector``.
HEADER_SIZE = 16
#: ``struct virtio_blk_discard_write_zeroes``.
DISCARD_SEGMENT_SIZE = 16
#: Length of the device ID string a GET_ID request returns.
GET_ID_BYTES = 20
#: ``sizeof(struct virtio_blk_config)``, up to and including ``zoned``.
CONFIG_SIZE = 96
#: Offset of the ``writeback`` byte in the configuration space.
CONFIG_WRITEBACK_OFFSET = 32

#: Largest segment the device advertises in ``size_max`` (a hint for drivers).
DEFAULT_SIZE_MAX = 1 << 20
#: Default (and maximum offered) size of each request queue.
DEFAULT_QUEUE_SIZE = 256
#: Segments per discard / write-zeroes request.
MAX_DISCARD_SEG = 128
MAX_WRITE_ZEROES_SEG = 128
#: Sectors per discard / write-zeroes segment (4 GiB / 1 GiB): bounds the work
#: one request can ask of the host, in particular the zero-writing fallback.
MAX_DISCARD_SECTORS = 1 << 23
MAX_WRITE_ZEROES_SECTORS = 1 << 21

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
_SEGMENT_F_UNMAP = 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
#: fallocate errors meaning "this file (system) cannot do that": fall back.
_FALLOC_UNSUPPORTED = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}
)

# <linux/fs.h> block device ioctls.
_BLKSSZGET = 0x1268
_BLKIOMIN = 0x1278
_BLKIOOPT = 0x1279
_BLKPBSZGET = 0x127B
_BLKGETSIZE64 = 0x80081272

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZERO_CHUNK = 1 << 20

_WRITE_TYPES = frozenset({RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES})
#: Plain ints for the hot path's comparisons (an IntEnum member lookup costs more).
_IN = int(RequestType.IN)
_OUT = int(RequestType.OUT)
#: Completions that may share one interrupt while requests wait in the ring
#: (pipelined serving only).
_SIGNAL_BATCH = 4
#: Tag of the event a helper sends the idle ring thread: requests wait again.
_CALL_BACK = object()


#: A request carried out: its chain, its status (None: no status byte to
#: write) and whether it modified the file.
_Served = tuple[DescriptorChain, int | None, bool]


@dataclass(slots=True)
class _Serving:
    """What the consumers of one pipelined ``queue_notify`` share (under the ring lock)."""

    index: int
    queue: DeviceQueue
    interrupt: DeviceInterrupt
    #: Helpers' outcomes, and calls back (tag _CALL_BACK) for the ring's thread.
    events: _queue.SimpleQueue[Outcome[None]]
    #: Completions published and not yet signalled.
    unsignalled: int = 0
    #: Helpers serving now (a helper that found the ring empty is done).
    helpers: int = 0
    #: The ring's thread found the ring empty and waits for the helpers.
    idle: bool = False


CacheMode = Literal["writeback", "writethrough"]


# -- configuration space -------------------------------------------------------------


@dataclass(slots=True)
class BlkConfig:
    """The fields of ``struct virtio_blk_config`` (device-types/blk: Device
    configuration layout) this device uses; geometry, secure erase and zoned
    are left zero, as their features are not offered."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0


# capacity, size_max, seg_max, geometry (u16 u8 u8), blk_size,
# topology (u8 u8 u16 u32), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap,
# unused1[3], secure erase (3 x u32), zoned (5 x u32, u8, u8[3]).
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III IIIIIB3x")
assert _CONFIG.size == CONFIG_SIZE


def pack_config(cfg: BlkConfig) -> bytes:
    """``struct virtio_blk_config`` as little-endian bytes."""
    geometry = (0, 0, 0)  # VIRTIO_BLK_F_GEOMETRY is not offered
    secure_erase_and_zoned = (0,) * 9  # neither feature is offered
    return _CONFIG.pack(
        cfg.capacity,
        cfg.size_max,
        cfg.seg_max,
        *geometry,
        cfg.blk_size,
        cfg.physical_block_exp,
        cfg.alignment_offset,
        cfg.min_io_size,
        cfg.opt_io_size,
        cfg.writeback,
        0,  # unused0 (MUST be 0: device-types/blk: Device Initialization)
        cfg.num_queues,
        cfg.max_discard_sectors,
        cfg.max_discard_seg,
        cfg.discard_sector_alignment,
        cfg.max_write_zeroes_sectors,
        cfg.max_write_zeroes_seg,
        cfg.write_zeroes_may_unmap,
        *secure_erase_and_zoned,
    )


def unpack_config(data: bytes) -> BlkConfig:
    """Parse a (possibly short, then zero-extended) ``struct virtio_blk_config``."""
    data = bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0")
    v = _CONFIG.unpack(data)
    return BlkConfig(
        capacity=v[0],
        size_max=v[1],
        seg_max=v[2],
        blk_size=v[6],
        physical_block_exp=v[7],
        alignment_offset=v[8],
        min_io_size=v[9],
        opt_io_size=v[10],
        writeback=v[11],
        num_queues=v[13],
        max_discard_sectors=v[14],
        max_discard_seg=v[15],
        discard_sector_alignment=v[16],
        max_write_zeroes_sectors=v[17],
        max_write_zeroes_seg=v[18],
        write_zeroes_may_unmap=v[19],
    )


# -- host I/O helpers --------------------------------------------------------------------


def _load_fallocate() -> Any:
    """fallocate(2) through ctypes: :mod:`os` only has posix_fallocate, without modes."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:  # pragma: no cover
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate_func = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raises OSError (EOPNOTSUPP when it is not available)."""
    if _fallocate_func is None:  # pragma: no cover
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate_func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a scatter list (after a short transfer)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def _zero_views(views: Sequence[memoryview]) -> None:
    for view in views:
        if len(view):
            view[:] = bytes(len(view))


@contextlib.contextmanager
def _bounce_buffer(size: int) -> Iterator[memoryview]:
    """A page-aligned buffer for an O_DIRECT retry: the rare path, so one per call
    (nothing shared between queues that may be served from different threads)."""
    mapping = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    view = memoryview(mapping)[:size]
    try:
        yield view
    finally:
        view.release()
        with contextlib.suppress(BufferError):  # a slice still referenced: GC unmaps it
            mapping.close()


def _ioctl_u64(fd: int, request: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, request, buf)
    value: int = struct.unpack("<Q", buf)[0]
    return value


def _ioctl_u32(fd: int, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf)
    value: int = struct.unpack("<I", buf)[0]
    return value


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -- the device ----------------------------------------------------------------------------


class Block(VirtioDevice):
    """A virtio block device backed by a regular file or a host block device.

    ``path_or_fd`` is a path, which the device opens (and :meth:`close`
    closes), or an open file descriptor, which stays the caller's: it must be
    open for reading, and for writing unless ``read_only``.

    * ``read_only``: offer VIRTIO_BLK_F_RO; writes, discards and write-zeroes
      fail with IOERR and touch nothing.
    * ``serial``: the device ID string GET_ID returns (ASCII, at most 20 bytes).
    * ``cache``: the cache mode after reset.  ``"writeback"`` completes
      writes once the host has them and makes them durable on FLUSH;
      ``"writethrough"`` makes every write durable before completing it.  A
      driver that negotiates VIRTIO_BLK_F_CONFIG_WCE can switch at run time
      through the ``writeback`` config byte.
    * ``direct``: open with O_DIRECT (bypass the host page cache).  Requests
      must then also satisfy the host's alignment; a buffer the kernel
      refuses (EINVAL) is retried through an aligned bounce buffer.
    * ``logical_block_size``: ``blk_size`` in config (VIRTIO_BLK_F_BLK_SIZE);
      the protocol's unit stays 512 bytes (device-types/blk: Device
      Initialization).
    * ``num_queues``: request queues; more than one offers VIRTIO_BLK_F_MQ.
    * ``discard`` / ``write_zeroes``: offer those commands (never on a
      read-only device).
    * ``io_workers``: worker threads (owned and closed by the caller) that
      help serve a ring while it holds a read or write of at least
      ``io_parallel_min`` bytes and more requests (see the module
      docstring).  Worth it for large transfers with a CPU to spare; a ring
      of small requests is served by the calling thread alone.
    """

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        path_or_fd: str | os.PathLike[str] | int,
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
        if not _is_power_of_two(logical_block_size) or not (
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

        self._path: str | None
        if isinstance(path_or_fd, int):
            self._path = None
            self._fd = path_or_fd
            self._owns_fd = False
        else:
            self._path = os.fsdecode(os.fspath(path_or_fd))
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            if direct:
                flags |= os.O_DIRECT
            self._fd = os.open(self._path, flags)
            self._owns_fd = True
        try:
            self._probe(logical_block_size, direct)
        except BaseException:
            self.close()
            raise

        self._read_only = read_only
        self._serial = serial
        self._id_bytes = serial_bytes.ljust(GET_ID_BYTES, b"\0")
        self._cache: CacheMode = cache
        self._direct = direct
        self._logical_block_size = logical_block_size
        self._queue_size = queue_size
        self._discard = discard and not read_only
        self._write_zeroes = write_zeroes and not read_only
        self._seg_max = max(1, queue_size - 2)
        self._io_workers = io_workers
        self._ring_lock = threading.Lock()
        self._io_parallel_min = io_parallel_min

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
        #: (region table, base, end, view) of the guest region last touched.
        self._region_cache = GuestMemory.NO_WINDOW
        #: Statistics.
        self.requests = 0
        self.bad_requests = 0
        self.io_errors = 0

    def _probe(self, logical_block_size: int, direct: bool) -> None:
        """Read capacity and topology from the backing file."""
        st = os.fstat(self._fd)
        self._physical_block_size = logical_block_size
        self._opt_io_size = 0
        if stat.S_ISBLK(st.st_mode):
            size = _ioctl_u64(self._fd, _BLKGETSIZE64)
            host_lbs = _ioctl_u32(self._fd, _BLKSSZGET)
            if direct and logical_block_size < host_lbs:
                raise ValueError(
                    f"direct I/O on a device with {host_lbs}-byte sectors needs "
                    f"logical_block_size >= {host_lbs}"
                )
            physical = _ioctl_u32(self._fd, _BLKPBSZGET)
            self._opt_io_size = _ioctl_u32(self._fd, _BLKIOOPT)
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
            physical = st.st_blksize
        else:
            raise ValueError("a block device's backing must be a regular file or a block device")
        if _is_power_of_two(physical) and logical_block_size <= physical <= 1 << 20:
            self._physical_block_size = physical
        self._capacity = size // SECTOR_SIZE
        if size % SECTOR_SIZE:
            log.warning(
                "virtio-blk: backing size %d is not a multiple of %d; the last %d bytes "
                "are not visible to the driver",
                size,
                SECTOR_SIZE,
                size % SECTOR_SIZE,
            )

    def _topology_applies(self) -> bool:
        return (
            self._physical_block_size > self._logical_block_size
            or self._opt_io_size >= self._logical_block_size
        )

    # -- resources ------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The backing file descriptor."""
        return self._fd

    @property
    def path(self) -> str | None:
        """The backing path (None when built from a file descriptor)."""
        return self._path

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self._capacity

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def writeback(self) -> bool:
        """Whether completed writes may still be volatile (until a FLUSH)."""
        return self._writeback

    def close(self) -> None:
        """Close the backing file if the device opened it (idempotent)."""
        fd = getattr(self, "_fd", -1)
        if getattr(self, "_owns_fd", False) and fd >= 0:
            os.close(fd)
        self._fd = -1

    def __del__(self) -> None:
        # A device dropped without close() must not leak its backing fd.
        with contextlib.suppress(Exception):
            self.close()

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
        self._probe(self._logical_block_size, self._direct)
        if self._capacity == old:
            return False
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
            self._cache == "writeback"
            and self.has_feature(BlkFeature.FLUSH)
            and not self._read_only
        )

    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        self._reset_cache_mode()

    def reset(self) -> None:
        super().reset()
        self._reset_cache_mode()
        # The cached region belongs to memory the host may now unmap.
        self._region_cache = GuestMemory.NO_WINDOW

    def config(self) -> BlkConfig:
        """The configuration space as fields."""
        lbs = self._logical_block_size
        physical_exp = (self._physical_block_size // lbs).bit_length() - 1
        return BlkConfig(
            capacity=self._capacity,
            size_max=DEFAULT_SIZE_MAX,
            seg_max=self._seg_max,
            blk_size=lbs,
            physical_block_exp=physical_exp,
            min_io_size=self._physical_block_size // lbs,
            opt_io_size=self._opt_io_size // lbs,
            writeback=int(self._writeback),
            num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS if self._discard else 0,
            max_discard_seg=MAX_DISCARD_SEG if self._discard else 0,
            discard_sector_alignment=(
                max(self._physical_block_size, lbs) // SECTOR_SIZE if self._discard else 0
            ),
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS if self._write_zeroes else 0,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG if self._write_zeroes else 0,
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
            if self.has_feature(BlkFeature.CONFIG_WCE) and not self._read_only:
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

    def activate(
        self, mem: GuestMemory, interrupt: DeviceInterrupt, queues: Sequence[DeviceQueue]
    ) -> None:
        super().activate(mem, interrupt, queues)
        # Requests posted before DRIVER_OK (their notifications were ignored).
        for index in range(self.num_queues):
            self.queue_notify(index)

    def _on_sleep(self) -> None:
        """Nothing to drain: every request completes inside ``queue_notify``."""

    def _on_wake(self, resources: QueueResources) -> None:
        # Notifications that arrived while asleep were ignored.
        for index in range(self.num_queues):
            self.queue_notify(index)

    # -- request processing ------------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        """Serve every available request, then complete them together.

        One ``add_used_batch`` and at most one interrupt per call.  In
        writethrough mode the batch's writes are made durable by one
        ``fdatasync`` before any completion is published; if it fails they
        all report IOERR.
        """
        if self._io_workers is not None:
            self._process_queue_pipelined(index, queue, self._io_workers)
            return
        served: list[_Served] = []
        plan_fast = self._plan_fast
        transfer = self._transfer
        try:
            while (chain := queue.pop()) is not None:
                self.requests += 1
                plan = plan_fast(chain)
                if plan is not None:
                    served.append((chain, *transfer(chain.head, *plan)))
                    continue
                served.append(self._serve_other(chain))
        finally:
            if served:
                self._complete(index, queue, served)

    def _serve_other(self, chain: DescriptorChain) -> _Served:
        """Any request but the usual read or write (see _plan_fast)."""
        if chain.writable_len == 0:
            self._bad(chain, "no device-writable status byte; cannot answer")
            return chain, None, False
        return (chain, *self._execute(chain))

    def _process_queue_pipelined(self, index: int, queue: DeviceQueue, workers: IoWorkers) -> None:
        """Serve the ring from this thread and, for large transfers, from ``workers`` too.

        Every consumer runs :meth:`_consume`.  Helpers are called in only
        while a large transfer is being taken and more requests wait: a lone
        request is served here alone.  When this thread finds the ring empty
        while helpers still serve, it waits for them, and a helper that
        takes a large transfer while more requests wait calls it back: the
        driver refills the ring while a helper copies, and this thread must
        not idle then.  Returns when the ring is empty and every helper has
        stopped.
        """
        resources = self._resources
        assert resources is not None  # _process_queue runs on an active device
        serving = _Serving(index, queue, resources.interrupt, _queue.SimpleQueue())
        events = serving.events
        outcomes_due = 0  # helpers called in whose outcome has not come yet
        error: BaseException | None = None

        def call_helpers() -> None:
            # Under the ring lock, from this thread's consumer only.
            nonlocal outcomes_due
            while serving.helpers < workers.threads and queue.has_available():
                workers.submit(self._consume, (serving, None), events, None)
                serving.helpers += 1
                outcomes_due += 1

        def wait_helpers(call_back: bool) -> bool:
            """Wait until every helper stopped; True if called back (if ``call_back``) first."""
            nonlocal outcomes_due, error
            while outcomes_due:
                event = events.get()
                if event.tag is _CALL_BACK:
                    if call_back and error is None:
                        return True
                    continue
                outcomes_due -= 1
                if event.error is not None and error is None:
                    error = event.error
            return False

        # No kicks while consumers take requests anyway: the driver saves
        # the syscalls, the host the wake-ups (split-ring.tex and
        # packed-ring.tex, "Notification Suppression").
        queue.disable_notifications()
        try:
            while True:
                try:
                    self._consume(serving, call_helpers)
                except BaseException:
                    # Helpers write guest memory: wait for them even when
                    # this consumer found the ring broken.
                    wait_helpers(call_back=False)
                    raise
                if wait_helpers(call_back=error is None):
                    continue
                if error is not None:
                    raise error  # a helper found the ring broken
                if not queue.enable_notifications():
                    return
                queue.disable_notifications()  # buffers came after the last look
        finally:
            if serving.unsignalled:
                self.signal_used(index)
            if not queue.broken:
                queue.enable_notifications()

    def _consume(self, serving: _Serving, call_helpers: Callable[[], None] | None) -> None:
        """Take, serve and complete requests until the ring is empty.

        Runs on the ring's thread and on helpers at once.  The ring, the
        request's status byte and the statistics are touched only under the
        ring lock, and so are the rare requests other than plain reads and
        writes; a read or write copies (and, in writethrough mode, syncs)
        outside it.  Before each large transfer, the ring's thread calls
        ``call_helpers``; a helper (``call_helpers`` None) calls the ring's
        thread back if it waits idle and more requests wait.
        """
        lock = self._ring_lock
        queue = serving.queue
        plan_fast = self._plan_fast
        transfer = self._transfer
        parallel_min = self._io_parallel_min
        done: list[_Served] = []  # the request served last, not yet published
        sync_failed = False
        call_back = False
        while True:
            notify = False
            # One critical section per request: publish the last one, take the next.
            with lock:
                if done:
                    self._publish(queue, done, sync_failed)
                    # While requests wait in the ring the consumers are busy
                    # anyway: a few completions share one interrupt.  Once
                    # it is empty the driver is waiting for us: signal now.
                    serving.unsignalled += 1
                    if serving.unsignalled >= _SIGNAL_BATCH or not queue.has_available():
                        serving.unsignalled = 0
                        notify = queue.needs_notification()
                try:
                    chain = queue.pop()
                except VirtqueueError:
                    if notify:  # leave it to the caller's final signal
                        serving.unsignalled = 1
                    raise
                if chain is not None:
                    self.requests += 1
                    plan = plan_fast(chain)
                    if plan is None:
                        done = [self._serve_other(chain)]
                    elif plan[3] >= parallel_min:
                        if call_helpers is not None:
                            call_helpers()
                        elif serving.idle and queue.has_available():
                            serving.idle = False
                            call_back = True
                elif call_helpers is not None:
                    serving.idle = True
                else:
                    serving.helpers -= 1  # this helper is done
            if notify:  # the system call outside the lock
                serving.interrupt.signal_used_queue(serving.index)
            if call_back:
                call_back = False
                serving.events.put(Outcome(_CALL_BACK, None, None))
            if chain is None:
                return
            if plan is not None:
                try:
                    done = [(chain, *transfer(chain.head, *plan))]
                except Exception as exc:  # not an OSError: still answer, keep serving
                    log.error("%s: request %d: transfer failed: %r", self.name, chain.head, exc)
                    done = [(chain, Status.IOERR, True)]  # it may have written part of the data
            sync_failed = self._sync(done)

    def _complete(
        self,
        index: int,
        queue: DeviceQueue,
        served: list[_Served],
    ) -> None:
        """Publish ``served`` (after the writethrough sync) and signal once."""
        self._publish(queue, served, self._sync(served))
        self.signal_used(index)

    def _sync(self, served: list[_Served]) -> bool:
        """In writethrough mode, make the served writes durable; True if that failed."""
        if self._writeback or not any(modified for _, _, modified in served):
            return False
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            log.error("%s: fdatasync failed: %s", self.name, exc)
            return True
        return False

    def _publish(
        self,
        queue: DeviceQueue,
        served: list[_Served],
        sync_failed: bool,
    ) -> None:
        """Write the status bytes and put ``served`` in the used ring.

        A write whose sync failed is IOERR; a chain that cannot carry a
        status (None) is returned with nothing written.
        """
        completions: list[tuple[DescriptorChain, int]] = []
        for chain, status, modified in served:
            if status is None:
                completions.append((chain, 0))
                continue
            final = Status.IOERR if sync_failed and modified else status
            if final != Status.OK:
                self.io_errors += 1
            completions.append((chain, self._write_status(chain, final)))
        queue.add_used_batch(completions)

    def _write_status(self, chain: DescriptorChain, status: int) -> int:
        """Write the status byte (the last device-writable byte); returns the used length."""
        writable = chain.writable
        total = chain.writable_len
        try:
            if status != Status.OK and total > 1:
                _zero_views(chain.writable_views(0, total - 1))
            for addr, length in reversed(writable):
                if length:
                    view, offset = self._locate(chain.mem, addr + length - 1, 1)
                    view[offset] = status
                    break
        except GuestMemoryError as exc:  # regions removed since the chain was parsed
            raise VirtqueueError(str(exc)) from exc
        return total

    def _locate(self, mem: GuestMemory, addr: int, length: int) -> tuple[memoryview, int]:
        """(region view, offset) of a small range inside one region.

        The header and status byte of every request go through here, so the
        last region used is kept as a GuestMemory.RegionWindow instead of
        searching the table each time.
        """
        window = self._region_cache
        if not window.covers(mem, addr, length):
            window = self._region_cache = mem.window(addr, length)
        return window.view, addr - window.base

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

    def _execute(self, chain: DescriptorChain) -> tuple[int, bool]:
        """Carry out one request; returns (status, whether the file was modified).

        Raises nothing but VirtqueueError: a host I/O failure is IOERR for
        this request only.
        """
        if chain.readable_len < HEADER_SIZE:
            self._bad(chain, f"header is {chain.readable_len} bytes, not {HEADER_SIZE}")
            return Status.IOERR, False
        req_type, _reserved, sector = self._header(chain)
        if req_type in _WRITE_TYPES and self._read_only:
            # MUST set IOERR and MUST NOT write any data (device-types/blk:
            # Device Requirements: Device Operation).
            self._bad(chain, f"type {req_type} on a read-only device")
            return Status.IOERR, False
        try:
            if req_type == RequestType.IN:
                return self._do_in(chain, sector), False
            if req_type == RequestType.OUT:
                status = self._do_out(chain, sector)
                return status, status == Status.OK
            if req_type == RequestType.FLUSH:
                return self._do_flush(), False
            if req_type == RequestType.GET_ID:
                return self._do_get_id(chain), False
            if req_type == RequestType.DISCARD and self._discard:
                status = self._do_discard_write_zeroes(chain, discard=True)
                return status, status == Status.OK
            if req_type == RequestType.WRITE_ZEROES and self._write_zeroes:
                status = self._do_discard_write_zeroes(chain, discard=False)
                return status, status == Status.OK
        except OSError as exc:
            log.warning("%s: request %d (type %d) failed: %s", self.name, chain.head, req_type, exc)
            return Status.IOERR, False
        # GET_LIFETIME (VIRTIO_BLK_F_LIFETIME not offered), SECURE_ERASE, the
        # zone commands (MUST be UNSUPP without VIRTIO_BLK_F_ZONED), and
        # anything unknown.
        log.debug("%s: request %d: unsupported type %d", self.name, chain.head, req_type)
        return Status.UNSUPP, False

    def _plan_fast(self, chain: DescriptorChain) -> tuple[int, list[memoryview], int, int] | None:
        """(type, data views, file offset, length) of a usual read or write, else None.

        The usual shape is what Linux and BlkDriver send: the header alone
        in the first descriptor, the status byte alone in the last, data
        in between, each range inside one memory region.  Such a request
        passes the same checks as in :meth:`_execute` and gets the same
        result; any request that would fail a check, or has another shape,
        is left to :meth:`_execute` (None), so errors are reported in one
        place.
        """
        readable = chain.readable
        writable = chain.writable
        if not readable or not writable or readable[0][1] != HEADER_SIZE or writable[-1][1] != 1:
            return None
        mem = chain.mem
        locate = self._locate
        try:
            view, offset = locate(mem, readable[0][0], HEADER_SIZE)
            req_type, _reserved, sector = _HEADER.unpack_from(view, offset)
            if req_type == _IN:
                if len(readable) != 1:
                    return None
                data = writable[:-1]
                length = chain.writable_len - 1
            elif req_type == _OUT:
                if len(writable) != 1 or self._read_only:
                    return None
                data = readable[1:]
                length = chain.readable_len - HEADER_SIZE
            else:
                return None
            if (
                not length
                or length % SECTOR_SIZE
                or sector * SECTOR_SIZE + length > self._capacity * SECTOR_SIZE
            ):
                return None
            views = []
            for addr, n in data:
                view, offset = locate(mem, addr, n)
                views.append(view[offset : offset + n])
        except GuestMemoryError:
            return None  # a range across regions (or gone): the general path sorts it out
        return req_type, views, sector * SECTOR_SIZE, length

    def _transfer(
        self, head: int, req_type: int, views: list[memoryview], offset: int, length: int
    ) -> tuple[int, bool]:
        """Carry out a planned read or write: (status, whether the file was modified).

        Runs on the ring's thread or on an ``io_workers`` thread, so it
        touches nothing but the file and ``views``.
        """
        try:
            if req_type == _IN:
                self._read_into(views, offset, length)
                return Status.OK, False
            self._write_from(views, offset, length)
            return Status.OK, True
        except OSError as exc:
            log.warning("%s: request %d (type %d) failed: %s", self.name, head, req_type, exc)
            return Status.IOERR, False

    def _header(self, chain: DescriptorChain) -> tuple[int, int, int]:
        """(type, reserved, sector), from however many descriptors hold the header."""
        addr, length = chain.readable[0]
        if length >= HEADER_SIZE:
            try:
                view, offset = self._locate(chain.mem, addr, HEADER_SIZE)
            except GuestMemoryError as exc:
                raise VirtqueueError(str(exc)) from exc
            return _HEADER.unpack_from(view, offset)
        return _HEADER.unpack(chain.read(0, HEADER_SIZE))

    def _check_range(self, chain: DescriptorChain, sector: int, length: int) -> bool:
        if sector * SECTOR_SIZE + length > self._capacity * SECTOR_SIZE:
            self._bad(
                chain,
                f"sector {sector} + {length} bytes is beyond capacity {self._capacity}",
            )
            return False
        return True

    def _do_in(self, chain: DescriptorChain, sector: int) -> int:
        if chain.readable_len != HEADER_SIZE:
            self._bad(chain, "IN request with device-readable data")
            return Status.IOERR
        length = chain.writable_len - 1
        if length % SECTOR_SIZE:
            self._bad(chain, f"IN data length {length} is not a multiple of {SECTOR_SIZE}")
            return Status.IOERR
        if not self._check_range(chain, sector, length):
            return Status.IOERR
        if length:
            self._read_into(chain.writable_views(0, length), sector * SECTOR_SIZE, length)
        return Status.OK

    def _do_out(self, chain: DescriptorChain, sector: int) -> int:
        if chain.writable_len != 1:
            self._bad(chain, "OUT request with device-writable data")
            return Status.IOERR
        length = chain.readable_len - HEADER_SIZE
        if length % SECTOR_SIZE:
            self._bad(chain, f"OUT data length {length} is not a multiple of {SECTOR_SIZE}")
            return Status.IOERR
        if not self._check_range(chain, sector, length):
            return Status.IOERR
        if length:
            self._write_from(
                chain.readable_views(HEADER_SIZE, length), sector * SECTOR_SIZE, length
            )
        return Status.OK

    def _do_flush(self) -> int:
        # sector MUST be 0 and data SHOULD be absent (driver requirements);
        # neither changes what a flush means, so both are ignored.
        if not self._read_only:
            os.fdatasync(self._fd)
        return Status.OK

    def _do_get_id(self, chain: DescriptorChain) -> int:
        if chain.readable_len != HEADER_SIZE:
            self._bad(chain, "GET_ID request with device-readable data")
            return Status.IOERR
        length = chain.writable_len - 1
        # The data MUST be 20 bytes; a shorter buffer gets a prefix and a
        # longer one is NUL-padded.
        data = self._id_bytes[:length].ljust(length, b"\0")
        chain.write(data)
        return Status.OK

    def _do_discard_write_zeroes(self, chain: DescriptorChain, *, discard: bool) -> int:
        what = "DISCARD" if discard else "WRITE_ZEROES"
        if chain.writable_len != 1:
            self._bad(chain, f"{what} request with device-writable data")
            return Status.IOERR
        length = chain.readable_len - HEADER_SIZE
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if length == 0 or length % DISCARD_SEGMENT_SIZE:
            self._bad(chain, f"{what} data length {length} is not a positive multiple of 16")
            return Status.IOERR
        count = length // DISCARD_SEGMENT_SIZE
        if count > max_seg:
            self._bad(chain, f"{what} with {count} segments (max {max_seg})")
            return Status.IOERR
        segments = list(_SEGMENT.iter_unpack(chain.read(HEADER_SIZE, length)))
        # UNSUPP cases first: the spec makes them MUSTs (device-types/blk:
        # Device Requirements: Device Operation).
        for _sector, _num, flags in segments:
            if flags & ~_SEGMENT_F_UNMAP:
                self._bad(chain, f"{what} segment with unknown flags {flags:#x}")
                return Status.UNSUPP
            if discard and flags & _SEGMENT_F_UNMAP:
                self._bad(chain, "DISCARD segment with the unmap flag")
                return Status.UNSUPP
        for sector, num, _flags in segments:
            if num > max_sectors:
                self._bad(chain, f"{what} segment of {num} sectors (max {max_sectors})")
                return Status.IOERR
            if not self._check_range(chain, sector, num * SECTOR_SIZE):
                return Status.IOERR
        for sector, num, flags in segments:
            if num == 0:
                continue
            offset, nbytes = sector * SECTOR_SIZE, num * SECTOR_SIZE
            if discard:
                self._discard_range(offset, nbytes)
            else:
                self._zero_range(offset, nbytes, unmap=bool(flags & _SEGMENT_F_UNMAP))
        return Status.OK

    # -- host I/O -------------------------------------------------------------------------------

    def _read_into(self, views: list[memoryview], offset: int, total: int) -> None:
        """preadv until every view is filled; what lies past end of file reads as zeros."""
        fd = self._fd
        while views:
            try:
                n = os.preadv(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as exc:
                if self._direct and exc.errno == errno.EINVAL:
                    self._read_bounced(views, offset, total)
                    return
                raise
            if n == total:
                return
            if n == 0:
                # End of file: the file shrank underneath, or was never that long.
                _zero_views(views)
                return
            views = _advance(views, n)
            total -= n
            offset += n

    def _write_from(self, views: list[memoryview], offset: int, total: int) -> None:
        """pwritev until every byte is written (short writes are continued)."""
        fd = self._fd
        while views:
            try:
                n = os.pwritev(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as exc:
                if self._direct and exc.errno == errno.EINVAL:
                    self._write_bounced(views, offset, total)
                    return
                raise
            if n == total:
                return
            if n == 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            views = _advance(views, n)
            total -= n
            offset += n

    def _read_bounced(self, views: list[memoryview], offset: int, total: int) -> None:
        with _bounce_buffer(total) as buf:
            done = 0
            while done < total:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n == 0:
                    buf[done:] = bytes(total - done)
                    break
                done += n
            pos = 0
            for view in views:
                view[:] = buf[pos : pos + len(view)]
                pos += len(view)

    def _write_bounced(self, views: list[memoryview], offset: int, total: int) -> None:
        with _bounce_buffer(total) as buf:
            pos = 0
            for view in views:
                buf[pos : pos + len(view)] = view
                pos += len(view)
            done = 0
            while done < total:
                n = os.pwritev(self._fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, "pwritev wrote nothing")
                done += n

    def _discard_range(self, offset: int, length: int) -> None:
        """The device MAY deallocate (device-types/blk: Device Operation): try, and
        treat "not supported" as done."""
        try:
            fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _FALLOC_UNSUPPORTED:
                raise
            log.debug("%s: discard not supported by the backing file: %s", self.name, exc)

    def _zero_range(self, offset: int, length: int, *, unmap: bool) -> None:
        """Reads of the range MUST return zeroes afterwards, unmap or not.

        unmap: punch a hole (deallocate); otherwise ZERO_RANGE (keeps the
        allocation).  Either falls back to the next method when the file
        system refuses, ending with writing zeros.
        """
        modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
            except OSError as exc:
                if exc.errno not in _FALLOC_UNSUPPORTED:
                    raise
                continue
            return
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = os.pwrite(self._fd, zeros[: min(len(zeros), end - offset)], offset)
            if n == 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            offset += n

    # -- snapshot --------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "read_only": self._read_only,
            "serial": self._serial,
            "cache": self._cache,
            "direct": self._direct,
            "logical_block_size": self._logical_block_size,
            "num_queues": self.num_queues,
            "queue_size": self._queue_size,
            "discard": self._discard,
            "write_zeroes": self._write_zeroes,
            "capacity": self._capacity,
        }

    def _snapshot_model(self) -> Any:
        """The configuration and the cache mode; nothing else exists.

        Requests complete synchronously inside ``queue_notify``, so there is
        never an in-flight request to record; the disk contents are the
        backing file's business.
        """
        return {"path": self._path, "options": self._options(), "writeback": self._writeback}

    def _restore_model(self, state: Any) -> None:
        """Accept a snapshot of an identically configured disk.

        Everything the driver can see (features, config, capacity) must match,
        since the guest was using it; the path may differ (the image may have
        moved), which is logged.
        """
        if not isinstance(state, dict):
            raise ValueError("block state must be an object")
        options = state.get("options")
        writeback = state.get("writeback")
        path = state.get("path")
        if not isinstance(options, dict) or not isinstance(writeback, bool):
            raise ValueError("block state lacks options or writeback")
        if path is not None and not isinstance(path, str):
            raise ValueError(f"bad path {path!r}")
        ours = self._options()
        if options != ours:
            diff = sorted(k for k in ours.keys() | options.keys() if ours.get(k) != options.get(k))
            raise ValueError(f"snapshot is of a differently configured disk ({', '.join(diff)})")
        if path != self._path:
            log.info("%s: restoring a snapshot taken with %r onto %r", self.name, path, self._path)
        self._writeback = writeback and not self._read_only
