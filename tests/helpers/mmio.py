"""A virtio-MMIO transport poked through raw register accesses, for the MMIO transport tests.

:class:`Harness` puts an :class:`~helpers.mmio_devices.EchoDevice` (or the
device given) behind an MmioTransport in 1 MiB of guest memory with a
recording interrupt controller; the test is the driver, register by register.
"""

from __future__ import annotations

from helpers.mmio_devices import EchoDevice
from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import COMMON_FEATURES
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MmioTransport, Reg
from pyvirtio.virtqueue.split import SplitDriverQueue

ACK = DeviceStatus.ACKNOWLEDGE
DRIVER = DeviceStatus.DRIVER
FEATURES_OK = DeviceStatus.FEATURES_OK
DRIVER_OK = DeviceStatus.DRIVER_OK
NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET
SPLIT_FEATURES = COMMON_FEATURES & ~Feature.RING_PACKED.mask

#: Ring areas of queue 0 and queue 1 in the harness memory.
Q0 = (0x1000, 0x2000, 0x3000)
Q1 = (0x4000, 0x5000, 0x6000)


class Harness:
    """A transport over an EchoDevice, poked through raw register accesses."""

    def __init__(self, device: EchoDevice | None = None, mem: GuestMemory | None = None) -> None:
        self.device = device if device is not None else EchoDevice()
        self.mem = mem if mem is not None else GuestMemory.anonymous(1 << 20)
        self.controller = RecordingInterruptController()
        self.irq = IrqLine(self.controller, 3)
        self.t = MmioTransport(self.device, self.mem, self.irq)

    def r(self, offset: int, size: int = 4) -> int:
        data = bytearray(size)
        self.t.read(offset, data)
        return int.from_bytes(data, "little")

    def w(self, offset: int, value: int, size: int = 4) -> None:
        self.t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def status(self) -> int:
        return self.r(Reg.STATUS)

    def set_status(self, bits: int) -> int:
        self.w(Reg.STATUS, self.status() | bits)
        return self.status()

    def write_features(self, features: int) -> None:
        self.w(Reg.DRIVER_FEATURES_SEL, 0)
        self.w(Reg.DRIVER_FEATURES, features & 0xFFFF_FFFF)
        self.w(Reg.DRIVER_FEATURES_SEL, 1)
        self.w(Reg.DRIVER_FEATURES, features >> 32)

    def negotiate(self, features: int = SPLIT_FEATURES) -> int:
        self.w(Reg.STATUS, 0)
        self.set_status(ACK | DRIVER)
        self.write_features(features)
        return self.set_status(FEATURES_OK)

    def program_queue(
        self, index: int, size: int, areas: tuple[int, int, int], *, ready: bool = True
    ) -> None:
        self.w(Reg.QUEUE_SEL, index)
        self.w(Reg.QUEUE_SIZE, size)
        for low, addr in zip(
            (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW), areas, strict=True
        ):
            self.w(low, addr)
            self.w(low + 4, addr >> 32)
        if ready:
            self.w(Reg.QUEUE_READY, 1)

    def queue_ready(self, index: int) -> int:
        self.w(Reg.QUEUE_SEL, index)
        return self.r(Reg.QUEUE_READY)

    def start(self, features: int = SPLIT_FEATURES) -> None:
        assert self.negotiate(features) & FEATURES_OK
        self.program_queue(0, 16, Q0)
        self.program_queue(1, 8, Q1)
        assert self.set_status(DRIVER_OK) & DRIVER_OK

    def driver_queue(self, size: int = 16, areas: tuple[int, int, int] = Q0) -> SplitDriverQueue:
        return SplitDriverQueue(self.mem, size, *areas)
