"""A guest-memory allocator for drivers.

A driver has to place its rings and buffers in guest memory the device can
reach (transport-mmio.tex "Virtqueue Configuration": "Allocate and zero the
queue memory, making sure the memory is physically contiguous").  A real
guest kernel has its own allocator; a driver running in a host process over
a :class:`~pyvirtio.memory.GuestMemory` uses this one: a first-fit free list
over one guest-physical range, with per-allocation alignment, coalescing on
free so a long-running driver does not fragment the range.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed, split
from pyvirtio.virtqueue.common import DriverQueue

if TYPE_CHECKING:
    from pyvirtio.driver.transport import BufferAllocator

__all__ = ["AllocationError", "GuestAllocator", "OwnedBuffers", "allocate_driver_queue"]


class AllocationError(Exception):
    """No free block is large enough, or a free of an address never allocated."""


class GuestAllocator:
    """Allocates blocks of ``[base, base + length)`` in ``mem``.

    ``alloc(size, align)`` returns the guest address of a block (zeroed by
    default); ``free(addr)`` returns it.  Thread-safe.
    """

    def __init__(self, mem: GuestMemory, base: int, length: int) -> None:
        if length <= 0 or base < 0:
            raise ValueError(f"invalid allocator range base={base:#x} length={length:#x}")
        if not mem.is_valid(base, length):
            raise ValueError(f"range [{base:#x}, {base + length:#x}) is not all guest memory")
        self.mem = mem
        self.base = base
        self.length = length
        self._lock = threading.Lock()
        #: Free blocks as parallel sorted lists of starts and lengths.
        self._free_starts: list[int] = [base]
        self._free_lengths: list[int] = [length]
        #: addr -> (block start, block length), the block including alignment padding.
        self._allocated: dict[int, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return (
            f"GuestAllocator(base={self.base:#x}, length={self.length:#x}, "
            f"free={self.free_bytes:#x})"
        )

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(self._free_lengths)

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int:
        """A block of ``size`` bytes aligned to ``align`` (a power of two)."""
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {align}")
        with self._lock:
            for i, (start, length) in enumerate(
                zip(self._free_starts, self._free_lengths, strict=True)
            ):
                addr = (start + align - 1) & ~(align - 1)
                end = addr + size
                if end > start + length:
                    continue
                del self._free_starts[i], self._free_lengths[i]
                tail = start + length - end
                if tail:
                    self._free_starts.insert(i, end)
                    self._free_lengths.insert(i, tail)
                # Padding before an aligned block stays with the block, so free
                # gives it back whole.
                self._allocated[addr] = (start, end - start)
                break
            else:
                raise AllocationError(f"no free block of {size} bytes aligned to {align}")
        if zero:
            self.mem.fill(addr, size)
        return addr

    def free(self, addr: int) -> None:
        """Return a block from :meth:`alloc`; neighbours are merged."""
        with self._lock:
            try:
                start, length = self._allocated.pop(addr)
            except KeyError:
                raise AllocationError(f"{addr:#x} was not allocated here") from None
            starts, lengths = self._free_starts, self._free_lengths
            i = bisect.bisect_left(starts, start)
            if i < len(starts) and start + length == starts[i]:
                length += lengths[i]
                del starts[i], lengths[i]
            if i > 0 and starts[i - 1] + lengths[i - 1] == start:
                lengths[i - 1] += length
            else:
                starts.insert(i, start)
                lengths.insert(i, length)

    def owns(self, addr: int) -> bool:
        """Whether ``addr`` is a live allocation of this allocator."""
        with self._lock:
            return addr in self._allocated


class OwnedBuffers:
    """The buffers one driver took from its transport's allocator, to free together.

    The allocator also holds the rings (and maybe other drivers' buffers),
    so a driver records its own here and frees them all when it closes,
    once the device reset has given every one back.  ``zero=False`` skips
    zeroing buffers the driver or the device fills anyway.
    """

    def __init__(self, allocator: BufferAllocator, *, zero: bool = True) -> None:
        self.allocator = allocator
        self.zero = zero
        self._owned: set[int] = set()

    def alloc(self, size: int) -> int:
        addr = self.allocator.alloc(size, zero=self.zero)
        self._owned.add(addr)
        return addr

    def free(self, addr: int) -> None:
        self._owned.discard(addr)
        self.allocator.free(addr)

    def free_all(self) -> None:
        for addr in self._owned:
            self.allocator.free(addr)
        self._owned.clear()


def allocate_driver_queue(
    mem: GuestMemory,
    allocator: GuestAllocator,
    size: int,
    *,
    packed_ring: bool,
    event_idx: bool,
    indirect: bool,
    max_indirect: int,
) -> tuple[DriverQueue, list[int]]:
    """Ring areas (and an indirect-table area) from ``allocator``, and the driver queue over them.

    Returns the queue and its allocations, descriptor area, driver area and
    device area first, so a driver transport can program their addresses and
    free them all at reset.  Nothing stays allocated if construction fails.
    Indirect tables are used only when negotiated *and* ``max_indirect > 0``.
    """
    module = packed if packed_ring else split
    if packed_ring:
        aligns = (packed.DESC_ALIGN, packed.EVENT_ALIGN, packed.EVENT_ALIGN)
    else:
        aligns = (split.DESC_ALIGN, split.AVAIL_ALIGN, split.USED_ALIGN)
    allocations: list[int] = []
    try:
        for area_size, align in zip(module.area_sizes(size), aligns, strict=True):
            allocations.append(allocator.alloc(area_size, align))
        desc, driver, device = allocations
        indirect = indirect and max_indirect > 0
        indirect_addr: int | None = None
        if indirect:
            indirect_addr = allocator.alloc(
                module.indirect_area_size(size, max_indirect), module.DESC_ALIGN
            )
            allocations.append(indirect_addr)
        cls = packed.PackedDriverQueue if packed_ring else split.SplitDriverQueue
        queue: DriverQueue = cls(
            mem,
            size,
            desc,
            driver,
            device,
            event_idx=event_idx,
            indirect=indirect,
            indirect_addr=indirect_addr,
            max_indirect=max_indirect if indirect else 0,
        )
    except BaseException:
        for addr in allocations:
            allocator.free(addr)
        raise
    return queue, allocations
