"""VhostUserFrontend against a real qemu-storage-daemon, and against back ends that misbehave.

Every wait is bounded; qemu-storage-daemon is started per test and stopped
afterwards.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.vhost_user import served
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.devices.block import Block, RequestType, Status
from pyvirtio.devices.entropy import Entropy
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.mmio import FeatureNegotiationError, QueueSetupError
from pyvirtio.driver.vhost_user import VhostUserError, VhostUserFrontend
from pyvirtio.transport.vhost_user.protocol import (
    FLAG_REPLY,
    VERSION,
    FrontendRequest,
    Message,
    ProtocolFeature,
    encode,
)

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
TIMEOUT = 5.0
SECTOR = 512
IMAGE_SECTORS = 2048  # 1 MiB


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    image: Path
    socket: Path


@pytest.fixture
def qsd(tmp_path: Path, sock_path: Path) -> Iterator[Daemon]:
    assert QSD is not None
    image = tmp_path / "disk.raw"
    image.write_bytes(b"".join(bytes([i % 251]) * SECTOR for i in range(IMAGE_SECTORS)))
    process = subprocess.Popen(
        [
            QSD,
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock_path},"
            "writable=on",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock_path.exists():
            if process.poll() is not None:
                out = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"qemu-storage-daemon exited with {process.returncode}: {out}")
            if time.monotonic() > deadline:
                pytest.fail("qemu-storage-daemon did not create its socket in time")
            time.sleep(0.01)
        yield Daemon(process, image, sock_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(TIMEOUT)
        if process.stdout:
            process.stdout.close()


# -- qemu-storage-daemon ------------------------------------------------------------------------


@needs_qsd
def test_qsd_negotiation_and_config(qsd: Daemon) -> None:
    with VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
        features = frontend.device_features()
        assert features & Feature.VERSION_1.mask
        assert not features & Feature.RING_PACKED.mask  # qsd offers split rings only
        for feature in (
            ProtocolFeature.REPLY_ACK,
            ProtocolFeature.CONFIG,
            ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ):
            assert frontend.protocol_features & feature.mask
        assert frontend.num_queues == 1 and frontend.max_mem_slots == 32
        negotiated = frontend.initialize(Feature.VERSION_1.mask | Feature.RING_PACKED.mask)
        assert negotiated == Feature.VERSION_1.mask
        assert frontend.read_config(0, 8) == IMAGE_SECTORS  # capacity, in 512-byte sectors
        with pytest.raises(QueueSetupError):
            frontend.setup_queue(0, 16, packed_ring=True)


def _blk_request(
    frontend: VhostUserFrontend, kind: RequestType, sector: int, data: bytes | int
) -> tuple[int, bytes]:
    """One raw virtio-blk request (16-byte header, data, status byte); returns status, data."""
    queue = frontend.queue(0)
    mem, alloc = frontend.mem, frontend.allocator
    length = data if isinstance(data, int) else len(data)
    hdr, buf, status = alloc.alloc(16), alloc.alloc(length), alloc.alloc(1)
    mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
    mem.write_u8(status, 0xFF)
    if kind is RequestType.OUT:
        assert isinstance(data, bytes)
        mem.write(buf, data)
        queue.add([(hdr, 16), (buf, length)], [(status, 1)], "req")
    else:
        queue.add([(hdr, 16)], [(buf, length), (status, 1)], "req")
    if queue.kick_needed():
        frontend.notify(0)
    # The used ring decides: qsd also fires the call eventfd once at SET_VRING_CALL.
    [(token, _written)] = frontend.wait_used(0, TIMEOUT)
    assert token == "req"
    result = mem.read_u8(status), mem.read(buf, length)
    for addr in (hdr, buf, status):
        alloc.free(addr)
    return result


@needs_qsd
def test_qsd_raw_read_and_write(qsd: Daemon) -> None:
    with VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
        frontend.initialize(Feature.VERSION_1.mask)
        frontend.setup_queue(0, 16)
        frontend.driver_ok()
        status, data = _blk_request(frontend, RequestType.IN, 7, 2 * SECTOR)
        assert status == Status.OK
        assert data == bytes([7]) * SECTOR + bytes([8]) * SECTOR
        payload = os.urandom(3 * SECTOR)
        status, _ = _blk_request(frontend, RequestType.OUT, 100, payload)
        assert status == Status.OK
        status, data = _blk_request(frontend, RequestType.IN, 100, 3 * SECTOR)
        assert status == Status.OK and data == payload
        status, _ = _blk_request(frontend, RequestType.IN, IMAGE_SECTORS, SECTOR)
        assert status == Status.IOERR  # beyond capacity
        assert frontend.stop_queue(0) == 4  # four requests taken from the avail ring
    with qsd.image.open("rb") as f:
        f.seek(100 * SECTOR)
        assert f.read(3 * SECTOR) == payload


@needs_qsd
def test_qsd_blk_driver(qsd: Daemon) -> None:
    with VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
        blk = BlkDriver(frontend, queue_size=32)
        assert blk.config.capacity == IMAGE_SECTORS
        data = os.urandom(64 * 1024)
        blk.write(128 * 1024, data)
        blk.flush()
        assert blk.read(128 * 1024, len(data)) == data
        assert blk.read(0, SECTOR) == bytes([0]) * SECTOR
    with qsd.image.open("rb") as f:
        f.seek(128 * 1024)
        assert f.read(len(data)) == data


def _random_io(blk: BlkDriver, requests: int, depth: int, seed: int) -> bytes:
    """``requests`` 4 KiB writes and reads, ``depth`` in flight, each read checked
    against what was last written there (or was there before); returns what
    the whole device should hold afterwards."""
    blocks = blk.size // 4096
    rng = random.Random(seed)
    known = {i: blk.read(i * 4096, 4096) for i in range(blocks)}
    bufs = [blk.alloc_buffer(4096) for _ in range(depth)]
    # token -> (buffer index, block, expected contents or None for a write)
    pending: dict[int, tuple[int, int, bytes | None]] = {}
    busy: set[int] = set()  # blocks with a request in flight: keep them ordered
    submitted = 0

    def submit(i: int) -> None:
        nonlocal submitted
        block = rng.choice([b for b in range(blocks) if b not in busy])
        busy.add(block)
        if rng.random() < 0.5:
            data = rng.randbytes(4096)
            bufs[i].view[:] = data
            known[block] = data
            pending[blk.submit_write(block * 4096, bufs[i].addr, 4096, kick=False)] = (
                i,
                block,
                None,
            )
        else:
            pending[blk.submit_read(block * 4096, bufs[i].addr, 4096, kick=False)] = (
                i,
                block,
                known[block],
            )
        submitted += 1

    for i in range(depth):
        submit(i)
    blk.kick()
    while pending:
        done = blk.wait(1, timeout=TIMEOUT)
        assert done, "a completion went missing"
        for token, result in done:
            assert result == 0
            i, block, expected = pending.pop(token)
            busy.discard(block)
            if expected is not None:
                assert bytes(bufs[i].view) == expected
            if submitted < requests:
                submit(i)
        blk.kick()
    for buf in bufs:
        blk.free_buffer(buf)
    return b"".join(known[i] for i in range(blocks))


def _count_sleeps(frontend: VhostUserFrontend) -> dict[str, int]:
    """Count the front end's interrupt waits by how they ended."""
    counts = {"woken": 0, "timed out": 0}
    wait_interrupt = frontend.wait_interrupt

    def counting(timeout: float | None = None) -> int:
        fired = wait_interrupt(timeout)
        counts["woken" if fired else "timed out"] += 1
        return fired

    frontend.wait_interrupt = counting  # type: ignore[method-assign]
    return counts


