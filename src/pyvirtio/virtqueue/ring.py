"""What both ring formats build on: word views, barriers, layout and state checks.

The split and packed rings (:mod:`.split`, :mod:`.packed`) differ in layout
and in how a descriptor is published, but not in how they touch guest
memory: ring areas are ``memoryview`` casts indexed by little-endian word,
buffers are checked against a cached :class:`~pyvirtio.memory.RegionWindow`,
a store-load barrier comes from a lock round trip, and a snapshot's state
dict is validated field by field.  Those primitives live here, once.
"""

from __future__ import annotations

import struct
import sys
import threading
from typing import Final, Literal, Protocol

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.common import MAX_QUEUE_SIZE
from pyvirtio.virtqueue.errors import VirtqueueError

__all__ = [
    "CHAIN_BYTES_LIMIT",
    "DESC",
    "DESC_SIZE",
    "INDIRECT_ALIGN",
    "U64_LIMIT",
    "LittleEndianWords",
    "StateReader",
    "Words",
    "area_view",
    "check_queue_size",
    "full_barrier",
    "indirect_area_size",
    "read_span",
    "words",
]

#: Bytes of one descriptor, in either format (``struct virtq_desc`` /
#: ``struct pvirtq_desc``: le64 addr, le32 len, then two le16 fields).
DESC_SIZE: Final = 16
#: One descriptor: split ``(addr, len, flags, next)``, packed ``(addr, len, id, flags)``.
DESC: Final = struct.Struct("<QIHH")
#: Alignment of an indirect descriptor table: a descriptor's, in either format.
INDIRECT_ALIGN: Final = 16
#: One past the highest guest-physical address.
U64_LIMIT: Final = 1 << 64
#: split-ring.tex, "The Virtqueue Descriptor Table": a chain is at most 2**32 bytes
#: (the packed ring takes the same limit).
CHAIN_BYTES_LIMIT: Final = 1 << 32

WordCode = Literal["H", "I", "Q"]

#: Ring areas are read through native-order memoryview casts on little-endian
#: hosts, elsewhere through :class:`LittleEndianWords`.  A module variable so
#: tests can exercise the fallback.
NATIVE_LITTLE = sys.byteorder == "little"


class Words(Protocol):
    """Little-endian integer slots by index: a native cast or :class:`LittleEndianWords`."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...

    def __len__(self) -> int: ...


class LittleEndianWords:
    """Little-endian integer slots over a byte view through ``struct``, for big-endian hosts."""

    __slots__ = ("_count", "_struct", "_view", "_width")

    def __init__(self, view: memoryview, code: str) -> None:
        self._struct = struct.Struct("<" + code)
        self._width = self._struct.size
        self._view = view
        self._count = len(view) // self._width

    def __getitem__(self, index: int, /) -> int:
        if not 0 <= index < self._count:
            raise IndexError("ring slot out of range")
        value: int = self._struct.unpack_from(self._view, index * self._width)[0]
        return value

    def __setitem__(self, index: int, value: int, /) -> None:
        if not 0 <= index < self._count:
            raise IndexError("ring slot out of range")
        try:
            self._struct.pack_into(self._view, index * self._width, value)
        except struct.error as exc:
            raise ValueError(str(exc)) from exc

    def __len__(self) -> int:
        return self._count


def words(view: memoryview, code: WordCode) -> Words:
    """``view`` as little-endian ``code`` words ("H", "I" or "Q")."""
    if NATIVE_LITTLE:
        return view.cast(code)
    return LittleEndianWords(view, code)


def read_span(slots: Words, start: int, stop: int) -> list[int]:
    """Slots ``[start, stop)`` as a list, in one call on native views."""
    if isinstance(slots, memoryview):
        return slots[start:stop].tolist()
    return [slots[index] for index in range(start, stop)]


_barrier_lock: Final = threading.Lock()


def full_barrier() -> None:
    """A store-load barrier, as far as CPython can give one.

    The spec asks for a full barrier between publishing an index (or a
    descriptor's flags) and reading the other side's suppression fields
    (split-ring.tex, "Notifying The Device"; packed-ring.tex, "Sending
    Available Buffer Notifications"), or a notification can be lost.  Python
    has no fence primitive; an uncontended lock round trip runs locked
    read-modify-write instructions, which x86 orders as full fences.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


def check_queue_size(size: object, *, power_of_two: bool) -> int:
    """``size`` as a queue size in 1..MAX_QUEUE_SIZE; VirtqueueError otherwise.

    Split queues need a power of two (split-ring.tex, "Split Virtqueues");
    packed ones do not (packed-ring.tex).
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise VirtqueueError(f"queue size {size!r} is not an integer")
    if power_of_two:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
    elif not 1 <= size <= MAX_QUEUE_SIZE:
        raise VirtqueueError(f"queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    return size


def indirect_area_size(size: int, max_indirect: int) -> int:
    """Bytes a driver queue of ``size`` needs for its indirect tables, in either format.

    One table of ``max_indirect`` descriptors per head slot (split) or buffer
    ID (packed), so a table is owned by exactly one request in flight and
    needs no allocator.
    """
    return size * max_indirect * DESC_SIZE


def area_view(mem: GuestMemory, what: str, addr: object, length: int, align: int) -> memoryview:
    """A byte view of one ring area, which must be aligned and inside one region.

    Each area is accessed through a single zero-copy view, so it may not
    span two regions even where they are contiguous.
    """
    if isinstance(addr, bool) or not isinstance(addr, int):
        raise VirtqueueError(f"{what} address {addr!r} is not an integer")
    if addr % align:
        raise VirtqueueError(f"{what} address {addr:#x} is not {align}-byte aligned")
    try:
        return mem.view(addr, length)
    except GuestMemoryError as exc:
        raise VirtqueueError(
            f"{what} [{addr:#x}, {addr + length:#x}) is not inside one guest memory region: {exc}"
        ) from exc


class StateReader:
    """Typed fields of a queue's state dict; a missing or mistyped one raises VirtqueueError."""

    __slots__ = ("_state",)

    def __init__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise VirtqueueError(f"queue state is not a dict: {type(state).__name__}")
        self._state = state

    def _get(self, key: str) -> object:
        try:
            return self._state[key]
        except KeyError as exc:
            raise VirtqueueError(f"queue state lacks {key!r}") from exc

    def integer(self, key: str, low: int = 0, high: int | None = None) -> int:
        """An int field in ``[low, high]`` (``high`` None: no upper bound)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise VirtqueueError(f"queue state {key!r} is not an int: {value!r}")
        if value < low or (high is not None and value > high):
            raise VirtqueueError(f"queue state {key!r} = {value} is outside {low}..{high}")
        return value

    def u16(self, key: str) -> int:
        """A 16-bit ring index."""
        return self.integer(key, 0, 0xFFFF)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise VirtqueueError(f"queue state {key!r} is not a bool: {value!r}")
        return value
