"""Builders and constants the packed ring tests share (test_packed*.py)."""

from __future__ import annotations

import struct

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import ring
from pyvirtio.virtqueue.packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    PackedDeviceQueue,
    PackedDriverQueue,
)

MEM_SIZE = 1 << 20


DESC = 0x1000


DRV = 0x3000  # driver event suppression area


DEV = 0x3004  # device event suppression area


INDIRECT = 0x10000


DATA = 0x40000


_DESC = struct.Struct("<QIHH")


_EVENT = struct.Struct("<HH")


def avail(wrap: int = 1) -> int:
    """AVAIL/USED bits of an available descriptor for driver wrap counter ``wrap``."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


def used_bits(wrap: int = 1) -> int:
    return DESC_F_AVAIL | DESC_F_USED if wrap else 0


def put_desc(
    mem: GuestMemory,
    index: int,
    addr: int,
    length: int,
    buf_id: int,
    flags: int,
    *,
    base: int = DESC,
) -> None:
    mem.write(base + 16 * index, _DESC.pack(addr, length, buf_id, flags))


def get_desc(mem: GuestMemory, index: int, *, base: int = DESC) -> tuple[int, int, int, int]:
    addr, length, buf_id, flags = _DESC.unpack(mem.read(base + 16 * index, 16))
    return addr, length, buf_id, flags


def set_event(mem: GuestMemory, where: int, flags: int, off: int = 0, wrap: int = 0) -> None:
    mem.write(where, _EVENT.pack(off | wrap << 15, flags))


def get_event(mem: GuestMemory, where: int) -> tuple[int, int]:
    off_wrap, flags = _EVENT.unpack(mem.read(where, 4))
    return off_wrap, flags


def device(mem: GuestMemory, size: int = 8, **kw: bool) -> PackedDeviceQueue:
    return PackedDeviceQueue(mem, size, DESC, DRV, DEV, **kw)


def pair(
    mem: GuestMemory,
    size: int = 8,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    max_indirect: int = 4,
) -> tuple[PackedDriverQueue, PackedDeviceQueue]:
    drv = PackedDriverQueue(
        mem,
        size,
        DESC,
        DRV,
        DEV,
        event_idx=event_idx,
        indirect=indirect,
        indirect_addr=INDIRECT if indirect else None,
        max_indirect=max_indirect if indirect else 0,
    )
    dev = PackedDeviceQueue(mem, size, DESC, DRV, DEV, event_idx=event_idx, indirect=indirect)
    return drv, dev


def round_trip(drv: PackedDriverQueue, dev: PackedDeviceQueue, token: object) -> None:
    """One single-descriptor (one ring slot) request, completed with 3 bytes written."""
    drv.add([], [(DATA + 64, 8)], token)
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 3)
    assert list(drv.used()) == [(token, 3)]


class Recorder:
    """Wraps a ring word array and logs every store as (tag, index, value)."""

    def __init__(self, inner: ring.Words, tag: str, log: list[tuple[str, int, int]]) -> None:
        self.inner = inner
        self.tag = tag
        self.log = log

    def __getitem__(self, index: int) -> int:
        return self.inner[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.log.append((self.tag, index, value))
        self.inner[index] = value


def brute_force_need_event(
    size: int, start: int, count: int, off: int, off_wrap: int
) -> tuple[int, int, bool]:
    """Walk ``count`` slots from linear position ``start``: was (off, off_wrap) among them?"""
    seen = False
    pos = start
    for _ in range(count):
        index, wrap = pos % size, 1 - (pos // size) % 2
        if (index, wrap) == (off, off_wrap):
            seen = True
        pos += 1
    return pos % size, 1 - (pos // size) % 2, seen
