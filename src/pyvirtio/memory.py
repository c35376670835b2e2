"""Guest memory: guest-physical regions backed by host mmaps, with bounds checks.

Every access a device, transport or driver makes to guest RAM goes through
:class:`GuestMemory`.  A guest-physical address is resolved to one region and
checked against its end before any byte is touched, so a bad address from a
guest or a peer raises :class:`GuestMemoryError` and never reaches host memory
outside the regions.

A region is backed by an mmap of one of three kinds:

* anonymous (private to this process),
* a memfd (shareable with another process, e.g. a vhost-user peer),
* a caller-provided file descriptor and offset (what a vhost-user front end
  hands a back end in SET_MEM_TABLE / ADD_MEM_REG).

A region mapped from a caller's fd is a promise the caller can break: if the
file shrinks under the mapping, the next access to the lost pages raises
SIGBUS, which no Python code can recover from.  :meth:`GuestMemory.add_fd`
therefore refuses a region that extends beyond the end of its file, and
seals a memfd against shrinking (``F_SEAL_SHRINK``; any holder of the fd may
add seals unless ``F_SEAL_SEAL`` is set).  An fd that cannot be sealed (a
memfd made without ``MFD_ALLOW_SEALING``, a hugetlbfs or regular file) is
refused unless the caller allows it (``allow_unsealed``), and the region
says whether it is sealed.  Memfds this module creates seal themselves
against shrinking and growing, as QEMU's memory-backend-memfd does.

Regions never overlap.  An access may span two regions only where they are
contiguous in guest-physical space (``read``/``write``/``readv``/``writev``);
a zero-copy :meth:`GuestMemory.view` must lie inside one region.

:meth:`GuestMemory.discard` gives whole pages back to the host (a balloon's
inflated pages, reported free pages): the range reads as zeros afterwards
and is backed by fresh pages again on the next touch.

Hot paths (ring parsing, request headers, frame copies) check a buffer against
a cached :class:`RegionWindow` instead of searching the region table on every
access; see :meth:`GuestMemory.window` for when a window stays valid.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final, NamedTuple

__all__ = [
    "PAGE_SIZE",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "RegionWindow",
    "UnsealedMemoryError",
    "seal_against_shrinking",
]

_U64_LIMIT: Final = 1 << 64

_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """An access to guest memory outside every region, or otherwise invalid."""


class UnsealedMemoryError(GuestMemoryError):
    """An fd that cannot be sealed against shrinking, offered where sealing is required."""


def seal_against_shrinking(fd: int) -> bool:
    """Seal ``fd`` against shrinking if it is not yet; whether it now is.

    False for an fd that cannot carry seals (not a memfd: EINVAL) or whose
    seals are sealed (``F_SEAL_SEAL``, which memfds made without
    ``MFD_ALLOW_SEALING`` have from birth: EPERM).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


