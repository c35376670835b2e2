"""Unit tests of the packed ring's device side (packed_device.py).

Malformed cases are built from raw descriptor bytes written straight into
guest memory, the way a buggy or hostile driver would leave them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from helpers.packed import (
    DATA,
    DESC,
    DEV,
    DRV,
    INDIRECT,
    MEM_SIZE,
    avail,
    device,
    get_desc,
    pair,
    put_desc,
    round_trip,
    used_bits,
)
from helpers.queues import pop_error
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    VirtqueueError,
)
from pyvirtio.virtqueue.packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    PackedDeviceQueue,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM_SIZE) as m:
        yield m


def test_chain_longer_than_queue(mem: GuestMemory) -> None:
    dev = device(mem, size=4)
    for i in range(4):
        put_desc(mem, i, DATA, 4, 0, avail(1) | DESC_F_NEXT)
    pop_error(dev, "longer than the queue size")


def test_chain_of_exactly_queue_size_is_fine(mem: GuestMemory) -> None:
    dev = device(mem, size=4)
    for i in range(4):
        put_desc(mem, i, DATA, 4, 9, avail(1) | (DESC_F_NEXT if i < 3 else 0))
    chain = dev.pop()
    assert chain is not None
    assert (chain.head, chain.ring_slots, len(chain.readable)) == (9, 4, 4)


def test_buffer_outside_memory(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, MEM_SIZE - 4, 8, 0, avail(1))
    pop_error(dev, "outside guest memory")


def test_buffer_outside_memory_in_chain(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 1, 0xFFFF_0000_0000, 8, 0, avail(1))
    put_desc(mem, 0, DATA, 8, 0, avail(1) | DESC_F_NEXT)
    pop_error(dev, "outside guest memory")


def test_buffer_end_overflows_address_space(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, (1 << 64) - 16, 32, 0, avail(1))
    pop_error(dev, "overflows")


def test_indirect_not_negotiated(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    pop_error(dev, "not negotiated")


def test_nested_indirect(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 1, INDIRECT, 16, 0, DESC_F_INDIRECT, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 32, 0, avail(1) | DESC_F_INDIRECT)
    pop_error(dev, "itself INDIRECT")


def test_indirect_with_next(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT | DESC_F_NEXT)
    put_desc(mem, 1, DATA, 4, 0, avail(1))
    pop_error(dev, "NEXT-linked chain")


def test_indirect_inside_a_chain(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 1, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT)
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_NEXT)
    pop_error(dev, "NEXT-linked chain")


@pytest.mark.parametrize(
    ("addr", "length", "match"),
    [
        (INDIRECT, 0, "non-zero multiple of 16"),
        (INDIRECT, 24, "non-zero multiple of 16"),
        (INDIRECT, 32769 * 16, "exceeds the limit"),
        (MEM_SIZE - 16, 32, "indirect table .* outside guest memory"),
        ((1 << 64) - 16, 32, "indirect table .* outside guest memory"),
    ],
)
def test_bad_indirect_table(mem: GuestMemory, addr: int, length: int, match: str) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, addr, length, 0, avail(1) | DESC_F_INDIRECT)
    pop_error(dev, match)


def test_indirect_table_of_max_entries_is_fine() -> None:
    with GuestMemory.anonymous(2 << 20) as m:
        dev = PackedDeviceQueue(m, 8, DESC, DRV, DEV, indirect=True)
        table = 0x100000
        put_desc(m, 0, table, 32768 * 16, 3, avail(1) | DESC_F_INDIRECT)
        chain = dev.pop()
        assert chain is not None
        assert len(chain.readable) == 32768
        assert chain.head == 3


def test_indirect_buffer_outside_memory(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 1, MEM_SIZE, 4, 0, DESC_F_WRITE, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 32, 0, avail(1) | DESC_F_INDIRECT)
    pop_error(dev, "outside guest memory")


def test_readable_after_writable(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 1, DATA + 16, 4, 0, avail(1))
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_WRITE | DESC_F_NEXT)
    pop_error(dev, "readable descriptor 1 after a writable one")


def test_readable_after_writable_in_indirect_table(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, DESC_F_WRITE, base=INDIRECT)
    put_desc(mem, 1, DATA + 16, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 32, 0, avail(1) | DESC_F_INDIRECT)
    pop_error(dev, "readable after a writable")


def test_chain_continuation_not_available(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_NEXT)  # descriptor 1 still zero
    pop_error(dev, "descriptor 1 continues the chain but is not available")


def test_used_or_stale_descriptor_is_not_available(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, DATA, 4, 0, DESC_F_AVAIL | DESC_F_USED)  # looks used
    assert dev.pop() is None
    put_desc(mem, 0, DATA, 4, 0, DESC_F_USED)  # available for the next lap only
    assert dev.pop() is None
    assert not dev.broken


def test_reserved_flag_bits_take_the_general_path(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, DATA, 4, 5, avail(1) | 0x0100)
    chain = dev.pop()
    assert chain is not None
    assert (chain.head, chain.readable) == (5, [(DATA, 4)])


def test_only_virtqueue_errors_escape(mem: GuestMemory) -> None:
    """Every malformed ring raises VirtqueueError, never another exception type."""
    cases = [
        [(0, (1 << 64) - 1, 0xFFFF_FFFF, 0, avail(1))],
        [(0, 0, 0, 0, avail(1) | DESC_F_INDIRECT)],
        [(0, (1 << 64) - 1, 0xFFFF_FFF0, 0, avail(1) | DESC_F_INDIRECT)],
        [(0, DATA, 4, 0, 0xFFFF & ~DESC_F_USED)],
    ]
    for descs in cases:
        for indirect in (False, True):
            mem.fill(DESC, 16 * 8)
            dev = device(mem, indirect=indirect)
            for index, addr, length, buf_id, flags in descs:
                put_desc(mem, index, addr, length, buf_id, flags)
            try:
                dev.pop()
            except VirtqueueError:
                assert dev.broken


def test_state_of_broken_queue(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, MEM_SIZE, 4, 0, avail(1))
    with pytest.raises(VirtqueueError):
        dev.pop()
    rebuilt = PackedDeviceQueue.from_state(mem, dev.state())
    assert rebuilt.broken
    with pytest.raises(VirtqueueError):
        rebuilt.pop()


@pytest.mark.parametrize(
    "change",
    [
        {"next_avail": 8},
        {"next_used": -1},
        {"size": 0},
        {"desc_addr": 3},
        {"avail_wrap_counter": 1},
        {"notify_flags": 3},
        {"used_since_signal": -1},
        {"format": "split"},
        # used position ahead of the available one
        {"next_avail": 0, "next_used": 2},
    ],
)
def test_from_state_rejects_bad_state(mem: GuestMemory, change: dict[str, object]) -> None:
    st = device(mem).state()
    st.update(change)
    with pytest.raises(VirtqueueError):
        PackedDeviceQueue.from_state(mem, st)


def test_from_state_rejects_missing_key(mem: GuestMemory) -> None:
    st = device(mem).state()
    del st["next_used"]
    with pytest.raises(VirtqueueError):
        PackedDeviceQueue.from_state(mem, st)


def test_indirect_table_outside_the_largest_region() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, 0x80000)  # rings and the big region
    mem.add_anonymous(0x100000, 0x1000)
    with mem:
        dev = device(mem, indirect=True)
        put_desc(mem, 0, DATA, 4, 0, 0, base=0x100000)
        put_desc(mem, 1, 0x100800, 8, 0, DESC_F_WRITE, base=0x100000)
        put_desc(mem, 0, 0x100000, 32, 4, avail(1) | DESC_F_INDIRECT)
        chain = dev.pop()
        assert chain is not None
        assert (chain.head, chain.readable, chain.writable) == (4, [(DATA, 4)], [(0x100800, 8)])


@pytest.mark.parametrize("bad", [-1, 8, True, 2.0])
def test_ring_positions_must_lie_in_the_ring(mem: GuestMemory, bad: object) -> None:
    dev = device(mem, 8)
    with pytest.raises(ValueError, match="not a position in a ring of 8"):
        dev.set_next_avail(bad, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a position in a ring of 8"):
        dev.set_next_used(bad, True)  # type: ignore[arg-type]
    assert (dev.next_avail, dev.next_used) == (0, 0)


# -- inflight recording (the hook vhost-user's inflight tracking plugs into) ----------------


class _InflightLog:
    """Records the hook calls, and whether the batch's first used descriptor was visible."""

    def __init__(self, mem: GuestMemory, size: int) -> None:
        self.mem = mem
        self.size = size
        self.calls: list[tuple[str, object, bool]] = []
        self.refuse_id: int | None = None

    def first_used_visible(self, queue: PackedDeviceQueue) -> bool:
        flags = queue.slot_flags(queue.next_used)
        return (flags & (DESC_F_AVAIL | DESC_F_USED)) == used_bits(int(queue.used_wrap_counter))

    def pop(self, descriptors: Sequence[tuple[int, int, int, int]]) -> None:
        if descriptors[-1][2] == self.refuse_id:
            raise ValueError(f"buffer ID {self.refuse_id} is already in flight")
        self.calls.append(("pop", list(descriptors), False))

    def before_publish(self, ids: Sequence[int]) -> None:
        self.calls.append(("before", list(ids), False))

    def after_publish(self, ids: Sequence[int]) -> None:
        self.calls.append(("after", list(ids), False))


