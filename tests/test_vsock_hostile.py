"""A hostile guest against the vsock device: raw packets on the TX ring, credit abuse,
REQUEST floods and malformed headers.  The device stays within its bounds and
gives back every fd it opened."""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
import tracemalloc
from pathlib import Path

import pytest

from helpers.vsock import GUEST_CID, VsockRig, in_thread, listen_unix
from pyvirtio.devices.vsock.connection import DEFAULT_BUF_ALLOC, ConnState
from pyvirtio.devices.vsock.device import EVENTQ, RXQ, TXQ
from pyvirtio.devices.vsock.unix import connect_to_guest
from pyvirtio.devices.vsock.wire import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_PAYLOAD,
    EventId,
    Header,
    Op,
    SockType,
    unpack_event,
)
from pyvirtio.virtqueue.common import DriverQueue
from pyvirtio.vmm.host_loop import poll_devices


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class RawGuest:
    """A guest that writes packets onto the TX ring itself (no VsockDriver)."""

    def __init__(self, rig: VsockRig, rx_buffers: int = 32) -> None:
        self.rig = rig
        self.queues = rig.rig.start()
        self.rx: DriverQueue = self.queues[RXQ]
        self.tx: DriverQueue = self.queues[TXQ]
        self.alloc = rig.rig.allocator
        self.mem = rig.rig.mem
        self.rx_buffers = []
        for _ in range(rx_buffers):
            addr = self.alloc.alloc(HEADER_SIZE + 4096)
            self.rx.add([], [(addr, HEADER_SIZE + 4096)], token=addr)
            self.rx_buffers.append(addr)
        rig.rig.driver.notify(RXQ)

    def send_raw(self, data: bytes) -> None:
        addr = self.alloc.alloc(max(1, len(data)))
        self.mem.write(addr, data)
        self.tx.add([(addr, len(data))], [], token=addr)
        self.rig.rig.driver.notify(TXQ)
        for token, _ in self.tx.used():
            assert isinstance(token, int)
            self.alloc.free(token)

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"", **kw: int) -> None:
        fields = {
            "src_cid": GUEST_CID,
            "dst_cid": HOST_CID,
            "src_port": src_port,
            "dst_port": dst_port,
            "len": len(payload),
            "type": SockType.STREAM,
            "op": op,
            "flags": 0,
            "buf_alloc": DEFAULT_BUF_ALLOC,
            "fwd_cnt": 0,
        }
        fields.update(kw)
        self.send_raw(Header(**fields).pack() + payload)

    def received(self) -> list[Header]:
        """Packets the device put on the RX ring (buffers reposted)."""
        out = []
        for token, written in self.rx.used():
            assert isinstance(token, int)
            if written >= HEADER_SIZE:
                out.append(Header.unpack(self.mem.read(token, HEADER_SIZE)))
            self.rx.add([], [(token, HEADER_SIZE + 4096)], token=token)
        self.rig.rig.driver.notify(RXQ)
        return out


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = VsockRig(tmp_path, max_connections=16)
    yield r
    r.close()


def test_credit_overrun_gets_reset_and_bounded_buffer(rig: VsockRig) -> None:
    # A host peer that never reads: the guest may only fill buf_alloc.
    server = listen_unix(Path(f"{rig.uds}_80"))
    guest = RawGuest(rig)
    guest.send(Op.REQUEST, 2000, 80)
    peer, _ = server.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert [h.op for h in guest.received()] == [Op.RESPONSE]
    conn = next(iter(rig.device.endpoint))
    chunk = os.urandom(MAX_PKT_PAYLOAD)
    sent = 0
    while sent + len(chunk) <= DEFAULT_BUF_ALLOC + 4 * MAX_PKT_PAYLOAD:
        guest.send(Op.RW, 2000, 80, chunk)
        sent += len(chunk)
        assert conn.rx_bytes <= DEFAULT_BUF_ALLOC
        if conn.state is ConnState.KILLED:
            break
    assert conn.state is ConnState.KILLED
    assert rig.device.stats["credit_exceeded"] == 1
    assert Op.RST in [h.op for h in guest.received()]
    poll_devices([rig.device], 0)
    poll_devices([rig.device], 0)
    assert peer.recv(1 << 20)  # what fit in the credit reached the host
    server.close()
    peer.close()


