"""Placing received frames into receive buffers, with and without MRG_RXBUF, on a real ring."""

from __future__ import annotations

import pytest

from helpers.net import frame_of
from helpers.queues import make_pair
from pyvirtio.devices.net.frames import Dropped, GuestViews
from pyvirtio.devices.net.receive import Completions, RxBuffers
from pyvirtio.devices.net.wire import HDR_SIZE, NetHeader
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DeviceQueue, DriverQueue

SIZE = 8


class Receiveq:
    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(1 << 20)
        self.alloc = GuestAllocator(self.mem, 0x10000, (1 << 20) - 0x10000)
        pair: tuple[DriverQueue, DeviceQueue] = make_pair(
            self.mem, 0x1000, SIZE, packed_ring=False, event_idx=False, indirect=False,
            indirect_addr=None,
        )  # fmt: skip
        self.driver, self.device = pair
        self.ranges: dict[object, tuple[int, int]] = {}
        self.reports: list[Dropped] = []
        self.rx = RxBuffers(GuestViews(), self.reports.append)

    def post(self, token: object, size: int, *, readable: bool = False) -> None:
        addr = self.alloc.alloc(size)
        self.ranges[token] = (addr, size)
        if readable:
            self.driver.add([(addr, size)], [], token)
        else:
            self.driver.add([], [(addr, size)], token)

    def place(self, data: bytes, mergeable: bool) -> bool:
        done: Completions = []
        placed = self.rx.place(self.device, memoryview(bytearray(data)), mergeable, done)
        self.device.add_used_batch(done)
        return placed

    def received(self) -> list[tuple[object, bytes]]:
        return [(t, self.mem.read(self.ranges[t][0], n)) for t, n in self.driver.used()]


@pytest.fixture
def q() -> Receiveq:
    return Receiveq()


def packet(size: int) -> bytes:
    return NetHeader().pack() + frame_of(size)


def test_a_frame_takes_one_chain_that_holds_it(q: Receiveq) -> None:
    q.post("a", 2048)
    assert q.place(packet(100), mergeable=False)
    ((token, data),) = q.received()
    assert token == "a" and NetHeader.unpack(data).num_buffers == 1
    assert data[HDR_SIZE:] == frame_of(100)


def test_without_mrg_rxbuf_a_frame_too_large_is_dropped_and_the_chain_kept(q: Receiveq) -> None:
    q.post("small", 64)
    with pytest.raises(Dropped) as dropped:
        q.place(packet(200), mergeable=False)
    assert dropped.value.counter == "rx_dropped_no_room"
    assert q.received() == [] and len(q.rx.stash) == 1
    assert q.place(packet(40), mergeable=False)  # the kept chain holds the next one
    assert [t for t, _ in q.received()] == ["small"]
    assert q.rx.stash == []


def test_mrg_rxbuf_spreads_a_frame_over_chains_filled_in_order(q: Receiveq) -> None:
    for token in "abc":
        q.post(token, 100)
    data = packet(250)  # 262 bytes: 100 + 100 + 62
    assert q.place(data, mergeable=True)
    received = q.received()
    assert [t for t, _ in received] == ["a", "b", "c"]
    assert [len(d) for _, d in received] == [100, 100, 62]
    whole = b"".join(d for _, d in received)
    assert NetHeader.unpack(whole).num_buffers == 3 and whole[HDR_SIZE:] == frame_of(250)


def test_a_frame_waits_in_the_stash_until_buffers_come(q: Receiveq) -> None:
    q.post("a", 100)
    assert not q.place(packet(150), mergeable=True)
    assert len(q.rx.stash) == 1 and q.received() == []
    assert q.rx.has_buffer(q.device)
    q.post("b", 100)
    assert q.place(packet(150), mergeable=True)
    assert [t for t, _ in q.received()] == ["a", "b"]


def test_a_frame_larger_than_the_whole_queue_is_dropped(q: Receiveq) -> None:
    for n in range(SIZE):
        q.post(n, 64)
    with pytest.raises(Dropped, match="does not fit the whole receive queue"):
        q.place(packet(SIZE * 64), mergeable=True)
    assert len(q.rx.take_stash()) == SIZE and q.rx.stash == []


def test_a_frame_larger_than_a_queue_of_multi_descriptor_chains_is_dropped(q: Receiveq) -> None:
    # Chains of two descriptors fill the ring with SIZE // 2 chains: the driver
    # can give no more, so the frame is dropped rather than waiting for good.
    for n in range(SIZE // 2):
        q.driver.add([], [(q.alloc.alloc(HDR_SIZE), HDR_SIZE) for _ in range(2)], n)
    assert q.driver.num_free == 0
    with pytest.raises(Dropped, match="does not fit the whole receive queue"):
        q.place(packet(SIZE * 64), mergeable=True)
    # The chains held serve the next frame that fits them.
    assert q.place(packet(30), mergeable=True)
    assert [(t, n) for t, n in q.driver.used()] == [(0, 24), (1, HDR_SIZE + 30 - 24)]


def test_unusable_chains_go_back_empty_and_are_reported(q: Receiveq) -> None:
    q.post("readable", 2048, readable=True)
    q.post("tiny", HDR_SIZE - 1)
    q.post("good", 2048)
    assert q.place(packet(60), mergeable=False)
    assert [(t, len(d)) for t, d in q.received()] == [("readable", 0), ("tiny", 0), ("good", 72)]
    assert [r.counter for r in q.reports] == ["rx_bad_chain", "rx_bad_chain"]
    assert not q.rx.has_buffer(q.device)
