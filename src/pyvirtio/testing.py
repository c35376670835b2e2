"""A conformance kit: the checks every pyvirtio device model must pass.

Apply it to a device in one line of a test module::

    from pyvirtio.testing import device_conformance

    TestEntropyConformance = device_conformance(Entropy, modify=lambda d: ...)

or subclass :class:`DeviceConformance` (pytest collects the inherited
``test_*`` methods of a class named ``Test*``) and override
:meth:`~DeviceConformance.make_device` and, optionally,
:meth:`~DeviceConformance.modify`.

The checks run the device behind a real :class:`~pyvirtio.transport.mmio.
MmioTransport`, driven by :class:`~pyvirtio.driver.mmio.MmioDriverTransport`
over an in-process bus, so they test what a guest would see:

* feature negotiation (content.tex "Feature Bits", "Device Initialization"):
  VERSION_1 is offered; FEATURES_OK is refused for bits never offered and
  without VERSION_1, and accepted for the whole offer;
* reset (content.tex "Device Reset", transport-mmio.tex register rules):
  status, InterruptStatus and QueueReady all read 0 afterwards, and a reset in
  the middle of operation can be followed by a fresh initialization;
* configuration space (content.tex "Device Configuration Space"): readable
  before FEATURES_OK, and consistent (generation stable across reads);
* no queue use before DRIVER_OK (content.tex "Device Status Field");
* the lifecycle of :mod:`pyvirtio.device`: sleep/snapshot/wake with and
  without activation, a snapshot restored into a fresh device snapshots to
  the same bytes, and every wrong-state call raises LifecycleError (after
  crosvm's generic "suspendable" tests).

The module needs no pytest: checks are plain ``assert`` statements with
messages.  :class:`MmioTestRig` (device + transport + driver over one guest
memory) is public for device tests that want the same harness.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, ClassVar

from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import DeviceState, LifecycleError, VirtioDevice
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.mmio import InProcessBus, MmioDriverTransport
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MmioTransport, Reg
from pyvirtio.virtqueue.common import DriverQueue

__all__ = [
    "MMIO_BASE",
    "RIG_MEMORY_SIZE",
    "DeviceConformance",
    "MmioTestRig",
    "canonical_snapshot",
    "device_conformance",
]

#: Guest-physical base of the device's MMIO window in a rig.
MMIO_BASE = 0x1000_0000
#: Guest RAM of a rig, and where the driver's allocator starts in it.
RIG_MEMORY_SIZE = 4 << 20
_ALLOC_BASE = 0x1000
#: Largest queue a rig sets up (keeps the kit fast for devices with huge queues).
RIG_QUEUE_LIMIT = 64


def canonical_snapshot(snapshot: dict[str, Any]) -> bytes:
    """A transport snapshot as canonical JSON bytes, for byte-for-byte comparison."""
    return json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()


class MmioTestRig:
    """A device behind MmioTransport, driven by MmioDriverTransport, in one process.

    ``mem`` may be shared with another rig (to restore a snapshot of this
    one's queues into a fresh device); by default each rig has its own.
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory | None = None) -> None:
        self.device = device
        self.mem = mem if mem is not None else GuestMemory.anonymous(RIG_MEMORY_SIZE)
        self.controller = RecordingInterruptController()
        self.irq = IrqLine(self.controller, 5)
        self.transport = MmioTransport(device, self.mem, self.irq)
        self.bus = InProcessBus({MMIO_BASE: self.transport}, controller=self.controller)
        self.allocator = GuestAllocator(self.mem, _ALLOC_BASE, self.mem.size - _ALLOC_BASE)
        self.driver = MmioDriverTransport(self.bus, MMIO_BASE, self.mem, self.allocator)

    def read_register(self, offset: int) -> int:
        return self.bus.read(MMIO_BASE + offset, 4)

    def write_register(self, offset: int, value: int) -> None:
        self.bus.write(MMIO_BASE + offset, 4, value)

    def queue_sizes(self) -> list[int]:
        """The size the rig gives each queue: a power of two up to RIG_QUEUE_LIMIT."""
        sizes = []
        for max_size in self.device.queue_max_sizes:
            size = min(max_size, RIG_QUEUE_LIMIT)
            sizes.append(1 << (size.bit_length() - 1) if size else 0)
        return sizes

    def setup_queues(self) -> list[DriverQueue]:
        """Set up every queue the device declares (after :meth:`initialize`)."""
        return [
            self.driver.setup_queue(index, size)
            for index, size in enumerate(self.queue_sizes())
            if size
        ]

    def initialize(self, features: int | None = None) -> int:
        """Reset .. FEATURES_OK with ``features`` (default: the whole offer)."""
        wanted = self.device.offered_features if features is None else features
        return self.driver.initialize(wanted)

    def start(self, features: int | None = None) -> list[DriverQueue]:
        """Initialize, set up every queue and set DRIVER_OK; returns the driver queues."""
        self.initialize(features)
        queues = self.setup_queues()
        self.driver.driver_ok()
        return queues


