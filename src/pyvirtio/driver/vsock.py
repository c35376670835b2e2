"""A virtio-vsock driver with a socket-like API, over any driver transport.

:class:`VsockDriver` is the guest's end of a vsock device (device-types/vsock):
it posts receive and event buffers, runs the same sans-IO protocol as the
device (:class:`~pyvirtio.devices.vsock.connection.Endpoint`) and hands the
caller :class:`VsockSocket` objects: :meth:`VsockDriver.connect`,
:meth:`VsockDriver.listen` / :meth:`VsockDriver.accept`, then
:meth:`VsockSocket.send`, :meth:`VsockSocket.recv` (stream) or
:meth:`VsockSocket.send_message` / :meth:`VsockSocket.recv_message`
(SEQPACKET), :meth:`VsockSocket.shutdown` and :meth:`VsockSocket.close`.
Credit is handled for the caller: ``send`` waits for the peer's credit, and
consuming received bytes advertises the freed space.

The driver is synchronous and single-threaded: every blocking call runs the
device's completions (:meth:`VsockDriver.poll`) until it can go on or its
timeout passes (:class:`TimeoutError`).  A TRANSPORT_RESET event drops every
connection (their sockets raise ConnectionResetError) and re-reads the CID.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

from pyvirtio.constants import COMMON_FEATURES, DeviceId
from pyvirtio.devices.vsock.connection import (
    DEFAULT_BUF_ALLOC,
    Connection,
    ConnState,
    Endpoint,
)
from pyvirtio.devices.vsock.wire import (
    EVENT_SIZE,
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_PAYLOAD,
    EventId,
    Header,
    SeqFlag,
    ShutdownFlag,
    SockType,
    VsockFeature,
    unpack_event,
)
from pyvirtio.driver.memory import OwnedBuffers
from pyvirtio.driver.transport import (
    DriverTransport,
    check_device_id,
    requested_features,
    wait_until,
)
from pyvirtio.virtqueue.common import QueueFullError

__all__ = ["VsockDriver", "VsockDriverError", "VsockSocket"]

RXQ = 0
TXQ = 1
EVENTQ = 2

#: Ring features handled by pyvirtio.virtqueue, plus the vsock ones.
SUPPORTED_FEATURES = COMMON_FEATURES | VsockFeature.STREAM.mask | VsockFeature.SEQPACKET.mask
#: Receive buffer size: a header and 4 KiB of payload, as Linux posts.
RX_BUFFER_SIZE = HEADER_SIZE + 4096
#: Ephemeral ports for connect() start here.
FIRST_LOCAL_PORT = 49152


class VsockDriverError(Exception):
    """The device stopped working (needs reset) or misbehaved."""


class VsockSocket:
    """One connection (or a listening port, for :meth:`VsockDriver.accept`)."""

    def __init__(self, driver: VsockDriver, conn: Connection) -> None:
        self.driver = driver
        self.conn = conn

    def __repr__(self) -> str:
        return f"VsockSocket({self.conn!r})"

    @property
    def local_port(self) -> int:
        return self.conn.key.local_port

    @property
    def peer_port(self) -> int:
        return self.conn.key.peer_port

    def _check_sendable(self) -> None:
        conn = self.conn
        if conn.state is ConnState.KILLED:
            raise ConnectionResetError(f"connection {conn.reset_reason}")
        if conn.local_shut & ShutdownFlag.SEND or conn.peer_shut & ShutdownFlag.RCV:
            raise BrokenPipeError("connection shut for sending")

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> int:
        """Send all of ``data`` (stream), waiting for credit; returns its length."""
        if self.conn.type is not SockType.STREAM:
            raise ValueError("send on a SEQPACKET socket: use send_message")
        self._send(memoryview(data).cast("B"), 0, timeout)
        return len(data)

    def send_message(
        self,
        data: bytes | bytearray | memoryview,
        *,
        eor: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Send one SEQPACKET message (EOM on its last packet, EOR if ``eor``)."""
        if self.conn.type is not SockType.SEQPACKET:
            raise ValueError("send_message on a stream socket")
        view = memoryview(data).cast("B")
        if len(view) > self.conn.peer_buf_alloc:
            raise OSError(errno.EMSGSIZE, "message longer than the peer's buffer")
        self._send(view, SeqFlag.EOM | (SeqFlag.EOR if eor else 0), timeout)

    def _send(self, view: memoryview, last_flags: int, timeout: float | None) -> None:
        """``view`` in packets as the peer's credit allows; ``last_flags`` on the last one.

        A SEQPACKET message is always sent, even empty (its EOM is the message).
        """
        if not view and not last_flags:
            return
        deadline = self.driver._deadline(timeout)
        while True:
            self._check_sendable()
            credit = self.conn.send_credit()
            if credit == 0 and view:
                self.driver._wait(deadline, self._sendable_or_dead)
                continue
            n = min(credit, len(view))
            last = n == len(view)
            self.driver._send_data(self.conn, view[:n], last_flags if last else 0, deadline)
            view = view[n:]
            if last:
                return

    def _sendable_or_dead(self) -> bool:
        conn = self.conn
        return (
            conn.send_credit() > 0
            or conn.state is not ConnState.ESTABLISHED
            or bool(conn.peer_shut & ShutdownFlag.RCV)
        )

    def _wait_incoming(self, ready: Callable[[], bool], timeout: float | None) -> None:
        """Until ``ready()``, or nothing more can come (the peer shut sending, or reset)."""
        conn = self.conn
        self.driver._wait(
            self.driver._deadline(timeout),
            lambda: (
                ready()
                or conn.state is ConnState.KILLED
                or bool(conn.peer_shut & ShutdownFlag.SEND)
            ),
        )

    def recv(self, n: int, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes; b"" once the peer will send no more."""
        conn = self.conn
        self._wait_incoming(lambda: bool(conn.rx), timeout)
        if conn.rx:
            data = conn.read(n)
            self.driver._flush()
            return data
        if conn.state is ConnState.KILLED and conn.reset_reason not in ("reset by peer", "closed"):
            raise ConnectionResetError(f"connection {conn.reset_reason}")
        return b""

    def recv_exactly(self, n: int, timeout: float | None = None) -> bytes:
        out = bytearray()
        deadline = self.driver._deadline(timeout)
        while len(out) < n:
            chunk = self.recv(n - len(out), max(0.0, deadline - time.monotonic()))
            if not chunk:
                raise EOFError(f"connection ended after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_message(self, timeout: float | None = None) -> tuple[bytes, bool]:
        """The next SEQPACKET message and whether it ended a record (EOR); b"" at the end."""
        conn = self.conn
        self._wait_incoming(lambda: bool(conn.rx_messages), timeout)
        message = conn.read_message()
        self.driver._flush()
        if message is None:
            return b"", False
        return message[0], bool(message[1] & SeqFlag.EOR)

    def shutdown(self, how: int) -> None:
        """Shut ``how`` (ShutdownFlag.RCV, SEND or BOTH) of the connection."""
        self.conn.shutdown(how)
        self.driver._flush()

    def close(self) -> None:
        """SHUTDOWN both ways; the connection is gone once the peer resets it (or times out)."""
        self.conn.close()
        self.driver._flush()


class VsockDriver:
    """Initializes the vsock device behind ``transport``; opens connections on it."""

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int | None = None,
        rx_buffers: int = 64,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        timeout: float = 5.0,
        device_id: int | None = None,
    ) -> None:
        found = getattr(transport, "device_id", device_id)
        check_device_id(found, DeviceId.VSOCK, VsockDriverError, "a vsock device", unknown_ok=True)
        self.transport = transport
        self.timeout = timeout
        wanted = requested_features(SUPPORTED_FEATURES, features)
        self.features = transport.initialize(wanted)
        self.rxq = transport.setup_queue(RXQ)
        self.txq = transport.setup_queue(TXQ)
        self.eventq = transport.setup_queue(EVENTQ)
        self.buf_alloc = buf_alloc
        self.guest_cid = transport.read_config(0, 8)
        self.endpoint = self._new_endpoint()
        #: port -> connections accepted and not yet taken by accept()
        self._listening: dict[int, list[Connection]] = {}
        self._next_port = FIRST_LOCAL_PORT
        self.transport_resets = 0
        #: Every buffer the driver allocated and has not freed.
        self._buffers = OwnedBuffers(transport.allocator)
        for _ in range(min(rx_buffers, self.rxq.size)):
            addr = self._buffers.alloc(RX_BUFFER_SIZE)
            self.rxq.add([], [(addr, RX_BUFFER_SIZE)], token=addr)
        for _ in range(min(4, self.eventq.size)):
            addr = self._buffers.alloc(EVENT_SIZE)
            self.eventq.add([], [(addr, EVENT_SIZE)], token=addr)
        transport.driver_ok()
        transport.notify(RXQ)
        transport.notify(EVENTQ)

    def _new_endpoint(self) -> Endpoint:
        return Endpoint(
            self.guest_cid,
            HOST_CID,
            buf_alloc=self.buf_alloc,
            seqpacket=bool(self.features & VsockFeature.SEQPACKET.mask),
        )

    # -- the socket API -----------------------------------------------------------------

    def connect(
        self, port: int, sock_type: SockType = SockType.STREAM, timeout: float | None = None
    ) -> VsockSocket:
        """Connect to the host's ``port``; ConnectionRefusedError if it answers RST."""
        local = self._free_port(port)
        conn = self.endpoint.connect(local, port, sock_type)
        self._flush()
        self._wait(self._deadline(timeout), lambda: conn.state is not ConnState.LOCAL_INIT)
        if conn.state is not ConnState.ESTABLISHED:
            raise ConnectionRefusedError(f"port {port}: {conn.reset_reason}")
        return VsockSocket(self, conn)

    def listen(self, port: int) -> None:
        """Accept connections to ``port`` from now on (others are refused)."""
        self._listening.setdefault(port, [])

    def accept(self, port: int, timeout: float | None = None) -> VsockSocket:
        backlog = self._listening[port]
        self._wait(self._deadline(timeout), lambda: bool(backlog))
        return VsockSocket(self, backlog.pop(0))

    def _free_port(self, peer_port: int) -> int:
        for _ in range(1 << 16):
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT + (port + 1 - FIRST_LOCAL_PORT) % 16384
            if (port, peer_port) not in self.endpoint.connections and port not in self._listening:
                return port
        raise OSError(98, "no free local port")  # EADDRINUSE

    # -- moving packets -----------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _wait(self, deadline: float, done: Callable[[], bool]) -> None:
        def polled() -> bool:
            self.poll()
            if done():
                return True
            self.rxq.enable_interrupts()
            return False

        if not wait_until(self.transport, polled, deadline):
            raise TimeoutError("vsock operation timed out")

    def _send_packet(
        self, header: Header, payload: memoryview | bytes = b"", deadline: float | None = None
    ) -> None:
        addr = self._buffers.alloc(HEADER_SIZE + len(payload))
        mem = self.transport.mem
        mem.write(addr, header.pack())
        if payload:
            mem.write(addr + HEADER_SIZE, payload)
        while True:
            try:
                self.txq.add([(addr, HEADER_SIZE + len(payload))], [], token=addr)
                break
            except QueueFullError:
                self._reap_tx()
                if deadline is not None and time.monotonic() > deadline:
                    self._buffers.free(addr)
                    raise TimeoutError("TX queue full") from None
                self.transport.wait_interrupt(0.01)
        if self.txq.kick_needed():
            self.transport.notify(TXQ)

    def _send_data(
        self, conn: Connection, payload: memoryview, flags: int, deadline: float
    ) -> None:
        self._send_packet(conn.data_header(len(payload), flags), payload, deadline)

    def _flush(self) -> None:
        """Send every control packet the endpoint has queued."""
        while (header := self.endpoint.next_control()) is not None:
            self._send_packet(header)

    def _reap_tx(self) -> None:
        for token, _written in self.txq.used():
            assert isinstance(token, int)
            self._buffers.free(token)

    def poll(self) -> None:
        """Take every completion from the device and answer what needs answering."""
        if getattr(self.transport, "needs_reset", False):
            raise VsockDriverError("device needs reset")
        self._reap_tx()
        mem = self.transport.mem
        refill = []
        for token, written in self.rxq.used():
            assert isinstance(token, int)
            refill.append(token)
            if written < HEADER_SIZE:
                continue
            header = Header.unpack(mem.read(token, HEADER_SIZE))
            length = min(header.len, written - HEADER_SIZE, MAX_PKT_PAYLOAD)
            payload = mem.read(token + HEADER_SIZE, length) if length > 0 else b""
            conn = self.endpoint.receive(header, payload)
            if conn is not None and conn.state is ConnState.PEER_INIT:
                backlog = self._listening.get(conn.key.local_port)
                if backlog is None:
                    self.endpoint.refuse(conn)
                else:
                    conn.accept()
                    backlog.append(conn)
        for addr in refill:
            self.rxq.add([], [(addr, RX_BUFFER_SIZE)], token=addr)
        if refill and self.rxq.kick_needed():
            self.transport.notify(RXQ)
        events = []
        for token, written in self.eventq.used():
            assert isinstance(token, int)
            if written >= EVENT_SIZE:
                events.append(unpack_event(mem.read(token, EVENT_SIZE)))
            self.eventq.add([], [(token, EVENT_SIZE)], token=token)
        if events:
            if self.eventq.kick_needed():
                self.transport.notify(EVENTQ)
            if EventId.TRANSPORT_RESET in events:
                self._transport_reset()
        self.endpoint.expire()
        self.endpoint.reap()
        self._flush()

    def _transport_reset(self) -> None:
        """Every connection is gone (device-types/vsock: Device Events); the CID may change."""
        self.transport_resets += 1
        self.endpoint.reset_all("transport reset")
        self.guest_cid = self.transport.read_config(0, 8)
        old = self.endpoint
        self.endpoint = self._new_endpoint()
        for backlog in self._listening.values():
            backlog.clear()
        del old

    def close(self) -> None:
        """Reset the device (the connections end without notice) and free the driver's buffers.

        Over a transport that cannot reset the device the buffers stay
        allocated: the device may still write into them.
        """
        reset = getattr(self.transport, "reset", None)
        if callable(reset):
            reset()
            self._buffers.free_all()
