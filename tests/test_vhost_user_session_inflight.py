"""Inflight I/O tracking in the vhost-user session: GET/SET_INFLIGHT_FD, recovery, hostile regions.

The front end here is the test (no socket): it negotiates INFLIGHT_SHMFD,
takes the region the session allocates or hands one back, plays a previous
back end by laying the region out by hand, and checks what the restarted
session serves first.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence

import pytest

from helpers.queues import RecordingInterrupt
from helpers.vhost_user_session import (
    BUFFER,
    MEM_SIZE,
    QUEUE_SIZE,
    USED,
    FrontEnd,
    R,
    close_session,
)
from pyvirtio.devices.entropy import Entropy
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user.actions import CloseFds, Disconnect, Reply
from pyvirtio.transport.vhost_user.inflight import SplitInflight
from pyvirtio.transport.vhost_user.protocol import InflightDesc, ProtocolFeature
from pyvirtio.transport.vhost_user.session import DEFAULT_PROTOCOL_FEATURES, VhostUserSession
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

SPLIT_HEADER = "<QHHHH"
SPLIT_DESC = "<B5xHQ"


@pytest.fixture
def session(device: Entropy, interrupt: RecordingInterrupt) -> Iterator[VhostUserSession]:
    """A session offering INFLIGHT_SHMFD, as ``serve blk`` asks for."""
    session = VhostUserSession(
        device,
        interrupt,
        name="test",
        protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask,
    )
    yield session
    close_session(session)


@pytest.fixture
def front(session: VhostUserSession) -> Iterator[FrontEnd]:
    front = FrontEnd(session)
    assert session.protocol_features_offered & ProtocolFeature.INFLIGHT_SHMFD.mask
    front.send(R.SET_PROTOCOL_FEATURES, ProtocolFeature.INFLIGHT_SHMFD.mask)
    yield front
    front.mem.close()


def get_region(front: FrontEnd, queue_size: int = QUEUE_SIZE) -> tuple[InflightDesc, int]:
    actions = front.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, queue_size))
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert len(reply.fds) == 1
    desc = front.reply(actions)
    assert isinstance(desc, InflightDesc)
    return desc, reply.fds[0]


def test_get_inflight_fd_gives_a_zeroed_sealed_memfd_of_the_size_it_says(
    front: FrontEnd,
) -> None:
    desc, fd = get_region(front)
    try:
        assert desc.num_queues == 1 and desc.mmap_offset == 0
        assert os.fstat(fd).st_size == desc.mmap_size
        # Room for the back end's largest ring, whatever queue_size said.
        assert desc.mmap_size >= 32 + 32 * 1024
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with mmap.mmap(fd, desc.mmap_size) as region:
            assert region[:] == bytes(desc.mmap_size)
    finally:
        os.close(fd)


def test_get_inflight_fd_for_the_wrong_queue_count_ends_the_session(front: FrontEnd) -> None:
    actions = front.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 5, QUEUE_SIZE))
    assert any(isinstance(a, Disconnect) for a in actions)


def test_a_fresh_region_is_initialised_and_records_requests(
    front: FrontEnd, session: VhostUserSession, eventfds: tuple[int, int]
) -> None:
    desc, fd = get_region(front)
    front.send(R.SET_INFLIGHT_FD, desc, fds=(fd,))
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    queue = session.running_queue(0)
    assert isinstance(queue, SplitDeviceQueue)
    assert isinstance(queue.inflight, SplitInflight)
    driver = front.driver_queue()
    driver.add([], [(BUFFER, 16)], "a")
    session.kick(0)
    assert list(driver.used()) == [("a", 16)]
    area = session.inflight
    assert area is not None
    features, version, desc_num, last_batch_head, used_idx = struct.unpack_from(
        SPLIT_HEADER, area.view, 0
    )
    assert (features, version, desc_num, used_idx) == (0, 1, QUEUE_SIZE, 1)
    # Taken (counter 0) and completed: not in flight any more.
    assert struct.unpack_from(SPLIT_DESC, area.view, 16 + 16 * last_batch_head) == (0, 0, 0)


def test_a_restarted_ring_resubmits_what_was_in_flight_oldest_first(
    front: FrontEnd, session: VhostUserSession, eventfds: tuple[int, int]
) -> None:
    # A previous back end took heads 0, 1 and 2, completed 1, and died.
    driver = front.driver_queue()
    for token in "abc":
        driver.add([], [(BUFFER + 0x100 * "abc".index(token), 16)], token)
    front.mem.write(USED + 4, struct.pack("<II", 1, 16))
    front.mem.write_u16(USED + 2, 1)
    region = bytearray(16 + 16 * QUEUE_SIZE)
    struct.pack_into(SPLIT_HEADER, region, 0, 0, 1, QUEUE_SIZE, 1, 1)
    struct.pack_into(SPLIT_DESC, region, 16 + 16 * 0, 1, 0, 7)
    struct.pack_into(SPLIT_DESC, region, 16 + 16 * 2, 1, 0, 3)
    fd = os.memfd_create("front-end-inflight", os.MFD_ALLOW_SEALING)
    os.write(fd, region)
    front.send(R.SET_INFLIGHT_FD, InflightDesc(len(region), 0, 1, QUEUE_SIZE), fds=(fd,))
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    # QEMU rewinds the ring to its used index: SET_VRING_BASE 1 was what it
    # would send; set_up_ring sent 0, which recovery overrides either way.
    session.kick(0)
    # b came back before the restart; then c (counter 3) before a (counter 7).
    assert list(driver.used()) == [("b", 16), ("c", 16), ("a", 16)]
    queue = session.running_queue(0)
    assert queue is not None and queue.next_avail == 3
    area = session.inflight
    assert area is not None
    for head in range(3):
        assert area.view[16 + 16 * head] == 0


def test_a_hostile_region_is_refused_and_the_ring_runs_untracked(
    front: FrontEnd, session: VhostUserSession, eventfds: tuple[int, int]
) -> None:
    region = bytearray(16 + 16 * QUEUE_SIZE)
    struct.pack_into(SPLIT_HEADER, region, 0, 0, 1, QUEUE_SIZE, 0, 0)
    # Two descriptors in flight with the same counter: no order to resubmit in.
    struct.pack_into(SPLIT_DESC, region, 16, 1, 0, 9)
    struct.pack_into(SPLIT_DESC, region, 32, 1, 0, 9)
    fd = os.memfd_create("front-end-inflight", os.MFD_ALLOW_SEALING)
    os.write(fd, region)
    front.send(R.SET_INFLIGHT_FD, InflightDesc(len(region), 0, 1, QUEUE_SIZE), fds=(fd,))
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    queue = session.running_queue(0)
    assert isinstance(queue, SplitDeviceQueue)
    assert queue.inflight is None
    driver = front.driver_queue()
    driver.add([], [(BUFFER, 8)], "new")
    session.kick(0)
    assert list(driver.used()) == [("new", 8)]


@pytest.mark.parametrize(
    ("size", "desc", "why"),
    [
        (4096, InflightDesc(8192, 0, 1, QUEUE_SIZE), "fd too small"),
        (4096, InflightDesc(4096, 4096, 1, QUEUE_SIZE), "offset past the fd"),
        (64, InflightDesc(64, 0, 1, QUEUE_SIZE), "too small for the queue"),
        (4096, InflightDesc(4096, 0, 2, QUEUE_SIZE), "queue count"),
    ],
)
def test_set_inflight_fd_with_a_bad_description_is_refused_and_its_fd_closed(
    front: FrontEnd, session: VhostUserSession, size: int, desc: InflightDesc, why: str
) -> None:
    fd = os.memfd_create("front-end-inflight", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    actions = front.send(R.SET_INFLIGHT_FD, desc, fds=(fd,), ack=True)
    assert front.reply(actions) == 1, why
    assert CloseFds((fd,)) in actions
    os.close(fd)
    assert session.inflight is None


def test_an_unsealable_inflight_fd_is_refused(front: FrontEnd, session: VhostUserSession) -> None:
    with tempfile.TemporaryFile() as file:
        file.truncate(4096)
        fd = os.dup(file.fileno())
        actions = front.send(
            R.SET_INFLIGHT_FD, InflightDesc(4096, 0, 1, QUEUE_SIZE), fds=(fd,), ack=True
        )
        assert front.reply(actions) == 1
        os.close(fd)
    assert session.inflight is None


def test_inflight_is_not_offered_by_default_and_needs_the_protocol_feature(
    device: Entropy, interrupt: RecordingInterrupt
) -> None:
    session = VhostUserSession(device, interrupt, name="default")
    assert not session.protocol_features_offered & ProtocolFeature.INFLIGHT_SHMFD.mask
    front = FrontEnd(session)
    try:
        actions = front.send(R.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, QUEUE_SIZE))
        assert any(isinstance(a, Disconnect) for a in actions)
    finally:
        front.mem.close()
        session.close()


# -- packed rings ---------------------------------------------------------------------------

PACKED_HEADER = "<QHHHHHHBB"
PACKED_DESC = "<BxHHHQHHIQ"


class Crash(BaseException):
    """The back end dies here: nothing after this point runs."""


class CrashAt:
    """An inflight recorder that dies at one point of a completion (the crash points)."""

    def __init__(self, inner: object, point: str) -> None:
        self.inner = inner
        self.point = point

    def pop(self, descriptors: Sequence[tuple[int, int, int, int]]) -> object:
        return self.inner.pop(descriptors)  # type: ignore[attr-defined]

    def before_publish(self, ids: Sequence[int]) -> None:
        self.inner.before_publish(ids)  # type: ignore[attr-defined]
        if self.point == "before publishing":
            raise Crash

    def after_publish(self, ids: Sequence[int]) -> None:
        if self.point == "after publishing":
            raise Crash
        self.inner.after_publish(ids)  # type: ignore[attr-defined]


class PackedBackEnd:
    """One back-end process: a session offering INFLIGHT_SHMFD on the guest's memory.

    The guest's memory and the inflight region outlive it, as QEMU keeps them
    across a back end's crash; a crashed back end is simply never used again.
    """

    def __init__(
        self, mem: GuestMemory, region_fd: int, region: InflightDesc, fds: tuple[int, int]
    ) -> None:
        self.session = VhostUserSession(
            Entropy(lambda n: b"\xab" * n),
            RecordingInterrupt(),
            name="packed",
            protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask,
        )
        self.front = FrontEnd(self.session)
        self.front.mem.close()
        self.front.mem = mem
        self.front.send(R.SET_PROTOCOL_FEATURES, ProtocolFeature.INFLIGHT_SHMFD.mask)
        fd = os.dup(region_fd)
        self.front.send(R.SET_INFLIGHT_FD, region, fds=(fd,))
        os.close(fd)  # the session's CloseFds action, carried out
        self.front.set_up_ring(kick_fd=fds[0], call_fd=fds[1], packed=True)

    def interrupt(self) -> RecordingInterrupt:
        interrupt = self.session.interrupt
        assert isinstance(interrupt, RecordingInterrupt)
        return interrupt

    def queue(self) -> PackedDeviceQueue:
        queue = self.session.running_queue(0)
        assert isinstance(queue, PackedDeviceQueue)
        return queue


@pytest.fixture
def packed_guest(front: FrontEnd) -> Iterator[tuple[GuestMemory, int, InflightDesc]]:
    """The guest's memory and the inflight region QEMU got from a first back end."""
    desc, fd = get_region(front)
    mem = GuestMemory.memfd(MEM_SIZE)
    yield mem, fd, desc
    os.close(fd)
    mem.close()