def test_request_flood_stops_at_the_limit_and_fds_return(rig: VsockRig) -> None:
    server = listen_unix(Path(f"{rig.uds}_81"))
    guest = RawGuest(rig)
    gc.collect()  # other tests' garbage must not close fds during the count
    baseline = open_fds()
    for port in range(3000, 3100):
        guest.send(Op.REQUEST, port, 81)
    replies = guest.received() + guest.received()
    assert len(rig.device.endpoint) == 16
    assert sum(h.op == Op.RESPONSE for h in replies) == 16
    assert rig.device.stats["over_limit"] == 100 - 16
    peers = []
    server.setblocking(False)
    while True:
        try:
            peers.append(server.accept()[0])
        except BlockingIOError:
            break
    assert len(peers) == 16
    for port in range(3000, 3100):
        guest.send(Op.RST, port, 81)
    assert len(rig.device.endpoint) == 0
    poll_devices([rig.device], 0)
    poll_devices([rig.device], 0)  # retired sockets are closed one round later
    for p in peers:
        p.close()
    gc.collect()
    assert open_fds() == baseline
    server.close()


@pytest.mark.parametrize(
    ("packet", "counter"),
    [
        (b"\x01" * 20, "short_header"),
        (Header(GUEST_CID + 1, HOST_CID, 1, 2, 0, 1, Op.REQUEST, 0, 0, 0).pack(), "bad_address"),
        (Header(GUEST_CID, 99, 1, 2, 0, 1, Op.REQUEST, 0, 0, 0).pack(), "bad_address"),
        (Header(GUEST_CID, HOST_CID, 1, 2, 0, 9, Op.REQUEST, 0, 0, 0).pack(), "bad_type"),
        (Header(GUEST_CID, HOST_CID, 1, 2, 0, 1, 42, 0, 0, 0).pack(), "bad_op"),
        (Header(GUEST_CID, HOST_CID, 1, 2, 100, 1, Op.RW, 0, 0, 0).pack(), "bad_length"),
        (Header(GUEST_CID, HOST_CID, 1, 2, 1 << 20, 1, Op.RW, 0, 0, 0).pack(), "bad_length"),
        (Header(GUEST_CID, HOST_CID, 1, 2, 0, 1, Op.RW, 0, 0, 0).pack(), "no_connection"),
    ],
)
def test_malformed_packets_are_counted_and_never_crash(
    rig: VsockRig, packet: bytes, counter: str
) -> None:
    guest = RawGuest(rig)
    guest.send_raw(packet)
    assert rig.device.stats[counter] == 1
    assert not rig.device.needs_reset
    assert len(rig.device.endpoint) == 0
    # The device still works: a valid REQUEST to a closed port gets RST.
    guest.send(Op.REQUEST, 1, 4242)
    assert Op.RST in [h.op for h in guest.received()]


def test_counters_go_on_across_reset_and_reactivation(rig: VsockRig) -> None:
    """The counters are the device's: a driver's reset does not wipe its record of errors."""
    bad_op = Header(GUEST_CID, HOST_CID, 1, 2, 0, 1, 42, 0, 0, 0).pack()
    RawGuest(rig).send_raw(bad_op)
    RawGuest(rig).send_raw(b"\x01" * 20)  # start() resets the device first
    assert rig.device.stats["bad_op"] == 1
    assert rig.device.stats["short_header"] == 1
    rig.rig.driver.reset()
    guest = RawGuest(rig)
    guest.send_raw(bad_op)
    assert rig.device.stats["bad_op"] == 2


