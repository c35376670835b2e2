"""Fuzz target: a vhost-user back end's session, as a hostile front end drives it.

Each input is one connection to a :class:`VhostUserSession` serving a real
device (entropy, or block over a small temporary file): a sequence of
vhost-user messages with file descriptors (memfds of fuzz-chosen sizes and
offsets, eventfds, pipes, sockets, /dev/null, a directory), ring contents
written into the shared memory, kicks, and a disconnect.  Messages are mostly
well-formed with fuzz-chosen values, so the session gets deep (rings running,
chains served), and sometimes raw headers and payloads.

Findings: the process crashes (a signal), the session raises, or a log line
carries a traceback (a catch-all reached), a reply does not parse, kicks
never stop, an input takes longer than :data:`SLOW_INPUT` seconds, or after
the disconnect this process holds more fds or mappings than before the
connection.

The session is driven directly, sans-IO (:class:`DirectSession`: bytes and
fds in, its actions carried out by a host in miniature here), so an input
costs no socket round trips.  With ``PYVIRTIO_FUZZ_SOCKET=1`` the same moves
go through a :class:`VhostUserBackend`'s real message path instead
(:class:`SocketSession`: a unix socket, SCM_RIGHTS, ``run_once``), which
fuzzes the event loop's side too.  The moves only use
:class:`SessionUnderTest`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import select
import socket
import struct
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

# Run as a script: its directory is on sys.path.
from _common import Bytes, LogRecorder, main

TARGET = "fuzz_vhost_user_session"
#: An input taking longer than this is a finding (the loop stalled).
SLOW_INPUT = 3.0
#: run_once rounds after which a loop that is still busy is a finding.
MAX_ROUNDS = 400
MAX_STEPS = 40
#: Front-end user address of the primary region (as QEMU's, page aligned).
USER_BASE = 0x7F00_0000_0000
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x8000
BLOCK_FILE_SIZE = 64 * 1024
MEMFD_SIZES = (0x10000, 0x10000, 0x4000, 0x1000, 0x20000, 0)
REGION_SIZES = (0x10000, 0x10000, 0x4000, 0x1000, 0x20000, 0x1_0000_0000, 1, 0)

U64 = (1 << 64) - 1
_DESC = struct.Struct("<QIHH")

#: Also count this process's mappings before and after each input (slow).
COUNT_MAPS = os.environ.get("PYVIRTIO_FUZZ_MAPS") == "1"
#: Drive a VhostUserBackend through its socket instead of the session directly.
THROUGH_SOCKET = os.environ.get("PYVIRTIO_FUZZ_SOCKET") == "1"
_HEADER = struct.Struct("<III")


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global proto, actions, Feature, VhostUserBackend, VhostUserSession, Entropy, Block
    global LOG, WORKDIR, BLOCK_FD
    from pyvirtio.constants import Feature
    from pyvirtio.devices.block import Block
    from pyvirtio.devices.entropy import Entropy
    from pyvirtio.transport.vhost_user import VhostUserBackend, VhostUserSession, actions
    from pyvirtio.transport.vhost_user import protocol as proto

    LOG = LogRecorder("pyvirtio")
    WORKDIR = Path(tempfile.mkdtemp(prefix="pyvirtio-fuzz-vu-"))
    fd = os.open(WORKDIR / "blk.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, BLOCK_FILE_SIZE)
    BLOCK_FD = fd


_DEVICES: dict[str, Any] = {}
# Dropped while the modules their finalizers use are still there.
atexit.register(_DEVICES.clear)
_BACKENDS: dict[str, Any] = {}


def _device(kind: str) -> Any:
    """One device per kind for the whole run: each input is a new connection to it."""
    device = _DEVICES.get(kind)
    if device is None:
        if kind == "rng":
            device = Entropy(lambda n: b"\x5a" * n, queue_size=16)
        else:
            device = Block(BLOCK_FD, queue_size=16)
        _DEVICES[kind] = device
    return device


def _backend(kind: str) -> Any:
    """One back end per device kind for the whole run (THROUGH_SOCKET)."""
    backend = _BACKENDS.get(kind)
    if backend is None:
        backend = VhostUserBackend(_device(kind), WORKDIR / kind, send_timeout=1.0)
        _BACKENDS[kind] = backend
    return backend


# -- the session under test ---------------------------------------------------


class SessionUnderTest(Protocol):
    """What the front end's moves need from the session they drive."""

    device: Any

    def send(self, data: bytes, fds: list[int]) -> bool: ...
    def pump(self) -> None: ...
    def replies(self) -> list[Any]: ...
    def close(self) -> None: ...
    @property
    def connected(self) -> bool: ...


