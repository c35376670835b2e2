"""Regression tests for what fuzz/fuzz_vhost_user_session.py found in VhostUserBackend.

Each test shows its finding with the plainest peer that reaches it (a
driver through VhostUserFrontend, a model that fails on purpose), against a
back end serving in a thread; every wait is bounded.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from helpers.vhost_user import TIMEOUT, StopFailsOnce, served, wait_until
from pyvirtio.constants import DeviceId
from pyvirtio.devices.block import Block
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.entropy import EntropyDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend


def test_teardown_completes_whatever_the_model_raises(sock_path: Path) -> None:
    """A failure while stopping the device at a disconnect must not end the teardown.

    It did (found through a front end switching a running split ring to
    RING_PACKED), and the back end kept a dead session: no later front end
    was ever accepted.
    """
    device = StopFailsOnce()
    with served(device, sock_path) as backend:
        first = VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY, timeout=TIMEOUT)
        assert len(EntropyDriver(first, timeout=TIMEOUT).read(64)) == 64
        device.armed = True
        first.abort()  # the device is running: the disconnect stops it
        wait_until(lambda: not backend.connected)
        assert not device.armed and backend.memory is None
        with VhostUserFrontend(sock_path, device_id=DeviceId.ENTROPY, timeout=TIMEOUT) as second:
            assert len(EntropyDriver(second, timeout=TIMEOUT).read(64)) == 64


def test_block_keeps_no_region_of_a_gone_front_end(sock_path: Path, tmp_path: Path) -> None:
    """Block cached the last region it used (and the region table) past the reset.

    The regions of a front end outlived its connection; when a view of one
    was still exported at the teardown (a request in flight), its mapping
    could not be closed then and the cache kept it, and the fd it holds,
    open for good.  After the disconnect nothing of the session may survive.
    """
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with Block(image) as device, served(device, sock_path) as backend:
        with VhostUserFrontend(sock_path, device_id=DeviceId.BLOCK, timeout=TIMEOUT) as frontend:
            assert BlkDriver(frontend).read(4096, 512) == bytes(512)
            assert backend.memory is not None
            # Each region's mmap: only its region (and views of it) hold it.
            # (A region of the compiled build takes no weak reference.)
            mappings = [weakref.ref(region.mapping) for region in backend.memory.regions]
        wait_until(lambda: not backend.connected)
        gc.collect()
        assert mappings and all(mapping() is None for mapping in mappings)
