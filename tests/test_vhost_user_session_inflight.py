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
from collections.abc import Iterator

import pytest

from helpers.queues import RecordingInterrupt
from helpers.vhost_user_session import BUFFER, QUEUE_SIZE, USED, FrontEnd, R
from pyvirtio.devices.entropy import Entropy
from pyvirtio.transport.vhost_user.actions import CloseFds, Disconnect, Reply
from pyvirtio.transport.vhost_user.inflight import SplitInflight
from pyvirtio.transport.vhost_user.protocol import InflightDesc, ProtocolFeature
from pyvirtio.transport.vhost_user.session import DEFAULT_PROTOCOL_FEATURES, VhostUserSession
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
    for action in session.close():
        assert isinstance(action, CloseFds)
        for fd in action.fds:
            os.close(fd)


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
