"""A vhost-user back end serving any :class:`~pyvirtio.device.VirtioDevice`.

:class:`VhostUserBackend` listens on a unix socket, accepts one front end
(QEMU, or :class:`pyvirtio.driver.vhost_user.VhostUserFrontend`) at a time
and speaks the back-end side of QEMU's docs/interop/vhost-user.rst: feature
and protocol-feature negotiation, the memory table, ring setup, kick and call
eventfds, config space, reset.  One thread runs an epoll loop over the
listening socket, the connection, the kick eventfds and the device's own fds
(``VirtioDevice.host_fds``, e.g. a TAP) (:meth:`serve_forever`,
or :meth:`run_once` from a test); :meth:`stop` may be called from any thread
or a signal handler.

Addresses.  The front end shares its memory as regions with a guest-physical
base, a size and a *user address* (its own mapping's address).  Regions are
mapped into one :class:`~pyvirtio.memory.GuestMemory` keyed by guest-physical
address, which is what descriptors hold ("Memory access": guest addresses map
to the region containing them).  SET_VRING_ADDR gives ring addresses as front-
end user addresses; they are translated to guest-physical through the
region table (user base -> guest base) when the queue is built.

Ring states ("Ring states").  A ring is *started* by SET_VRING_KICK and
stopped by GET_VRING_BASE; with VHOST_USER_F_PROTOCOL_FEATURES negotiated it
is also *enabled* only by SET_VRING_ENABLE 1 (else it starts enabled).  A
ring is *ready* when it has a size, addresses, is started and enabled.

Activation policy.  A VirtioDevice is activated once with all its queues,
but QEMU configures and enables rings one message at a time and never says
"done" (unless STATUS is negotiated).  The device is activated when ring 0
is ready and every other *started* ring is ready too: QEMU sends every
SET_VRING_KICK before the first SET_VRING_ENABLE, so activation waits for the
last enable.  Rings never started are passed as
:class:`~pyvirtio.virtqueue.disabled.DisabledQueue`; one that becomes ready
later replaces its placeholder in the running device (as virtio-MMIO's
QueueReady after DRIVER_OK does).  If the device refuses (ActivationError,
e.g. a device that needs all its queues), activation is retried at the next
ring that becomes ready.  SET_STATUS with DRIVER_OK (STATUS negotiated) also
triggers an attempt with whatever rings are ready.

Stopping.  GET_VRING_BASE on a ring of a running device (and SET_STATUS 0,
RESET_OWNER, RESET_DEVICE, a new SET_MEM_TABLE or a disconnect) stops the
whole device: it is put to sleep (finishing in-flight requests), woken and
reset, its negotiated features re-acked, and every ring's next available
index is saved as that ring's base, so the GET_VRING_BASE replies (QEMU asks
for each ring in turn) report where each ring really is and a restart
without a new SET_VRING_BASE resumes there.  Packed rings report the avail
index and wrap counter in bits 0-15 and the used index and wrap counter in
bits 16-31, as QEMU encodes them.

Failures.  A malformed message (see :mod:`.protocol`), a disconnect (even in
the middle of a message) or a failed send gets one log line; the back end
closes the connection, resets the device, closes every fd and unmaps the
memory, and accepts the next connection (QEMU's reconnect).  A well-formed
request that cannot be honoured is answered with a non-zero REPLY_ACK status
when the front end asked for one, and logged (rate-limited, see
:mod:`pyvirtio.ratelimit`); a refused request changes nothing.

Hostile front ends (ARCHITECTURE.md has the whole list).  Nothing a front
end does may crash, stall or leak this process: shared memory must be
sealable against shrinking (else SIGBUS) unless ``unsealed_memory`` allows
it; call and err fds are non-blocking; replies are buffered, not waited
for; feature changes under running rings are refused.  Front ends that
connect while one is served wait their turn (MAX_WAITING_FRONT_ENDS).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import DeviceState, VirtioDevice
from pyvirtio.memory import GuestMemory, GuestMemoryError, UnsealedMemoryError
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.transport.vhost_user.protocol import (
    FLAG_REPLY,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_FD_INDEX_MASK,
    VRING_FD_NOFD,
    BackendRequest,
    ConfigSpace,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    Payload,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    encode,
    fds_from_ancillary,
    has_explicit_reply,
)
from pyvirtio.virtqueue.common import MAX_QUEUE_SIZE, DeviceQueue, VirtqueueError
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "UnsealedMemory",
    "VhostUserBackend",
]

log = logging.getLogger(__name__)

#: Protocol features offered by default (vhost-user.rst "Protocol features").
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.BACKEND_REQ.mask
    | ProtocolFeature.CONFIG.mask
    | ProtocolFeature.RESET_DEVICE.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.STATUS.mask
)
#: Protocol features this back end can honour at all.
_SUPPORTED_PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES
#: Answer to GET_MAX_MEM_SLOTS (QEMU caps it to what the platform supports).
DEFAULT_MAX_MEM_SLOTS = 32
#: How long replies may wait for a front end that does not read them before
#: it is dropped (the loop never waits for it meanwhile).
DEFAULT_SEND_TIMEOUT = 5.0
#: Replies a front end has not read yet, in bytes, before it is dropped.  QEMU
#: waits for each reply before its next request: a few dozen bytes at most.
MAX_UNSENT_REPLIES = 256 * 1024
#: Connections the kernel queues before accept (connect then fails with EAGAIN).
LISTEN_BACKLOG = 128
#: Front ends accepted while another is served, waiting for their turn.
MAX_WAITING_FRONT_ENDS = 4
#: QEMU's VIRTQUEUE_MAX_SIZE: the largest ring QEMU's device models configure.
QEMU_MAX_RING_SIZE = 1024
#: A repeated error of one kind is logged at most once per this many seconds.
LOG_INTERVAL = 30.0

_F_PROTOCOL = 1 << VHOST_USER_F_PROTOCOL_FEATURES
#: Ancillary buffer for one recvmsg: room for more fds than a message may
#: carry, so "too many" reaches the parser as a clear error; beyond 64 the
#: kernel truncates (MSG_CTRUNC, also refused) and closes the rest.
_ANCILLARY_SPACE = socket.CMSG_SPACE(4 * 64)
_EVENT_ONE = 1
_PACKED_WRAP = 0x8000
#: Longest stretch of ring polling before the loop looks at its fds again.
_POLL_SLICE = 0.001
_PACKED_INDEX = 0x7FFF
#: VHOST_F_LOG_ALL: QEMU re-sends SET_FEATURES with it set or cleared while
#: migrating; the only feature change allowed on running rings.
_F_LOG_ALL = 1 << 26
_SPLIT_BASE_LIMIT = 0xFFFF
_EVENTFD_LINK = "anon_inode:[eventfd]"


class UnsealedMemory(enum.Enum):
    """What the back end does with shared memory it cannot seal against shrinking.

    A front end that truncates such memory makes the back end's next access
    raise SIGBUS, which kills a Python process (see :mod:`pyvirtio.memory`).
    """

    #: Refuse the region (NACK) with a log line saying why: the default.
    REFUSE = "refuse"
    #: Map it anyway, with a warning: for trusted front ends whose memory
    #: cannot be sealed (DPDK's virtio-user, hugetlbfs files).
    ALLOW = "allow"


class _RequestError(Exception):
    """A well-formed request the back end cannot honour (answered with a NACK)."""


class _FatalRequestError(Exception):
    """A request whose failure leaves no way to answer: the connection is dropped."""


@dataclass
class _Region:
    """One shared memory region: where it is for the guest and for the front end."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def contains_user(self, addr: int) -> bool:
        return self.user_addr <= addr < self.user_addr + self.size


