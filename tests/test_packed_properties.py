"""Property tests: a packed driver queue and device queue on one guest memory.

Random programs of add / pop / complete (out of order, singly or batched) /
drain / sleep / snapshot over small and odd ring sizes, many wraps, with and
without EVENT_IDX and indirect tables.  Checked throughout: every token
comes back exactly once with the written count the device reported, the
device sees exactly the buffers the driver added, device-written bytes reach
the driver, a sleeping side is always notified (no lost wake-ups), and the
ring is whole again at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.packed import DATA, MEM_SIZE, pair
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed_layout
from pyvirtio.virtqueue.common import DescriptorChain, QueueFullError
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue

ELEM = 64  # bytes reserved per element
AREA = 8 * ELEM  # bytes reserved per token
#: Token data areas are reused round robin; all of them lie in the guest memory.
AREAS = 1500
assert DATA + AREAS * AREA <= MEM_SIZE
MAX_INDIRECT = 3

OPS = ("add", "add", "add", "pop", "complete", "batch", "drain", "cycle", "sleep", "snapshot")


def pattern(token: int, length: int, salt: int) -> bytes:
    return bytes((token * 7 + salt + k) & 0xFF for k in range(length))


@dataclass
class Request:
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    slots: int
    written: int | None = None  # set when the device completes it


@dataclass
class World:
    mem: GuestMemory
    drv: PackedDriverQueue
    dev: PackedDeviceQueue
    size: int
    indirect: bool
    requests: dict[int, Request] = field(default_factory=dict)
    popped: list[tuple[int, DescriptorChain]] = field(default_factory=list)
    returned: set[int] = field(default_factory=set)
    by_base: dict[int, int] = field(default_factory=dict)  # first element -> token
    next_token: int = 0
    free_slots: int = 0
    # A side is "asleep" when it waits for a notification: it enabled them
    # and then found nothing to do.  The other side must then notify it.
    device_asleep: bool = False
    driver_asleep: bool = False
    device_enabled: bool = True  # notifications enabled (zeroed areas mean ENABLE)
    driver_enabled: bool = True

    # -- driver ---------------------------------------------------------------

    def add(self, n_read: int, n_write: int, lengths: list[int]) -> None:
        token = self.next_token
        base = DATA + (token % AREAS) * AREA
        ranges = [(base + j * ELEM, lengths[j]) for j in range(n_read + n_write)]
        readable, writable = ranges[:n_read], ranges[n_read:]
        n = n_read + n_write
        slots = 1 if self.indirect and 1 < n <= MAX_INDIRECT else n
        for addr, length in readable:
            self.mem.write(addr, pattern(token, length, addr))
        if n == 0:
            try:
                self.drv.add(readable, writable, token)
            except ValueError:
                return
            raise AssertionError("an empty request was accepted")
        if slots > self.size:
            try:
                self.drv.add(readable, writable, token)
            except ValueError:
                return
            raise AssertionError("a request larger than the ring was accepted")
        if slots > self.free_slots:
            try:
                self.drv.add(readable, writable, token)
            except QueueFullError:
                assert self.drv.num_free == self.free_slots
                return
            raise AssertionError("add succeeded without room")
        self.drv.add(readable, writable, token)
        self.next_token += 1
        self.free_slots -= slots
        assert self.drv.num_free == self.free_slots
        self.requests[token] = Request(readable, writable, slots)
        self.by_base[base] = token
        kick = self.drv.kick_needed()
        if self.device_asleep:
            assert kick, "lost available buffer notification"
        if kick:
            self.device_asleep = False

    def drain(self) -> None:
        """Collect used buffers; with interrupts enabled, an empty ring means sleep."""
        self.driver_asleep = False
        for token, written in self.drv.used():
            assert isinstance(token, int)
            assert token not in self.returned, f"token {token} returned twice"
            req = self.requests[token]
            assert req.written is not None, f"token {token} returned before completion"
            assert written == req.written
            got = self.mem.readv(req.writable)[:written]
            assert got == pattern(token, written, 1)
            self.returned.add(token)
            self.free_slots += req.slots
            assert self.drv.num_free == self.free_slots
        # used() moves its DESC event along as it consumes, so a driver that
        # never re-enables interrupts still hears of the next used buffer.
        self.driver_asleep = self.driver_enabled

    def sleep_driver(self, disable_after: bool) -> None:
        self.driver_enabled = True
        if not self.drv.enable_interrupts():
            self.driver_asleep = True
        elif disable_after:
            self.drv.disable_interrupts()
            self.driver_enabled = False

    # -- device -----------------------------------------------------------------

    def pop(self, limit: int) -> None:
        """Pop chains; with notifications enabled, an empty ring means sleep."""
        self.device_asleep = False
        for _ in range(limit):
            chain = self.dev.pop()
            if chain is None:
                # pop() moves its DESC event along as it consumes, so a device
                # that never re-enables notifications still hears of the next.
                self.device_asleep = self.device_enabled
                return
            token = self.by_base.pop((chain.readable or chain.writable)[0][0])
            req = self.requests[token]
            assert chain.readable == req.readable
            assert chain.writable == req.writable
            assert chain.ring_slots == req.slots
            for addr, length in req.readable:
                assert chain.mem.read(addr, length) == pattern(token, length, addr)
            assert chain.read_all() == b"".join(
                pattern(token, length, addr) for addr, length in req.readable
            )
            self.popped.append((token, chain))

    def _finish(self, token: int, chain: DescriptorChain, written: int) -> None:
        chain.write(pattern(token, written, 1))
        self.requests[token].written = written

    def _notified(self) -> None:
        note = self.dev.needs_notification()
        if self.driver_asleep:
            assert note, "lost used buffer notification"
        if note:
            self.driver_asleep = False

    def complete(self, index: int, fraction: float) -> None:
        if not self.popped:
            return
        token, chain = self.popped.pop(index % len(self.popped))
        written = int(chain.writable_len * fraction)
        self._finish(token, chain, written)
        self.dev.add_used(chain, written)
        self._notified()

    def batch(self, order: list[int], fraction: float) -> None:
        if not self.popped:
            return
        chosen = []
        for index in order:
            if self.popped:
                chosen.append(self.popped.pop(index % len(self.popped)))
        completions = []
        for token, chain in chosen:
            written = int(chain.writable_len * fraction)
            self._finish(token, chain, written)
            completions.append((chain, written))
        self.dev.add_used_batch(completions)
        self._notified()

    def sleep_device(self, disable_after: bool) -> None:
        self.device_enabled = True
        if not self.dev.enable_notifications():
            self.device_asleep = True
        elif disable_after:
            self.dev.disable_notifications()
            self.device_enabled = False

    def snapshot(self) -> None:
        state = json.loads(json.dumps(self.dev.state()))
        self.dev = PackedDeviceQueue.from_state(self.mem, state)
        assert self.dev.state() == state

    # -- end ----------------------------------------------------------------------

    def cycle(self) -> None:
        """What a simple device loop does on a kick: everything, in order."""
        self.pop(self.size)
        if self.popped:
            self.batch([0] * len(self.popped), 1.0)
        self.drain()

    def finish(self) -> None:
        for _ in range(self.size + 2):
            self.cycle()
        assert self.returned == set(self.requests)
        assert self.drv.num_free == self.size
        assert self.drv.in_flight == 0
        assert self.dev.pop() is None
        assert not self.dev.broken and not self.drv.broken


class Program:
    """Reads a test program from one byte string: one draw, however many operations."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def below(self, n: int) -> int:
        return self.byte() % n