@pytest.mark.parametrize("batch", [2, 20], ids=["field-stores", "strided-stores"])
def test_inflight_hook_sees_every_pop_and_brackets_the_publishing_store(
    mem: GuestMemory, batch: int
) -> None:
    drv, dev = pair(mem, 64)
    log = _InflightLog(mem, 64)
    seen: list[bool] = []
    dev.inflight = log
    for n in range(batch):
        drv.add([(DATA, 4)], [(DATA + 0x100 * n, 16)], n)
    chains = [dev.pop() for _ in range(batch)]
    pops = [call for call in log.calls if call[0] == "pop"]
    assert len(pops) == batch
    # The ring descriptors of each chain, as the driver laid them out.
    assert pops[1][1] == [get_desc(mem, 2), get_desc(mem, 3)]
    assert [descs[-1][2] for _, descs, _ in pops] == list(range(batch))  # type: ignore[index]
    log.calls.clear()
    before_publish = log.before_publish

    def watch_before(ids: Sequence[int]) -> None:
        seen.append(log.first_used_visible(dev))
        before_publish(ids)

    log.before_publish = watch_before  # type: ignore[method-assign]
    first_used = dev.next_used, dev.used_wrap_counter
    completions = [(chain, 16) for chain in reversed(chains)]  # out of order
    dev.add_used_batch(completions)  # type: ignore[arg-type]
    ids = list(reversed(range(batch)))
    assert log.calls == [("before", ids, False), ("after", ids, False)]
    assert seen == [False]  # before: the batch's first used descriptor not yet visible
    dev.set_next_used(*first_used)
    assert log.first_used_visible(dev)  # after: published
    assert [token for token, _ in drv.used()] == ids


