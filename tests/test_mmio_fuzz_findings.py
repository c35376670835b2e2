"""Regression tests for what fuzz/fuzz_mmio.py found in MmioTransport.

A guest that repeats a mistake must cost one log line, however it loops:
the rate limit covers activation failures and failed queue re-enables too,
not only refused register accesses.
"""

from __future__ import annotations

import logging

import pytest

from helpers.mmio_devices import EchoDevice
from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import COMMON_FEATURES
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MmioTransport, Reg

SPLIT = COMMON_FEATURES & ~Feature.RING_PACKED.mask
#: Ring areas beyond the end of guest memory: QueueReady accepts them (the
#: device checks the rings when it builds the queue), building fails.
OUTSIDE = (0xFFFF_FFFF_FFFF_F000, 0x2000, 0x3000)
INSIDE = (0x1000, 0x2000, 0x3000)


class Guest:
    def __init__(self, features: int) -> None:
        self.device = EchoDevice(features)
        self.t = MmioTransport(
            self.device, GuestMemory.anonymous(1 << 16), IrqLine(RecordingInterruptController(), 3)
        )

    def w(self, offset: int, value: int) -> None:
        self.t.write(offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def r(self, offset: int) -> int:
        data = bytearray(4)
        self.t.read(offset, data)
        return int.from_bytes(data, "little")

    def negotiate(self, features: int) -> None:
        self.w(Reg.STATUS, 0)
        self.w(Reg.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        for page in (0, 1):
            self.w(Reg.DRIVER_FEATURES_SEL, page)
            self.w(Reg.DRIVER_FEATURES, features >> (32 * page))
        self.w(Reg.STATUS, self.r(Reg.STATUS) | DeviceStatus.FEATURES_OK)
        assert self.r(Reg.STATUS) & DeviceStatus.FEATURES_OK

    def program_queue(self, areas: tuple[int, int, int]) -> None:
        self.w(Reg.QUEUE_SEL, 0)
        self.w(Reg.QUEUE_SIZE, 8)
        for low, addr in zip(
            (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW), areas, strict=True
        ):
            self.w(low, addr)
            self.w(low + 4, addr >> 32)
        self.w(Reg.QUEUE_READY, 1)


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


def test_repeated_failed_activation_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    guest = Guest(SPLIT)
    with caplog.at_level(logging.INFO, logger="pyvirtio.transport.mmio"):
        for _ in range(5):
            guest.negotiate(SPLIT)
            guest.program_queue(OUTSIDE)
            guest.w(Reg.STATUS, guest.r(Reg.STATUS) | DeviceStatus.DRIVER_OK)
            assert guest.r(Reg.STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
    assert _lines(caplog, "activation failed") == 1


def test_repeated_failed_queue_re_enable_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    features = SPLIT | Feature.RING_RESET.mask
    guest = Guest(features)
    with caplog.at_level(logging.INFO, logger="pyvirtio.transport.mmio"):
        for _ in range(5):
            guest.negotiate(features)
            guest.program_queue(INSIDE)
            guest.w(Reg.STATUS, guest.r(Reg.STATUS) | DeviceStatus.DRIVER_OK)
            guest.w(Reg.QUEUE_RESET, 1)
            guest.program_queue(OUTSIDE)  # re-enabled while the device runs: fails
            assert guest.r(Reg.STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
            assert guest.r(Reg.QUEUE_READY) == 0
    assert _lines(caplog, "cannot re-enable queue") == 1
