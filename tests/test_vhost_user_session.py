"""VhostUserSession without a socket: messages and fds in, replies and actions out.

The front end's side is played by the test: its memory is a memfd the
session maps too (the fd travels in SET_MEM_TABLE as over a socket), its
ring a SplitDriverQueue in that memory, its kick the session's ``kick``.
The DeviceInterrupt is the recorder of helpers.queues: what the host would
signal is what the device asked for, which is what these tests check.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers.queues import RecordingInterrupt
from helpers.vhost_user import StopFailsOnce
from helpers.vhost_user_session import BUFFER, MEM_SIZE, USER_BASE, FrontEnd, R, close_session
from pyvirtio.device import DeviceState
from pyvirtio.devices.entropy import Entropy
from pyvirtio.transport.vhost_user.actions import (
    Action,
    CloseFds,
    Disconnect,
    NotifyKind,
    Reply,
    SetBackendChannel,
    SetNotifyFd,
    WatchKick,
)
from pyvirtio.transport.vhost_user.protocol import (
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    ProtocolFeature,
    SingleMemoryRegion,
    VringState,
    encode,
    vring_fd_payload,
)
from pyvirtio.transport.vhost_user.session import VhostUserSession

F_PROTOCOL = 1 << VHOST_USER_F_PROTOCOL_FEATURES


@pytest.fixture
def session(device: Entropy, interrupt: RecordingInterrupt) -> Iterator[VhostUserSession]:
    session = VhostUserSession(device, interrupt, name="test")
    yield session
    close_session(session)


@pytest.fixture
def front(session: VhostUserSession) -> Iterator[FrontEnd]:
    front = FrontEnd(session)
    yield front
    front.mem.close()


def test_get_features_offers_the_device_features_and_protocol_features(
    front: FrontEnd, device: Entropy
) -> None:
    assert front.reply(front.send(R.GET_FEATURES)) == device.offered_features | F_PROTOCOL


def test_a_refused_set_features_changes_nothing_and_is_nacked(
    front: FrontEnd, session: VhostUserSession, device: Entropy
) -> None:
    never_offered = 1 << 50
    assert not device.offered_features & never_offered
    actions = front.send(R.SET_FEATURES, never_offered, ack=True)
    assert front.reply(actions) == 1
    assert session.features == 0 and not session.features_set
    assert device.acked_features == 0


def test_a_refused_set_protocol_features_changes_nothing(
    front: FrontEnd, session: VhostUserSession
) -> None:
    assert front.reply(front.send(R.SET_PROTOCOL_FEATURES, 1 << 63, ack=True)) == 1
    assert session.protocol_features == 0
    wanted = ProtocolFeature.REPLY_ACK.mask
    assert front.reply(front.send(R.SET_PROTOCOL_FEATURES, wanted, ack=True)) == 0
    assert session.protocol_features == wanted


def test_ring_setup_hands_the_fds_to_the_host_and_activates_the_device(
    front: FrontEnd, session: VhostUserSession, device: Entropy, eventfds: tuple[int, int]
) -> None:
    kick, call = eventfds
    actions = front.set_up_ring(kick_fd=kick, call_fd=call)
    assert actions == [SetNotifyFd(0, NotifyKind.CALL, call), WatchKick(0, kick)]
    assert device.state is DeviceState.ACTIVE
    assert session.running_queue(0) is not None


def test_a_kick_runs_the_device_which_signals_used_buffers(
    front: FrontEnd,
    session: VhostUserSession,
    interrupt: RecordingInterrupt,
    eventfds: tuple[int, int],
) -> None:
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    driver = front.driver_queue()
    driver.add([], [(BUFFER, 64)], "request")
    assert session.kick(0) is session.running_queue(0)
    assert list(driver.used()) == [("request", 64)]
    assert front.mem.read(BUFFER, 64) == b"\xab" * 64
    assert interrupt.used == [0]


def test_get_vring_base_stops_the_device_and_reports_the_ring_position(
    front: FrontEnd, session: VhostUserSession, device: Entropy, eventfds: tuple[int, int]
) -> None:
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    driver = front.driver_queue()
    for n in range(3):
        driver.add([], [(BUFFER + 64 * n, 64)], n)
    session.kick(0)
    actions = front.send(R.GET_VRING_BASE, VringState(0, 0))
    assert front.reply(actions) == VringState(0, 3)
    assert WatchKick(0, None) in actions  # the kick fd is the host's to close
    assert device.state is not DeviceState.ACTIVE
    assert session.kick(0) is None
    # Restarted without a new SET_VRING_BASE, the ring resumes where it stopped.
    kick = os.eventfd(0)
    front.send(R.SET_VRING_KICK, vring_fd_payload(0, kick), fds=(kick,))
    os.close(kick)
    assert device.state is DeviceState.ACTIVE
    driver.add([], [(BUFFER, 8)], "after")
    session.kick(0)
    assert [token for token, _ in driver.used()] == [0, 1, 2, "after"]


def test_a_ring_size_past_the_maximum_is_refused(
    front: FrontEnd, session: VhostUserSession
) -> None:
    actions = front.send(R.SET_VRING_NUM, VringState(0, session.max_ring_size(0) + 1), ack=True)
    assert front.reply(actions) == 1
    assert session.vrings[0].num is None


def test_a_split_base_beyond_16_bits_is_refused(front: FrontEnd, session: VhostUserSession) -> None:
    assert front.reply(front.send(R.SET_VRING_BASE, VringState(0, 0x10000), ack=True)) == 1
    assert session.vrings[0].base == 0


def test_a_ring_fd_for_a_ring_that_does_not_exist_is_closed(front: FrontEnd) -> None:
    fd = os.eventfd(0)
    actions = front.send(R.SET_VRING_CALL, vring_fd_payload(5, fd), fds=(fd,), ack=True)
    assert CloseFds((fd,)) in actions
    assert front.reply(actions) == 1
    os.close(fd)


def test_unsealable_memory_is_refused_and_its_fd_closed(
    front: FrontEnd, session: VhostUserSession
) -> None:
    fd = os.memfd_create("unsealable", 0)  # no MFD_ALLOW_SEALING
    os.ftruncate(fd, MEM_SIZE)
    table = MemoryTable((MemoryRegionDesc(0, MEM_SIZE, USER_BASE, 0),))
    actions = front.send(R.SET_MEM_TABLE, table, fds=(fd,), ack=True)
    assert CloseFds((fd,)) in actions
    assert front.reply(actions) == 1
    assert session.memory.regions == ()
    os.close(fd)


def test_memory_slots_past_the_limit_are_refused(device: Entropy) -> None:
    session = VhostUserSession(device, RecordingInterrupt(), max_mem_slots=1)
    front = FrontEnd(session)
    first = SingleMemoryRegion(MemoryRegionDesc(0, MEM_SIZE // 2, USER_BASE, 0))
    assert front.reply(front.send(R.ADD_MEM_REG, first, fds=(front.memfd(),), ack=True)) == 0
    second = SingleMemoryRegion(
        MemoryRegionDesc(MEM_SIZE // 2, MEM_SIZE // 2, USER_BASE + MEM_SIZE // 2, MEM_SIZE // 2)
    )
    fd = front.memfd()
    actions = front.send(R.ADD_MEM_REG, second, fds=(fd,), ack=True)
    assert front.reply(actions) == 1 and CloseFds((fd,)) in actions
    os.close(fd)
    assert len(session.memory.regions) == 1
    assert session.close() == []
    assert session.memory.regions == ()
    front.mem.close()


def test_the_back_end_channel_goes_to_the_host(front: FrontEnd) -> None:
    fd = os.eventfd(0)
    assert front.send(R.SET_BACKEND_REQ_FD, fds=(fd,)) == [SetBackendChannel(fd)]
    os.close(fd)


def test_malformed_bytes_end_the_session_and_close_their_fds(session: VhostUserSession) -> None:
    fd = os.eventfd(0)
    header = (0xFFFF).to_bytes(4, "little") + VERSION.to_bytes(4, "little") + bytes(4)
    actions = session.receive_data(header, [fd])
    assert actions[0] == CloseFds((fd,))
    assert isinstance(actions[1], Disconnect) and "malformed" in actions[1].reason
    assert session.closed
    # What still arrives is not handled; its fds are closed.
    other = os.eventfd(0)
    message = encode(Message(R.SET_VRING_CALL, vring_fd_payload(0, other), fds=(other,)))
    assert session.receive_data(message, [other]) == [CloseFds((other,))]
    os.close(fd)
    os.close(other)


def test_a_failing_request_that_defines_a_reply_ends_the_session(
    front: FrontEnd, session: VhostUserSession
) -> None:
    actions = front.send(R.GET_VRING_BASE, VringState(7, 0))
    assert len(actions) == 1 and isinstance(actions[0], Disconnect)
    assert session.closed


def test_messages_split_anywhere_give_the_same_replies(session: VhostUserSession) -> None:
    data = encode(Message(R.GET_QUEUE_NUM)) + encode(Message(R.GET_MAX_MEM_SLOTS))
    actions: list[Action] = []
    for byte in data:
        actions += session.receive_data(bytes([byte]), [])
    parser = MessageParser(FrontendRequest, replies=True)
    payloads = [m.payload for a in actions if isinstance(a, Reply) for m in parser.feed(a.data, [])]
    assert payloads == [1, session.max_mem_slots]


def test_close_stops_the_device_and_unmaps_the_memory(
    front: FrontEnd, session: VhostUserSession, device: Entropy, eventfds: tuple[int, int]
) -> None:
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    assert session.memory.regions
    session.close()
    assert device.state is not DeviceState.ACTIVE
    assert session.memory.regions == ()
    assert session.kick(0) is None


def test_close_releases_the_memory_even_if_stopping_the_device_fails(
    interrupt: RecordingInterrupt, eventfds: tuple[int, int]
) -> None:
    device = StopFailsOnce()
    session = VhostUserSession(device, interrupt)
    front = FrontEnd(session)
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    assert device.state is DeviceState.ACTIVE
    device.armed = True
    assert session.close() == []
    assert not device.armed  # it did raise
    assert session.memory.regions == ()
    assert session.closed
    front.mem.close()


def test_a_disabled_ring_is_not_polled_but_its_kicks_reach_the_device(
    front: FrontEnd, session: VhostUserSession, device: Entropy, eventfds: tuple[int, int]
) -> None:
    front.set_up_ring(kick_fd=eventfds[0], call_fd=eventfds[1])
    front.send(R.SET_VRING_ENABLE, VringState(0, 0))
    assert not device.queue_enabled(0)
    driver = front.driver_queue()
    driver.add([], [(BUFFER, 64)], "while disabled")
    assert session.kick(0) is None  # nothing for the host to poll
    assert list(driver.used()) == []  # entropy leaves a disabled ring's buffers waiting
    front.send(R.SET_VRING_ENABLE, VringState(0, 1))
    assert device.queue_enabled(0)
    assert list(driver.used()) == [("while disabled", 64)]  # served on enable
