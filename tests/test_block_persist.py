"""virtio-blk snapshots: what the device saves, and what it refuses back."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.block import (
    make_rig,
)
from pyvirtio.device import DeviceState
from pyvirtio.devices.block import (
    CONFIG_WRITEBACK_OFFSET,
    Block,
    persist,
)


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
            persist.load(model, dev.path, dev._options(), dev.name)
