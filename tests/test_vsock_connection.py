"""The sans-IO vsock protocol: two Endpoints wired back to back, no device, no I/O."""

from __future__ import annotations

from pyvirtio.devices.vsock.connection import (
    MAX_STRAY_REPLIES,
    Connection,
    ConnState,
    Endpoint,
)
from pyvirtio.devices.vsock.wire import HOST_CID, Header, Op, ShutdownFlag, SockType

GUEST = 5


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pair(buf_alloc: int = 4096) -> tuple[Endpoint, Endpoint, Clock]:
    clock = Clock()
    host = Endpoint(HOST_CID, GUEST, buf_alloc=buf_alloc, clock=clock, seqpacket=True)
    guest = Endpoint(GUEST, HOST_CID, buf_alloc=buf_alloc, clock=clock, seqpacket=True)
    return host, guest, clock


def deliver(src: Endpoint, dst: Endpoint) -> list[tuple[Header, Connection | None]]:
    """Every control packet ``src`` has queued, received by ``dst``."""
    out = []
    while (header := src.next_control()) is not None:
        out.append((header, dst.receive(header, b"")))
    return out


def established(host: Endpoint, guest: Endpoint) -> tuple[Connection, Connection]:
    g = guest.connect(1024, 80, SockType.STREAM)
    [(request, h)] = deliver(guest, host)
    assert request.op == Op.REQUEST and h is not None and h.state is ConnState.PEER_INIT
    h.accept()
    deliver(host, guest)
    assert g.state is ConnState.ESTABLISHED
    return h, g


def send(src: Connection, dst_endpoint: Endpoint, data: bytes) -> Connection | None:
    return dst_endpoint.receive(src.data_header(len(data)), data)


def test_credit_limits_the_sender_and_updates_flow_unprompted() -> None:
    chunk = 64 * 1024
    host, guest, _ = pair(buf_alloc=4 * chunk)
    h, g = established(host, guest)
    send(g, host, b"x" * chunk)
    h.consume(chunk)
    # The guest still sees 3/4 of the buffer free: no update yet.
    assert not host.has_control()
    for _ in range(3):
        send(g, host, b"x" * chunk)
    assert g.send_credit() == 0
    # The guest sees no room at all; room made now is announced unprompted.
    h.consume(1)
    [(update, _)] = deliver(host, guest)
    assert update.op == Op.CREDIT_UPDATE and update.fwd_cnt == chunk + 1
    assert g.peer_fwd_cnt == chunk + 1 and g.send_credit() > 0


def test_credit_request_is_answered() -> None:
    host, guest, _ = pair()
    h, g = established(host, guest)
    host.receive(g._header(Op.CREDIT_REQUEST), b"")
    [(reply, _)] = deliver(host, guest)
    assert reply.op == Op.CREDIT_UPDATE and reply.buf_alloc == h.buf_alloc


def test_sending_beyond_credit_gets_rst() -> None:
    host, guest, _ = pair(buf_alloc=1000)
    h, g = established(host, guest)
    g.peer_buf_alloc = 10_000  # a lying sender
    send(g, host, b"y" * 1500)
    assert h.state is ConnState.KILLED and host.stats["credit_exceeded"] == 1
    assert [hd.op for hd, _ in deliver(host, guest)] == [Op.RST]
    assert g.state is ConnState.KILLED
    assert len(host) == len(guest) == 0


def test_half_close_each_way_then_rst() -> None:
    host, guest, _ = pair()
    h, g = established(host, guest)
    g.shutdown(ShutdownFlag.SEND)
    deliver(guest, host)
    assert h.peer_shut == ShutdownFlag.SEND and h.state is ConnState.ESTABLISHED
    send(h, guest, b"still flowing")  # the other direction still works
    assert g.read(100) == b"still flowing"
    h.shutdown(ShutdownFlag.SEND)  # both directions done: the host resets
    ops = [hd.op for hd, _ in deliver(host, guest)]
    assert ops in ([Op.SHUTDOWN, Op.RST], [Op.RST])
    assert h.state is g.state is ConnState.KILLED


def test_close_waits_for_rst_and_times_out() -> None:
    host, guest, clock = pair()
    _h, g = established(host, guest)
    g.close()
    assert g.state is ConnState.CLOSING
    [(shutdown, _)] = [(hd, None) for hd in [guest.next_control()] if hd is not None]
    assert shutdown.op == Op.SHUTDOWN and shutdown.flags == ShutdownFlag.BOTH
    # The peer never answers: after the close timeout the closer resets.
    clock.now += guest.close_timeout + 0.1
    guest.expire()
    assert g.state is ConnState.KILLED and guest.stats["timeouts"] == 1
    assert guest.next_control() is not None  # the RST
    assert guest.reap() == [g]


def test_connect_times_out() -> None:
    _host, guest, clock = pair()
    g = guest.connect(1024, 80, SockType.STREAM)
    guest.next_control()  # the REQUEST, never answered
    clock.now += guest.connect_timeout + 0.1
    guest.expire()
    assert g.state is ConnState.KILLED and g.reset_reason == "connect timed out"


def test_seqpacket_messages_keep_boundaries() -> None:
    host, guest, _ = pair(buf_alloc=10_000)
    g = guest.connect(2000, 90, SockType.SEQPACKET)
    [(_, h)] = deliver(guest, host)
    assert h is not None
    h.accept()
    deliver(host, guest)
    host.receive(g.data_header(3, 0), b"abc")
    host.receive(g.data_header(2, 1), b"de")  # EOM
    host.receive(g.data_header(1, 3), b"f")  # EOM | EOR
    assert h.read_message() == (b"abcde", 1)
    assert h.read_message() == (b"f", 3)
    assert h.read_message() is None


def test_limit_and_stray_replies_are_bounded() -> None:
    host = Endpoint(HOST_CID, GUEST, max_connections=4)
    for port in range(10):
        host.receive(Header(GUEST, HOST_CID, port, 80, 0, 1, Op.REQUEST, 0, 0, 0), b"")
    assert len(host) == 4 and host.stats["over_limit"] == 6
    for port in range(MAX_STRAY_REPLIES + 50):
        host.receive(Header(GUEST, HOST_CID, 9000 + port, 1, 0, 1, Op.RW, 0, 0, 0), b"")
    assert host.stats["stray_dropped"] == 6 + 50
    replies = 0
    while host.next_control() is not None:
        replies += 1
    assert replies == MAX_STRAY_REPLIES
