"""The host side of vsock over Unix sockets, compatible with Firecracker's hybrid vsock.

* Host -> guest: a host process connects to ``uds_path`` and writes
  ``CONNECT <port>\\n``; when the guest accepts, it reads ``OK <host_port>\\n``
  and the socket is the connection.  If the guest refuses (or does not answer
  in time) the socket is closed.
* Guest -> host: a guest connection to port P is forwarded to the Unix
  socket ``<uds_path>_<P>`` (SOCK_STREAM for stream sockets, SOCK_SEQPACKET
  for seqpacket ones); if nobody listens there the guest gets RST.
* SEQPACKET host -> guest (an extension; Firecracker has stream only): the
  same handshake, one message each way, on the SOCK_SEQPACKET socket
  ``<uds_path>_seqpacket``; then every message is one vsock message.

This object does the I/O the device model (:class:`~.device.Vsock`) may not:
it owns the listening socket, the sockets still in their handshake and a
timer fd for the device's timeouts, and lists them for the host's event loop
through the device's ``host_fds``.  Every socket is non-blocking.
Handshakes are bounded: at most :data:`MAX_HANDSHAKES` at once, a line of at
most :data:`MAX_HANDSHAKE_LINE` bytes, :data:`HANDSHAKE_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import NamedTuple

from pyvirtio.devices.vsock.wire import SockType

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_HANDSHAKES",
    "MAX_HANDSHAKE_LINE",
    "HostRequest",
    "UnixVsockHost",
    "connect_to_guest",
]

log = logging.getLogger(__name__)

#: Host connections that may be in their ``CONNECT`` handshake at once.
MAX_HANDSHAKES = 64
#: Longest ``CONNECT <port>\n`` line accepted.
MAX_HANDSHAKE_LINE = 32
#: Seconds a host connection has to send its ``CONNECT`` line.
HANDSHAKE_TIMEOUT = 5.0

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class HostRequest(NamedTuple):
    """A host process asked to connect to the guest's ``port``."""

    sock: socket.socket
    port: int
    sock_type: SockType


def _kind(sock_type: SockType) -> int:
    return socket.SOCK_SEQPACKET if sock_type is SockType.SEQPACKET else socket.SOCK_STREAM


def _listener_path(uds_path: str | os.PathLike[str], sock_type: SockType) -> str:
    path = os.fspath(uds_path)
    return f"{path}_seqpacket" if sock_type is SockType.SEQPACKET else path


