"""The virtio-balloon wire format: feature bits, queues, config space, statistics.

Everything both sides of a balloon agree on (device-types/balloon), in one
place: the device model (:mod:`.device`), request parsing (:mod:`.request`)
and the driver (:mod:`pyvirtio.driver.balloon`) import it.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pyvirtio.constants import FeatureBit

__all__ = [
    "BALLOON_PAGE_SIZE",
    "CMD_ID_DONE",
    "CMD_ID_STOP",
    "CONFIG",
    "CONFIG_SIZE",
    "PAGES_PER_MIB",
    "PFN_SHIFT",
    "STAT_ENTRY",
    "STAT_NAMES",
    "BalloonConfig",
    "BalloonFeature",
    "BalloonQueue",
    "ConfigField",
    "StatTag",
    "coalesce_pfns",
    "decode_pfns",
    "decode_stats",
    "encode_pfns",
    "encode_stats",
    "queue_layout",
]

#: PFNs in inflate/deflate requests are guest addresses divided by 4096,
#: whatever the guest's page size (device-types/balloon: Device Operation).
PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << PFN_SHIFT
PAGES_PER_MIB = (1 << 20) // BALLOON_PAGE_SIZE

#: free_page_hint_cmd_id values with a fixed meaning (Free Page Hinting).
CMD_ID_STOP = 0
CMD_ID_DONE = 1


class BalloonFeature(FeatureBit):
    """Device-specific feature bits (device-types/balloon: Feature bits)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    PAGE_REPORTING = 5


class BalloonQueue(enum.Enum):
    """The balloon's virtqueues, by role (device-types/balloon: Virtqueues)."""

    INFLATE = "inflateq"
    DEFLATE = "deflateq"
    STATS = "statsq"
    FREE_PAGE = "free_page_vq"
    REPORTING = "reporting_vq"


#: Which feature makes each optional queue exist.
_QUEUE_FEATURES = (
    (BalloonQueue.STATS, BalloonFeature.STATS_VQ),
    (BalloonQueue.FREE_PAGE, BalloonFeature.FREE_PAGE_HINT),
    (BalloonQueue.REPORTING, BalloonFeature.PAGE_REPORTING),
)


def queue_layout(features: int) -> dict[BalloonQueue, int]:
    """The transport index of each queue that exists with ``features``.

    The spec lists statsq, free_page_vq and reporting_vq as existing only with
    their feature; indices are consecutive over the queues that exist (as
    Linux's driver and Firecracker number them), so with PAGE_REPORTING alone
    the reporting_vq is queue 2.
    """
    layout = {BalloonQueue.INFLATE: 0, BalloonQueue.DEFLATE: 1}
    for queue, feature in _QUEUE_FEATURES:
        if features & feature.mask:
            layout[queue] = len(layout)
    return layout


class ConfigField(enum.IntEnum):
    """Byte offsets in ``struct virtio_balloon_config`` (Device configuration layout)."""

    NUM_PAGES = 0
    ACTUAL = 4
    FREE_PAGE_HINT_CMD_ID = 8
    POISON_VAL = 12


#: num_pages, actual, free_page_hint_cmd_id, poison_val: four le32.
CONFIG = struct.Struct("<IIII")
CONFIG_SIZE = CONFIG.size


class BalloonConfig(NamedTuple):
    """Config space as fields (packed by :data:`CONFIG`)."""

    num_pages: int
    actual: int
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> BalloonConfig:
        return cls(*CONFIG.unpack(data[:CONFIG_SIZE]))


class StatTag(enum.IntEnum):
    """Memory statistics tags (Memory Statistics Tags)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9


#: The names a host API reports statistics under (Firecracker's, so tools for
#: one work with the other).
STAT_NAMES: Mapping[int, str] = {
    StatTag.SWAP_IN: "swap_in",
    StatTag.SWAP_OUT: "swap_out",
    StatTag.MAJFLT: "major_faults",
    StatTag.MINFLT: "minor_faults",
    StatTag.MEMFREE: "free_memory",
    StatTag.MEMTOT: "total_memory",
    StatTag.AVAIL: "available_memory",
    StatTag.CACHES: "disk_caches",
    StatTag.HTLB_PGALLOC: "hugetlb_allocations",
    StatTag.HTLB_PGFAIL: "hugetlb_failures",
}

#: ``struct virtio_balloon_stat``: le16 tag, le64 value, packed (10 bytes).
STAT_ENTRY = struct.Struct("<HQ")


def encode_stats(stats: Iterable[tuple[int, int]]) -> bytes:
    """Statistics as the driver puts them in a statsq buffer."""
    return b"".join(STAT_ENTRY.pack(tag, value) for tag, value in stats)


def decode_stats(data: bytes | memoryview, limit: int | None = None) -> list[tuple[int, int]]:
    """``(tag, value)`` of each whole 10-byte entry in ``data`` (at most ``limit``)."""
    count = len(data) // STAT_ENTRY.size
    if limit is not None:
        count = min(count, limit)
    return [STAT_ENTRY.unpack_from(data, i * STAT_ENTRY.size) for i in range(count)]


_NATIVE_LITTLE = sys.byteorder == "little"


def encode_pfns(pfns: Iterable[int]) -> bytes:
    """A PFN array (le32 each) as inflate and deflate requests carry it."""
    words = array("I", pfns)
    if not _NATIVE_LITTLE:  # pragma: no cover - big-endian hosts
        words.byteswap()
    return words.tobytes()


def decode_pfns(data: bytes | memoryview) -> array[int]:
    """The le32 PFNs of ``data`` (whose length is a multiple of 4)."""
    words = array("I")
    words.frombytes(data)
    if not _NATIVE_LITTLE:  # pragma: no cover - big-endian hosts
        words.byteswap()
    return words


def coalesce_pfns(sorted_pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive PFNs as ``(first, count)``; the input is sorted, unique."""
    runs: list[tuple[int, int]] = []
    first = -2
    count = 0
    for pfn in sorted_pfns:
        if pfn == first + count:
            count += 1
            continue
        if count:
            runs.append((first, count))
        first, count = pfn, 1
    if count:
        runs.append((first, count))
    return runs