class SocketSession:
    """One front-end connection to a VhostUserBackend through its real socket path."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.device = backend.device
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(str(backend.socket_path))
        self.sock.setblocking(False)
        self.parser = proto.MessageParser(proto.FrontendRequest, replies=True)
        self.pump()
        assert backend.connected, "the back end did not accept the connection"

    def send(self, data: bytes, fds: list[int]) -> bool:
        """Send one message; False if the back end has dropped the connection."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        try:
            self.sock.sendmsg([data], anc if fds else [])
        except (BrokenPipeError, ConnectionResetError, BlockingIOError):
            return False
        return True

    def pump(self) -> None:
        """Run the back end's loop until it has nothing left to do."""
        for _ in range(MAX_ROUNDS):
            if not self.backend.run_once(0):
                return
            self.replies()
        raise AssertionError(f"the back end loop is still busy after {MAX_ROUNDS} rounds")

    def replies(self) -> list[Any]:
        """Read and parse what the back end sent (every reply must be well-formed)."""
        out: list[Any] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                return out
            if not data:
                return out
            try:
                out += self.parser.feed(data)
            except proto.ProtocolError as exc:
                raise AssertionError(f"the back end sent a malformed reply: {exc}") from exc

    @property
    def connected(self) -> bool:
        return bool(self.backend.connected)

    def close(self) -> None:
        """Disconnect and let the back end tear the session down."""
        self.sock.close()
        for _ in range(MAX_ROUNDS):
            if not self.backend.connected:
                return
            self.backend.run_once(0.01)
        raise AssertionError("the back end never noticed the disconnect")


class _RecordingInterrupt:
    """The device's interrupts, counted (no host fds are written in direct mode)."""

    def __init__(self) -> None:
        self.used = 0
        self.config_changes = 0

    def signal_used_queue(self, queue_index: int) -> None:
        self.used += 1

    def signal_config_change(self) -> None:
        self.config_changes += 1


