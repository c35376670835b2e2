"""Property tests: a SplitDriverQueue and a SplitDeviceQueue over one guest memory.

Random sequences of adds, pops and out-of-order completions, on small queues
started near the 16-bit index wrap, must return every token exactly once with
the right byte count and data, never lose a notification the other side is
waiting for, and give back every descriptor.  Garbage rings must only ever
raise VirtqueueError on either side.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import DescriptorChain, QueueFullError, VirtqueueError
from pyvirtio.virtqueue.split import (
    SplitDeviceQueue,
    SplitDriverQueue,
    area_sizes,
    indirect_area_size,
)

MEM_SIZE = 0x20000
DESC = 0x1000
AVAIL = 0x2000
USED = 0x3000
IND = 0x4000
DATA = 0x10000
BUF = 32  # bytes per buffer
MAX_BUFS = 4  # buffers per request
SLOT = BUF * 2 * MAX_BUFS  # a request has up to MAX_BUFS readable and writable

_DESC_FMT = struct.Struct("<QIHH")


def pattern(token: int, length: int, salt: int) -> bytes:
    return bytes((token * 7 + salt * 13 + i) & 0xFF for i in range(length))


@dataclass
class Request:
    token: int
    slot: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    written: int | None = None


@dataclass
class Harness:
    """Both sides plus the test's model of what should happen."""

    mem: GuestMemory
    drv: SplitDriverQueue
    dev: SplitDeviceQueue
    size: int
    free_slots: list[int]
    outstanding: dict[int, Request] = field(default_factory=dict)
    by_slot: dict[int, Request] = field(default_factory=dict)
    popped: list[DescriptorChain] = field(default_factory=list)
    returned: set[int] = field(default_factory=set)
    next_token: int = 0
    device_waiting: bool = False
    driver_waiting: bool = False

    # -- driver ---------------------------------------------------------------

    def add(self, nread: int, nwrite: int, lengths: list[int]) -> None:
        if not self.free_slots:
            return
        slot = self.free_slots[-1]
        base = DATA + slot * SLOT
        ranges = [(base + i * BUF, lengths[i]) for i in range(nread + nwrite)]
        readable, writable = ranges[:nread], ranges[nread:]
        token = self.next_token
        for i, (addr, length) in enumerate(readable):
            self.mem.write(addr, pattern(token, length, i))
        total = nread + nwrite
        free_before = self.drv.num_free
        if total > self.size and not (self.drv.indirect and total <= self.drv.max_indirect):
            with pytest.raises(ValueError, match="never fit"):
                self.drv.add(readable, writable, token)
            return
        try:
            self.drv.add(readable, writable, token)
        except QueueFullError:
            assert self.drv.num_free == free_before
            return
        self.free_slots.pop()
        self.next_token += 1
        request = Request(token, slot, readable, writable)
        self.outstanding[token] = request
        self.by_slot[slot] = request
        kick = self.drv.kick_needed()
        if self.device_waiting:
            assert kick, "the device was waiting for a notification and got none"
            self.device_waiting = False

    def drain(self, disable_first: bool) -> None:
        if disable_first:
            self.drv.disable_interrupts()
            self.driver_waiting = False
        while True:
            for token, written in self.drv.used():
                self.check_returned(token, written)
            self.driver_waiting = False
            if not self.drv.enable_interrupts():
                self.driver_waiting = True
                return

    def check_returned(self, token: object, written: int) -> None:
        assert isinstance(token, int)
        assert token not in self.returned, f"token {token} returned twice"
        request = self.outstanding.pop(token)
        assert request.written == written
        self.returned.add(token)
        data = b"".join(self.mem.read(a, n) for a, n in request.writable)[:written]
        assert data == pattern(token, written, 99)
        del self.by_slot[request.slot]
        self.free_slots.append(request.slot)

    # -- device ---------------------------------------------------------------

    def pop(self, limit: int, disable_first: bool) -> None:
        if disable_first:
            self.dev.disable_notifications()
            self.device_waiting = False
        for _ in range(limit):
            chain = self.dev.pop()
            if chain is None:
                if not self.dev.enable_notifications():
                    self.device_waiting = True
                    return
                continue
            self.check_popped(chain)
            self.popped.append(chain)

    def check_popped(self, chain: DescriptorChain) -> None:
        first = (chain.readable or chain.writable)[0][0]
        request = self.by_slot[(first - DATA) // SLOT]
        assert chain.readable == request.readable
        assert chain.writable == request.writable
        expected = b"".join(pattern(request.token, n, i) for i, (_, n) in enumerate(chain.readable))
        assert chain.read_all() == expected

    def complete(self, order: list[int], fractions: list[float], batch: bool) -> None:
        if not self.popped:
            return
        chosen = []
        for position in order:
            if self.popped:
                chosen.append(self.popped.pop(position % len(self.popped)))
        if not chosen:
            return
        completions = []
        for chain, fraction in zip(chosen, fractions + [1.0] * len(chosen), strict=False):
            written = int(chain.writable_len * fraction)
            first = (chain.readable or chain.writable)[0][0]
            request = self.by_slot[(first - DATA) // SLOT]
            assert chain.write(pattern(request.token, written, 99)) == written
            request.written = written
            completions.append((chain, written))
        if batch:
            self.dev.add_used_batch(completions)
        else:
            for chain, written in completions:
                self.dev.add_used(chain, written)
        notify = self.dev.needs_notification()
        if self.driver_waiting:
            assert notify, "the driver was waiting for an interrupt and got none"
            self.driver_waiting = False

    def finish(self) -> None:
        """Complete everything, then check the books balance."""
        for _ in range(4 * self.size + 4):
            self.pop(self.size + 1, disable_first=False)
            self.complete(list(range(len(self.popped))), [], batch=True)
            self.drain(disable_first=False)
            if not self.outstanding:
                break
        assert not self.outstanding
        assert self.drv.num_free == self.size
        assert self.drv.in_flight == 0
        assert not self.dev.has_available()
        assert not self.dev.broken
        assert not self.drv.broken
        assert self.dev.next_used == self.drv.state()["last_used"]


def build(size: int, start: int, event_idx: bool, indirect: bool, max_indirect: int) -> Harness:
    mem = GuestMemory.anonymous(MEM_SIZE)
    assert IND + indirect_area_size(size, max_indirect) <= DATA
    kwargs: dict[str, object] = {}
    if indirect:
        kwargs = {"indirect_addr": IND, "max_indirect": max_indirect}
    fresh = SplitDriverQueue(
        mem,
        size,
        DESC,
        AVAIL,
        USED,
        event_idx=event_idx,
        indirect=indirect,
        **kwargs,  # type: ignore[arg-type]
    )
    drv_state = fresh.state()
    drv_state.update(avail_idx=start, last_used=start, kick_marker=start)
    drv = SplitDriverQueue.from_state(mem, drv_state)
    dev_state = SplitDeviceQueue(
        mem, size, DESC, AVAIL, USED, event_idx=event_idx, indirect=indirect
    ).state()
    dev_state.update(next_avail=start, next_used=start, signalled_used=start)
    dev = SplitDeviceQueue.from_state(mem, dev_state)
    # The rings' indices as they would be after ``start`` round trips.
    mem.write_u16(AVAIL + 2, start)
    mem.write_u16(USED + 2, start)
    mem.write_u16(AVAIL + 4 + 2 * size, start)  # used_event
    mem.write_u16(USED + 4 + 8 * size, start)  # avail_event
    return Harness(mem, drv, dev, size, free_slots=list(range(size)))


class OpStream:
    """Operations decoded from a byte string: cheap for hypothesis to generate and shrink."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def take(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def run(self, harness: Harness) -> None:
        while self.more():
            kind = self.take() % 8
            if kind <= 2:
                big = self.take() % 8 == 0  # mostly small requests, sometimes up to 4 + 4
                limit = MAX_BUFS + 1 if big else 3
                nread = self.take() % limit
                nwrite = self.take() % limit
                lengths = [self.take() % (BUF + 1) for _ in range(nread + nwrite)]
                if nread + nwrite:
                    harness.add(nread, nwrite, lengths)
            elif kind == 3:
                harness.pop(self.take() % 8 + 1, disable_first=self.take() % 4 == 0)
            elif kind in {4, 5}:
                count = self.take() % 4 + 1
                order = [self.take() for _ in range(count)]
                fractions = [self.take() / 255 for _ in range(count)]
                harness.complete(order, fractions, batch=bool(self.take() & 1))
            else:
                harness.drain(disable_first=self.take() % 4 == 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    start=st.one_of(st.integers(65536 - 10, 65535), st.integers(0, 65535)),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    max_indirect=st.integers(2, 4),
    ops=st.binary(min_size=400, max_size=2000),
)
def test_random_traffic_round_trips_every_token(
    size: int,
    start: int,
    event_idx: bool,
    indirect: bool,
    max_indirect: int,
    ops: bytes,
) -> None:
    harness = build(size, start, event_idx, indirect, max_indirect)
    try:
        OpStream(ops).run(harness)
        harness.finish()
        event("index wrapped" if start + harness.next_token > 0xFFFF else "no index wrap")
        event("ring wrapped" if harness.next_token > size else "no ring wrap")
        event(f"tokens {min(harness.next_token // 10 * 10, 50)}+")
    finally:
        harness.mem.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([2, 4, 8]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    start=st.integers(65536 - 300, 65535),
    seed=st.integers(0, 2**32 - 1),
)
def test_many_wraps_of_the_ring_and_index(
    size: int, event_idx: bool, indirect: bool, start: int, seed: int
) -> None:
    """Hundreds of requests through the 65536 wrap, completing in shuffled order.

    The ring is kept full of two-buffer requests while only part of it is
    popped and completed each round, so descriptors are freed out of order
    and reused while other requests still wait in the available ring.
    """
    rng = random.Random(seed)
    harness = build(size, start, event_idx, indirect, 2)
    try:
        rounds = 0
        # Past 65536 - start tokens, both 16-bit indices have wrapped.
        while harness.next_token < 65536 - start + 2 * size:
            rounds += 1
            assert rounds < 10_000, "no progress"
            while harness.free_slots:
                before = harness.next_token
                harness.add(1, 1, [rng.randrange(BUF + 1) for _ in range(8)])
                if harness.next_token == before:
                    break  # the ring is full
            harness.pop(rng.randrange(1, size + 2), disable_first=rng.random() < 0.3)
            order = list(range(len(harness.popped)))
            rng.shuffle(order)
            harness.complete(order[: rng.randrange(len(order) + 1)], [0.5], rng.random() < 0.5)
            harness.drain(disable_first=rng.random() < 0.3)
        harness.finish()
    finally:
        harness.mem.close()


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    indirect=st.booleans(),
    descriptors=st.binary(min_size=16 * 8, max_size=16 * 8),
    table=st.binary(min_size=0, max_size=64),
    heads=st.lists(st.integers(0, 10), min_size=8, max_size=8),
    avail_idx=st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
    lengths_small=st.booleans(),
)
def test_garbage_rings_only_raise_virtqueue_error(
    size: int,
    indirect: bool,
    descriptors: bytes,
    table: bytes,
    heads: list[int],
    avail_idx: int,
    lengths_small: bool,
) -> None:
    with GuestMemory.anonymous(MEM_SIZE) as mem:
        raw = bytearray(descriptors)
        if lengths_small:
            # Bias towards plausible descriptors: addresses and lengths in memory,
            # indirect tables pointing at IND.
            for i in range(8):
                addr, length, flags, nxt = _DESC_FMT.unpack_from(raw, 16 * i)
                addr = IND if flags & 4 else addr % MEM_SIZE
                _DESC_FMT.pack_into(raw, 16 * i, addr, length % 256, flags & 7, nxt % 10)
        mem.write(DESC, bytes(raw[: 16 * size]))
        mem.write(IND, table)
        for i, head in enumerate(heads[:size]):
            mem.write_u16(AVAIL + 4 + 2 * i, head)
        mem.write_u16(AVAIL + 2, avail_idx)
        queue = SplitDeviceQueue(mem, size, DESC, AVAIL, USED, indirect=indirect)
        for _ in range(size + 2):
            try:
                chain = queue.pop()
            except VirtqueueError:
                assert queue.broken
                return
            if chain is None:
                return
            for addr, length in chain.readable + chain.writable:
                assert mem.is_valid(addr, length)
            assert chain.readable_len == sum(n for _, n in chain.readable)
            assert chain.writable_len == sum(n for _, n in chain.writable)
            assert chain.readable_len + chain.writable_len <= 2**32
            queue.add_used(chain, 0)


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    requests=st.integers(0, 8),
    elements=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 80)), max_size=8),
    used_idx=st.integers(0, 0xFFFF),
)
def test_garbage_used_ring_only_raises_virtqueue_error(
    size: int, requests: int, elements: list[tuple[int, int]], used_idx: int
) -> None:
    with GuestMemory.anonymous(MEM_SIZE) as mem:
        drv = SplitDriverQueue(mem, size, DESC, AVAIL, USED)
        added = []
        for token in range(min(requests, size)):
            drv.add([], [(DATA, 64)], token)
            added.append(token)
        for i, (head, length) in enumerate(elements[:size]):
            mem.write_u32(USED + 4 + 8 * i, head)
            mem.write_u32(USED + 8 + 8 * i, length)
        mem.write_u16(USED + 2, used_idx)
        seen = []
        try:
            for token, written in drv.used():
                assert token in added and token not in seen
                assert 0 <= written <= 64
                seen.append(token)
        except VirtqueueError:
            assert drv.broken
        assert drv.in_flight == len(added) - len(seen)
        assert drv.num_free == size - drv.in_flight


def test_area_sizes_match_the_harness_layout() -> None:
    desc_len, avail_len, used_len = area_sizes(8)
    assert DESC + desc_len <= AVAIL
    assert AVAIL + avail_len <= USED
    assert USED + used_len <= IND
