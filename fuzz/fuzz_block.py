"""Fuzz target: virtio-blk request parsing and serving (headers, segment lists, buffers).

The input bytes are a driver's worst behaviour: they choose the device's
options (capacity, read-only, discard, write-zeroes, queue size), then the
chain's shape (how many device-readable and device-writable buffers, how
long, where in guest memory, some across two memory regions) and what the
buffers hold (the header, discard segments, data).  The chain goes through
``RequestParser.parse`` and, when accepted, is carried out by ``Block``
against an in-memory disk; then the status is written.

Invariants checked: parsing raises nothing but ``BadRequest``; an accepted
request's views cover exactly its length inside the chain's buffers, its
ranges lie on the disk, and it respects ``seg_max``/``size_max``; the disk is
touched only by accepted writes, only inside capacity, never on a read-only
device; the used length is 0, 1 or the whole writable part.

Runs under atheris (coverage guided) when it is installed, and under
hypothesis otherwise (``fuzz/_common.py``)::

    python fuzz/fuzz_block.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_block.py --engine hypothesis --runs 3000  # force hypothesis
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from _common import Bytes, main

if TYPE_CHECKING:
    from pyvirtio.devices.block import Block, RequestType
    from pyvirtio.devices.block.request import BadRequest, RequestParser, Served
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue.common import DescriptorChain

#: Two adjacent regions, so some buffers straddle a region boundary.
REGION_SIZE = 1 << 16
MEM_SIZE = 2 * REGION_SIZE
SECTOR = 512
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
#: Types worth choosing most of the time (the rest: any u32).
TYPES = (0, 1, 4, 8, 10, 11, 13, 14)


class MemoryDisk:
    """A BlockBackend over a bytearray that records what it was asked to do."""

    def __init__(self, size: int, read_only: bool) -> None:
        self.data = bytearray(size)
        self.read_only = read_only
        self.direct = False
        self.writes = 0

    def geometry(self, logical_block_size: int) -> object:
        from pyvirtio.devices.block.io import Geometry

        return Geometry(len(self.data), logical_block_size)

    def _check(self, offset: int, length: int) -> None:
        assert offset >= 0 and offset + length <= len(self.data), (offset, length)

    def read_into(self, views: list[memoryview], offset: int, length: int) -> None:
        self._check(offset, length)
        assert sum(len(v) for v in views) == length
        for view in views:
            view[:] = self.data[offset : offset + len(view)]
            offset += len(view)

    def write_from(self, views: list[memoryview], offset: int, length: int) -> None:
        assert not self.read_only, "write on a read-only disk"
        self._check(offset, length)
        assert sum(len(v) for v in views) == length
        for view in views:
            self.data[offset : offset + len(view)] = view
            offset += len(view)
        self.writes += 1

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        assert not self.read_only, "discard on a read-only disk"
        self._check(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        assert not self.read_only, "write-zeroes on a read-only disk"
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)
        self.writes += 1

    def close(self) -> None:
        pass


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global Block, RequestType, BadRequest, RequestParser, Served, GuestMemory, DescriptorChain
    from pyvirtio.devices.block import Block, RequestType
    from pyvirtio.devices.block.request import BadRequest, RequestParser, Served
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue.common import DescriptorChain

    # Refusals are the point here: their log lines would drown the figures.
    logging.getLogger("pyvirtio").setLevel(logging.CRITICAL)


def _buffers(src: Bytes, count: int, base: int) -> list[tuple[int, int]]:
    """``count`` buffers of guest memory, mostly small, some across the region boundary."""
    out = []
    for i in range(count):
        selector = src.take(1)
        if selector & 0x80:
            length = src.take(2) % 4096
        else:
            length = (1, 16, SECTOR, 2 * SECTOR, 20, 15, 17, 0)[selector & 7]
        # Some straddle the boundary between the two regions.
        addr = REGION_SIZE - src.take(1) % 64 if selector & 0x40 else base + i * 8192
        length = min(length, MEM_SIZE - addr)
        out.append((addr, length))
    return out


_devices: dict[tuple[int, int], tuple[Block, MemoryDisk]] = {}


def _device(opts: int, capacity_sectors: int) -> tuple[Block, MemoryDisk]:
    """The device for these options (made once: a Block is dear to build)."""
    key = (opts, capacity_sectors)
    if key not in _devices:
        read_only = bool(opts & 1)
        disk = MemoryDisk(capacity_sectors * SECTOR, read_only)
        device = Block(
            disk,
            read_only=read_only,
            discard=bool(opts & 2),
            write_zeroes=bool(opts & 4),
            queue_size=(3, 4, 8, 256)[(opts >> 3) & 3],
        )
        _devices[key] = device, disk
    return _devices[key]


def run_one(data: bytes) -> None:
    src = Bytes(data)
    opts = src.take(1) & 0x1F
    read_only = bool(opts & 1)
    capacity_sectors = 1 + src.take(1) % 64
    device, disk = _device(opts, capacity_sectors)
    before = bytes(disk.data)

    mem = GuestMemory()
    mem.add_anonymous(0, REGION_SIZE)
    mem.add_anonymous(REGION_SIZE, REGION_SIZE)
    readable = _buffers(src, src.take(1) % 5, 0x100)
    writable = _buffers(src, src.take(1) % 5, 0x8100)
    # What the readable buffers hold: a header, then segments or data.
    req_type = TYPES[src.take(1) % len(TYPES)] if src.take(1) & 1 else src.take(4)
    sector = src.take(1) % (capacity_sectors + 2) if src.take(1) & 1 else src.take(8)
    content = HEADER.pack(req_type, src.take(4), sector)
    for _ in range(src.take(1) % 4):
        content += SEGMENT.pack(
            src.take(1) % (capacity_sectors + 2), src.take(1) % 8, src.take(1) % 4
        )
    content += src.raw(64)
    pos = 0
    for addr, length in readable:
        piece = content[pos : pos + length]
        mem.write(addr, piece)
        pos += len(piece)
    for addr, length in writable:
        mem.fill(addr, length, 0xEE)
    chain = DescriptorChain(
        mem,
        0,
        readable,
        writable,
        sum(n for _, n in readable),
        sum(n for _, n in writable),
    )

    parser: RequestParser = device._parser
    limits = parser.limits
    try:
        request = parser.parse(chain)
    except BadRequest as exc:
        assert exc.status in (None, 1, 2), exc.status
        assert (exc.status is None) == (chain.writable_len == 0)
        request = None
    if request is not None:
        assert len(readable) + len(writable) <= limits.seg_max + 2
        assert all(n <= limits.size_max for _, n in readable + writable)
        if request.is_transfer or request.type == RequestType.GET_ID:
            assert sum(len(v) for v in request.views) == request.length
        if request.is_transfer:
            assert request.offset + request.length <= capacity_sectors * SECTOR
            assert request.length % SECTOR == 0
        for segment in request.segments:
            assert segment.offset + segment.length <= capacity_sectors * SECTOR

    # The whole device path: take, carry out, write the status.
    taken = device._take(chain)
    served = taken if isinstance(taken, Served) else device._carry_out(chain, taken)
    if served.status is not None:
        used = device._write_status(chain, served.status, served.data_written)
        assert used in (0, 1, chain.writable_len), used
    if request is None or read_only:
        assert bytes(disk.data) == before, "the disk changed for a refused request"


if __name__ == "__main__":
    main(
        "fuzz_block",
        "Fuzz virtio-blk request parsing.",
        run_one,
        _load,
        max_len=512,
        libfuzzer_args=["-len_control=0"],
    )