def add_chains(driver: PackedDriverQueue, tokens: str, *, descriptors: int = 1) -> None:
    for token in tokens:
        base = BUFFER + 0x100 * ord(token)
        driver.add([], [(base + 8 * n, 8) for n in range(descriptors)], token)


def in_flight(view: memoryview) -> list[int]:
    """Entries of the packed region marked in flight (a chain's head entry)."""
    return [i for i in range(QUEUE_SIZE) if view[32 + 32 * i]]


@pytest.mark.parametrize("rounds_before", [0, 5], ids=["fresh-ring", "wrapped-ring"])
def test_packed_restart_resubmits_popped_chains_oldest_first_each_once(
    packed_guest: tuple[GuestMemory, int, InflightDesc],
    eventfds: tuple[int, int],
    rounds_before: int,
) -> None:
    mem, fd, region = packed_guest
    first = PackedBackEnd(mem, fd, region, eventfds)
    driver = first.front.packed_driver_queue()
    # Earlier traffic moves the ring on (two-descriptor chains: with 5 rounds
    # of three the chains below straddle the end of the ring and its wrap).
    for _ in range(rounds_before):
        add_chains(driver, "xyz", descriptors=2)
        first.session.kick(0)
        assert [token for token, _ in driver.used()] == list("xyz")
    queue = first.queue()
    assert queue.inflight is not None
    add_chains(driver, "abcd", descriptors=2)
    chains = [queue.pop() for _ in range(4)]
    assert None not in chains
    # Out of order: c and a complete, b and d are in flight when it dies.
    queue.add_used_batch([(chains[2], 16)])  # type: ignore[list-item]
    queue.add_used_batch([(chains[0], 16)])  # type: ignore[list-item]
    assert [token for token, _ in driver.used()] == ["c", "a"]
    # Their head entries (two descriptors each) are marked in the region.
    assert in_flight(first.session.inflight.view) == [2, 6]  # type: ignore[union-attr]
    add_chains(driver, "e")  # made available while no back end runs
    # A restart: QEMU hands the region back; the ring's base it sends is stale.
    second = PackedBackEnd(mem, fd, region, eventfds)
    second.session.kick(0)
    assert [token for token, _ in driver.used()] == ["b", "d", "e"]
    area = second.session.inflight
    assert area is not None and in_flight(area.view) == []
    # The ring goes on with the same driver, positions in step.
    add_chains(driver, "fg")
    second.session.kick(0)
    assert [token for token, _ in driver.used()] == ["f", "g"]


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        # Used descriptors written, the first one's flags not: nothing was
        # published, both are resubmitted and complete once.
        ("before publishing", ["a", "b", "c"]),
        # Published, the region not yet told: the batch is committed at the
        # restart, not served again.
        ("after publishing", ["a", "b", "c"]),
    ],
)
def test_packed_crash_inside_a_completion_is_repaired(
    packed_guest: tuple[GuestMemory, int, InflightDesc],
    eventfds: tuple[int, int],
    point: str,
    expected: list[str],
) -> None:
    mem, fd, region = packed_guest
    first = PackedBackEnd(mem, fd, region, eventfds)
    assert first.interrupt().used == []  # a fresh region: nothing to tell the driver
    driver = first.front.packed_driver_queue()
    queue = first.queue()
    add_chains(driver, "ab")
    chains = [queue.pop() for _ in range(2)]
    queue.inflight = CrashAt(queue.inflight, point)
    with pytest.raises(Crash):
        queue.add_used_batch([(chains[1], 8), (chains[0], 8)])  # type: ignore[list-item]
    seen = [token for token, _ in driver.used()]
    assert seen == (["b", "a"] if point == "after publishing" else [])
    second = PackedBackEnd(mem, fd, region, eventfds)
    # Signalled once as it starts: the first back end may have published
    # completions it died before signalling (here: all it published).  Then
    # the device serves what was resubmitted (and signals it) as it starts.
    assert second.interrupt().used == ([0] if point == "after publishing" else [0, 0])
    add_chains(driver, "c")
    second.session.kick(0)
    seen += [token for token, _ in driver.used()]
    assert sorted(seen) == expected  # each exactly once
    area = second.session.inflight
    assert area is not None and in_flight(area.view) == []


