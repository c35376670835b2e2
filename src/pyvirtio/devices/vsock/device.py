"""virtio-vsock: the device model (device-types/vsock).

Three queues: RX (device to guest packets), TX (guest to device packets) and
the event queue (TRANSPORT_RESET after a restore); ``guest_cid`` in config
space.  The device speaks for the host (CID 2): its
:class:`~.connection.Endpoint` holds the connection table and runs the
protocol and the credit flow; the host side it is given (a
:class:`~.unix.UnixVsockHost`) owns every socket and the timer, and the
device lists their fds in :meth:`Vsock.host_fds` for the host's event loop
(the vhost-user back end, or a test's).

Data path:

* Guest to host: each TX packet is checked (header length, CIDs, type, op,
  ``len`` against the chain and :data:`~.wire.MAX_PKT_PAYLOAD`) and handed
  to the endpoint; payload waits in the connection (at most ``buf_alloc``
  bytes, or the guest broke its credit and gets RST) and is written to the
  host socket as it takes it.  A slow host reader stops the credit, so the
  guest stops sending: nothing is dropped.
* Host to guest: a connection's host socket is polled for reading only
  while the guest gave credit and posted RX buffers; stream bytes are
  received straight into the RX buffer after the header.  A slow guest
  leaves the bytes in the host socket.  Control packets (RESPONSE, RST,
  CREDIT_UPDATE, ...) go out first.

Malformed packets are dropped or answered with RST, counted in
:attr:`Vsock.stats` and logged at most once per :data:`LOG_INTERVAL`
per kind.  Only a malformed ring stops the device.

Limits: a host SEQPACKET socket reads an empty message as end of file,
so host programs cannot send empty messages to the guest (the guest can).

Lifecycle: a reset drops every connection (their host sockets are closed).
Snapshots hold no connections: after :meth:`restore` the device drops them
and sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (device-types/vsock: Device
Events) as soon as the event queue has a buffer; the guest then reconnects.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import select
import socket
from typing import Any

from pyvirtio.constants import DeviceId
from pyvirtio.device import (
    COMMON_FEATURES,
    DeviceState,
    QueueResources,
    VirtioDevice,
    expect_object,
    expect_uint,
)
from pyvirtio.devices.vsock.connection import (
    DEFAULT_BUF_ALLOC,
    MAX_CONNECTIONS,
    PROTOCOL_STATS,
    Connection,
    ConnKey,
    ConnState,
    Endpoint,
)
from pyvirtio.devices.vsock.unix import HostRequest, UnixVsockHost
from pyvirtio.devices.vsock.wire import (
    EVENT_SIZE,
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_PAYLOAD,
    EventId,
    Header,
    Op,
    SeqFlag,
    ShutdownFlag,
    SockType,
    VsockFeature,
    pack_config,
    pack_event,
)
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue

__all__ = ["EVENTQ", "FIRST_HOST_PORT", "RXQ", "TXQ", "Vsock"]

log = logging.getLogger(__name__)

RXQ = 0
TXQ = 1
EVENTQ = 2

DEFAULT_QUEUE_SIZE = 256
#: Seconds between two log lines about the same kind of guest error.
LOG_INTERVAL = 10.0
#: Ports the device gives host-initiated connections start here (as Firecracker's).
FIRST_HOST_PORT = 1 << 30
#: Largest SEQPACKET message taken from a host socket at once.
MAX_HOST_MESSAGE = 256 * 1024

#: Counters in :attr:`Vsock.stats` besides the endpoint's (:data:`PROTOCOL_STATS`).
_DEVICE_STATS = ("short_header", "bad_length", "host_refused", "host_errors")


class _Link:
    """A connection's host end: its socket and where its two directions stand."""

    __slots__ = ("host_eof", "host_port", "message", "readable", "sock", "write_shut")

    def __init__(self, sock: socket.socket, host_port: int | None = None) -> None:
        self.sock = sock
        #: Set for host-initiated connections until ``OK`` was sent.
        self.host_port = host_port
        self.host_eof = False
        self.readable = False
        self.write_shut = False
        #: SEQPACKET: a message read from the host, not all sent to the guest yet.
        self.message: memoryview | None = None


def _link(conn: Connection) -> _Link:
    link = conn.user
    assert isinstance(link, _Link)
    return link