def test_garbage_flood_keeps_memory_flat(rig: VsockRig) -> None:
    guest = RawGuest(rig)
    rng = __import__("random").Random(5)

    def burst() -> None:
        for _ in range(300):
            fields = [GUEST_CID, HOST_CID, rng.randrange(1 << 32), rng.randrange(1 << 32), 0,
                      rng.choice([1, 2, 7]), rng.randrange(9), rng.randrange(4),
                      rng.randrange(1 << 32), rng.randrange(1 << 32)]  # fmt: skip
            guest.send_raw(Header(*fields).pack())
            guest.received()

    burst()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    burst()
    burst()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(rig.device.endpoint) <= 16
    assert grown < 256 * 1024, grown
    assert not rig.device.needs_reset


def test_restore_sends_transport_reset_and_drops_connections(rig: VsockRig) -> None:
    server = listen_unix(Path(f"{rig.uds}_82"))
    driver = rig.driver
    sock = driver.connect(82)
    peer, _ = server.accept()
    device = rig.device
    resources = device.sleep()
    snapshot = device.snapshot()
    device.restore(snapshot)
    device.wake(resources)
    assert len(device.endpoint) == 0
    poll_devices([device], 0)
    poll_devices([device], 0)
    peer.settimeout(5)
    assert peer.recv(10) == b""  # the host side of the dropped connection is closed
    driver.poll()
    assert driver.transport_resets == 1
    with pytest.raises(ConnectionResetError):
        sock.send(b"x")
    # The guest reconnects.
    again = driver.connect(82)
    peer2, _ = server.accept()
    again.send(b"hello")
    peer2.settimeout(5)
    buf = b""
    while len(buf) < 5:
        poll_devices([device], 0.01)
        try:
            buf += peer2.recv(5)
        except TimeoutError:
            break
    assert buf == b"hello"
    server.close()
    peer.close()
    peer2.close()


def test_guest_that_never_answers_a_host_connect_times_out(rig: VsockRig) -> None:
    guest = RawGuest(rig)
    rig.device.endpoint.connect_timeout = 0.3
    thread, out = in_thread(lambda: connect_to_guest(rig.uds, 6000, timeout=10))
    deadline = time.monotonic() + 5
    seen: list[Header] = []
    while thread.is_alive() and time.monotonic() < deadline:
        poll_devices([rig.device], 0.02)
        seen += guest.received()
    poll_devices([rig.device], 0)
    seen += guest.received()
    # A REQUEST, then the RST that tells the guest the device gave up.
    assert [h.op for h in seen] == [Op.REQUEST, Op.RST]
    assert seen[0].dst_port == 6000
    assert len(out) == 1 and isinstance(out[0], ConnectionRefusedError)
    assert rig.device.stats["timeouts"] == 1
    assert len(rig.device.endpoint) == 0