def _feature_sets(device: VirtioDevice, base: int | None) -> list[int]:
    """The feature sets the round-trip checks use: split rings, and packed if offered."""
    offered = device.offered_features if base is None else base
    sets = [offered & ~Feature.RING_PACKED.mask]
    if offered & Feature.RING_PACKED.mask:
        sets.append(offered)
    return sets


class DeviceConformance:
    """The checks; subclass as ``Test...`` and implement :meth:`make_device`."""

    #: Features the driver asks for in the operational checks; None: the whole offer.
    wanted_features: ClassVar[int | None] = None
    #: False for a device whose config space moves on its own (a clock register):
    #: then only readability, not equality of two reads, is checked.
    config_is_static: ClassVar[bool] = True

    def make_device(self) -> VirtioDevice:
        """A fresh device, in state NEW."""
        raise NotImplementedError("a DeviceConformance subclass must implement make_device")

    def modify(self, device: VirtioDevice) -> None:
        """Change an asleep, activated device so its snapshot differs (default: nothing).

        When overridden, the kit checks that the snapshot did change, so the
        restore check compares something beyond the initial state.
        """

    def _modifies(self) -> bool:
        return type(self).modify is not DeviceConformance.modify

    def _rig(self, mem: GuestMemory | None = None) -> MmioTestRig:
        device = self.make_device()
        assert device.state is DeviceState.NEW, f"make_device gave a {device.state} device"
        return MmioTestRig(device, mem)

    # -- feature negotiation -----------------------------------------------------------

    def test_offers_version_1(self) -> None:
        rig = self._rig()
        offered = rig.driver.device_features()
        assert offered == rig.device.offered_features, "DeviceFeatures pages disagree"
        assert offered & Feature.VERSION_1.mask, "device does not offer VIRTIO_F_VERSION_1"
        assert rig.read_register(Reg.DEVICE_ID) == int(rig.device.device_id)

    def test_features_ok_refused_for_unoffered_bit(self) -> None:
        rig = self._rig()
        offered = rig.device.offered_features
        unoffered = next(bit for bit in range(64) if not offered >> bit & 1)
        status = self._negotiate_raw(rig, offered | 1 << unoffered)
        assert not status & DeviceStatus.FEATURES_OK, (
            f"FEATURES_OK accepted with feature bit {unoffered}, which was never offered"
        )

    def test_features_ok_refused_without_version_1(self) -> None:
        rig = self._rig()
        status = self._negotiate_raw(rig, rig.device.offered_features & ~Feature.VERSION_1.mask)
        assert not status & DeviceStatus.FEATURES_OK, "FEATURES_OK accepted without VERSION_1"

    def test_features_ok_accepted_for_offer(self) -> None:
        rig = self._rig()
        offered = rig.device.offered_features
        status = self._negotiate_raw(rig, offered)
        assert status & DeviceStatus.FEATURES_OK, "FEATURES_OK refused for the device's own offer"
        assert rig.device.acked_features == offered

    @staticmethod
    def _negotiate_raw(rig: MmioTestRig, features: int) -> int:
        driver = rig.driver
        driver.reset()
        driver.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        driver.write_driver_features(features)
        return driver.add_status(DeviceStatus.FEATURES_OK)

    # -- reset --------------------------------------------------------------------------

    def test_reset_clears_device(self) -> None:
        rig = self._rig()
        rig.start(self.wanted_features)
        assert rig.device.state is DeviceState.ACTIVE, "device not active after DRIVER_OK"
        rig.irq.trigger_config()
        rig.irq.trigger_queue()
        rig.driver.reset()
        assert rig.driver.status == 0
        assert rig.driver.interrupt_status() == 0, "InterruptStatus not cleared by reset"
        for index in range(rig.device.num_queues):
            rig.write_register(Reg.QUEUE_SEL, index)
            assert rig.read_register(Reg.QUEUE_READY) == 0, f"queue {index} ready after reset"
        assert _state_of(rig.device) is DeviceState.INACTIVE, "device still active after reset"
        assert rig.device.acked_features == 0, "negotiated features survive reset"

    def test_reinitialize_after_reset(self) -> None:
        rig = self._rig()
        for features in _feature_sets(rig.device, self.wanted_features) * 2:
            rig.start(features)
            assert rig.device.state is DeviceState.ACTIVE
            status = rig.driver.status
            assert status & DeviceStatus.DRIVER_OK, f"DRIVER_OK not set: {status:#x}"
            assert not status & DeviceStatus.DEVICE_NEEDS_RESET, "needs reset after init"
            rig.driver.reset()

    # -- configuration space ----------------------------------------------------------

    def test_config_readable_before_features_ok(self) -> None:
        rig = self._rig()
        rig.driver.reset()
        rig.driver.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        length = max(len(rig.device.config_bytes()), 16)
        before = rig.driver.config_generation
        first = rig.driver.read_config_bytes(0, length)
        second = rig.driver.read_config_bytes(0, length)
        assert len(first) == len(second) == length
        if self.config_is_static:
            assert rig.driver.config_generation == before, "config generation moved on its own"
            assert first == second, "two config reads in one generation differ"
            assert first == rig.device.read_config(0, length)

    # -- queues --------------------------------------------------------------------------

    def test_no_queue_use_before_driver_ok(self) -> None:
        rig = self._rig()
        rig.initialize(self.wanted_features)
        queues = rig.setup_queues()
        buffers = []
        for index, queue in enumerate(queues):
            buf = rig.allocator.alloc(128)
            buffers.append(buf)
            queue.add([(buf, 64)], [(buf + 64, 64)], token=index)
            rig.driver.notify(index)
        for queue in queues:
            assert not list(queue.used()), "buffer used before DRIVER_OK"
        assert rig.driver.interrupt_status() == 0, "interrupt before DRIVER_OK"
        assert not rig.controller.pulses, "interrupt line pulsed before DRIVER_OK"
        assert rig.device.state is DeviceState.NEW, "device activated before DRIVER_OK"
        assert not rig.driver.status & DeviceStatus.DEVICE_NEEDS_RESET

    # -- lifecycle ------------------------------------------------------------------------

    def test_unactivated_sleep_snapshot_wake(self) -> None:
        device = self.make_device()
        assert device.sleep() is None, "an unactivated device handed back queues"
        device.snapshot()
        device.wake()
        assert device.state is DeviceState.NEW
        _transport_sleep_snapshot_wake(self._rig(), DeviceState.NEW)

    def test_sleep_snapshot_wake(self) -> None:
        rig = self._rig()
        rig.start(self.wanted_features)
        resources = rig.device.sleep()
        assert resources is not None, "an active device handed back no queues"
        assert len(resources.queues) == rig.device.num_queues
        rig.device.snapshot()
        rig.device.wake(resources)
        assert rig.device.state is DeviceState.ACTIVE
        _transport_sleep_snapshot_wake(rig, DeviceState.ACTIVE)

    def test_suspend_modify_restore(self) -> None:
        probe = self.make_device()
        for features in _feature_sets(probe, self.wanted_features):
            rig = self._rig()
            rig.start(features)
            rig.transport.sleep()
            unmodified = canonical_snapshot(rig.transport.snapshot())
            self.modify(rig.device)
            snap = rig.transport.snapshot()
            if self._modifies():
                assert canonical_snapshot(snap) != unmodified, (
                    "modify() did not change the device's snapshot"
                )
            rig.transport.wake()

            fresh = self._rig(rig.mem)
            fresh.transport.sleep()
            fresh.transport.restore(snap)
            again = fresh.transport.snapshot()
            assert canonical_snapshot(again) == canonical_snapshot(snap), (
                "a restored device snapshots differently"
            )
            assert fresh.device.snapshot() == _device_snapshot(snap), "device snapshot differs"
            fresh.transport.wake()
            assert fresh.device.state is DeviceState.ACTIVE
            assert fresh.driver.status & DeviceStatus.DRIVER_OK

    def test_wrong_state_calls_raise(self) -> None:
        rig = self._rig()
        device = rig.device
        _expect_lifecycle_error(device.snapshot, "snapshot while awake")
        _expect_lifecycle_error(lambda: device.restore(b"{}"), "restore while awake")
        _expect_lifecycle_error(device.wake, "wake while awake")
        device.sleep()
        _expect_lifecycle_error(device.sleep, "sleep while asleep")
        _expect_lifecycle_error(device.reset, "reset while asleep")
        _expect_lifecycle_error(
            lambda: device.activate(rig.mem, rig.irq, []), "activate while asleep"
        )
        device.wake()
        rig.start(self.wanted_features)
        assert device.state is DeviceState.ACTIVE
        _expect_lifecycle_error(
            lambda: device.activate(rig.mem, rig.irq, device.queues), "activate while active"
        )
        _expect_lifecycle_error(device.wake, "wake while active")
        resources = device.sleep()
        _expect_lifecycle_error(device.wake, "waking an active device without its queues")
        device.wake(resources)
        assert device.state is DeviceState.ACTIVE


