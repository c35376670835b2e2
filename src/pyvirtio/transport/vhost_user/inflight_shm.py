"""The inflight region's shared memory: a memfd the back end makes, or the front end's fd mapped.

GET_INFLIGHT_FD: the back end allocates the region (vhost-user.rst
"Inflight I/O tracking"), zeroed, in a memfd sealed against any size change,
so that neither side can shrink it under the other's mapping.
SET_INFLIGHT_FD: the front end hands a region back (after a restart, the
one the previous back end allocated); it is validated against its fd's size
and sealed against shrinking under the same policy as guest memory
(``allow_unsealed``, ``--unsealed-memory``), since touching a mapping past
the end of a truncated file raises SIGBUS.  The layout inside lives in
:mod:`.inflight`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

from pyvirtio.memory import seal_against_shrinking
from pyvirtio.transport.vhost_user.inflight import (
    InflightError,
    InflightGeometry,
    allocation_geometry,
    check_geometry,
    queue_region,
)

__all__ = ["InflightArea", "allocate", "map_front_end_region"]


@dataclass(eq=False)
class InflightArea:
    """A mapped inflight region and where each queue's part of it lies."""

    mapping: mmap.mmap
    view: memoryview
    geometry: InflightGeometry

    def queue(self, index: int) -> memoryview:
        return queue_region(self.view, self.geometry, index)


def allocate(num_queues: int, queue_size: int) -> tuple[InflightArea, int]:
    """A fresh zeroed region for GET_INFLIGHT_FD: (the mapped area, the memfd to send).

    The caller owns the fd (sends it, then closes it); the mapping keeps the memory.
    """
    geometry = allocation_geometry(num_queues, queue_size)
    fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, geometry.mmap_size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        mapping = mmap.mmap(fd, geometry.mmap_size, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    return InflightArea(mapping, memoryview(mapping), geometry), fd


def map_front_end_region(
    fd: int,
    mmap_size: int,
    mmap_offset: int,
    num_queues: int,
    queue_size: int,
    *,
    allow_unsealed: bool,
) -> InflightArea:
    """Map the region SET_INFLIGHT_FD describes; InflightError if it cannot be trusted.

    ``fd`` stays the caller's (the mapping does not need it once made).
    """
    try:
        fd_size = os.fstat(fd).st_size
    except OSError as exc:
        raise InflightError(f"cannot stat the inflight fd: {exc}") from exc
    geometry = check_geometry(mmap_size, mmap_offset, num_queues, queue_size, fd_size)
    if not seal_against_shrinking(fd) and not allow_unsealed:
        raise InflightError(
            "the inflight fd cannot be sealed against shrinking (not a memfd made with "
            "MFD_ALLOW_SEALING), so the front end could truncate it under this back end"
        )
    page_offset = mmap_offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(
            fd, mmap_size + page_offset, flags=mmap.MAP_SHARED, offset=mmap_offset - page_offset
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise InflightError(f"cannot map the inflight region: {exc}") from exc
    view = memoryview(mapping)[page_offset : page_offset + mmap_size]
    return InflightArea(mapping, view, geometry)
