"""The driver side of virtio-MMIO version 2.

:class:`MmioDriverTransport` does what a guest kernel's virtio-mmio driver
does, through 32-bit register accesses on an :class:`MmioBus`: it probes the
device (transport-mmio.tex "Device Initialization"), runs the generic
initialization sequence (content.tex "Device Initialization"), places rings
in guest memory with a :class:`~pyvirtio.driver.memory.GuestAllocator` and
programs them ("Virtqueue Configuration"), and sends notifications.  The
per-device drivers in :mod:`pyvirtio.driver` build on it.

The bus is anything that can do MMIO reads and writes: a real VMM's vCPU
thread, a test harness, or :class:`InProcessBus`, which forwards straight to
:class:`~pyvirtio.transport.mmio.MmioTransport` objects in the same process
so a driver and a device can be tested end to end without a VM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.transport import (
    DEFAULT_MAX_INDIRECT,
    DriverTransportBase,
    FeatureNegotiationError,
    MmioDriverError,
    QueueSetupError,
    RingPlan,
)
from pyvirtio.irq import RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import (
    CONFIG_OFFSET,
    MAGIC_VALUE,
    MMIO_VERSION,
    MMIO_WINDOW_SIZE,
    MmioTransport,
    Reg,
)
from pyvirtio.virtqueue.common import DriverQueue

__all__ = [
    "DEFAULT_MAX_INDIRECT",
    "DeviceProbeError",
    "FeatureNegotiationError",
    "InProcessBus",
    "InterruptWaiter",
    "MmioBus",
    "MmioDriverError",
    "MmioDriverTransport",
    "QueueSetupError",
]

T = TypeVar("T")

#: Times :meth:`MmioDriverTransport.reset` re-reads Status waiting for 0.
_RESET_POLLS = 1000
#: Times a config read is retried while the generation keeps changing.
_GENERATION_RETRIES = 100


class MmioBus(Protocol):
    """Little-endian MMIO accesses of ``size`` bytes (1, 2, 4 or 8) at absolute ``addr``."""

    def read(self, addr: int, size: int) -> int: ...

    def write(self, addr: int, size: int, value: int) -> None: ...


@runtime_checkable
class InterruptWaiter(Protocol):
    """Optional bus capability: block until the device may have interrupted.

    Returns False on timeout.  Buses without it are polled.
    """

    def wait_interrupt(self, timeout: float | None) -> bool: ...


class DeviceProbeError(MmioDriverError):
    """No usable virtio-MMIO version 2 device at the address (bad magic, version or ID)."""


class InProcessBus:
    """An MMIO bus over :class:`MmioTransport` objects in this process.

    ``transports`` maps each window's base address to its transport.  With
    ``controller`` (the :class:`~pyvirtio.irq.RecordingInterruptController`
    behind the transports' IRQ lines) :meth:`wait_interrupt` blocks on its
    event instead of the driver polling.
    """

    def __init__(
        self,
        transports: Mapping[int, MmioTransport] | None = None,
        *,
        controller: RecordingInterruptController | None = None,
        window_size: int = MMIO_WINDOW_SIZE,
    ) -> None:
        self.transports: dict[int, MmioTransport] = dict(transports or {})
        self.controller = controller
        self.window_size = window_size

    def add(self, base: int, transport: MmioTransport) -> None:
        self.transports[base] = transport

    def _find(self, addr: int) -> tuple[MmioTransport, int]:
        for base, transport in self.transports.items():
            if base <= addr < base + self.window_size:
                return transport, addr - base
        raise MmioDriverError(f"no device at MMIO address {addr:#x}")

    def read(self, addr: int, size: int) -> int:
        transport, offset = self._find(addr)
        data = bytearray(size)
        transport.read(offset, data)
        return int.from_bytes(data, "little")

    def write(self, addr: int, size: int, value: int) -> None:
        transport, offset = self._find(addr)
        transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def wait_interrupt(self, timeout: float | None) -> bool:
        if self.controller is None:
            time.sleep(0.001 if timeout is None else min(timeout, 0.001))
            return False
        fired = self.controller.event.wait(timeout)
        self.controller.event.clear()
        return fired


@dataclass
class _QueueSetup:
    queue: DriverQueue
    allocations: list[int] = field(default_factory=list)


class MmioDriverTransport(DriverTransportBase[_QueueSetup]):
    """A driver's view of one virtio-MMIO device at ``base`` on ``bus``.

    Checks MagicValue, Version and DeviceID at construction
    (:class:`DeviceProbeError`; ``device_id`` demands a particular type).
    Typical use::

        dev = MmioDriverTransport(bus, base, mem, allocator)
        features = dev.initialize(wanted)     # reset .. FEATURES_OK
        rx = dev.setup_queue(0)
        dev.driver_ok()
        rx.add([], [(buf, 4096)], token)
        if rx.kick_needed():
            dev.notify(0)
    """

    def __init__(
        self,
        bus: MmioBus,
        base: int,
        mem: GuestMemory,
        allocator: GuestAllocator,
        *,
        device_id: int | None = None,
    ) -> None:
        self.bus = bus
        self.base = base
        self.mem = mem
        self.allocator = allocator
        self._lock = threading.RLock()
        magic = self._read32(Reg.MAGIC_VALUE)
        if magic != MAGIC_VALUE:
            raise DeviceProbeError(f"no virtio-mmio device at {base:#x}: magic {magic:#x}")
        version = self._read32(Reg.VERSION)
        if version != MMIO_VERSION:
            raise DeviceProbeError(
                f"virtio-mmio device at {base:#x} has version {version}, need {MMIO_VERSION}"
            )
        self.device_id = self._read32(Reg.DEVICE_ID)
        if self.device_id == 0:
            raise DeviceProbeError(f"virtio-mmio slot at {base:#x} has no device (ID 0)")
        if device_id is not None and self.device_id != device_id:
            raise DeviceProbeError(
                f"virtio-mmio device at {base:#x} has ID {self.device_id}, expected {device_id}"
            )
        self.vendor_id = self._read32(Reg.VENDOR_ID)
        self._features = 0
        self._queues: dict[int, _QueueSetup] = {}

    def __repr__(self) -> str:
        return f"MmioDriverTransport(base={self.base:#x}, device_id={self.device_id})"

    # -- registers ----------------------------------------------------------------

    def _read32(self, offset: int) -> int:
        return self.bus.read(self.base + offset, 4)

    def _write32(self, offset: int, value: int) -> None:
        self.bus.write(self.base + offset, 4, value & 0xFFFF_FFFF)

    @property
    def status(self) -> int:
        """The device status register."""
        return self._read32(Reg.STATUS)

    def add_status(self, bits: int) -> int:
        """Set status bits (the driver never clears any) and return the status read back."""
        with self._lock:
            self._write32(Reg.STATUS, self.status | bits)
            return self.status

    @property
    def needs_reset(self) -> bool:
        """Whether the device set DEVICE_NEEDS_RESET: requests in flight may be lost."""
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    # -- initialization ---------------------------------------------------------------

    def reset(self) -> None:
        """Reset the device and wait until Status reads 0 (content.tex "Device Reset").

        Ring memory of the old queues is freed once the device has confirmed
        the reset, since only then may it no longer touch the rings.
        """
        with self._lock:
            self._write32(Reg.STATUS, 0)
            for _ in range(_RESET_POLLS):
                if self.status == 0:
                    break
            else:
                raise MmioDriverError(f"device at {self.base:#x} did not complete its reset")
            for setup in self._queues.values():
                self._free_allocations(setup.allocations)
            self._queues.clear()
            self._features = 0

    def device_features(self) -> int:
        """All 64 bits of DeviceFeatures (both pages)."""
        with self._lock:
            self._write32(Reg.DEVICE_FEATURES_SEL, 0)
            low = self._read32(Reg.DEVICE_FEATURES)
            self._write32(Reg.DEVICE_FEATURES_SEL, 1)
            high = self._read32(Reg.DEVICE_FEATURES)
            return high << 32 | low

    def write_driver_features(self, features: int) -> None:
        """Write both pages of DriverFeatures (no checks: tests use it to misbehave)."""
        with self._lock:
            self._write32(Reg.DRIVER_FEATURES_SEL, 0)
            self._write32(Reg.DRIVER_FEATURES, features)
            self._write32(Reg.DRIVER_FEATURES_SEL, 1)
            self._write32(Reg.DRIVER_FEATURES, features >> 32)

    def initialize(self, wanted_features: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, negotiate and set FEATURES_OK; returns the features.

        The negotiated set is the offer intersected with ``wanted_features``
        (content.tex "Device Initialization" steps 1-6).  If the device does
        not keep FEATURES_OK set the driver sets FAILED and raises
        :class:`FeatureNegotiationError`.
        """
        with self._lock:
            self.reset()
            self.add_status(DeviceStatus.ACKNOWLEDGE)
            self.add_status(DeviceStatus.DRIVER)
            negotiated = self.device_features() & wanted_features
            self.write_driver_features(negotiated)
            status = self.add_status(DeviceStatus.FEATURES_OK)
            if not status & DeviceStatus.FEATURES_OK:
                self.add_status(DeviceStatus.FAILED)
                raise FeatureNegotiationError(
                    f"device at {self.base:#x} refused features {negotiated:#x}"
                )
            self._features = negotiated
            return negotiated

    def driver_ok(self) -> None:
        """Set DRIVER_OK: the device is live (content.tex "Device Initialization" step 8)."""
        self.add_status(DeviceStatus.DRIVER_OK)

    # -- queues -----------------------------------------------------------------------

    def queue_max_size(self, index: int) -> int:
        """QueueSizeMax of queue ``index``; 0 when the queue does not exist."""
        with self._lock:
            self._write32(Reg.QUEUE_SEL, index)
            return self._read32(Reg.QUEUE_SIZE_MAX)

    def _queue_size_bounds(self, index: int) -> tuple[int, int]:
        """QueueSizeMax is both the default and the limit (transport-mmio.tex
        "Virtqueue Configuration"); a queue already ready is in use."""
        self._write32(Reg.QUEUE_SEL, index)
        if self._read32(Reg.QUEUE_READY):
            raise QueueSetupError(f"queue {index} is already in use")
        max_size = self._read32(Reg.QUEUE_SIZE_MAX)
        if max_size == 0:
            raise QueueSetupError(f"queue {index} is not available")
        return max_size, max_size

    def _program_queue(self, index: int, plan: RingPlan) -> _QueueSetup:
        """QueueSize, the three ring addresses, then QueueReady (transport-mmio.tex
        "Virtqueue Configuration"); QueueSel already selects ``index``."""
        setup = _QueueSetup(*self._allocate_ring(plan))
        try:
            self._write32(Reg.QUEUE_SIZE, plan.size)
            for low, addr in zip(
                (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW),
                setup.allocations[:3],
                strict=True,
            ):
                self._write32(low, addr)
                self._write32(low + 4, addr >> 32)
            self._write32(Reg.QUEUE_READY, 1)
            if not self._read32(Reg.QUEUE_READY):
                raise QueueSetupError(f"device refused to enable queue {index}")
        except BaseException:
            self._free_allocations(setup.allocations)
            raise
        return setup

    def reset_queue(self, index: int) -> None:
        """Reset one queue through QueueReset (needs VIRTIO_F_RING_RESET) and free its rings."""
        with self._lock:
            if not self.has_feature(Feature.RING_RESET):
                raise QueueSetupError("queue reset needs VIRTIO_F_RING_RESET")
            self._write32(Reg.QUEUE_SEL, index)
            self._write32(Reg.QUEUE_RESET, 1)
            for _ in range(_RESET_POLLS):
                if not self._read32(Reg.QUEUE_RESET):
                    break
            else:
                raise MmioDriverError(f"queue {index} reset did not complete")
            setup = self._queues.pop(index, None)
            if setup is not None:
                self._free_allocations(setup.allocations)

    def notify(self, index: int) -> None:
        """Available buffer notification for queue ``index`` (writes its index to QueueNotify)."""
        self._write32(Reg.QUEUE_NOTIFY, index)

    # -- configuration space ------------------------------------------------------------

    @property
    def config_generation(self) -> int:
        return self._read32(Reg.CONFIG_GENERATION)

    def consistent(self, read: Callable[[], T]) -> T:
        """Run ``read`` until ConfigGeneration is the same before and after.

        content.tex "Device Configuration Space": reads of several fields, or
        of fields wider than 32 bits, are only consistent this way.
        """
        for _ in range(_GENERATION_RETRIES):
            before = self.config_generation
            result = read()
            if self.config_generation == before:
                return result
        raise MmioDriverError("configuration space keeps changing")

    def read_config(self, offset: int, size: int) -> int:
        """A little-endian config field of 1, 2, 4 or 8 bytes at ``offset``.

        8-byte fields are read as two 32-bit halves within one generation
        (transport-mmio.tex: 32-bit accesses for 64-bit fields).
        """
        if size == 8:
            return self.consistent(
                lambda: (
                    self._read_config_raw(offset, 4) | self._read_config_raw(offset + 4, 4) << 32
                )
            )
        if size not in (1, 2, 4):
            raise ValueError(f"config field size must be 1, 2, 4 or 8, not {size}")
        return self._read_config_raw(offset, size)

    def _read_config_raw(self, offset: int, size: int) -> int:
        return self.bus.read(self.base + CONFIG_OFFSET + offset, size)

    def read_config_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes of config space with byte accesses, within one generation."""
        return self.consistent(
            lambda: bytes(self._read_config_raw(offset + i, 1) for i in range(length))
        )

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write a config field (8-byte fields as two 32-bit halves)."""
        if size == 8:
            self.bus.write(self.base + CONFIG_OFFSET + offset, 4, value & 0xFFFF_FFFF)
            self.bus.write(self.base + CONFIG_OFFSET + offset + 4, 4, value >> 32 & 0xFFFF_FFFF)
            return
        if size not in (1, 2, 4):
            raise ValueError(f"config field size must be 1, 2, 4 or 8, not {size}")
        self.bus.write(self.base + CONFIG_OFFSET + offset, size, value)

    # -- interrupts -------------------------------------------------------------------------

    def interrupt_status(self) -> int:
        """InterruptStatus: bit 0 used buffers, bit 1 configuration change."""
        return self._read32(Reg.INTERRUPT_STATUS)

    def ack_interrupt(self, bits: int) -> None:
        """Write InterruptACK for the events handled."""
        self._write32(Reg.INTERRUPT_ACK, bits)

    def wait_interrupt(self, timeout: float | None = None) -> int:
        """Wait until InterruptStatus is non-zero, acknowledge and return it (0 on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self.bus if isinstance(self.bus, InterruptWaiter) else None
        while True:
            status = self.interrupt_status()
            if status:
                self.ack_interrupt(status)
                return status
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return 0
            if waiter is not None:
                waiter.wait_interrupt(0.05 if remaining is None else min(remaining, 0.05))
            else:
                time.sleep(0.001 if remaining is None else min(remaining, 0.001))

    # -- shared memory ----------------------------------------------------------------------

    def shared_memory_region(self, shmid: int) -> tuple[int, int] | None:
        """(guest base, length) of shared memory region ``shmid``, None if it does not exist."""
        with self._lock:
            self._write32(Reg.SHM_SEL, shmid)
            length = self._read32(Reg.SHM_LEN_LOW) | self._read32(Reg.SHM_LEN_HIGH) << 32
            base = self._read32(Reg.SHM_BASE_LOW) | self._read32(Reg.SHM_BASE_HIGH) << 32
        if length == 0xFFFF_FFFF_FFFF_FFFF:
            return None
        return base, length
