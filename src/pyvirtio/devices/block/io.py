"""Host I/O for virtio-blk: the backend a host gives the block model.

The model (:mod:`.device`) decides *what* to read, write, flush, discard or
zero; a :class:`BlockBackend` does it on the host.  :class:`FileBackend` is
the one pyvirtio ships: a regular file or a host block device, moved with
:func:`os.preadv` / :func:`os.pwritev` straight between the file and views
of guest memory, O_DIRECT with an aligned bounce buffer for what the kernel
refuses, ``fallocate`` for discard and write-zeroes, ``fdatasync`` for
flush.  Another backend (io_uring, a remote store) plugs in at this seam.

Every method blocks until it is done and reports a host failure as
:class:`OSError`; the model turns that into ``VIRTIO_BLK_S_IOERR`` for the
one request.  The data methods may run on a worker thread the host lent
(:class:`~pyvirtio.workers.IoWorkers`), several at once: they touch only the
file and the views they are given.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "BlockBackend",
    "FileBackend",
    "Geometry",
    "fallocate",
    "zero_views",
]

log = logging.getLogger(__name__)

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
#: Largest buffer of zeros the write-zeroes fallback writes at a time.
_ZERO_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the host storage looks like: size and the I/O sizes it prefers."""

    #: Size in bytes.
    size: int
    #: Physical block size, in bytes (a power of two).
    physical_block_size: int
    #: Optimal I/O size in bytes (0: none reported).
    opt_io_size: int = 0


