"""Unit tests of the split ring as a whole: layout, both sides together.

Device-side cases are built from raw bytes written into guest memory, so each
malformation the driver could produce is exercised exactly; driver-side cases
play the device by writing the used ring by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from helpers.queues import pop_error
from helpers.split import (
    _DESC_FMT,
    AVAIL,
    DATA,
    DESC,
    IND,
    MEM_SIZE,
    USED,
    device,
    driver,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import ring, split
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    MAX_QUEUE_SIZE,
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


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as memory:
        yield memory


def test_area_sizes_follow_the_spec_table() -> None:
    assert area_sizes(1) == (16, 8, 14)
    assert area_sizes(256) == (4096, 6 + 512, 6 + 2048)
    assert area_sizes(MAX_QUEUE_SIZE) == (16 * 32768, 6 + 2 * 32768, 6 + 8 * 32768)
    assert indirect_area_size(8, 4) == 8 * 4 * 16
    assert (split.DESC_ALIGN, split.AVAIL_ALIGN, split.USED_ALIGN) == (16, 2, 4)


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


def test_queues_satisfy_the_protocols(mem: GuestMemory) -> None:
    assert isinstance(device(mem), DeviceQueue)
    assert isinstance(driver(mem), DriverQueue)


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
