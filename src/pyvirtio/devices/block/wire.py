"""The virtio-blk wire format: feature bits, request layout, status, config space.

Everything both sides of a virtio-blk device agree on (device-types/blk), in
one place: the device model (:mod:`.device`), its request parser
(:mod:`.request`) and the driver (:mod:`pyvirtio.driver.blk`) import it.
Importing this module pulls in nothing but :mod:`enum`, :mod:`struct` and
:mod:`dataclasses`: no host I/O, no threads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from pyvirtio.constants import FeatureBit

__all__ = [
    "CONFIG_SIZE",
    "CONFIG_WRITEBACK_OFFSET",
    "DISCARD_SEGMENT_SIZE",
    "GET_ID_BYTES",
    "HEADER",
    "HEADER_SIZE",
    "SECTOR_SIZE",
    "SEGMENT",
    "SEGMENT_F_UNMAP",
    "STATUS_SIZE",
    "S_IOERR",
    "S_OK",
    "S_UNSUPP",
    "T_DISCARD",
    "T_FLUSH",
    "T_GET_ID",
    "T_IN",
    "T_OUT",
    "T_WRITE_ZEROES",
    "BlkConfig",
    "BlkFeature",
    "RequestType",
    "Status",
    "pack_config",
    "unpack_config",
]


class BlkFeature(FeatureBit):
    """Block feature bit numbers (device-types/blk: Feature bits)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class RequestType(enum.IntEnum):
    """``virtio_blk_req.type`` values (device-types/blk: Device Operation)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """``virtio_blk_req.status`` values (device-types/blk: Device Operation)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: The request types and statuses as plain ints, named as in the spec
#: (VIRTIO_BLK_T_*, VIRTIO_BLK_S_*), for hot paths' comparisons: a module
#: global is cheaper than an IntEnum member lookup.
T_IN: Final = int(RequestType.IN)
T_OUT: Final = int(RequestType.OUT)
T_FLUSH: Final = int(RequestType.FLUSH)
T_GET_ID: Final = int(RequestType.GET_ID)
T_DISCARD: Final = int(RequestType.DISCARD)
T_WRITE_ZEROES: Final = int(RequestType.WRITE_ZEROES)
S_OK: Final = int(Status.OK)
S_IOERR: Final = int(Status.IOERR)
S_UNSUPP: Final = int(Status.UNSUPP)


#: The protocol's unit for ``sector``, ``capacity`` and data lengths.
SECTOR_SIZE: Final = 512
#: ``type``, ``reserved``, ``sector``: the device-readable head of every request.
HEADER_SIZE: Final = 16
HEADER: Final = struct.Struct("<IIQ")
#: The device-writable ``status`` byte that ends every request.
STATUS_SIZE: Final = 1
#: ``struct virtio_blk_discard_write_zeroes``: ``sector``, ``num_sectors``, ``flags``.
DISCARD_SEGMENT_SIZE: Final = 16
SEGMENT: Final = struct.Struct("<QII")
#: The only defined flag of a discard / write-zeroes segment.
SEGMENT_F_UNMAP: Final = 1
#: Length of the device ID string a GET_ID request returns.
GET_ID_BYTES: Final = 20
#: ``sizeof(struct virtio_blk_config)``, up to and including ``zoned``.
CONFIG_SIZE: Final = 96
#: Offset of the ``writeback`` byte in the configuration space.
CONFIG_WRITEBACK_OFFSET: Final = 32


@dataclass(slots=True)
class BlkConfig:
    """The fields of ``struct virtio_blk_config`` (device-types/blk: Device
    configuration layout) pyvirtio uses; geometry, secure erase and zoned are
    left zero, as their features are not offered."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0


# capacity, size_max, seg_max, geometry (u16 u8 u8), blk_size,
# topology (u8 u8 u16 u32), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap,
# unused1[3], secure erase (3 x u32), zoned (5 x u32, u8, u8[3]).
_CONFIG: Final = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III IIIIIB3x")
assert _CONFIG.size == CONFIG_SIZE


def pack_config(cfg: BlkConfig) -> bytes:
    """``struct virtio_blk_config`` as little-endian bytes."""
    geometry = (0, 0, 0)  # VIRTIO_BLK_F_GEOMETRY is not offered
    secure_erase_and_zoned = (0,) * 9  # neither feature is offered
    return _CONFIG.pack(
        cfg.capacity,
        cfg.size_max,
        cfg.seg_max,
        *geometry,
        cfg.blk_size,
        cfg.physical_block_exp,
        cfg.alignment_offset,
        cfg.min_io_size,
        cfg.opt_io_size,
        cfg.writeback,
        0,  # unused0 (MUST be 0: device-types/blk: Device Initialization)
        cfg.num_queues,
        cfg.max_discard_sectors,
        cfg.max_discard_seg,
        cfg.discard_sector_alignment,
        cfg.max_write_zeroes_sectors,
        cfg.max_write_zeroes_seg,
        cfg.write_zeroes_may_unmap,
        *secure_erase_and_zoned,
    )


def unpack_config(data: bytes) -> BlkConfig:
    """Parse a (possibly short, then zero-extended) ``struct virtio_blk_config``."""
    data = bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0")
    v = _CONFIG.unpack(data)
    return BlkConfig(
        capacity=v[0],
        size_max=v[1],
        seg_max=v[2],
        blk_size=v[6],
        physical_block_exp=v[7],
        alignment_offset=v[8],
        min_io_size=v[9],
        opt_io_size=v[10],
        writeback=v[11],
        num_queues=v[13],
        max_discard_sectors=v[14],
        max_discard_seg=v[15],
        discard_sector_alignment=v[16],
        max_write_zeroes_sectors=v[17],
        max_write_zeroes_seg=v[18],
        write_zeroes_may_unmap=v[19],
    )
