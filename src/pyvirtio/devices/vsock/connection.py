"""vsock connections as a sans-IO state machine, shared by the device and the driver.

Both ends of a virtio-vsock connection run the same protocol
(device-types/vsock: Device Operation), so one :class:`Endpoint` serves
both: the device model's endpoint speaks for the host (CID 2) to one guest,
:class:`~pyvirtio.driver.vsock.VsockDriver`'s speaks for a guest to the host.
An endpoint is fed the packets its peer sent (:meth:`Endpoint.receive`) and
the clock (:meth:`Endpoint.expire`); it hands out the control packets to send
(:meth:`Endpoint.next_control`) and builds the headers of data packets.  It
does no I/O: where the bytes of a connection come from and go to (a Unix
socket, a caller's buffer) is its owner's business.

A connection's life (:class:`ConnState`)::

    LOCAL_INIT --RESPONSE--> ESTABLISHED <--accept()-- PEER_INIT
         |                    |       |                   |
      timeout           shutdown() SHUTDOWN in        refuse()
         |            (half-closed each way:           |
         v             ``local_shut``/``peer_shut``)   v
       KILLED <--RST / timeout-- CLOSING <--close()-- ...  KILLED

Credit (device-types/vsock: Buffer Space Management): a connection
advertises ``buf_alloc`` and ``fwd_cnt`` in every packet it sends and never
sends more than ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes ahead.  It
sends CREDIT_UPDATE unprompted when the space its peer last saw runs low, and
when asked (CREDIT_REQUEST).  A peer that sends beyond the credit granted gets
RST: its receive buffer is therefore bounded by ``buf_alloc``.

Bounds: at most ``max_connections`` connections (REQUESTs beyond get RST),
connect and close timeouts, and a bounded queue of replies to stray packets
(beyond it they are dropped and counted).
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple

from pyvirtio.devices.vsock.wire import (
    MAX_PKT_PAYLOAD,
    Header,
    Op,
    SeqFlag,
    ShutdownFlag,
    SockType,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_BUF_ALLOC",
    "MAX_CONNECTIONS",
    "PROTOCOL_STATS",
    "ConnKey",
    "ConnState",
    "Connection",
    "Endpoint",
]

#: Receive buffer advertised per connection (Linux's and Firecracker's default).
DEFAULT_BUF_ALLOC = 256 * 1024
#: Connections an endpoint holds at most (Firecracker's limit).
MAX_CONNECTIONS = 1023
#: Seconds a REQUEST may wait for its RESPONSE.
CONNECT_TIMEOUT = 2.0
#: Seconds a SHUTDOWN(both) may wait for the peer's RST before we send ours.
CLOSE_TIMEOUT = 2.0
#: Free space (bytes) the peer last saw below which a CREDIT_UPDATE goes out unprompted.
CREDIT_LOW_WATER = 64 * 1024
#: Replies to stray packets (RSTs for unknown connections) queued at most.
MAX_STRAY_REPLIES = 256


class ConnState(enum.Enum):
    LOCAL_INIT = "local-init"
    PEER_INIT = "peer-init"
    ESTABLISHED = "established"
    CLOSING = "closing"
    KILLED = "killed"


class ConnKey(NamedTuple):
    """A connection, as seen from its endpoint: our port and the peer's."""

    local_port: int
    peer_port: int


#: Counters of what an endpoint refused or dropped (guest errors, limits),
#: the keys of :attr:`Endpoint.stats`.
PROTOCOL_STATS: Final = (
    "bad_address",
    "bad_op",
    "bad_type",
    "credit_exceeded",
    "no_connection",
    "over_limit",
    "stray_dropped",
    "timeouts",
)