@needs_qsd
@pytest.mark.parametrize("poll_us", [1.0, 50.0])
def test_qsd_blk_driver_polling(qsd: Daemon, poll_us: float) -> None:
    """Completion polling against a device in another process: the window is
    too short (1 us) for most completions, so the driver keeps turning
    notifications back on and sleeping (the re-check's race for real), or
    long enough (50 us) to catch most of them; none may go missing."""
    with VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
        blk = BlkDriver(frontend, queue_size=32, timeout=TIMEOUT, poll_us=poll_us)
        sleeps = _count_sleeps(frontend)
        data = os.urandom(64 * 1024)
        blk.write(128 * 1024, data)
        blk.flush()
        assert blk.read(128 * 1024, len(data)) == data
        expected = _random_io(blk, 3000, 16, seed=int(poll_us))
        assert blk.in_flight == 0
        blk.flush()
        assert sleeps["timed out"] == 0, sleeps  # a lost wake-up sleeps until the timeout
    assert qsd.image.read_bytes() == expected


def test_blk_driver_polling_against_pyvirtio_back_end(sock_path: Path, tmp_path: Path) -> None:
    """The same against pyvirtio's back end in a thread of this process (it
    runs only when the driver sleeps, since spinning holds the GIL)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(256 * 1024))
    with (
        Block(image) as device,
        served(device, sock_path),
        VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend,
    ):
        blk = BlkDriver(frontend, timeout=TIMEOUT, poll_us=20)
        sleeps = _count_sleeps(frontend)
        expected = _random_io(blk, 400, 8, seed=7)
        blk.flush()
        assert sleeps["timed out"] == 0, sleeps
    assert image.read_bytes() == expected


@needs_qsd
def test_qsd_killed_mid_session_raises_instead_of_hanging(qsd: Daemon) -> None:
    frontend = VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT)
    try:
        frontend.initialize(Feature.VERSION_1.mask)
        frontend.setup_queue(0, 16)
        frontend.driver_ok()
        qsd.process.send_signal(signal.SIGKILL)
        qsd.process.wait(TIMEOUT)
        start = time.monotonic()
        with pytest.raises(VhostUserError, match=r"closed the connection|gone"):
            frontend.wait_interrupt(TIMEOUT)
        with pytest.raises(VhostUserError):
            frontend.read_config(0, 8)
        assert time.monotonic() - start < TIMEOUT
    finally:
        frontend.close()


@needs_qsd
def test_qsd_reset_and_reinitialize(qsd: Daemon) -> None:
    with VhostUserFrontend(qsd.socket, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
        for _ in range(2):
            frontend.initialize(Feature.VERSION_1.mask)
            frontend.setup_queue(0, 8)
            frontend.driver_ok()
            status, data = _blk_request(frontend, RequestType.IN, 3, SECTOR)
            assert status == Status.OK and data == bytes([3]) * SECTOR


# -- back ends that misbehave ---------------------------------------------------------------


def fake_backend(path: Path, script: Callable[[socket.socket], None]) -> threading.Thread:
    """A one-connection server running ``script`` on the accepted socket."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(TIMEOUT)

    def run() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        finally:
            server.close()
        with conn:
            conn.settimeout(TIMEOUT)
            script(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _hang_up(conn: socket.socket) -> None:
    conn.recv(12)


def _silent(conn: socket.socket) -> None:
    conn.recv(12)
    time.sleep(1.0)


def _wrong_request(conn: socket.socket) -> None:
    conn.recv(12)
    conn.sendall(encode(Message(FrontendRequest.GET_QUEUE_NUM, 1, VERSION | FLAG_REPLY)))
    time.sleep(0.5)


def _garbage(conn: socket.socket) -> None:
    conn.recv(12)
    conn.sendall(
        struct.pack("<III", FrontendRequest.GET_FEATURES, VERSION | FLAG_REPLY, 3) + b"abc"
    )
    time.sleep(0.5)


def _not_a_reply(conn: socket.socket) -> None:
    conn.recv(12)
    conn.sendall(encode(Message(FrontendRequest.GET_FEATURES)))
    time.sleep(0.5)


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (_hang_up, "closed the connection"),
        (_silent, "no reply to GET_FEATURES"),
        (_wrong_request, "answered GET_QUEUE_NUM to GET_FEATURES"),
        (_garbage, "malformed reply"),
        (_not_a_reply, "malformed reply"),
    ],
    ids=["hang up", "silent", "wrong request", "garbage", "request instead of reply"],
)
def test_misbehaving_back_end_raises(
    sock_path: Path, script: Callable[[socket.socket], None], match: str
) -> None:
    thread = fake_backend(sock_path, script)
    start = time.monotonic()
    with pytest.raises(VhostUserError, match=match):
        VhostUserFrontend(sock_path, timeout=0.3)
    assert time.monotonic() - start < 2
    thread.join(TIMEOUT)


def test_no_back_end_listening(sock_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(VhostUserError, match="cannot connect"):
        VhostUserFrontend(sock_path, timeout=0.2)
    assert time.monotonic() - start < 2


def test_refused_features_and_bounded_interrupt_wait(sock_path: Path) -> None:
    with (
        served(Entropy(), sock_path),
        VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY, timeout=0.5) as frontend,
    ):
        with pytest.raises(FeatureNegotiationError):
            frontend.initialize(0)  # no VERSION_1: the device refuses
        frontend.initialize(Feature.VERSION_1.mask)
        frontend.setup_queue(0, 8)
        frontend.driver_ok()
        assert frontend.wait_interrupt(0.05) == 0  # nothing to say: 0 on timeout
        start = time.monotonic()
        with pytest.raises(VhostUserError, match="no interrupt"):
            frontend.wait_interrupt(None)  # bounded by the front end's timeout
        with pytest.raises(VhostUserError, match="nothing used"):
            frontend.wait_used(0, 0.05)
        assert time.monotonic() - start < 2
