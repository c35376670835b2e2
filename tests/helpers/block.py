"""A virtio-blk device on helpers.queues rings, with request builders, for the block tests.

Each test plays the driver on a ring pair (``helpers.queues.DirectRig``) and
builds request chains by hand, so malformed requests a real driver would
refuse to send can be made too.  Backing files are real files in tmp_path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from helpers.queues import DirectRig
from pyvirtio.devices.block import (
    Block,
    RequestType,
    Status,
)

SECTOR = 512
DISK_SIZE = 1 << 20  # 2048 sectors


def header(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("<IIQ", req_type, reserved, sector)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def pattern(length: int, seed: int = 1) -> bytes:
    """Deterministic non-zero-looking bytes: ``(i * 7 + seed) mod 256``."""
    period = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (period * (length // 256 + 1))[:length]


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