def hostile_packed_region(header: tuple[int, ...], entries: dict[int, tuple[int, ...]]) -> int:
    region = bytearray(32 + 32 * QUEUE_SIZE)
    struct.pack_into(PACKED_HEADER, region, 0, *header)
    for index in range(QUEUE_SIZE):
        default = (0, index + 1, 0, 0, 0, 0, 0, 0, 0)
        struct.pack_into(PACKED_DESC, region, 32 + 32 * index, *entries.get(index, default))
    fd = os.memfd_create("front-end-inflight", os.MFD_ALLOW_SEALING)
    os.write(fd, region)
    return fd


@pytest.mark.parametrize(
    ("header", "entries", "why"),
    [
        ((0, 2, QUEUE_SIZE, 0, 0, 0, 0, 1, 1), {}, "version 2"),
        ((0, 1, QUEUE_SIZE * 2, 0, 0, 0, 0, 1, 1), {}, "tracks 32 descriptors"),
        ((1, 1, QUEUE_SIZE, 0, 0, 0, 0, 1, 1), {}, "features 0x1"),
        ((0, 1, QUEUE_SIZE, 0, 0, QUEUE_SIZE, 0, 1, 1), {}, "used_idx 16"),
        ((0, 1, QUEUE_SIZE, QUEUE_SIZE + 3, 0, 0, 0, 1, 1), {}, "free_head 19"),
        (
            (0, 1, QUEUE_SIZE, 2, 2, 0, 0, 1, 1),
            {0: (1, 9, 0, 1, 5, 0, 0, 8, BUFFER), 1: (1, 9, 1, 1, 5, 1, 0, 8, BUFFER)},
            "repeats counter 5",
        ),
        (
            (0, 1, QUEUE_SIZE, 1, 1, 0, 0, 1, 1),
            {0: (1, 9, 0, QUEUE_SIZE + 1, 5, 0, 0, 8, BUFFER)},
            "chain of 17",
        ),
    ],
)
def test_a_hostile_packed_region_is_refused_and_the_ring_runs_untracked(
    packed_guest: tuple[GuestMemory, int, InflightDesc],
    eventfds: tuple[int, int],
    caplog: pytest.LogCaptureFixture,
    header: tuple[int, ...],
    entries: dict[int, tuple[int, ...]],
    why: str,
) -> None:
    mem, _, _ = packed_guest
    fd = hostile_packed_region(header, entries)
    try:
        region = InflightDesc(os.fstat(fd).st_size, 0, 1, QUEUE_SIZE)
        back_end = PackedBackEnd(mem, fd, region, eventfds)
    finally:
        os.close(fd)
    assert "inflight region refused, the ring runs untracked" in caplog.text
    assert why in caplog.text
    queue = back_end.queue()
    assert queue.inflight is None
    driver = back_end.front.packed_driver_queue()
    add_chains(driver, "n")
    back_end.session.kick(0)
    assert list(driver.used()) == [("n", 8)]


def test_a_packed_region_with_room_only_for_split_rings_is_refused(
    packed_guest: tuple[GuestMemory, int, InflightDesc],
    eventfds: tuple[int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mem, _, _ = packed_guest
    size = 16 + 16 * QUEUE_SIZE  # a split queue's region: half what a packed one needs
    fd = os.memfd_create("front-end-inflight", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    try:
        back_end = PackedBackEnd(mem, fd, InflightDesc(size, 0, 1, QUEUE_SIZE), eventfds)
    finally:
        os.close(fd)
    assert "cannot hold 16 descriptors" in caplog.text
    assert back_end.queue().inflight is None
