"""Unit tests of what both ring formats share (virtqueue/ring.py, base.py, the layouts' helpers)."""

from __future__ import annotations

import pytest

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import base, packed_layout, ring, split_layout
from pyvirtio.virtqueue.common import MAX_QUEUE_SIZE, VirtqueueError
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue


def test_little_endian_words_match_native_casts() -> None:
    data = bytearray(range(16))
    native = ring.words(memoryview(data), "H")
    fallback = ring.LittleEndianWords(memoryview(data), "H")
    assert len(fallback) == len(native) == 8
    assert [fallback[i] for i in range(8)] == [native[i] for i in range(8)]
    fallback[3] = 0xBEEF
    assert data[6:8] == b"\xef\xbe"
    with pytest.raises(IndexError):
        fallback[8]
    with pytest.raises(ValueError):
        fallback[0] = 0x10000


@pytest.mark.parametrize("native", [True, False])
def test_spans_read_little_endian_slots(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(ring, "NATIVE_LITTLE", native)
    data = bytearray(32)
    data[4:8] = (5).to_bytes(4, "little")
    data[28:32] = (7).to_bytes(4, "little")
    slots = ring.words(memoryview(data), "I")
    assert ring.read_span(slots, 0, 8) == [0, 5, 0, 0, 0, 0, 0, 7]
    assert ring.read_span(slots, 1, 2) == [5]


def test_queue_sizes() -> None:
    assert ring.check_queue_size(6, power_of_two=False) == 6
    with pytest.raises(VirtqueueError, match="power of two"):
        ring.check_queue_size(6, power_of_two=True)
    for bad in (0, MAX_QUEUE_SIZE + 1, -1):
        with pytest.raises(VirtqueueError):
            ring.check_queue_size(bad, power_of_two=False)
    with pytest.raises(VirtqueueError, match="not an integer"):
        ring.check_queue_size(True, power_of_two=False)


def test_area_view_checks_type_alignment_and_region() -> None:
    with GuestMemory.anonymous(0x1000) as mem:
        assert len(ring.area_view(mem, "ring", 0x10, 0x20, 16)) == 0x20
        with pytest.raises(VirtqueueError, match="not 16-byte aligned"):
            ring.area_view(mem, "ring", 0x8, 0x20, 16)
        with pytest.raises(VirtqueueError, match="not an integer"):
            ring.area_view(mem, "ring", None, 0x20, 16)
        with pytest.raises(VirtqueueError, match="not inside one guest memory region"):
            ring.area_view(mem, "ring", 0xFF0, 0x20, 16)


def test_state_reader_names_the_bad_field() -> None:
    fields = ring.StateReader({"a": 1, "b": True, "c": "x", "d": 0x10000})
    assert fields.integer("a") == 1
    assert fields.flag("b") is True
    with pytest.raises(VirtqueueError, match="lacks 'z'"):
        fields.integer("z")
    with pytest.raises(VirtqueueError, match="'b' is not an int"):
        fields.integer("b")
    with pytest.raises(VirtqueueError, match="'a' is not a bool"):
        fields.flag("a")
    with pytest.raises(VirtqueueError, match="'c' is not an int"):
        fields.u16("c")
    with pytest.raises(VirtqueueError, match="'d' = 65536"):
        fields.u16("d")
    with pytest.raises(VirtqueueError, match="not a dict"):
        ring.StateReader([])  # type: ignore[arg-type]


# -- the bases of the four queue classes (virtqueue/base.py) --------------------

DESC_ADDR = 0x1000
DRIVER_ADDR = 0x2000
DEVICE_ADDR = 0x3000
INDIRECT_ADDR = 0x4000
DATA_ADDR = 0x8000
QUEUE_CLASSES = (SplitDeviceQueue, SplitDriverQueue, PackedDeviceQueue, PackedDriverQueue)
DriverClass = type[SplitDriverQueue] | type[PackedDriverQueue]
QueueClass = type[SplitDeviceQueue] | type[PackedDeviceQueue] | DriverClass


def test_indirect_area_size_is_one_table_per_slot() -> None:
    assert ring.indirect_area_size(8, 4) == 8 * 4 * ring.DESC_SIZE
    assert ring.indirect_area_size(8, 0) == 0


@pytest.mark.parametrize("cls", QUEUE_CLASSES)
def test_every_queue_records_geometry_and_features_alike(cls: QueueClass) -> None:
    with GuestMemory.anonymous(0x10000) as mem:
        queue = cls(mem, 8, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR, event_idx=True)
        state = queue.state()
        assert {key: state[key] for key in ("size", "desc_addr", "driver_addr", "device_addr")} == {
            "size": 8,
            "desc_addr": DESC_ADDR,
            "driver_addr": DRIVER_ADDR,
            "device_addr": DEVICE_ADDR,
        }
        assert (state["event_idx"], state["indirect"], state["broken"]) == (True, False, False)
        state["broken"] = True
        rebuilt = cls.from_state(mem, state)
        assert type(rebuilt) is cls
        assert rebuilt.mem is mem and rebuilt.broken and rebuilt.event_idx
        assert rebuilt.state() == state
        with pytest.raises(VirtqueueError, match="lacks 'desc_addr'"):
            cls.from_state(mem, {k: v for k, v in state.items() if k != "desc_addr"})


@pytest.mark.parametrize("cls", [SplitDriverQueue, PackedDriverQueue])
def test_driver_rebuild_keeps_guest_memory_and_its_indirect_area(
    cls: DriverClass,
) -> None:
    with GuestMemory.anonymous(0x10000) as mem:
        queue, idle = (
            cls(
                mem,
                8,
                DESC_ADDR,
                DRIVER_ADDR,
                DEVICE_ADDR,
                indirect=True,
                indirect_addr=INDIRECT_ADDR,
                max_indirect=4,
            )
            for _ in range(2)
        )
        queue.add([(DATA_ADDR, 16)], [], "busy")
        with pytest.raises(ValueError, match="nothing in flight"):
            cls.from_state(mem, queue.state())
        mem.fill(DESC_ADDR, 16, 0xAB)  # the constructor zeroes the rings, a rebuild must not
        rebuilt = cls.from_state(mem, idle.state())
        assert mem.read(DESC_ADDR, 16) == b"\xab" * 16
        assert (rebuilt.indirect_addr, rebuilt.max_indirect) == (INDIRECT_ADDR, 4)
        assert rebuilt.num_free == 8


@pytest.mark.parametrize("cls", [SplitDeviceQueue, PackedDeviceQueue])
def test_device_takes_the_region_window_again_when_regions_change(
    cls: type[base.DeviceRing],
) -> None:
    with GuestMemory.anonymous(0x10000) as mem:
        queue = cls(mem, 8, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR)
        assert queue._window_table is None  # no window before the first pop
        queue._take_window()
        assert queue._window_table is mem.regions
        assert (queue._lo, queue._hi) == (0, 0x10000)
        mem.add_anonymous(0x100000, 0x40000)  # now the largest region
        assert queue._window_table is not mem.regions
        queue._take_window()
        assert (queue._lo, queue._hi) == (0x100000, 0x140000)


def test_split_enable_events_names_the_index_or_clears_the_flags() -> None:
    event = ring.words(memoryview(bytearray(2)), "H")
    flags = ring.words(memoryview(bytearray(b"\x01\x00")), "H")
    split_layout.enable_events(event, flags, True, 7)
    assert (event[0], flags[0]) == (7, 1)
    split_layout.enable_events(event, flags, False, 9)
    assert (event[0], flags[0]) == (7, 0)


def test_packed_event_areas_and_positions() -> None:
    area = ring.words(memoryview(bytearray(4)), "H")
    assert packed_layout.enable_events(area, True, 5, 1) == packed_layout.RING_EVENT_FLAGS_DESC
    assert (area[0], area[1]) == (5 | packed_layout.WRAP_BIT, packed_layout.RING_EVENT_FLAGS_DESC)
    # The device asked for the descriptor at 5 in this lap: using 4..5 notifies, 3..4 does not.
    assert packed_layout.event_wanted(area, True, 6, 1, 2, 8)
    assert not packed_layout.event_wanted(area, True, 5, 1, 2, 8)
    assert packed_layout.disable_events(area) == packed_layout.RING_EVENT_FLAGS_DISABLE
    assert not packed_layout.event_wanted(area, True, 6, 1, 2, 8)
    assert packed_layout.ring_positions(3, 0, 2, 1) == {
        "next_avail": 3,
        "avail_wrap_counter": False,
        "next_used": 2,
        "used_wrap_counter": True,
    }
