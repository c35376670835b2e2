"""Unit tests of the packed ring as a whole: layout, both sides together.

Malformed cases are built from raw descriptor bytes written straight into
guest memory, the way a buggy or hostile driver would leave them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest

from helpers.packed import (
    _DESC,
    DATA,
    DESC,
    DEV,
    DRV,
    INDIRECT,
    MEM_SIZE,
    Recorder,
    avail,
    brute_force_need_event,
    device,
    get_desc,
    get_event,
    pair,
    put_desc,
    round_trip,
    set_event,
    used_bits,
)
from helpers.queues import assert_chain, driver_error, pop_error
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed, packed_layout, ring
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DescriptorChain,
    DeviceQueue,
    DriverQueue,
    QueueFullError,
    VirtqueueError,
)
from pyvirtio.virtqueue.packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    PackedDeviceQueue,
    PackedDriverQueue,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as m:
        yield m


def test_layout_helpers() -> None:
    assert packed.DESC_ALIGN == 16
    assert packed.EVENT_ALIGN == 4
    assert packed.area_sizes(256) == (4096, 4, 4)
    assert packed.area_sizes(3) == (48, 4, 4)
    assert packed.indirect_area_size(8, 4) == 8 * 4 * 16


@pytest.mark.parametrize("size", [1, 3, 7, 255, 32768])
def test_any_size_up_to_32768(size: int) -> None:
    with GuestMemory.anonymous(2 << 20) as m:
        drv = PackedDriverQueue(m, size, 0x100000, 0x10, 0x14)
        dev = PackedDeviceQueue(m, size, 0x100000, 0x10, 0x14)
        assert drv.size == dev.size == size
        assert drv.num_free == size


@pytest.mark.parametrize("cls", [PackedDeviceQueue, PackedDriverQueue])
@pytest.mark.parametrize(
    ("size", "desc", "drv", "dev", "message"),
    [
        (0, DESC, DRV, DEV, "queue size"),
        (32769, DESC, DRV, DEV, "queue size"),
        (8, DESC + 8, DRV, DEV, "aligned"),
        (8, DESC, DRV + 2, DEV, "aligned"),
        (8, DESC, DRV, DEV + 1, "aligned"),
        (8, MEM_SIZE - 64, DRV, DEV, "descriptor ring"),
        (8, DESC, MEM_SIZE, DEV, "driver event area"),
        (8, DESC, DRV, MEM_SIZE + 4096, "device event area"),
    ],
)
def test_geometry_is_validated(
    mem: GuestMemory, cls: type, size: int, desc: int, drv: int, dev: int, message: str
) -> None:
    with pytest.raises(VirtqueueError, match=message):
        cls(mem, size, desc, drv, dev)


def test_queues_satisfy_protocols(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    assert isinstance(dev, DeviceQueue)
    assert isinstance(drv, DriverQueue)
    assert dev.broken is False
    assert (dev.event_idx, dev.indirect) == (False, False)


def test_single_readable_buffer(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    assert dev.pop() is None
    assert not dev.has_available()
    mem.write(DATA, b"hello")
    drv.add([(DATA, 5)], [], "tok")
    assert get_desc(mem, 0) == (DATA, 5, 0, DESC_F_AVAIL)
    assert drv.num_free == 7
    assert drv.in_flight == 1
    assert dev.has_available()
    chain = dev.pop()
    assert chain is not None
    assert (chain.head, chain.ring_slots) == (0, 1)
    assert chain.readable == [(DATA, 5)]
    assert chain.writable == []
    assert (chain.readable_len, chain.writable_len) == (5, 0)
    assert chain.read_all() == b"hello"
    assert dev.pop() is None
    assert list(drv.used()) == []
    dev.add_used(chain, 0)
    # A used descriptor: AVAIL == USED == wrap counter, the ID, no WRITE for 0 bytes.
    assert get_desc(mem, 0)[1:] == (0, 0, DESC_F_AVAIL | DESC_F_USED)
    assert list(drv.used()) == [("tok", 0)]
    assert drv.num_free == 8
    assert drv.in_flight == 0


def test_writable_buffer_data_reaches_driver(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([], [(DATA, 16)], 7)
    assert get_desc(mem, 0) == (DATA, 16, 0, DESC_F_AVAIL | DESC_F_WRITE)
    chain = dev.pop()
    assert chain is not None
    assert chain.writable == [(DATA, 16)]
    assert chain.write(b"device data") == 11
    dev.add_used(chain, 11)
    assert get_desc(mem, 0)[1:] == (11, 0, DESC_F_AVAIL | DESC_F_USED | DESC_F_WRITE)
    assert list(drv.used()) == [(7, 11)]
    assert mem.read(DATA, 11) == b"device data"


def test_used_length_without_write_flag_is_taken_and_capped(mem: GuestMemory) -> None:
    """QEMU 7.2 leaves WRITE clear in used descriptors; the length still counts."""
    drv, dev = pair(mem)
    drv.add([], [(DATA, 16)], "short")
    drv.add([(DATA + 64, 4)], [(DATA + 32, 8)], "capped")
    for chain in iter(dev.pop, None):
        dev.add_used(chain, 0)
    # Rewrite the two used descriptors as such a device does: len set, flags
    # AVAIL|USED only (len and id sit at offsets 8 and 12, flags at 14).
    mem.write(DESC + 8, struct.pack("<IHH", 11, 0, DESC_F_AVAIL | DESC_F_USED))
    mem.write(DESC + 16 + 8, struct.pack("<IHH", 999, 1, DESC_F_AVAIL | DESC_F_USED))
    assert list(drv.used()) == [("short", 11), ("capped", 8)]


def test_chain_layout_and_parse(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([(DATA, 4), (DATA + 16, 4)], [(DATA + 32, 8), (DATA + 48, 8)], "c")
    flags = [get_desc(mem, i)[3] for i in range(4)]
    assert flags == [
        DESC_F_AVAIL | DESC_F_NEXT,
        DESC_F_AVAIL | DESC_F_NEXT,
        DESC_F_AVAIL | DESC_F_NEXT | DESC_F_WRITE,
        DESC_F_AVAIL | DESC_F_WRITE,
    ]
    assert get_desc(mem, 3)[2] == 0  # buffer ID in the last descriptor
    assert drv.num_free == 4
    chain = dev.pop()
    assert chain is not None
    assert chain.readable == [(DATA, 4), (DATA + 16, 4)]
    assert chain.writable == [(DATA + 32, 8), (DATA + 48, 8)]
    assert (chain.readable_len, chain.writable_len, chain.ring_slots) == (8, 16, 4)
    dev.add_used(chain, 16)
    assert list(drv.used()) == [("c", 16)]
    assert drv.num_free == 8


def test_head_flags_are_published_last(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    log: list[tuple[str, int, int]] = []
    drv._d16 = Recorder(drv._d16, "16", log)
    drv._d32 = Recorder(drv._d32, "32", log)
    drv._d64 = Recorder(drv._d64, "64", log)
    drv.add([(DATA, 4)], [(DATA + 16, 4), (DATA + 32, 4)], None)
    assert log[-1] == ("16", 0 * 8 + 7, DESC_F_AVAIL | DESC_F_NEXT)
    log.clear()
    drv.add([(DATA, 4)], [], None)  # the single-descriptor fast path
    assert log[-1] == ("16", 3 * 8 + 7, DESC_F_AVAIL)


def test_used_flags_stored_after_id_and_len(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([], [(DATA, 8)], None)
    chain = dev.pop()
    assert chain is not None
    log: list[tuple[str, int, int]] = []
    dev._d16 = Recorder(dev._d16, "16", log)
    dev._d32 = Recorder(dev._d32, "32", log)
    dev.add_used(chain, 5)
    assert log == [
        ("32", 2, 5),
        ("16", 6, 0),
        ("16", 7, DESC_F_AVAIL | DESC_F_USED | DESC_F_WRITE),
    ]


def test_batch_publishes_first_flags_last(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    for i in range(3):
        drv.add([(DATA + 16 * i, 4)], [], i)
    chains = [dev.pop() for _ in range(3)]
    log: list[tuple[str, int, int]] = []
    dev._d16 = Recorder(dev._d16, "16", log)
    dev._d32 = Recorder(dev._d32, "32", log)
    dev.add_used_batch([(c, 0) for c in chains if c is not None])
    flag_stores = [index for tag, index, _ in log if tag == "16" and index % 8 == 7]
    assert flag_stores[-1] == 7  # the first element's flags, last of all
    for pos in (1, 2):  # later elements: flags after their own id and len
        assert log.index(("16", pos * 8 + 6, pos)) < log.index(("16", pos * 8 + 7, 0x8080))
    assert [t for t, _ in drv.used()] == [0, 1, 2]


def test_wrap_counters_flip_every_lap(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=3)
    for i in range(3):
        round_trip(drv, dev, i)
    st = dev.state()
    assert (st["next_avail"], st["avail_wrap_counter"]) == (0, False)
    assert (st["next_used"], st["used_wrap_counter"]) == (0, False)
    # Second lap: available descriptors carry AVAIL=0, USED=1.
    drv.add([(DATA, 8)], [], "lap2")
    assert get_desc(mem, 0)[3] == DESC_F_USED
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 0)
    assert get_desc(mem, 0)[3] == 0  # used in lap 2: AVAIL = USED = 0
    assert list(drv.used()) == [("lap2", 0)]
    for i in range(20):
        round_trip(drv, dev, i)


def test_chain_across_ring_end(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4)
    for i in range(3):
        round_trip(drv, dev, i)
    # Next avail position is 3: a 3-descriptor chain occupies 3, 0, 1.
    drv.add([(DATA, 4)], [(DATA + 16, 4), (DATA + 32, 4)], "x")
    assert get_desc(mem, 3)[3] == DESC_F_AVAIL | DESC_F_NEXT
    assert get_desc(mem, 0)[3] == DESC_F_USED | DESC_F_NEXT | DESC_F_WRITE
    assert get_desc(mem, 1)[3] == DESC_F_USED | DESC_F_WRITE
    chain = dev.pop()
    assert chain is not None
    assert chain.ring_slots == 3
    dev.add_used(chain, 8)
    assert list(drv.used()) == [("x", 8)]
    assert dev.state()["next_avail"] == 2
    assert dev.state()["avail_wrap_counter"] is False
    round_trip(drv, dev, "after")


def test_out_of_order_completion(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=5)
    drv.add([(DATA, 4)], [(DATA + 16, 4)], "a")  # two slots
    drv.add([(DATA + 32, 4)], [], "b")
    drv.add([(DATA + 48, 4)], [(DATA + 64, 4)], "c")  # two slots
    assert drv.num_free == 0
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 4)], [], "d")
    a, b, c = dev.pop(), dev.pop(), dev.pop()
    assert a is not None and b is not None and c is not None
    assert [x.ring_slots for x in (a, b, c)] == [2, 1, 2]
    dev.add_used(c, 4)
    assert list(drv.used()) == [("c", 4)]
    assert drv.num_free == 2
    dev.add_used(a, 2)
    dev.add_used(b, 0)
    assert list(drv.used()) == [("a", 2), ("b", 0)]
    assert drv.num_free == 5
    for i in range(12):
        round_trip(drv, dev, i)


def test_partial_iteration_of_used_keeps_the_rest(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    for i in range(3):
        drv.add([(DATA, 4)], [], i)
    dev.add_used_batch([(c, 0) for c in iter(dev.pop, None)])
    it = drv.used()
    assert next(it) == (0, 0)
    del it
    assert list(drv.used()) == [(1, 0), (2, 0)]


def test_driver_request_errors(mem: GuestMemory) -> None:
    drv, _ = pair(mem, size=4)
    with pytest.raises(ValueError, match="at least one"):
        drv.add([], [], None)
    with pytest.raises(ValueError, match="never fit"):
        drv.add([(DATA, 1)] * 5, [], None)
    with pytest.raises(ValueError, match="invalid"):
        drv.add([(-1, 4)], [], None)
    with pytest.raises(ValueError, match="invalid"):
        drv.add([(DATA, 1 << 32)], [], None)
    with pytest.raises(ValueError, match="invalid"):
        drv.add([(DATA, 4)], [(1 << 64, 4)], None)
    assert drv.num_free == 4
    assert drv.in_flight == 0
    drv.add([(DATA, 4)] * 3, [], None)
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 4)] * 2, [], None)
    drv.add([(DATA, 4)], [], None)
    with pytest.raises(QueueFullError):
        drv.add([(DATA, 4)], [], None)


def test_failed_add_leaves_queue_usable(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    with pytest.raises(ValueError):
        drv.add([(DATA, 4)], [(DATA, 4), (-5, 4)], None)
    assert dev.pop() is None
    round_trip(drv, dev, "ok")
    assert drv.num_free == 8


def test_indirect_table(mem: GuestMemory) -> None:
    drv, dev = pair(mem, indirect=True, max_indirect=4)
    drv.add([(DATA, 4)], [(DATA + 16, 8), (DATA + 32, 8)], "ind")
    assert drv.num_free == 7
    addr, length, buf_id, flags = get_desc(mem, 0)
    assert (addr, length, buf_id) == (INDIRECT, 48, 0)
    assert flags == DESC_F_AVAIL | DESC_F_INDIRECT
    table = [get_desc(mem, i, base=INDIRECT) for i in range(3)]
    assert table == [
        (DATA, 4, 0, 0),
        (DATA + 16, 8, 0, DESC_F_WRITE),
        (DATA + 32, 8, 0, DESC_F_WRITE),
    ]
    chain = dev.pop()
    assert chain is not None
    assert chain.ring_slots == 1
    assert chain.readable == [(DATA, 4)]
    assert chain.writable == [(DATA + 16, 8), (DATA + 32, 8)]
    chain.write(b"0123456789")
    dev.add_used(chain, 10)
    assert list(drv.used()) == [("ind", 10)]
    assert mem.readv([(DATA + 16, 8), (DATA + 32, 2)]) == b"0123456789"


def test_indirect_table_per_buffer_id(mem: GuestMemory) -> None:
    drv, dev = pair(mem, indirect=True, max_indirect=2)
    drv.add([(DATA, 4)], [(DATA + 16, 4)], "first")
    drv.add([(DATA + 32, 4)], [(DATA + 48, 4)], "second")
    assert get_desc(mem, 1)[0] == INDIRECT + 1 * 2 * 16
    # More elements than max_indirect: a direct chain.
    drv.add([(DATA, 4)] * 3, [], "direct")
    assert drv.num_free == 8 - 2 - 3
    chains = list(iter(dev.pop, None))
    assert [c.ring_slots for c in chains] == [1, 1, 3]
    dev.add_used_batch([(c, 0) for c in reversed(chains)])
    assert [t for t, _ in drv.used()] == ["direct", "second", "first"]


def test_chain_continuation_with_wrong_wrap_after_ring_end(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4)
    for i in range(3):
        round_trip(drv, dev, i)
    # Head at 3 (lap 1), continuation at 0 must carry lap-2 bits; give it lap-1 bits.
    put_desc(mem, 0, DATA, 4, 0, avail(1))
    put_desc(mem, 3, DATA, 4, 0, avail(1) | DESC_F_NEXT)
    pop_error(dev, "descriptor 0 continues the chain but is not available")


def test_add_used_rejects_device_bugs(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([(DATA, 4)], [(DATA + 16, 4)], None)
    chain = dev.pop()
    assert chain is not None
    with pytest.raises(ValueError, match="written"):
        dev.add_used(chain, 5)
    with pytest.raises(ValueError, match="written"):
        dev.add_used(chain, -1)
    dev.add_used(chain, 4)
    with pytest.raises(ValueError, match="in flight"):
        dev.add_used(chain, 0)
    fake = DescriptorChain(mem, 0, [], [], 0, 0, 0)
    with pytest.raises(ValueError, match="occupies 0"):
        dev.add_used_batch([(fake, 0)])
    dev.add_used_batch([])
    assert list(drv.used()) == [(None, 4)]


def test_refused_batch_is_invisible(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    for i in range(3):
        drv.add([], [(DATA + 16 * i, 4)], i)
    a, b = dev.pop(), dev.pop()
    assert a is not None and b is not None
    before = mem.read(DESC, 16 * 8)
    with pytest.raises(ValueError, match="written"):
        dev.add_used_batch([(a, 1), (b, 5)])
    with pytest.raises(ValueError, match="in flight"):
        dev.add_used_batch([(a, 1), (b, 1), (b, 1)])
    bad_head = DescriptorChain(mem, 0x10000, [], [], 0, 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        dev.add_used_batch([(a, 1), (bad_head, 0)])
    # Nothing was published: the first used descriptor's flags are untouched,
    # and descriptor 2 (available, not popped) was never overwritten.
    assert get_desc(mem, 0)[3] == before[14] | before[15] << 8
    assert get_desc(mem, 2) == _DESC.unpack(before[32:48])
    assert list(drv.used()) == []
    dev.add_used_batch([(b, 4), (a, 0)])
    assert list(drv.used()) == [(1, 4), (0, 0)]


def test_driver_rejects_unknown_buffer_id(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [], None)
    put_desc(mem, 0, 0, 0, 5, used_bits(1))  # ID 5 was never made available
    driver_error(drv, "not in flight")


def test_driver_rejects_out_of_range_buffer_id(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [], None)
    put_desc(mem, 0, 0, 0, 0xFFFF, used_bits(1))
    driver_error(drv, "not in flight")


def test_driver_rejects_overlong_written(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [(DATA, 8)], None)
    put_desc(mem, 0, 0, 9, 0, used_bits(1) | DESC_F_WRITE)
    driver_error(drv, "wrote 9 bytes")


def test_driver_ignores_len_without_write_flag(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [], "t")
    put_desc(mem, 0, 0, 1234, 0, used_bits(1))
    assert list(drv.used()) == [("t", 0)]


def test_driver_ignores_ring_when_nothing_in_flight(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    put_desc(mem, 0, 0, 0, 3, used_bits(1))
    assert list(drv.used()) == []
    assert not drv.enable_interrupts()


def test_device_notifications_without_event_idx(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    round_trip(drv, dev, 0)
    assert dev.needs_notification()  # zeroed area: ENABLE
    drv.disable_interrupts()
    assert get_event(mem, DRV) == (0, RING_EVENT_FLAGS_DISABLE)
    round_trip(drv, dev, 1)
    assert not dev.needs_notification()
    assert not drv.enable_interrupts()
    assert get_event(mem, DRV)[1] == RING_EVENT_FLAGS_ENABLE
    round_trip(drv, dev, 2)
    assert dev.needs_notification()
    # DESC without EVENT_IDX is not valid; treated as ENABLE (a spare notification).
    set_event(mem, DRV, RING_EVENT_FLAGS_DESC, off=5, wrap=0)
    round_trip(drv, dev, 3)
    assert dev.needs_notification()
    set_event(mem, DRV, 3)  # reserved
    assert dev.needs_notification()


def test_driver_kicks_without_event_idx(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([(DATA, 4)], [], None)
    assert drv.kick_needed()
    dev.disable_notifications()
    assert get_event(mem, DEV) == (0, RING_EVENT_FLAGS_DISABLE)
    drv.add([(DATA, 4)], [], None)
    assert not drv.kick_needed()
    assert dev.enable_notifications()  # two chains are waiting
    assert get_event(mem, DEV)[1] == RING_EVENT_FLAGS_ENABLE
    drv.add([(DATA, 4)], [], None)
    assert drv.kick_needed()


def test_enable_notifications_rechecks_ring(mem: GuestMemory) -> None:
    drv, dev = pair(mem, event_idx=True)
    dev.disable_notifications()
    assert not dev.enable_notifications()
    dev.disable_notifications()
    drv.add([(DATA, 4)], [], None)
    assert dev.enable_notifications()


def test_enable_interrupts_rechecks_ring(mem: GuestMemory) -> None:
    drv, dev = pair(mem, event_idx=True)
    drv.add([(DATA, 4)], [], None)
    drv.disable_interrupts()
    assert not drv.enable_interrupts()
    drv.disable_interrupts()
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 0)
    assert drv.enable_interrupts()


def test_device_event_idx_desc_offsets(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4, event_idx=True)
    assert not dev.enable_notifications()
    assert get_event(mem, DEV) == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    drv.add([(DATA, 4)], [], 0)
    assert drv.kick_needed()  # descriptor 0 was the event
    drv.add([(DATA, 4)], [], 1)
    assert not drv.kick_needed()  # the device has not caught up: no second kick
    assert dev.pop() is not None
    # Popping in DESC mode moves the event past what was consumed.
    assert get_event(mem, DEV)[0] == 1 | 1 << 15
    assert dev.pop() is not None
    assert get_event(mem, DEV)[0] == 2 | 1 << 15
    drv.add([(DATA, 4)], [(DATA, 4)], 2)  # two slots: 2 and 3, then the wrap
    assert drv.kick_needed()
    chain = dev.pop()
    assert chain is not None
    assert get_event(mem, DEV)[0] == 0  # position 0 of lap 2: wrap bit 0


def test_driver_event_idx_desc_offsets(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4, event_idx=True)
    assert not drv.enable_interrupts()
    assert get_event(mem, DRV) == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    for i in range(3):
        drv.add([(DATA, 4)], [], i)
    chains = list(iter(dev.pop, None))
    dev.add_used(chains[0], 0)
    assert dev.needs_notification()
    dev.add_used(chains[1], 0)
    assert not dev.needs_notification()  # the driver has not consumed yet
    assert [t for t, _ in drv.used()] == [0, 1]
    # Consuming in DESC mode moved the event to the next used position.
    assert get_event(mem, DRV)[0] == 2 | 1 << 15
    dev.add_used(chains[2], 0)
    assert dev.needs_notification()


def test_event_in_previous_lap(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4, event_idx=True)
    for i in range(3):
        round_trip(drv, dev, i)
    dev.needs_notification()
    # Driver asks for position 3 of lap 1; the device uses 3 then 0 (lap 2).
    set_event(mem, DRV, RING_EVENT_FLAGS_DESC, off=3, wrap=1)
    drv.add([(DATA, 4)], [], "a")
    drv.add([(DATA, 4)], [], "b")
    a, b = dev.pop(), dev.pop()
    assert a is not None and b is not None
    dev.add_used_batch([(a, 0), (b, 0)])
    assert dev.needs_notification()  # 3 was among the two used, across the wrap
    list(drv.used())
    set_event(mem, DRV, RING_EVENT_FLAGS_DESC, off=3, wrap=1)  # now stale, a lap back
    round_trip(drv, dev, "c")
    assert not dev.needs_notification()


def test_needs_notification_after_a_whole_lap(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4, event_idx=True)
    set_event(mem, DRV, RING_EVENT_FLAGS_DESC, off=2, wrap=0)
    for i in range(5):
        round_trip(drv, dev, i)
    assert dev.needs_notification()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_need_event_matches_brute_force(size: int) -> None:
    for start in range(2 * size):
        for count in range(size + 1):  # at most one lap between checks: exact
            for off in range(size):
                for off_wrap in (0, 1):
                    new, wrap, expected = brute_force_need_event(size, start, count, off, off_wrap)
                    got = packed_layout.need_event(
                        RING_EVENT_FLAGS_DESC, off | off_wrap << 15, True, new, wrap, count, size
                    )
                    assert got == expected, (size, start, count, off, off_wrap)


def test_state_round_trip(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=5, event_idx=True, indirect=True)
    for i in range(7):
        round_trip(drv, dev, i)
    drv.add([(DATA, 4)], [], "in flight")
    chain = dev.pop()
    assert chain is not None
    dev.enable_notifications()
    st = dev.state()
    assert json.loads(json.dumps(st)) == st
    assert st["next_avail"] == 3
    assert st["avail_wrap_counter"] is False
    assert st["next_used"] == 2
    rebuilt = PackedDeviceQueue.from_state(mem, json.loads(json.dumps(st)))
    assert rebuilt.state() == st
    rebuilt.add_used(chain, 0)
    assert list(drv.used()) == [("in flight", 0)]
    for i in range(7):
        round_trip(drv, rebuilt, i)
    json.dumps(drv.state())
    assert drv.state()["in_flight"] == 0


def test_from_state_all_slots_in_flight(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=3)
    for i in range(3):
        drv.add([(DATA, 4)], [], i)
    chains = list(iter(dev.pop, None))
    st = dev.state()
    assert (st["next_avail"], st["avail_wrap_counter"]) == (0, False)
    rebuilt = PackedDeviceQueue.from_state(mem, st)
    rebuilt.add_used_batch([(c, 0) for c in chains])
    assert [t for t, _ in drv.used()] == [0, 1, 2]


def test_buffers_in_other_regions_and_across_regions() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, 0x80000)  # rings and the big region
    mem.add_anonymous(0x100000, 0x1000)
    mem.add_anonymous(0x101000, 0x1000)  # contiguous with the previous one
    with mem:
        drv, dev = pair(mem)
        drv.add([(0x100010, 16)], [(0x100FF0, 0x20)], "spans")
        chain = dev.pop()
        assert chain is not None
        assert chain.writable == [(0x100FF0, 0x20)]
        drv.add([(0x102000, 1)], [], "gap")
        with pytest.raises(VirtqueueError, match="outside guest memory"):
            dev.pop()


def test_removed_region_is_noticed() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, 0x80000)
    mem.add_anonymous(0x100000, 0x100000)  # the largest: the cached region
    with mem:
        drv, dev = pair(mem)
        drv.add([(0x100000, 16)], [], "ok")
        assert dev.pop() is not None
        mem.remove_region(0x100000)
        drv.add([(0x100000, 16)], [], "gone")
        with pytest.raises(VirtqueueError, match="outside guest memory"):
            dev.pop()


def test_struct_fallback_for_big_endian_hosts(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ring, "NATIVE_LITTLE", False)
    drv, dev = pair(mem, size=3, event_idx=True, indirect=True)
    assert isinstance(dev._d16, ring.LittleEndianWords)
    for i in range(8):
        round_trip(drv, dev, i)
    drv.add([(DATA, 4)], [(DATA, 4), (DATA, 4)], "ind")
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 8)
    assert list(drv.used()) == [("ind", 8)]
    with pytest.raises(ValueError):
        drv.add([(-1, 4)], [], None)
    assert dev.enable_notifications() is False
    # Nine slots used on a ring of three: lap 4 starts, wrap counter 0.
    assert get_event(mem, DEV) == (0, RING_EVENT_FLAGS_DESC)
    round_trip(drv, dev, "after")
    assert get_event(mem, DEV) == (1, RING_EVENT_FLAGS_DESC)


def test_popped_chains_hold_every_field(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    drv.add([(DATA, 4)], [], "r")
    drv.add([], [(DATA, 4)], "w")
    drv.add([(DATA, 4)], [(DATA + 16, 4)], "rw")
    chains = list(iter(dev.pop, None))
    expected = [
        DescriptorChain(mem, 0, [(DATA, 4)], [], 4, 0, 1),
        DescriptorChain(mem, 1, [], [(DATA, 4)], 0, 4, 1),
        DescriptorChain(mem, 2, [(DATA, 4)], [(DATA + 16, 4)], 4, 4, 2),
    ]
    for chain, want in zip(chains, expected, strict=True):
        assert_chain(chain, want)
    dev.add_used_batch([(c, c.writable_len) for c in chains])
    assert list(drv.used()) == [("r", 0), ("w", 4), ("rw", 4)]


def test_device_resumes_at_positions_and_wrap_counters_a_host_sets(mem: GuestMemory) -> None:
    # Ten round trips on a ring of eight: both wrap counters have flipped.
    drv, dev = pair(mem, size=8, event_idx=True)
    for token in range(10):
        round_trip(drv, dev, token)
    assert (dev.next_avail, dev.avail_wrap_counter) == (2, False)
    assert (dev.next_used, dev.used_wrap_counter) == (2, False)
    resumed = device(mem, 8, event_idx=True)
    resumed.set_next_avail(dev.next_avail, dev.avail_wrap_counter)
    resumed.set_next_used(dev.next_used, dev.used_wrap_counter)
    assert resumed.state() == {**dev.state(), "used_since_signal": 0}
    drv.add([(DATA, 4)], [], "after")
    chain = resumed.pop()
    assert chain is not None and chain.readable == [(DATA, 4)]
    resumed.add_used(chain, 0)
    assert list(drv.used()) == [("after", 0)]


def test_a_fresh_device_sees_nothing_at_a_wrong_wrap_counter(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [], "lap 1")
    dev = device(mem)
    dev.set_next_avail(0, False)  # expects the second lap's flags
    assert dev.pop() is None


def test_driver_has_used_reports_a_returned_buffer(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    assert not drv.has_used()
    drv.add([], [(DATA, 8)], "t")
    assert not drv.has_used()
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain, 5)
    assert drv.has_used()
    assert list(drv.used()) == [("t", 5)]
    assert not drv.has_used()


def test_idle_driver_rebuilt_from_state_carries_on(mem: GuestMemory) -> None:
    drv, dev = pair(mem, size=4, event_idx=True, indirect=True)
    for token in range(6):
        round_trip(drv, dev, token)
    drv.disable_interrupts()
    state = json.loads(json.dumps(drv.state()))
    rebuilt = PackedDriverQueue.from_state(mem, state)
    assert rebuilt.state() == drv.state()
    rebuilt.add([(DATA, 4)], [(DATA + 64, 4), (DATA + 128, 4)], "indirect")
    chain = dev.pop()
    assert chain is not None and chain.writable_len == 8
    dev.add_used(chain, 8)
    assert rebuilt.has_used()
    assert list(rebuilt.used()) == [("indirect", 8)]


def test_driver_from_state_refuses_requests_in_flight(mem: GuestMemory) -> None:
    drv, _ = pair(mem)
    drv.add([(DATA, 4)], [], "pending")
    with pytest.raises(ValueError, match="nothing in flight"):
        PackedDriverQueue.from_state(mem, drv.state())
    idle = pair(mem)[0].state()
    with pytest.raises(ValueError, match="nothing in flight"):
        PackedDriverQueue.from_state(mem, {**idle, "next_used": 3})
    with pytest.raises(VirtqueueError, match="lacks 'broken'"):
        PackedDriverQueue.from_state(mem, {k: v for k, v in idle.items() if k != "broken"})
