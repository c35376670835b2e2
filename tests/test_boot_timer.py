"""The boot-timer device: the u32 microsecond register, its edges, sleep and snapshots."""

from __future__ import annotations

import logging
import struct

import pytest

from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import DeviceState, LifecycleError
from pyvirtio.devices.boot_timer import BootTimer
from pyvirtio.testing import MMIO_BASE, MmioTestRig, device_conformance
from pyvirtio.transport.mmio import CONFIG_OFFSET, Reg


class FakeClock:
    """A monotonic nanosecond clock that moves only when told to."""

    def __init__(self, now: int = 5_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance_us(self, us: int) -> None:
        self.now += us * 1000


def register(dev: BootTimer) -> int:
    value: int = struct.unpack("<I", dev.read_config(0, 4))[0]
    return value


def test_identity_and_features() -> None:
    dev = BootTimer(clock=FakeClock())
    assert dev.device_id is DeviceId.BOOT_TIMER
    assert dev.num_queues == 0
    assert dev.offered_features == Feature.VERSION_1.mask
    assert dev.features_acceptable(Feature.VERSION_1.mask)


def test_counts_microseconds_from_construction() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    assert register(dev) == 0
    clock.advance_us(1)
    assert register(dev) == 1
    clock.now += 999  # sub-microsecond progress is truncated
    assert register(dev) == 1
    clock.now += 1
    assert register(dev) == 2
    clock.advance_us(1_000_000)
    assert register(dev) == 1_000_002


def test_values_never_decrease() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    seen = []
    for step in (0, 3, 17, 1000, 1, 250_000):
        clock.advance_us(step)
        seen.append(register(dev))
    assert seen == sorted(seen)
    assert seen[-1] == sum((0, 3, 17, 1000, 1, 250_000))


def test_explicit_start_and_start_in_the_future() -> None:
    clock = FakeClock(now=10_000_000)
    dev = BootTimer(start=4_000_000, clock=clock)
    assert register(dev) == 6000
    early = BootTimer(start=20_000_000, clock=clock)
    assert register(early) == 0  # never negative


def test_saturates_instead_of_wrapping() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(0xFFFF_FFFF - 1)
    assert register(dev) == 0xFFFF_FFFE
    clock.advance_us(1)
    assert register(dev) == 0xFFFF_FFFF
    clock.advance_us(1)
    assert register(dev) == 0xFFFF_FFFF
    clock.advance_us(10**12)
    assert register(dev) == 0xFFFF_FFFF
    assert dev.elapsed_us() > 0xFFFF_FFFF


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (0, 2), (0, 8), (1, 4), (2, 2), (4, 4), (0x10, 8), (0xFC, 4), (3, 1)],
)
def test_other_offsets_and_sizes_read_zero(offset: int, length: int) -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(0x01020304)
    assert register(dev) == 0x01020304
    assert dev.read_config(offset, length) == bytes(length)


def test_writes_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(42)
    with caplog.at_level(logging.INFO, logger="pyvirtio.devices.boot_timer"):
        dev.write_config(0, b"\0\0\0\0")
    assert register(dev) == 42
    assert "read-only" in caplog.text


def test_reset_does_not_restart_the_timer() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(100)
    dev.reset()
    assert register(dev) == 100


def test_frozen_while_asleep_and_continues_after_wake() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(500)
    assert dev.sleep() is None
    clock.advance_us(1_000_000)
    assert register(dev) == 500
    first = dev.snapshot()
    clock.advance_us(7)
    assert dev.snapshot() == first  # deterministic while asleep
    dev.wake()
    assert dev.state is DeviceState.NEW
    assert register(dev) == 500
    clock.advance_us(3)
    assert register(dev) == 503


def test_snapshot_restore_continues_from_saved_elapsed_time() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(1234)
    dev.sleep()
    blob = dev.snapshot()

    # Another process, whose monotonic clock has a different origin.
    other_clock = FakeClock(now=77)
    other = BootTimer(clock=other_clock)
    other_clock.advance_us(999_999)
    other.sleep()
    other.restore(blob)
    assert register(other) == 1234
    assert other.snapshot() == blob
    other_clock.advance_us(50)
    other.wake()
    assert register(other) == 1234
    other_clock.advance_us(6)
    assert register(other) == 1240


def test_restore_keeps_saturation_point() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(0xFFFF_FFFF + 10)
    dev.sleep()
    blob = dev.snapshot()
    fresh = BootTimer(clock=FakeClock())
    fresh.sleep()
    fresh.restore(blob)
    fresh.wake()
    assert register(fresh) == 0xFFFF_FFFF
    assert fresh.elapsed_us() == 0xFFFF_FFFF + 10


@pytest.mark.parametrize(
    "model", [None, [], {}, {"elapsed_us": -1}, {"elapsed_us": "1"}, {"elapsed_us": True}]
)
def test_restore_rejects_malformed_state(model: object) -> None:
    import json

    dev = BootTimer(clock=FakeClock())
    dev.sleep()
    doc = json.loads(dev.snapshot())
    doc["model"] = model
    with pytest.raises((ValueError, LifecycleError)):
        dev.restore(json.dumps(doc).encode())


def test_real_clock_moves_forward() -> None:
    dev = BootTimer()
    a = register(dev)
    for _ in range(10_000):
        b = register(dev)
        if b > a:
            break
    assert b >= a


# -- through virtio-MMIO ---------------------------------------------------------------


def test_register_at_mmio_offset_0x100() -> None:
    clock = FakeClock()
    rig = MmioTestRig(BootTimer(clock=clock))
    assert rig.read_register(Reg.DEVICE_ID) == DeviceId.BOOT_TIMER
    clock.advance_us(0x0A0B0C0D)
    # The guest reads before even negotiating features: a probe needs nothing else.
    assert rig.bus.read(MMIO_BASE + CONFIG_OFFSET, 4) == 0x0A0B0C0D
    assert rig.driver.read_config(0, 4) == 0x0A0B0C0D
    assert rig.bus.read(MMIO_BASE + CONFIG_OFFSET, 2) == 0
    assert rig.bus.read(MMIO_BASE + CONFIG_OFFSET + 4, 4) == 0
    assert rig.bus.read(MMIO_BASE + CONFIG_OFFSET, 8) == 0
    rig.start()
    assert rig.device.state is DeviceState.ACTIVE
    clock.advance_us(1)
    assert rig.driver.read_config(0, 4) == 0x0A0B0C0E
    rig.driver.write_config(0, 4, 0)
    assert rig.driver.read_config(0, 4) == 0x0A0B0C0E
    clock.advance_us(0xFFFF_FFFF)
    assert rig.driver.read_config(0, 4) == 0xFFFF_FFFF


def test_restart_moves_the_start_instant() -> None:
    clock = FakeClock()
    dev = BootTimer(clock=clock)
    clock.advance_us(300)
    dev.restart()
    assert register(dev) == 0
    clock.advance_us(5)
    assert register(dev) == 5
    dev.sleep()
    dev.restart(start=clock.now - 2000)
    assert register(dev) == 2
    clock.advance_us(100)
    dev.wake()
    assert register(dev) == 2


def _conformance_timer() -> BootTimer:
    clock = FakeClock()
    timer = BootTimer(clock=clock)
    clock.advance_us(12_345)
    return timer


def _restart(device: object) -> None:
    assert isinstance(device, BootTimer)
    device.restart()


TestBootTimerConformance = device_conformance(_conformance_timer, modify=_restart)