def test_untracked_queue_has_no_recorder_and_tracking_can_start_any_time(
    mem: GuestMemory,
) -> None:
    drv, dev = pair(mem)
    assert dev.inflight is None
    round_trip(drv, dev, "untracked")
    log = _InflightLog(mem, 8)
    dev.inflight = log
    round_trip(drv, dev, "tracked")
    assert [call[0] for call in log.calls] == ["pop", "before", "after"]
    dev.inflight = None
    round_trip(drv, dev, "untracked again")
    assert len(log.calls) == 3


def test_inflight_recorder_refusing_a_chain_breaks_the_queue(mem: GuestMemory) -> None:
    drv, dev = pair(mem)
    log = _InflightLog(mem, 8)
    log.refuse_id = 7
    dev.inflight = log
    drv.add([], [(DATA, 8)], "seven")
    put_desc(mem, 0, DATA, 8, 7, avail() | DESC_F_WRITE)  # the driver's ID, rewritten
    pop_error(dev, "buffer ID 7 is already in flight")


def test_resubmitted_chains_go_first_through_the_one_walker(mem: GuestMemory) -> None:
    drv, dev = pair(mem, 8)
    for n in range(6):  # the ring moves on: 6 two-slot chains, 12 slots, one wrap
        drv.add([(DATA, 4)], [(DATA + 0x100, 8)], n)
        chain = dev.pop()
        assert chain is not None
        dev.add_used(chain, 0)
        assert list(drv.used()) == [(n, 0)]
    drv.add([(DATA, 4)], [(DATA + 0x200, 8)], "a")  # slots 4, 5
    drv.add([], [(DATA + 0x300, 8)], "b")  # slot 6
    drv.add([(DATA, 4)], [(DATA + 0x400, 8)], "c")  # slots 7, 0 (across the wrap)
    a_desc = [get_desc(mem, 4), get_desc(mem, 5)]
    c_desc = [get_desc(mem, 7), get_desc(mem, 0)]
    taken = [dev.pop() for _ in range(3)]
    # b completed; its used descriptor overwrote a's first slot.
    dev.add_used(taken[1], 8)  # type: ignore[arg-type]
    assert [token for token, _ in drv.used()] == ["b"]
    drv.add([], [(DATA + 0x500, 8)], "d")  # slot 1: the driver goes on
    # A new owner: used position after b (5, wrap 0); c then a were in flight.
    restarted = device(mem, 8)
    restarted.set_next_used(5, False)
    restarted.set_next_avail(5, False)
    restarted.resubmit([c_desc, a_desc])
    assert [token for token, _ in drv.used()] == []  # nothing looks used to the driver
    order = []
    while (chain := restarted.pop()) is not None:
        order.append(chain)
        restarted.add_used(chain, chain.writable_len)
    heads = [chain.head for chain in order]
    assert heads == [c_desc[-1][2], a_desc[-1][2], get_desc(mem, 1)[2]]
    assert [chain.readable_len + chain.writable_len for chain in order] == [12, 12, 8]
    assert (restarted.next_avail, restarted.avail_wrap_counter) == (2, True)
    assert [token for token, _ in drv.used()] == ["c", "a", "d"]
    with pytest.raises(ValueError, match="for a ring of 8"):
        restarted.resubmit([[(DATA, 8, 0, 0)]] * 9)
