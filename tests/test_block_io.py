"""virtio-blk host I/O: FileBackend on real files (probing, short transfers,
O_DIRECT bounce, host failures), through the device."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.block import (
    DISK_SIZE,
    SECTOR,
    Rig,
    header,
    make_rig,
    pattern,
    segment,
)
from pyvirtio.devices.block import (
    BlkFeature,
    Block,
    RequestType,
    Status,
)
from pyvirtio.devices.block import io as block_io


def test_block_device_backing(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host block device: capacity and topology come from its ioctls, not st_size."""
    u64 = {block_io._BLKGETSIZE64: 8 << 30}
    u32 = {block_io._BLKSSZGET: 4096, block_io._BLKPBSZGET: 4096, block_io._BLKIOOPT: 1 << 20}
    monkeypatch.setattr(block_io.stat, "S_ISBLK", lambda mode: True)
    monkeypatch.setattr(block_io, "_ioctl_u64", lambda fd, request: u64[request])
    monkeypatch.setattr(block_io, "_ioctl_u32", lambda fd, request: u32[request])
    with Block(image) as dev:
        cfg = dev.config()
        assert cfg.capacity == (8 << 30) // SECTOR
        assert dev.offered_features & BlkFeature.TOPOLOGY.mask
        assert cfg.physical_block_exp == 3
        assert cfg.opt_io_size == (1 << 20) // SECTOR
    with pytest.raises(ValueError, match="logical_block_size >= 4096"):
        Block(image, direct=True)
    with Block(image, logical_block_size=4096) as dev:
        assert dev.config().physical_block_exp == 0
        assert dev.config().opt_io_size == 256


def test_failing_preadv_is_ioerr(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(image)

    def fail(*args: object) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "preadv", fail)
    data, written = rig.run([header(RequestType.IN, 0)], [SECTOR, 1])
    assert written == SECTOR + 1
    assert data == bytes(SECTOR) + bytes([Status.IOERR])
    monkeypatch.undo()
    assert rig.read(0, SECTOR) == pattern(SECTOR)
    assert rig.device.io_errors == 1


def test_fd_that_cannot_write(image: Path) -> None:
    """A descriptor opened read-only under a writable device: reads work, writes fail."""
    fd = os.open(image, os.O_RDONLY)
    try:
        rig = make_rig(fd)
        assert rig.read(1, SECTOR) == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]
        assert rig.write(0, bytes(SECTOR)) == Status.IOERR
        assert rig.status([header(RequestType.WRITE_ZEROES), segment(0, 1)]) == Status.IOERR
        assert rig.read(0, SECTOR) == pattern(SECTOR)
    finally:
        os.close(fd)
    assert image.read_bytes() == pattern(DISK_SIZE)


def test_fd_replaced_underneath(image: Path) -> None:
    """Every host call failing (an O_PATH descriptor dup'ed over the device's):
    every request is IOERR, nothing raises, and service resumes when it is back."""
    dev = Block(image)
    rig = Rig(dev)
    saved = os.dup(dev.fd)
    opath = os.open(image, os.O_PATH)
    try:
        os.dup2(opath, dev.fd)
        assert rig.status([header(RequestType.IN)], [SECTOR, 1]) == Status.IOERR
        assert rig.write(0, bytes(SECTOR)) == Status.IOERR
        assert rig.status([header(RequestType.FLUSH)]) == Status.IOERR
        assert rig.status([header(RequestType.WRITE_ZEROES), segment(0, 1)]) == Status.IOERR
        assert rig.status([header(RequestType.GET_ID)], [20, 1]) == Status.OK
        os.dup2(saved, dev.fd)
        assert rig.read(0, SECTOR) == pattern(SECTOR)
    finally:
        os.close(opath)
        os.close(saved)
    assert dev.io_errors == 4
    dev.close()


def test_read_past_end_of_file_zero_fills(image: Path) -> None:
    rig = make_rig(image)
    os.truncate(image, 10 * SECTOR + 100)  # shrinks under the device
    data = rig.read(9, 4 * SECTOR)
    assert data == pattern(DISK_SIZE)[9 * SECTOR : 10 * SECTOR + 100] + bytes(3 * SECTOR - 100)


