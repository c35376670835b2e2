"""Parsing and validation of what a balloon driver sends, with bounds.

Pure functions over a :class:`~pyvirtio.virtqueue.common.DescriptorChain`
and the guest memory: no state, no I/O.  The device model
(:mod:`.device`) decides what to do with the result.  A driver is hostile
until proven otherwise, so every request is bounded before a byte of it is
read (after Firecracker's balloon, which caps the PFNs of a descriptor and
ignores out-of-range ones):

* inflate/deflate: each device-readable descriptor holds at most
  :attr:`BalloonLimits.pages_per_descriptor` PFNs and a request at most
  :attr:`BalloonLimits.pages_per_request`; a request over either bound, with
  a length that is not a whole number of PFNs, or with device-writable parts,
  is refused whole.  PFNs outside guest memory are dropped and counted.
* stats: at most :attr:`BalloonLimits.stats_per_buffer` entries are read;
  the rest of an oversized buffer is counted, not read (and the device keeps
  at most :attr:`BalloonLimits.unknown_stat_tags` tags it does not know).
* free page reports and free page hints: at most
  :attr:`BalloonLimits.ranges_per_report` ranges per buffer, each page
  aligned and wholly inside guest memory; the others are dropped and
  counted.  A hint's command ID buffer must be exactly 4 bytes, and a hint
  buffer names at most :attr:`BalloonLimits.pages_per_hint` pages (the device
  records each one, so the same huge range named over and over is bounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pyvirtio.devices.balloon.wire import (
    BALLOON_PAGE_SIZE,
    PFN_SHIFT,
    STAT_ENTRY,
    coalesce_pfns,
    decode_pfns,
    decode_stats,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DescriptorChain

__all__ = [
    "BalloonLimits",
    "HintRequest",
    "PageRequest",
    "ReportRequest",
    "StatsRequest",
    "parse_hint",
    "parse_page_request",
    "parse_report",
    "parse_stats",
]

_PFN_SIZE = 4


@dataclass(frozen=True)
class BalloonLimits:
    """Bounds on what one request may make the device do."""

    #: PFNs in one descriptor (Firecracker's MAX_PAGES_IN_DESC; Linux sends 256).
    pages_per_descriptor: int = 256
    #: PFNs in one request, over all its descriptors.
    pages_per_request: int = 1024
    #: Statistics entries read from one stats buffer.
    stats_per_buffer: int = 256
    #: Distinct tags the spec does not define that the device keeps (the rest
    #: are counted and dropped, so the stats table stays small).
    unknown_stat_tags: int = 32
    #: Ranges in one free page report (Linux reports 32 at a time).
    ranges_per_report: int = 256
    #: Pages in one free page hint buffer, over all its ranges (Linux hints
    #: one block per buffer: 4 MiB, or 512 MiB with 64 KiB guest pages).
    pages_per_hint: int = 1 << 17


class PageRequest(NamedTuple):
    """A parsed inflate or deflate request."""

    #: Valid PFNs, sorted and without duplicates.
    pfns: list[int]
    #: The same PFNs as runs ``(first, count)``.
    runs: list[tuple[int, int]]
    #: PFNs dropped because their page is not (wholly) guest RAM.
    out_of_range: int
    #: Why the whole request was refused, or None.
    error: str | None


class StatsRequest(NamedTuple):
    """A parsed stats buffer."""

    #: ``(tag, value)`` in buffer order, at most ``stats_per_buffer`` of them.
    stats: list[tuple[int, int]]
    #: Entries past the bound, and a trailing partial entry, not read.
    dropped: int


class ReportRequest(NamedTuple):
    """A parsed free page report: page-aligned ``(guest address, length)`` ranges."""

    ranges: list[tuple[int, int]]
    #: Ranges dropped: unaligned, outside guest memory or past the bound.
    rejected: int


def parse_page_request(
    chain: DescriptorChain, mem: GuestMemory, limits: BalloonLimits
) -> PageRequest:
    """The PFN array of an inflate or deflate request, validated."""
    if chain.writable:
        return PageRequest([], [], 0, f"{len(chain.writable)} device-writable descriptors")
    total = 0
    for _, length in chain.readable:
        if length % _PFN_SIZE:
            return PageRequest([], [], 0, f"descriptor of {length} bytes is not a PFN array")
        if length > limits.pages_per_descriptor * _PFN_SIZE:
            return PageRequest(
                [],
                [],
                0,
                f"descriptor of {length // _PFN_SIZE} PFNs (at most {limits.pages_per_descriptor})",
            )
        total += length
    if total > limits.pages_per_request * _PFN_SIZE:
        return PageRequest(
            [], [], 0, f"request of {total // _PFN_SIZE} PFNs (at most {limits.pages_per_request})"
        )
    # Bounded above: at most pages_per_request * 4 bytes are read.
    pfns = sorted(set(decode_pfns(chain.read_all())))
    runs = coalesce_pfns(pfns)
    if all(mem.is_valid(first << PFN_SHIFT, count << PFN_SHIFT) for first, count in runs):
        return PageRequest(pfns, runs, 0, None)
    # Rare (a hostile or broken driver): check page by page.
    valid = [pfn for pfn in pfns if mem.is_valid(pfn << PFN_SHIFT, BALLOON_PAGE_SIZE)]
    return PageRequest(valid, coalesce_pfns(valid), len(pfns) - len(valid), None)


def parse_stats(chain: DescriptorChain, limits: BalloonLimits) -> StatsRequest:
    """The statistics in a stats buffer's device-readable part, bounded."""
    entries = chain.readable_len // STAT_ENTRY.size
    wanted = min(entries, limits.stats_per_buffer)
    data = chain.read(0, wanted * STAT_ENTRY.size)
    partial = 1 if chain.readable_len % STAT_ENTRY.size else 0
    return StatsRequest(decode_stats(data), entries - wanted + partial)