def _device_snapshot(snapshot: dict[str, Any]) -> bytes:
    """The device's own snapshot bytes inside a transport snapshot."""
    return base64.b64decode(snapshot["device"])


def _state_of(device: VirtioDevice) -> DeviceState:
    """The device's state, read through a call so type narrowing does not stick."""
    return device.state


def _transport_sleep_snapshot_wake(rig: MmioTestRig, state: DeviceState) -> None:
    """Sleep, snapshot and wake through the transport; the device must be back in ``state``."""
    rig.transport.sleep()
    rig.transport.snapshot()
    rig.transport.wake()
    assert rig.device.state is state


def _expect_lifecycle_error(call: Callable[[], object], what: str) -> None:
    try:
        call()
    except LifecycleError:
        return
    raise AssertionError(f"{what} did not raise LifecycleError")


def device_conformance(
    factory: Callable[[], VirtioDevice],
    *,
    modify: Callable[[VirtioDevice], None] | None = None,
    wanted_features: int | None = None,
    config_is_static: bool = True,
) -> type[DeviceConformance]:
    """A :class:`DeviceConformance` subclass for ``factory``; assign it to a ``Test*`` name."""

    attrs: dict[str, Any] = {
        "make_device": lambda self: factory(),
        "wanted_features": wanted_features,
        "config_is_static": config_is_static,
    }
    if modify is not None:
        attrs["modify"] = lambda self, device: modify(device)
    return type("DeviceConformanceTests", (DeviceConformance,), attrs)
