"""BlkDriver end to end: BlkDriver -> MmioDriverTransport -> InProcessBus ->
MmioTransport -> Block, over real files, with split and packed rings."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.constants import Feature
from pyvirtio.devices.block import BlkFeature, Block, RequestType
from pyvirtio.driver.blk import BlkDriver, BlkError, QueueFullError
from pyvirtio.testing import MmioTestRig

SECTOR = 512
DISK_SIZE = 4 << 20


def pattern(length: int, seed: int = 1) -> bytes:
    period = bytes((i * 13 + seed) & 0xFF for i in range(256))
    return (period * (length // 256 + 1))[:length]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SIZE))
    return path


class Setup:
    def __init__(self, device: Block, **driver: object) -> None:
        self.device = device
        self.rig = MmioTestRig(device)
        self.driver = BlkDriver(self.rig.driver, **driver)  # type: ignore[arg-type]


@pytest.fixture
def setup(image: Path) -> Iterator[Setup]:
    s = Setup(Block(image, serial="e2e-serial"))
    yield s
    s.device.close()


# -- end to end over every ring variant -----------------------------------------------------

RING_VARIANTS = [
    pytest.param(packed, event_idx, indirect, id=f"{name}-evidx{int(event_idx)}-ind{int(indirect)}")
    for name, packed in (("split", False), ("packed", True))
    for event_idx in (False, True)
    for indirect in (False, True)
]


@pytest.mark.parametrize(("packed", "event_idx", "indirect"), RING_VARIANTS)
def test_end_to_end(image: Path, packed: bool, event_idx: bool, indirect: bool) -> None:
    s = Setup(Block(image, serial="ring"), packed=packed, event_idx=event_idx, indirect=indirect)
    drv = s.driver
    assert drv.has(Feature.RING_PACKED) is packed
    assert drv.has(Feature.EVENT_IDX) is event_idx
    assert drv.has(Feature.INDIRECT_DESC) is indirect
    assert drv.capacity == DISK_SIZE // SECTOR
    assert drv.block_size == SECTOR
    expected = bytearray(pattern(DISK_SIZE))
    rng = random.Random(f"{packed}{event_idx}{indirect}")
    for i in range(30):
        offset = rng.randrange(0, DISK_SIZE // SECTOR - 16) * SECTOR
        length = rng.randint(1, 16) * SECTOR
        data = pattern(length, i)
        drv.write(offset, data)
        expected[offset : offset + length] = data
        assert drv.read(offset, length) == data
    # Scatter-gather through caller buffers.
    bufs = [drv.alloc_buffer(n) for n in (SECTOR, 3 * SECTOR, 2 * SECTOR)]
    for i, buf in enumerate(bufs):
        buf.view[:] = pattern(buf.length, 100 + i)
    drv.writev(8 * SECTOR, [(b.addr, b.length) for b in bufs])
    joined = b"".join(bytes(b.view) for b in bufs)
    expected[8 * SECTOR : 14 * SECTOR] = joined
    for buf in bufs:
        buf.view[:] = bytes(buf.length)
    drv.readv(8 * SECTOR, [(b.addr, b.length) for b in bufs])
    assert b"".join(bytes(b.view) for b in bufs) == joined
    for buf in bufs:
        drv.free_buffer(buf)
    drv.write_zeroes(64 * SECTOR, 8 * SECTOR)
    drv.write_zeroes(80 * SECTOR, 8 * SECTOR, unmap=True)
    expected[64 * SECTOR : 72 * SECTOR] = bytes(8 * SECTOR)
    expected[80 * SECTOR : 88 * SECTOR] = bytes(8 * SECTOR)
    drv.flush()
    assert drv.get_id() == "ring"
    assert drv.read(0, DISK_SIZE) == bytes(expected)  # several max_transfer requests
    assert image.read_bytes() == bytes(expected)
    drv.discard(96 * SECTOR, 8 * SECTOR)  # contents undefined afterwards
    assert drv.in_flight == 0
    assert not s.rig.driver.needs_reset
    s.device.close()


def test_queue_depth_32_with_one_kick(setup: Setup) -> None:
    drv = setup.driver
    bufs = [drv.alloc_buffer(4096) for _ in range(32)]
    offsets = random.Random(3).sample(range(DISK_SIZE // 4096), 32)
    tokens = {
        drv.submit_read(off * 4096, buf.addr, 4096, kick=False): (off, buf)
        for off, buf in zip(offsets, bufs, strict=True)
    }
    assert drv.poll() == []  # nothing was kicked yet
    assert drv.in_flight == 32
    drv.kick()
    done = drv.wait(32, timeout=5)
    assert sorted(t for t, _ in done) == sorted(tokens)
    assert all(result == 0 for _, result in done)
    disk = pattern(DISK_SIZE)
    for token, _ in done:
        off, buf = tokens[token]
        assert bytes(buf.view) == disk[off * 4096 : off * 4096 + 4096]
    assert drv.in_flight == 0


def test_queue_full(image: Path) -> None:
    s = Setup(Block(image), queue_size=4, indirect=False)
    drv = s.driver
    buf = drv.alloc_buffer(SECTOR)
    drv.submit_read(0, buf.addr, SECTOR, kick=False)  # 3 descriptors of 4
    with pytest.raises(QueueFullError):
        drv.submit_read(0, buf.addr, SECTOR, kick=False)
    drv.kick()
    assert [r for _, r in drv.wait()] == [0]
    drv.submit_flush()
    assert [r for _, r in drv.wait()] == [0]
    s.device.close()


def test_blocking_helper_waits_for_room(image: Path) -> None:
    s = Setup(Block(image), queue_size=4, indirect=False)
    drv = s.driver
    buf = drv.alloc_buffer(SECTOR)
    early = drv.submit_read(SECTOR, buf.addr, SECTOR, kick=False)
    assert drv.read(0, SECTOR) == pattern(SECTOR)  # kicked the queue to make room
    assert drv.poll() == [(early, 0)]
    assert bytes(buf.view) == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]
    s.device.close()


def test_timeout(image: Path) -> None:
    s = Setup(Block(image), timeout=0.05)
    drv = s.driver
    s.rig.transport.sleep()  # notifications are ignored while asleep
    with pytest.raises(BlkError) as info:
        drv.read(0, SECTOR)
    assert info.value.errno == errno.ETIMEDOUT
    assert drv.in_flight == 1
    s.rig.transport.wake()  # serves what was posted meanwhile
    assert [r for _, r in drv.wait(1, timeout=1)] == [0]
    assert drv.read(SECTOR, SECTOR) == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]
    s.device.close()


def test_multiqueue(image: Path) -> None:
    s = Setup(Block(image, num_queues=4), num_queues=8)
    drv = s.driver
    assert drv.has(BlkFeature.MQ)
    assert drv.num_queues == 4  # capped by the device's num_queues
    buf = drv.alloc_buffer(SECTOR)
    for q in range(4):
        drv.write(q * SECTOR, pattern(SECTOR, q), queue=q)
    tokens = [drv.submit_read(q * SECTOR, buf.addr, SECTOR, queue=q) for q in range(1)]
    assert drv.wait(1)[0] == (tokens[0], 0)
    for q in range(4):
        assert drv.read(q * SECTOR, SECTOR, queue=(q + 1) % 4) == pattern(SECTOR, q)
    with pytest.raises(ValueError, match="no queue 4"):
        drv.read(0, SECTOR, queue=4)
    s.device.close()
    # A single-queue device: MQ is not offered, one queue.
    s = Setup(Block(image), num_queues=3)
    assert s.driver.num_queues == 1
    assert not s.driver.has(BlkFeature.MQ)
    s.device.close()


def test_large_block_size(image: Path) -> None:
    s = Setup(Block(image, logical_block_size=4096))
    drv = s.driver
    assert drv.block_size == 4096
    with pytest.raises(ValueError, match="block size 4096"):
        drv.read(512, 4096)
    with pytest.raises(ValueError, match="block size 4096"):
        drv.write(0, bytes(512))
    drv.write(4096, pattern(8192, 5))
    assert drv.read(4096, 8192) == pattern(8192, 5)
    s.device.close()


# -- validation before sending --------------------------------------------------------------


def test_invalid_requests_are_refused_before_sending(setup: Setup) -> None:
    drv, dev = setup.driver, setup.device
    before = dev.requests
    buf = drv.alloc_buffer(4096)
    cases = [
        lambda: drv.read(1, SECTOR),
        lambda: drv.read(0, 100),
        lambda: drv.read(-SECTOR, SECTOR),
        lambda: drv.read(DISK_SIZE, SECTOR),
        lambda: drv.read(DISK_SIZE - SECTOR, 2 * SECTOR),
        lambda: drv.write(DISK_SIZE, bytes(SECTOR)),
        lambda: drv.write(0, bytes(SECTOR + 1)),
        lambda: drv.submit_read(0, buf.addr, 100),
        lambda: drv.submit_read(0, 1 << 40, SECTOR),  # not guest memory
        lambda: drv.submit_writev(SECTOR, [(buf.addr, 256), (buf.addr, 100)]),
        lambda: drv.submit_readv(0, [(buf.addr, 8)] * (drv.seg_max + 1)),  # seg_max
        lambda: drv.discard(SECTOR, 100),
        lambda: drv.write_zeroes(DISK_SIZE - SECTOR, 2 * SECTOR),
        lambda: drv.submit_discard(0, 0),
        lambda: drv.submit_get_id(1 << 40),
        lambda: drv.submit_flush(queue=1),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
    assert dev.requests == before
    assert drv.in_flight == 0


def test_read_only_device(image: Path) -> None:
    s = Setup(Block(image, read_only=True))
    drv = s.driver
    assert drv.read_only
    before = s.device.requests
    for call in (
        lambda: drv.write(0, bytes(SECTOR)),
        lambda: drv.discard(0, SECTOR),
        lambda: drv.write_zeroes(0, SECTOR),
    ):
        with pytest.raises(BlkError) as info:
            call()
        assert info.value.errno == errno.EROFS
    assert s.device.requests == before
    assert drv.read(0, SECTOR) == pattern(SECTOR)
    drv.flush()
    assert image.read_bytes() == pattern(DISK_SIZE)
    s.device.close()


def test_commands_not_offered(image: Path) -> None:
    s = Setup(Block(image, discard=False, write_zeroes=False))
    drv = s.driver
    for call in (lambda: drv.discard(0, SECTOR), lambda: drv.write_zeroes(0, SECTOR)):
        with pytest.raises(BlkError) as info:
            call()
        assert info.value.errno == errno.ENOTSUP
    s.device.close()


# -- errors from the device ------------------------------------------------------------------


def test_ioerr_becomes_eio(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    drv = setup.driver

    def fail(*args: object) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(BlkError) as info:
        drv.read(0, SECTOR)
    assert info.value.errno == errno.EIO
    assert "read at offset 0" in str(info.value)
    buf = drv.alloc_buffer(SECTOR)
    token = drv.submit_read(0, buf.addr, SECTOR)
    assert drv.wait() == [(token, -errno.EIO)]
    monkeypatch.undo()
    assert drv.read(0, SECTOR) == pattern(SECTOR)  # the device kept serving


def test_unsupp_becomes_enotsup(setup: Setup) -> None:
    drv = setup.driver
    # No public API sends GET_LIFETIME (the device does not offer LIFETIME).
    token = drv._submit(0, RequestType.GET_LIFETIME, 0, (), [], "lifetime", 0, True)
    assert drv.wait() == [(token, -errno.ENOTSUP)]


def test_write_failure_raises(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)  # writes on it fail with EBADF
    s = Setup(Block(fd))
    with pytest.raises(BlkError) as info:
        s.driver.write(0, bytes(SECTOR))
    assert info.value.errno == errno.EIO
    assert s.driver.read(0, SECTOR) == pattern(SECTOR)
    os.close(fd)


# -- cache modes --------------------------------------------------------------------------------


def test_writeback_switch(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    drv, dev = setup.driver, setup.device
    assert drv.writeback and dev.writeback
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    drv.write(0, bytes(SECTOR))
    assert syncs == []
    drv.flush()
    assert len(syncs) == 1
    drv.set_writeback(False)
    assert not dev.writeback
    assert not drv.writeback
    drv.write(0, bytes(SECTOR))
    assert len(syncs) == 2
    drv.set_writeback(True)
    assert dev.writeback


def test_flush_without_flush_feature_is_local(image: Path) -> None:
    dev = Block(image)
    rig = MmioTestRig(dev)
    # A transport wrapper that hides FLUSH and CONFIG_WCE from the offer.
    initialize = rig.driver.initialize
    hidden = BlkFeature.FLUSH.mask | BlkFeature.CONFIG_WCE.mask
    rig.driver.initialize = lambda wanted: initialize(wanted & ~hidden)  # type: ignore[method-assign]
    drv = BlkDriver(rig.driver)
    assert not drv.has(BlkFeature.FLUSH)
    assert not dev.writeback  # stability case 1: writes are synced
    before = dev.requests
    drv.flush()
    assert dev.requests == before
    dev.close()


def test_capacity_change(setup: Setup, image: Path) -> None:
    os.truncate(image, 2 * DISK_SIZE)
    assert setup.device.refresh_capacity()
    assert setup.rig.driver.wait_interrupt(1) & 2  # configuration change
    assert setup.driver.refresh_capacity() == 2 * DISK_SIZE // SECTOR
    setup.driver.write(DISK_SIZE, bytes(SECTOR))


# -- durability across SIGKILL ------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pyvirtio.devices.block import Block
    from pyvirtio.driver.blk import BlkDriver
    from pyvirtio.testing import MmioTestRig

    path, mode = sys.argv[1], sys.argv[2]
    device = Block(path, cache="writethrough" if mode == "writethrough" else "writeback")
    driver = BlkDriver(MmioTestRig(device).driver)
    data = bytes(range(256)) * 1024
    for i in range(4):
        driver.write(i * len(data), data)
    if mode == "flush":
        driver.flush()
    sys.stdout.write("done\\n")
    sys.stdout.flush()
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["flush", "writethrough"])
def test_completed_writes_survive_sigkill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "durable.img"
    path.write_bytes(bytes(2 << 20))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"done\n", line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert data[: 1 << 20] == bytes(range(256)) * 4096
    assert data[1 << 20 :] == bytes(1 << 20)
