"""VhostUserFrontend.share_inflight_region against pyvirtio's back end: tracking engages."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from helpers.vhost_user import served
from pyvirtio.constants import DeviceId
from pyvirtio.devices.block import Block
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend
from pyvirtio.transport.vhost_user.protocol import ProtocolFeature
from pyvirtio.transport.vhost_user.session import DEFAULT_PROTOCOL_FEATURES

TIMEOUT = 10.0


def test_blk_driver_requests_are_recorded_in_the_shared_region(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    offer = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask
    with (
        Block(image) as device,
        served(device, sock, protocol_features=offer),
        VhostUserFrontend(sock, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend,
    ):
        desc = frontend.share_inflight_region(queue_size=frontend.max_queue_size)
        assert desc.num_queues == 1 and desc.mmap_size > 0
        blk = BlkDriver(frontend, timeout=TIMEOUT, packed=False)
        for block in range(10):
            blk.write(block * 4096, bytes([block]) * 4096)
        inflight = frontend._inflight  # the region as the front end holds it
        assert inflight is not None
        with mmap.mmap(os.dup(inflight[1]), desc.mmap_size) as region:
            _features, version, desc_num, _head, used_idx = struct.unpack_from("<QHHHH", region, 0)
            in_flight = [region[16 + 16 * i] for i in range(desc_num)]
        # Recorded and cleared: version 1, the used index followed the ring,
        # nothing left in flight after the writes completed.
        assert version == 1 and desc_num == frontend.max_queue_size
        assert used_idx >= 10
        assert not any(in_flight)
    assert image.read_bytes()[9 * 4096 : 10 * 4096] == bytes([9]) * 4096
