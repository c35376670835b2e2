"""virtio-blk request parsing and validation: a descriptor chain in, a :class:`Request` out.

Pure: no host I/O, no threads, no state but the limits it checks against.
Every request goes through :meth:`RequestParser.parse`, the usual read and
write as much as the rare shapes, so each rule is written once.

A request (device-types/blk: Device Operation) is ``struct virtio_blk_req``:
a 16-byte device-readable header (``type``, ``reserved``, ``sector``), the
data, and a one-byte device-writable ``status`` as the very last byte of the
chain.  What a driver cannot make the device do, whatever it puts in a chain:

* touch a byte outside ``[0, capacity * 512)``: sector and length are
  checked as unbounded Python integers, so they cannot overflow;
* ask for unbounded work: a chain of more than ``seg_max`` data segments or
  with a descriptor longer than ``size_max`` (both advertised in config,
  device-types/blk: Feature bits) is refused before anything is touched, so
  one request moves at most ``seg_max * size_max`` bytes; discard and
  write-zeroes are bounded by ``max_*_seg`` and ``max_*_sectors``;
* raise: a malformed request is refused with :class:`BadRequest`, carrying
  ``VIRTIO_BLK_S_IOERR`` (a driver error) or ``VIRTIO_BLK_S_UNSUPP`` (where
  the spec says so: unknown types, unknown discard/write-zeroes flags,
  ``unmap`` on a discard).  Only guest memory that vanished since the chain
  was parsed raises :class:`~pyvirtio.virtqueue.common.VirtqueueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from pyvirtio.devices.block.io import zero_views
from pyvirtio.devices.block.wire import (
    DISCARD_SEGMENT_SIZE,
    HEADER,
    HEADER_SIZE,
    S_IOERR,
    S_UNSUPP,
    SECTOR_SIZE,
    SEGMENT,
    SEGMENT_F_UNMAP,
    STATUS_SIZE,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
)
from pyvirtio.memory import GuestMemory, GuestMemoryError, RegionWindow
from pyvirtio.virtqueue.common import DescriptorChain, VirtqueueError

__all__ = [
    "TRANSFERS",
    "BadRequest",
    "Limits",
    "Request",
    "RequestParser",
    "Segment",
    "Served",
]

#: Requests that move data: the ones worth moving off the ring's thread.
TRANSFERS: Final = frozenset({T_IN, T_OUT})
_WRITES: Final = frozenset({T_OUT, T_DISCARD, T_WRITE_ZEROES})
#: Descriptors a request has besides its data: the header and the status byte.
_FRAMING_DESCRIPTORS: Final = 2
_unpack_header: Final = HEADER.unpack_from


class Segment(NamedTuple):
    """One range of a DISCARD or WRITE_ZEROES request, in bytes."""

    offset: int
    length: int
    unmap: bool


# Request and Served are built once per request, so they are plain classes:
# compiled, their constructors are native calls, where a NamedTuple's
# ``__new__`` and a dataclass's ``__init__`` stay Python functions (a frame
# per request).  Their fields are read, never reassigned.
class Request:
    """A validated request, ready to be carried out.

    ``type`` is ``virtio_blk_req.type`` (a :class:`~.wire.RequestType`
    value); ``offset`` the byte offset on the disk (IN, OUT); ``length`` the
    data bytes to move (IN, OUT) or the GET_ID buffer's length; ``views``
    the guest memory the data moves to (IN, GET_ID) or from (OUT);
    ``segments`` the ranges of a DISCARD or WRITE_ZEROES (empty otherwise).
    """

    __slots__ = ("length", "offset", "segments", "type", "views")

    def __init__(
        self,
        type: int,
        offset: int,
        length: int,
        views: list[memoryview],
        segments: tuple[Segment, ...] = (),
    ) -> None:
        self.type = type
        self.offset = offset
        self.length = length
        self.views = views
        self.segments = segments

    @property
    def is_transfer(self) -> bool:
        """A read or write of data: the requests worth moving off the ring's thread."""
        return self.type in TRANSFERS