class Connection:
    """One connection's protocol state, credit both ways and received bytes.

    Received payload waits in :attr:`rx` (chunks; for SEQPACKET, each with
    the flags of its packet) until the owner consumes it with :meth:`consume`
    or :meth:`read`, which advances ``fwd_cnt``.  The owner sends data with
    :meth:`data_header` after checking :meth:`send_credit`.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        key: ConnKey,
        sock_type: SockType,
        state: ConnState,
    ) -> None:
        self.endpoint = endpoint
        self.key = key
        self.type = sock_type
        self.state = state
        self.buf_alloc = endpoint.buf_alloc
        self.fwd_cnt = 0
        self.last_fwd_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        #: What we told the peer we will no longer do (ShutdownFlag bits).
        self.local_shut = 0
        #: What the peer told us it will no longer do.
        self.peer_shut = 0
        #: Received payload not yet consumed, with each packet's flags.
        self.rx: collections.deque[tuple[bytes, int]] = collections.deque()
        self.rx_bytes = 0
        #: Complete SEQPACKET messages in ``rx`` (the last chunk of each has EOM).
        self.rx_messages = 0
        self.deadline: float | None = None
        #: Why the connection was reset (None while alive or closed cleanly).
        self.reset_reason: str | None = None
        self._pending: set[Op] = set()
        #: Free for the owner (the device keeps its host stream here).
        self.user: object = None

    def __repr__(self) -> str:
        return f"Connection({self.key.local_port}<->{self.key.peer_port}, {self.state.value})"

    # -- credit ----------------------------------------------------------------------

    def send_credit(self) -> int:
        """Payload bytes one packet may carry now: the peer's free space, at most
        MAX_PKT_PAYLOAD (0 once either side shut this direction)."""
        if (
            self.state is not ConnState.ESTABLISHED
            or self.local_shut & ShutdownFlag.SEND
            or self.peer_shut & ShutdownFlag.RCV
        ):
            return 0
        free = self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)
        return max(0, min(free, MAX_PKT_PAYLOAD))

    def rx_space(self) -> int:
        """Bytes of receive buffer not holding unconsumed data."""
        return self.buf_alloc - self.rx_bytes

    def _note_credit(self, header: Header) -> None:
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt

    # -- building packets --------------------------------------------------------------

    def _header(self, op: Op, flags: int = 0, length: int = 0) -> Header:
        endpoint = self.endpoint
        self.last_fwd_sent = self.fwd_cnt
        return Header(
            endpoint.local_cid,
            endpoint.peer_cid,
            self.key.local_port,
            self.key.peer_port,
            length,
            self.type,
            op,
            flags,
            self.buf_alloc,
            self.fwd_cnt & 0xFFFF_FFFF,
        )

    def data_header(self, length: int, flags: int = 0) -> Header:
        """The header of an RW packet of ``length`` bytes about to be sent (counted now)."""
        if length > self.send_credit():
            raise ValueError(f"{self}: {length} bytes exceed the peer's credit")
        self.tx_cnt += length
        return self._header(Op.RW, flags, length)

    def _queue(self, op: Op) -> None:
        if not self._pending:
            self.endpoint._control.append(self)
        self._pending.add(op)

    def _next_control(self) -> Header | None:
        pending = self._pending
        for op in (Op.RESPONSE, Op.REQUEST, Op.CREDIT_REQUEST, Op.SHUTDOWN, Op.CREDIT_UPDATE):
            if op in pending:
                pending.discard(op)
                flags = self.local_shut if op is Op.SHUTDOWN else 0
                return self._header(op, flags)
        return None

    # -- what the owner does -----------------------------------------------------------

    def accept(self) -> None:
        """Answer the peer's REQUEST (PEER_INIT -> ESTABLISHED)."""
        if self.state is not ConnState.PEER_INIT:
            raise ValueError(f"{self}: accept in state {self.state.value}")
        self.state = ConnState.ESTABLISHED
        self._queue(Op.RESPONSE)

    def shutdown(self, flags: int) -> None:
        """Tell the peer we will no longer receive (RCV) and/or send (SEND)."""
        new = flags & ~self.local_shut
        if not new or self.state is not ConnState.ESTABLISHED:
            return
        self.local_shut |= new
        self._queue(Op.SHUTDOWN)
        self._check_done()

    def close(self) -> None:
        """Graceful close: SHUTDOWN both ways, then wait for the peer's RST (or time out)."""
        if self.state in (ConnState.KILLED, ConnState.CLOSING):
            return
        if self.state is not ConnState.ESTABLISHED or self.peer_shut == ShutdownFlag.BOTH:
            self.reset("closed")
            return
        self.local_shut = ShutdownFlag.BOTH
        self._queue(Op.SHUTDOWN)
        self.state = ConnState.CLOSING
        self.deadline = self.endpoint.clock() + self.endpoint.close_timeout

    def reset(self, reason: str) -> None:
        """Kill the connection and send RST."""
        if self.state is ConnState.KILLED:
            return
        self.endpoint._reply_rst(self._header(Op.RST))
        self._kill(reason)

    def consume(self, n: int) -> None:
        """``n`` bytes of the oldest received chunk were delivered (fwd_cnt advances)."""
        data, flags = self.rx[0]
        if n >= len(data):
            self.rx.popleft()
            if flags & SeqFlag.EOM and self.type is SockType.SEQPACKET:
                self.rx_messages -= 1
        else:
            self.rx[0] = (data[n:], flags)
        self._delivered(min(n, len(data)))

    def read(self, n: int) -> bytes:
        """Up to ``n`` received bytes (stream)."""
        out = bytearray()
        while self.rx and len(out) < n:
            data, _flags = self.rx[0]
            take = min(n - len(out), len(data))
            out += data[:take]
            self.consume(take)
        return bytes(out)

    def peek_message(self) -> tuple[bytes, int] | None:
        """The oldest whole SEQPACKET message and its last packet's flags, left in place."""
        if not self.rx_messages:
            return None
        parts = []
        for data, flags in self.rx:
            parts.append(data)
            if flags & SeqFlag.EOM:
                return b"".join(parts), flags
        raise AssertionError("rx_messages counts a message without EOM")

    def drop_message(self) -> None:
        """Consume the oldest whole message (delivered after :meth:`peek_message`)."""
        while self.rx_messages and self.rx:
            data, flags = self.rx[0]
            self.consume(len(data))
            if flags & SeqFlag.EOM:
                return

    def read_message(self) -> tuple[bytes, int] | None:
        """The oldest whole SEQPACKET message and its last packet's flags, consumed."""
        message = self.peek_message()
        if message is not None:
            self.drop_message()
        return message

    def _delivered(self, n: int) -> None:
        self.rx_bytes -= n
        self.fwd_cnt += n
        # The peer thinks it may send buf_alloc - (received - last_fwd_sent) more,
        # received being fwd_cnt + rx_bytes; tell it about the space freed
        # before it runs dry (it would stall).
        seen_free = self.buf_alloc - (self.fwd_cnt + self.rx_bytes - self.last_fwd_sent)
        if (
            seen_free < min(CREDIT_LOW_WATER, self.buf_alloc // 2)
            and self.fwd_cnt != self.last_fwd_sent
            and self.state is ConnState.ESTABLISHED
            and not self.peer_shut & ShutdownFlag.SEND
        ):
            self._queue(Op.CREDIT_UPDATE)
        self._check_done()

    @property
    def finished(self) -> bool:
        """Neither side will send anything more and every received byte was consumed."""
        return (
            self.local_shut & ShutdownFlag.SEND
            and self.peer_shut & ShutdownFlag.SEND
            and not self.rx
        ) or (self.peer_shut == ShutdownFlag.BOTH and not self.rx)

    def _check_done(self) -> None:
        if self.state is ConnState.ESTABLISHED and self.finished:
            self.reset("closed")

    def _kill(self, reason: str) -> None:
        self.state = ConnState.KILLED
        self.reset_reason = reason
        self.deadline = None
        self._pending.clear()
        self.endpoint._killed(self)

    # -- packets from the peer -----------------------------------------------------------

    def _receive(self, header: Header, payload: bytes) -> None:
        op = header.op
        self._note_credit(header)
        state = self.state
        if op == Op.RST:
            self._kill("reset by peer")
            return
        if state is ConnState.LOCAL_INIT:
            if op == Op.RESPONSE:
                self.state = ConnState.ESTABLISHED
                self.deadline = None
            else:
                self.reset(f"{Op(op).name} before RESPONSE")
            return
        if state is ConnState.PEER_INIT:
            if op not in (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST):
                self.reset(f"{Op(op).name} before the connection was accepted")
            return
        if op == Op.RW:
            self._receive_data(header, payload)
        elif op == Op.CREDIT_REQUEST:
            if state is ConnState.ESTABLISHED:
                self._queue(Op.CREDIT_UPDATE)
        elif op == Op.SHUTDOWN:
            self.peer_shut |= header.flags & ShutdownFlag.BOTH
            if state is ConnState.CLOSING and self.peer_shut == ShutdownFlag.BOTH:
                self.reset("closed")
            else:
                self._check_done()
        elif op == Op.CREDIT_UPDATE:
            pass  # the credit is taken from every packet above
        else:
            self.reset(f"unexpected {Op(op).name}")

    def _receive_data(self, header: Header, payload: bytes) -> None:
        if self.peer_shut & ShutdownFlag.SEND or self.local_shut & ShutdownFlag.RCV:
            if self.state is ConnState.CLOSING:
                return  # in flight when we closed: dropped, as Linux does
            self.reset("data after shutdown")
            return
        if len(payload) > self.rx_space():
            self.endpoint.stats["credit_exceeded"] += 1
            self.endpoint._warn("credit", "%s: peer sent beyond its credit: reset", self)
            self.reset("credit exceeded")
            return
        flags = header.flags if self.type is SockType.SEQPACKET else 0
        if payload or flags & SeqFlag.EOM:
            self.rx.append((payload, flags))
            self.rx_bytes += len(payload)
            if flags & SeqFlag.EOM:
                self.rx_messages += 1


class Endpoint:
    """One side's connection table: demultiplexes the peer's packets, queues replies.

    ``local_cid``/``peer_cid``: the addresses every packet must carry.
    ``types``: socket types this endpoint speaks (SEQPACKET only if negotiated).
    ``warn``: a rate-limited logger (key, message, args) for peer errors.
    ``stats``: the table to count refusals and drops in (a new one if None).
    """

    def __init__(
        self,
        local_cid: int,
        peer_cid: int,
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        seqpacket: bool = False,
        warn: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stats: dict[str, int] | None = None,
    ) -> None:
        if not 0 < buf_alloc <= 0xFFFF_FFFF:
            raise ValueError(f"buf_alloc must be in (0, 2**32), not {buf_alloc}")
        if max_connections <= 0:
            raise ValueError("max_connections must be positive")
        self.local_cid = local_cid
        self.peer_cid = peer_cid
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.seqpacket = seqpacket
        self.clock = clock
        #: Counters by name (:data:`PROTOCOL_STATS`); an owner that outlives
        #: its endpoints passes its own table, so its counts go on.
        self.stats = stats if stats is not None else {}
        for name in PROTOCOL_STATS:
            self.stats.setdefault(name, 0)
        self.connections: dict[ConnKey, Connection] = {}
        self._warn_fn = warn
        self._control: collections.deque[Connection] = collections.deque()
        self._stray: collections.deque[Header] = collections.deque()
        self._killed_list: list[Connection] = []

    def __len__(self) -> int:
        return len(self.connections)

    def _warn(self, key: str, message: str, *args: object) -> None:
        if self._warn_fn is not None:
            self._warn_fn(key, message, *args)

    # -- the owner's side ---------------------------------------------------------------

    def connect(self, local_port: int, peer_port: int, sock_type: SockType) -> Connection:
        """Open a connection to the peer's ``peer_port`` (REQUEST queued, LOCAL_INIT)."""
        key = ConnKey(local_port, peer_port)
        if key in self.connections:
            raise ValueError(f"connection {key} exists")
        if len(self.connections) >= self.max_connections:
            raise ValueError(f"at most {self.max_connections} connections")
        self._check_type(sock_type)
        conn = Connection(self, key, sock_type, ConnState.LOCAL_INIT)
        conn.deadline = self.clock() + self.connect_timeout
        self.connections[key] = conn
        conn._queue(Op.REQUEST)
        return conn

    def refuse(self, conn: Connection, reason: str = "refused") -> None:
        """Answer a peer's REQUEST with RST."""
        conn.reset(reason)

    def next_control(self) -> Header | None:
        """The next control packet to send (replies first), or None."""
        if self._stray:
            return self._stray.popleft()
        control = self._control
        while control:
            conn = control[0]
            header = conn._next_control() if conn.state is not ConnState.KILLED else None
            if header is None or not conn._pending:
                control.popleft()
            if header is not None:
                return header
        return None

    def has_control(self) -> bool:
        return bool(self._stray) or any(c._pending for c in self._control)

    def expire(self, now: float | None = None) -> None:
        """Apply connect and close timeouts that passed by ``now``."""
        now = self.clock() if now is None else now
        for conn in list(self.connections.values()):
            if conn.deadline is not None and conn.deadline <= now:
                self.stats["timeouts"] += 1
                conn.reset(
                    "connect timed out" if conn.state is ConnState.LOCAL_INIT else "close timed out"
                )

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self.connections.values() if c.deadline is not None]
        return min(deadlines) if deadlines else None

    def reap(self) -> list[Connection]:
        """Connections killed since the last call (their owners release what they hold)."""
        killed, self._killed_list = self._killed_list, []
        return killed

    def reset_all(self, reason: str) -> list[Connection]:
        """Drop every connection without sending anything (a transport reset)."""
        for conn in list(self.connections.values()):
            conn._kill(reason)
        self._control.clear()
        self._stray.clear()
        return self.reap()

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.connections.values()))

    # -- packets from the peer -------------------------------------------------------------

    def receive(self, header: Header, payload: bytes) -> Connection | None:
        """Handle one packet from the peer; returns the connection it concerned.

        A new connection (REQUEST) is returned in PEER_INIT: the owner calls
        :meth:`Connection.accept` or :meth:`refuse`.
        """
        if header.src_cid != self.peer_cid or header.dst_cid != self.local_cid:
            self.stats["bad_address"] += 1
            self._warn(
                "address", "packet from CID %d to CID %d dropped", header.src_cid, header.dst_cid
            )
            return None
        if header.type not in (SockType.STREAM, SockType.SEQPACKET) or (
            header.type == SockType.SEQPACKET and not self.seqpacket
        ):
            self.stats["bad_type"] += 1
            self._warn("type", "packet of socket type %d: reset", header.type)
            self._reply_rst_to(header)
            return None
        if not Op.REQUEST <= header.op <= Op.CREDIT_REQUEST:
            self.stats["bad_op"] += 1
            self._warn("op", "packet with unknown op %d: reset", header.op)
            self._reply_rst_to(header)
            return None
        key = ConnKey(header.dst_port, header.src_port)
        conn = self.connections.get(key)
        if conn is None:
            if header.op == Op.REQUEST:
                return self._new_peer_connection(key, header)
            if header.op != Op.RST:
                self.stats["no_connection"] += 1
                self._reply_rst_to(header)
            return None
        if header.type != conn.type:
            self.stats["bad_type"] += 1
            conn.reset("socket type changed")
            return conn
        if header.op == Op.REQUEST:
            conn.reset("REQUEST on an open connection")
            return conn
        conn._receive(header, payload)
        return conn

    def _check_type(self, sock_type: SockType) -> None:
        if sock_type is SockType.SEQPACKET and not self.seqpacket:
            raise ValueError("SEQPACKET was not negotiated")

    def _new_peer_connection(self, key: ConnKey, header: Header) -> Connection | None:
        if len(self.connections) >= self.max_connections:
            self.stats["over_limit"] += 1
            self._warn("limit", "more than %d connections: REQUEST reset", self.max_connections)
            self._reply_rst_to(header)
            return None
        conn = Connection(self, key, SockType(header.type), ConnState.PEER_INIT)
        conn._note_credit(header)
        self.connections[key] = conn
        return conn

    def _reply_rst_to(self, header: Header) -> None:
        if header.op == Op.RST:
            return  # never answer a reset with a reset
        self._reply_rst(
            Header(
                self.local_cid,
                self.peer_cid,
                header.dst_port,
                header.src_port,
                0,
                header.type if header.type in (SockType.STREAM, SockType.SEQPACKET) else 1,
                Op.RST,
                0,
                0,
                0,
            )
        )

    def _reply_rst(self, header: Header) -> None:
        if len(self._stray) >= MAX_STRAY_REPLIES:
            self.stats["stray_dropped"] += 1
            return
        self._stray.append(header)

    def _killed(self, conn: Connection) -> None:
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
        self._killed_list.append(conn)