FRACTIONS = (0.0, 0.5, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    program=st.binary(min_size=600, max_size=4000),
)
def test_random_programs(size: int, event_idx: bool, indirect: bool, program: bytes) -> None:
    with GuestMemory.anonymous(MEM_SIZE) as mem:
        drv, dev = pair(
            mem, size, event_idx=event_idx, indirect=indirect, max_indirect=MAX_INDIRECT
        )
        world = World(mem, drv, dev, size, indirect, free_slots=size)
        prog = Program(program)
        while prog:
            op = OPS[prog.below(len(OPS))]
            if op == "add":
                n_read = prog.below(4)
                n_write = prog.below(4)
                lengths = [prog.below(ELEM + 1) for _ in range(n_read + n_write)]
                world.add(n_read, n_write, lengths)
            elif op == "pop":
                world.pop(1 + prog.below(size + 1))
            elif op == "complete":
                world.complete(prog.byte(), FRACTIONS[prog.below(3)])
            elif op == "batch":
                order = [prog.byte() for _ in range(1 + prog.below(6))]
                world.batch(order, FRACTIONS[prog.below(3)])
            elif op == "drain":
                world.drain()
            elif op == "cycle":
                world.cycle()
            elif op == "sleep":
                if prog.below(2):
                    world.sleep_device(bool(prog.below(2)))
                else:
                    world.sleep_driver(bool(prog.below(2)))
            else:
                world.snapshot()
        world.finish()


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 32768),
    start=st.integers(0, 2**20),
    data=st.data(),
    event_idx=st.booleans(),
)
def test_need_event_against_positions(
    size: int, start: int, data: st.DataObject, event_idx: bool
) -> None:
    """DESC fires iff the event descriptor is one of the ``count`` slots just processed.

    Positions are linear slot numbers; a slot's ring offset is ``p % size``
    and its wrap counter ``1 - (p // size) % 2`` (the counter starts at 1).
    """
    count = data.draw(st.integers(0, 2 * size), label="count")
    event = data.draw(st.integers(0, 2 * size - 1), label="event slot in a two-lap cycle")
    off, off_wrap = event % size, 1 - (event // size) % 2
    end = start + count
    new, wrap = end % size, 1 - (end // size) % 2
    # Exact up to one lap; beyond that the one wrap bit cannot tell, so notify.
    expected = count > size or (event - start) % (2 * size) < count
    got = packed_layout.need_event(
        packed_layout.RING_EVENT_FLAGS_DESC, off | off_wrap << 15, event_idx, new, wrap, count, size
    )
    assert got == (expected if event_idx else True)