class HintRequest(NamedTuple):
    """A buffer on the free_page_vq: a command ID, or hinted page ranges."""

    #: The command ID of a device-readable buffer (None for a page buffer).
    cmd_id: int | None
    #: Page-aligned ranges of a device-writable buffer.
    ranges: list[tuple[int, int]]
    #: Ranges dropped (as in :func:`parse_report`, or past ``pages_per_hint``),
    #: or a malformed ID buffer.
    rejected: int


def parse_hint(chain: DescriptorChain, mem: GuestMemory, limits: BalloonLimits) -> HintRequest:
    """A free_page_vq buffer: a 4-byte command ID (Free Page Hinting: the driver MUST
    use an output buffer size of 4 bytes), or page ranges as device-writable buffers."""
    if chain.readable:
        if chain.readable_len != 4 or chain.writable:
            return HintRequest(None, [], 1)
        return HintRequest(int.from_bytes(chain.read(0, 4), "little"), [], 0)
    ranges, rejected = _page_ranges(chain, mem, limits)
    budget = limits.pages_per_hint
    taken = []
    for addr, length in ranges:
        pages = length // BALLOON_PAGE_SIZE
        if pages > budget:
            rejected += 1
            continue
        budget -= pages
        taken.append((addr, length))
    return HintRequest(None, taken, rejected)


def parse_report(chain: DescriptorChain, mem: GuestMemory, limits: BalloonLimits) -> ReportRequest:
    """The free page ranges of a report (Linux adds them as device-writable buffers)."""
    ranges, rejected = _page_ranges(chain, mem, limits)
    return ReportRequest(ranges, rejected + len(chain.readable))


def _page_ranges(
    chain: DescriptorChain, mem: GuestMemory, limits: BalloonLimits
) -> tuple[list[tuple[int, int]], int]:
    """The chain's device-writable ranges that are whole pages of guest RAM, and
    how many others there were (at most ``ranges_per_report`` are taken)."""
    ranges: list[tuple[int, int]] = []
    rejected = 0
    for index, (addr, length) in enumerate(chain.writable):
        if (
            index >= limits.ranges_per_report
            or addr % BALLOON_PAGE_SIZE
            or length % BALLOON_PAGE_SIZE
            or not mem.is_valid(addr, length)
        ):
            rejected += 1
            continue
        ranges.append((addr, length))
    return ranges, rejected
