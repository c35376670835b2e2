"""The balloon's page sets: which guest pages it holds, one bit per page.

The inflated pages and the hinted pages can each be the whole of guest RAM.
Held as a Python set of ints they cost some 60 bytes of host memory per
4 KiB guest page, a gigabyte for a 64 GiB guest that a driver fills.  A
:class:`PageSet` keeps one bit per page instead, in chunks of
:data:`CHUNK_PAGES` pages made the first time a page in their range is added
and dropped once their last page leaves: host memory follows the part of
guest RAM the driver named, at 1/32768 of its size.  The device adds and
removes whole runs of pages (its requests are parsed into runs), so each
operation works on bytes of a chunk at once rather than on single pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["CHUNK_PAGES", "PageSet"]

#: log2 of the pages one chunk covers.
CHUNK_SHIFT: Final = 15
#: Pages one chunk covers: 128 MiB of guest memory in a 4 KiB bitmap.
CHUNK_PAGES: Final = 1 << CHUNK_SHIFT
_CHUNK_BYTES: Final = CHUNK_PAGES // 8
_OFFSET_MASK: Final = CHUNK_PAGES - 1
#: Bytes of a bitmap :meth:`PageSet.runs` reads at once: small ints to shift.
_SLICE_BYTES: Final = 64


def _update(chunk: bytearray, lo: int, hi: int, add: bool) -> int:
    """Set (``add``) or clear bits ``lo`` to ``hi - 1`` of ``chunk``; how many changed."""
    start, stop = lo >> 3, (hi + 7) >> 3
    old = int.from_bytes(chunk[start:stop], "little")
    mask = ((1 << (hi - lo)) - 1) << (lo & 7)
    new = old | mask if add else old & ~mask
    chunk[start:stop] = new.to_bytes(stop - start, "little")
    return (old ^ new).bit_count()


class PageSet:
    """A set of page frame numbers, changed a run of pages at a time."""

    __slots__ = ("_chunks", "_count")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        #: Chunk number (pfn >> CHUNK_SHIFT) -> its bitmap, bit i for page i of the chunk.
        self._chunks: dict[int, bytearray] = {}
        self._count = 0
        for first, count in runs:
            self.add_run(first, count)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, pfn: object) -> bool:
        if not isinstance(pfn, int) or pfn < 0:
            return False
        chunk = self._chunks.get(pfn >> CHUNK_SHIFT)
        offset = pfn & _OFFSET_MASK
        return chunk is not None and bool(chunk[offset >> 3] >> (offset & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        """The pages, in ascending order."""
        for first, count in self.runs():
            yield from range(first, first + count)

    @property
    def nbytes(self) -> int:
        """Host memory the bitmaps take: :data:`CHUNK_PAGES` / 8 bytes per chunk in use."""
        return len(self._chunks) * _CHUNK_BYTES

    def add_run(self, first: int, count: int) -> int:
        """Add pages ``first`` to ``first + count - 1``; how many were not in the set."""
        return self._change(first, count, add=True)

    def discard_run(self, first: int, count: int) -> int:
        """Remove pages ``first`` to ``first + count - 1``; how many were in the set."""
        return self._change(first, count, add=False)

    def clear(self) -> None:
        self._chunks.clear()
        self._count = 0

    def runs(self) -> list[tuple[int, int]]:
        """The set as ascending runs of consecutive pages, ``(first, count)``."""
        runs: list[tuple[int, int]] = []
        run_first = run_end = -1
        for index in sorted(self._chunks):
            chunk = self._chunks[index]
            for at in range(0, _CHUNK_BYTES, _SLICE_BYTES):
                bits = int.from_bytes(chunk[at : at + _SLICE_BYTES], "little")
                pfn = (index << CHUNK_SHIFT) + at * 8
                while bits:
                    zeros = (bits & -bits).bit_length() - 1
                    bits >>= zeros
                    pfn += zeros
                    ones = ((bits + 1) & ~bits).bit_length() - 1
                    bits >>= ones
                    if pfn != run_end:  # not the continuation of the run before
                        if run_end > 0:
                            runs.append((run_first, run_end - run_first))
                        run_first = pfn
                    pfn += ones
                    run_end = pfn
        if run_end > 0:
            runs.append((run_first, run_end - run_first))
        return runs

    def _change(self, first: int, count: int, *, add: bool) -> int:
        if first < 0 or count < 0:
            raise ValueError(f"page run {first}+{count}")
        chunks = self._chunks
        changed = 0
        end = first + count
        while first < end:
            index = first >> CHUNK_SHIFT
            stop = min(end, (index + 1) << CHUNK_SHIFT)
            chunk = chunks.get(index)
            if chunk is None:
                if not add:
                    first = stop
                    continue
                chunk = chunks[index] = bytearray(_CHUNK_BYTES)
            lo = first & _OFFSET_MASK
            changed += _update(chunk, lo, lo + stop - first, add)
            if not add and chunk.count(0) == _CHUNK_BYTES:
                del chunks[index]
            first = stop
        self._count += changed if add else -changed
        return changed
