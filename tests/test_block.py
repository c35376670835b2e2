"""virtio-blk device model: requests on device queues driven directly, no transport.

Each test plays the driver on a ring pair (``queue_harness.DirectRig``) and
builds request chains by hand, so malformed requests a real driver would
refuse to send can be made too.  Backing files are real files in tmp_path.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import DeviceState
from pyvirtio.devices import block
from pyvirtio.devices.block import (
    CONFIG_SIZE,
    CONFIG_WRITEBACK_OFFSET,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    BlkFeature,
    Block,
    RequestType,
    Status,
    unpack_config,
)
from pyvirtio.workers import IoWorkers
from queue_harness import RING_BASE, DirectRig

SECTOR = 512
DISK_SIZE = 1 << 20  # 2048 sectors


# -- helpers -------------------------------------------------------------------------------


def header(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("<IIQ", req_type, reserved, sector)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def pattern(length: int, seed: int = 1) -> bytes:
    """Deterministic non-zero-looking bytes: ``(i * 7 + seed) mod 256``."""
    period = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (period * (length // 256 + 1))[:length]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SIZE))
    return path


class Rig:
    """A Block device on DirectRig queues, with request helpers."""

    def __init__(self, device: Block, *, features: int | None = None, **rig: object) -> None:
        self.device = device
        self.rig = DirectRig(device, features=features, **rig)  # type: ignore[arg-type]
        self.rig.activate()

    def request(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int],
        *,
        queue: int = 0,
        notify: bool = True,
    ) -> tuple[list[tuple[int, int]], object]:
        token = object()
        wr = self.rig.post(queue, readable, writable, token, notify=notify)
        return wr, token

    def run(
        self, readable: Sequence[bytes], writable: Sequence[int], *, queue: int = 0
    ) -> tuple[bytes, int]:
        """Post one request, return (the writable bytes, used length)."""
        wr, token = self.request(readable, writable, queue=queue)
        used = self.rig.used(queue)
        assert len(used) == 1, used
        assert used[0][0] is token
        written = used[0][1]
        return self.rig.mem.readv(wr), written

    def status(self, readable: Sequence[bytes], writable: Sequence[int] = (1,)) -> int:
        data, written = self.run(readable, writable)
        assert written == sum(writable)
        return data[-1]

    def read(self, sector: int, length: int) -> bytes:
        data, written = self.run([header(RequestType.IN, sector)], [length, 1])
        assert data[-1] == Status.OK
        assert written == length + 1
        return data[:-1]

    def write(self, sector: int, data: bytes) -> int:
        return self.status([header(RequestType.OUT, sector), data])


def make_rig(path: Path | int, features: int | None = None, **options: object) -> Rig:
    return Rig(Block(path, **options), features=features)  # type: ignore[arg-type]


# -- identity, features, configuration -----------------------------------------------------


def test_identity_and_offer(image: Path) -> None:
    dev = Block(image)
    assert dev.device_id is DeviceId.BLOCK
    assert dev.num_queues == 1
    offered = dev.offered_features
    for bit in (
        BlkFeature.SIZE_MAX,
        BlkFeature.SEG_MAX,
        BlkFeature.BLK_SIZE,
        BlkFeature.FLUSH,
        BlkFeature.CONFIG_WCE,
        BlkFeature.DISCARD,
        BlkFeature.WRITE_ZEROES,
    ):
        assert offered & bit.mask, bit
    for bit in (BlkFeature.RO, BlkFeature.MQ, BlkFeature.GEOMETRY, BlkFeature.LIFETIME):
        assert not offered & bit.mask, bit
    assert offered & Feature.VERSION_1.mask
    assert offered & Feature.RING_PACKED.mask
    dev.close()


def test_config_layout_is_the_spec_struct(image: Path) -> None:
    dev = Block(image, logical_block_size=4096, num_queues=3, queue_size=128)
    dev.ack_features(dev.offered_features)
    raw = dev.read_config(0, CONFIG_SIZE)
    assert len(raw) == CONFIG_SIZE == 96

    def field(offset: int, fmt: str) -> int:
        value: int = struct.unpack_from("<" + fmt, raw, offset)[0]
        return value

    assert field(0, "Q") == DISK_SIZE // SECTOR  # capacity, in 512-byte sectors
    assert field(8, "I") == block.DEFAULT_SIZE_MAX  # size_max
    assert field(12, "I") == 126  # seg_max: queue size minus header and status
    assert field(16, "I") == 0  # geometry (not offered)
    assert field(20, "I") == 4096  # blk_size
    assert field(32, "B") == 1  # writeback (FLUSH negotiated, cache=writeback)
    assert field(33, "B") == 0  # unused0
    assert field(34, "H") == 3  # num_queues
    assert field(36, "I") == MAX_DISCARD_SECTORS
    assert field(40, "I") == MAX_DISCARD_SEG
    assert field(48, "I") == MAX_WRITE_ZEROES_SECTORS
    assert field(52, "I") == block.MAX_WRITE_ZEROES_SEG
    assert field(56, "B") == 1  # write_zeroes_may_unmap
    assert raw[57:60] == bytes(3)  # unused1
    assert raw[60:] == bytes(36)  # secure erase and zoned: not offered
    assert unpack_config(raw) == dev.config()
    assert dev.offered_features & BlkFeature.MQ.mask
    dev.close()


def test_topology_from_file_system_block_size(image: Path) -> None:
    dev = Block(image)
    cfg = dev.config()
    blksize = os.stat(image).st_blksize
    if blksize > SECTOR:
        assert dev.offered_features & BlkFeature.TOPOLOGY.mask
        assert SECTOR << cfg.physical_block_exp == blksize
        assert cfg.min_io_size == blksize // SECTOR
        assert cfg.discard_sector_alignment == blksize // SECTOR
    dev.close()
    # A logical block as large as the physical one: nothing to report.
    dev = Block(image, logical_block_size=max(blksize, SECTOR))
    assert not dev.offered_features & BlkFeature.TOPOLOGY.mask
    dev.close()


def test_block_device_backing(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host block device: capacity and topology come from its ioctls, not st_size."""
    u64 = {block._BLKGETSIZE64: 8 << 30}
    u32 = {block._BLKSSZGET: 4096, block._BLKPBSZGET: 4096, block._BLKIOOPT: 1 << 20}
    monkeypatch.setattr(block.stat, "S_ISBLK", lambda mode: True)
    monkeypatch.setattr(block, "_ioctl_u64", lambda fd, request: u64[request])
    monkeypatch.setattr(block, "_ioctl_u32", lambda fd, request: u32[request])
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


