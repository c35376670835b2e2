"""The vhost-user back end against a hostile front end.

Each test plays a front end that attacks the way a compromised VMM (or any
process that can reach the socket) could: it shrinks the memory it shared,
hands over call and err fds that block, sends requests the back end must
refuse, floods it, never reads its replies, or crowds the socket.  The back
end must survive, say so once in its log, and serve the next front end.
Where a failure would kill or freeze the process, the back end runs as
``pyvirtio serve`` in a child process, so the test observes it from outside.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.vhost_user import (
    F_PROTOCOL,
    TIMEOUT,
    RawFrontend,
    eventfd,
    served,
    wait_until,
)
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.devices.entropy import Entropy
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user.protocol import (
    VERSION,
    ConfigSpace,
    FrontendRequest,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    encode,
    vring_fd_payload,
)
from pyvirtio.virtqueue import split
from pyvirtio.vmm.backends import ServedDevice

R = FrontendRequest
GPA = 0x4000_0000
USER = 0x7F00_0000_0000  # the front end's "user address" of its region
MEM_SIZE = 1 << 20
RING_SIZE = 16
DESC, AVAIL, USED = GPA + 0x1000, GPA + 0x2000, GPA + 0x3000
BUFFERS = GPA + 0x10000


def sealable_memfd(size: int = MEM_SIZE) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def unsealable_memfd(size: int = MEM_SIZE) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)  # F_SEAL_SEAL from birth
    os.ftruncate(fd, size)
    return fd


class Peer:
    """A raw front end driving one split ring of a one-queue device (rng) by hand."""

    def __init__(self, path: Path, mem_fd: int | None = None, *, map_memory: bool = True) -> None:
        self.f = RawFrontend(path)
        self.mem_fd = sealable_memfd() if mem_fd is None else mem_fd
        self.mem = GuestMemory()
        if map_memory:
            self.mem.add_fd(GPA, MEM_SIZE, self.mem_fd)
        self.kick = eventfd()
        self.queue: split.SplitDriverQueue | None = None
        self.next_buffer = 0

    def negotiate(self, features: int = Feature.VERSION_1.mask | F_PROTOCOL) -> None:
        self.f.call(R.GET_FEATURES)
        offered = self.f.call(R.GET_PROTOCOL_FEATURES)
        self.f.send(R.SET_PROTOCOL_FEATURES, offered)
        self.f.send(R.SET_OWNER)
        assert self.f.call(R.SET_FEATURES, features) == 0

    def add_memory(self) -> int:
        """ADD_MEM_REG of the whole memfd; the REPLY_ACK status (0: accepted)."""
        desc = MemoryRegionDesc(GPA, MEM_SIZE, USER, 0)
        status = self.f.call(R.ADD_MEM_REG, SingleMemoryRegion(desc), [self.mem_fd])
        assert isinstance(status, int)
        return status

    def start_ring(self, call_fd: int | None, err_fd: int | None = None) -> None:
        def user(addr: int) -> int:
            return addr - GPA + USER

        self.queue = split.SplitDriverQueue(self.mem, RING_SIZE, DESC, AVAIL, USED)
        if call_fd is not None:
            self.f.send(R.SET_VRING_CALL, vring_fd_payload(0, True), [call_fd])
        if err_fd is not None:
            self.f.send(R.SET_VRING_ERR, vring_fd_payload(0, True), [err_fd])
        self.f.send(R.SET_VRING_NUM, VringState(0, RING_SIZE))
        self.f.send(R.SET_VRING_BASE, VringState(0, 0))
        self.f.send(R.SET_VRING_ADDR, VringAddr(0, 0, user(DESC), user(USED), user(AVAIL), 0))
        self.f.send(R.SET_VRING_KICK, vring_fd_payload(0, True), [self.kick])
        assert self.f.call(R.SET_VRING_ENABLE, VringState(0, 1)) == 0

    def submit(self, addr: int | None = None, length: int = 64) -> int:
        assert self.queue is not None
        if addr is None:
            addr = BUFFERS + (self.next_buffer % RING_SIZE) * 0x1000
            self.next_buffer += 1
        self.queue.add([], [(addr, length)], addr)
        os.eventfd_write(self.kick, 1)
        return addr

    def wait_used(self, timeout: float = TIMEOUT) -> list[tuple[object, int]]:
        assert self.queue is not None
        deadline = time.monotonic() + timeout
        while not (done := list(self.queue.used())):
            if time.monotonic() > deadline:
                raise AssertionError("the back end did not complete the request")
            time.sleep(0.001)
        return done

    def request(self) -> None:
        addr = self.submit()
        assert self.wait_used() == [(addr, 64)]

    def close(self) -> None:
        self.f.close()
        self.mem.close()
        for fd in (self.kick, self.mem_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextmanager
def serve_child(device: str, path: Path, tmp_path: Path, *args: str) -> Iterator[ServedDevice]:
    with ServedDevice(device, path, list(args), log_path=tmp_path / f"{device}.log") as child:
        yield child


def assert_alive_and_serving(child: ServedDevice, path: Path) -> None:
    """The child still runs, and a well-behaved front end gets served."""
    assert child.proc is not None
    assert child.proc.poll() is None, f"back end died: {child.proc.returncode}\n{child.log()}"
    try:
        peer = Peer(path)
    except OSError as exc:
        raise AssertionError(f"cannot connect ({exc}): {child.proc.poll()}\n{child.log()}") from exc
    try:
        peer.negotiate()
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        peer.request()
        os.close(call)
    finally:
        peer.close()


# -- 1. memory the front end shrinks under the back end -------------------------------------


@pytest.mark.parametrize("when", ["after-map", "after-kick"])
def test_truncating_the_shared_memfd_cannot_crash_the_back_end(
    sock_path: Path, tmp_path: Path, when: str
) -> None:
    """ftruncate(memfd, 0) after ADD_MEM_REG, then a kick: SIGBUS before the fix.

    The back end seals a sealable memfd against shrinking when it maps it,
    so the truncation itself fails and the back end keeps serving.
    """
    with serve_child("rng", sock_path, tmp_path) as child:
        peer = Peer(sock_path)
        peer.negotiate()
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        if when == "after-kick":
            peer.request()
        with contextlib.suppress(PermissionError):
            os.ftruncate(peer.mem_fd, 0)
        os.eventfd_write(peer.kick, 1)  # the back end reads the ring
        time.sleep(0.3)
        assert child.proc is not None and child.proc.poll() is None, child.log()
        assert os.fstat(peer.mem_fd).st_size == MEM_SIZE, "the peer could shrink the memory"
        peer.submit()
        peer.wait_used()
        peer.close()
        os.close(call)
        assert_alive_and_serving(child, sock_path)


def test_unsealable_memory_is_refused_by_default(sock_path: Path, tmp_path: Path) -> None:
    """A memfd without MFD_ALLOW_SEALING, or a region past the end of its file: NACK."""
    with serve_child("rng", sock_path, tmp_path) as child:
        peer = Peer(sock_path, unsealable_memfd(), map_memory=False)
        peer.negotiate()
        assert peer.add_memory() != 0
        peer.close()
        # A region of MEM_SIZE on a file half as long.
        short = Peer(sock_path, sealable_memfd(MEM_SIZE // 2), map_memory=False)
        short.negotiate()
        assert short.add_memory() != 0
        short.close()
        wait_until(lambda: "cannot be sealed" in child.log() and "end of" in child.log())
        assert "--unsealed-memory allow" in child.log()  # says how to opt in
        assert_alive_and_serving(child, sock_path)


def test_unsealable_memory_allowed_on_request(sock_path: Path, tmp_path: Path) -> None:
    with serve_child("rng", sock_path, tmp_path, "--unsealed-memory", "allow") as child:
        peer = Peer(sock_path, unsealable_memfd())
        peer.negotiate()
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        peer.request()
        peer.close()
        os.close(call)
        wait_until(lambda: "can crash this back end" in child.log())


def test_frontend_memory_is_sealed_against_shrinking() -> None:
    """GuestMemory.memfd (what VhostUserFrontend shares) seals itself as QEMU does."""
    with GuestMemory.memfd(1 << 16) as mem:
        fd = mem.regions[0].fd
        assert fd is not None
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)


# -- 2. call and err fds that block ------------------------------------------------------------


def _saturated_eventfd() -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a hostile peer would leave it
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
    return fd


def _full_pipe() -> tuple[int, int]:
    """A pipe nobody reads, already full: (read end kept by the test, write end)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 65536)
    os.set_blocking(w, True)
    return r, w