@dataclass(eq=False)
class MemoryRegion:
    """One guest-physical range ``[guest_base, guest_base + size)`` backed by an mmap.

    ``fd`` is the backing file descriptor when there is one (memfd or caller
    fd; ``None`` for anonymous memory) and ``fd_offset`` the offset of the
    region's first byte in that file.  ``owns_fd`` says whether closing the
    region closes the fd.  ``sealed`` is False for a caller's fd that could
    not be sealed against shrinking (see the module docstring).
    """

    guest_base: int
    size: int
    mapping: mmap.mmap
    fd: int | None = None
    fd_offset: int = 0
    owns_fd: bool = False
    sealed: bool = True
    # Spelled through ``builtins``: a compiled dataclass looks its field types up
    # by name in the module, where ``memoryview`` is not a global.
    view: builtins.memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)

    @property
    def guest_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.guest_base <= addr and addr + length <= self.guest_end

    def close(self) -> None:
        """Unmap the region (and close its fd when owned).

        A caller still holding a ``memoryview`` of the region keeps the
        mapping alive until that view is released; the region itself is gone
        from the :class:`GuestMemory` either way.
        """
        self.view.release()
        # Views handed out earlier may still be alive; the kernel mapping is
        # then dropped when the last of them is garbage collected.
        with contextlib.suppress(BufferError):
            self.mapping.close()
        if self.owns_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RegionWindow(NamedTuple):
    """One region of a :class:`GuestMemory`, cached for inline bounds checks.

    ``[base, end)`` is the region's guest-physical range and ``view`` its
    bytes (``view[addr - base]`` is guest address ``addr``).  ``table`` is
    the region table the window was taken from: the window is valid exactly
    while ``mem.regions is window.table``, because GuestMemory replaces its
    table as a whole whenever a region is added or removed (and empties it
    on close), never edits it in place.  A window from an older table may
    name a region that is no longer guest memory, so every use checks the
    table first (:meth:`covers`, or the same test written inline).
    """

    table: tuple[MemoryRegion, ...]
    base: int
    end: int
    view: builtins.memoryview  # see MemoryRegion.view

    def covers(self, mem: GuestMemory, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` lies in this window and the window is current."""
        return self.table is mem.regions and self.base <= addr and addr + length <= self.end


#: A window that covers nothing: every check against it fails (for "no window yet").
_NO_VIEW: Final = memoryview(b"")


class GuestMemory:
    """A set of non-overlapping guest-physical regions.

    Thread-safe for concurrent access: the region table is replaced as a
    whole (copy on write) when regions are added or removed, so a reader
    never sees it half-updated.  The bytes themselves are shared memory and
    carry no locking, as in hardware.
    """

    #: The region table, sorted by guest address.  Read-only for users: it
    #: is replaced as a whole (never edited in place) whenever a region is
    #: added or removed, and emptied on close, which is what makes a
    #: :class:`RegionWindow` checkable by identity.  A plain attribute, not a
    #: property, because ring code compares it on every descriptor chain.
    regions: tuple[MemoryRegion, ...]

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._lock = threading.Lock()
        self.regions = ()
        self._bases: tuple[int, ...] = ()
        for region in regions:
            self.add_region(region)

    # -- construction -------------------------------------------------------

    @classmethod
    def anonymous(cls, size: int, base: int = 0) -> GuestMemory:
        """One anonymous private region of ``size`` bytes at guest address ``base``."""
        mem = cls()
        mem.add_anonymous(base, size)
        return mem

    @classmethod
    def memfd(cls, size: int, base: int = 0, name: str = "pyvirtio-guest") -> GuestMemory:
        """One memfd-backed shared region, whose fd can be passed to another process."""
        mem = cls()
        mem.add_memfd(base, size, name=name)
        return mem

    def add_anonymous(self, base: int, size: int) -> MemoryRegion:
        _check_geometry(base, size)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return self.add_region(MemoryRegion(base, size, mapping))

    def add_memfd(self, base: int, size: int, name: str = "pyvirtio-guest") -> MemoryRegion:
        _check_geometry(base, size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # A peer we share it with cannot resize it under our mapping (or its own).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return self.add_region(MemoryRegion(base, size, mapping, fd=fd, owns_fd=True))

    def add_fd(
        self,
        base: int,
        size: int,
        fd: int,
        offset: int = 0,
        *,
        take_ownership: bool = False,
        allow_unsealed: bool = True,
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` from ``offset`` at guest address ``base``.

        ``offset`` need not be page aligned: the mapping starts at the page
        below it and the region's view skips the difference (vhost-user's
        ``mmap_offset`` is arbitrary).  A memfd is sealed against shrinking
        first; an fd that cannot be raises :class:`UnsealedMemoryError`
        unless ``allow_unsealed``.  A regular file (memfds, tmpfs, hugetlbfs)
        must be at least ``offset + size`` bytes long.
        """
        _check_geometry(base, size)
        if offset < 0:
            raise GuestMemoryError(f"negative file offset {offset}")
        sealed = seal_against_shrinking(fd)
        if not sealed and not allow_unsealed:
            raise UnsealedMemoryError(f"fd {fd} cannot be sealed against shrinking")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise GuestMemoryError(f"cannot stat fd {fd}: {exc}") from exc
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            raise GuestMemoryError(
                f"range {offset:#x}+{size:#x} extends beyond the end of its file "
                f"({st.st_size:#x} bytes): touching it would raise SIGBUS"
            )
        page_offset = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(
                fd,
                size + page_offset,
                flags=mmap.MAP_SHARED,
                offset=offset - page_offset,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(
                f"cannot map fd {fd} offset {offset} size {size}: {exc}"
            ) from exc
        region = MemoryRegion(
            base, size, mapping, fd=fd, fd_offset=offset, owns_fd=take_ownership, sealed=sealed
        )
        if page_offset:
            region.view = memoryview(mapping)[page_offset : page_offset + size]
        return self.add_region(region)

    def add_region(self, region: MemoryRegion) -> MemoryRegion:
        _check_geometry(region.guest_base, region.size)
        with self._lock:
            for other in self._regions:
                if region.guest_base < other.guest_end and other.guest_base < region.guest_end:
                    raise GuestMemoryError(
                        f"region [{region.guest_base:#x}, {region.guest_end:#x}) overlaps "
                        f"[{other.guest_base:#x}, {other.guest_end:#x})"
                    )
            regions = sorted((*self._regions, region), key=lambda r: r.guest_base)
            self._regions = tuple(regions)
            self._bases = tuple(r.guest_base for r in regions)
        return region

    def remove_region(self, guest_base: int, *, close: bool = True) -> MemoryRegion:
        """Remove the region that starts at ``guest_base`` (and unmap it by default)."""
        with self._lock:
            for index, region in enumerate(self._regions):
                if region.guest_base == guest_base:
                    remaining = self._regions[:index] + self._regions[index + 1 :]
                    self._regions = remaining
                    self._bases = tuple(r.guest_base for r in remaining)
                    break
            else:
                raise GuestMemoryError(f"no region starts at {guest_base:#x}")
        if close:
            region.close()
        return region

    def close(self) -> None:
        """Unmap every region."""
        with self._lock:
            regions, self._regions, self._bases = self._regions, (), ()
        for region in regions:
            region.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- look-up ------------------------------------------------------------

    @property
    def _regions(self) -> tuple[MemoryRegion, ...]:
        """The table under its internal name: every change goes through here."""
        return self.regions

    @_regions.setter
    def _regions(self, table: tuple[MemoryRegion, ...]) -> None:
        self.regions = table

    @property
    def size(self) -> int:
        """Total bytes of guest RAM over all regions."""
        return sum(r.size for r in self._regions)

    def region_at(self, addr: int) -> MemoryRegion:
        """The region containing ``addr``."""
        bases = self._bases
        index = bisect.bisect_right(bases, addr) - 1
        if index >= 0:
            region = self.regions[index]
            if addr < region.guest_end:
                return region
        raise GuestMemoryError(f"address {addr:#x} is not in guest memory")

    # -- region windows -----------------------------------------------------

    #: A window valid for no table and covering no address: the initial value
    #: of a cache that has not looked anything up yet.
    NO_WINDOW: ClassVar[RegionWindow] = RegionWindow((), 1, 0, _NO_VIEW)

    def window(self, addr: int, length: int = 1) -> RegionWindow:
        """The window of the region holding ``[addr, addr + length)``.

        Raises GuestMemoryError when the range is not inside one region.
        The window stays valid while the region table is unchanged
        (``window.table is mem.regions``); adding or removing any region
        replaces the table, after which the caller takes a new window.
        """
        regions = self.regions
        region = self.region_at(addr)
        if length < 0 or addr + length > region.guest_end:
            raise GuestMemoryError(
                f"range {addr:#x}+{length:#x} leaves region "
                f"[{region.guest_base:#x}, {region.guest_end:#x})"
            )
        return RegionWindow(regions, region.guest_base, region.guest_end, region.view)

    def largest_window(self) -> RegionWindow:
        """The window of the largest region (:attr:`NO_WINDOW` when there is none).

        What a ring keeps to check descriptor buffers inline: most buffers
        of a VM lie in its main RAM region.
        """
        regions = self.regions
        if not regions:
            return RegionWindow(regions, 1, 0, _NO_VIEW)
        region = max(regions, key=lambda r: r.size)
        return RegionWindow(regions, region.guest_base, region.guest_end, region.view)

    def is_valid(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` lies wholly in guest memory."""
        try:
            for _ in self._pieces(addr, length):
                pass
        except GuestMemoryError:
            return False
        return True

    def _pieces(self, addr: int, length: int) -> Iterator[tuple[MemoryRegion, int, int]]:
        """Split a guest range into (region, offset in region, length) pieces."""
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"negative address or length ({addr:#x}, {length})")
        if addr >= _U64_LIMIT or addr + length > _U64_LIMIT:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} overflows the address space")
        if length == 0:
            return
        while length:
            region = self.region_at(addr)
            offset = addr - region.guest_base
            n = min(length, region.size - offset)
            yield region, offset, n
            addr += n
            length -= n

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy writable view of ``[addr, addr + length)``, inside one region."""
        if addr < 0 or length < 0 or addr >= _U64_LIMIT or addr + length > _U64_LIMIT:
            raise GuestMemoryError(f"invalid range {addr:#x}+{length:#x}")
        region = self.region_at(addr)
        offset = addr - region.guest_base
        if offset + length > region.size:
            raise GuestMemoryError(
                f"range {addr:#x}+{length:#x} leaves region "
                f"[{region.guest_base:#x}, {region.guest_end:#x})"
            )
        return region.view[offset : offset + length]

    def views(self, ranges: Iterable[tuple[int, int]]) -> list[memoryview]:
        """Views for a scatter-gather list, split where a range crosses regions.

        The result feeds ``os.preadv``/``os.pwritev`` directly.
        """
        out: list[memoryview] = []
        append = out.append
        # Fast path: ranges nearly always fall in the region the previous one
        # did, so test that region before a bisect over the table.
        region: MemoryRegion | None = None
        for addr, length in ranges:
            if (
                region is not None
                and length > 0
                and region.guest_base <= addr
                and addr + length <= region.guest_base + region.size
            ):
                offset = addr - region.guest_base
                append(region.view[offset : offset + length])
                continue
            for region, offset, n in self._pieces(addr, length):
                append(region.view[offset : offset + n])
        return out

    # -- byte access --------------------------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        pieces = list(self._pieces(addr, length))
        if len(pieces) == 1:
            region, offset, n = pieces[0]
            return bytes(region.view[offset : offset + n])
        return b"".join(bytes(r.view[o : o + n]) for r, o, n in pieces)

    def read_into(self, addr: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` from guest memory at ``addr``."""
        target = memoryview(buf).cast("B")
        pos = 0
        for region, offset, n in list(self._pieces(addr, len(target))):
            target[pos : pos + n] = region.view[offset : offset + n]
            pos += n

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pieces = list(self._pieces(addr, len(src)))  # validate before touching anything
        pos = 0
        for region, offset, n in pieces:
            region.view[offset : offset + n] = src[pos : pos + n]
            pos += n

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``addr`` to ``byte``."""
        pieces = list(self._pieces(addr, length))
        for region, offset, n in pieces:
            region.view[offset : offset + n] = bytes([byte]) * n

    def readv(self, ranges: Sequence[tuple[int, int]]) -> bytes:
        """Gather the bytes of a scatter-gather list into one ``bytes``."""
        return b"".join(bytes(v) for v in self.views(ranges))

    def writev(
        self, ranges: Sequence[tuple[int, int]], data: bytes | bytearray | memoryview
    ) -> int:
        """Scatter ``data`` over a list of guest ranges, in order.

        Writes ``min(len(data), total length of ranges)`` bytes and returns
        that count.  Every range is validated before any byte is written.
        """
        views = self.views(ranges)
        src = memoryview(data).cast("B")
        pos = 0
        total = len(src)
        for view in views:
            if pos >= total:
                break
            n = min(len(view), total - pos)
            view[:n] = src[pos : pos + n]
            pos += n
        return pos

    # -- giving pages back to the host -----------------------------------------

    def discard(self, addr: int, length: int) -> None:
        """Release the host memory behind ``[addr, addr + length)``.

        ``addr`` and ``length`` must be multiples of :data:`PAGE_SIZE` and the
        range must lie in guest memory (it may cross contiguous regions);
        nothing is released unless all of it is valid.  Afterwards the range
        reads as zeros and the host allocates pages again only when it is
        touched.  How depends on the region's backing:

        * memfd or file: the file's pages are freed by punching a hole
          (``madvise(MADV_REMOVE)`` over our shared mapping, which the kernel
          carries out as ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` on the file),
          so every process mapping them (a vhost-user peer, QEMU) sees it;
        * anonymous: ``madvise(MADV_DONTNEED)`` drops the private pages.

        Raises :class:`GuestMemoryError` for a bad range, or when the kernel
        refuses (a file system without hole punching).
        """
        if addr % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(
                f"discard of {addr:#x}+{length:#x} is not aligned to {PAGE_SIZE}-byte pages"
            )
        for region, offset, n in list(self._pieces(addr, length)):
            try:
                if region.fd is not None:
                    # The mapping starts at the page below the file offset (add_fd).
                    skip = region.fd_offset % mmap.ALLOCATIONGRANULARITY
                    region.mapping.madvise(mmap.MADV_REMOVE, skip + offset, n)
                else:
                    region.mapping.madvise(mmap.MADV_DONTNEED, offset, n)
            except (OSError, ValueError) as exc:
                raise GuestMemoryError(
                    f"cannot release {region.guest_base + offset:#x}+{n:#x}: {exc}"
                ) from exc

    # -- little-endian scalars ----------------------------------------------

    def _scalar_view(self, addr: int, width: int) -> tuple[memoryview, int]:
        region = self.region_at(addr) if addr >= 0 else None
        if region is None or addr + width > region.guest_end:
            raise GuestMemoryError(f"{width}-byte access at {addr:#x} is outside guest memory")
        return region.view, addr - region.guest_base

    def read_u8(self, addr: int) -> int:
        view, offset = self._scalar_view(addr, 1)
        return view[offset]

    def read_u16(self, addr: int) -> int:
        view, offset = self._scalar_view(addr, 2)
        value: int = _U16.unpack_from(view, offset)[0]
        return value

    def read_u32(self, addr: int) -> int:
        view, offset = self._scalar_view(addr, 4)
        value: int = _U32.unpack_from(view, offset)[0]
        return value

    def read_u64(self, addr: int) -> int:
        view, offset = self._scalar_view(addr, 8)
        value: int = _U64.unpack_from(view, offset)[0]
        return value

    def write_u8(self, addr: int, value: int) -> None:
        view, offset = self._scalar_view(addr, 1)
        view[offset] = value & 0xFF

    def write_u16(self, addr: int, value: int) -> None:
        view, offset = self._scalar_view(addr, 2)
        _U16.pack_into(view, offset, value & 0xFFFF)

    def write_u32(self, addr: int, value: int) -> None:
        view, offset = self._scalar_view(addr, 4)
        _U32.pack_into(view, offset, value & 0xFFFF_FFFF)

    def write_u64(self, addr: int, value: int) -> None:
        view, offset = self._scalar_view(addr, 8)
        _U64.pack_into(view, offset, value & 0xFFFF_FFFF_FFFF_FFFF)


#: The granule of :meth:`GuestMemory.discard`: the host's page size.
PAGE_SIZE: Final = mmap.PAGESIZE


def _check_geometry(base: int, size: int) -> None:
    if base < 0 or size <= 0 or base + size > _U64_LIMIT:
        raise GuestMemoryError(f"invalid region geometry base={base:#x} size={size:#x}")