def test_capacity_rounds_down_to_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * SECTOR + 100))
    with Block(path) as dev:
        assert dev.capacity == 3


def test_read_only_offer(image: Path) -> None:
    with Block(image, read_only=True) as dev:
        offered = dev.offered_features
        assert offered & BlkFeature.RO.mask
        assert not offered & (BlkFeature.DISCARD.mask | BlkFeature.WRITE_ZEROES.mask)
        dev.ack_features(offered)
        assert not dev.writeback


def test_constructor_validation(image: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="serial"):
        Block(image, serial="x" * 21)
    with pytest.raises(ValueError, match="ASCII"):
        Block(image, serial="d\u00e9j\u00e0")
    with pytest.raises(ValueError, match="logical_block_size"):
        Block(image, logical_block_size=1000)
    with pytest.raises(ValueError, match="cache"):
        Block(image, cache="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_queues"):
        Block(image, num_queues=0)
    with pytest.raises(ValueError, match="regular file or a block device"):
        Block("/dev/null")
    with pytest.raises(FileNotFoundError):
        Block(tmp_path / "missing.img")


def test_cache_mode_follows_negotiation(image: Path) -> None:
    dev = Block(image)
    offered = dev.offered_features
    flush, wce = BlkFeature.FLUSH.mask, BlkFeature.CONFIG_WCE.mask
    dev.ack_features(offered)
    assert dev.writeback
    # CONFIG_WCE without FLUSH: writeback MUST start at 0.
    dev.ack_features(offered & ~flush)
    assert not dev.writeback
    assert dev.read_config(CONFIG_WRITEBACK_OFFSET, 1) == b"\0"
    # Neither: FLUSH was offered but not negotiated, so writes are stable
    # on completion (stability case 1).
    dev.ack_features(offered & ~flush & ~wce)
    assert not dev.writeback
    dev.close()
    with Block(image, cache="writethrough") as dev:
        dev.ack_features(dev.offered_features)
        assert not dev.writeback


def test_config_wce_toggle(image: Path) -> None:
    dev = Block(image)
    dev.ack_features(dev.offered_features)
    dev.write_config(CONFIG_WRITEBACK_OFFSET, b"\0")
    assert not dev.writeback
    assert dev.read_config(CONFIG_WRITEBACK_OFFSET, 1) == b"\0"
    dev.write_config(CONFIG_WRITEBACK_OFFSET, b"\x01")
    assert dev.writeback
    # Other fields are read-only.
    dev.write_config(0, b"\xff" * 8)
    assert dev.capacity == DISK_SIZE // SECTOR
    # Without CONFIG_WCE the byte cannot be changed.
    dev.ack_features(dev.offered_features & ~BlkFeature.CONFIG_WCE.mask)
    assert dev.writeback
    dev.write_config(CONFIG_WRITEBACK_OFFSET, b"\0")
    assert dev.writeback
    dev.reset()
    dev.close()


# -- the request types ---------------------------------------------------------------------


def test_read_and_write_round_trip(image: Path) -> None:
    rig = make_rig(image)
    assert rig.read(0, 1024) == pattern(DISK_SIZE)[:1024]
    data = pattern(4096, seed=9)
    assert rig.write(10, data) == Status.OK
    assert rig.read(10, 4096) == data
    with open(image, "rb") as f:
        f.seek(10 * SECTOR)
        assert f.read(4096) == data
    # Last sector of the disk.
    last = DISK_SIZE // SECTOR - 1
    assert rig.write(last, b"\xaa" * SECTOR) == Status.OK
    assert rig.read(last, SECTOR) == b"\xaa" * SECTOR


def test_scatter_gather_and_split_header(image: Path) -> None:
    rig = make_rig(image)
    data = pattern(3 * SECTOR, seed=3)
    hdr = header(RequestType.OUT, 4)
    # Header split over two descriptors, data over three of odd sizes.
    status = rig.status([hdr[:5], hdr[5:], data[:100], data[100:1000], data[1000:]])
    assert status == Status.OK
    wr, _ = rig.request(
        [header(RequestType.IN, 4)[:9], header(RequestType.IN, 4)[9:]], [7, 1529, 1]
    )
    (_, written) = rig.rig.used(0)[0]
    assert written == 3 * SECTOR + 1
    got = rig.rig.mem.readv(wr)
    assert got[:-1] == data
    assert got[-1] == Status.OK


@pytest.mark.parametrize(
    ("packed_ring", "event_idx", "indirect"),
    [(False, True, True), (True, True, True), (True, False, False)],
)
def test_ring_variants(image: Path, packed_ring: bool, event_idx: bool, indirect: bool) -> None:
    rig = Rig(Block(image), packed_ring=packed_ring, event_idx=event_idx, indirect=indirect)
    for i in range(40):  # wraps the 16-entry rings
        data = pattern(SECTOR * 2, seed=i)
        assert rig.write(i * 2, data) == Status.OK
        assert rig.read(i * 2, SECTOR * 2) == data


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_fast_path_answers_as_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_only: bool
) -> None:
    """Block._plan_fast takes usual-shape IN/OUT requests: same answers as without it."""
    last = DISK_SIZE // SECTOR
    requests: list[tuple[list[bytes], list[int]]] = [
        ([header(RequestType.IN, 3)], [4096, 1]),  # usual read
        ([header(RequestType.IN, 3)], [100, 412, 1]),  # scattered read
        ([header(RequestType.OUT, 7), pattern(1024, seed=5)], [1]),  # usual write
        ([header(RequestType.OUT, 9), pattern(512), pattern(512, seed=2)], [1]),
        ([header(RequestType.IN, last - 1)], [1024, 1]),  # beyond capacity
        ([header(RequestType.OUT, last)], [1]),  # zero-length write at the end
        ([header(RequestType.IN, 0)], [100, 1]),  # not whole sectors
        ([header(RequestType.OUT, 0), b"x" * 512], [2]),  # OUT with writable data
        ([header(RequestType.IN, 0), b"x" * 512], [512, 1]),  # IN with readable data
        ([header(RequestType.IN, 0)], [512, 2]),  # status not alone
    ]
    outcomes = []
    for fast in (True, False):
        path = tmp_path / f"disk-{fast}.img"
        path.write_bytes(pattern(DISK_SIZE))
        if not fast:
            monkeypatch.setattr(Block, "_plan_fast", lambda self, chain: None)
        rig = make_rig(path, read_only=read_only)
        outcomes.append(
            ([rig.run(readable, writable) for readable, writable in requests], path.read_bytes())
        )
    assert outcomes[0] == outcomes[1]