@pytest.mark.parametrize("fd_kind", ["saturated-eventfd", "full-pipe", "err-fd"])
def test_a_blocking_call_or_err_fd_cannot_freeze_the_back_end(
    sock_path: Path, tmp_path: Path, fd_kind: str
) -> None:
    with serve_child("rng", sock_path, tmp_path) as child:
        peer = Peer(sock_path)
        peer.negotiate()
        assert peer.add_memory() == 0
        keep: list[int] = []
        if fd_kind == "saturated-eventfd":
            call = _saturated_eventfd()
            peer.start_ring(call)
        elif fd_kind == "full-pipe":
            keep_r, call = _full_pipe()
            keep.append(keep_r)
            peer.start_ring(call)
        else:
            call = eventfd()
            err = _saturated_eventfd()
            keep.append(err)
            peer.start_ring(call, err)
        keep.append(call)
        if fd_kind == "err-fd":
            peer.submit(0xDEAD_0000_0000)  # a buffer outside guest memory: needs reset
        else:
            for _ in range(3):
                peer.request()
        # The loop still answers, at once.
        peer.f.sock.settimeout(2.0)
        assert isinstance(peer.f.call(R.GET_FEATURES), int)
        peer.close()
        assert_alive_and_serving(child, sock_path)
        for fd in keep:
            os.close(fd)
        if fd_kind == "full-pipe":
            assert "dropped" in child.log()