class DirectSession:
    """A VhostUserSession driven directly: bytes and fds in, actions carried out here.

    The host side in miniature: every fd the front end sends is duplicated
    (as SCM_RIGHTS would), what the session keeps comes back in actions and
    is held or closed here, kick fds are watched with an epoll as the event
    loop does (one epoll refuses, a memfd or a directory, is closed), and
    replies are parsed.  No socket, no loop: fast, every fd accounted for.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.session = VhostUserSession(device, _RecordingInterrupt(), name="fuzz")
        self.parser = proto.MessageParser(proto.FrontendRequest, replies=True)
        self._replies: list[Any] = []
        self._epoll = select.epoll()
        self._kicks: dict[int, int] = {}  # ring index -> kick fd
        self._kick_rings: dict[int, int] = {}  # kick fd -> ring index
        self._held: dict[tuple[str, int], int] = {}  # (call or err, ring) -> fd
        self._channel: int | None = None
        self._connected = True

    def send(self, data: bytes, fds: list[int]) -> bool:
        if not self._connected:
            return False
        self._carry_out(self.session.receive_data(data, [os.dup(fd) for fd in fds]))
        return True

    def _carry_out(self, todo: list[Any]) -> None:
        for action in todo:
            if isinstance(action, actions.Reply):
                try:
                    self._replies += self.parser.feed(action.data)
                except proto.ProtocolError as exc:
                    raise AssertionError(f"the session sent a malformed reply: {exc}") from exc
            elif isinstance(action, actions.WatchKick):
                self._watch_kick(action.index, action.fd)
            elif isinstance(action, actions.SetNotifyFd):
                old = self._held.pop((action.kind.value, action.index), None)
                if old is not None:
                    os.close(old)
                if action.fd is not None:
                    self._held[(action.kind.value, action.index)] = action.fd
            elif isinstance(action, actions.SetBackendChannel):
                if self._channel is not None:
                    os.close(self._channel)
                self._channel = action.fd
            elif isinstance(action, actions.CloseFds):
                for fd in action.fds:
                    os.close(fd)
            else:
                self._end()

    def _watch_kick(self, index: int, fd: int | None) -> None:
        old = self._kicks.pop(index, None)
        if old is not None:
            del self._kick_rings[old]
            self._epoll.unregister(old)
            os.close(old)
        if fd is None:
            return
        try:
            os.set_blocking(fd, False)
            self._epoll.register(fd, select.EPOLLIN)
        except OSError:
            os.close(fd)
            return
        self._kicks[index] = fd
        self._kick_rings[fd] = index

    def pump(self) -> None:
        """Serve the pending kicks (a kick fd that fails or hangs up is dropped)."""
        for _ in range(MAX_ROUNDS):
            events = self._epoll.poll(0) if self._connected else []
            if not events:
                return
            for fd, mask in events:
                index = self._kick_rings.get(fd)
                if index is None:
                    continue
                gone = bool(mask & (select.EPOLLHUP | select.EPOLLERR))
                try:
                    os.read(fd, 8)
                except BlockingIOError:
                    pass
                except OSError:
                    gone = True
                if gone:
                    self._watch_kick(index, None)
                self.session.kick(index)
        raise AssertionError(f"kicks still pending after {MAX_ROUNDS} rounds")

    def replies(self) -> list[Any]:
        out, self._replies = self._replies, []
        return out

    @property
    def connected(self) -> bool:
        return self._connected

    def _end(self) -> None:
        if not self._connected:
            return
        self._connected = False
        self._carry_out(self.session.close())
        for index in list(self._kicks):
            self._watch_kick(index, None)
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        if self._channel is not None:
            os.close(self._channel)
            self._channel = None
        self._epoll.close()

    def close(self) -> None:
        self._end()


def _open_session(kind: str) -> SessionUnderTest:
    if THROUGH_SOCKET:
        return SocketSession(_backend(kind))
    return DirectSession(_device(kind))


# -- the front end's moves ------------------------------------------------------


class _FrontEnd:
    """A hostile front end: builds messages and fds from the input."""

    def __init__(self, src: Bytes, session: SessionUnderTest) -> None:
        self.src = src
        self.session = session
        #: Every fd this side created (closed after the input).
        self.own: list[int] = []
        #: The primary shared memory: (client fd, size, region size)
        self.memfd: tuple[int, int] | None = None
        self.kick: int | None = None
        self.avail_idx = 0

    # fds ------------------------------------------------------------------------

    def _keep(self, fd: int) -> int:
        self.own.append(fd)
        return fd

    def new_memfd(self, size: int) -> int:
        # Sealable, as QEMU's memory backends are, mostly; the back end
        # refuses memory it cannot seal against shrinking.
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.src.take(1) < 240 else 0)
        fd = self._keep(os.memfd_create("fuzz-guest", flags))
        os.ftruncate(fd, size)
        return fd

    def new_fd(self, purpose: str) -> int:
        """An fd of a fuzz-chosen kind, mostly the right one for ``purpose``."""
        kind = self.src.take(1)
        if kind < 200:
            if purpose == "memory":
                return self.new_memfd(self.src.pick(MEMFD_SIZES))
            if purpose == "socket":
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self._keep(a.detach())
                return self._keep(b.detach())
            return self._keep(os.eventfd(0, os.EFD_CLOEXEC))
        choice = kind % 6
        if choice == 0:
            r, w = os.pipe2(os.O_CLOEXEC)
            self._keep(r)
            self._keep(w)
            return r if self.src.flag() else w
        if choice == 1:
            return self._keep(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        if choice == 2:
            return self._keep(os.open(WORKDIR, os.O_RDONLY | os.O_CLOEXEC))
        if choice == 3:
            return self.new_memfd(self.src.pick(MEMFD_SIZES))
        if choice == 4:
            if self.src.flag():
                # A counter one below its maximum: a blocking write would hang.
                fd = self._keep(os.eventfd(0, os.EFD_CLOEXEC))
                os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
                return fd
            return self._keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._keep(a.detach())
        return self._keep(b.detach())

    # messages ---------------------------------------------------------------------

    def flags(self) -> int:
        sel = self.src.take(1)
        if sel < 160:
            return proto.VERSION
        if sel < 248:
            return proto.VERSION | proto.FLAG_NEED_REPLY
        return self.src.take(4)

    def send(self, request: Any, payload: bytes, fds: list[int] | None = None) -> None:
        data = _HEADER.pack(int(request), self.flags(), len(payload)) + payload
        self.session.send(data, fds or [])
        self.session.pump()

    def region(self, fd_size: int) -> tuple[int, int, int, int]:
        """(guest, size, user, offset) for a memory region, mostly consistent."""
        src = self.src
        guest = src.pick((0, 0, 0x10000, 0x100000, src.take(8)))
        size = fd_size if src.take(1) < 200 and fd_size else src.pick(REGION_SIZES)
        user = (USER_BASE + guest) & U64 if src.take(1) < 220 else src.take(8)
        offset = 0 if src.take(1) < 220 else src.pick((0x1000, 0x800, 1, src.take(8)))
        return guest, size, user, offset

    def mem_table(self) -> None:
        src = self.src
        count = 1 if src.take(1) < 200 else src.take(1) % 4
        regions = []
        fds = []
        for i in range(count):
            fd = self.new_fd("memory")
            fd_size = os.fstat(fd).st_size
            guest, size, user, offset = self.region(fd_size)
            if i == 0 and fd_size:
                self.memfd = (fd, fd_size)
            regions.append(struct.pack("<QQQQ", guest, size, user, offset))
            fds.append(fd)
        if src.take(1) >= 240:
            fds = fds[: src.take(1) % (len(fds) + 1)]  # a count that does not match
        self.send(
            proto.FrontendRequest.SET_MEM_TABLE,
            struct.pack("<II", count, 0) + b"".join(regions),
            fds,
        )

    def add_mem_reg(self, request: Any) -> None:
        fd = self.new_fd("memory")
        fd_size = os.fstat(fd).st_size
        guest, size, user, offset = self.region(fd_size)
        payload = struct.pack("<QQQQQ", 0, guest, size, user, offset)
        if request is proto.FrontendRequest.ADD_MEM_REG and self.memfd is None and fd_size:
            self.memfd = (fd, fd_size)
        fds = [fd] if request is proto.FrontendRequest.ADD_MEM_REG or self.src.flag() else []
        self.send(request, payload, fds)

    def vring_fd(self, request: Any) -> None:
        src = self.src
        index = 0 if src.take(1) < 220 else src.take(1)
        if src.take(1) >= 230:
            self.send(request, struct.pack("<Q", index | proto.VRING_FD_NOFD))
            return
        fd = self.new_fd("eventfd")
        if request is proto.FrontendRequest.SET_VRING_KICK:
            self.kick = fd
        self.send(request, struct.pack("<Q", index), [fd])

    def state(self, request: Any, num: int) -> None:
        index = 0 if self.src.take(1) < 220 else self.src.take(4)
        self.send(request, struct.pack("<II", index, num))

    def vring_addr(self) -> None:
        src = self.src
        index = 0 if src.take(1) < 220 else src.take(4)
        addrs = [
            USER_BASE + base if src.take(1) < 220 else src.take(8) for base in (DESC, USED, AVAIL)
        ]
        self.send(proto.FrontendRequest.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, *addrs, 0))

    def features(self) -> None:
        offered = self.session.device.offered_features | 1 << 30
        mask = self.src.take(8)
        value = offered & mask if self.src.take(1) < 220 else self.src.take(8)
        if self.src.take(1) < 200:
            value |= 1 << 30 | Feature.VERSION_1.mask
        self.send(proto.FrontendRequest.SET_FEATURES, struct.pack("<Q", value))

    def setup(self) -> None:
        """The sequence QEMU uses to start ring 0, with fuzz-chosen values where they matter."""
        r = proto.FrontendRequest
        self.send(r.GET_FEATURES, b"")
        self.send(r.GET_PROTOCOL_FEATURES, b"")
        self.send(r.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0x1FFFF & self.src.take(4)))
        self.send(r.SET_OWNER, b"")
        self.features()
        self.mem_table()
        self.state(r.SET_VRING_NUM, self.src.pick((16, 8, 4, 1, 256, 0, 3)))
        self.vring_addr()
        self.state(r.SET_VRING_BASE, 0)
        self.vring_fd(r.SET_VRING_CALL)
        self.vring_fd(r.SET_VRING_KICK)
        self.state(r.SET_VRING_ENABLE, 1)

    def publish(self) -> None:
        """Write a descriptor chain and avail entry into the shared memory and kick."""
        if self.memfd is None:
            return
        src = self.src
        fd, _size = self.memfd
        head = src.take(1) % 16
        count = 1 + src.take(1) % 3
        index = head
        for i in range(count):
            nxt = (index + 1) % 16
            flags = 0
            if i + 1 < count and src.take(1) < 220:
                flags |= 1
            if src.take(1) < 160:
                flags |= 2
            if src.take(1) >= 250:
                flags = src.take(2)
            length = src.pick((16, 512, 4096, 1, src.take(4)))
            addr = DATA + src.take(1) * 64 if src.take(1) < 230 else src.take(8)
            self._pwrite(fd, DESC + 16 * index, _DESC.pack(addr, length, flags, nxt))
            index = nxt
        self._pwrite(fd, AVAIL + 4 + 2 * (self.avail_idx % 16), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._pwrite(fd, AVAIL + 2, struct.pack("<H", self.avail_idx))
        if src.take(1) < 64 and self.memfd is not None:
            # A block request header in the first buffer: type, reserved, sector.
            kind = src.pick((0, 1, 4, 8, 11, 13, src.take(4)))
            self._pwrite(fd, DATA, struct.pack("<IIQ", kind, 0, src.take(2)))
        self.notify()

    @staticmethod
    def _pwrite(fd: int, offset: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(fd, data, offset)

    def notify(self) -> None:
        if self.kick is not None and self.src.take(1) < 230:
            # The kick fd may be a saturated eventfd or a full socket: this
            # front end must not wait on its own kick (BlockingIOError is an
            # OSError: a saturated eventfd has been kicked already).
            with contextlib.suppress(OSError):
                os.set_blocking(self.kick, False)
                os.eventfd_write(self.kick, 1)
            self.session.pump()
        else:
            self.state(proto.FrontendRequest.VRING_KICK, 0)

    def raw(self) -> None:
        """Any request code, flags, size and payload bytes, with some fds."""
        src = self.src
        code = src.take(1) % 48
        flags = src.pick((1, 1 | 8, 5, src.take(4)))
        payload = src.raw(src.take(1) % 80)
        size = len(payload) if src.take(1) < 230 else src.take(4)
        fds = [self.new_fd("eventfd") for _ in range(src.take(1) % 3)]
        self.session.send(_HEADER.pack(code, flags, size) + payload, fds)
        self.session.pump()

    def step(self) -> None:
        src = self.src
        r = proto.FrontendRequest
        op = src.take(1) % 27
        match op:
            case 0:
                self.setup()
            case 1:
                self.send(src.pick((r.GET_FEATURES, r.GET_PROTOCOL_FEATURES, r.GET_QUEUE_NUM)), b"")
            case 2:
                self.features()
            case 3:
                self.send(r.SET_PROTOCOL_FEATURES, struct.pack("<Q", src.take(8)))
            case 4:
                self.send(src.pick((r.SET_OWNER, r.RESET_OWNER, r.RESET_DEVICE)), b"")
            case 5:
                self.mem_table()
            case 6:
                self.add_mem_reg(r.ADD_MEM_REG)
            case 7:
                self.add_mem_reg(r.REM_MEM_REG)
            case 8:
                self.state(r.SET_VRING_NUM, src.pick((16, 8, 1, 0, 256, 0x8000, src.take(4))))
            case 9:
                self.vring_addr()
            case 10:
                self.state(r.SET_VRING_BASE, src.pick((0, 1, 0xFFFF, 0x8000, src.take(4))))
            case 11:
                self.state(r.GET_VRING_BASE, 0)
            case 12:
                self.vring_fd(r.SET_VRING_KICK)
            case 13:
                self.vring_fd(r.SET_VRING_CALL)
            case 14:
                self.vring_fd(r.SET_VRING_ERR)
            case 15:
                self.state(r.SET_VRING_ENABLE, src.pick((1, 0, 2)))
            case 16 | 17 | 18:
                self.publish()
            case 19:
                offset, size = src.take(1), src.take(1) % 40
                self.send(r.GET_CONFIG, struct.pack("<III", offset, size, 0) + bytes(size))
            case 20:
                size = src.take(1) % 16
                data = struct.pack("<III", src.take(1), size, src.take(1) % 3) + src.raw(size)
                self.send(r.SET_CONFIG, data)
            case 21:
                self.send(r.SET_STATUS, struct.pack("<Q", src.pick((0, 1, 3, 11, 15, src.take(8)))))
            case 22:
                self.send(r.GET_STATUS, b"")
            case 23:
                self.send(r.SET_BACKEND_REQ_FD, b"", [self.new_fd("socket")])
            case 24:
                self.raw()
            case 25 if self.memfd is not None:
                # The front end shrinks the shared memory under the back end
                # (SIGBUS unless the back end sealed it).
                with contextlib.suppress(OSError):
                    os.ftruncate(self.memfd[0], 0)
                self.notify()
            case _:
                self.send(r.GET_MAX_MEM_SLOTS, b"")


# -- one input ----------------------------------------------------------------------


def _count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _count_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def _resources() -> tuple[int, int]:
    # A leaked mapping keeps its mmap object, which holds a dup of the fd:
    # counting fds finds it.  Reading the maps costs as much as the rest of
    # an input, so it is optional.
    return _count_fds(), _count_maps() if COUNT_MAPS else 0


def _check_log() -> None:
    for record in LOG.take():
        if record.exc_info:
            trace = "".join(traceback.format_exception(*record.exc_info))
            raise AssertionError(f"{record.name}: {record.getMessage()}\n{trace}")


def run_one(data: bytes) -> None:
    src = Bytes(data)
    kind = "rng" if src.take(1) & 1 else "blk"
    if THROUGH_SOCKET:
        _backend(kind)  # (its listening socket and epoll are not the input's)
    before = _resources()
    LOG.take()
    started = time.monotonic()
    session = _open_session(kind)
    front = _FrontEnd(src, session)
    try:
        for _ in range(MAX_STEPS):
            if src.exhausted or not session.connected:
                break
            front.step()
    finally:
        session.close()
        for fd in front.own:
            with contextlib.suppress(OSError):
                os.close(fd)
    elapsed = time.monotonic() - started
    assert elapsed < SLOW_INPUT, f"one connection took {elapsed:.1f} s"
    _check_log()
    after = _resources()
    if after != before:
        # Mappings and their fd copies may wait in reference cycles.
        gc.collect()
        after = _resources()
    assert after == before, f"fds, mappings {before} before the connection, {after} after"


if __name__ == "__main__":
    main(TARGET, "Fuzz a vhost-user back end's session.", run_one, _load, max_len=1024)
