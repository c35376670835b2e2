"""virtio-blk device model: identity, negotiation, config, each request type
and batching, driven directly on rings (no transport)."""

from __future__ import annotations

import errno
import os
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
from helpers.queues import DirectRig
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.devices.block import (
    CONFIG_WRITEBACK_OFFSET,
    BlkFeature,
    Block,
    RequestType,
    Status,
)

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
    assert written == 0  # refused before anything: only the status byte is written
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


def test_discard_and_write_zeroes_not_offered(image: Path) -> None:
    rig = make_rig(image, discard=False, write_zeroes=False)
    assert rig.status([header(RequestType.DISCARD), segment(0, 1)]) == Status.UNSUPP
    assert rig.status([header(RequestType.WRITE_ZEROES), segment(0, 1)]) == Status.UNSUPP
    assert image.read_bytes() == pattern(DISK_SIZE)


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