def test_zero_length_read_and_write(image: Path) -> None:
    rig = make_rig(image)
    assert rig.status([header(RequestType.IN, 5)]) == Status.OK
    assert rig.status([header(RequestType.OUT, 5)]) == Status.OK


def test_flush_syncs(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(image)
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    assert rig.write(0, pattern(SECTOR)) == Status.OK
    assert calls == []  # writeback: writes are not synced
    assert rig.status([header(RequestType.FLUSH)]) == Status.OK
    assert calls == [rig.device.fd]
    # sector != 0 and data in a flush are tolerated (driver SHOULD/MUST, no harm).
    assert rig.status([header(RequestType.FLUSH, 7), b"x" * 16]) == Status.OK


def test_flush_failure_is_ioerr(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(image)

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", fail)
    assert rig.status([header(RequestType.FLUSH)]) == Status.IOERR
    monkeypatch.undo()
    assert rig.status([header(RequestType.FLUSH)]) == Status.OK


def test_writethrough_syncs_each_batch_before_completion(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(image, cache="writethrough")
    assert not rig.device.writeback
    events: list[str] = []
    real = os.fdatasync
    used_idx_seen: list[int] = []

    def fdatasync(fd: int) -> None:
        events.append("sync")
        # Nothing may have been completed yet.
        used_idx_seen.append(len(list(rig.rig.driver_queues[0].used())))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for i in range(5):
        rig.request([header(RequestType.OUT, i), pattern(SECTOR, i)], [1], notify=False)
    rig.device.queue_notify(0)
    assert events == ["sync"]  # one group commit for the batch
    assert used_idx_seen == [0]
    used = rig.rig.used(0)
    assert len(used) == 5
    assert rig.rig.interrupt.used == [0]
    # Reads do not sync.
    rig.read(0, SECTOR)
    assert events == ["sync"]


def test_writethrough_sync_failure_fails_the_writes(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(image, cache="writethrough")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", fail)
    wr1, _ = rig.request([header(RequestType.OUT, 0), pattern(SECTOR)], [1], notify=False)
    wr2, _ = rig.request([header(RequestType.IN, 0)], [SECTOR, 1], notify=False)
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 2
    assert rig.rig.mem.readv(wr1) == bytes([Status.IOERR])
    assert rig.rig.mem.readv(wr2)[-1] == Status.OK  # the read did not depend on the sync


def test_config_wce_switch_changes_sync_behaviour(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(image)
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    rig.write(0, pattern(SECTOR))
    assert calls == []
    rig.device.write_config(CONFIG_WRITEBACK_OFFSET, b"\0")
    rig.write(0, pattern(SECTOR))
    assert len(calls) == 1


def test_without_flush_negotiated_writes_are_synced(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = Block(image)
    features = dev.offered_features & ~BlkFeature.FLUSH.mask & ~BlkFeature.CONFIG_WCE.mask
    ring_bits = Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
    rig = Rig(dev, features=features & ~ring_bits)
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    rig.write(0, pattern(SECTOR))
    assert calls == [dev.fd]


def test_get_id(image: Path) -> None:
    rig = make_rig(image, serial="SN-1234")
    data, written = rig.run([header(RequestType.GET_ID)], [20, 1])
    assert written == 21
    assert data == b"SN-1234" + bytes(13) + bytes([Status.OK])
    # A 20-byte serial has no NUL terminator.
    rig = make_rig(image, serial="A" * 20)
    data, _ = rig.run([header(RequestType.GET_ID)], [20, 1])
    assert data == b"A" * 20 + b"\0"
    # Shorter and longer buffers: a prefix, or NUL padding.
    data, _ = rig.run([header(RequestType.GET_ID)], [4, 1])
    assert data == b"AAAA\0"
    data, _ = rig.run([header(RequestType.GET_ID)], [30, 1])
    assert data == b"A" * 20 + bytes(10) + b"\0"
    # Status in the same descriptor as the data.
    data, _ = rig.run([header(RequestType.GET_ID)], [21])
    assert data == b"A" * 20 + b"\0"


@pytest.mark.parametrize(
    "req_type",
    [
        RequestType.GET_LIFETIME,
        RequestType.SECURE_ERASE,
        15,
        16,
        18,
        20,
        22,
        24,
        26,
        2,
        3,
        5,
        99,
        0xFFFF_FFFF,
    ],
)
def test_unsupported_types(image: Path, req_type: int) -> None:
    rig = make_rig(image)
    data, written = rig.run([header(req_type)], [8, 1])
    assert written == 9
    assert data == bytes(8) + bytes([Status.UNSUPP])
    assert image.read_bytes() == pattern(DISK_SIZE)


def test_discard_reads_back_zeros(image: Path) -> None:
    rig = make_rig(image)
    status = rig.status([header(RequestType.DISCARD), segment(8, 16) + segment(64, 8)])
    assert status == Status.OK
    expected = bytearray(pattern(DISK_SIZE))
    # On file systems that punch holes the range reads as zeros; otherwise it
    # is untouched (discard is only a hint).
    got = rig.read(0, 128 * SECTOR)
    if got[8 * SECTOR : 24 * SECTOR] == bytes(16 * SECTOR):
        expected[8 * SECTOR : 24 * SECTOR] = bytes(16 * SECTOR)
        expected[64 * SECTOR : 72 * SECTOR] = bytes(8 * SECTOR)
    assert got == bytes(expected[: 128 * SECTOR])
    assert os.path.getsize(image) == DISK_SIZE


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_reads_back_zeros(image: Path, unmap: bool) -> None:
    rig = make_rig(image)
    status = rig.status(
        [header(RequestType.WRITE_ZEROES), segment(3, 5, int(unmap)) + segment(100, 1, int(unmap))]
    )
    assert status == Status.OK
    expected = bytearray(pattern(DISK_SIZE))
    expected[3 * SECTOR : 8 * SECTOR] = bytes(5 * SECTOR)
    expected[100 * SECTOR : 101 * SECTOR] = bytes(SECTOR)
    assert image.read_bytes() == bytes(expected)
    assert os.path.getsize(image) == DISK_SIZE


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_falls_back_to_writing(
    image: Path, unmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(block, "fallocate", refuse)
    monkeypatch.setattr(block, "_ZERO_CHUNK", 1024)  # several pwrite calls
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

    monkeypatch.setattr(block, "fallocate", broken)
    rig = make_rig(image)
    assert rig.status([header(RequestType.WRITE_ZEROES), segment(2, 7)]) == Status.IOERR
    assert rig.status([header(RequestType.DISCARD), segment(2, 7)]) == Status.IOERR
    assert rig.read(0, SECTOR) == pattern(SECTOR)  # still serving


def test_discard_and_write_zeroes_not_offered(image: Path) -> None:
    rig = make_rig(image, discard=False, write_zeroes=False)
    assert rig.status([header(RequestType.DISCARD), segment(0, 1)]) == Status.UNSUPP
    assert rig.status([header(RequestType.WRITE_ZEROES), segment(0, 1)]) == Status.UNSUPP
    assert image.read_bytes() == pattern(DISK_SIZE)


# -- malformed requests --------------------------------------------------------------------

CAPACITY = DISK_SIZE // SECTOR


@pytest.mark.parametrize(
    ("name", "readable", "writable", "status"),
    [
        ("no header", [], [1], Status.IOERR),
        ("short header", [header(RequestType.IN)[:15]], [SECTOR, 1], Status.IOERR),
        ("read past end", [header(RequestType.IN, CAPACITY)], [SECTOR, 1], Status.IOERR),
        (
            "read straddles end",
            [header(RequestType.IN, CAPACITY - 1)],
            [2 * SECTOR, 1],
            Status.IOERR,
        ),
        ("read sector overflow", [header(RequestType.IN, 2**64 - 1)], [SECTOR, 1], Status.IOERR),
        (
            "write sector overflow",
            [header(RequestType.OUT, 2**55), bytes(SECTOR)],
            [1],
            Status.IOERR,
        ),
        ("write past end", [header(RequestType.OUT, CAPACITY), bytes(SECTOR)], [1], Status.IOERR),
        ("read not sectors", [header(RequestType.IN)], [100, 1], Status.IOERR),
        ("write not sectors", [header(RequestType.OUT), bytes(513)], [1], Status.IOERR),
        (
            "read with readable data",
            [header(RequestType.IN), bytes(SECTOR)],
            [SECTOR, 1],
            Status.IOERR,
        ),
        (
            "write with writable data",
            [header(RequestType.OUT), bytes(SECTOR)],
            [SECTOR, 1],
            Status.IOERR,
        ),
        (
            "get_id with readable data",
            [header(RequestType.GET_ID), bytes(4)],
            [20, 1],
            Status.IOERR,
        ),
        ("discard empty", [header(RequestType.DISCARD)], [1], Status.IOERR),
        ("discard not segments", [header(RequestType.DISCARD), bytes(15)], [1], Status.IOERR),
        (
            "discard writable data",
            [header(RequestType.DISCARD), segment(0, 1)],
            [4, 1],
            Status.IOERR,
        ),
        (
            "discard too many segments",
            [header(RequestType.DISCARD), segment(0, 1) * (MAX_DISCARD_SEG + 1)],
            [1],
            Status.IOERR,
        ),
        (
            "discard past end",
            [header(RequestType.DISCARD), segment(CAPACITY - 1, 2)],
            [1],
            Status.IOERR,
        ),
        (
            "discard sector overflow",
            [header(RequestType.DISCARD), segment(2**64 - 1, 1)],
            [1],
            Status.IOERR,
        ),
        (
            "discard too long",
            [header(RequestType.DISCARD), segment(0, MAX_DISCARD_SECTORS + 1)],
            [1],
            Status.IOERR,
        ),
        ("discard unmap", [header(RequestType.DISCARD), segment(0, 1, 1)], [1], Status.UNSUPP),
        (
            "discard reserved flag",
            [header(RequestType.DISCARD), segment(0, 1, 2)],
            [1],
            Status.UNSUPP,
        ),
        (
            "write zeroes reserved flag",
            [header(RequestType.WRITE_ZEROES), segment(0, 1) + segment(1, 1, 0x8000_0001)],
            [1],
            Status.UNSUPP,
        ),
        (
            "write zeroes too long",
            [header(RequestType.WRITE_ZEROES), segment(0, MAX_WRITE_ZEROES_SECTORS + 1)],
            [1],
            Status.IOERR,
        ),
        (
            "write zeroes past end",
            [header(RequestType.WRITE_ZEROES), segment(0, 1) + segment(CAPACITY, 1)],
            [1],
            Status.IOERR,
        ),
    ],
)
def test_malformed_requests(
    image: Path, name: str, readable: list[bytes], writable: list[int], status: int
) -> None:
    rig = make_rig(image)
    data, written = rig.run(readable, writable)
    assert written == sum(writable), name
    assert data[-1] == status, name
    # A failed request's data area is zeroed, never left half-filled.
    assert data[:-1] == bytes(len(data) - 1), name
    assert image.read_bytes() == pattern(DISK_SIZE), name
    assert rig.device.state is DeviceState.ACTIVE
    assert not rig.device.needs_reset
    assert rig.read(0, SECTOR) == pattern(SECTOR)  # still serving


def test_request_without_status_byte(image: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(image)
    with caplog.at_level(logging.WARNING):
        # No device-writable byte at all: the status cannot be written.
        _, token = rig.request([header(RequestType.OUT), bytes(SECTOR)], [])
        assert rig.rig.used(0) == [(token, 0)]
    assert "cannot answer" in caplog.text
    assert image.read_bytes() == pattern(DISK_SIZE)  # and nothing was done
    assert rig.read(0, SECTOR) == pattern(SECTOR)


def test_status_byte_readable_breaks_only_the_ring(image: Path) -> None:
    """A chain ending in a device-readable descriptor after a writable one breaks
    the ring rules (readable before writable): the queue reports it, the device
    needs a reset, nothing raises out of queue_notify and nothing is written."""
    rig = make_rig(image)
    rig.request([header(RequestType.OUT)], [SECTOR, 1], notify=False)
    # Descriptors 0 (header), 1 (data), 2 (status) of a fresh split ring at
    # queue_harness.RING_BASE: clear WRITE on the status descriptor.
    flags_addr = RING_BASE + 2 * 16 + 12
    assert rig.rig.mem.read_u16(flags_addr) == 2  # VIRTQ_DESC_F_WRITE
    rig.rig.mem.write_u16(flags_addr, 0)
    rig.device.queue_notify(0)
    assert rig.device.needs_reset
    assert rig.rig.used(0) == []
    assert image.read_bytes() == pattern(DISK_SIZE)


def test_read_only_refuses_every_write(image: Path) -> None:
    rig = make_rig(image, read_only=True)
    assert rig.write(0, pattern(SECTOR, 5)) == Status.IOERR
    assert rig.status([header(RequestType.DISCARD), segment(0, 1)]) == Status.IOERR
    assert rig.status([header(RequestType.WRITE_ZEROES), segment(0, 1)]) == Status.IOERR
    assert rig.status([header(RequestType.FLUSH)]) == Status.OK
    assert rig.read(0, SECTOR) == pattern(SECTOR)
    assert image.read_bytes() == pattern(DISK_SIZE)


# -- host I/O failures ---------------------------------------------------------------------


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
    monkeypatch.setattr(block, "_IOV_MAX", 3)
    with Block(image) as dev:
        buf = bytearray(10 * SECTOR)
        views = [memoryview(buf)[i * SECTOR : (i + 1) * SECTOR] for i in range(10)]
        dev._read_into(views, SECTOR, 10 * SECTOR)
        assert bytes(buf) == pattern(DISK_SIZE)[SECTOR : 11 * SECTOR]
        new = pattern(10 * SECTOR, 77)
        buf[:] = new
        dev._write_from(views, 0, 10 * SECTOR)
    assert image.read_bytes()[: 10 * SECTOR] == new


def test_direct_io(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_DIRECT, with guest buffers at odd addresses; where the kernel refuses a
    buffer (EINVAL: alignment) the data goes through an aligned bounce buffer."""
    try:
        dev = Block(image, direct=True)
    except OSError as exc:  # a file system without O_DIRECT (tmpfs before 6.6)
        pytest.skip(f"O_DIRECT not supported here: {exc}")
    bounced: list[int] = []
    real_bounce = block._bounce_buffer

    def counting(size: int) -> object:
        bounced.append(size)
        return real_bounce(size)

    monkeypatch.setattr(block, "_bounce_buffer", counting)
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


# -- queues, batching, notifications -------------------------------------------------------


def test_one_interrupt_per_batch(image: Path) -> None:
    rig = make_rig(image)
    results = []
    for i in range(5):  # 3 descriptors each, in a 16-entry ring
        results.append(rig.request([header(RequestType.IN, i)], [SECTOR, 1], notify=False))
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 5
    assert rig.rig.interrupt.used == [0]
    for i, (wr, _) in enumerate(results):
        assert rig.rig.mem.readv(wr)[:-1] == pattern(DISK_SIZE)[i * SECTOR : (i + 1) * SECTOR]


def test_multiqueue(image: Path) -> None:
    rig = Rig(Block(image, num_queues=3))
    assert rig.device.offered_features & BlkFeature.MQ.mask
    assert rig.device.config().num_queues == 3
    for q in range(3):
        data = pattern(SECTOR, q + 20)
        wr, _ = rig.request([header(RequestType.OUT, q), data], [1], queue=q)
        assert rig.rig.used(q)[0][1] == 1
        assert rig.rig.mem.readv(wr) == b"\0"
    assert rig.rig.interrupt.used == [0, 1, 2]
    for q in range(3):
        data, _ = rig.run([header(RequestType.IN, 0)], [3 * SECTOR, 1], queue=(q + 1) % 3)
        assert data[:-1] == b"".join(pattern(SECTOR, i + 20) for i in range(3))


def test_requests_posted_before_activation_are_served(image: Path) -> None:
    dev = Block(image)
    rig = DirectRig(dev)
    token = object()
    wr = rig.post(0, [header(RequestType.IN, 1)], [SECTOR, 1], token)  # notify ignored
    assert rig.used(0) == []
    rig.activate()
    assert rig.used(0) == [(token, SECTOR + 1)]
    assert rig.mem.readv(wr)[:-1] == pattern(DISK_SIZE)[SECTOR : 2 * SECTOR]


def test_refresh_capacity_notifies(image: Path) -> None:
    rig = make_rig(image)
    assert not rig.device.refresh_capacity()
    os.truncate(image, 2 * DISK_SIZE)
    assert rig.device.refresh_capacity()
    assert rig.device.capacity == 2 * DISK_SIZE // SECTOR
    assert rig.rig.interrupt.config_changes == 1
    assert rig.write(DISK_SIZE // SECTOR, bytes(SECTOR)) == Status.OK


# -- snapshots -----------------------------------------------------------------------------


def test_snapshot_restore(image: Path) -> None:
    rig = make_rig(image, serial="snap")
    rig.device.write_config(CONFIG_WRITEBACK_OFFSET, b"\0")
    resources = rig.device.sleep()
    snap = rig.device.snapshot()
    fresh = Block(image, serial="snap")
    fresh.sleep()
    fresh.restore(snap)
    assert not fresh.writeback
    assert fresh.snapshot() == snap
    fresh.wake(resources)
    assert fresh.state is DeviceState.ACTIVE
    fresh.close()
    # A differently configured disk refuses the snapshot.
    other = Block(image, serial="other")
    other.sleep()
    with pytest.raises(ValueError, match="serial"):
        other.restore(snap)
    other.close()


@pytest.mark.parametrize(
    "model",
    [
        None,
        [],
        {"options": {}},
        {"options": {}, "writeback": 1},
        {"path": 3, "options": {}, "writeback": True},
    ],
)
def test_restore_rejects_bad_models(image: Path, model: object) -> None:
    with Block(image) as dev:
        dev.sleep()
        with pytest.raises(ValueError):
            dev._restore_model(model)


# -- robustness: arbitrary requests --------------------------------------------------------

_TYPES = st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14, 7, 0xFFFF_FFFF]) | st.integers(0, 2**32 - 1)
_SECTORS = st.sampled_from([0, 1, CAPACITY - 1, CAPACITY, 2**63, 2**64 - 1]) | st.integers(
    0, 2**64 - 1
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    req_type=_TYPES,
    sector=_SECTORS,
    header_len=st.sampled_from([0, 8, 15, 16, 16, 16]),
    readable=st.lists(st.sampled_from([1, 16, 100, 512, 1024]), max_size=3),
    writable=st.lists(st.sampled_from([0, 1, 20, 511, 512]), max_size=3),
    read_only=st.booleans(),
    seg=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 3)),
)
def test_arbitrary_requests_never_escape(
    tmp_path: Path,
    req_type: int,
    sector: int,
    header_len: int,
    readable: list[int],
    writable: list[int],
    read_only: bool,
    seg: tuple[int, int, int],
) -> None:
    assume(header_len or readable or writable)
    path = tmp_path / "fuzz.img"
    original = pattern(64 * SECTOR)
    path.write_bytes(original)
    with Block(path, read_only=read_only) as dev:
        rig = Rig(dev)
        body = [segment(*seg) * (n // 16) + bytes(n % 16) for n in readable]
        parts = ([header(req_type, sector)[:header_len]] if header_len else []) + body
        wr, token = rig.request(parts, writable)
        used = rig.rig.used(0)
        assert used and used[0][0] is token
        written = used[0][1]
        total = sum(writable)
        assert written in (0, total)
        if written:
            assert rig.rig.mem.readv(wr)[-1] in (Status.OK, Status.IOERR, Status.UNSUPP)
        assert not dev.needs_reset
        assert os.path.getsize(path) == len(original)
    if read_only:
        assert path.read_bytes() == original


# -- pipelined transfers (io_workers) --------------------------------------------------------


@pytest.fixture
def workers() -> Iterator[IoWorkers]:
    pool = IoWorkers(2, name="test-blk-io")
    yield pool
    pool.close()


def pipelined_rig(image: Path, workers: IoWorkers, **options: Any) -> Rig:
    options.setdefault("io_parallel_min", 2 * SECTOR)
    return Rig(Block(image, io_workers=workers, **options), size=64)


def post_large_read(rig: Rig, i: int) -> list[tuple[int, int]]:
    """Post (without notifying) the i-th 8-sector read, of sectors 8i..8i+7."""
    return rig.request([header(RequestType.IN, 8 * i)], [8 * SECTOR, 1], notify=False)[0]


def large_read_answer(i: int) -> bytes:
    """What the i-th 8-sector read of the untouched image writes: data, then OK."""
    return pattern(DISK_SIZE)[8 * i * SECTOR : 8 * (i + 1) * SECTOR] + b"\0"


@pytest.mark.parametrize("event_idx", [False, True])
def test_pipelined_requests_answer_as_inline(
    image: Path, workers: IoWorkers, event_idx: bool
) -> None:
    """Mixed large and small reads and writes, a FLUSH and a GET_ID in one notification."""
    rig = Rig(
        Block(image, io_workers=workers, io_parallel_min=4 * SECTOR, serial="pipe"),
        size=64,
        event_idx=event_idx,
    )
    expected = bytearray(pattern(DISK_SIZE))
    reads = []
    for i in range(6):
        sectors = 8 if i % 2 else 1  # large (to a worker) and small (inline)
        sector = 64 * i
        data = pattern(sectors * SECTOR, seed=40 + i)
        rig.request([header(RequestType.OUT, sector), data], [1], notify=False)
        expected[sector * SECTOR : sector * SECTOR + len(data)] = data
        wr, _ = rig.request(
            [header(RequestType.IN, 1000 + 16 * i)], [sectors * SECTOR, 1], notify=False
        )
        reads.append((wr, 1000 + 16 * i, sectors))
    id_wr, _ = rig.request([header(RequestType.GET_ID)], [20, 1], notify=False)
    rig.request([header(RequestType.FLUSH)], [1], notify=False)
    rig.device.queue_notify(0)
    used = rig.rig.used(0)
    assert len(used) == 6 * 2 + 2
    assert 1 <= workers.submitted <= workers.threads  # helpers called in, once each
    for wr, sector, sectors in reads:
        data = rig.rig.mem.readv(wr)
        assert data[-1] == Status.OK
        assert data[:-1] == pattern(DISK_SIZE)[sector * SECTOR : (sector + sectors) * SECTOR]
    assert rig.rig.mem.readv(id_wr) == b"pipe".ljust(20, b"\0") + bytes([Status.OK])
    assert image.read_bytes() == bytes(expected)
    assert rig.device.requests == 14


def test_lone_large_request_is_served_inline(image: Path, workers: IoWorkers) -> None:
    rig = pipelined_rig(image, workers)
    assert rig.read(8, 8 * SECTOR) == pattern(DISK_SIZE)[8 * SECTOR : 16 * SECTOR]
    assert rig.write(0, pattern(8 * SECTOR, seed=9)) == Status.OK
    assert workers.submitted == 0  # nothing else waiting: no helper called in
    assert image.read_bytes()[: 8 * SECTOR] == pattern(8 * SECTOR, seed=9)


def test_helpers_copy_in_parallel(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large reads are copied by more than one thread at once."""
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv
    together = threading.Barrier(2, timeout=10)  # the first two copies must overlap
    threads: set[int] = set()

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        threads.add(threading.get_ident())
        if offset < 16 * SECTOR:
            together.wait()
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    reads = [post_large_read(rig, i) for i in range(6)]
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 6
    for i, wr in enumerate(reads):
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert len(threads) >= 2
    assert threading.get_ident() in threads  # the ring's thread is a consumer too
    assert rig.device.io_errors == 0


def used_idx(rig: Rig) -> int:
    """The split used ring's idx, read as the driver sees it (nothing consumed)."""
    state = rig.rig.driver_queues[0].state()
    return int.from_bytes(rig.rig.mem.read(state["device_addr"] + 2, 2), "little")


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


class LateReads(NamedTuple):
    """How copy_late_reads went."""

    copied_by: dict[int, int]  # read -> the thread that copied it
    ring_thread: int  # the thread that ran queue_notify
    helper_calls: int


def copy_late_reads(
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    on_first_copies: Callable[[int, Rig, Callable[[], None]], None],
) -> LateReads:
    """Serve reads 0 and 1 on a ring thread with one helper; reads 2 and 3
    come during their copies and must be copied at once.

    ``on_first_copies(i, rig, post_later)`` runs as read ``i`` (0 or 1)
    starts its copy; ``post_later()`` posts reads 2 and 3.  Every read is
    checked to be answered correctly.
    """
    with IoWorkers(1, name="test-blk-io") as workers:
        rig = pipelined_rig(image, workers)
        real_preadv = os.preadv
        together = threading.Barrier(2, timeout=10)  # reads 2 and 3 must overlap
        copied_by: dict[int, int] = {}
        later: list[list[tuple[int, int]]] = []

        def post_later() -> None:
            later.extend(post_large_read(rig, k) for k in (2, 3))

        def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            i = offset // (8 * SECTOR)
            copied_by[i] = threading.get_ident()
            if i < 2:
                on_first_copies(i, rig, post_later)
            else:
                together.wait()
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        first = [post_large_read(rig, i) for i in range(2)]
        # queue_notify on a thread of its own, as a host's serving thread runs it.
        serving = threading.Thread(target=rig.device.queue_notify, args=(0,))
        serving.start()
        serving.join(30)
        assert not serving.is_alive()
        assert len(rig.rig.used(0)) == 4
        for i, wr in enumerate(first + later):
            assert rig.rig.mem.readv(wr) == large_read_answer(i)
        assert rig.device.io_errors == 0
        assert serving.ident is not None
        return LateReads(copied_by, serving.ident, workers.submitted)


def test_idle_ring_thread_is_called_back_when_requests_come_during_a_copy(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring's thread found the ring empty and waits for its helper; the
    driver posts two more large reads while the helper copies: the helper
    calls the ring's thread back, and the two are copied at once."""
    second_started = threading.Event()

    def on_first_copies(i: int, rig: Rig, post_later: Callable[[], None]) -> None:
        if i == 0:  # the ring's thread: let the helper take read 1 first
            assert second_started.wait(10)
        else:  # the helper: once read 0 is answered, the ring is empty
            second_started.set()
            wait_until(lambda: used_idx(rig) == 1, "read 0 is answered")
            post_later()

    run = copy_late_reads(image, monkeypatch, on_first_copies)
    assert run.copied_by[0] == run.ring_thread
    assert run.copied_by[1] != run.ring_thread
    assert {run.copied_by[2], run.copied_by[3]} == {run.copied_by[0], run.copied_by[1]}
    assert run.helper_calls == 1


def test_helper_that_found_the_ring_empty_can_be_called_in_again(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper found the ring empty and stopped while the ring's thread
    still copies; requests that come meanwhile get a helper again at once,
    not when the ring next runs dry."""

    def on_first_copies(i: int, rig: Rig, post_later: Callable[[], None]) -> None:
        if i == 0:  # the ring's thread: the helper answers read 1 and stops
            wait_until(lambda: used_idx(rig) == 1, "read 1 is answered")
            post_later()

    run = copy_late_reads(image, monkeypatch, on_first_copies)
    assert run.copied_by[0] == run.ring_thread
    assert run.copied_by[1] != run.ring_thread
    assert run.copied_by[2] != run.copied_by[3]
    assert run.helper_calls == 2


def test_pipelined_completions_are_published_as_served_and_interrupts_shared(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request is in the used ring as soon as it is done; while others
    wait, four completions share an interrupt, and the last is signalled."""
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv
    interrupts_seen: list[int] = []  # when each copy starts

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        interrupts_seen.append(len(rig.rig.interrupt.used))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    tokens = [
        rig.request([header(RequestType.IN, i)], [SECTOR, 1], notify=False)[1] for i in range(10)
    ]  # small: served by the ring's thread alone, in order
    rig.device.queue_notify(0)
    assert workers.submitted == 0
    assert interrupts_seen == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert rig.rig.interrupt.used == [0, 0, 0]  # after 4, after 8, and the last
    assert [token for token, _ in rig.rig.used(0)] == tokens


def test_pipelined_writethrough_syncs_each_write_before_its_completion(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers, cache="writethrough")
    real = os.fdatasync
    synced: list[bytes] = []  # status bytes of the writes, as each sync starts
    statuses: list[list[tuple[int, int]]] = []
    unset = 0xFF  # no status is 0xFF

    def fdatasync(fd: int) -> None:
        synced.append(bytes(rig.rig.mem.readv(wr)[0] for wr in statuses))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for i in range(4):
        wr, _ = rig.request(
            [header(RequestType.OUT, 8 * i), pattern(8 * SECTOR, seed=60 + i)], [1], notify=False
        )
        rig.rig.mem.write(wr[0][0], bytes([unset]))
        statuses.append(wr)
    rig.request([header(RequestType.IN, 100)], [8 * SECTOR, 1], notify=False)
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 5
    assert len(synced) == 4  # one per write, none for the read
    # Each sync comes before the completion of the write it covers: when the
    # k-th sync starts, at most k - 1 writes are answered.
    for k, seen in enumerate(synced, 1):
        assert seen.count(Status.OK) <= k - 1, (k, seen)
    assert all(rig.rig.mem.readv(wr) == bytes([Status.OK]) for wr in statuses)
    expected = b"".join(pattern(8 * SECTOR, seed=60 + i) for i in range(4))
    assert image.read_bytes()[: 32 * SECTOR] == expected


def test_pipelined_writethrough_sync_failure_fails_the_writes(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers, cache="writethrough")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", fail)
    writes = [
        rig.request([header(RequestType.OUT, 8 * i), bytes(8 * SECTOR)], [1], notify=False)[0]
        for i in range(3)
    ]
    read, _ = rig.request([header(RequestType.IN, 100)], [8 * SECTOR, 1], notify=False)
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 4
    for wr in writes:
        assert rig.rig.mem.readv(wr) == bytes([Status.IOERR])
    assert rig.rig.mem.readv(read)[-1] == Status.OK
    assert rig.device.io_errors == 3


def test_pipelined_io_error_fails_only_that_request(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if offset == 16 * SECTOR:
            raise OSError(errno.EIO, "injected")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    requests = [post_large_read(rig, i) for i in range(4)]
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 4
    for i, wr in enumerate(requests):
        data = rig.rig.mem.readv(wr)
        if i == 2:
            assert data == bytes(8 * SECTOR) + bytes([Status.IOERR])
        else:
            assert data == large_read_answer(i)
    assert rig.device.io_errors == 1
    assert workers.submitted >= 1


def test_pipelined_unexpected_worker_failure_is_ioerr(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers)

    def pwritev(*args: object) -> int:
        raise ValueError("not an OSError")

    monkeypatch.setattr(os, "pwritev", pwritev)
    for i in range(2):
        rig.request([header(RequestType.OUT, 8 * i), bytes(8 * SECTOR)], [1], notify=False)
    rig.device.queue_notify(0)
    used = rig.rig.used(0)
    assert [written for _, written in used] == [1, 1]
    assert rig.device.io_errors == 2
    assert not rig.device.needs_reset  # the device keeps serving
    monkeypatch.undo()
    assert rig.read(0, SECTOR) == pattern(SECTOR)


def test_broken_ring_lets_transfers_in_flight_finish(image: Path, workers: IoWorkers) -> None:
    """A malformed chain behind two transfers in flight: they complete, then the
    device needs a reset; nothing is written for the malformed one."""
    rig = pipelined_rig(image, workers)
    reads = [post_large_read(rig, i) for i in range(2)]
    rig.request([header(RequestType.OUT)], [SECTOR, 1], notify=False)
    # Descriptors 6, 7, 8 are the third chain: make its status byte readable
    # after a writable descriptor (split-ring.tex forbids it).
    flags_addr = RING_BASE + 8 * 16 + 12
    assert rig.rig.mem.read_u16(flags_addr) == 2  # VIRTQ_DESC_F_WRITE
    rig.rig.mem.write_u16(flags_addr, 0)
    rig.device.queue_notify(0)
    assert rig.device.needs_reset
    assert len(rig.rig.used(0)) == 2
    for i, wr in enumerate(reads):
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert image.read_bytes() == pattern(DISK_SIZE)


def test_io_parallel_min_validated(image: Path) -> None:
    with pytest.raises(ValueError, match="io_parallel_min"):
        Block(image, io_parallel_min=-1)


@pytest.mark.parametrize("refill", [False, True], ids=["posted-first", "refilled"])
@pytest.mark.parametrize("packed", [False, True])
def test_pipelined_random_batches_match_a_model(
    image: Path,
    workers: IoWorkers,
    packed: bool,
    refill: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds of mixed reads and writes, large and small, served by several
    consumers: every answer and the file match a plain model of the disk.
    Threads switch as often as the interpreter allows, so unguarded ring
    updates would interleave.  ``refilled``: most of each round is posted
    by the driver while the consumers copy, so consumers run dry, wait and
    are called in again mid-round."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    request.addfinalizer(lambda: sys.setswitchinterval(interval))
    rig = Rig(
        Block(image, io_workers=workers, io_parallel_min=4 * SECTOR),
        packed_ring=packed,
        event_idx=True,
        size=64,
    )
    model = bytearray(pattern(DISK_SIZE))
    rng = random.Random(7)
    pending: list[tuple[int, int, int]] = []  # (data seed, sector, sectors) to post
    posted: list[tuple[list[tuple[int, int]], int, int] | None] = []
    driver = threading.Lock()  # the test's driver side is one thread at a time

    def post_pending(count: int) -> None:
        with driver:
            for _ in range(min(count, len(pending))):
                seed, sector, sectors = pending.pop(0)
                if rng.random() < 0.5:
                    data = pattern(sectors * SECTOR, seed=seed)
                    rig.request([header(RequestType.OUT, sector), data], [1], notify=False)
                    model[sector * SECTOR : sector * SECTOR + len(data)] = data
                    posted.append(None)
                else:
                    wr, _ = rig.request(
                        [header(RequestType.IN, sector)], [sectors * SECTOR, 1], notify=False
                    )
                    posted.append((wr, sector, sectors))

    if refill:
        real_preadv, real_pwritev = os.preadv, os.pwritev
        ring_thread = threading.current_thread()  # queue_notify runs here

        def driver_acts() -> None:
            # Post 0, 1 or, from a helper, late (the ring's thread may
            # have found the ring empty meanwhile) 3 requests.
            with driver:
                roll = rng.random()
            if roll < 0.5 and threading.current_thread() is not ring_thread:
                time.sleep(0.0005)
                post_pending(3)
            else:
                post_pending(1 if roll < 0.9 else 0)

        def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            driver_acts()
            return real_preadv(fd, buffers, offset)

        def pwritev(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            driver_acts()
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pwritev", pwritev)
    for round_ in range(60):
        # Disjoint ranges: requests in flight together have no order.
        starts = rng.sample(range(0, 2048 - 16, 16), 20 if refill else 12)
        before = bytes(model)  # what every read of this round finds
        pending[:] = [
            (round_ * 32 + n, sector, rng.choice((1, 2, 8, 16))) for n, sector in enumerate(starts)
        ]
        posted.clear()
        post_pending(4 if refill else 12)
        rig.device.queue_notify(0)
        while pending:  # the driver did not post them all during copies
            post_pending(len(pending))
            rig.device.queue_notify(0)
        used = rig.rig.used(0)
        assert len(used) == len(starts)
        for item in posted:
            if item is not None:
                wr, sector, sectors = item
                expected = before[sector * SECTOR : (sector + sectors) * SECTOR]
                assert rig.rig.mem.readv(wr) == expected + bytes([Status.OK])
    monkeypatch.undo()
    assert image.read_bytes() == bytes(model)
    assert rig.device.io_errors == 0
    assert workers.submitted > 0


def test_pipelined_sleep_finds_nothing_in_flight(image: Path, workers: IoWorkers) -> None:
    """Helpers have finished when queue_notify returns: sleep hands back rings
    with every request answered, and the device serves on after wake."""
    rig = pipelined_rig(image, workers)
    for i in range(6):
        post_large_read(rig, i)
    rig.device.queue_notify(0)
    assert workers.submitted > 0
    resources = rig.device.sleep()
    assert resources is not None
    (queue,) = resources.queues
    assert not queue.has_available()
    assert len(rig.rig.used(0)) == 6  # all in the used ring before sleep returned
    assert rig.device.snapshot()  # allowed: asleep
    rig.device.wake(resources)
    assert rig.read(64, 8 * SECTOR) == pattern(DISK_SIZE)[64 * SECTOR : 72 * SECTOR]


def test_pipelined_bad_request_among_large_ones_gets_ioerr_alone(
    image: Path, workers: IoWorkers
) -> None:
    rig = pipelined_rig(image, workers)
    good = []
    for i in range(5):
        if i == 2:  # past the end of the disk
            bad, _ = rig.request(
                [header(RequestType.IN, DISK_SIZE // SECTOR - 4)], [8 * SECTOR, 1], notify=False
            )
            continue
        good.append((post_large_read(rig, i), i))
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 5
    assert rig.rig.mem.readv(bad) == bytes(8 * SECTOR) + bytes([Status.IOERR])
    for wr, i in good:
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert rig.device.bad_requests == 1
    assert workers.submitted >= 1
    assert not rig.device.needs_reset
