"""Unit tests of the split ring's driver side (split_driver.py).

Device-side cases are built from raw bytes written into guest memory, so each
malformation the driver could produce is exercised exactly; driver-side cases
play the device by writing the used ring by hand.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.queues import driver_error
from helpers.split import (
    _DESC_FMT,
    AVAIL,
    DATA,
    DESC,
    IND,
    MEM_SIZE,
    USED,
    driver,
    spec_need_event,
    used_write,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import split
from pyvirtio.virtqueue.common import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    QueueFullError,
    VirtqueueError,
)
from pyvirtio.virtqueue.split import (
    SplitDriverQueue,
    area_sizes,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as memory:
        yield memory


def test_driver_zeroes_its_areas(mem: GuestMemory) -> None:
    mem.fill(0, MEM_SIZE, 0xFF)
    queue = driver(mem)
    desc_len, avail_len, used_len = area_sizes(8)
    assert mem.read(DESC, desc_len) == bytes(desc_len)
    assert mem.read(AVAIL, avail_len) == bytes(avail_len)
    assert mem.read(USED, used_len) == bytes(used_len)
    assert (queue.num_free, queue.in_flight, queue.size) == (8, 0, 8)


def test_driver_add_writes_descriptors_and_ring(mem: GuestMemory) -> None:
    queue = driver(mem)
    queue.add([(DATA, 10), (DATA + 0x10, 20)], [(DATA + 0x20, 30)], "t")
    assert queue.num_free == 5
    assert queue.in_flight == 1
    assert mem.read_u16(AVAIL + 2) == 1
    head = mem.read_u16(AVAIL + 4)
    addr, length, flags, nxt = _DESC_FMT.unpack(mem.read(DESC + 16 * head, 16))
    assert (addr, length, flags) == (DATA, 10, DESC_F_NEXT)
    addr, length, flags, nxt = _DESC_FMT.unpack(mem.read(DESC + 16 * nxt, 16))
    assert (addr, length, flags) == (DATA + 0x10, 20, DESC_F_NEXT)
    addr, length, flags, _ = _DESC_FMT.unpack(mem.read(DESC + 16 * nxt, 16))
    assert (addr, length, flags) == (DATA + 0x20, 30, DESC_F_WRITE)


def test_driver_rejects_bad_requests_without_side_effects(mem: GuestMemory) -> None:
    drv = driver(mem, 4)
    with pytest.raises(ValueError, match="at least one buffer"):
        drv.add([], [], "x")
    with pytest.raises(ValueError, match="never fit"):
        drv.add([(DATA, 1)] * 5, [], "x")
    with pytest.raises(ValueError, match="out of range"):
        drv.add([(DATA, 2**32)], [], "x")
    with pytest.raises(ValueError, match="out of range"):
        drv.add([(DATA, 1), (-1, 1)], [], "x")
    with pytest.raises(ValueError, match="out of range"):
        drv.add([(DATA, 1)], [(2**64, 1)], "x")
    assert (drv.num_free, drv.in_flight) == (4, 0)
    assert mem.read_u16(AVAIL + 2) == 0
    drv.add([(DATA, 1)] * 4, [], "fits")
    assert drv.num_free == 0


def test_driver_queue_full(mem: GuestMemory) -> None:
    drv = driver(mem, 4)
    drv.add([(DATA, 1)] * 3, [], "a")
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 1)], [(DATA, 1)], "b")
    drv.add([(DATA, 1)], [], "b")
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 1)], [], "c")


def test_driver_indirect_needs_an_area(mem: GuestMemory) -> None:
    with pytest.raises(ValueError, match="indirect_addr"):
        driver(mem, indirect=True, max_indirect=4)
    with pytest.raises(ValueError, match="max_indirect"):
        driver(mem, indirect=True, indirect_addr=IND, max_indirect=0)
    with pytest.raises(VirtqueueError, match="indirect area"):
        driver(mem, indirect=True, indirect_addr=MEM_SIZE - 16, max_indirect=4)
    with pytest.raises(VirtqueueError, match="aligned"):
        driver(mem, indirect=True, indirect_addr=IND + 8, max_indirect=4)


def test_driver_kick_without_event_idx(mem: GuestMemory) -> None:
    drv = driver(mem)
    assert not drv.kick_needed()  # nothing added
    drv.add([(DATA, 1)], [], 1)
    assert drv.kick_needed()
    assert not drv.kick_needed()
    mem.write_u16(USED, split.VIRTQ_USED_F_NO_NOTIFY)
    drv.add([(DATA, 1)], [], 2)
    assert not drv.kick_needed()
    mem.write_u16(USED, 0)
    drv.add([(DATA, 1)], [], 3)
    assert drv.kick_needed()


@pytest.mark.parametrize("start", [0, 7, 65533, 65535])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("event_offset", [-1, 0, 1, 2, 4, 30000])
def test_driver_kick_with_event_idx_follows_the_spec_formula(
    mem: GuestMemory, start: int, batch: int, event_offset: int
) -> None:
    size = 8
    state = driver(mem, size, event_idx=True).state()
    state.update(avail_idx=start, last_used=start, kick_marker=start)
    drv = SplitDriverQueue.from_state(mem, state)
    avail_event = (start + event_offset) & 0xFFFF
    mem.write_u16(USED + 4 + 8 * size, avail_event)
    mem.write_u16(USED, split.VIRTQ_USED_F_NO_NOTIFY)  # ignored with EVENT_IDX
    old = start
    for _ in range(6 // batch):
        for _ in range(batch):
            drv.add([(DATA, 1)], [], None)
        new = (old + batch) & 0xFFFF
        assert drv.kick_needed() == spec_need_event(avail_event, new, old)
        old = new


def test_driver_rejects_used_id_out_of_range(mem: GuestMemory) -> None:
    drv = driver(mem)
    drv.add([(DATA, 1)], [], "a")
    used_write(mem, 8, 0, 8, 0)
    mem.write_u16(USED + 2, 1)
    driver_error(drv, "id 8 is not a request in flight")


def test_driver_rejects_used_id_not_in_flight(mem: GuestMemory) -> None:
    drv = driver(mem)
    drv.add([(DATA, 1)], [(DATA, 1)], "a")  # descriptors 0 and 1; head 0
    used_write(mem, 8, 0, 1, 0)
    mem.write_u16(USED + 2, 1)
    driver_error(drv, "id 1 is not a request in flight")


def test_driver_rejects_a_double_completion(mem: GuestMemory) -> None:
    drv = driver(mem)
    drv.add([(DATA, 1)], [], "a")
    drv.add([(DATA, 1)], [], "b")
    used_write(mem, 8, 0, 0, 0)
    used_write(mem, 8, 1, 0, 0)
    mem.write_u16(USED + 2, 2)
    results = []
    with pytest.raises(VirtqueueError, match="id 0 is not a request in flight"):
        results.extend(drv.used())
    assert results == [("a", 0)]


def test_driver_rejects_more_written_than_offered(mem: GuestMemory) -> None:
    drv = driver(mem)
    drv.add([(DATA, 1)], [(DATA, 16)], "a")
    used_write(mem, 8, 0, 0, 17)
    mem.write_u16(USED + 2, 1)
    driver_error(drv, "17 bytes written, more than the 16")


def test_driver_rejects_used_index_past_in_flight(mem: GuestMemory) -> None:
    drv = driver(mem)
    drv.add([(DATA, 1)], [], "a")
    used_write(mem, 8, 0, 0, 0)
    mem.write_u16(USED + 2, 2)
    driver_error(drv, "only 1 requests are in flight")


def test_driver_rejects_requests_over_2_to_the_32_bytes(mem: GuestMemory) -> None:
    big = 2**32 - 1
    drv = driver(mem, 8, indirect=True, indirect_addr=IND, max_indirect=2)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*32"):
        drv.add([(DATA, big)], [(DATA, big)], "indirect")
    with pytest.raises(ValueError, match="exceeds 2\\*\\*32"):
        drv.add([(DATA, big)], [(DATA, 1), (DATA, big)], "direct")
    assert (drv.num_free, drv.in_flight) == (8, 0)
    drv.add([(DATA, big)], [(DATA, 1)], "fits")
