"""virtio-blk, split by job (device-types/blk).

* :mod:`.wire`: the format the device and the driver share (request header,
  types, status, config layout, feature bits);
* :mod:`.request`: request parsing and validation, pure;
* :mod:`.io`: the host I/O backend the host gives the model
  (:class:`~.io.FileBackend`: file, O_DIRECT, discard, write-zeroes, flush);
* :mod:`.pipeline`: serving one ring from several threads the host lent;
* :mod:`.device`: the model, :class:`Block`;
* :mod:`.persist`: what a snapshot holds.

The wire names are imported here at once; the model and its backend (ctypes,
fcntl, threads) only when first used, so ``pyvirtio.devices.block.wire``
(what the driver library imports) stays free of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvirtio.devices.block.wire import (
    CONFIG_SIZE,
    CONFIG_WRITEBACK_OFFSET,
    DISCARD_SEGMENT_SIZE,
    GET_ID_BYTES,
    HEADER_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkFeature,
    RequestType,
    Status,
    pack_config,
    unpack_config,
)
from pyvirtio.lazy import lazy_getattr

if TYPE_CHECKING:
    from pyvirtio.devices.block.device import (
        DEFAULT_QUEUE_SIZE,
        DEFAULT_SIZE_MAX,
        MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEG,
        MAX_WRITE_ZEROES_SECTORS,
        MAX_WRITE_ZEROES_SEG,
        Block,
        CacheMode,
    )
    from pyvirtio.devices.block.io import BlockBackend, FileBackend

__all__ = [
    "CONFIG_SIZE",
    "CONFIG_WRITEBACK_OFFSET",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_SIZE_MAX",
    "DISCARD_SEGMENT_SIZE",
    "GET_ID_BYTES",
    "HEADER_SIZE",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
    "MAX_WRITE_ZEROES_SECTORS",
    "MAX_WRITE_ZEROES_SEG",
    "SECTOR_SIZE",
    "BlkConfig",
    "BlkFeature",
    "Block",
    "BlockBackend",
    "CacheMode",
    "FileBackend",
    "RequestType",
    "Status",
    "pack_config",
    "unpack_config",
]

_LAZY = {
    "DEFAULT_QUEUE_SIZE": ".device",
    "DEFAULT_SIZE_MAX": ".device",
    "MAX_DISCARD_SECTORS": ".device",
    "MAX_DISCARD_SEG": ".device",
    "MAX_WRITE_ZEROES_SECTORS": ".device",
    "MAX_WRITE_ZEROES_SEG": ".device",
    "Block": ".device",
    "CacheMode": ".device",
    "BlockBackend": ".io",
    "FileBackend": ".io",
}

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
