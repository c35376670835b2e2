"""A vhost-user back end serving any :class:`~pyvirtio.device.VirtioDevice`: the event loop.

:class:`VhostUserBackend` listens on a unix socket, accepts one front end
(QEMU, or :class:`pyvirtio.driver.vhost_user.VhostUserFrontend`) at a time
and serves it through a :class:`~.session.VhostUserSession`, the sans-IO
protocol state machine (negotiation, memory table, rings, activation
policy, refusals).  This module is the I/O around it: one thread runs an
epoll loop over the listening socket, the connection, the kick eventfds and
the device's own fds (``VirtioDevice.host_fds``, e.g. a TAP)
(:meth:`serve_forever`, or :meth:`run_once` from a test); it reads the
connection and feeds the session, carries out the actions the session
answers with (send replies, watch kick fds, keep call/err fds and the
back-end channel, close fds, drop the connection), signals call and err
eventfds for the device, and busy-polls rings (``poll_us``).
:meth:`stop` may be called from any thread or a signal handler.

Failures.  A malformed message, a disconnect (even in the middle of a
message) or a failed send gets one log line; the loop closes the
connection, ends the session (the device reset, the memory unmapped),
closes every fd and accepts the next connection (QEMU's reconnect).

Hostile front ends (ARCHITECTURE.md has the whole list).  Nothing a front
end does may crash, stall or leak this process: call and err fds are made
non-blocking; replies are buffered, not waited for, and a front end that
leaves more than MAX_UNSENT_REPLIES unread, or any unread past
``send_timeout``, is dropped.  Front ends that connect while one is served
wait their turn (MAX_WAITING_FRONT_ENDS).  An fd the loop cannot use (a kick
fd epoll refuses, a channel that is no socket) is closed and logged
(rate-limited): the ring then runs on in-band kicks, the front end polls.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Final

from pyvirtio.device import VirtioDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.transport.vhost_user.actions import (
    Action,
    CloseFds,
    NotifyKind,
    Reply,
    SetBackendChannel,
    SetNotifyFd,
    UnsealedMemory,
    WatchKick,
    fds_of,
)
from pyvirtio.transport.vhost_user.protocol import (
    BackendRequest,
    Message,
    ProtocolFeature,
    encode,
    fds_from_ancillary,
)
from pyvirtio.transport.vhost_user.rings import (
    QEMU_MAX_RING_SIZE,
    check_queue_count,
    max_ring_size,
)
from pyvirtio.transport.vhost_user.session import (
    DEFAULT_MAX_MEM_SLOTS,
    DEFAULT_PROTOCOL_FEATURES,
    LOG_INTERVAL,
    SUPPORTED_PROTOCOL_FEATURES,
    VhostUserSession,
)
from pyvirtio.virtqueue.common import DeviceQueue

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "QEMU_MAX_RING_SIZE",
    "UnsealedMemory",
    "VhostUserBackend",
]

log = logging.getLogger(__name__)

#: How long replies may wait for a front end that does not read them before
#: it is dropped (the loop never waits for it meanwhile).
DEFAULT_SEND_TIMEOUT: Final = 5.0
#: Replies a front end has not read yet, in bytes, before it is dropped.  QEMU
#: waits for each reply before its next request: a few dozen bytes at most.
MAX_UNSENT_REPLIES: Final = 256 * 1024
#: Connections the kernel queues before accept (connect then fails with EAGAIN).
LISTEN_BACKLOG: Final = 128
#: Front ends accepted while another is served, waiting for their turn.
MAX_WAITING_FRONT_ENDS: Final = 4

#: Ancillary buffer for one recvmsg: room for more fds than a message may
#: carry, so "too many" reaches the parser as a clear error; beyond 64 the
#: kernel truncates (MSG_CTRUNC, also refused) and closes the rest.
_ANCILLARY_SPACE: Final = socket.CMSG_SPACE(4 * 64)
_EVENT_ONE: Final = 1
#: Longest stretch of ring polling before the loop looks at its fds again.
_POLL_SLICE: Final = 0.001
_EVENTFD_LINK: Final = "anon_inode:[eventfd]"
_CONNECTION_EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP
#: A kick fd that reports these is gone (the front end closed its end).
_KICK_GONE: Final = select.EPOLLHUP | select.EPOLLERR
_CALL: Final = NotifyKind.CALL


class _Connection:
    """One accepted front end: its socket, session, fds and unsent replies."""

    def __init__(self, sock: socket.socket, session: VhostUserSession) -> None:
        self.sock = sock
        self.fileno = sock.fileno()
        self.session = session
        #: Per ring: the kick fd watched, the call and err fds signalled.
        rings = len(session.vrings)
        self.kick_fds: list[int | None] = [None] * rings
        self.notify_fds: dict[NotifyKind, list[int | None]] = {
            kind: [None] * rings for kind in NotifyKind
        }
        self.backend_channel: socket.socket | None = None
        self.closing = False
        #: Reply bytes the front end has not taken yet (sent when the socket has room).
        self.unsent = bytearray()
        #: time.monotonic() when ``unsent`` last went from empty to non-empty.
        self.unsent_since = 0.0


class _EventfdInterrupt:
    """DeviceInterrupt over the call eventfds (and the back-end channel for config changes).

    The device may signal from its worker threads: the fd tables are read
    under the back end's fd lock, so an fd is never written after the loop
    closed (and maybe reused) it.
    """

    def __init__(self, backend: VhostUserBackend) -> None:
        self._backend = backend

    def signal_used_queue(self, queue_index: int) -> None:
        backend = self._backend
        with backend._fd_lock:
            calls = backend._call_fds
            if 0 <= queue_index < len(calls):
                fd = calls[queue_index]
                if fd is not None:  # (None: the front end polls)
                    backend._write_notification(fd, queue_index, _CALL)

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
        check_queue_count(device)
        self.device = device
        self.socket_path = Path(socket_path)
        self.protocol_features_offered = protocol_features & SUPPORTED_PROTOCOL_FEATURES
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
        self._conn: _Connection | None = None
        #: The current connection's call fds per ring (what the device signals).
        self._call_fds: list[int | None] = []
        self._stop_requested = False
        self._closed = False

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
        """The largest SET_VRING_NUM accepted for ring ``index`` (see VhostUserSession)."""
        return max_ring_size(self.device, index)

    @property
    def session(self) -> VhostUserSession | None:
        """The current front end's session (None when no one is connected)."""
        conn = self._conn
        return conn.session if conn is not None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def memory(self) -> GuestMemory | None:
        """The current front end's memory (None when no one is connected)."""
        session = self.session
        return session.memory if session is not None else None

    @property
    def features(self) -> int:
        """Features of the current connection's SET_FEATURES (including bit 30)."""
        session = self.session
        return session.features if session is not None else 0

    @property
    def protocol_features(self) -> int:
        """Protocol features the current front end negotiated."""
        session = self.session
        return session.protocol_features if session is not None else 0

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
        if reply_deadline is not None and reply_deadline <= 0 and self._conn is not None:
            self._disconnect(
                f"front end is not reading its replies ({len(self._conn.unsent)} bytes "
                f"unsent for {self.send_timeout:g} s)"
            )
        return bool(events) or served

    def _reply_deadline(self) -> float | None:
        """Seconds until the unread replies' send_timeout expires (None: none wait)."""
        conn = self._conn
        if conn is None or not conn.unsent:
            return None
        return conn.unsent_since + self.send_timeout - time.monotonic()

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
        # Kicks first: they are the hot path.
        index = self._kick_fds.get(fd)
        if index is not None:
            self._kick(fd, index, mask)
            return
        if fd == self._wake_fd:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)
            return
        if fd == self._listener.fileno():
            self._accept()
            return
        conn = self._conn
        if conn is not None and fd == conn.fileno:
            if mask & select.EPOLLOUT:
                self._flush(conn)
            if mask & ~select.EPOLLOUT and self._conn is conn:
                self._read_connection(conn)
            return
        if fd in self._host_fds:
            self.device.host_fd_ready(fd, mask)

    def close(self) -> None:
        """Drop any connection, close the socket and remove its file."""
        if self._closed:
            return
        while self._waiting:  # (before the disconnect, which would serve the next)
            self._waiting.popleft().close()
        if self._conn is not None:
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
        if self._conn is not None:
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
        self._start_connection(sock)

    def _new_session(self) -> VhostUserSession:
        return VhostUserSession(
            self.device,
            self._interrupt,
            protocol_features=self.protocol_features_offered,
            max_mem_slots=self.max_mem_slots,
            unsealed_memory=self.unsealed_memory,
            name=repr(self),
            device_log=self._log,
            received=self.received,
        )

    def _start_connection(self, sock: socket.socket) -> None:
        conn = _Connection(sock, self._new_session())
        with self._fd_lock:
            self._call_fds = conn.notify_fds[NotifyKind.CALL]
        self._conn = conn
        self.connections += 1
        self._epoll.register(conn.fileno, _CONNECTION_EVENTS)
        log.info("%s: front end connected", self)

    def _read_connection(self, conn: _Connection) -> None:
        """Read at most the rest of the current header or payload, and handle what completes."""
        session = conn.session
        try:
            data, ancdata, msg_flags, _ = conn.sock.recvmsg(
                session.wanted(), _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
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
        self._carry_out(conn, session.receive_data(data, fds))

    def _carry_out(self, conn: _Connection, actions: list[Action]) -> None:
        """Do what the session asked, in order."""
        for action in actions:
            if self._conn is not conn:  # dropped by an earlier action
                _close_fds(fds_of(action))
                continue
            if isinstance(action, Reply):
                if action.fds:
                    self._send_with_fds(conn, action.data, action.fds)
                else:
                    self._send(conn, action.data)
            elif isinstance(action, WatchKick):
                self._watch_kick(conn, action.index, action.fd)
            elif isinstance(action, SetNotifyFd):
                self._set_notify_fd(conn, action.index, action.kind, action.fd)
            elif isinstance(action, CloseFds):
                _close_fds(action.fds)
            elif isinstance(action, SetBackendChannel):
                self._set_backend_channel(conn, action.fd)
            else:
                self._disconnect(action.reason, level=action.level)

    def _disconnect(self, reason: str, *, level: int = logging.WARNING) -> None:
        """Close the connection and return to a fresh state, ready for the next one."""
        conn = self._conn
        if conn is None or conn.closing:
            return
        conn.closing = True  # a failure inside the teardown must not start it again
        log.log(level, "%s: %s; closing the connection", self, reason)
        self._polling.clear()
        for action in conn.session.close():
            _close_fds(fds_of(action))
        with contextlib.suppress(KeyError, OSError):
            self._epoll.unregister(conn.fileno)
        conn.sock.close()
        for index in range(len(conn.kick_fds)):
            self._watch_kick(conn, index, None)
            for kind in NotifyKind:
                self._set_notify_fd(conn, index, kind, None)
        with self._fd_lock:
            channel, conn.backend_channel = conn.backend_channel, None
            self._call_fds = []
        if channel is not None:
            channel.close()
        # Only now, with every fd closed and the memory unmapped, is the
        # connection gone for observers (``connected``): a caller that waits
        # for that and then counts fds or mappings must see them released.
        self._conn = None
        conn.unsent.clear()
        if self._waiting and not self._closed:
            self._start_connection(self._waiting.popleft())

    # -- replies -------------------------------------------------------------------------

    def _send(self, conn: _Connection, data: bytes) -> None:
        """Send ``data`` without waiting: what the socket cannot take now waits in
        ``conn.unsent`` for EPOLLOUT; a front end that lets more than
        MAX_UNSENT_REPLIES pile up is not reading and is dropped."""
        if not conn.unsent:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._disconnect(f"cannot send a reply: {exc}")
                return
            if sent == len(data):
                return
            data = data[sent:]
            conn.unsent_since = time.monotonic()
            self._epoll.modify(conn.fileno, _CONNECTION_EVENTS | select.EPOLLOUT)
        conn.unsent += data
        if len(conn.unsent) > MAX_UNSENT_REPLIES:
            self._disconnect(
                f"front end is not reading its replies ({len(conn.unsent)} bytes unsent)"
            )

    def _send_with_fds(self, conn: _Connection, data: bytes, fds: tuple[int, ...]) -> None:
        """A reply that carries fds (GET_INFLIGHT_FD): sent whole with them, then closed here.

        The fds ride on the reply's first byte, so it cannot wait behind
        unsent replies; a front end that left replies unread is dropped.
        """
        try:
            if conn.unsent:
                self._disconnect("front end is not reading its replies (a reply with fds waits)")
                return
            try:
                sent = socket.send_fds(conn.sock, [data], list(fds))
            except (BlockingIOError, InterruptedError):
                self._disconnect("cannot send a reply with fds now: the socket is full")
                return
            except OSError as exc:
                self._disconnect(f"cannot send a reply: {exc}")
                return
            if sent < len(data):
                self._send(conn, data[sent:])
        finally:
            _close_fds(fds)

    def _flush(self, conn: _Connection) -> None:
        """The socket has room: send what replies wait."""
        try:
            sent = conn.sock.send(conn.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"cannot send a reply: {exc}")
            return
        del conn.unsent[:sent]
        if not conn.unsent:
            self._epoll.modify(conn.fileno, _CONNECTION_EVENTS)

    # -- ring fds ------------------------------------------------------------------------

    def _watch_kick(self, conn: _Connection, index: int, fd: int | None) -> None:
        """Ring ``index`` is kicked through ``fd`` from now on (None: no fd)."""
        old = conn.kick_fds[index]
        if old is not None:
            self._kick_fds.pop(old, None)
            with contextlib.suppress(KeyError, OSError, ValueError):
                self._epoll.unregister(old)
            with contextlib.suppress(OSError):
                os.close(old)
        conn.kick_fds[index] = None
        if fd is None:
            return
        try:
            os.set_blocking(fd, False)
            self._epoll.register(fd, select.EPOLLIN)
        except OSError as exc:
            os.close(fd)
            self._log.warn(
                "kick-unusable",
                index,
                "ring %d: unusable kick fd (%s): it runs only on in-band VRING_KICK",
                index,
                exc,
            )
            return
        conn.kick_fds[index] = fd
        self._kick_fds[fd] = index

    def _set_notify_fd(
        self, conn: _Connection, index: int, kind: NotifyKind, fd: int | None
    ) -> None:
        """Install a call or err fd, non-blocking: a notification never waits.

        O_NONBLOCK is a flag of the open file, which the front end shares: one
        that clears it again on its own copy and then fills the fd could
        still block a write (a limit stated in ARCHITECTURE.md).
        """
        is_eventfd = False
        if fd is not None:
            try:
                os.set_blocking(fd, False)
                is_eventfd = os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
            except OSError as exc:
                os.close(fd)
                what = kind.value
                self._log.warn(
                    f"{what}-unusable", index, "ring %d: unusable %s fd: %s", index, what, exc
                )
                fd = None
        table = conn.notify_fds[kind]
        with self._fd_lock:
            old = table[index]
            table[index] = fd
            if old is not None and old != fd:
                self._eventfds.discard(old)
            if fd is not None and is_eventfd:
                self._eventfds.add(fd)
        if old is not None and old != fd:
            with contextlib.suppress(OSError):
                os.close(old)

    def _set_backend_channel(self, conn: _Connection, fd: int) -> None:
        try:
            channel = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            self._log.warn("channel", None, "back-end channel fd is not a socket: %s", exc)
            return
        channel.setblocking(False)  # see _signal_config_change
        with self._fd_lock:
            old, conn.backend_channel = conn.backend_channel, channel
        if old is not None:
            old.close()

    # -- kicks and polling ---------------------------------------------------------------

    def _kick(self, fd: int, index: int, mask: int) -> None:
        """A kick eventfd fired: drain it and let the device process the ring."""
        conn = self._conn
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._log.warn(
                "kick-failed", index, "ring %d kick fd failed (%s); ignoring it", index, exc
            )
            if conn is not None:
                self._watch_kick(conn, index, None)
            return
        if conn is None:
            return
        if mask & _KICK_GONE:
            self._watch_kick(conn, index, None)
        if self.poll_us > 0:
            # Notifications go off before the device serves, not after: the
            # driver, woken by the first completion, must already find them
            # off, or it kicks for a request this loop is about to poll for.
            running = conn.session.running_queue(index)
            if running is not None:
                running.disable_notifications()
        queue = conn.session.kick(index)
        if queue is not None and self.poll_us > 0:
            self._start_polling(index, queue)

    def _start_polling(self, index: int, queue: DeviceQueue) -> None:
        """Poll ``queue`` for ``poll_us`` from now, its notifications off.

        A driver that submits its next request within the window saves its
        kick (a syscall that also wakes this thread) and this loop an epoll
        round; the price is CPU time spent spinning, so it pays only when
        each side has a CPU of its own.  Each request served restarts the
        window; run_once keeps looking at the other fds meanwhile.
        """
        queue.disable_notifications()  # (again: a device may have turned them on)
        self._polling[index] = (queue, time.perf_counter() + self.poll_us / 1e6)

    def _poll_rings(self) -> bool:
        """Poll the rings in their window for up to _POLL_SLICE seconds; True if any work.

        A ring stays polled while the session runs the same queue on it,
        enabled: that is checked once on entry (messages handled since the
        last round may have stopped or replaced it) and after each time the
        device ran (it may have broken); nothing else changes it meanwhile.
        """
        polling = self._polling
        conn = self._conn
        if conn is None:
            polling.clear()
            return False
        session = conn.session
        for index, (queue, _) in list(polling.items()):
            if session.running_queue(index) is not queue:
                # Torn down or replaced: a new queue starts with
                # notifications on, an old one is not ours to touch.
                del polling[index]
        clock = time.perf_counter
        now = clock()
        slice_end = now + _POLL_SLICE
        window = self.poll_us / 1e6
        served = False
        while polling:
            for index, (queue, deadline) in list(polling.items()):
                if self._has_available(queue, index):
                    session.notify(index)
                    served = True
                    if session.running_queue(index) is not queue:
                        del polling[index]
                        continue
                    # A device may turn notifications back on when it is done.
                    queue.disable_notifications()
                    polling[index] = (queue, clock() + window)
                elif now >= deadline:
                    del polling[index]
                    # Buffers that came after the last look get no kick: serve them.
                    if queue.enable_notifications():
                        session.notify(index)
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

    # -- notifications -------------------------------------------------------------------

    def _write_notification(self, fd: int, index: int, kind: NotifyKind) -> None:
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
                f"{kind.value}-full",
                index,
                "ring %d %s fd is full: notification dropped",
                index,
                kind.value,
            )
        except OSError as exc:
            self.notifications_dropped += 1
            self._log.warn(
                f"{kind.value}-failed",
                index,
                "ring %d %s fd failed (%s): notification dropped",
                index,
                kind.value,
                exc,
            )

    def _signal_config_change(self) -> None:
        """Config space changed: tell the front end on the back-end channel, if it gave one."""
        conn = self._conn
        if conn is None or not conn.session.protocol_features & ProtocolFeature.CONFIG.mask:
            return
        data = encode(Message(BackendRequest.CONFIG_CHANGE_MSG))
        with self._fd_lock:
            channel = conn.backend_channel
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
                conn.backend_channel = None
                channel.close()

    def _on_needs_reset(self, reason: str) -> None:
        """The device broke: signal every ring's error eventfd (SET_VRING_ERR)."""
        conn = self._conn
        if conn is None:
            return
        with self._fd_lock:
            for index, fd in enumerate(conn.notify_fds[NotifyKind.ERR]):
                if fd is not None:
                    self._write_notification(fd, index, NotifyKind.ERR)
