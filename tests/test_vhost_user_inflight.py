"""The inflight region (vhost-user.rst "Inflight I/O tracking") against bytes laid out by hand.

Every region here is built with explicit struct formats copied from the spec's
C structures, not with the module's own layout constants, so a layout slip in
the module fails these tests.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from pyvirtio.transport.vhost_user import inflight as inflight_module
from pyvirtio.transport.vhost_user.inflight import (
    InflightError,
    PackedDescriptor,
    PackedInflight,
    SplitInflight,
    allocation_geometry,
    check_geometry,
    queue_region,
    recover_packed,
    recover_split,
)

# QueueRegionSplit / DescStateSplit, as the spec's C declares them.
SPLIT_HEADER = "<QHHHH"  # features, version, desc_num, last_batch_head, used_idx
SPLIT_DESC = "<B5xHQ"  # inflight, padding[5], next, counter
# QueueRegionPacked (29 bytes of fields, desc[] at 32) / DescStatePacked.
PACKED_HEADER = "<QHHHHHHBB7x"
PACKED_DESC = "<BxHHHQHHIQ"  # inflight, pad, next, last, num, counter, id, flags, len, addr
AVAIL = 1 << 7
USED = 1 << 15


def split_region(
    size: int,
    *,
    version: int = 1,
    desc_num: int | None = None,
    last_batch_head: int = 0,
    used_idx: int = 0,
    descs: dict[int, tuple[int, int, int]] | None = None,
    features: int = 0,
) -> bytearray:
    region = bytearray(16 + 16 * size)
    struct.pack_into(
        SPLIT_HEADER,
        region,
        0,
        features,
        version,
        size if desc_num is None else desc_num,
        last_batch_head,
        used_idx,
    )
    for index, (inflight, next_, counter) in (descs or {}).items():
        struct.pack_into(SPLIT_DESC, region, 16 + 16 * index, inflight, next_, counter)
    return region


def split_desc(region: bytearray, index: int) -> tuple[int, int, int]:
    inflight, next_, counter = struct.unpack_from(SPLIT_DESC, region, 16 + 16 * index)
    return inflight, next_, counter


def split_header(region: bytearray) -> tuple[int, int, int, int, int]:
    fields: tuple[int, int, int, int, int] = struct.unpack_from(SPLIT_HEADER, region, 0)
    return fields


# ---------------------------------------------------------------- geometry


def test_allocation_geometry_fits_either_layout_and_is_cache_line_aligned() -> None:
    geometry = allocation_geometry(num_queues=2, queue_size=128)
    assert geometry.queue_region_size % 64 == 0
    assert geometry.queue_region_size >= 32 + 32 * 128  # packed
    assert geometry.mmap_size == 2 * geometry.queue_region_size


def test_check_geometry_accepts_libvhost_user_sized_region() -> None:
    # libvhost-user: ALIGN_UP(16 * queue_size + 2, 64) per queue.
    stride = (16 * 128 + 2 + 63) // 64 * 64
    geometry = check_geometry(2 * stride, 0, 2, 128, fd_size=2 * stride)
    assert geometry.queue_region_size == stride


@pytest.mark.parametrize(
    ("mmap_size", "mmap_offset", "num_queues", "queue_size", "fd_size", "message"),
    [
        (8192, 0, 1, 128, 4096, "past its fd"),  # fd too small
        (4096, 4096, 1, 128, 4096, "past its fd"),  # offset beyond the fd
        (1000, 0, 1, 128, 1 << 20, "too small"),  # region too small for the queue
        (0, 0, 1, 128, 4096, "mmap_size"),
        (1 << 40, 0, 1, 128, 1 << 41, "mmap_size"),  # absurd size never mapped
        (4096, 0, 0, 128, 4096, "0 queues"),
        (4096, 0, 1, 0, 4096, "0 descriptors"),
        (1 << 22, 0, 1, 40000, 1 << 22, "40000 descriptors"),
    ],
)
def test_check_geometry_refuses(
    mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, fd_size: int, message: str
) -> None:
    with pytest.raises(InflightError, match=message):
        check_geometry(mmap_size, mmap_offset, num_queues, queue_size, fd_size)


def test_queue_region_slices_per_queue() -> None:
    geometry = check_geometry(3 * 2112, 0, 3, 128, fd_size=3 * 2112)
    buffer = memoryview(bytearray(geometry.mmap_size))
    buffer[2112] = 7
    assert queue_region(buffer, geometry, 1)[0] == 7
    assert len(queue_region(buffer, geometry, 2)) == 2112
    with pytest.raises(InflightError):
        queue_region(buffer, geometry, 3)


# ---------------------------------------------------------------- split


def test_fresh_split_region_is_initialised_and_has_nothing_to_resubmit() -> None:
    region = bytearray(16 + 16 * 8)
    recovery = recover_split(memoryview(region), 8, ring_used_idx=0, ring_avail_idx=0)
    assert recovery.resubmit == ()
    assert recovery.next_avail == 0
    assert split_header(region) == (0, 1, 8, 0, 0)


def test_split_tracking_writes_the_spec_fields() -> None:
    region = bytearray(16 + 16 * 8)
    recovery = recover_split(memoryview(region), 8, 0, 0)
    tracker = SplitInflight(memoryview(region), 8, recovery.next_counter)
    tracker.pop(5)
    tracker.pop(2)
    tracker.pop(7)
    assert split_desc(region, 5) == (1, 0, 0)
    assert split_desc(region, 2) == (1, 0, 1)
    assert split_desc(region, 7) == (1, 0, 2)
    # Complete 2 then 7 in one batch, out of order: 5 stays in flight.
    tracker.before_publish([2, 7])
    assert split_header(region)[3] == 7  # last_batch_head
    assert split_desc(region, 7)[1] == 2  # next links the batch
    tracker.after_publish([2, 7], used_idx=2)
    assert split_desc(region, 2)[0] == 0 and split_desc(region, 7)[0] == 0
    assert split_header(region)[4] == 2
    # The back end dies here: a new one resubmits only 5, and takes the next
    # available entry after the three it had taken.
    recovery = recover_split(memoryview(region), 8, ring_used_idx=2, ring_avail_idx=4)
    assert recovery.resubmit == (5,)
    assert recovery.next_avail == 3
    assert not recovery.repaired_batch
    assert recovery.next_counter == 1


def test_split_resubmits_in_counter_order_not_index_order() -> None:
    region = split_region(
        8, used_idx=10, descs={1: (1, 0, 42), 3: (1, 0, 40), 6: (1, 0, 41), 4: (0, 0, 1)}
    )
    recovery = recover_split(memoryview(region), 8, ring_used_idx=10, ring_avail_idx=14)
    assert recovery.resubmit == (3, 6, 1)
    assert recovery.next_avail == 13
    assert recovery.next_counter == 43


def test_split_crash_after_publishing_used_idx_repairs_the_last_batch() -> None:
    # Batch {4, 6} was published (ring used idx 12) but the back end died
    # before clearing inflight and recording used_idx (still 10).
    region = split_region(
        8,
        last_batch_head=6,
        used_idx=10,
        descs={6: (1, 4, 9), 4: (1, 1, 8), 1: (1, 0, 7), 2: (1, 0, 10)},
    )
    recovery = recover_split(memoryview(region), 8, ring_used_idx=12, ring_avail_idx=14)
    assert recovery.repaired_batch
    # 4 and 6 were completed; 1 was in an earlier batch's list but is still
    # in flight (the batch is only as long as the used index moved).
    assert recovery.resubmit == (1, 2)
    assert split_desc(region, 6)[0] == 0 and split_desc(region, 4)[0] == 0
    assert split_desc(region, 1)[0] == 1
    assert split_header(region)[4] == 12
    assert recovery.next_avail == 14


def test_split_crash_between_used_element_and_used_idx_resubmits_it() -> None:
    # The used element for 3 was written into the used ring, but the ring's
    # idx was not advanced: the driver never saw it, so it is still in flight
    # and served again exactly once.
    region = bytearray(16 + 16 * 4)
    view = memoryview(region)
    recover_split(view, 4, 0, 0)
    tracker = SplitInflight(view, 4, 0)
    tracker.pop(3)
    tracker.pop(0)
    tracker.before_publish([3])  # used element written, idx not yet published
    recovery = recover_split(view, 4, ring_used_idx=0, ring_avail_idx=2)
    assert not recovery.repaired_batch
    assert recovery.resubmit == (3, 0)
    assert recovery.next_avail == 2


def test_split_tracker_continues_counters_after_recovery() -> None:
    region = split_region(4, used_idx=3, descs={2: (1, 0, 100)})
    view = memoryview(region)
    recovery = recover_split(view, 4, 3, 5)
    tracker = SplitInflight(view, 4, recovery.next_counter)
    tracker.pop(1)
    assert split_desc(region, 1) == (1, 0, 101)
    assert recover_split(view, 4, 3, 5).resubmit == (2, 1)


@pytest.mark.parametrize(
    ("region", "used", "avail", "message"),
    [
        (split_region(8, version=2), 0, 0, "version 2"),
        (split_region(8, features=1), 0, 0, "features"),
        (split_region(8, desc_num=16), 0, 0, "16 descriptors, the ring has 8"),
        (split_region(8, desc_num=4), 0, 0, "4 descriptors, the ring has 8"),
        (split_region(8, descs={1: (2, 0, 0)}), 0, 1, "inflight byte 2"),
        (split_region(8, descs={1: (1, 0, 5), 2: (1, 0, 5)}), 0, 2, "repeats counter 5"),
        # More in flight than the driver ever made available.
        (split_region(8, descs={1: (1, 0, 1), 2: (1, 0, 2)}), 0, 1, "only 1 are available"),
        # The used index ran further ahead than a ring can hold.
        (split_region(8, used_idx=0), 9, 9, "more than the ring"),
        # The last batch list leaves the ring.
        (split_region(8, last_batch_head=1, descs={1: (1, 99, 0)}), 2, 2, "links to descriptor 99"),
    ],
)
def test_split_hostile_region_is_refused_and_left_alone(
    region: bytearray, used: int, avail: int, message: str
) -> None:
    before = bytes(region)
    with pytest.raises(InflightError, match=message):
        recover_split(memoryview(region), 8, ring_used_idx=used, ring_avail_idx=avail)
    assert bytes(region) == before


def test_split_region_too_small_for_the_ring_is_refused() -> None:
    with pytest.raises(InflightError, match="cannot hold 8"):
        recover_split(memoryview(bytearray(16 + 16 * 7)), 8, 0, 0)


def test_split_used_index_wraps() -> None:
    region = split_region(8, used_idx=0xFFFF, last_batch_head=3, descs={3: (1, 0, 1), 5: (1, 0, 2)})
    recovery = recover_split(memoryview(region), 8, ring_used_idx=0, ring_avail_idx=2)
    assert recovery.repaired_batch
    assert recovery.resubmit == (5,)
    assert recovery.next_avail == 1


# ---------------------------------------------------------------- packed


def packed_header(region: bytearray) -> tuple[int, ...]:
    fields: tuple[int, ...] = struct.unpack_from(PACKED_HEADER, region, 0)
    return fields


def packed_desc(region: bytearray, index: int) -> tuple[int, ...]:
    fields: tuple[int, ...] = struct.unpack_from(PACKED_DESC, region, 32 + 32 * index)
    return fields


def fresh_packed(size: int) -> tuple[bytearray, PackedInflight]:
    region = bytearray(32 + 32 * size)
    view = memoryview(region)
    recovery = recover_packed(view, size, lambda slot: 0)
    return region, PackedInflight(view, size, recovery)


def test_fresh_packed_region_has_a_free_list_and_wrap_counters_set() -> None:
    region, _ = fresh_packed(4)
    # features, version, desc_num, free_head, old_free_head, used_idx,
    # old_used_idx, used_wrap_counter, old_used_wrap_counter
    assert packed_header(region) == (0, 1, 4, 0, 0, 0, 0, 1, 1)
    assert [packed_desc(region, i)[1] for i in range(4)] == [1, 2, 3, 4]


def test_packed_tracking_writes_the_spec_fields() -> None:
    region, tracker = fresh_packed(4)
    chain = [PackedDescriptor(0x1000, 16, 9, 1), PackedDescriptor(0x2000, 512, 9, 2)]
    head = tracker.pop(chain)
    assert head == 0
    # inflight, next, last, num, counter, id, flags, len, addr
    assert packed_desc(region, 0) == (1, 1, 1, 2, 0, 9, 1, 16, 0x1000)
    assert packed_desc(region, 1)[5:] == (9, 2, 512, 0x2000)
    assert packed_header(region)[3:5] == (2, 2)  # free_head, old_free_head
    second = tracker.pop([PackedDescriptor(0x3000, 4, 3, 2)])
    assert second == 2
    # Complete the second chain (buffer ID 3) first: out of order.
    tracker.before_publish([3])
    assert packed_header(region)[3] == 2  # free_head is the completed entry
    assert packed_desc(region, 2)[1] == 3  # its last links to the old free head
    assert packed_header(region)[5] == 1  # used_idx advanced by the chain length
    tracker.after_publish([3])
    assert packed_desc(region, 2)[0] == 0
    assert packed_header(region)[3:] == (2, 2, 1, 1, 1, 1)


def test_packed_recovery_resubmits_the_stored_descriptors_in_counter_order() -> None:
    region, tracker = fresh_packed(8)
    first = tracker.pop([PackedDescriptor(0xA000, 16, 1, 1), PackedDescriptor(0xB000, 8, 1, 2)])
    tracker.pop([PackedDescriptor(0xC000, 16, 2, 2)])
    third = tracker.pop([PackedDescriptor(0xD000, 16, 3, 2)])
    tracker.before_publish([2])
    tracker.after_publish([2])
    recovery = recover_packed(memoryview(region), 8, lambda slot: 0)
    assert [entry for entry, _ in recovery.resubmit] == [first, third]
    assert recovery.resubmit[0][1] == (
        PackedDescriptor(0xA000, 16, 1, 1),
        PackedDescriptor(0xB000, 8, 1, 2),
    )
    # Four descriptors taken, one completed: used at 1, next available at 4.
    assert (recovery.used_idx, recovery.used_wrap) == (1, True)
    assert (recovery.next_avail, recovery.next_avail_wrap) == (4, True)
    assert recovery.next_counter == 3


def test_packed_crash_mid_completion_rolls_back_when_not_published() -> None:
    region, tracker = fresh_packed(4)
    head = tracker.pop([PackedDescriptor(0x1000, 4, 0, 2)])
    tracker.before_publish([0])  # used flags not yet written in the ring
    slot_flags = AVAIL  # slot 0 still looks available in wrap 1
    recovery = recover_packed(memoryview(region), 4, lambda slot: slot_flags)
    assert not recovery.committed_batch
    assert [entry for entry, _ in recovery.resubmit] == [head]
    assert (recovery.used_idx, recovery.next_avail) == (0, 1)


def test_packed_crash_mid_completion_commits_when_published() -> None:
    region, tracker = fresh_packed(4)
    head = tracker.pop([PackedDescriptor(0x1000, 4, 0, 2)])
    tracker.before_publish([0])
    seen: list[int] = []

    def flags(slot: int) -> int:
        seen.append(slot)
        return AVAIL | USED  # the device wrote the used flags in wrap 1

    recovery = recover_packed(memoryview(region), 4, flags)
    assert seen == [0]
    assert recovery.committed_batch
    assert recovery.resubmit == ()
    assert (recovery.used_idx, recovery.next_avail) == (1, 1)
    assert packed_desc(region, head)[0] == 0


def test_packed_positions_wrap() -> None:
    region, tracker = fresh_packed(2)
    for _ in range(3):
        tracker.pop([PackedDescriptor(0x1000, 4, 0, 2)])
        tracker.before_publish([0])
        tracker.after_publish([0])
    assert packed_header(region)[5:] == (1, 1, 0, 0)  # used_idx 1 in wrap 0
    head = tracker.pop([PackedDescriptor(0x1000, 4, 0, 2)])
    recovery = recover_packed(memoryview(region), 2, lambda slot: 0)
    assert (recovery.used_idx, recovery.used_wrap) == (1, False)
    assert (recovery.next_avail, recovery.next_avail_wrap) == (0, True)
    assert [entry for entry, _ in recovery.resubmit] == [head]


def test_packed_pop_beyond_the_ring_is_refused_before_writing() -> None:
    region, tracker = fresh_packed(2)
    tracker.pop([PackedDescriptor(0, 1, 0, 0), PackedDescriptor(0, 1, 0, 0)])
    before = bytes(region)
    with pytest.raises(InflightError, match="already in flight"):
        tracker.pop([PackedDescriptor(0, 1, 1, 0)])
    assert bytes(region) == before


def packed_region(
    size: int, header: tuple[int, ...], descs: dict[int, tuple[int, ...]]
) -> bytearray:
    region = bytearray(32 + 32 * size)
    struct.pack_into(PACKED_HEADER, region, 0, *header)
    for index in range(size):
        struct.pack_into(
            PACKED_DESC,
            region,
            32 + 32 * index,
            *descs.get(index, (0, index + 1, 0, 0, 0, 0, 0, 0, 0)),
        )
    return region


@pytest.mark.parametrize(
    ("header", "descs", "message"),
    [
        ((0, 3, 4, 0, 0, 0, 0, 1, 1), {}, "version 3"),
        ((0, 1, 9, 0, 0, 0, 0, 1, 1), {}, "9 descriptors"),
        ((0, 1, 4, 7, 7, 0, 0, 1, 1), {}, "free_head 7"),
        ((0, 1, 4, 0, 0, 4, 4, 1, 1), {}, "used_idx 4"),
        ((0, 1, 4, 0, 0, 0, 0, 2, 2), {}, "used_wrap_counter 2"),
        # Free list loops.
        ((0, 1, 4, 0, 0, 0, 0, 1, 1), {1: (0, 0, 0, 0, 0, 0, 0, 0, 0)}, "loops"),
        # Free list leaves the ring.
        ((0, 1, 4, 0, 0, 0, 0, 1, 1), {0: (0, 9, 0, 0, 0, 0, 0, 0, 0)}, "links to entry 9"),
        # An in-flight chain whose length is out of range.
        (
            (0, 1, 4, 1, 1, 0, 0, 1, 1),
            {0: (1, 4, 0, 9, 0, 0, 0, 0, 0), 3: (0, 4, 0, 0, 0, 0, 0, 0, 0)},
            "chain of 9",
        ),
        # An in-flight chain running into the free list.
        ((0, 1, 4, 1, 1, 0, 0, 1, 1), {0: (1, 1, 1, 2, 0, 0, 0, 0, 0)}, "twice or out of range"),
        # A chain whose last does not match its links.
        (
            (0, 1, 4, 1, 1, 0, 0, 1, 1),
            {0: (1, 4, 3, 1, 0, 0, 0, 0, 0), 3: (0, 4, 0, 0, 0, 0, 0, 0, 0)},
            "last 3",
        ),
        # Two chains with the same counter.
        (
            (0, 1, 4, 2, 2, 0, 0, 1, 1),
            {0: (1, 9, 0, 1, 5, 0, 0, 0, 0), 1: (1, 9, 1, 1, 5, 1, 0, 0, 0)},
            "repeats counter 5",
        ),
        # Two chains with the same buffer ID: completions could not tell them apart.
        (
            (0, 1, 4, 2, 2, 0, 0, 1, 1),
            {0: (1, 9, 0, 1, 5, 7, 0, 0, 0), 1: (1, 9, 1, 1, 6, 7, 0, 0, 0)},
            "buffer ID 7 is in flight twice",
        ),
        # A two-descriptor chain whose first descriptor lacks NEXT: the ring
        # walker would take it as two chains of one.
        (
            (0, 1, 4, 2, 2, 0, 0, 1, 1),
            {0: (1, 1, 1, 2, 5, 7, 0, 0, 0), 1: (0, 9, 0, 0, 0, 7, 0, 0, 0)},
            "descriptor 0 of 2 lacks the NEXT flag",
        ),
        # A one-descriptor chain with NEXT: it would swallow the next slot.
        (
            (0, 1, 4, 1, 1, 0, 0, 1, 1),
            {0: (1, 9, 0, 1, 5, 7, 1, 0, 0)},
            "descriptor 0 of 1 has the NEXT flag",
        ),
        # INDIRECT inside a NEXT-linked chain.
        (
            (0, 1, 4, 2, 2, 0, 0, 1, 1),
            {0: (1, 1, 1, 2, 5, 7, 1 | 4, 0, 0), 1: (0, 9, 0, 0, 0, 7, 0, 0, 0)},
            "INDIRECT in a chain",
        ),
    ],
)
def test_packed_hostile_region_is_refused_and_left_alone(
    header: tuple[int, ...], descs: dict[int, tuple[int, ...]], message: str
) -> None:
    region = packed_region(4, header, descs)
    before = bytes(region)
    with pytest.raises(InflightError, match=message):
        recover_packed(memoryview(region), 4, lambda slot: 0)
    assert bytes(region) == before


def test_packed_tracker_ignores_later_scribbles_on_the_links() -> None:
    # The front end owns the region too: after recovery the tracker follows
    # only its own copy of the links, so garbage written there corrupts
    # nothing but the region itself (and a later recovery refuses it).
    region, tracker = fresh_packed(4)
    for index in range(4):
        struct.pack_into("<H", region, 32 + 32 * index + 2, 0xFFFF)
    heads = [tracker.pop([PackedDescriptor(0, 1, n, 0)]) for n in range(4)]
    assert heads == [0, 1, 2, 3]
    tracker.before_publish(heads)
    tracker.after_publish(heads)


class _Killed(BaseException):
    """The back end dies here."""


@pytest.mark.parametrize("stores", range(6))
def test_packed_pop_killed_after_any_store_is_recovered(
    monkeypatch: pytest.MonkeyPatch, stores: int
) -> None:
    # The region stores of one pop, cut short after ``stores`` of them (a
    # two-descriptor chain takes five: both copies, the head's fields, then
    # free_head and old_free_head): recovery never refuses the region.  The
    # chain is in flight once old_free_head, which recovery goes by, moved
    # past it; before that it was never handed to the device, and the ring
    # still holds it where the next available position is.
    region, tracker = fresh_packed(4)
    done = 0
    real_pack_into = struct.pack_into
    real_u16 = inflight_module._U16

    def pack_into(fmt: str | bytes, buffer: Any, offset: int, *values: Any) -> None:
        nonlocal done
        if done == stores:
            raise _Killed
        done += 1
        real_pack_into(fmt, buffer, offset, *values)

    class U16:
        @staticmethod
        def pack_into(buffer: Any, offset: int, value: int) -> None:
            pack_into(real_u16.format, buffer, offset, value)

    monkeypatch.setattr(inflight_module.struct, "pack_into", pack_into)
    monkeypatch.setattr(inflight_module, "_U16", U16)
    chain = [PackedDescriptor(0x1000, 16, 9, 1), PackedDescriptor(0x2000, 8, 9, 2)]
    if stores < 5:
        with pytest.raises(_Killed):
            tracker.pop(chain)
    else:
        tracker.pop(chain)
    monkeypatch.undo()
    recovery = recover_packed(memoryview(region), 4, lambda slot: 0)
    if stores == 5:
        assert recovery.resubmit == ((0, tuple(chain)),)
        assert (recovery.next_avail, recovery.used_idx) == (2, 0)
    else:
        assert recovery.resubmit == ()
        assert (recovery.next_avail, recovery.used_idx) == (0, 0)
        assert packed_desc(region, 0)[0] == 0  # the free entry's byte is cleared