def test_short_transfers_are_continued(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short_preadv(fd: int, views: list[memoryview], offset: int) -> int:
        return real_preadv(fd, [views[0][:100]], offset)

    def short_pwritev(fd: int, views: list[memoryview], offset: int) -> int:
        return real_pwritev(fd, [views[0][:77]], offset)

    rig = make_rig(image)
    data = pattern(4 * SECTOR, 42)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    assert rig.status([header(RequestType.OUT, 8), data[:1000], data[1000:]]) == Status.OK
    monkeypatch.setattr(os, "preadv", short_preadv)
    assert rig.read(8, 4 * SECTOR) == data
    monkeypatch.undo()
    assert image.read_bytes()[8 * SECTOR : 12 * SECTOR] == data


def test_pwritev_writing_nothing_is_ioerr(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, views, offset: 0)
    rig = make_rig(image)
    assert rig.write(0, bytes(SECTOR)) == Status.IOERR


def test_more_views_than_iov_max(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_io, "_IOV_MAX", 3)
    backend = block_io.FileBackend(image)
    try:
        buf = bytearray(10 * SECTOR)
        views = [memoryview(buf)[i * SECTOR : (i + 1) * SECTOR] for i in range(10)]
        backend.read_into(views, SECTOR, 10 * SECTOR)
        assert bytes(buf) == pattern(DISK_SIZE)[SECTOR : 11 * SECTOR]
        new = pattern(10 * SECTOR, 77)
        buf[:] = new
        backend.write_from(views, 0, 10 * SECTOR)
    finally:
        backend.close()
    assert image.read_bytes()[: 10 * SECTOR] == new


def test_direct_io(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_DIRECT, with guest buffers at odd addresses; where the kernel refuses a
    buffer (EINVAL: alignment) the data goes through an aligned bounce buffer."""
    try:
        dev = Block(image, direct=True)
    except OSError as exc:  # a file system without O_DIRECT (tmpfs before 6.6)
        pytest.skip(f"O_DIRECT not supported here: {exc}")
    bounced: list[int] = []
    real_bounce = block_io._bounce_buffer

    def counting(size: int) -> object:
        bounced.append(size)
        return real_bounce(size)

    monkeypatch.setattr(block_io, "_bounce_buffer", counting)
    rig = Rig(dev)
    mem, alloc, queue = rig.rig.mem, rig.rig.alloc, rig.rig.driver_queues[0]
    hdr = alloc.alloc(16)
    status = alloc.alloc(1)
    data = alloc.alloc(4 * 4096, 4096)

    def round_trip(shift: int, seed: int) -> None:
        payload = pattern(2 * SECTOR, seed)
        mem.write(data + shift, payload)
        mem.write(hdr, header(RequestType.OUT, 2))
        queue.add([(hdr, 16), (data + shift, 2 * SECTOR)], [(status, 1)], "w")
        dev.queue_notify(0)
        assert rig.rig.used(0) == [("w", 1)]
        assert mem.read_u8(status) == Status.OK
        mem.fill(data, 4 * 4096)
        mem.write(hdr, header(RequestType.IN, 2))
        queue.add([(hdr, 16)], [(data + 4096 + shift, 2 * SECTOR), (status, 1)], "r")
        dev.queue_notify(0)
        assert rig.rig.used(0) == [("r", 2 * SECTOR + 1)]
        assert mem.read_u8(status) == Status.OK
        assert mem.read(data + 4096 + shift, 2 * SECTOR) == payload

    round_trip(0, 1)
    round_trip(1, 2)  # the kernel may or may not accept this one as is
    # Force the refusal: the first call on guest views fails with EINVAL.
    for name in ("preadv", "pwritev"):
        real = getattr(os, name)
        refused: list[int] = []

        def refuse_once(
            fd: int,
            views: list[memoryview],
            offset: int,
            real: Callable[[int, list[memoryview], int], int] = real,
            refused: list[int] = refused,
        ) -> int:
            if not refused:
                refused.append(offset)
                raise OSError(errno.EINVAL, "misaligned")
            return real(fd, views, offset)

        monkeypatch.setattr(os, name, refuse_once)
    bounced.clear()
    round_trip(8, 3)
    assert bounced == [2 * SECTOR, 2 * SECTOR]
    dev.close()
    assert image.read_bytes()[2 * SECTOR : 4 * SECTOR] == pattern(2 * SECTOR, 3)


@pytest.mark.parametrize("name", ["preadv", "pwritev"])
def test_direct_io_refused_through_the_bounce_buffer_too(
    image: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL on the aligned retry as well is the request's error: one retry, no loop."""
    calls: list[int] = []

    def refuse(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(offset)
        raise OSError(errno.EINVAL, "misaligned")

    monkeypatch.setattr(os, name, refuse)
    fd = os.open(image, os.O_RDWR)
    backend = block_io.FileBackend(fd, direct=True)  # the caller's fd: bounce on EINVAL
    transfer = backend.read_into if name == "preadv" else backend.write_from
    try:
        with pytest.raises(OSError) as raised:
            transfer([memoryview(bytearray(SECTOR))], 2 * SECTOR, SECTOR)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EINVAL
    assert calls == [2 * SECTOR, 2 * SECTOR]


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_falls_back_to_writing(
    image: Path, unmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(block_io, "fallocate", refuse)
    monkeypatch.setattr(block_io, "_ZERO_CHUNK", 1024)  # several pwrite calls
    rig = make_rig(image)
    status = rig.status([header(RequestType.WRITE_ZEROES), segment(2, 7, int(unmap))])
    assert status == Status.OK
    assert len(modes) == (2 if unmap else 1)
    expected = bytearray(pattern(DISK_SIZE))
    expected[2 * SECTOR : 9 * SECTOR] = bytes(7 * SECTOR)
    assert image.read_bytes() == bytes(expected)
    # Discard with no hole punching is a successful no-op.
    assert rig.status([header(RequestType.DISCARD), segment(2, 7)]) == Status.OK


def test_write_zeroes_host_error_is_ioerr(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(block_io, "fallocate", broken)
    rig = make_rig(image)
    assert rig.status([header(RequestType.WRITE_ZEROES), segment(2, 7)]) == Status.IOERR
    assert rig.status([header(RequestType.DISCARD), segment(2, 7)]) == Status.IOERR
    assert rig.read(0, SECTOR) == pattern(SECTOR)  # still serving


def test_a_failing_disk_is_logged_once_per_kind(
    image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(image)

    def fail(*args: object) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "preadv", fail)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert rig.status([header(RequestType.IN, 0)], [SECTOR, 1]) == Status.IOERR
    assert rig.device.io_errors == 5
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