class Served:
    """A request carried out or refused, ready to be published.

    ``status`` is the status to write (None: the chain has no byte to carry
    one); ``modified`` whether it modified the disk (writethrough mode syncs
    before completing it); ``data_written`` whether the device wrote, or may
    have written, the chain's data area.
    """

    __slots__ = ("chain", "data_written", "modified", "status")

    def __init__(
        self, chain: DescriptorChain, status: int | None, modified: bool, data_written: bool
    ) -> None:
        self.chain = chain
        self.status = status
        self.modified = modified
        self.data_written = data_written

    def failed(self, status: int) -> Served:
        """The same request, answered with ``status`` instead."""
        return Served(self.chain, status, self.modified, self.data_written)


class BadRequest(Exception):
    """A request the device refuses before touching anything.

    ``status`` is what the driver gets: IOERR or UNSUPP, or None when the
    chain has no device-writable byte to carry one.
    """

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device advertises and enforces (device-types/blk: Device configuration layout)."""

    #: ``capacity``, in 512-byte sectors.
    capacity: int
    #: ``size_max``: the longest descriptor, in bytes.
    size_max: int
    #: ``seg_max``: data descriptors per request (header and status not counted).
    seg_max: int
    read_only: bool = False
    #: Discard limits; ``max_discard_seg`` 0 means DISCARD is not offered.
    max_discard_seg: int = 0
    max_discard_sectors: int = 0
    #: Write-zeroes limits; ``max_write_zeroes_seg`` 0 means it is not offered.
    max_write_zeroes_seg: int = 0
    max_write_zeroes_sectors: int = 0


class RequestParser:
    """Turns descriptor chains into :class:`Request` objects under :class:`Limits`.

    Keeps a region window between calls, so one parser serves one thread
    (each ring consumer of a pipelined device uses the parser under the
    ring lock).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._capacity_bytes = limits.capacity * SECTOR_SIZE
        self._max_descriptors = limits.seg_max + _FRAMING_DESCRIPTORS
        #: The guest memory region last used: headers, data and status bytes
        #: are found there without searching the region table.  Its fields
        #: are kept as attributes too (NamedTuple fields load slower), valid
        #: while ``_table is mem.regions`` (GuestMemory.window).
        self._table: object = None
        self._base = 1
        self._end = 0
        self._view = GuestMemory.NO_WINDOW.view

    def forget_memory(self) -> None:
        """Let go of guest memory (on device reset: the host may unmap it)."""
        self._use(GuestMemory.NO_WINDOW)  # its view keeps the mapping (and fd) alive

    def _use(self, window: RegionWindow) -> None:
        """Find requests in ``window`` from now on."""
        self._table = window.table
        self._base = window.base
        self._end = window.end
        self._view = window.view

    def _covers(self, mem: GuestMemory, addr: int, length: int) -> bool:
        """Whether the window holds ``[addr, addr + length)`` (RegionWindow.covers, on slots)."""
        return self._table is mem.regions and self._base <= addr and addr + length <= self._end

    def parse(self, chain: DescriptorChain) -> Request:
        """Validate ``chain`` as a request; raises :class:`BadRequest` if the device refuses it."""
        readable = chain.readable
        writable = chain.writable
        readable_len = chain.readable_len
        writable_len = chain.writable_len
        limits = self.limits
        if not writable_len:
            raise BadRequest(None, "no device-writable status byte; cannot answer")
        if len(readable) + len(writable) > self._max_descriptors:
            raise BadRequest(
                S_IOERR,
                f"{len(readable) + len(writable) - _FRAMING_DESCRIPTORS} data segments "
                f"(seg_max {limits.seg_max})",
            )
        size_max = limits.size_max
        if readable_len > size_max:
            self._check_size_max(readable)
        if writable_len > size_max:
            self._check_size_max(writable)
        if readable_len < HEADER_SIZE:
            raise BadRequest(S_IOERR, f"header is {readable_len} bytes, not {HEADER_SIZE}")
        # The header, through the region window when it is there (the usual case).
        mem = chain.mem
        addr, n = readable[0]
        if n >= HEADER_SIZE and self._covers(mem, addr, HEADER_SIZE):
            req_type, _reserved, sector = _unpack_header(self._view, addr - self._base)
        else:
            req_type, _reserved, sector = self._header(chain)
        if limits.read_only and req_type in _WRITES:
            # MUST set IOERR and MUST NOT write any data (device-types/blk:
            # Device Requirements: Device Operation).
            raise BadRequest(S_IOERR, f"type {req_type} on a read-only device")
        if req_type == T_IN:
            if readable_len != HEADER_SIZE:
                raise BadRequest(S_IOERR, "IN request with device-readable data")
            length = writable_len - STATUS_SIZE
            offset = sector * SECTOR_SIZE
            if length % SECTOR_SIZE or offset + length > self._capacity_bytes:
                raise self._bad_range(req_type, sector, length)
            if writable[-1][1] == STATUS_SIZE:
                views = self._views(mem, writable, 0, len(writable) - 1)
            else:
                views = chain.writable_views(0, length)
            return Request(req_type, offset, length, views)
        if req_type == T_OUT:
            if writable_len != STATUS_SIZE:
                raise self._bad_writable(req_type)
            length = readable_len - HEADER_SIZE
            offset = sector * SECTOR_SIZE
            if length % SECTOR_SIZE or offset + length > self._capacity_bytes:
                raise self._bad_range(req_type, sector, length)
            if readable[0][1] == HEADER_SIZE:
                views = self._views(mem, readable, 1, len(readable))
            else:
                views = chain.readable_views(HEADER_SIZE, length)
            return Request(req_type, offset, length, views)
        if req_type == T_FLUSH:
            # sector MUST be 0 and data SHOULD be absent (driver requirements);
            # neither changes what a flush means, so both are ignored.
            return Request(req_type, 0, 0, [])
        if req_type == T_GET_ID:
            if readable_len != HEADER_SIZE:
                raise BadRequest(S_IOERR, "GET_ID request with device-readable data")
            length = writable_len - STATUS_SIZE
            return Request(req_type, 0, length, chain.writable_views(0, length))
        if req_type == T_DISCARD and limits.max_discard_seg:
            return self._discard_write_zeroes(chain, req_type, discard=True)
        if req_type == T_WRITE_ZEROES and limits.max_write_zeroes_seg:
            return self._discard_write_zeroes(chain, req_type, discard=False)
        # GET_LIFETIME (VIRTIO_BLK_F_LIFETIME not offered), SECURE_ERASE, the
        # zone commands (MUST be UNSUPP without VIRTIO_BLK_F_ZONED), and
        # anything unknown.
        raise BadRequest(S_UNSUPP, f"unsupported type {req_type}")

    def write_status(self, chain: DescriptorChain, status: int) -> None:
        """Write ``status`` into the request's last device-writable byte.

        Raises GuestMemoryError if the memory is gone since the chain was parsed.
        """
        writable = chain.writable
        addr, length = writable[-1]
        if not length:  # a zero-length descriptor last: the byte is further back
            for addr, length in reversed(writable):  # noqa: B007
                if length:
                    break
            else:
                return
        addr += length - STATUS_SIZE
        if not self._covers(chain.mem, addr, STATUS_SIZE):
            self._use(chain.mem.window(addr, STATUS_SIZE))
        self._view[addr - self._base] = status

    def write_failure(self, chain: DescriptorChain, status: int, data_written: bool) -> int:
        """Write the error ``status`` of a request; returns the used length.

        Data the failed request may have written in part (``data_written``)
        is zeroed and counted, so the driver sees no stale bytes; otherwise only
        the status byte is written, and nothing before it counts (used 0).
        """
        total = chain.writable_len
        if total > STATUS_SIZE:
            if not data_written:
                self.write_status(chain, status)
                return 0
            zero_views(chain.writable_views(0, total - STATUS_SIZE))
        self.write_status(chain, status)
        return total

    # -- pieces -----------------------------------------------------------------------------

    def _check_size_max(self, ranges: list[tuple[int, int]]) -> None:
        size_max = self.limits.size_max
        for _addr, length in ranges:
            if length > size_max:
                raise BadRequest(S_IOERR, f"a descriptor of {length} bytes (size_max {size_max})")

    def _locate(self, mem: GuestMemory, addr: int, length: int) -> tuple[memoryview, int]:
        """(region view, offset) of a range inside one region, through the window."""
        if not self._covers(mem, addr, length):
            self._use(mem.window(addr, length))
        return self._view, addr - self._base

    def _header(self, chain: DescriptorChain) -> tuple[int, int, int]:
        """(type, reserved, sector), from however many descriptors hold the header."""
        addr, length = chain.readable[0]
        if length >= HEADER_SIZE:
            try:
                view, offset = self._locate(chain.mem, addr, HEADER_SIZE)
            except GuestMemoryError:
                return HEADER.unpack(chain.read(0, HEADER_SIZE))  # across two regions
            return HEADER.unpack_from(view, offset)
        return HEADER.unpack(chain.read(0, HEADER_SIZE))

    @staticmethod
    def _bad_writable(req_type: int) -> BadRequest:
        """A request that writes to the disk has no device-writable data."""
        return BadRequest(S_IOERR, f"type {req_type} request with device-writable data")

    def _bad_range(self, req_type: int, sector: int, length: int) -> BadRequest:
        """Why data of ``length`` bytes at ``sector`` is refused."""
        if length % SECTOR_SIZE:
            return BadRequest(
                S_IOERR, f"type {req_type} data length {length} is not a multiple of {SECTOR_SIZE}"
            )
        return BadRequest(
            S_IOERR, f"sector {sector} + {length} bytes is beyond capacity {self.limits.capacity}"
        )

    def _views(
        self, mem: GuestMemory, ranges: list[tuple[int, int]], start: int, stop: int
    ) -> list[memoryview]:
        """Views of ``ranges[start:stop]`` (each range checked when the chain was parsed)."""
        views = []
        try:
            for i in range(start, stop):
                addr, n = ranges[i]
                if not self._covers(mem, addr, n):
                    try:
                        self._use(mem.window(addr, n))
                    except GuestMemoryError:
                        views.extend(mem.views([(addr, n)]))  # a range across regions
                        continue
                offset = addr - self._base
                views.append(self._view[offset : offset + n])
        except GuestMemoryError as exc:  # regions removed since the chain was parsed
            raise VirtqueueError(str(exc)) from exc
        return views

    def _discard_write_zeroes(
        self, chain: DescriptorChain, req_type: int, *, discard: bool
    ) -> Request:
        limits = self.limits
        what = "DISCARD" if discard else "WRITE_ZEROES"
        if chain.writable_len != STATUS_SIZE:
            raise self._bad_writable(req_type)
        length = chain.readable_len - HEADER_SIZE
        max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
        max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
        if length == 0 or length % DISCARD_SEGMENT_SIZE:
            raise BadRequest(
                S_IOERR, f"{what} data length {length} is not a positive multiple of 16"
            )
        count = length // DISCARD_SEGMENT_SIZE
        if count > max_seg:
            raise BadRequest(S_IOERR, f"{what} with {count} segments (max {max_seg})")
        raw = list(SEGMENT.iter_unpack(chain.read(HEADER_SIZE, length)))
        # UNSUPP cases first: the spec makes them MUSTs (device-types/blk:
        # Device Requirements: Device Operation).
        for _sector, _num, flags in raw:
            if flags & ~SEGMENT_F_UNMAP:
                raise BadRequest(S_UNSUPP, f"{what} segment with unknown flags {flags:#x}")
            if discard and flags & SEGMENT_F_UNMAP:
                raise BadRequest(S_UNSUPP, "DISCARD segment with the unmap flag")
        segments = []
        for sector, num, flags in raw:
            if num > max_sectors:
                raise BadRequest(S_IOERR, f"{what} segment of {num} sectors (max {max_sectors})")
            offset = sector * SECTOR_SIZE
            if offset + num * SECTOR_SIZE > self._capacity_bytes:
                raise self._bad_range(req_type, sector, num * SECTOR_SIZE)
            if num:
                segments.append(Segment(offset, num * SECTOR_SIZE, bool(flags & SEGMENT_F_UNMAP)))
        return Request(req_type, 0, 0, [], tuple(segments))
