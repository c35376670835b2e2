"""Builders and constants the split ring tests share (test_split*.py)."""

from __future__ import annotations

import struct

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import (
    DESC_F_WRITE,
    DescriptorChain,
)
from pyvirtio.virtqueue.split import (
    SplitDeviceQueue,
    SplitDriverQueue,
)

MEM_SIZE = 0x40000


DESC = 0x1000


AVAIL = 0x2000


USED = 0x3000


IND = 0x8000  # indirect tables written by hand, or the driver's indirect area


DATA = 0x20000


_DESC_FMT = struct.Struct("<QIHH")


def spec_need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event, restated from split-ring.tex / virtio-queue.h."""
    return (new - event - 1) % 65536 < (new - old) % 65536


def write_desc(
    mem: GuestMemory, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0
) -> None:
    mem.write(DESC + 16 * index, _DESC_FMT.pack(addr, length, flags, nxt))


def write_table_desc(
    mem: GuestMemory, table: int, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0
) -> None:
    mem.write(table + 16 * index, _DESC_FMT.pack(addr, length, flags, nxt))


def make_available(mem: GuestMemory, size: int, heads: list[int], start: int = 0) -> int:
    """Put ``heads`` in the available ring from index ``start``; return the new idx."""
    idx = start
    for head in heads:
        mem.write_u16(AVAIL + 4 + 2 * (idx % size), head)
        idx = (idx + 1) & 0xFFFF
    mem.write_u16(AVAIL + 2, idx)
    return idx


def device(mem: GuestMemory, size: int = 8, **kwargs: bool) -> SplitDeviceQueue:
    return SplitDeviceQueue(mem, size, DESC, AVAIL, USED, **kwargs)


def driver(mem: GuestMemory, size: int = 8, **kwargs: object) -> SplitDriverQueue:
    return SplitDriverQueue(mem, size, DESC, AVAIL, USED, **kwargs)  # type: ignore[arg-type]


def used_elem(mem: GuestMemory, size: int, idx: int) -> tuple[int, int]:
    base = USED + 4 + 8 * (idx % size)
    return mem.read_u32(base), mem.read_u32(base + 4)


def popped(
    mem: GuestMemory, queue: SplitDeviceQueue, heads: list[int], start: int = 0
) -> list[DescriptorChain]:
    for head in heads:
        write_desc(mem, head, DATA + 0x100 * head, 0x100, DESC_F_WRITE)
    make_available(mem, queue.size, heads, start)
    chains = []
    while (chain := queue.pop()) is not None:
        chains.append(chain)
    return chains


def used_write(mem: GuestMemory, size: int, idx: int, head: int, length: int) -> None:
    base = USED + 4 + 8 * (idx % size)
    mem.write_u32(base, head)
    mem.write_u32(base + 4, length)
