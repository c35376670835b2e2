"""Unit tests of the split virtqueue (split-ring.tex), both sides.

Device-side cases are built from raw bytes written into guest memory, so each
malformation the driver could produce is exercised exactly; driver-side cases
play the device by writing the used ring by hand.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import ring, split, split_device
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    DescriptorChain,
    DeviceQueue,
    DriverQueue,
    QueueFullError,
    VirtqueueError,
)
from pyvirtio.virtqueue.split import (
    SplitDeviceQueue,
    SplitDriverQueue,
    area_sizes,
    indirect_area_size,
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


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as memory:
        yield memory


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


def pop_error(queue: SplitDeviceQueue, match: str) -> None:
    """pop raises VirtqueueError matching ``match``, then the queue stays broken."""
    with pytest.raises(VirtqueueError, match=match):
        queue.pop()
    assert queue.broken
    assert queue.has_available()
    with pytest.raises(VirtqueueError, match="broken"):
        queue.pop()


# -- layout -----------------------------------------------------------------------


def test_area_sizes_follow_the_spec_table() -> None:
    assert area_sizes(1) == (16, 8, 14)
    assert area_sizes(256) == (4096, 6 + 512, 6 + 2048)
    assert area_sizes(MAX_QUEUE_SIZE) == (16 * 32768, 6 + 2 * 32768, 6 + 8 * 32768)
    assert indirect_area_size(8, 4) == 8 * 4 * 16
    assert (split.DESC_ALIGN, split.AVAIL_ALIGN, split.USED_ALIGN) == (16, 2, 4)


@pytest.mark.parametrize("size", [1, 2, 4, 256, 32768])
def test_valid_sizes_accepted(size: int) -> None:
    desc_len, avail_len, _ = area_sizes(size)
    with GuestMemory.anonymous(1 << 20) as memory:
        queue = SplitDeviceQueue(memory, size, 0, desc_len, (desc_len + avail_len + 3) & ~3)
        assert queue.size == size
        assert not queue.broken
        assert not queue.event_idx
        assert not queue.indirect


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, -4])
def test_bad_sizes_rejected(mem: GuestMemory, size: int) -> None:
    with pytest.raises(VirtqueueError, match="power of two"):
        SplitDeviceQueue(mem, size, DESC, AVAIL, USED)
    with pytest.raises(VirtqueueError, match="power of two"):
        SplitDriverQueue(mem, size, DESC, AVAIL, USED)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "what"),
    [
        (DESC + 8, AVAIL, USED, "descriptor table .* 16-byte aligned"),
        (DESC, AVAIL + 1, USED, "available ring .* 2-byte aligned"),
        (DESC, AVAIL, USED + 2, "used ring .* 4-byte aligned"),
    ],
)
def test_misaligned_areas_rejected(
    mem: GuestMemory, desc: int, avail: int, used: int, what: str
) -> None:
    with pytest.raises(VirtqueueError, match=what):
        SplitDeviceQueue(mem, 8, desc, avail, used)
    with pytest.raises(VirtqueueError, match=what):
        SplitDriverQueue(mem, 8, desc, avail, used)


def test_areas_outside_memory_rejected(mem: GuestMemory) -> None:
    size = 8
    desc_len, _, _ = area_sizes(size)
    with pytest.raises(VirtqueueError, match="descriptor table"):
        SplitDeviceQueue(mem, size, MEM_SIZE - desc_len + 16, AVAIL, USED)
    with pytest.raises(VirtqueueError, match="used ring"):
        SplitDeviceQueue(mem, size, DESC, AVAIL, MEM_SIZE + 0x1000)


def test_event_idx_trailers_must_be_in_memory(mem: GuestMemory) -> None:
    size = 8
    _, avail_len, used_len = area_sizes(size)
    # The rings without their 2-byte event trailers would fit; with them they don't.
    with pytest.raises(VirtqueueError, match="available ring"):
        SplitDeviceQueue(mem, size, DESC, MEM_SIZE - avail_len + 2, USED)
    with pytest.raises(VirtqueueError, match="used ring"):
        SplitDeviceQueue(mem, size, DESC, AVAIL, MEM_SIZE - used_len + 2)
    SplitDeviceQueue(mem, size, DESC, MEM_SIZE - avail_len, MEM_SIZE - 0x1000)


def test_area_spanning_two_regions_rejected() -> None:
    memory = GuestMemory()
    memory.add_anonymous(0, 0x1000)
    memory.add_anonymous(0x1000, 0x1000)
    try:
        with pytest.raises(VirtqueueError, match="one guest memory region"):
            SplitDeviceQueue(memory, 256, 0x800, 0x1800, 0x1C00)
    finally:
        memory.close()


def test_queues_satisfy_the_protocols(mem: GuestMemory) -> None:
    assert isinstance(device(mem), DeviceQueue)
    assert isinstance(driver(mem), DriverQueue)


# -- device side: well-formed chains -------------------------------------------


def test_empty_ring_pops_none(mem: GuestMemory) -> None:
    queue = device(mem)
    assert not queue.has_available()
    assert queue.pop() is None
    assert not queue.broken


def test_single_readable_descriptor(mem: GuestMemory) -> None:
    mem.write(DATA, b"hello")
    write_desc(mem, 3, DATA, 5)
    make_available(mem, 8, [3])
    queue = device(mem)
    assert queue.has_available()
    chain = queue.pop()
    assert chain is not None
    assert chain.head == 3
    assert chain.readable == [(DATA, 5)]
    assert chain.writable == []
    assert (chain.readable_len, chain.writable_len, chain.ring_slots) == (5, 0, 1)
    assert chain.read_all() == b"hello"
    assert queue.pop() is None
    assert not queue.has_available()


def test_single_writable_descriptor(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 16, DESC_F_WRITE)
    make_available(mem, 8, [0])
    chain = device(mem).pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == ([], [(DATA, 16)])
    assert (chain.readable_len, chain.writable_len) == (0, 16)


def test_popped_chains_match_the_constructor_in_every_slot(mem: GuestMemory) -> None:
    write_desc(mem, 1, DATA, 7)
    write_desc(mem, 2, DATA + 64, 9, DESC_F_WRITE)
    write_desc(mem, 3, DATA, 1, DESC_F_NEXT, 4)
    write_desc(mem, 4, DATA + 64, 2, DESC_F_WRITE)
    make_available(mem, 8, [1, 2, 3])
    queue = device(mem)
    for head, expected in (
        (1, DescriptorChain(mem, 1, [(DATA, 7)], [], 7, 0)),
        (2, DescriptorChain(mem, 2, [], [(DATA + 64, 9)], 0, 9)),
        (3, DescriptorChain(mem, 3, [(DATA, 1)], [(DATA + 64, 2)], 1, 2)),
    ):
        chain = queue.pop()
        assert type(chain) is DescriptorChain
        for slot in DescriptorChain.__slots__:
            assert getattr(chain, slot) == getattr(expected, slot), (head, slot)


def test_chain_of_readable_then_writable(mem: GuestMemory) -> None:
    mem.write(DATA, b"abc")
    mem.write(DATA + 0x100, b"defg")
    write_desc(mem, 5, DATA, 3, DESC_F_NEXT, 2)
    write_desc(mem, 2, DATA + 0x100, 4, DESC_F_NEXT, 7)
    write_desc(mem, 7, DATA + 0x200, 10, DESC_F_WRITE | DESC_F_NEXT, 0)
    write_desc(mem, 0, DATA + 0x300, 6, DESC_F_WRITE)
    make_available(mem, 8, [5])
    chain = device(mem).pop()
    assert chain is not None
    assert chain.head == 5
    assert chain.readable == [(DATA, 3), (DATA + 0x100, 4)]
    assert chain.writable == [(DATA + 0x200, 10), (DATA + 0x300, 6)]
    assert (chain.readable_len, chain.writable_len) == (7, 16)
    assert chain.read_all() == b"abcdefg"
    assert chain.write(b"x" * 12) == 12
    assert mem.read(DATA + 0x200, 10) == b"x" * 10
    assert mem.read(DATA + 0x300, 2) == b"xx"


def test_chain_as_long_as_the_queue_is_allowed(mem: GuestMemory) -> None:
    for i in range(8):
        write_desc(mem, i, DATA + i, 1, DESC_F_NEXT if i < 7 else 0, i + 1)
    make_available(mem, 8, [0])
    chain = device(mem).pop()
    assert chain is not None
    assert len(chain.readable) == 8


def test_zero_length_descriptors_accepted(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 0, DESC_F_NEXT, 1)
    write_desc(mem, 1, DATA, 4, DESC_F_NEXT, 2)
    write_desc(mem, 2, 0, 0, DESC_F_WRITE)
    make_available(mem, 8, [0])
    chain = device(mem).pop()
    assert chain is not None
    assert chain.readable == [(DATA, 0), (DATA, 4)]
    assert chain.writable == [(0, 0)]
    assert (chain.readable_len, chain.writable_len) == (4, 0)


def test_reserved_flag_bits_are_ignored(mem: GuestMemory) -> None:
    # Bits other than NEXT, WRITE and INDIRECT mean nothing in a split ring
    # (the packed ring's AVAIL/USED bits 7 and 15 included).
    write_desc(mem, 0, DATA, 4, DESC_F_NEXT | 0x80, 1)
    write_desc(mem, 1, DATA + 4, 4, DESC_F_WRITE | 0x8000)
    write_desc(mem, 2, DATA + 8, 4, 0x88)
    make_available(mem, 8, [0, 2])
    queue = device(mem)
    chain = queue.pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == ([(DATA, 4)], [(DATA + 4, 4)])
    chain = queue.pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == ([(DATA + 8, 4)], [])


def test_chains_come_in_available_ring_order(mem: GuestMemory) -> None:
    for i in range(8):
        write_desc(mem, i, DATA + 16 * i, 16)
    make_available(mem, 8, [6, 1, 4])
    queue = device(mem)
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
    assert heads == [6, 1, 4]
    assert queue.next_avail == 3


def test_available_index_wraps_at_65536(mem: GuestMemory) -> None:
    size = 4
    write_desc(mem, 0, DATA, 1)
    write_desc(mem, 1, DATA + 1, 1)
    state = device(mem, size).state()
    state.update(next_avail=65534, next_used=65534, signalled_used=65534)
    queue = SplitDeviceQueue.from_state(mem, state)
    idx = make_available(mem, size, [0, 1, 0], start=65534)
    assert idx == 1
    assert [c.head for c in iter(queue.pop, None)] == [0, 1, 0]
    assert queue.next_avail == 1


def test_indirect_table(mem: GuestMemory) -> None:
    mem.write(DATA, b"req")
    write_table_desc(mem, IND, 0, DATA, 3, DESC_F_NEXT, 2)
    write_table_desc(mem, IND, 2, DATA + 0x40, 5, DESC_F_NEXT, 1)
    write_table_desc(mem, IND, 1, DATA + 0x80, 8, DESC_F_WRITE)
    # The WRITE flag on the descriptor referring to the table must be ignored.
    write_desc(mem, 4, IND, 3 * 16, DESC_F_INDIRECT | DESC_F_WRITE)
    make_available(mem, 8, [4])
    chain = device(mem, indirect=True).pop()
    assert chain is not None
    assert chain.head == 4
    assert chain.readable == [(DATA, 3), (DATA + 0x40, 5)]
    assert chain.writable == [(DATA + 0x80, 8)]
    assert (chain.readable_len, chain.writable_len, chain.ring_slots) == (8, 8, 1)


def test_direct_descriptors_then_indirect_table(mem: GuestMemory) -> None:
    # split-ring.tex: the device MUST handle zero or more chained descriptors
    # followed by a single INDIRECT one.
    write_desc(mem, 0, DATA, 4, DESC_F_NEXT, 1)
    write_desc(mem, 1, IND, 32, DESC_F_INDIRECT)
    write_table_desc(mem, IND, 0, DATA + 4, 4, DESC_F_NEXT, 1)
    write_table_desc(mem, IND, 1, DATA + 8, 4, DESC_F_WRITE)
    make_available(mem, 8, [0])
    chain = device(mem, indirect=True).pop()
    assert chain is not None
    assert chain.readable == [(DATA, 4), (DATA + 4, 4)]
    assert chain.writable == [(DATA + 8, 4)]


def test_indirect_table_outside_the_cached_region() -> None:
    memory = GuestMemory()
    memory.add_anonymous(0, 0x40000)
    memory.add_anonymous(0x100000, 0x1000)  # smaller: not the cached region
    try:
        table = 0x100000
        memory.write(table, _DESC_FMT.pack(0x100800, 16, DESC_F_WRITE, 0))
        memory.write(DESC, _DESC_FMT.pack(table, 16, DESC_F_INDIRECT, 0))
        make_available(memory, 8, [0])
        chain = SplitDeviceQueue(memory, 8, DESC, AVAIL, USED, indirect=True).pop()
        assert chain is not None
        assert chain.writable == [(0x100800, 16)]
    finally:
        memory.close()


def test_buffers_in_other_regions_and_across_contiguous_ones() -> None:
    memory = GuestMemory()
    memory.add_anonymous(0, 0x40000)
    memory.add_anonymous(0x40000, 0x1000)  # contiguous with the first
    try:
        queue = SplitDeviceQueue(memory, 8, DESC, AVAIL, USED)
        memory.write(DESC, _DESC_FMT.pack(0x3FF00, 0x200, DESC_F_NEXT, 1))  # spans both
        memory.write(DESC + 16, _DESC_FMT.pack(0x40800, 0x10, DESC_F_WRITE, 0))
        make_available(memory, 8, [0])
        chain = queue.pop()
        assert chain is not None
        assert chain.readable == [(0x3FF00, 0x200)]
        # A region added later is seen by the same queue.
        memory.add_anonymous(0x200000, 0x1000)
        memory.write(DESC + 32, _DESC_FMT.pack(0x200000, 0x1000, 0, 0))
        make_available(memory, 8, [2], start=1)
        chain = queue.pop()
        assert chain is not None
        assert chain.readable == [(0x200000, 0x1000)]
        # And a removed one is refused.
        memory.remove_region(0x200000)
        make_available(memory, 8, [2], start=2)
        pop_error(queue, "outside guest memory")
    finally:
        memory.close()


# -- device side: malformed chains, one test each ----------------------------------


def test_head_index_out_of_range(mem: GuestMemory) -> None:
    make_available(mem, 8, [8])
    pop_error(device(mem), "head 8 >= queue size 8")


def test_next_index_out_of_range(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4, DESC_F_NEXT, 8)
    make_available(mem, 8, [0])
    pop_error(device(mem), "next 8 >= queue size 8")


def test_descriptor_loop(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4, DESC_F_NEXT, 1)
    write_desc(mem, 1, DATA, 4, DESC_F_NEXT, 0)
    make_available(mem, 8, [0])
    pop_error(device(mem), "longer than the queue size")


def test_descriptor_self_loop(mem: GuestMemory) -> None:
    write_desc(mem, 3, DATA, 4, DESC_F_NEXT, 3)
    make_available(mem, 8, [3])
    pop_error(device(mem), "longer than the queue size")


def test_buffer_outside_guest_memory(mem: GuestMemory) -> None:
    write_desc(mem, 0, MEM_SIZE + 0x1000, 4)
    make_available(mem, 8, [0])
    pop_error(device(mem), "outside guest memory")


def test_buffer_running_past_the_end_of_memory(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4, DESC_F_NEXT, 1)
    write_desc(mem, 1, MEM_SIZE - 8, 9, DESC_F_WRITE)
    make_available(mem, 8, [0])
    pop_error(device(mem), "outside guest memory")


def test_buffer_end_overflowing_the_address_space(mem: GuestMemory) -> None:
    write_desc(mem, 0, 2**64 - 16, 32)
    make_available(mem, 8, [0])
    pop_error(device(mem), "overflows 2\\*\\*64")


def test_indirect_without_the_feature(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4)
    write_desc(mem, 0, IND, 16, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=False), "INDIRECT_DESC not negotiated")


def test_nested_indirect(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4, DESC_F_NEXT, 1)
    write_table_desc(mem, IND, 1, IND + 0x100, 16, DESC_F_INDIRECT)
    write_desc(mem, 0, IND, 32, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "nested")


def test_indirect_together_with_next(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4)
    write_desc(mem, 0, IND, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    write_desc(mem, 1, DATA, 4)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "both INDIRECT and NEXT")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_table_length_not_a_multiple_of_16(mem: GuestMemory, length: int) -> None:
    write_desc(mem, 0, IND, length, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "not a non-zero multiple of 16")


def test_indirect_table_too_large(mem: GuestMemory) -> None:
    write_desc(mem, 0, 0, (MAX_QUEUE_SIZE + 1) * 16, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "exceeds 32768")


def test_indirect_table_of_the_maximum_size_accepted() -> None:
    size = MAX_QUEUE_SIZE * 16
    with GuestMemory.anonymous(size + 0x10000) as memory:
        table = 0x10000
        memory.write(table, _DESC_FMT.pack(0, 1, 0, 0))
        memory.write(DESC, _DESC_FMT.pack(table, size, DESC_F_INDIRECT, 0))
        make_available(memory, 8, [0])
        chain = SplitDeviceQueue(memory, 8, DESC, AVAIL, USED, indirect=True).pop()
        assert chain is not None
        assert chain.readable == [(0, 1)]


def test_indirect_table_outside_memory(mem: GuestMemory) -> None:
    write_desc(mem, 0, MEM_SIZE - 16, 32, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "outside guest memory")


def test_indirect_next_out_of_table(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4, DESC_F_NEXT, 2)
    write_table_desc(mem, IND, 1, DATA, 4)
    write_desc(mem, 0, IND, 32, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "next 2 >= table size 2")


def test_indirect_loop(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4, DESC_F_NEXT, 1)
    write_table_desc(mem, IND, 1, DATA, 4, DESC_F_NEXT, 0)
    write_desc(mem, 0, IND, 32, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "indirect chain is longer than its table")


def test_indirect_buffer_outside_memory(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, MEM_SIZE, 4, DESC_F_WRITE)
    write_desc(mem, 0, IND, 16, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "outside guest memory")


def test_readable_after_writable(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
    write_desc(mem, 1, DATA + 4, 4)
    make_available(mem, 8, [0])
    pop_error(device(mem), "readable buffer after a device-writable")


def test_readable_after_writable_inside_indirect_table(mem: GuestMemory) -> None:
    write_table_desc(mem, IND, 0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
    write_table_desc(mem, IND, 1, DATA + 4, 4)
    write_desc(mem, 0, IND, 32, DESC_F_INDIRECT)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "readable buffer after a device-writable")


def test_readable_in_indirect_table_after_writable_direct(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
    write_desc(mem, 1, IND, 16, DESC_F_INDIRECT)
    write_table_desc(mem, IND, 0, DATA + 4, 4)
    make_available(mem, 8, [0])
    pop_error(device(mem, indirect=True), "readable buffer after a device-writable")


def test_available_index_too_far_ahead(mem: GuestMemory) -> None:
    write_desc(mem, 0, DATA, 4)
    mem.write_u16(AVAIL + 2, 9)  # 9 new entries in a queue of 8
    pop_error(device(mem), "more than the queue size 8 ahead")


def test_available_index_moved_backwards(mem: GuestMemory) -> None:
    state = device(mem).state()
    state.update(next_avail=100)
    queue = SplitDeviceQueue.from_state(mem, state)
    mem.write_u16(AVAIL + 2, 99)  # 65535 "ahead"
    pop_error(queue, "ahead of the last seen idx 100")


def test_chain_longer_than_2_to_the_32_bytes() -> None:
    size = 512
    with GuestMemory.anonymous(32 << 20) as memory:
        desc = 0x1000
        avail = desc + 16 * size
        used = 0x4000
        for i in range(300):  # 300 x 16 MiB > 4 GiB
            memory.write(desc + 16 * i, _DESC_FMT.pack(0, 16 << 20, DESC_F_NEXT, i + 1))
        memory.write(desc + 16 * 300, _DESC_FMT.pack(0, 1, 0, 0))
        memory.write_u16(avail + 4, 0)
        memory.write_u16(avail + 2, 1)
        queue = SplitDeviceQueue(memory, size, desc, avail, used)
        pop_error(queue, "more than 2\\*\\*32")


def test_broken_queue_recovers_only_by_rebuilding(mem: GuestMemory) -> None:
    make_available(mem, 8, [8])
    queue = device(mem)
    pop_error(queue, "head 8")
    assert queue.state()["broken"] is True
    assert SplitDeviceQueue.from_state(mem, queue.state()).broken


# -- device side: used ring --------------------------------------------------------


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


def test_add_used_writes_element_then_index(mem: GuestMemory) -> None:
    queue = device(mem)
    first, second = popped(mem, queue, [2, 5])
    queue.add_used(second, 17)
    assert used_elem(mem, 8, 0) == (5, 17)
    assert mem.read_u16(USED + 2) == 1
    queue.add_used(first, 0)
    assert used_elem(mem, 8, 1) == (2, 0)
    assert mem.read_u16(USED + 2) == 2
    assert queue.next_used == 2


def test_add_used_batch_publishes_once(mem: GuestMemory) -> None:
    queue = device(mem)
    chains = popped(mem, queue, [0, 1, 2])
    queue.add_used_batch([(chains[2], 3), (chains[0], 1), (chains[1], 2)])
    assert [used_elem(mem, 8, i) for i in range(3)] == [(2, 3), (0, 1), (1, 2)]
    assert mem.read_u16(USED + 2) == 3
    queue.add_used_batch([])
    assert mem.read_u16(USED + 2) == 3


def test_add_used_rejects_more_bytes_than_writable(mem: GuestMemory) -> None:
    queue = device(mem)
    chains = popped(mem, queue, [0, 1])
    with pytest.raises(ValueError, match="written 257"):
        queue.add_used(chains[0], 257)
    with pytest.raises(ValueError, match="written -1"):
        queue.add_used(chains[0], -1)
    with pytest.raises(ValueError, match="written 300"):
        queue.add_used_batch([(chains[0], 1), (chains[1], 300)])
    assert mem.read_u16(USED + 2) == 0  # nothing was published
    assert queue.next_used == 0


def test_used_index_wraps(mem: GuestMemory) -> None:
    size = 4
    state = device(mem, size).state()
    state.update(next_avail=65535, next_used=65535, signalled_used=65535)
    queue = SplitDeviceQueue.from_state(mem, state)
    chains = popped(mem, queue, [1, 3], start=65535)
    queue.add_used_batch([(c, 1) for c in chains])
    assert mem.read_u16(USED + 2) == 1
    assert used_elem(mem, size, 65535) == (1, 1)
    assert used_elem(mem, size, 0) == (3, 1)


# -- device side: notifications ------------------------------------------------------


def test_used_notification_without_event_idx(mem: GuestMemory) -> None:
    queue = device(mem)
    chains = popped(mem, queue, [0, 1, 2])
    assert not queue.needs_notification()  # nothing used yet
    queue.add_used(chains[0], 0)
    assert queue.needs_notification()
    assert not queue.needs_notification()  # nothing new since the last check
    mem.write_u16(AVAIL, split.VIRTQ_AVAIL_F_NO_INTERRUPT)
    queue.add_used(chains[1], 0)
    assert not queue.needs_notification()
    mem.write_u16(AVAIL, 0)
    queue.add_used(chains[2], 0)
    assert queue.needs_notification()


@pytest.mark.parametrize("start", [0, 100, 65530, 65535])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("event_offset", [-2, -1, 0, 1, 2, 3, 5, 40000])
def test_used_notification_with_event_idx_follows_the_spec_formula(
    mem: GuestMemory, start: int, batch: int, event_offset: int
) -> None:
    size = 8
    state = device(mem, size, event_idx=True).state()
    state.update(next_avail=start, next_used=start, signalled_used=start)
    queue = SplitDeviceQueue.from_state(mem, state)
    chains = popped(mem, queue, list(range(6)), start=start)
    used_event = (start + event_offset) & 0xFFFF
    mem.write_u16(AVAIL + 4 + 2 * size, used_event)
    mem.write_u16(AVAIL, split.VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    old = start
    for offset in range(0, 6, batch):
        queue.add_used_batch([(c, 0) for c in chains[offset : offset + batch]])
        new = queue.next_used
        assert queue.needs_notification() == spec_need_event(used_event, new, old)
        old = new


def test_enable_notifications_without_event_idx(mem: GuestMemory) -> None:
    queue = device(mem)
    queue.disable_notifications()
    assert mem.read_u16(USED) == split.VIRTQ_USED_F_NO_NOTIFY
    assert queue.enable_notifications() is False
    assert mem.read_u16(USED) == 0
    queue.disable_notifications()
    write_desc(mem, 0, DATA, 1)
    make_available(mem, 8, [0])  # the driver added while notifications were off
    assert queue.enable_notifications() is True
    assert queue.pop() is not None
    assert queue.enable_notifications() is False


def test_avail_event_tracks_pops_with_event_idx(mem: GuestMemory) -> None:
    size = 8
    queue = device(mem, size, event_idx=True)
    avail_event = USED + 4 + 8 * size
    popped(mem, queue, [0, 1])
    assert mem.read_u16(avail_event) == 2  # notify me when you add entry 2
    queue.disable_notifications()
    assert mem.read_u16(USED) == 0  # flags stay 0 with EVENT_IDX
    popped(mem, queue, [2], start=2)
    assert mem.read_u16(avail_event) == 2  # no longer advanced
    assert queue.enable_notifications() is False
    assert mem.read_u16(avail_event) == 3
    make_available(mem, size, [3], start=3)
    assert queue.enable_notifications() is True


# -- device side: state ---------------------------------------------------------------


def test_device_state_round_trip(mem: GuestMemory) -> None:
    queue = device(mem, event_idx=True, indirect=True)
    chains = popped(mem, queue, [0, 1, 2])
    queue.add_used(chains[1], 5)
    queue.needs_notification()
    queue.disable_notifications()
    state = queue.state()
    assert json.loads(json.dumps(state)) == state
    assert all(type(v) in (int, bool) for v in state.values())
    clone = SplitDeviceQueue.from_state(mem, state)
    assert clone.state() == state
    clone.add_used(chains[0], 1)
    assert used_elem(mem, 8, 1) == (0, 1)


@pytest.mark.parametrize(
    "change",
    [
        {"size": 3},
        {"next_avail": 65536},
        {"next_used": -1},
        {"broken": 1},
        {"event_idx": "yes"},
        {"desc_addr": 1.5},
    ],
)
def test_device_from_malformed_state(mem: GuestMemory, change: dict[str, object]) -> None:
    state = device(mem).state()
    state.update(change)
    with pytest.raises(VirtqueueError):
        SplitDeviceQueue.from_state(mem, state)


def test_device_from_state_missing_key(mem: GuestMemory) -> None:
    state = device(mem).state()
    del state["signalled_used"]
    with pytest.raises(VirtqueueError, match="signalled_used"):
        SplitDeviceQueue.from_state(mem, state)


# -- driver side -----------------------------------------------------------------------


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


def test_driver_device_round_trip_with_data(mem: GuestMemory) -> None:
    drv = driver(mem)
    dev = device(mem)
    mem.write(DATA, b"ping")
    drv.add([(DATA, 4)], [(DATA + 0x100, 8), (DATA + 0x200, 8)], token=("req", 1))
    assert drv.kick_needed()
    chain = dev.pop()
    assert chain is not None
    assert chain.read_all() == b"ping"
    written = chain.write(b"pong-pong-po")
    dev.add_used(chain, written)
    assert dev.needs_notification()
    assert list(drv.used()) == [(("req", 1), 12)]
    assert mem.read(DATA + 0x100, 8) + mem.read(DATA + 0x200, 4) == b"pong-pong-po"
    assert drv.num_free == 8
    assert drv.in_flight == 0


def test_driver_out_of_order_completion_reuses_descriptors(mem: GuestMemory) -> None:
    drv = driver(mem, 4)
    dev = device(mem, 4)
    drv.add([(DATA, 1)], [(DATA + 1, 1)], "a")
    drv.add([(DATA + 2, 1)], [], "b")
    drv.add([], [(DATA + 3, 1)], "c")
    assert drv.num_free == 0
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 1)], [], "d")
    a, b, c = dev.pop(), dev.pop(), dev.pop()
    assert a is not None and b is not None and c is not None
    dev.add_used_batch([(c, 1), (a, 0)])
    assert list(drv.used()) == [("c", 1), ("a", 0)]
    assert drv.num_free == 3
    drv.add([(DATA, 1)], [(DATA + 1, 1), (DATA + 2, 1)], "d")
    d = dev.pop()
    assert d is not None
    dev.add_used_batch([(d, 2), (b, 0)])
    assert list(drv.used()) == [("d", 2), ("b", 0)]
    assert drv.num_free == 4


def test_driver_tokens_may_be_none_or_repeated(mem: GuestMemory) -> None:
    drv = driver(mem)
    dev = device(mem)
    drv.add([(DATA, 1)], [], None)
    drv.add([(DATA, 1)], [], None)
    chains = [dev.pop(), dev.pop()]
    dev.add_used_batch([(c, 0) for c in chains if c is not None])
    assert list(drv.used()) == [(None, 0), (None, 0)]


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


def test_driver_indirect_tables(mem: GuestMemory) -> None:
    drv = driver(mem, 8, indirect=True, indirect_addr=IND, max_indirect=3)
    dev = device(mem, 8, indirect=True)
    assert drv.indirect and drv.max_indirect == 3
    drv.add([(DATA, 1)], [(DATA + 1, 2), (DATA + 3, 3)], "ind")  # 3 buffers: one table
    assert drv.num_free == 7
    head = mem.read_u16(AVAIL + 4)
    addr, length, flags, _ = _DESC_FMT.unpack(mem.read(DESC + 16 * head, 16))
    assert (addr, length, flags) == (IND + head * 3 * 16, 48, DESC_F_INDIRECT)
    drv.add([(DATA, 1)], [], "single")  # one buffer: direct
    drv.add([(DATA, 1)] * 2, [(DATA, 1)] * 2, "long")  # more than max_indirect: direct
    assert drv.num_free == 2
    chains = [dev.pop() for _ in range(3)]
    assert [len(c.readable) + len(c.writable) for c in chains if c is not None] == [3, 1, 4]
    first = chains[0]
    assert first is not None
    assert first.readable == [(DATA, 1)]
    assert first.writable == [(DATA + 1, 2), (DATA + 3, 3)]
    dev.add_used_batch([(c, c.writable_len) for c in reversed(chains) if c is not None])
    assert list(drv.used()) == [("long", 2), ("single", 0), ("ind", 5)]
    assert drv.num_free == 8


def test_driver_three_entry_tables_rewritten_where_they_changed(mem: GuestMemory) -> None:
    """Three-buffer requests reuse what their head's table already holds
    (a block driver's fixed header and status buffers); whatever changed,
    the device sees exactly the request given, including after a table of
    another length was written over the same head."""
    drv = driver(mem, 4, indirect=True, indirect_addr=IND, max_indirect=4)
    dev = device(mem, 4, indirect=True)
    header, status = (DATA, 16), (DATA + 16, 1)

    def round_trip(
        readable: list[tuple[int, int]], writable: list[tuple[int, int]], token: str
    ) -> None:
        drv.add(readable, writable, token)
        head = mem.read_u16(AVAIL + 4 + 2 * ((mem.read_u16(AVAIL + 2) - 1) % 4))
        assert head == 0  # one request at a time: the same head (and table) every time
        chain = dev.pop()
        assert chain is not None
        assert (chain.readable, chain.writable) == (readable, writable)
        dev.add_used_batch([(chain, chain.writable_len)])
        assert list(drv.used()) == [(token, chain.writable_len)]

    round_trip([header], [(DATA + 512, 512), status], "read")
    round_trip([header, (DATA + 1024, 512)], [status], "write")  # the data entry's flags
    round_trip([header], [(DATA + 512, 256), status], "shorter read")
    round_trip([(DATA + 32, 16)], [(DATA + 512, 512), status], "other header")
    round_trip([header], [(DATA + 512, 512), (DATA + 48, 1)], "other status")
    round_trip([header], [(DATA + 512, 512), status], "read again")
    round_trip([header, (DATA + 1024, 8), (DATA + 2048, 8)], [status], "four")
    round_trip([header], [(DATA + 512, 512), status], "read after four")
    round_trip([header], [status], "two")
    round_trip([header], [(DATA + 512, 512), status], "read after two")
    assert drv.num_free == 4


def test_driver_three_entry_table_errors_leave_the_queue_intact(mem: GuestMemory) -> None:
    drv = driver(mem, 4, indirect=True, indirect_addr=IND, max_indirect=4)
    dev = device(mem, 4, indirect=True)
    header, status = (DATA, 16), (DATA + 16, 1)
    for readable, writable, match in (
        ([header], [(DATA + 512, 0xFFFF_FFFF), status], "exceeds 2\\*\\*32"),
        ([header], [(1 << 64, 512), status], "out of range"),
        ([(1 << 64, 16)], [(DATA + 512, 512), status], "out of range"),
        ([header], [(DATA + 512, 512), (-1, 1)], "out of range"),
    ):
        with pytest.raises(ValueError, match=match):
            drv.add(readable, writable, "bad")
        assert drv.num_free == 4
        assert drv.in_flight == 0
        assert not dev.has_available()
    drv.add([header], [(DATA + 512, 512), status], "good")
    chain = dev.pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == ([header], [(DATA + 512, 512), status])


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


def test_driver_interrupt_suppression_without_event_idx(mem: GuestMemory) -> None:
    drv = driver(mem)
    dev = device(mem)
    drv.disable_interrupts()
    assert mem.read_u16(AVAIL) == split.VIRTQ_AVAIL_F_NO_INTERRUPT
    assert drv.enable_interrupts() is False
    assert mem.read_u16(AVAIL) == 0
    drv.add([(DATA, 1)], [], "a")
    drv.disable_interrupts()
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 0)
    assert not dev.needs_notification()
    assert drv.enable_interrupts() is True  # completed while interrupts were off
    assert list(drv.used()) == [("a", 0)]
    assert drv.enable_interrupts() is False


def test_driver_interrupt_suppression_with_event_idx(mem: GuestMemory) -> None:
    size = 8
    used_event = AVAIL + 4 + 2 * size
    drv = driver(mem, size, event_idx=True)
    dev = device(mem, size, event_idx=True)
    for token in range(4):
        drv.add([(DATA, 1)], [], token)
    chains = [dev.pop() for _ in range(4)]
    dev.add_used(chains[0], 0)  # type: ignore[arg-type]
    assert dev.needs_notification()  # used_event 0 was crossed
    dev.add_used(chains[1], 0)  # type: ignore[arg-type]
    assert not dev.needs_notification()  # the driver has not caught up
    assert next(drv.used()) == (0, 0)
    assert mem.read_u16(used_event) == 1  # used() keeps used_event current
    drv.disable_interrupts()
    assert mem.read_u16(AVAIL) == 0  # flags stay 0 with EVENT_IDX
    assert list(drv.used()) == [(1, 0)]
    dev.add_used(chains[2], 0)  # type: ignore[arg-type]
    assert not dev.needs_notification()
    assert drv.enable_interrupts() is True
    assert mem.read_u16(used_event) == 2
    assert list(drv.used()) == [(2, 0)]
    assert drv.enable_interrupts() is False
    dev.add_used(chains[3], 0)  # type: ignore[arg-type]
    assert dev.needs_notification()


def used_write(mem: GuestMemory, size: int, idx: int, head: int, length: int) -> None:
    base = USED + 4 + 8 * (idx % size)
    mem.write_u32(base, head)
    mem.write_u32(base + 4, length)


def driver_error(drv: SplitDriverQueue, match: str) -> None:
    with pytest.raises(VirtqueueError, match=match):
        list(drv.used())
    assert drv.broken
    with pytest.raises(VirtqueueError, match="broken"):
        list(drv.used())


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


def test_driver_state_and_rebuild(mem: GuestMemory) -> None:
    drv = driver(mem, event_idx=True, indirect=True, indirect_addr=IND, max_indirect=4)
    drv.add([(DATA, 1)], [], "a")
    state = drv.state()
    assert json.loads(json.dumps(state)) == state
    assert all(type(v) in (int, bool) for v in state.values())
    assert state["in_flight"] == 1
    with pytest.raises(ValueError, match="nothing in flight"):
        SplitDriverQueue.from_state(mem, state)
    dev = device(mem, event_idx=True, indirect=True)
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 0)
    assert list(drv.used()) == [("a", 0)]
    state = drv.state()
    clone = SplitDriverQueue.from_state(mem, state)
    assert clone.state() == state
    with pytest.raises(ValueError, match="avail_idx != last_used"):
        SplitDriverQueue.from_state(mem, {**state, "avail_idx": 5})
    with pytest.raises(VirtqueueError, match="kick_marker"):
        SplitDriverQueue.from_state(mem, {**state, "kick_marker": 70000})
    clone.add([(DATA, 1)], [(DATA, 1), (DATA, 1)], "b")
    chain = dev.pop()
    assert chain is not None
    assert len(chain.writable) == 2
    dev.add_used(chain, 2)
    assert list(clone.used()) == [("b", 2)]


def test_used_iteration_can_stop_early_and_interleave_with_add(mem: GuestMemory) -> None:
    drv = driver(mem, 4)
    dev = device(mem, 4)
    for token in "abcd":
        drv.add([(DATA, 1)], [], token)
    dev.add_used_batch([(c, 0) for c in iter(dev.pop, None)])
    got = []
    for token, _ in drv.used():
        got.append(token)
        drv.add([(DATA, 1)], [], token.upper())  # refill from inside the loop
        if len(got) == 2:
            break
    assert got == ["a", "b"]
    assert [t for t, _ in drv.used()] == ["c", "d"]
    assert drv.in_flight == 2


def test_big_endian_fallback_gives_identical_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> bytes:
        with GuestMemory.anonymous(MEM_SIZE) as memory:
            drv = SplitDriverQueue(memory, 8, DESC, AVAIL, USED, event_idx=True)
            dev = SplitDeviceQueue(memory, 8, DESC, AVAIL, USED, event_idx=True)
            for round_ in range(3):
                for i in range(4):
                    drv.add([(DATA + i, 1)], [(DATA + 0x100 + i, 4)], (round_, i))
                drv.kick_needed()
                dev.add_used_batch([(c, 3) for c in iter(dev.pop, None)])
                dev.needs_notification()
                assert [t for t, _ in drv.used()] == [(round_, i) for i in range(4)]
                drv.enable_interrupts()
                dev.enable_notifications()
            return memory.read(0, 0x4000)

    native = run()
    monkeypatch.setattr(ring, "NATIVE_LITTLE", False)
    assert run() == native


def test_disabled_interrupts_stay_quiet_with_event_idx(mem: GuestMemory) -> None:
    # The device checked after its first completion but not its second; the
    # driver then consumed both and disabled interrupts.  used_event must be
    # out of reach of the device's [old, new) window, not just behind it.
    size = 8
    drv = driver(mem, size, event_idx=True)
    dev = device(mem, size, event_idx=True)
    for token in range(3):
        drv.add([(DATA, 1)], [], token)
    chains = list(iter(dev.pop, None))
    dev.add_used(chains[0], 0)
    assert dev.needs_notification()
    dev.add_used(chains[1], 0)
    assert [t for t, _ in drv.used()] == [0, 1]
    drv.disable_interrupts()
    dev.add_used(chains[2], 0)
    assert not dev.needs_notification()
    assert drv.enable_interrupts() is True


def test_unexpected_parse_failures_become_virtqueue_errors(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_unpack(buffer: object, offset: int = 0) -> tuple[int, int, int, int]:
        raise struct.error("unpack_from requires a buffer of at least 16 bytes")

    monkeypatch.setattr(split_device, "_unpack_desc", broken_unpack)
    make_available(mem, 8, [0])
    pop_error(device(mem), "malformed virtqueue: unpack_from")


def test_non_integer_geometry_rejected(mem: GuestMemory) -> None:
    with pytest.raises(VirtqueueError, match="not an integer"):
        SplitDeviceQueue(mem, 8.0, DESC, AVAIL, USED)  # type: ignore[arg-type]
    with pytest.raises(VirtqueueError, match="not an integer"):
        SplitDeviceQueue(mem, 8, DESC, None, USED)  # type: ignore[arg-type]


def test_add_used_rejects_a_foreign_chain(mem: GuestMemory) -> None:
    queue = device(mem)
    foreign = DescriptorChain(mem, 8, [], [], 0, 0)
    with pytest.raises(ValueError, match="head 8"):
        queue.add_used(foreign, 0)
    with pytest.raises(ValueError, match="head 8"):
        queue.add_used_batch([(foreign, 0)])


def test_driver_rejects_requests_over_2_to_the_32_bytes(mem: GuestMemory) -> None:
    big = 2**32 - 1
    drv = driver(mem, 8, indirect=True, indirect_addr=IND, max_indirect=2)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*32"):
        drv.add([(DATA, big)], [(DATA, big)], "indirect")
    with pytest.raises(ValueError, match="exceeds 2\\*\\*32"):
        drv.add([(DATA, big)], [(DATA, 1), (DATA, big)], "direct")
    assert (drv.num_free, drv.in_flight) == (8, 0)
    drv.add([(DATA, big)], [(DATA, 1)], "fits")


def test_reprs_and_has_used(mem: GuestMemory) -> None:
    drv = driver(mem)
    dev = device(mem)
    drv.add([(DATA, 1)], [], "a")
    assert "in_flight=1" in repr(drv)
    assert not drv.has_used()
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 0)
    assert "next_used=1" in repr(dev)
    assert drv.has_used()
    assert list(drv.used()) == [("a", 0)]
    assert not drv.has_used()


def test_nested_used_iterations_do_not_double_return(mem: GuestMemory) -> None:
    drv = driver(mem, 4)
    dev = device(mem, 4)
    for token in "abcd":
        drv.add([(DATA, 1)], [], token)
    dev.add_used_batch([(c, 0) for c in iter(dev.pop, None)])
    outer = drv.used()
    assert next(outer) == ("a", 0)
    assert next(drv.used()) == ("b", 0)  # a second iterator takes the next one
    assert [t for t, _ in outer] == ["c", "d"]
    assert drv.num_free == 4


# -- ring positions, for hosts ---------------------------------------------------------------


def test_device_resumes_at_positions_a_host_sets(mem: GuestMemory) -> None:
    # A host that learns where the rings stand (vhost-user SET_VRING_BASE)
    # moves a fresh queue there instead of editing its state dict.
    size = 8
    drv = driver(mem, size, event_idx=True)
    dev = device(mem, size, event_idx=True)
    for token in range(5):
        drv.add([(DATA + token, 1)], [], token)
    for chain in list(iter(dev.pop, None)):
        dev.add_used(chain, 0)
    assert [t for t, _ in drv.used()] == [0, 1, 2, 3, 4]
    drv.add([], [(DATA, 4)], "next")
    resumed = device(mem, size, event_idx=True)
    resumed.next_avail = dev.next_avail
    resumed.next_used = dev.next_used
    assert (resumed.next_avail, resumed.next_used) == (5, 5)
    chain = resumed.pop()
    assert chain is not None and chain.writable == [(DATA, 4)]
    assert resumed.pop() is None
    resumed.add_used(chain, 4)
    # The notification marker moved with next_used: the completion at 5 counts.
    assert resumed.needs_notification()
    assert list(drv.used()) == [("next", 4)]


def test_moving_next_avail_forgets_chains_read_ahead(mem: GuestMemory) -> None:
    for index in range(16):
        write_desc(mem, index, DATA, index + 1)
    make_available(mem, 16, list(range(12)))  # enough to be read ahead
    queue = device(mem, 16)
    first = queue.pop()
    assert first is not None and first.head == 0
    queue.next_avail = 0
    again = queue.pop()
    assert again is not None and again.head == 0 and queue.next_avail == 1


@pytest.mark.parametrize("bad", [-1, 0x10000, True, 1.0])
def test_ring_positions_must_be_16_bit_indices(mem: GuestMemory, bad: object) -> None:
    queue = device(mem)
    with pytest.raises(ValueError, match="16-bit ring index"):
        queue.next_avail = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="16-bit ring index"):
        queue.next_used = bad  # type: ignore[assignment]
    assert (queue.next_avail, queue.next_used) == (0, 0)


def test_region_removed_after_a_pop_is_refused_on_the_next(mem: GuestMemory) -> None:
    # The ring's cached region window is dropped when the table changes.
    extra = 0x100000
    mem.add_anonymous(extra, 0x10000)
    drv = driver(mem)
    dev = device(mem)
    drv.add([(extra, 16)], [], "big")
    assert dev.pop() is not None
    mem.remove_region(extra)
    drv.add([(extra, 16)], [], "gone")
    pop_error(dev, "outside guest memory")