def test_host_handshake_garbage_is_dropped(rig: VsockRig) -> None:
    RawGuest(rig)
    clients = []
    for line in (b"HELLO\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"A" * 100):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(rig.uds))
        c.sendall(line)
        c.settimeout(5)
        clients.append(c)
    for _ in range(20):
        poll_devices([rig.device], 0.01)
    for c in clients:
        try:
            answer = c.recv(64)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed without an answer
        c.close()
    assert len(rig.device.endpoint) == 0


def test_event_buffer_too_short_for_an_event_keeps_it_for_the_next(rig: VsockRig) -> None:
    guest = RawGuest(rig)
    device = rig.device
    resources = device.sleep()
    device.restore(device.snapshot())
    device.wake(resources)
    events = guest.queues[EVENTQ]
    short = guest.alloc.alloc(4)
    guest.mem.write(short, b"\xee" * 4)
    events.add([], [(short, 1)], token="short")
    rig.rig.driver.notify(EVENTQ)
    assert list(events.used()) == [("short", 0)]  # a cut event would be no event
    assert guest.mem.read(short, 4) == b"\xee" * 4
    assert device.stats["short_header"] == 1
    whole = guest.alloc.alloc(4)
    events.add([], [(whole, 4)], token="whole")
    rig.rig.driver.notify(EVENTQ)
    assert list(events.used()) == [("whole", 4)]
    assert unpack_event(guest.mem.read(whole, 4)) == EventId.TRANSPORT_RESET


def test_reset_closes_the_host_sockets_of_dropped_connections(rig: VsockRig) -> None:
    """A guest that resets the device and leaves it so holds no host sockets open."""
    server = listen_unix(Path(f"{rig.uds}_83"))
    guest = RawGuest(rig)
    gc.collect()  # other tests' garbage must not close fds during the count
    baseline = open_fds()
    guest.send(Op.REQUEST, 2000, 83)
    peer, _ = server.accept()
    assert len(rig.device.endpoint) == 1
    rig.rig.driver.reset()
    poll_devices([rig.device], 0)
    poll_devices([rig.device], 0)  # the loop has seen a list without the socket
    assert open_fds() == baseline + 1  # only our end, peer
    peer.settimeout(5)
    assert peer.recv(10) == b""
    peer.close()
    server.close()


def test_request_flood_to_a_closed_port_logs_a_bounded_number_of_lines(
    rig: VsockRig, caplog: pytest.LogCaptureFixture
) -> None:
    guest = RawGuest(rig)
    with caplog.at_level(logging.DEBUG, logger="pyvirtio"):
        for port in range(3000, 3200):
            guest.send(Op.REQUEST, port, 4242)
            guest.received()
    assert rig.device.stats["host_refused"] == 200
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    assert "4242" in lines[0].getMessage()


@pytest.mark.timeout(20)
def test_rx_buffer_with_room_for_a_header_only_does_not_stall_host_data(rig: VsockRig) -> None:
    """A 44-byte RX buffer fits no data: the device neither spins on it nor waits behind it."""
    server = listen_unix(Path(f"{rig.uds}_84"))
    guest = RawGuest(rig, rx_buffers=1)
    guest.send(Op.REQUEST, 2000, 84)
    peer, _ = server.accept()
    [(big, written)] = guest.rx.used()
    assert isinstance(big, int)
    assert Header.unpack(guest.mem.read(big, HEADER_SIZE)).op == Op.RESPONSE
    tiny = guest.alloc.alloc(HEADER_SIZE)
    guest.rx.add([], [(tiny, HEADER_SIZE)], token=tiny)  # first in the ring
    guest.rx.add([], [(big, HEADER_SIZE + 4096)], token=big)
    rig.rig.driver.notify(RXQ)
    peer.sendall(b"hello")
    data = b""
    for _ in range(10):
        poll_devices([rig.device], 0)
        for token, written in guest.rx.used():
            assert isinstance(token, int)
            if written > HEADER_SIZE:
                data += guest.mem.read(token + HEADER_SIZE, written - HEADER_SIZE)
    assert data == b"hello"
    peer.close()
    server.close()


def test_seqpacket_messages_too_big_for_the_host_log_a_bounded_number_of_lines(
    rig: VsockRig, caplog: pytest.LogCaptureFixture
) -> None:
    """A message the host socket cannot take whole resets its connection; the guest
    may do it again and again, the log says it once."""
    server = listen_unix(Path(f"{rig.uds}_85"), socket.SOCK_SEQPACKET)
    guest = RawGuest(rig)
    chunk = bytes(MAX_PKT_PAYLOAD)
    with caplog.at_level(logging.DEBUG, logger="pyvirtio"):
        for port in range(2000, 2004):
            guest.send(Op.REQUEST, port, 85, type=SockType.SEQPACKET)
            peer, _ = server.accept()
            assert [h.op for h in guest.received()] == [Op.RESPONSE]
            for last in (False, False, False, True):  # 256 KiB: over the socket's limit
                guest.send(Op.RW, port, 85, chunk, type=SockType.SEQPACKET, flags=3 * last)
            assert Op.RST in [h.op for h in guest.received()]
            peer.close()
    assert rig.device.stats["host_errors"] == 4
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    server.close()