def connect_to_guest(
    uds_path: str | os.PathLike[str],
    port: int,
    timeout: float = 10.0,
    sock_type: SockType = SockType.STREAM,
) -> tuple[socket.socket, int]:
    """A host program's side of the handshake: a connected socket and its host port.

    Connects to ``uds_path`` (``<uds_path>_seqpacket`` for SEQPACKET), sends
    ``CONNECT <port>\\n`` and reads up to the ``OK <host_port>\\n`` line
    (never past it: what follows is the guest's).  ConnectionRefusedError if
    the guest refused (the device closed the socket).
    """
    sock = socket.socket(socket.AF_UNIX, _kind(sock_type))
    try:
        sock.settimeout(timeout)
        sock.connect(_listener_path(uds_path, sock_type))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_HANDSHAKE_LINE:
            chunk = sock.recv(1 if sock_type is SockType.STREAM else MAX_HANDSHAKE_LINE)
            if not chunk:
                break
            line += chunk
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise ConnectionRefusedError(f"vsock port {port}: {line!r}")
    except BaseException:
        sock.close()
        raise
    return sock, int(words[1])


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd (timerfd_create(2)), through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._settime = libc.timerfd_settime
        fd: int = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.armed: float | None = None

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (time.monotonic seconds), or never (None)."""
        if deadline == self.armed:
            return
        self.armed = deadline
        if deadline is None:
            spec = struct.pack("qqqq", 0, 0, 0, 0)
        else:
            # Relative, so the clock's epoch does not matter; at least 1 ns (0 disarms).
            delay = max(deadline - time.monotonic(), 1e-6)
            spec = struct.pack("qqqq", 0, 0, int(delay), max(1, int(delay % 1 * 1e9)))
        buf = ctypes.create_string_buffer(spec)
        if self._settime(self.fd, 0, buf, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def clear(self) -> None:
        self.armed = None
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class _Handshake:
    __slots__ = ("buffer", "deadline", "sock", "sock_type")

    def __init__(self, sock: socket.socket, sock_type: SockType, deadline: float) -> None:
        self.sock = sock
        self.sock_type = sock_type
        self.buffer = b""
        self.deadline = deadline


class UnixVsockHost:
    """Listens on ``uds_path`` and connects to ``<uds_path>_<port>``."""

    def __init__(self, uds_path: str | os.PathLike[str], *, seqpacket: bool = True) -> None:
        self.uds_path = Path(uds_path)
        types = [SockType.STREAM, SockType.SEQPACKET] if seqpacket else [SockType.STREAM]
        #: listening fd -> (socket, the type of the connections it takes)
        self._listeners: dict[int, tuple[socket.socket, SockType]] = {}
        try:
            for sock_type in types:
                listener = self._listen(_listener_path(self.uds_path, sock_type), sock_type)
                self._listeners[listener.fileno()] = (listener, sock_type)
            self._timer = _TimerFd()
        except BaseException:
            self._close_listeners()
            raise
        self._handshakes: dict[int, _Handshake] = {}
        #: Sockets done with, closed one fds() round later (see retire).
        self._retiring: list[socket.socket] = []
        self._retired: list[socket.socket] = []
        #: Host connections closed because too many were in their handshake.
        self.handshakes_refused = 0
        self._closed = False

    @staticmethod
    def _listen(path: str, sock_type: SockType) -> socket.socket:
        if Path(path).is_socket():
            Path(path).unlink()
        listener = socket.socket(socket.AF_UNIX, _kind(sock_type))
        try:
            listener.bind(path)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    def _close_listeners(self) -> None:
        for listener, sock_type in self._listeners.values():
            listener.close()
            with contextlib.suppress(OSError):
                Path(_listener_path(self.uds_path, sock_type)).unlink()
        self._listeners.clear()

    def __repr__(self) -> str:
        return f"UnixVsockHost({str(self.uds_path)!r})"

    # -- what the device lists for the event loop -------------------------------------

    def retire(self, sock: socket.socket) -> None:
        """Close ``sock`` once the event loop has stopped polling it.

        A host loop forgets an fd when it leaves the device's list, not when
        it is closed; were it closed at once, a new socket reusing its number
        before the next listing would look already polled and never be.  So
        the socket is shut down now and closed in the second :meth:`fds`
        call from now, after the loop has seen the list without it.
        """
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._retiring.append(sock)

    def fds(self, accepting: bool) -> list[tuple[int, int]]:
        """Listener (while ``accepting``), handshaking sockets and the timer."""
        self.idle()
        fds = [(fd, select.POLLIN) for fd in self._handshakes]
        if accepting:
            fds += [(fd, select.POLLIN) for fd in self._listeners]
        if self._timer.armed is not None:
            fds.append((self._timer.fd, select.POLLIN))
        return fds

    def idle(self) -> None:
        """A listing without any of our fds (the device is not active): it still
        moves retired sockets on, so they are closed even if no :meth:`fds` follows."""
        for sock in self._retired:
            sock.close()
        self._retired, self._retiring = self._retiring, []

    def owns(self, fd: int) -> bool:
        return fd in self._listeners or fd == self._timer.fd or fd in self._handshakes

    def fd_ready(self, fd: int) -> list[HostRequest]:
        """Serve one of our fds; returns completed ``CONNECT`` requests."""
        if fd == self._timer.fd:
            self._timer.clear()
            self._expire()
            return []
        listener = self._listeners.get(fd)
        if listener is not None:
            self._accept(*listener)
            return []
        request = self._read_handshake(fd)
        return [request] if request is not None else []

    def set_alarm(self, deadline: float | None) -> None:
        """Wake the loop (through the timer fd) at ``deadline``, the device's next timeout."""
        pending = [h.deadline for h in self._handshakes.values()]
        if deadline is not None:
            pending.append(deadline)
        self._timer.arm(min(pending) if pending else None)

    # -- guest -> host ---------------------------------------------------------------

    def connect(self, port: int, sock_type: SockType) -> socket.socket:
        """A connected non-blocking socket to ``<uds_path>_<port>``.

        OSError if refused (nobody listens there, a full backlog, ...): the
        guest can ask at will, so logging it is the caller's, rate-limited.
        """
        kind = socket.SOCK_SEQPACKET if sock_type is SockType.SEQPACKET else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except BaseException:
            sock.close()
            raise
        return sock

    # -- host -> guest ---------------------------------------------------------------

    @staticmethod
    def confirm(sock: socket.socket, host_port: int) -> bool:
        """Tell the host process its connection is up (``OK <host_port>\\n``)."""
        try:
            sock.send(f"OK {host_port}\n".encode())
        except OSError:
            return False  # a fresh socket's buffer is empty: only a gone peer fails
        return True

    def _accept(self, listener: socket.socket, sock_type: SockType) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: cannot accept: %s", self, exc.strerror)
                return
            if len(self._handshakes) >= MAX_HANDSHAKES:
                self.handshakes_refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            self._handshakes[sock.fileno()] = _Handshake(sock, sock_type, deadline)

    def _read_handshake(self, fd: int) -> HostRequest | None:
        handshake = self._handshakes.get(fd)
        if handshake is None:
            return None
        sock = handshake.sock
        seqpacket = handshake.sock_type is SockType.SEQPACKET
        try:
            # Never read past the newline: what follows belongs to the guest.
            # (A SEQPACKET handshake is one message; a message is read whole.)
            data = sock.recv(
                MAX_HANDSHAKE_LINE - len(handshake.buffer), 0 if seqpacket else socket.MSG_PEEK
            )
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if seqpacket and data and not data.endswith(b"\n"):
            data += b"\n"
        end = data.find(b"\n")
        take = len(data) if end < 0 else end + 1
        if data and not seqpacket:
            with contextlib.suppress(OSError):
                sock.recv(take)
        handshake.buffer += data[:take]
        if end < 0:
            if not data or len(handshake.buffer) >= MAX_HANDSHAKE_LINE:
                self._drop_handshake(fd, "no CONNECT line")
            return None
        del self._handshakes[fd]
        words = handshake.buffer.decode("ascii", "replace").split()
        if len(words) == 2 and words[0] == "CONNECT" and words[1].isdigit():
            port = int(words[1])
            if port <= 0xFFFF_FFFF:
                return HostRequest(sock, port, handshake.sock_type)
        log.info("%s: bad handshake %r", self, handshake.buffer[:MAX_HANDSHAKE_LINE])
        self.retire(sock)
        return None

    def _drop_handshake(self, fd: int, why: str) -> None:
        handshake = self._handshakes.pop(fd)
        log.info("%s: host connection dropped: %s", self, why)
        self.retire(handshake.sock)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, handshake in list(self._handshakes.items()):
            if handshake.deadline <= now:
                self._drop_handshake(fd, "handshake timed out")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in list(self._handshakes):
            self._drop_handshake(fd, "closing")
        for sock in self._retired + self._retiring:
            sock.close()
        self._retired.clear()
        self._retiring.clear()
        self._close_listeners()
        self._timer.close()
