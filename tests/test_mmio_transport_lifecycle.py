"""MmioTransport across sleep, wake, snapshot and restore."""

from __future__ import annotations

import pytest

from helpers.mmio import DRIVER_OK, Q0, SPLIT_FEATURES, Harness
from pyvirtio.constants import Feature
from pyvirtio.device import COMMON_FEATURES, DeviceState, LifecycleError
from pyvirtio.irq import INT_CONFIG, INT_VRING
from pyvirtio.transport.mmio import MAGIC_VALUE, Reg
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.virtqueue.split import SplitDriverQueue


def test_writes_ignored_while_asleep() -> None:
    h = Harness()
    h.start()
    h.t.sleep()
    h.w(Reg.STATUS, 0)
    assert h.status() & DRIVER_OK
    h.w(Reg.QUEUE_NOTIFY, 0)
    h.w(0x100, 0xFF, 1)
    assert h.device.config[0] == 1
    assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
    h.t.wake()
    assert h.device.state is DeviceState.ACTIVE


def test_sleep_wake_state_errors() -> None:
    h = Harness()
    with pytest.raises(LifecycleError):
        h.t.wake()
    with pytest.raises(LifecycleError):
        h.t.snapshot()
    with pytest.raises(LifecycleError):
        h.t.restore({})
    h.t.sleep()
    with pytest.raises(LifecycleError):
        h.t.sleep()


@pytest.mark.parametrize("features", [SPLIT_FEATURES, COMMON_FEATURES])
def test_snapshot_restore_resumes_operation(features: int) -> None:
    h = Harness()
    h.negotiate(features)
    h.program_queue(0, 16, Q0)
    h.set_status(DRIVER_OK)
    packed = bool(features & Feature.RING_PACKED.mask)
    from pyvirtio.virtqueue.packed import PackedDriverQueue

    dq = (PackedDriverQueue if packed else SplitDriverQueue)(h.mem, 16, *Q0, event_idx=True)
    h.mem.write(0x8000, b"one")
    dq.add([(0x8000, 3)], [(0x8010, 3)], 1)
    h.w(Reg.QUEUE_NOTIFY, 0)
    h.irq.trigger_config()
    h.w(Reg.QUEUE_SEL, 1)
    h.t.sleep()
    snap = h.t.snapshot()
    h.t.wake()

    fresh = Harness(mem=h.mem)
    fresh.t.sleep()
    fresh.t.restore(snap)
    assert fresh.t.snapshot() == snap
    fresh.t.wake()
    assert fresh.device.state is DeviceState.ACTIVE
    assert fresh.device.echoed == 1
    assert fresh.status() == h.status()
    assert fresh.r(Reg.INTERRUPT_STATUS) == INT_VRING | INT_CONFIG
    assert fresh.r(Reg.QUEUE_READY) == 0  # QueueSel 1 was restored
    assert isinstance(fresh.device.queues[1], DisabledQueue)
    # The driver carries on against the restored device.
    assert list(dq.used()) == [(1, 3)]
    h.mem.write(0x8000, b"two")
    dq.add([(0x8000, 3)], [(0x8010, 3)], 2)
    fresh.w(Reg.QUEUE_NOTIFY, 0)
    assert list(dq.used()) == [(2, 3)]
    assert h.mem.read(0x8010, 3) == b"two"


def test_snapshot_of_unactivated_transport() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0)
    h.t.sleep()
    snap = h.t.snapshot()
    assert snap["live_queues"] is None
    fresh = Harness(mem=h.mem)
    fresh.t.sleep()
    fresh.t.restore(snap)
    fresh.t.wake()
    assert fresh.queue_ready(0) == 1
    assert fresh.set_status(DRIVER_OK) & DRIVER_OK
    assert fresh.device.state is DeviceState.ACTIVE


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.pop("status"),
        lambda s: s.update(version=2),
        lambda s: s.update(queues=[]),
        lambda s: s.update(device="!!"),
        lambda s: s["queues"][0].update(size="x"),
        lambda s: s.update(live_queues=[None]),
    ],
)
def test_restore_rejects_malformed_snapshots(corrupt: object) -> None:
    h = Harness()
    h.start()
    h.t.sleep()
    snap = h.t.snapshot()
    assert callable(corrupt)
    corrupt(snap)
    fresh = Harness(mem=h.mem)
    fresh.t.sleep()
    before = fresh.t.snapshot()
    with pytest.raises(LifecycleError):
        fresh.t.restore(snap)
    assert fresh.t.snapshot() == before
