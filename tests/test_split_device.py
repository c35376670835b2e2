"""Unit tests of the split ring's device side (split_device.py).

Device-side cases are built from raw bytes written into guest memory, so each
malformation the driver could produce is exercised exactly; driver-side cases
play the device by writing the used ring by hand.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence

import pytest

from helpers.queues import assert_chain, pop_error
from helpers.split import (
    _DESC_FMT,
    AVAIL,
    DATA,
    DESC,
    IND,
    MEM_SIZE,
    USED,
    device,
    make_available,
    popped,
    spec_need_event,
    used_elem,
    write_desc,
    write_table_desc,
)
from pyvirtio.compiled import is_compiled
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import split, split_device
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    DescriptorChain,
    VirtqueueError,
)
from pyvirtio.virtqueue.split import (
    SplitDeviceQueue,
    area_sizes,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as memory:
        yield memory


@pytest.mark.parametrize("size", [1, 2, 4, 256, 32768])
def test_valid_sizes_accepted(size: int) -> None:
    desc_len, avail_len, _ = area_sizes(size)
    with GuestMemory.anonymous(1 << 20) as memory:
        queue = SplitDeviceQueue(memory, size, 0, desc_len, (desc_len + avail_len + 3) & ~3)
        assert queue.size == size
        assert not queue.broken
        assert not queue.event_idx
        assert not queue.indirect


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


def test_popped_chains_hold_every_field(mem: GuestMemory) -> None:
    write_desc(mem, 1, DATA, 7)
    write_desc(mem, 2, DATA + 64, 9, DESC_F_WRITE)
    write_desc(mem, 3, DATA, 1, DESC_F_NEXT, 4)
    write_desc(mem, 4, DATA + 64, 2, DESC_F_WRITE)
    make_available(mem, 8, [1, 2, 3])
    queue = device(mem)
    for expected in (
        DescriptorChain(mem, 1, [(DATA, 7)], [], 7, 0),
        DescriptorChain(mem, 2, [], [(DATA + 64, 9)], 0, 9),
        # ring_slots: the descriptors of the table the chain holds.
        DescriptorChain(mem, 3, [(DATA, 1)], [(DATA + 64, 2)], 1, 2, 2),
    ):
        assert_chain(queue.pop(), expected)


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
    assert (chain.readable_len, chain.writable_len, chain.ring_slots) == (7, 16, 4)
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
    assert chain.ring_slots == 2  # the direct descriptor and the one naming the table


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


@pytest.mark.skipif(
    is_compiled("pyvirtio.virtqueue.split_device"),
    reason="patches _unpack_desc, a Final the compiled module binds when it is built",
)
def test_unexpected_parse_failures_become_virtqueue_errors(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_unpack(buffer: object, offset: int = 0) -> tuple[int, int, int, int]:
        raise struct.error("unpack_from requires a buffer of at least 16 bytes")

    monkeypatch.setattr(split_device, "_unpack_desc", broken_unpack)
    make_available(mem, 8, [0])
    pop_error(device(mem), "malformed virtqueue: unpack_from")


def test_non_integer_geometry_rejected(mem: GuestMemory) -> None:
    # Compiled, the constructor's int annotations are checked at the call,
    # before its own validation (ARCHITECTURE.md, "Compiled build").
    compiled = is_compiled("pyvirtio.virtqueue.split_device")
    error, match = (
        (TypeError, "int object expected") if compiled else (VirtqueueError, "not an integer")
    )
    with pytest.raises(error, match=match):
        SplitDeviceQueue(mem, 8.0, DESC, AVAIL, USED)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        SplitDeviceQueue(mem, 8, DESC, None, USED)  # type: ignore[arg-type]


def test_add_used_rejects_a_foreign_chain(mem: GuestMemory) -> None:
    queue = device(mem)
    foreign = DescriptorChain(mem, 8, [], [], 0, 0)
    with pytest.raises(ValueError, match="head 8"):
        queue.add_used(foreign, 0)
    with pytest.raises(ValueError, match="head 8"):
        queue.add_used_batch([(foreign, 0)])


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


# -- inflight recording (the hook vhost-user's inflight tracking plugs into) ----------------


class _Recorder:
    """Records the hook calls, and what the used idx was at each."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.calls: list[tuple[str, object, int]] = []

    def pop(self, head: int) -> None:
        self.calls.append(("pop", head, self.mem.read_u16(USED + 2)))

    def before_publish(self, heads: Sequence[int]) -> None:
        self.calls.append(("before", list(heads), self.mem.read_u16(USED + 2)))

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        self.calls.append(("after", (list(heads), used_idx), self.mem.read_u16(USED + 2)))


def test_inflight_hook_sees_every_pop_and_brackets_the_used_idx_store(mem: GuestMemory) -> None:
    queue = device(mem)
    recorder = _Recorder(mem)
    queue.inflight = recorder
    chains = popped(mem, queue, [3, 1, 5])
    assert recorder.calls == [("pop", 3, 0), ("pop", 1, 0), ("pop", 5, 0)]
    recorder.calls.clear()
    queue.add_used(chains[1], 4)  # one completion takes the recorded (batch) path
    queue.add_used_batch([(chains[2], 0), (chains[0], 8)])
    assert recorder.calls == [
        ("before", [1], 0),  # the element is written, the idx not yet published
        ("after", ([1], 1), 1),
        ("before", [5, 3], 1),
        ("after", ([5, 3], 3), 3),
    ]
    assert [used_elem(mem, 8, i) for i in range(3)] == [(1, 4), (5, 0), (3, 8)]


def test_resubmitted_heads_go_first_through_the_one_walker(mem: GuestMemory) -> None:
    queue = device(mem)
    chains = popped(mem, queue, [0, 1, 2, 3])
    # A new owner of the ring: 0 and 2 completed, 3 and 1 (in that order) in flight.
    queue.add_used_batch([(chains[0], 0), (chains[2], 0)])
    write_desc(mem, 6, DATA, 0x100, DESC_F_WRITE)
    make_available(mem, 8, [6], start=4)
    restarted = device(mem)
    restarted.next_used = 2
    restarted.next_avail = 2
    recorder = _Recorder(mem)
    restarted.inflight = recorder
    restarted.resubmit([3, 1])
    heads = []
    while (chain := restarted.pop()) is not None:
        heads.append(chain.head)
    assert heads == [3, 1, 6]
    assert restarted.next_avail == 5
    assert [call[1] for call in recorder.calls] == [3, 1, 6]
    with pytest.raises(ValueError, match="outside a queue of 8"):
        restarted.resubmit([8])


def test_untracked_queue_has_no_recorder(mem: GuestMemory) -> None:
    queue = device(mem)
    assert queue.inflight is None
    (chain,) = popped(mem, queue, [2])
    queue.add_used(chain, 1)
    assert mem.read_u16(USED + 2) == 1
