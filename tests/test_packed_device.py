"""Unit tests of the packed ring's device side (packed_device.py).

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
    avail,
    device,
    expect_broken,
    put_desc,
)
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
    expect_broken(dev, "longer than the queue size")


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
    expect_broken(dev, "outside guest memory")


def test_buffer_outside_memory_in_chain(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 1, 0xFFFF_0000_0000, 8, 0, avail(1))
    put_desc(mem, 0, DATA, 8, 0, avail(1) | DESC_F_NEXT)
    expect_broken(dev, "outside guest memory")


def test_buffer_end_overflows_address_space(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, (1 << 64) - 16, 32, 0, avail(1))
    expect_broken(dev, "overflows")


def test_indirect_not_negotiated(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    expect_broken(dev, "not negotiated")


def test_nested_indirect(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 1, INDIRECT, 16, 0, DESC_F_INDIRECT, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 32, 0, avail(1) | DESC_F_INDIRECT)
    expect_broken(dev, "itself INDIRECT")


def test_indirect_with_next(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT | DESC_F_NEXT)
    put_desc(mem, 1, DATA, 4, 0, avail(1))
    expect_broken(dev, "NEXT-linked chain")


def test_indirect_inside_a_chain(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 1, INDIRECT, 16, 0, avail(1) | DESC_F_INDIRECT)
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_NEXT)
    expect_broken(dev, "NEXT-linked chain")


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
    expect_broken(dev, match)


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
    expect_broken(dev, "outside guest memory")


def test_readable_after_writable(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 1, DATA + 16, 4, 0, avail(1))
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_WRITE | DESC_F_NEXT)
    expect_broken(dev, "readable descriptor 1 after a writable one")


def test_readable_after_writable_in_indirect_table(mem: GuestMemory) -> None:
    dev = device(mem, indirect=True)
    put_desc(mem, 0, DATA, 4, 0, DESC_F_WRITE, base=INDIRECT)
    put_desc(mem, 1, DATA + 16, 4, 0, 0, base=INDIRECT)
    put_desc(mem, 0, INDIRECT, 32, 0, avail(1) | DESC_F_INDIRECT)
    expect_broken(dev, "readable after a writable")


def test_chain_continuation_not_available(mem: GuestMemory) -> None:
    dev = device(mem)
    put_desc(mem, 0, DATA, 4, 0, avail(1) | DESC_F_NEXT)  # descriptor 1 still zero
    expect_broken(dev, "descriptor 1 continues the chain but is not available")


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
