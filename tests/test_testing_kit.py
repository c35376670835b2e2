"""The conformance kit applied to test-only devices, and shown to catch broken ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from helpers.mmio_devices import CounterDevice, EchoDevice
from pyvirtio.constants import Feature
from pyvirtio.device import COMMON_FEATURES, VirtioDevice
from pyvirtio.testing import DeviceConformance, device_conformance


def _bump_echoed(device: VirtioDevice) -> None:
    assert isinstance(device, EchoDevice)
    device.echoed += 7


# The one-line forms.
TestEchoConformance = device_conformance(EchoDevice, modify=_bump_echoed)
TestEchoSplitOnlyConformance = device_conformance(
    lambda: EchoDevice(COMMON_FEATURES & ~Feature.RING_PACKED.mask)
)


class TestCounterConformance(DeviceConformance):
    """The subclass form, for a device with no queues."""

    def make_device(self) -> VirtioDevice:
        return CounterDevice()

    def modify(self, device: VirtioDevice) -> None:
        assert isinstance(device, CounterDevice)
        device.counter = 41


# -- the kit has teeth ---------------------------------------------------------------------


class NoVersion1(EchoDevice):
    def __init__(self) -> None:
        super().__init__(COMMON_FEATURES & ~Feature.VERSION_1.mask)

    def features_acceptable(self, features: int) -> bool:
        return True


class AcceptsAnything(EchoDevice):
    """Overrides the device's own check; the transport still refuses un-offered bits."""

    def features_acceptable(self, features: int) -> bool:
        return True


class ForgetfulSnapshot(EchoDevice):
    """Restores without the model state: a restored device snapshots differently."""

    def _restore_model(self, state: Any) -> None:
        pass


class EagerDevice(EchoDevice):
    """Processes its queues the moment a queue is notified, even before DRIVER_OK."""

    def queue_notify(self, index: int) -> None:
        if self.activated_with:
            super().queue_notify(index)


def _run(factory: Callable[[], VirtioDevice], test: str, **kwargs: Any) -> None:
    cls = device_conformance(factory, **kwargs)
    getattr(cls(), test)()


def test_kit_catches_missing_version_1() -> None:
    with pytest.raises(AssertionError, match="VERSION_1"):
        _run(NoVersion1, "test_offers_version_1")


def test_transport_refuses_unoffered_bits_even_if_device_accepts() -> None:
    _run(AcceptsAnything, "test_features_ok_refused_for_unoffered_bit")


def test_kit_catches_modify_that_changes_nothing() -> None:
    with pytest.raises(AssertionError, match="modify"):
        _run(EchoDevice, "test_suspend_modify_restore", modify=lambda device: None)


def test_kit_catches_lossy_restore() -> None:
    with pytest.raises(AssertionError, match="snapshots differently"):
        _run(ForgetfulSnapshot, "test_suspend_modify_restore", modify=_bump_echoed)


def test_make_device_is_required() -> None:
    with pytest.raises(NotImplementedError):
        DeviceConformance().test_offers_version_1()


def test_kit_passes_an_eager_but_inactive_device() -> None:
    # Notifies before DRIVER_OK never reach the device, so even an eager
    # model cannot use its queues early through MmioTransport.
    _run(EagerDevice, "test_no_queue_use_before_driver_ok")