def _copies_of(path: Path) -> int:
    """How many fds of this process are open on ``path``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path))


def test_a_kick_fd_epoll_refuses_is_closed_and_the_ring_runs_on_in_band_kicks(
    sock_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A regular file as kick fd (epoll cannot watch one): logged and closed, no stall."""
    kick_file = tmp_path / "kick"
    with served(Entropy(), sock_path), caplog.at_level(logging.WARNING):
        peer = Peer(sock_path)
        os.close(peer.kick)
        peer.kick = os.open(kick_file, os.O_RDWR | os.O_CREAT, 0o600)
        peer.negotiate()
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        assert any("unusable kick fd" in r.getMessage() for r in caplog.records)
        assert _copies_of(kick_file) == 1  # the back end's copy is closed
        assert peer.queue is not None
        peer.queue.add([], [(BUFFERS, 64)], "in-band")
        peer.f.send(R.VRING_KICK, VringState(0, 0))
        assert peer.wait_used() == [("in-band", 64)]
        peer.close()
        os.close(call)


# -- 3 and 6. refused feature changes ------------------------------------------------------


def test_refused_set_features_changes_nothing(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        peer = Peer(sock_path)
        peer.negotiate()
        acked = device.acked_features
        status = peer.f.call(R.SET_FEATURES, (1 << 64) - 1)  # all ones: un-offered bits
        assert status != 0
        assert backend.features == Feature.VERSION_1.mask | F_PROTOCOL
        assert device.acked_features == acked
        assert not device.has_feature(Feature.RING_PACKED)
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        peer.request()  # the split ring is served
        peer.close()
        os.close(call)


def test_refused_set_protocol_features_changes_nothing(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path) as backend:
        peer = Peer(sock_path)
        offered = peer.f.call(R.GET_PROTOCOL_FEATURES)
        assert isinstance(offered, int)
        chosen = offered & ~ProtocolFeature.MQ.mask
        peer.f.send(R.SET_PROTOCOL_FEATURES, chosen)
        wait_until(lambda: backend.protocol_features == chosen)
        assert peer.f.call(R.SET_PROTOCOL_FEATURES, (1 << 64) - 1) != 0
        assert backend.protocol_features == chosen
        peer.close()


def test_feature_changes_on_a_running_ring_are_refused(sock_path: Path) -> None:
    """SET_FEATURES adding RING_PACKED to a running split ring: NACK, ring unchanged.

    Re-sending the same features (QEMU does while migrating) is accepted.
    """
    device = Entropy()
    negotiated = Feature.VERSION_1.mask | F_PROTOCOL
    with served(device, sock_path):
        peer = Peer(sock_path)
        peer.negotiate(negotiated)
        assert peer.add_memory() == 0
        call = eventfd()
        peer.start_ring(call)
        peer.request()
        assert peer.f.call(R.SET_FEATURES, negotiated | Feature.RING_PACKED.mask) != 0
        assert peer.f.call(R.SET_FEATURES, negotiated) == 0  # a no-op is fine
        peer.request()  # still running, still split
        assert peer.f.call(R.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 2)
        peer.close()
        os.close(call)


# -- 4. log flood --------------------------------------------------------------------------


def test_a_failing_call_fd_is_logged_rate_limited(sock_path: Path, tmp_path: Path) -> None:
    """A call fd that fails every write (a pipe's read end): a few lines, not one per request."""
    with serve_child("rng", sock_path, tmp_path) as child:
        peer = Peer(sock_path)
        peer.negotiate()
        assert peer.add_memory() == 0
        r, w = os.pipe()
        peer.start_ring(r)  # writing to a read end fails with EBADF
        requests = 300
        for _ in range(requests):
            peer.request()
        peer.close()
        os.close(r)
        os.close(w)
        assert_alive_and_serving(child, sock_path)
        lines = [line for line in child.log().splitlines() if "call fd" in line]
        assert 1 <= len(lines) <= 3, lines


# -- 5. retention after a disconnect ---------------------------------------------------------


def _memfd_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("/memfd:" in line for line in maps)


def test_io_threads_release_the_memory_after_a_disconnect(sock_path: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    args = ("--file", str(image), "--io-threads", "2")
    with serve_child("blk", sock_path, tmp_path, *args) as child:
        assert child.proc is not None
        pid = child.proc.pid
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        assert _memfd_mappings(pid) == 0
        with VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK) as frontend:
            blk = BlkDriver(frontend, timeout=TIMEOUT)
            size = 256 * 1024
            bufs = [blk.alloc_buffer(size) for _ in range(8)]
            for _ in range(3):  # many large transfers in flight: the workers join in
                tokens = [
                    blk.submit_read(i * size, buf.addr, size, kick=False)
                    for i, buf in enumerate(bufs)
                ]
                blk.kick()
                done = 0
                while done < len(tokens):
                    done += len(blk.wait(1, TIMEOUT))
            assert _memfd_mappings(pid) >= 1
        wait_until(lambda: "front end disconnected" in child.log())
        wait_until(lambda: _memfd_mappings(pid) == 0, 2.0)
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) == fds_before, 2.0)


