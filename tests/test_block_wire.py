"""virtio-blk wire format: the config space layout, as the spec draws it."""

from __future__ import annotations

import struct
from pathlib import Path

from helpers.block import (
    DISK_SIZE,
    SECTOR,
)
from pyvirtio.devices import block
from pyvirtio.devices.block import (
    CONFIG_SIZE,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    BlkFeature,
    Block,
    unpack_config,
)


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