@runtime_checkable
class BlockBackend(Protocol):
    """The host side of a block device: blocking I/O on its storage.

    Offsets and lengths are in bytes and already checked against the
    capacity by the model; ``views`` are writable (read) or readable (write)
    views of guest memory holding exactly ``length`` bytes.
    """

    @property
    def read_only(self) -> bool: ...

    @property
    def direct(self) -> bool: ...

    def geometry(self, logical_block_size: int) -> Geometry:
        """Probe size and topology (again: the storage may have been resized)."""
        ...

    def read_into(self, views: list[memoryview], offset: int, length: int) -> None:
        """Fill ``views``; what lies past the end of the storage reads as zeros."""
        ...

    def write_from(self, views: list[memoryview], offset: int, length: int) -> None: ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate if the storage can (the device MAY: device-types/blk)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make the range read back as zeros (deallocating it if ``unmap`` and possible)."""
        ...

    def close(self) -> None: ...


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


def zero_views(views: Sequence[memoryview]) -> None:
    """Fill every view with zeros (one buffer of at most ``_ZERO_CHUNK`` bytes)."""
    if not views:
        return
    zeros = bytes(min(_ZERO_CHUNK, max(len(v) for v in views)))
    for view in views:
        for pos in range(0, len(view), _ZERO_CHUNK):
            n = min(_ZERO_CHUNK, len(view) - pos)
            view[pos : pos + n] = zeros[:n]


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


def _copy_views(views: list[memoryview], buf: memoryview, *, gather: bool) -> None:
    """Copy a scatter list into ``buf`` (``gather``) or ``buf`` back out to it."""
    pos = 0
    for view in views:
        end = pos + len(view)
        if gather:
            buf[pos:end] = view
        else:
            view[:] = buf[pos:end]
        pos = end


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


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class FileBackend:
    """A regular file or a host block device.

    ``path_or_fd`` is a path, which the backend opens (and :meth:`close`
    closes), or an open file descriptor, which stays the caller's: it must be
    open for reading, and for writing unless ``read_only``.  ``direct``
    opens with O_DIRECT (bypass the host page cache); a buffer the kernel
    refuses (EINVAL) is then retried through an aligned bounce buffer.
    """

    def __init__(
        self,
        path_or_fd: str | os.PathLike[str] | int,
        *,
        read_only: bool = False,
        direct: bool = False,
    ) -> None:
        self.path: str | None
        self._owns_fd = False
        if isinstance(path_or_fd, int):
            self.path = None
            self._fd = path_or_fd
        else:
            self.path = os.fsdecode(os.fspath(path_or_fd))
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            if direct:
                flags |= os.O_DIRECT
            self._fd = os.open(self.path, flags)
            self._owns_fd = True
        self.read_only: Final = read_only
        #: Opened with O_DIRECT (a refused buffer goes through a bounce buffer).
        self.direct: Final = direct

    @property
    def fd(self) -> int:
        """The file descriptor (-1 once closed)."""
        return self._fd

    def close(self) -> None:
        """Close the file if the backend opened it (idempotent)."""
        fd = getattr(self, "_fd", -1)
        if getattr(self, "_owns_fd", False) and fd >= 0:
            os.close(fd)
        self._fd = -1

    def __del__(self) -> None:
        # A backend dropped without close() must not leak its fd (and must
        # not raise at interpreter exit, when module globals are gone).
        try:  # noqa: SIM105  (contextlib may be gone at interpreter exit)
            self.close()
        except Exception:
            pass

    def geometry(self, logical_block_size: int) -> Geometry:
        st = os.fstat(self._fd)
        opt_io_size = 0
        if stat.S_ISBLK(st.st_mode):
            size = _ioctl_u64(self._fd, _BLKGETSIZE64)
            host_lbs = _ioctl_u32(self._fd, _BLKSSZGET)
            if self.direct and logical_block_size < host_lbs:
                raise ValueError(
                    f"direct I/O on a device with {host_lbs}-byte sectors needs "
                    f"logical_block_size >= {host_lbs}"
                )
            physical = _ioctl_u32(self._fd, _BLKPBSZGET)
            opt_io_size = _ioctl_u32(self._fd, _BLKIOOPT)
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
            physical = st.st_blksize
        else:
            raise ValueError("a block device's backing must be a regular file or a block device")
        if not (is_power_of_two(physical) and logical_block_size <= physical <= 1 << 20):
            physical = logical_block_size
        return Geometry(size, physical, opt_io_size)

    # -- data ------------------------------------------------------------------------------

    def read_into(self, views: list[memoryview], offset: int, length: int) -> None:
        """preadv until every view is filled; what lies past end of file reads as zeros."""
        self._transfer(views, offset, length, reading=True)

    def write_from(self, views: list[memoryview], offset: int, length: int) -> None:
        """pwritev until every byte is written (short writes are continued)."""
        self._transfer(views, offset, length, reading=False)

    def _transfer(
        self, views: list[memoryview], offset: int, length: int, reading: bool, bounce: bool = True
    ) -> None:
        """preadv (``reading``) or pwritev until ``length`` bytes have moved, at most
        ``_IOV_MAX`` views a call.  Under O_DIRECT a buffer the kernel refuses
        (EINVAL) is retried through an aligned one, unless this is that retry
        (``bounce`` false): a refusal there is final."""
        vectored = os.preadv if reading else os.pwritev
        fd = self._fd
        while views:
            try:
                n = vectored(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as exc:
                if bounce and self.direct and exc.errno == errno.EINVAL:
                    self._transfer_bounced(views, offset, length, reading=reading)
                    return
                raise
            if n == length:
                return
            if n == 0:
                if not reading:
                    raise OSError(errno.EIO, "pwritev wrote nothing")
                # End of file: the file shrank underneath, or was never that long.
                zero_views(views)
                return
            views = _advance(views, n)
            length -= n
            offset += n

    def _transfer_bounced(
        self, views: list[memoryview], offset: int, length: int, *, reading: bool
    ) -> None:
        """:meth:`_transfer` through a page-aligned copy of ``views`` (the rare path)."""
        with _bounce_buffer(length) as buf:
            if not reading:
                _copy_views(views, buf, gather=True)
            self._transfer([buf], offset, length, reading=reading, bounce=False)
            if reading:
                _copy_views(views, buf, gather=False)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        """Try to deallocate, and treat "not supported" as done."""
        try:
            fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _FALLOC_UNSUPPORTED:
                raise
            log.debug("discard not supported by the backing file: %s", exc)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
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