# -- smaller findings ---------------------------------------------------------------------------


def test_ring_requests_out_of_range_are_refused(sock_path: Path) -> None:
    device = Entropy()  # offers rings of at most 256
    with served(device, sock_path) as backend:
        # QEMU may still use 1024 (its VIRTQUEUE_MAX_SIZE): vhost-user cannot say less.
        maximum = backend.max_ring_size(0)
        assert maximum == 1024
        peer = Peer(sock_path)
        peer.negotiate()
        assert peer.f.call(R.SET_VRING_NUM, VringState(0, 32768)) != 0
        assert peer.f.call(R.SET_VRING_NUM, VringState(0, maximum * 2)) != 0
        assert peer.f.call(R.SET_VRING_NUM, VringState(0, maximum)) == 0
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, 0xFFFF_FFFF)) != 0  # split: 16 bits
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, 0xFFFF)) == 0
        # Config space: an rng has none; a read beyond it is refused (size 0).
        reply = peer.f.call(R.GET_CONFIG, ConfigSpace(0, 0, bytes(8)))
        assert reply == ConfigSpace(0, 0, b"")
        peer.close()


def test_packed_ring_base_is_refused_outside_the_ring(sock_path: Path) -> None:
    device = Entropy()
    with served(device, sock_path):
        peer = Peer(sock_path)
        peer.negotiate(Feature.VERSION_1.mask | Feature.RING_PACKED.mask | F_PROTOCOL)
        assert peer.f.call(R.SET_VRING_NUM, VringState(0, 16)) == 0
        wrap = 0x8000
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, 3 | wrap)) == 0
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, (5 | wrap) << 16 | 3 | wrap)) == 0
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, 16 | wrap)) != 0  # index >= size
        assert peer.f.call(R.SET_VRING_BASE, VringState(0, 0xFFFF_FFFF)) != 0
        peer.close()