@dataclass
class _Vring:
    """What the front end configured for one ring (vhost-user.rst "Ring states")."""

    index: int
    num: int | None = None
    addr: VringAddr | None = None
    #: SET_VRING_BASE value (or the position saved when the ring stopped).
    base: int = 0
    started: bool = False
    enabled: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    #: The device queue while the device runs on this ring.
    queue: DeviceQueue | None = None

    def ready(self) -> bool:
        return self.num is not None and self.addr is not None and self.started and self.enabled


@dataclass
class _Session:
    """Per-connection state, thrown away on disconnect."""

    sock: socket.socket
    parser: MessageParser = field(
        default_factory=lambda: MessageParser(FrontendRequest, replies=False)
    )
    features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    mem: GuestMemory = field(default_factory=GuestMemory)
    regions: list[_Region] = field(default_factory=list)
    vrings: list[_Vring] = field(default_factory=list)
    backend_channel: socket.socket | None = None
    closing: bool = False
    #: Reply bytes the front end has not taken yet (sent when the socket has room).
    unsent: bytearray = field(default_factory=bytearray)
    #: time.monotonic() when ``unsent`` last went from empty to non-empty.
    unsent_since: float = 0.0
    #: Whether this front end's unsealed memory was warned about already.
    warned_unsealed: bool = False
    #: This front end's refusals, rate-limited (a new front end's are logged afresh).
    refusals: RateLimitedLog | None = None


class _EventfdInterrupt:
    """DeviceInterrupt over the call eventfds (and the back-end channel for config changes)."""

    def __init__(self, backend: VhostUserBackend) -> None:
        self._backend = backend

    def signal_used_queue(self, queue_index: int) -> None:
        self._backend._signal_call(queue_index)

    def signal_config_change(self) -> None:
        self._backend._signal_config_change()


