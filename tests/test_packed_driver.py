"""Unit tests of the packed ring's driver side (packed_driver.py).

Malformed cases are built from raw descriptor bytes written straight into
guest memory, the way a buggy or hostile driver would leave them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.packed import (
    DATA,
    DESC,
    DEV,
    DRV,
    INDIRECT,
    MEM_SIZE,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import (
    VirtqueueError,
)
from pyvirtio.virtqueue.packed import (
    PackedDriverQueue,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as m:
        yield m


def test_driver_zero_initialises_ring_and_event_areas(mem: GuestMemory) -> None:
    mem.fill(DESC, 16 * 8, 0xAB)
    mem.fill(DRV, 8, 0xCD)
    PackedDriverQueue(mem, 8, DESC, DRV, DEV)
    assert mem.read(DESC, 16 * 8) == bytes(16 * 8)
    assert mem.read(DRV, 8) == bytes(8)


def test_driver_indirect_needs_area(mem: GuestMemory) -> None:
    with pytest.raises(VirtqueueError, match="indirect_addr"):
        PackedDriverQueue(mem, 8, DESC, DRV, DEV, indirect=True, max_indirect=4)
    with pytest.raises(VirtqueueError, match="indirect table area"):
        PackedDriverQueue(
            mem, 8, DESC, DRV, DEV, indirect=True, indirect_addr=MEM_SIZE - 16, max_indirect=4
        )
    with pytest.raises(VirtqueueError, match="max_indirect"):
        PackedDriverQueue(
            mem, 8, DESC, DRV, DEV, indirect=True, indirect_addr=INDIRECT, max_indirect=40000
        )


def test_driver_without_indirect_ignores_area(mem: GuestMemory) -> None:
    drv = PackedDriverQueue(mem, 8, DESC, DRV, DEV, indirect_addr=INDIRECT, max_indirect=4)
    drv.add([(DATA, 4)], [(DATA, 4)], None)
    assert drv.num_free == 6
    assert drv.indirect_addr is None