def test_config_reads_beyond_config_space_are_refused(sock_path: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with (
        serve_child("blk", sock_path, tmp_path, "--file", str(image)),
        contextlib.closing(RawFrontend(sock_path)) as f,
    ):
        f.call(R.GET_FEATURES)
        f.send(R.SET_PROTOCOL_FEATURES, f.call(R.GET_PROTOCOL_FEATURES))
        whole = f.call(R.GET_CONFIG, ConfigSpace(0, 0, bytes(8)))
        assert isinstance(whole, ConfigSpace) and len(whole.data) == 8
        assert int.from_bytes(whole.data, "little") == (1 << 20) // 512  # capacity
        assert f.call(R.GET_CONFIG, ConfigSpace(250, 0, bytes(8))) == ConfigSpace(250, 0, b"")


def test_second_front_ends_wait_and_are_told_why(sock_path: Path, tmp_path: Path) -> None:
    """20 concurrent connects all succeed; the waiting ones are served in turn."""
    with serve_child("rng", sock_path, tmp_path) as child:
        first = RawFrontend(sock_path)
        assert isinstance(first.call(R.GET_FEATURES), int)
        others = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(str(sock_path))
            except BlockingIOError:
                pytest.fail("connect refused with EAGAIN: the listen backlog is too short")
            others.append(s)
        wait_until(lambda: "waiting" in child.log())
        for s in others:
            s.close()
        first.close()
        assert_alive_and_serving(child, sock_path)


def test_a_front_end_that_never_reads_cannot_stall_the_loop(
    sock_path: Path, tmp_path: Path
) -> None:
    """Requests with replies, never read: the back end drops that front end, at once."""
    with serve_child("rng", sock_path, tmp_path) as child:
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.connect(str(sock_path))
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = encode(Message(R.GET_FEATURES, None, VERSION))
        greedy.settimeout(0.5)
        sent = 0
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            while sent < 200_000:
                greedy.sendall(request * 100)
                sent += 100
        start = time.monotonic()
        peer = Peer(sock_path)  # served as soon as the back end dropped the greedy one
        peer.f.sock.settimeout(TIMEOUT)
        assert isinstance(peer.f.call(R.GET_FEATURES), int)
        assert time.monotonic() - start < 3.0  # the old code waited 5 s for each reply
        wait_until(lambda: "not reading" in child.log())
        peer.close()
        greedy.close()


def test_repeated_refusals_are_logged_rate_limited(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Entropy()
    with served(device, sock_path), caplog.at_level(logging.WARNING):
        peer = Peer(sock_path)
        for _ in range(500):
            assert peer.f.call(R.SET_VRING_NUM, VringState(9, 16)) != 0
        peer.close()
    refusals = [r for r in caplog.records if "SET_VRING_NUM refused" in r.getMessage()]
    assert len(refusals) == 1


def test_replies_left_unread_past_send_timeout_drop_the_front_end(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fewer unread replies than the size bound, but unread for send_timeout: dropped."""
    device = Entropy()
    with served(device, sock_path, send_timeout=0.5) as backend, caplog.at_level(logging.INFO):
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(sock_path))
        slow.sendall(encode(Message(R.GET_FEATURES, None, VERSION)) * 2000)
        wait_until(lambda: backend.connections == 1)
        wait_until(lambda: not backend.connected)
        assert any("bytes unsent for 0.5 s" in r.getMessage() for r in caplog.records)
        slow.close()