class Vsock(VirtioDevice):
    """A vsock device for the guest with ``guest_cid``, its host side ``host``."""

    device_id = DeviceId.VSOCK

    def __init__(
        self,
        guest_cid: int,
        host: UnixVsockHost,
        *,
        seqpacket: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_connections: int = MAX_CONNECTIONS,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        if not 3 <= guest_cid < 0xFFFF_FFFF:
            raise ValueError(f"guest CID must be in [3, 2**32 - 1), not {guest_cid}")
        features = COMMON_FEATURES | VsockFeature.STREAM.mask
        if seqpacket:
            features |= VsockFeature.SEQPACKET.mask
        super().__init__(features, (queue_size, queue_size, queue_size))
        self.guest_cid = guest_cid
        self.host = host
        self.max_connections = max_connections
        self.buf_alloc = buf_alloc
        self._limiter = RateLimitedLog(log, self.name, interval=LOG_INTERVAL)
        #: Drop and error counters (guest errors, limits, host failures): the
        #: device's own and its endpoints', kept across resets and activations.
        self.stats: dict[str, int] = dict.fromkeys(_DEVICE_STATS + PROTOCOL_STATS, 0)
        self.endpoint = self._new_endpoint(seqpacket=False)
        self._rx_spare: DescriptorChain | None = None
        #: Host socket fd -> its connection.
        self._by_fd: dict[int, Connection] = {}
        self._next_host_port = FIRST_HOST_PORT
        self._transport_reset_pending = False

    def _new_endpoint(self, *, seqpacket: bool) -> Endpoint:
        return Endpoint(
            HOST_CID,
            self.guest_cid,
            buf_alloc=self.buf_alloc,
            max_connections=self.max_connections,
            seqpacket=seqpacket,
            warn=self._warn,
            stats=self.stats,
        )

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """A guest error: logged once per kind every LOG_INTERVAL seconds."""
        self._limiter.warn(kind, None, message, *args)

    def config_bytes(self) -> bytes:
        return pack_config(self.guest_cid)

    # -- lifecycle ------------------------------------------------------------------

    def _on_activate(self, resources: QueueResources) -> None:
        self._drop_connections("device activated")
        self.endpoint = self._new_endpoint(seqpacket=self.has_feature(VsockFeature.SEQPACKET))
        self._rx_spare = None

    def _on_reset(self) -> None:
        self._drop_connections("device reset")
        self._rx_spare = None
        self._transport_reset_pending = False

    def _on_sleep(self) -> None:
        # A chain held back for the next host bytes goes back to the ring
        # owner's accounting: hand it back to the guest empty.
        self._return_spare()

    def _serve_posted(self) -> None:
        for index in (TXQ, EVENTQ, RXQ):
            self.queue_notify(index)

    def close(self) -> None:
        """Drop the connections and close the host side."""
        self._drop_connections("device closed")
        self.host.close()

    def _drop_connections(self, reason: str) -> None:
        for conn in self.endpoint.reset_all(reason):
            self._release(conn)

    # -- snapshot ---------------------------------------------------------------------

    def _snapshot_model(self) -> Any:
        # Connections are not part of a snapshot: their host sockets cannot
        # follow it.  The restored device tells the guest (TRANSPORT_RESET).
        return {"guest_cid": self.guest_cid, "next_host_port": self._next_host_port}

    def _restore_model(self, state: Any) -> None:
        state = expect_object(state, "vsock state")
        if expect_uint(state.get("guest_cid")) != self.guest_cid:
            raise ValueError(f"snapshot is of guest CID {state.get('guest_cid')}")
        self._next_host_port = expect_uint(state.get("next_host_port"))
        self._drop_connections("restored from a snapshot")
        self._rx_spare = None
        self._transport_reset_pending = True

    # -- queues -------------------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        if index == TXQ:
            self._process_tx(queue)
        elif index == EVENTQ:
            self._send_events(queue)
        self._after_work()

    def _after_work(self) -> None:
        """Release killed connections, move data to the host, fill RX buffers."""
        for conn in self.endpoint.reap():
            self._release(conn)
        self._process_rx()
        for conn in self.endpoint.reap():
            self._release(conn)

    def _send_events(self, queue: DeviceQueue) -> None:
        while self._transport_reset_pending:
            chain = queue.pop()
            if chain is None:
                return
            if chain.writable_len < EVENT_SIZE:
                # A cut event is no event (the guest drops it): it waits for a
                # whole buffer (device-types/vsock: Device Events).
                self.stats["short_header"] += 1
                self._warn("eventshort", "event buffer of %d bytes", chain.writable_len)
                queue.add_used(chain, 0)
                self.signal_used(EVENTQ)
                continue
            written = chain.write(pack_event(EventId.TRANSPORT_RESET))
            queue.add_used(chain, written)
            self._transport_reset_pending = False
            self.signal_used(EVENTQ)

    def _process_tx(self, queue: DeviceQueue) -> None:
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while (chain := queue.pop()) is not None:
                completions.append((chain, 0))
                self._tx_packet(chain)
        finally:
            self._return_used(TXQ, queue, completions)

    def _tx_packet(self, chain: DescriptorChain) -> None:
        if chain.readable_len < HEADER_SIZE:
            self.stats["short_header"] += 1
            self._warn("short", "TX packet of %d bytes dropped", chain.readable_len)
            return
        header = Header.unpack(chain.read(0, HEADER_SIZE))
        if header.len > MAX_PKT_PAYLOAD or header.len > chain.readable_len - HEADER_SIZE:
            self.stats["bad_length"] += 1
            self._warn(
                "length",
                "TX packet with len %d in a %d-byte buffer",
                header.len,
                chain.readable_len,
            )
            # Well addressed: the connection cannot go on with a lost packet.
            conn = self.endpoint.connections.get(ConnKey(header.dst_port, header.src_port))
            if conn is not None and header.src_cid == self.guest_cid:
                conn.reset("malformed packet")
            return
        payload = chain.read(HEADER_SIZE, header.len) if header.op == Op.RW else b""
        conn = self.endpoint.receive(header, payload)
        if conn is None or conn.state is ConnState.KILLED:
            return
        if conn.user is None:
            self._guest_connect(conn)
            return
        link = _link(conn)
        if link.host_port is not None and conn.state is ConnState.ESTABLISHED:
            if UnixVsockHost.confirm(link.sock, link.host_port):
                link.host_port = None
            else:
                conn.reset("host went away")
                return
        self._flush_to_host(conn)

    def _guest_connect(self, conn: Connection) -> None:
        port = conn.key.local_port
        try:
            sock = self.host.connect(port, conn.type)
        except OSError as exc:
            self.stats["host_refused"] += 1
            self._limiter.log(
                logging.INFO,
                "refused",
                None,
                "guest connection to port %d refused: %s",
                port,
                exc.strerror,
            )
            self.endpoint.refuse(conn, "nobody listens on the host")
            return
        self._attach(conn, _Link(sock))
        conn.accept()

    # -- guest -> host ----------------------------------------------------------------

    def _flush_to_host(self, conn: Connection) -> None:
        """Write what the guest sent to the host socket, as far as it takes it."""
        link = _link(conn)
        sock = link.sock
        try:
            if conn.type is SockType.SEQPACKET:
                while (message := conn.peek_message()) is not None:
                    # Credit already bounds a message by buf_alloc: send it whole,
                    # and consume it only once the host socket took it.
                    sock.send(message[0])
                    conn.drop_message()
            else:
                while conn.rx:
                    sent = sock.send(conn.rx[0][0])
                    conn.consume(sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._host_failed(conn, exc)
            return
        if (
            conn.peer_shut & ShutdownFlag.SEND
            and not conn.rx
            and not link.write_shut
            and conn.state is not ConnState.KILLED
        ):
            link.write_shut = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def _host_failed(self, conn: Connection, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            # The guest can cause these (a SEQPACKET message too big for the
            # host socket, say) as often as it likes: rate-limited.
            self.stats["host_errors"] += 1
            self._limiter.log(logging.INFO, "host", None, "host socket of %s failed: %s", conn, exc)
        conn.reset("host socket closed")

    # -- host -> guest ----------------------------------------------------------------

    def _process_rx(self) -> None:
        queues = self.queues
        if not queues or self.needs_reset:
            return
        queue = queues[RXQ]
        completions: list[tuple[DescriptorChain, int]] = []
        endpoint = self.endpoint
        ready = collections.deque(
            c for c in endpoint if c.user is not None and self._has_host_data(c)
        )
        try:
            while True:
                chain = self._rx_spare
                self._rx_spare = None
                if chain is None:
                    if not endpoint.has_control() and not ready:
                        break
                    chain = queue.pop()
                    if chain is None:
                        break
                room = chain.writable_len - HEADER_SIZE
                if room >= 0 and (header := endpoint.next_control()) is not None:
                    chain.write(header.pack())
                    completions.append((chain, HEADER_SIZE))
                    continue
                if room < 0 or (room == 0 and ready):
                    # Too short for a header, or room for a header only while
                    # data waits: no byte fits, and kept for the next control
                    # packet it would hold the data back.  Given back empty.
                    self.stats["short_header"] += 1
                    self._warn("rxshort", "RX buffer of %d bytes", chain.writable_len)
                    completions.append((chain, 0))
                    continue
                written = 0
                while ready and not written:
                    # Round robin: one buffer per connection in turn.
                    conn = ready.popleft()
                    written = self._rx_data(conn, chain)
                    # One that gave nothing is not retried on this buffer (it would spin).
                    if written and self._has_host_data(conn):
                        ready.append(conn)
                if written:
                    completions.append((chain, written))
                else:
                    self._rx_spare = chain
                    if not endpoint.has_control():
                        break
        finally:
            self._return_used(RXQ, queue, completions)

    @staticmethod
    def _has_host_data(conn: Connection) -> bool:
        link = _link(conn)
        return (link.readable or link.message is not None) and conn.send_credit() > 0

    def _rx_data(self, conn: Connection, chain: DescriptorChain) -> int:
        """Move host bytes of ``conn`` into ``chain``; bytes written (0: none came)."""
        link = _link(conn)
        room = min(conn.send_credit(), chain.writable_len - HEADER_SIZE)
        if room <= 0:
            return 0
        flags = 0
        try:
            if conn.type is SockType.SEQPACKET:
                message = link.message
                if message is None:
                    data = link.sock.recv(MAX_HOST_MESSAGE)
                    if not data:
                        raise ConnectionResetError(0, "end of file")
                    message = memoryview(data)
                n = min(room, len(message))
                chain.write(message[:n], HEADER_SIZE)
                if n == len(message):
                    link.message = None
                    flags = SeqFlag.EOM | SeqFlag.EOR
                else:
                    link.message = message[n:]
            else:
                n = link.sock.recvmsg_into(chain.writable_views(HEADER_SIZE, room))[0]
                if n == 0:
                    raise ConnectionResetError(0, "end of file")
        except (BlockingIOError, InterruptedError):
            link.readable = False
            return 0
        except OSError as exc:
            link.readable = False
            link.host_eof = True
            if exc.errno not in (0, errno.ECONNRESET):
                self.stats["host_errors"] += 1
            conn.shutdown(ShutdownFlag.SEND)
            return 0
        chain.write(conn.data_header(n, flags).pack())
        return HEADER_SIZE + n

    def _return_spare(self) -> None:
        chain = self._rx_spare
        self._rx_spare = None
        if chain is not None and self.queues:
            self.queues[RXQ].add_used(chain, 0)
            self.signal_used(RXQ)

    # -- host fds ---------------------------------------------------------------------

    def host_fds(self) -> list[tuple[int, int]]:
        if self.state is not DeviceState.ACTIVE or self.needs_reset:
            self.host.set_alarm(None)
            self.host.idle()  # the sockets of connections a reset dropped get closed
            return []
        accepting = len(self.endpoint) < self.max_connections
        fds = []
        queues = self.queues
        rx_room = self._rx_spare is not None or queues[RXQ].has_available()
        for conn in self.endpoint:
            link = conn.user
            if not isinstance(link, _Link):
                continue
            events = 0
            if conn.rx:
                events |= select.POLLOUT
            if (
                rx_room
                and not link.host_eof
                and not link.readable
                and link.message is None
                and conn.send_credit() > 0
            ):
                events |= select.POLLIN
            if events:
                fds.append((link.sock.fileno(), events))
        self.host.set_alarm(self.endpoint.next_deadline())
        return self.host.fds(accepting) + fds

    def host_fd_ready(self, fd: int, events: int) -> None:
        if self.state is not DeviceState.ACTIVE or self.needs_reset:
            return
        if self.host.owns(fd):
            for request in self.host.fd_ready(fd):
                self._host_connect(request)
            self.endpoint.expire()
        else:
            conn = self._by_fd.get(fd)
            if conn is None:
                return
            if events & select.POLLOUT:
                self._flush_to_host(conn)
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                _link(conn).readable = True
        self._after_work()

    def _host_connect(self, request: HostRequest) -> None:
        endpoint = self.endpoint
        sock, port = request.sock, request.port
        if len(endpoint) >= self.max_connections or (
            request.sock_type is SockType.SEQPACKET and not endpoint.seqpacket
        ):
            self.host.retire(sock)
            return
        local_port = self._next_host_port
        while (local_port, port) in endpoint.connections:
            local_port = FIRST_HOST_PORT + (local_port + 1 - FIRST_HOST_PORT) % (1 << 30)
        self._next_host_port = FIRST_HOST_PORT + (local_port + 1 - FIRST_HOST_PORT) % (1 << 30)
        conn = endpoint.connect(local_port, port, request.sock_type)
        self._attach(conn, _Link(sock, host_port=local_port))

    def _attach(self, conn: Connection, link: _Link) -> None:
        conn.user = link
        self._by_fd[link.sock.fileno()] = conn

    def _release(self, conn: Connection) -> None:
        link = conn.user
        if isinstance(link, _Link):
            conn.user = None
            self._by_fd.pop(link.sock.fileno(), None)
            self.host.retire(link.sock)