def _close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class VhostUserBackend:
    """Serves ``device`` to vhost-user front ends on the unix socket ``socket_path``.

    The socket is created (a stale socket file is replaced) at construction.
    ``protocol_features`` limits the protocol features offered (default
    :data:`DEFAULT_PROTOCOL_FEATURES`), e.g. to make a front end use
    SET_MEM_TABLE instead of ADD_MEM_REG.  ``poll_us`` > 0 keeps polling a
    ring that long after serving it, with notifications off (see
    :meth:`_start_polling`): fewer kicks and wake-ups, more CPU time.  Poll
    only in a process of its own (``pyvirtio serve --poll-us``): in a thread
    next to other Python threads the spinning holds the GIL they need.
    """

    def __init__(
        self,
        device: VirtioDevice,
        socket_path: str | os.PathLike[str],
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        poll_us: float = 0.0,
        unsealed_memory: UnsealedMemory | str = UnsealedMemory.REFUSE,
    ) -> None:
        if device.num_queues > VRING_FD_INDEX_MASK + 1:
            raise ValueError(f"{device.name}: {device.num_queues} queues, vhost-user allows 256")
        self.device = device
        self.socket_path = Path(socket_path)
        self.protocol_features_offered = protocol_features & _SUPPORTED_PROTOCOL_FEATURES
        self.max_mem_slots = max_mem_slots
        self.send_timeout = send_timeout
        self.unsealed_memory = UnsealedMemory(unsealed_memory)
        #: Microseconds to keep polling a ring for new buffers after serving it
        #: (0: sleep in epoll at once).  See _start_polling.
        self.poll_us = poll_us
        #: Requests received, oldest first (bounded): the message order a front end used.
        self.received: collections.deque[str] = collections.deque(maxlen=4096)
        #: Connections accepted so far.
        self.connections = 0
        #: Used-buffer and error notifications that could not be delivered
        #: (a call or err fd that is full or fails).
        self.notifications_dropped = 0
        #: Errors a front end can repeat at will are logged rate-limited.
        self._log = RateLimitedLog(log, repr(self), interval=LOG_INTERVAL)
        #: Front ends accepted while another is served (see _accept).
        self._waiting: collections.deque[socket.socket] = collections.deque()
        #: Call and err fds that are eventfds (a full one means "already signalled").
        self._eventfds: set[int] = set()
        self._interrupt = _EventfdInterrupt(self)
        self._fd_lock = threading.Lock()
        self._session: _Session | None = None
        self._stop_requested = False
        self._closed = False
        self._handlers = self._build_handlers()

        self._listener = self._listen(self.socket_path)
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        #: kick fd -> ring index
        self._kick_fds: dict[int, int] = {}
        #: fd -> events of the device's own fds (VirtioDevice.host_fds) in the epoll
        self._host_fds: dict[int, int] = {}
        #: ring index -> (queue, end of its poll window): rings being busy-polled
        self._polling: dict[int, tuple[DeviceQueue, float]] = {}
        device.on_needs_reset = self._on_needs_reset

    def __repr__(self) -> str:
        return f"VhostUserBackend({self.device.name}, {str(self.socket_path)!r})"

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            path.unlink()  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound under a temporary name and renamed once listening: a front end
        # that sees the path never meets a socket that refuses connections.
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            sock.bind(str(staging))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            os.rename(staging, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                staging.unlink()
            raise
        return sock

    # -- public state ----------------------------------------------------------------

    def max_ring_size(self, index: int) -> int:
        """The largest SET_VRING_NUM accepted for ring ``index``.

        vhost-user has no message to tell the front end a maximum: QEMU sizes
        rings from its own device model (virtio-net's tx/rx_queue_size, up to
        VIRTQUEUE_MAX_SIZE).  So the limit is the device's own maximum or
        QEMU's, whichever is larger; beyond it a size is refused.
        """
        return min(max(self.device.queue_max_sizes[index], QEMU_MAX_RING_SIZE), MAX_QUEUE_SIZE)

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def memory(self) -> GuestMemory | None:
        """The current front end's memory (None when no one is connected)."""
        return self._session.mem if self._session is not None else None

    @property
    def features(self) -> int:
        """Features of the current connection's SET_FEATURES (including bit 30)."""
        return self._session.features if self._session is not None else 0

    @property
    def protocol_features(self) -> int:
        """Protocol features the current front end negotiated."""
        return self._session.protocol_features if self._session is not None else 0

    # -- event loop ------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve front ends until :meth:`stop` is called (consuming that request)."""
        try:
            while not self._stop_requested:
                self.run_once(None)
        finally:
            self._stop_requested = False

    def stop(self) -> None:
        """Make :meth:`serve_forever` return; safe from other threads and signal handlers."""
        self._stop_requested = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def run_once(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for events and handle them; True if any came.

        While a ring is being polled (``poll_us``) the wait is a zero-timeout
        look at the fds, then up to _POLL_SLICE seconds of polling the rings.
        """
        if self._closed:
            raise RuntimeError("back end is closed")
        if self._polling:
            timeout = 0
        reply_deadline = self._reply_deadline()
        if reply_deadline is not None:
            timeout = max(0.0, min(reply_deadline, timeout if timeout is not None else 1e9))
        events = self._epoll.poll(-1 if timeout is None else timeout)
        for fd, mask in events:
            try:
                self._dispatch(fd, mask)
            except Exception:
                # A bug of ours or the device's must not end the service: drop
                # the connection it happened on and go on.
                log.exception("%s: internal error handling fd %d", self, fd)
                self._disconnect("internal error", level=logging.ERROR)
        self._sync_host_fds()
        served = self._poll_rings() if self._polling else False
        reply_deadline = self._reply_deadline()
        if reply_deadline is not None and reply_deadline <= 0 and self._session is not None:
            self._disconnect(
                f"front end is not reading its replies ({len(self._session.unsent)} bytes "
                f"unsent for {self.send_timeout:g} s)"
            )
        return bool(events) or served

    def _reply_deadline(self) -> float | None:
        """Seconds until the unread replies' send_timeout expires (None: none wait)."""
        session = self._session
        if session is None or not session.unsent:
            return None
        return session.unsent_since + self.send_timeout - time.monotonic()

    def _sync_host_fds(self) -> None:
        """Poll the fds the device asks for (VirtioDevice.host_fds), as it asks now.

        A device with a back end of its own (a TAP) lists its fd; the
        interest changes with its work, so it is asked after every round.
        """
        try:
            wanted = dict(self.device.host_fds())
        except Exception:
            log.exception("%s: device failed listing its fds", self)
            wanted = {}
        for fd, events in list(self._host_fds.items()):
            if wanted.get(fd) != events:
                del self._host_fds[fd]
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
        for fd, events in wanted.items():
            if fd not in self._host_fds and events:
                try:
                    self._epoll.register(fd, events)
                except OSError as exc:
                    log.warning("%s: cannot poll device fd %d: %s", self, fd, exc)
                    continue
                self._host_fds[fd] = events

    def _dispatch(self, fd: int, mask: int) -> None:
        if fd == self._wake_fd:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)
            return
        if fd == self._listener.fileno():
            self._accept()
            return
        session = self._session
        if session is not None and fd == session.sock.fileno():
            if mask & select.EPOLLOUT:
                self._flush(session)
            if mask & ~select.EPOLLOUT and self._session is session:
                self._read_connection(session)
            return
        if fd in self._host_fds:
            self.device.host_fd_ready(fd, mask)
            return
        index = self._kick_fds.get(fd)
        if index is not None:
            self._kick(fd, index, mask)

    def close(self) -> None:
        """Drop any connection, close the socket and remove its file."""
        if self._closed:
            return
        while self._waiting:  # (before the disconnect, which would serve the next)
            self._waiting.popleft().close()
        if self._session is not None:
            self._disconnect("back end closing", level=logging.INFO)
        self._closed = True
        self._epoll.close()
        self._listener.close()
        os.close(self._wake_fd)
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        if self.device.on_needs_reset == self._on_needs_reset:
            self.device.on_needs_reset = None

    def __enter__(self) -> VhostUserBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept a front end; one is served at a time, a few more wait their turn.

        A front end that connects while another is served is accepted and
        waits (its messages stay unread in its socket) until the current one
        disconnects; past MAX_WAITING_FRONT_ENDS waiting, new ones are
        closed at once.  Each case gets a log line.
        """
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._log.warn("accept", None, "accept failed: %s", exc)
            return
        # Non-blocking: the loop never waits on a front end (replies it does
        # not read are buffered, up to MAX_UNSENT_REPLIES; see _send).
        sock.setblocking(False)
        if self._session is not None:
            if len(self._waiting) >= MAX_WAITING_FRONT_ENDS:
                sock.close()
                self._log.warn(
                    "refused",
                    None,
                    "another front end connected while one is served and %d are waiting: "
                    "closed it (one front end at a time)",
                    len(self._waiting),
                )
                return
            self._waiting.append(sock)
            log.warning(
                "%s: another front end connected: it is waiting until the current one "
                "disconnects (one front end at a time; %d waiting)",
                self,
                len(self._waiting),
            )
            return
        self._start_session(sock)

    def _start_session(self, sock: socket.socket) -> None:
        session = _Session(sock, refusals=RateLimitedLog(log, repr(self), interval=LOG_INTERVAL))
        session.vrings = [_Vring(i) for i in range(self.device.num_queues)]
        self._session = session
        self.connections += 1
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        log.info("%s: front end connected", self)

    def _read_connection(self, session: _Session) -> None:
        """Read at most the rest of the current header or payload, and handle what completes."""
        try:
            data, ancdata, msg_flags, _ = session.sock.recvmsg(
                session.parser.wanted(), _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"receive failed: {exc}")
            return
        fds = fds_from_ancillary(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            self._disconnect("malformed message from front end: too many file descriptors")
            return
        if not data:
            _close_fds(fds)
            if session.parser.in_message:
                self._disconnect(
                    f"front end disconnected in the middle of a message "
                    f"({session.parser.buffered} bytes received)"
                )
            else:
                self._disconnect("front end disconnected", level=logging.INFO)
            return
        try:
            messages = session.parser.feed(data, fds)
        except ProtocolError as exc:
            _close_fds(exc.fds)
            self._disconnect(f"malformed message from front end: {exc}")
            return
        for message in messages:
            if self._session is not session:
                _close_fds(message.fds)  # dropped by an earlier message of this batch
                continue
            self._handle(session, message)

    def _disconnect(self, reason: str, *, level: int = logging.WARNING) -> None:
        """Close the connection and return to a fresh state, ready for the next one."""
        session = self._session
        if session is None or session.closing:
            return
        session.closing = True  # a failure inside the teardown must not start it again
        log.log(level, "%s: %s; closing the connection", self, reason)
        try:
            self._stop_device(session, "front end gone")
        except Exception:
            # The teardown goes on whatever stopping the device did: ending it
            # here would keep a dead session and never accept another front end.
            log.exception("%s: stopping the device failed", self)
        self._polling.clear()
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: device reset failed", self)
        with contextlib.suppress(KeyError, OSError):
            self._epoll.unregister(session.sock.fileno())
        session.sock.close()
        _close_fds(session.parser.take_fds())
        for vring in session.vrings:
            self._set_kick_fd(vring, None)
            self._set_fd(vring, "call_fd", None)
            self._set_fd(vring, "err_fd", None)
            vring.queue = None
        with self._fd_lock:
            channel, session.backend_channel = session.backend_channel, None
        if channel is not None:
            channel.close()
        session.mem.close()
        session.regions.clear()
        # Only now, with every fd closed and the memory unmapped, is the
        # connection gone for observers (``connected``): a caller that waits
        # for that and then counts fds or mappings must see them released.
        self._session = None
        session.unsent.clear()
        if self._waiting and not self._closed:
            self._start_session(self._waiting.popleft())

    # -- messages ------------------------------------------------------------------------

    def _handle(self, session: _Session, message: Message) -> None:
        request = message.request
        assert isinstance(request, FrontendRequest)
        self.received.append(request.name)
        log.debug("%s: <- %r", self, message)
        handler = self._handlers.get(request)
        schema_reply = has_explicit_reply(request)
        try:
            if handler is None:
                _close_fds(message.fds)
                if schema_reply:
                    raise _FatalRequestError(f"unsupported request {request.name}")
                raise _RequestError(f"unsupported request {request.name}")
            reply = handler(message)
        except _FatalRequestError as exc:
            self._disconnect(f"{request.name} failed: {exc}")
            return
        except (_RequestError, GuestMemoryError, VirtqueueError) as exc:
            assert session.refusals is not None
            session.refusals.warn("refused", request.name, "%s refused: %s", request.name, exc)
            if message.need_reply:
                self._send_reply(session, request, 1)
            return
        except Exception:
            self._log.log(
                logging.ERROR,
                "device-failed",
                request.name,
                "%s failed in the device",
                request.name,
                exc_info=True,
            )
            if schema_reply:
                self._disconnect(f"{request.name} failed")
            elif message.need_reply:
                self._send_reply(session, request, 1)
            return
        if schema_reply:
            self._send_reply(session, request, reply)
        elif message.need_reply:
            # vhost-user.rst "REPLY_ACK": zero is success.
            self._send_reply(session, request, 0)

    def _send_reply(self, session: _Session, request: FrontendRequest, payload: Payload) -> None:
        if self._session is not session:
            return
        self._send(session, encode(Message(request, payload, VERSION | FLAG_REPLY)))

    def _send(self, session: _Session, data: bytes) -> None:
        """Send ``data`` without waiting: what the socket cannot take now waits in
        ``session.unsent`` for EPOLLOUT; a front end that lets more than
        MAX_UNSENT_REPLIES pile up is not reading and is dropped."""
        if not session.unsent:
            try:
                sent = session.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._disconnect(f"cannot send a reply: {exc}")
                return
            if sent == len(data):
                return
            data = data[sent:]
            session.unsent_since = time.monotonic()
            self._epoll.modify(
                session.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLOUT
            )
        session.unsent += data
        if len(session.unsent) > MAX_UNSENT_REPLIES:
            self._disconnect(
                f"front end is not reading its replies ({len(session.unsent)} bytes unsent)"
            )

    def _flush(self, session: _Session) -> None:
        """The socket has room: send what replies wait."""
        try:
            sent = session.sock.send(session.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"cannot send a reply: {exc}")
            return
        del session.unsent[:sent]
        if not session.unsent:
            self._epoll.modify(session.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _build_handlers(self) -> dict[FrontendRequest, Callable[[Message], Payload]]:
        r = FrontendRequest
        return {
            r.GET_FEATURES: self._get_features,
            r.SET_FEATURES: self._set_features,
            r.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            r.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            r.SET_OWNER: self._set_owner,
            r.RESET_OWNER: self._reset_owner,
            r.RESET_DEVICE: self._reset_device,
            r.GET_QUEUE_NUM: self._get_queue_num,
            r.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            r.SET_MEM_TABLE: self._set_mem_table,
            r.ADD_MEM_REG: self._add_mem_reg,
            r.REM_MEM_REG: self._rem_mem_reg,
            r.SET_VRING_NUM: self._set_vring_num,
            r.SET_VRING_ADDR: self._set_vring_addr,
            r.SET_VRING_BASE: self._set_vring_base,
            r.GET_VRING_BASE: self._get_vring_base,
            r.SET_VRING_KICK: self._set_vring_kick,
            r.SET_VRING_CALL: self._set_vring_call,
            r.SET_VRING_ERR: self._set_vring_err,
            r.SET_VRING_ENABLE: self._set_vring_enable,
            r.VRING_KICK: self._vring_kick,
            r.GET_CONFIG: self._get_config,
            r.SET_CONFIG: self._set_config,
            r.SET_STATUS: self._set_status,
            r.GET_STATUS: self._get_status,
            r.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }

    @property
    def _s(self) -> _Session:
        session = self._session
        assert session is not None
        return session

    def _vring(self, index: int) -> _Vring:
        vrings = self._s.vrings
        if not 0 <= index < len(vrings):
            raise _RequestError(f"ring {index} does not exist (the device has {len(vrings)})")
        return vrings[index]

    # -- features -------------------------------------------------------------------------

    def _offered_features(self) -> int:
        return self.device.offered_features | _F_PROTOCOL

    def _get_features(self, message: Message) -> Payload:
        return self._offered_features()

    def _set_features(self, message: Message) -> Payload:
        """SET_FEATURES: checked whole before anything changes (a refusal changes nothing).

        While the device runs, the features its rings were built with stay:
        only a no-op (or a LOG_ALL-only change, as QEMU sends while
        migrating) is accepted; a front end must stop the rings first
        (GET_VRING_BASE) to change anything else.
        """
        assert isinstance(message.payload, int)
        value = message.payload
        session = self._s
        offered = self._offered_features()
        if value & ~offered:
            raise _RequestError(f"features {value & ~offered:#x} never offered")
        virtio = value & ~_F_PROTOCOL
        if not self.device.features_acceptable(virtio):
            raise _RequestError(f"the device does not accept features {virtio:#x}")
        if self.device.state is DeviceState.ACTIVE:
            changed = (value ^ session.features) & ~_F_LOG_ALL
            if changed:
                raise _RequestError(
                    f"features {changed:#x} changed while the rings run (stop them first)"
                )
            session.features = value
            return None
        session.features = value
        session.features_set = True
        self.device.ack_features(virtio)
        return None

    def _get_protocol_features(self, message: Message) -> Payload:
        return self.protocol_features_offered

    def _set_protocol_features(self, message: Message) -> Payload:
        assert isinstance(message.payload, int)
        value = message.payload
        if value & ~self.protocol_features_offered:
            raise _RequestError(
                f"protocol features {value & ~self.protocol_features_offered:#x} never offered"
            )
        self._s.protocol_features = value
        return None

    def _set_owner(self, message: Message) -> Payload:
        self._s.owner = True
        return None

    def _reset_owner(self, message: Message) -> Payload:
        # Deprecated; vhost-user.rst recommends treating it as "disable all rings".
        session = self._s
        self._stop_device(session, "RESET_OWNER")
        for vring in session.vrings:
            self._reset_vring(vring)
        return None

    def _reset_device(self, message: Message) -> Payload:
        """RESET_DEVICE: rings disabled, device state (features included) back to initial."""
        session = self._s
        self._stop_device(session, "RESET_DEVICE")
        self.device.reset()
        for vring in session.vrings:
            self._reset_vring(vring)
        session.features = 0
        session.features_set = False
        session.status = 0
        return None

    def _reset_vring(self, vring: _Vring) -> None:
        self._set_kick_fd(vring, None)
        vring.num = None
        vring.addr = None
        vring.base = 0
        vring.started = False
        vring.enabled = False
        vring.queue = None

    def _get_queue_num(self, message: Message) -> Payload:
        return self.device.num_queues

    def _get_max_mem_slots(self, message: Message) -> Payload:
        return self.max_mem_slots

    # -- memory ---------------------------------------------------------------------------

    def _map_region(self, mem: GuestMemory, desc: MemoryRegionDesc, fd: int) -> _Region:
        """Map ``fd`` for ``desc`` into ``mem`` (which then owns the fd)."""
        if desc.memory_size == 0:
            raise _RequestError("memory region of size 0")
        allow_unsealed = self.unsealed_memory is UnsealedMemory.ALLOW
        try:
            region = mem.add_fd(
                desc.guest_phys_addr,
                desc.memory_size,
                fd,
                desc.mmap_offset,
                take_ownership=True,
                allow_unsealed=allow_unsealed,
            )
        except UnsealedMemoryError as exc:
            raise _RequestError(
                f"memory region at guest {desc.guest_phys_addr:#x}: {exc} (a memfd made "
                "without MFD_ALLOW_SEALING, or a hugetlbfs or regular file), so the front "
                "end could truncate it and crash this back end; refused (start with "
                "--unsealed-memory allow to accept such memory from a trusted front end)"
            ) from exc
        except GuestMemoryError as exc:
            raise _RequestError(f"cannot map memory region: {exc}") from exc
        session = self._session
        if not region.sealed and session is not None and not session.warned_unsealed:
            session.warned_unsealed = True
            log.warning(
                "%s: memory region at guest %#x cannot be sealed against shrinking; mapped "
                "as --unsealed-memory allow says: this front end can crash this back end "
                "by truncating it",
                self,
                desc.guest_phys_addr,
            )
        return _Region(
            desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset
        )

    @staticmethod
    def _check_user_overlap(regions: list[_Region], new: _Region) -> None:
        for other in regions:
            if (
                new.user_addr < other.user_addr + other.size
                and other.user_addr < new.user_addr + new.size
            ):
                raise _RequestError(
                    f"user range [{new.user_addr:#x}, +{new.size:#x}) overlaps "
                    f"[{other.user_addr:#x}, +{other.size:#x})"
                )

    def _set_mem_table(self, message: Message) -> Payload:
        """SET_MEM_TABLE: replace every region (mapping all new ones before dropping any)."""
        session = self._s
        table = message.payload
        assert isinstance(table, MemoryTable)
        staging = GuestMemory()
        new_regions: list[_Region] = []
        fds = list(message.fds)
        try:
            while fds:
                fd = fds.pop(0)
                desc = table.regions[len(new_regions)]
                try:
                    region = self._map_region(staging, desc, fd)
                except _RequestError:
                    os.close(fd)
                    raise
                self._check_user_overlap(new_regions, region)
                new_regions.append(region)
        except _RequestError:
            _close_fds(fds)
            staging.close()
            raise
        # The rings may move with the memory: stop, swap, and restart below.
        self._stop_device(session, "SET_MEM_TABLE")
        for old in list(session.mem.regions):
            session.mem.remove_region(old.guest_base)
        for mapped in list(staging.regions):
            session.mem.add_region(staging.remove_region(mapped.guest_base, close=False))
        session.regions = new_regions
        self._try_activate(session)
        return None

    def _add_mem_reg(self, message: Message) -> Payload:
        session = self._s
        payload = message.payload
        assert isinstance(payload, SingleMemoryRegion)
        (fd,) = message.fds
        if len(session.regions) >= self.max_mem_slots:
            os.close(fd)
            raise _RequestError(f"all {self.max_mem_slots} memory slots are in use")
        desc = payload.region
        new = _Region(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset)
        try:
            self._check_user_overlap(session.regions, new)
        except _RequestError:
            os.close(fd)
            raise
        try:
            region = self._map_region(session.mem, desc, fd)
        except _RequestError:
            os.close(fd)
            raise
        session.regions.append(region)
        self._try_activate(session)
        return None

    def _rem_mem_reg(self, message: Message) -> Payload:
        """REM_MEM_REG: identified by guest address, user address and size; fd is closed."""
        session = self._s
        _close_fds(message.fds)
        payload = message.payload
        assert isinstance(payload, SingleMemoryRegion)
        desc = payload.region
        for region in session.regions:
            if (
                region.guest_addr == desc.guest_phys_addr
                and region.user_addr == desc.userspace_addr
                and region.size == desc.memory_size
            ):
                break
        else:
            raise _RequestError(
                f"no region at guest {desc.guest_phys_addr:#x} / user {desc.userspace_addr:#x} "
                f"of size {desc.memory_size:#x}"
            )
        if any(
            vring.queue is not None and self._ring_in_region(vring, region)
            for vring in session.vrings
        ):
            self._stop_device(session, "REM_MEM_REG of a region holding a ring")
        session.regions.remove(region)
        session.mem.remove_region(region.guest_addr)
        return None

    @staticmethod
    def _ring_in_region(vring: _Vring, region: _Region) -> bool:
        addr = vring.addr
        if addr is None:
            return False
        return any(
            region.contains_user(a)
            for a in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        )

    def _user_to_guest(self, session: _Session, addr: int, what: str) -> int:
        """Translate a front-end user address to guest-physical (vhost-user.rst "Memory access")."""
        for region in session.regions:
            if region.contains_user(addr):
                return region.guest_addr + (addr - region.user_addr)
        raise _RequestError(f"{what} user address {addr:#x} is in no memory region")

    # -- rings ------------------------------------------------------------------------------

    def _reconfigure(self, session: _Session, vring: _Vring, what: str) -> None:
        """A ring's layout changes while the device runs on it: stop the device first."""
        if vring.queue is not None:
            self._stop_device(session, f"{what} on running ring {vring.index}")

    def _set_vring_num(self, message: Message) -> Payload:
        state = message.payload
        assert isinstance(state, VringState)
        vring = self._vring(state.index)
        maximum = self.max_ring_size(state.index)
        if not 1 <= state.num <= maximum:
            raise _RequestError(f"ring {state.index}: size {state.num} not in 1..{maximum}")
        self._reconfigure(self._s, vring, "SET_VRING_NUM")
        vring.num = state.num
        return None

    def _set_vring_addr(self, message: Message) -> Payload:
        addr = message.payload
        assert isinstance(addr, VringAddr)
        vring = self._vring(addr.index)
        self._reconfigure(self._s, vring, "SET_VRING_ADDR")
        vring.addr = addr
        return None

    def _set_vring_base(self, message: Message) -> Payload:
        state = message.payload
        assert isinstance(state, VringState)
        vring = self._vring(state.index)
        if self._s.features & Feature.RING_PACKED.mask:
            _check_packed_base(state.index, state.num, vring.num)
        elif state.num > _SPLIT_BASE_LIMIT:
            raise _RequestError(
                f"ring {state.index}: split ring base {state.num:#x} is not a 16-bit index"
            )
        self._reconfigure(self._s, vring, "SET_VRING_BASE")
        vring.base = state.num
        return None

    def _get_vring_base(self, message: Message) -> Payload:
        """GET_VRING_BASE: stop the ring and report where it is ("Ring states")."""
        state = message.payload
        assert isinstance(state, VringState)
        session = self._s
        index = state.index
        if not 0 <= index < len(session.vrings):
            raise _FatalRequestError(f"ring {index} does not exist")
        vring = session.vrings[index]
        if vring.queue is not None:
            self._stop_device(session, f"GET_VRING_BASE of ring {index}")
        vring.started = False
        self._set_kick_fd(vring, None)
        return VringState(index, vring.base)

    def _vring_fd(self, message: Message) -> tuple[_Vring, int | None]:
        assert isinstance(message.payload, int)
        value = message.payload
        fd = None if value & VRING_FD_NOFD else message.fds[0]
        try:
            vring = self._vring(value & VRING_FD_INDEX_MASK)
        except _RequestError:
            _close_fds(message.fds)
            raise
        return vring, fd

    def _set_vring_kick(self, message: Message) -> Payload:
        vring, fd = self._vring_fd(message)
        if fd is None:
            log.warning(
                "%s: ring %d has no kick fd; it runs only on in-band VRING_KICK",
                self,
                vring.index,
            )
        self._set_kick_fd(vring, fd)
        vring.started = True  # "start ring upon receiving a kick" fd
        if not self._s.features & _F_PROTOCOL:
            vring.enabled = True  # without protocol features rings start enabled
        self._maybe_activate(self._s)
        return None

    def _set_vring_call(self, message: Message) -> Payload:
        vring, fd = self._vring_fd(message)
        self._set_fd(vring, "call_fd", fd)
        return None

    def _set_vring_err(self, message: Message) -> Payload:
        vring, fd = self._vring_fd(message)
        self._set_fd(vring, "err_fd", fd)
        return None

    def _set_vring_enable(self, message: Message) -> Payload:
        state = message.payload
        assert isinstance(state, VringState)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise _RequestError(f"ring {state.index}: enable value {state.num} is not 0 or 1")
        vring.enabled = bool(state.num)
        # A started but disabled ring is still processed, without side
        # effects ("Ring states"): its kicks reach the device, which knows
        # what that means for its queue (net discards transmit frames).
        self.device.set_queue_enabled(vring.index, vring.enabled)
        if vring.enabled:
            self._maybe_activate(self._s)
            if vring.queue is not None:
                self._notify_device(vring.index)  # buffers that came while disabled
        return None

    def _vring_kick(self, message: Message) -> Payload:
        state = message.payload
        assert isinstance(state, VringState)
        vring = self._vring(state.index)
        if vring.queue is not None:
            self._notify_device(vring.index)
        return None

    def _set_fd(self, vring: _Vring, name: str, fd: int | None) -> None:
        """Install a call or err fd, non-blocking: a notification never waits.

        O_NONBLOCK is a flag of the open file, which the front end shares: one
        that clears it again on its own copy and then fills the fd could
        still block a write (a limit stated in ARCHITECTURE.md).
        """
        if fd is not None:
            try:
                os.set_blocking(fd, False)
                is_eventfd = os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
            except OSError as exc:
                os.close(fd)
                raise _RequestError(f"ring {vring.index}: unusable {name}: {exc}") from exc
        with self._fd_lock:
            old = getattr(vring, name)
            setattr(vring, name, fd)
            if old is not None and old != fd:
                self._eventfds.discard(old)
            if fd is not None and is_eventfd:
                self._eventfds.add(fd)
        if old is not None and old != fd:
            with contextlib.suppress(OSError):
                os.close(old)

    def _set_kick_fd(self, vring: _Vring, fd: int | None) -> None:
        old = vring.kick_fd
        if old is not None:
            self._kick_fds.pop(old, None)
            with contextlib.suppress(KeyError, OSError, ValueError):
                self._epoll.unregister(old)
            with contextlib.suppress(OSError):
                os.close(old)
        vring.kick_fd = None
        if fd is None:
            return
        try:
            os.set_blocking(fd, False)
            self._epoll.register(fd, select.EPOLLIN)
        except OSError as exc:
            os.close(fd)
            raise _RequestError(f"ring {vring.index}: unusable kick fd: {exc}") from exc
        vring.kick_fd = fd
        self._kick_fds[fd] = vring.index

    def _kick(self, fd: int, index: int, mask: int) -> None:
        """A kick eventfd fired: drain it and let the device process the ring."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._log.warn(
                "kick-failed", index, "ring %d kick fd failed (%s); ignoring it", index, exc
            )
            session = self._session
            if session is not None:
                self._set_kick_fd(session.vrings[index], None)
            return
        if mask & (select.EPOLLHUP | select.EPOLLERR):
            session = self._session
            if session is not None:
                self._set_kick_fd(session.vrings[index], None)
        session = self._session
        if session is None:
            return
        vring = session.vrings[index]
        if vring.queue is not None:
            self._notify_device(index)
            if self.poll_us > 0 and vring.queue is not None and vring.enabled:
                self._start_polling(vring, vring.queue)

    def _start_polling(self, vring: _Vring, queue: DeviceQueue) -> None:
        """Poll ``queue`` for ``poll_us`` from now, its notifications off.

        A driver that submits its next request within the window saves its
        kick (a syscall that also wakes this thread) and this loop an epoll
        round; the price is CPU time spent spinning, so it pays only when
        each side has a CPU of its own.  Each request served restarts the
        window; run_once keeps looking at the other fds meanwhile.
        """
        queue.disable_notifications()  # (again: a device may have turned them on)
        self._polling[vring.index] = (queue, time.perf_counter() + self.poll_us / 1e6)

    def _poll_rings(self) -> bool:
        """Poll the rings in their window for up to _POLL_SLICE seconds; True if any work."""
        clock = time.perf_counter
        now = clock()
        slice_end = now + _POLL_SLICE
        device = self.device
        session = self._session
        window = self.poll_us / 1e6
        served = False
        while self._polling:
            for index, (queue, deadline) in list(self._polling.items()):
                vring = session.vrings[index] if session is not None else None
                if (
                    vring is None
                    or vring.queue is not queue
                    or not vring.enabled
                    or device.needs_reset
                ):
                    # Torn down or replaced: a new queue starts with
                    # notifications on, an old one is not ours to touch.
                    del self._polling[index]
                elif self._has_available(queue, index):
                    self._notify_device(index)
                    served = True
                    # A device may turn notifications back on when it is done.
                    queue.disable_notifications()
                    self._polling[index] = (queue, clock() + window)
                elif now >= deadline:
                    del self._polling[index]
                    # Buffers that came after the last look get no kick: serve them.
                    if queue.enable_notifications():
                        self._notify_device(index)
                        served = True
            now = clock()
            if now >= slice_end:
                break
        return served

    def _has_available(self, queue: DeviceQueue, index: int) -> bool:
        """Whether ``queue`` has buffers; a queue that cannot tell goes to the device."""
        try:
            return queue.has_available()
        except Exception as exc:  # a malformed ring: the device reports it
            log.debug("%s: ring %d: %s", self, index, exc)
            return True

    def _notify_device(self, index: int) -> None:
        try:
            self.device.queue_notify(index)
        except Exception:
            self._log.log(
                logging.ERROR,
                "queue-failed",
                index,
                "device failed processing queue %d",
                index,
                exc_info=True,
            )

    # -- activation ---------------------------------------------------------------------------

    def _build_queue(self, session: _Session, vring: _Vring) -> DeviceQueue:
        """A device queue for a ready ring, positioned at its base (translated addresses)."""
        assert vring.num is not None and vring.addr is not None
        addr = vring.addr
        desc = self._user_to_guest(session, addr.desc_user_addr, f"ring {vring.index} descriptor")
        driver = self._user_to_guest(session, addr.avail_user_addr, f"ring {vring.index} driver")
        device = self._user_to_guest(session, addr.used_user_addr, f"ring {vring.index} device")
        dev = self.device
        event_idx = dev.has_feature(Feature.EVENT_IDX)
        indirect = dev.has_feature(Feature.INDIRECT_DESC)
        base = vring.base
        if dev.has_feature(Feature.RING_PACKED):
            _check_packed_base(vring.index, base, vring.num)
            packed = PackedDeviceQueue(
                session.mem, vring.num, desc, driver, device, event_idx=event_idx, indirect=indirect
            )
            avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
            if used == 0:
                used = avail  # a front end that sends only the avail half: nothing in flight
            state = packed.state()
            state.update(
                next_avail=avail & _PACKED_INDEX,
                avail_wrap_counter=bool(avail & _PACKED_WRAP),
                next_used=used & _PACKED_INDEX,
                used_wrap_counter=bool(used & _PACKED_WRAP),
            )
            return PackedDeviceQueue.from_state(session.mem, state)
        split = SplitDeviceQueue(
            session.mem, vring.num, desc, driver, device, event_idx=event_idx, indirect=indirect
        )
        # The used index lives in guest memory: resume from it (a reconnect or a
        # restart after GET_VRING_BASE), and from the base for the avail side.
        used_idx = session.mem.read_u16(device + 2)
        state = split.state()
        state.update(next_avail=base & 0xFFFF, next_used=used_idx, signalled_used=used_idx)
        return SplitDeviceQueue.from_state(session.mem, state)

    def _maybe_activate(self, session: _Session, *, driver_ok: bool = False) -> None:
        """Apply the activation policy (module docstring) after a ring or memory change."""
        device = self.device
        vrings = session.vrings
        if not session.features_set or not vrings:
            return
        if device.state is DeviceState.ACTIVE:
            for vring in vrings:
                if vring.queue is None and vring.ready():
                    queue = self._build_queue(session, vring)
                    vring.queue = queue
                    device.queues[vring.index] = queue
                    log.info("%s: ring %d added to the running device", self, vring.index)
                    self._notify_device(vring.index)
            return
        if not vrings[0].ready():
            return
        if not device.features_acceptable(device.acked_features):
            log.warning(
                "%s: rings are ready but features %#x are not acceptable: not activating",
                self,
                device.acked_features,
            )
            return
        if not driver_ok and any(v.started and not v.ready() for v in vrings):
            return  # more rings are coming (QEMU enables them one by one)
        queues: list[DeviceQueue] = []
        for vring in vrings:
            queues.append(self._build_queue(session, vring) if vring.ready() else DisabledQueue())
        try:
            device.activate(session.mem, self._interrupt, queues)
        except Exception as exc:
            self._log.warn("not-activated", None, "device not activated yet: %s", exc)
            return
        for vring, queue in zip(vrings, queues, strict=True):
            if not isinstance(queue, DisabledQueue):
                vring.queue = queue
        log.info(
            "%s: device activated with rings %s",
            self,
            [v.index for v in vrings if v.queue is not None],
        )
        for vring in vrings:
            if vring.queue is not None:
                self._notify_device(vring.index)

    def _try_activate(self, session: _Session) -> None:
        """Activation after a memory change: a ring that cannot be built is only logged."""
        try:
            self._maybe_activate(session)
        except (_RequestError, GuestMemoryError, VirtqueueError) as exc:
            self._log.warn("rings-unusable", None, "rings not usable yet: %s", exc)

    def _stop_device(self, session: _Session, why: str) -> None:
        """Stop a running device and save every ring's position as its base."""
        device = self.device
        if device.state is not DeviceState.ACTIVE:
            return
        log.info("%s: stopping the device (%s)", self, why)
        try:
            resources = device.sleep()  # finishes in-flight requests
            device.wake(resources)
        except Exception:
            log.exception("%s: device sleep/wake failed; resetting it", self)
        try:
            device.reset()
        except Exception:
            log.exception("%s: device reset failed", self)
        if session.features_set:
            device.ack_features(session.features & ~_F_PROTOCOL)
        for vring in session.vrings:
            queue = vring.queue
            if queue is None:
                continue
            vring.queue = None
            vring.base = _ring_position(queue)

    # -- interrupts -----------------------------------------------------------------------------

    def _signal_call(self, index: int) -> None:
        session = self._session
        if session is None or not 0 <= index < len(session.vrings):
            return
        with self._fd_lock:
            fd = session.vrings[index].call_fd
            if fd is None:
                return  # the front end polls
            self._write_notification(fd, index, "call")

    def _write_notification(self, fd: int, index: int, what: str) -> None:
        """Signal a call or err fd without ever waiting (the fd is non-blocking).

        A full eventfd has been signalled already; a pipe nobody reads, or
        an fd that fails, loses the notification: counted and logged,
        rate-limited.  Called with _fd_lock held.
        """
        try:
            os.eventfd_write(fd, _EVENT_ONE)
        except BlockingIOError:
            if fd in self._eventfds:
                return
            self.notifications_dropped += 1
            self._log.warn(
                f"{what}-full", index, "ring %d %s fd is full: notification dropped", index, what
            )
        except OSError as exc:
            self.notifications_dropped += 1
            self._log.warn(
                f"{what}-failed",
                index,
                "ring %d %s fd failed (%s): notification dropped",
                index,
                what,
                exc,
            )

    def _signal_config_change(self) -> None:
        """Config space changed: tell the front end on the back-end channel, if it gave one."""
        session = self._session
        if session is None or not session.protocol_features & ProtocolFeature.CONFIG.mask:
            return
        data = encode(Message(BackendRequest.CONFIG_CHANGE_MSG))
        with self._fd_lock:
            channel = session.backend_channel
            if channel is None:
                log.info("%s: config changed but the front end gave no back-end channel", self)
                return
            try:
                sent = channel.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._log.warn("channel", None, "cannot send CONFIG_CHANGE_MSG: %s", exc)
                return
            if sent != len(data):
                # Never wait on the front end; a message cut short would garble
                # the channel, so it is closed.
                self._log.warn("channel", None, "back-end channel full: closing it")
                session.backend_channel = None
                channel.close()

    def _on_needs_reset(self, reason: str) -> None:
        """The device broke: signal every ring's error eventfd (SET_VRING_ERR)."""
        session = self._session
        if session is None:
            return
        with self._fd_lock:
            for vring in session.vrings:
                if vring.err_fd is not None:
                    self._write_notification(vring.err_fd, vring.index, "err")

    # -- config, status, back-end channel -------------------------------------------------------

    def _get_config(self, message: Message) -> Payload:
        request = message.payload
        assert isinstance(request, ConfigSpace)
        try:
            end = len(self.device.config_bytes())
            if request.offset + request.size > end:
                raise _RequestError(
                    f"{request.size} bytes at {request.offset} reach beyond config space "
                    f"({end} bytes)"
                )
            data = self.device.read_config(request.offset, request.size)
        except Exception as exc:
            self._log.warn("get-config", None, "GET_CONFIG refused: %s", exc)
            return ConfigSpace(request.offset, request.flags, b"")  # size 0: an error
        return ConfigSpace(request.offset, request.flags, data[: request.size])

    def _set_config(self, message: Message) -> Payload:
        request = message.payload
        assert isinstance(request, ConfigSpace)
        if request.flags not in (0, 1):
            raise _RequestError(f"SET_CONFIG flags {request.flags:#x}")
        self.device.write_config(request.offset, request.data)
        return None

    def _set_status(self, message: Message) -> Payload:
        """SET_STATUS (STATUS): the driver's status byte as QEMU relays it."""
        assert isinstance(message.payload, int)
        session = self._s
        value = message.payload & 0xFF
        added = value & ~session.status
        if value == 0:
            self._stop_device(session, "SET_STATUS 0")
        if added & DeviceStatus.FEATURES_OK and not self.device.features_acceptable(
            session.features & ~_F_PROTOCOL
        ):
            value &= ~DeviceStatus.FEATURES_OK  # read back without it, as on virtio-MMIO
        session.status = value
        if added & DeviceStatus.DRIVER_OK:
            self._maybe_activate(session, driver_ok=True)
        return None

    def _get_status(self, message: Message) -> Payload:
        status = self._s.status
        if self.device.needs_reset:
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return status

    def _set_backend_req_fd(self, message: Message) -> Payload:
        (fd,) = message.fds
        try:
            channel = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise _RequestError(f"back-end channel fd is not a socket: {exc}") from exc
        channel.setblocking(False)  # see _signal_config_change
        session = self._s
        with self._fd_lock:
            old, session.backend_channel = session.backend_channel, channel
        if old is not None:
            old.close()
        return None


def _check_packed_base(index: int, base: int, num: int | None) -> None:
    """A packed ring's base: avail and used halves, each a 15-bit index below the
    ring size plus a wrap counter (bit 15), as QEMU encodes them."""
    for half in (base & 0xFFFF, base >> 16):
        if num is not None and half & _PACKED_INDEX >= num:
            raise _RequestError(
                f"ring {index}: packed ring base {base:#x} has an index outside a ring of {num}"
            )


def _ring_position(queue: DeviceQueue) -> int:
    """The GET_VRING_BASE value of a stopped queue."""
    state = queue.state()
    if not isinstance(queue, PackedDeviceQueue):
        return int(state["next_avail"]) & 0xFFFF
    avail = int(state["next_avail"]) | (_PACKED_WRAP if state["avail_wrap_counter"] else 0)
    used = int(state["next_used"]) | (_PACKED_WRAP if state["used_wrap_counter"] else 0)
    return avail | used << 16
