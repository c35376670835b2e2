"""The device side of virtio-MMIO version 2, as a bus device a VMM maps into a guest.

A VMM routes every guest access inside the device's MMIO window to
:meth:`MmioTransport.read` / :meth:`MmioTransport.write` with the offset from
the window's base.  The transport keeps the registers of transport-mmio.tex
("MMIO Device Register Layout"), runs the status state machine of content.tex
("Device Status Field", "Device Initialization", "Device Reset") and, when the
driver sets DRIVER_OK, builds the device-side virtqueues the driver configured
and activates the device model with them.

Everything here is driven by an untrusted guest.  ``read`` and ``write``
never raise: a malformed access or register sequence is answered as the
specification says (a refused FEATURES_OK, a QueueSizeMax of zero for a
queue that does not exist, ...) or ignored, logged at most once per kind of
mistake and register so a hostile guest cannot flood the log, and any
unexpected exception from the device model is caught, logged and the access
answered (reads give zero).

Unready queues: ``VirtioDevice.activate`` always gets one queue per entry of
``queue_max_sizes``; a queue the driver did not enable is a
:class:`~pyvirtio.virtqueue.disabled.DisabledQueue` there, which never has
buffers.  Drivers need not enable every queue (Linux only sets up the queues
its device driver asks for), so refusing activation would break real guests;
a model that cannot work without some queue refuses in ``_on_activate``.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import LifecycleError, QueueResources, VirtioDevice
from pyvirtio.irq import IrqLine
from pyvirtio.memory import GuestMemory
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DeviceQueue
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

__all__ = [
    "CONFIG_OFFSET",
    "MAGIC_VALUE",
    "MMIO_VERSION",
    "MMIO_WINDOW_SIZE",
    "VENDOR_ID",
    "MmioTransport",
    "Reg",
]

log = logging.getLogger(__name__)

#: MagicValue: "virt" read as a little-endian u32.
MAGIC_VALUE = 0x74726976
#: The non-legacy virtio-MMIO version.
MMIO_VERSION = 2
#: VendorID: pyvirtio's own, "pyvt" read as a little-endian u32 (as MagicValue
#: spells "virt").  The spec assigns no vendor IDs; Linux only displays it.
VENDOR_ID = 0x74767970
#: Device-specific configuration space starts here.
CONFIG_OFFSET = 0x100
#: Default size of one device's MMIO window (one 4 KiB page, as most VMMs use).
MMIO_WINDOW_SIZE = 0x1000

_U32_MASK = 0xFFFF_FFFF
_U64_MASK = 0xFFFF_FFFF_FFFF_FFFF
#: Status bits the driver owns; DEVICE_NEEDS_RESET is the device's.
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_FEATURES_OK = int(DeviceStatus.FEATURES_OK)
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)


class Reg:
    """Register offsets (transport-mmio.tex, "MMIO Device Register Layout")."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_SIZE_MAX = 0x034
    QUEUE_SIZE = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


#: Per-queue registers the driver programs before enabling a queue.
_QUEUE_SETUP_REGS = frozenset(
    {
        Reg.QUEUE_SIZE,
        Reg.QUEUE_DESC_LOW,
        Reg.QUEUE_DESC_HIGH,
        Reg.QUEUE_DRIVER_LOW,
        Reg.QUEUE_DRIVER_HIGH,
        Reg.QUEUE_DEVICE_LOW,
        Reg.QUEUE_DEVICE_HIGH,
    }
)
#: Registers the driver may only write (direction W in the register table).
_WRITE_ONLY = _QUEUE_SETUP_REGS | {
    Reg.DEVICE_FEATURES_SEL,
    Reg.DRIVER_FEATURES,
    Reg.DRIVER_FEATURES_SEL,
    Reg.QUEUE_SEL,
    Reg.QUEUE_NOTIFY,
    Reg.INTERRUPT_ACK,
    Reg.SHM_SEL,
}
#: Registers the driver may only read (direction R).
_READ_ONLY = frozenset(
    {
        Reg.MAGIC_VALUE,
        Reg.VERSION,
        Reg.DEVICE_ID,
        Reg.VENDOR_ID,
        Reg.DEVICE_FEATURES,
        Reg.QUEUE_SIZE_MAX,
        Reg.INTERRUPT_STATUS,
        Reg.SHM_LEN_LOW,
        Reg.SHM_LEN_HIGH,
        Reg.SHM_BASE_LOW,
        Reg.SHM_BASE_HIGH,
        Reg.CONFIG_GENERATION,
    }
)


@dataclass
class _QueueConfig:
    """What the driver programmed for one queue through the queue registers.

    Addresses are None until the driver writes either half: "unset" is
    distinct from guest address 0, and QueueReady needs all three set.
    """

    max_size: int
    size: int = 0
    ready: bool = False
    desc: int | None = None
    driver: int | None = None
    device: int | None = None

    def clear(self) -> None:
        self.size = 0
        self.ready = False
        self.desc = self.driver = self.device = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "ready": self.ready,
            "desc": self.desc,
            "driver": self.driver,
            "device": self.device,
        }

    def load(self, doc: dict[str, Any]) -> None:
        self.size = _opt_int(doc["size"]) or 0
        self.ready = bool(doc["ready"])
        self.desc = _opt_int(doc["desc"])
        self.driver = _opt_int(doc["driver"])
        self.device = _opt_int(doc["device"])


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _set_half(current: int | None, value: int, high: bool) -> int:
    base = current or 0
    if high:
        return (base & _U32_MASK) | (value << 32)
    return (base & ~_U32_MASK & _U64_MASK) | value


class MmioTransport:
    """One virtio device behind a virtio-MMIO version 2 register window.

    ``irq`` is the device's interrupt line; it holds InterruptStatus and is
    what the device model gets as its :class:`~pyvirtio.irq.DeviceInterrupt`.
    ``mem`` is the guest memory the rings live in.

    Thread-safe: a reentrant lock serialises register accesses (vCPU
    threads) against device-side callbacks such as a device thread reporting
    a broken queue.  A QueueNotify is processed under the lock, so a reset
    from another vCPU never tears a device down in the middle of a request.

    ``sleep``/``wake``/``snapshot``/``restore`` follow the device lifecycle
    of :mod:`pyvirtio.device`: snapshot and restore only while asleep; to
    restore, build a fresh transport over a fresh device, ``sleep()`` it,
    ``restore(snapshot)``, then ``wake()``.
    """

    # Register state, set by _clear_registers at construction and reset.
    _status: int
    _device_features_sel: int
    _driver_features_sel: int
    _driver_features: int
    _queue_sel: int
    _shm_sel: int
    _packed: bool

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        irq: IrqLine,
        *,
        vendor_id: int = VENDOR_ID,
        window_size: int = MMIO_WINDOW_SIZE,
    ) -> None:
        if window_size <= CONFIG_OFFSET:
            raise ValueError(f"MMIO window of {window_size:#x} bytes leaves no config space")
        self.device = device
        self.mem = mem
        self.irq = irq
        self.vendor_id = vendor_id & _U32_MASK
        self.window_size = window_size
        self._lock = threading.RLock()
        self._log = RateLimitedLog(log, f"virtio-mmio({device.name})")
        self._queues = [_QueueConfig(max_size) for max_size in device.queue_max_sizes]
        self._clear_registers()
        self._asleep = False
        self._sleeping: QueueResources | None = None
        device.on_needs_reset = self._on_device_needs_reset

    def __repr__(self) -> str:
        return f"MmioTransport({self.device.name}, status={self._status:#x})"

    @property
    def lock(self) -> threading.RLock:
        """The lock every register access holds.

        Device models are not thread-safe (sans-IO: the host serialises
        calls).  A host that calls a model's own entry points from a thread
        other than the vCPU's (``Console.feed_input``, a back end becoming
        readable) holds this lock around the call, so it cannot interleave
        with a guest's register access or a queue notification.
        """
        return self._lock

    # -- bus interface ---------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        """Guest read of ``len(data)`` bytes at ``offset``: fills ``data`` (little-endian)."""
        size = len(data)
        try:
            with self._lock:
                value = self._read(offset, size)
            data[:] = value.to_bytes(size, "little")
        except Exception:
            self._log.warn(
                "exception-read",
                offset,
                "error on %d-byte read at %#x, answered 0",
                size,
                offset,
                exc_info=True,
            )
            data[:] = bytes(size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Guest write of ``data`` (little-endian) at ``offset``."""
        raw = bytes(data)
        try:
            with self._lock:
                self._write(offset, raw)
        except Exception:
            self._log.warn(
                "exception-write",
                offset,
                "error on %d-byte write at %#x, ignored",
                len(raw),
                offset,
                exc_info=True,
            )

    # -- register reads ----------------------------------------------------------

    def _read(self, offset: int, size: int) -> int:
        if CONFIG_OFFSET <= offset < self.window_size:
            return self._read_config(offset - CONFIG_OFFSET, size)
        if not self._register_access_ok(offset, size, "read"):
            return 0
        if offset in _WRITE_ONLY:
            self._log.warn("read-wo", offset, "read of write-only register %#x", offset)
            return 0
        return self._read_register(offset) & _U32_MASK

    def _register_access_ok(self, offset: int, size: int, what: str) -> bool:
        """Control registers take 32-bit aligned accesses only (driver requirements)."""
        if not 0 <= offset < CONFIG_OFFSET:
            self._log.warn(f"{what}-range", offset, "%s outside the window at %#x", what, offset)
            return False
        if size != 4 or offset % 4:
            self._log.warn(
                f"{what}-width", offset, "%d-byte %s of register %#x refused", size, what, offset
            )
            return False
        return True

    def _read_register(self, offset: int) -> int:
        device = self.device
        if offset == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == Reg.VERSION:
            return MMIO_VERSION
        if offset == Reg.DEVICE_ID:
            return int(device.device_id)
        if offset == Reg.VENDOR_ID:
            return self.vendor_id
        if offset == Reg.DEVICE_FEATURES:
            sel = self._device_features_sel
            return device.offered_features >> (32 * sel) if sel < 2 else 0
        if offset == Reg.QUEUE_SIZE_MAX:
            cfg = self._selected_queue()
            return cfg.max_size if cfg is not None else 0
        if offset == Reg.QUEUE_READY:
            cfg = self._selected_queue()
            return int(cfg is not None and cfg.ready)
        if offset == Reg.QUEUE_RESET:
            return 0  # a queue reset completes within the write that requests it
        if offset == Reg.INTERRUPT_STATUS:
            return self.irq.status
        if offset == Reg.STATUS:
            return self._status
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return self._read_shm(offset)
        if offset == Reg.CONFIG_GENERATION:
            return device.config_generation
        self._log.warn("read-unknown", offset, "read of unknown register %#x", offset)
        return 0

    def _read_shm(self, offset: int) -> int:
        """Shared memory region registers; a nonexistent region reads as all ones."""
        regions = self.device.shared_memory_regions()
        if self._shm_sel < len(regions):
            base, length = regions[self._shm_sel]
        else:
            base = length = _U64_MASK
        value = length if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH) else base
        if offset in (Reg.SHM_LEN_HIGH, Reg.SHM_BASE_HIGH):
            value >>= 32
        return value & _U32_MASK

    def _read_config(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8):
            self._log.warn("read-config-width", size, "%d-byte config read refused", size)
            return 0
        data = bytes(self.device.read_config(offset, size))[:size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def _selected_queue(self) -> _QueueConfig | None:
        sel = self._queue_sel
        return self._queues[sel] if sel < len(self._queues) else None

    # -- register writes -------------------------------------------------------

    def _write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if CONFIG_OFFSET <= offset < self.window_size:
            if size not in (1, 2, 4, 8):
                self._log.warn("write-config-width", size, "%d-byte config write refused", size)
            elif self._asleep:
                self._log.warn("write-asleep", offset, "config write while asleep ignored")
            else:
                self.device.write_config(offset - CONFIG_OFFSET, data)
            return
        if not self._register_access_ok(offset, size, "write"):
            return
        if offset in _READ_ONLY:
            self._log.warn("write-ro", offset, "write to read-only register %#x ignored", offset)
            return
        if self._asleep:
            # A paused device takes no guest writes; a VMM pauses its vCPUs first.
            self._log.warn("write-asleep", offset, "write to %#x while asleep ignored", offset)
            return
        self._write_register(offset, int.from_bytes(data, "little"))

    def _write_register(self, offset: int, value: int) -> None:
        if offset == Reg.DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == Reg.QUEUE_SEL:
            self._queue_sel = value
        elif offset in _QUEUE_SETUP_REGS:
            self._write_queue_setup(offset, value)
        elif offset == Reg.QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == Reg.QUEUE_RESET:
            self._write_queue_reset(value)
        elif offset == Reg.QUEUE_NOTIFY:
            self._notify(value)
        elif offset == Reg.INTERRUPT_ACK:
            self.irq.ack(value)
        elif offset == Reg.STATUS:
            self._write_status(value)
        elif offset == Reg.SHM_SEL:
            self._shm_sel = value
        else:
            self._log.warn("write-unknown", offset, "write to unknown register %#x", offset)

    def _write_driver_features(self, value: int) -> None:
        """DriverFeatures: one 32-bit page of the driver's choice, before FEATURES_OK."""
        if self._status & _FEATURES_OK:
            self._log.warn("state", Reg.DRIVER_FEATURES, "DriverFeatures after FEATURES_OK")
            return
        sel = self._driver_features_sel
        if sel > 1:
            if value:
                self._log.warn(
                    "state", Reg.DRIVER_FEATURES_SEL, "driver features page %d ignored", sel
                )
            return
        shift = 32 * sel
        self._driver_features = (self._driver_features & ~(_U32_MASK << shift)) | (value << shift)

    def _queue_config_writable(self, offset: int) -> _QueueConfig | None:
        """The selected queue if the driver may configure it now, else None (logged).

        Queue registers are programmed while the queue is not ready, before
        DRIVER_OK, or after DRIVER_OK only to re-enable a queue reset through
        QueueReset (VIRTIO_F_RING_RESET).
        """
        cfg = self._selected_queue()
        if cfg is None:
            self._log.warn(
                "queue-sel",
                offset,
                "queue register %#x for nonexistent queue %d",
                offset,
                self._queue_sel,
            )
            return None
        if cfg.ready:
            self._log.warn("state", offset, "queue register %#x written while ready", offset)
            return None
        if self._status & _DRIVER_OK and not self._negotiated(Feature.RING_RESET):
            self._log.warn("state", offset, "queue register %#x written after DRIVER_OK", offset)
            return None
        return cfg

    def _write_queue_setup(self, offset: int, value: int) -> None:
        cfg = self._queue_config_writable(offset)
        if cfg is None:
            return
        if offset == Reg.QUEUE_SIZE:
            cfg.size = value
        elif offset in (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DESC_HIGH):
            cfg.desc = _set_half(cfg.desc, value, offset == Reg.QUEUE_DESC_HIGH)
        elif offset in (Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DRIVER_HIGH):
            cfg.driver = _set_half(cfg.driver, value, offset == Reg.QUEUE_DRIVER_HIGH)
        else:
            cfg.device = _set_half(cfg.device, value, offset == Reg.QUEUE_DEVICE_HIGH)

    def _write_queue_ready(self, value: int) -> None:
        if value == 0:
            cfg = self._selected_queue()
            if cfg is not None and cfg.ready:
                # "To stop using the queue the driver MUST write zero": the
                # device stops touching it at once.
                cfg.ready = False
                self._disable_live_queue(self._queue_sel)
            return
        cfg = self._queue_config_writable(Reg.QUEUE_READY)
        if cfg is None:
            return
        if value != 1:
            self._log.warn("queue-ready", Reg.QUEUE_READY, "QueueReady value %#x ignored", value)
            return
        if not self._status & _FEATURES_OK:
            # The ring format (RING_PACKED) is only known once features are.
            self._log.warn("state", Reg.QUEUE_READY, "QueueReady before FEATURES_OK ignored")
            return
        problem = self._queue_config_problem(cfg)
        if problem is not None:
            kind, message = problem
            self._log.warn(kind, Reg.QUEUE_READY, "QueueReady refused: %s", message)
            return
        cfg.ready = True
        if self._status & _DRIVER_OK:
            self._enable_live_queue(self._queue_sel, cfg)

    def _queue_config_problem(self, cfg: _QueueConfig) -> tuple[str, str] | None:
        """Why QueueReady=1 cannot be accepted: (log kind, message), or None."""
        if not 0 < cfg.size <= cfg.max_size:
            return "queue-size", f"queue size {cfg.size} not in 1..{cfg.max_size}"
        if not self._negotiated(Feature.RING_PACKED) and cfg.size & (cfg.size - 1):
            return "queue-size-pow2", f"split queue size {cfg.size} is not a power of two"
        if cfg.desc is None or cfg.driver is None or cfg.device is None:
            return "queue-addr", "ring addresses not all set"
        return None

    def _write_queue_reset(self, value: int) -> None:
        """QueueReset: reset one queue to its defaults (VIRTIO_F_RING_RESET only)."""
        if value != 1:
            return
        if not self._negotiated(Feature.RING_RESET):
            self._log.warn("state", Reg.QUEUE_RESET, "QueueReset without VIRTIO_F_RING_RESET")
            return
        cfg = self._selected_queue()
        if cfg is None:
            self._log.warn("queue-sel", Reg.QUEUE_RESET, "QueueReset of nonexistent queue")
            return
        was_ready = cfg.ready
        cfg.clear()
        if was_ready:
            self._disable_live_queue(self._queue_sel)

    def _notify(self, value: int) -> None:
        """QueueNotify: the queue index (low 16 bits with VIRTIO_F_NOTIFICATION_DATA)."""
        index = value & 0xFFFF if self._negotiated(Feature.NOTIFICATION_DATA) else value
        if not self._status & _DRIVER_OK:
            self._log.warn("notify", Reg.QUEUE_NOTIFY, "QueueNotify before DRIVER_OK ignored")
            return
        if index >= len(self._queues):
            self._log.warn("notify", index & 0xFFFF, "notify of nonexistent queue %d", index)
            return
        if not self._queues[index].ready:
            self._log.warn("notify-unready", index, "notify of unready queue %d ignored", index)
            return
        if self._status & _NEEDS_RESET:
            return
        device = self.device
        try:
            device.queue_notify(index)
        except Exception as exc:
            # A model bug, not a guest error: the device is in an unknown
            # state, which is what DEVICE_NEEDS_RESET is for.  Rate limited:
            # the guest can reset and trigger it again.
            self._log.warn(
                "queue-failed", index & 0xFFFF, "queue %d processing failed", index, exc_info=True
            )
            device.report_broken(f"queue {index}: {exc!r}")
            return
        queues = device.queues
        if index < len(queues) and getattr(queues[index], "broken", False):
            device.report_broken(f"queue {index} is broken")

    # -- status ------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        """Status: 0 resets; otherwise the driver sets bits, never clears them.

        content.tex "Device Status Field": the driver MUST NOT clear a bit, so
        such a write is refused whole.  FEATURES_OK stays clear when the
        feature set is unacceptable (the driver re-reads it, "Device
        Initialization" step 6).  DRIVER_OK activates the device.
        """
        if value == 0:
            self._reset()
            return
        value &= 0xFF & ~_NEEDS_RESET
        old = self._status & ~_NEEDS_RESET
        if old & ~value:
            self._log.warn(
                "status-clear",
                Reg.STATUS,
                "status write %#x clears bits of %#x, refused",
                value,
                old,
            )
            return
        added = value & ~old
        if added & _FEATURES_OK and not self._accept_features():
            added &= ~_FEATURES_OK
        if added & _DRIVER_OK and not (old | added) & _FEATURES_OK:
            self._log.warn("state", Reg.STATUS, "DRIVER_OK without FEATURES_OK refused")
            added &= ~_DRIVER_OK
        self._status |= added
        if added & _DRIVER_OK:
            self._activate()

    def _accept_features(self) -> bool:
        features = self._driver_features
        device = self.device
        unoffered = features & ~device.offered_features
        if unoffered:
            self._log.warn(
                "features", Reg.STATUS, "FEATURES_OK refused: bits %#x never offered", unoffered
            )
            return False
        if not features & Feature.VERSION_1.mask:
            self._log.warn("features", Reg.STATUS + 1, "FEATURES_OK refused: no VERSION_1")
            return False
        if not device.features_acceptable(features):
            self._log.warn(
                "features", Reg.STATUS + 2, "FEATURES_OK refused by the device for %#x", features
            )
            return False
        device.ack_features(features)
        return True

    def _negotiated(self, feature: Feature) -> bool:
        return bool(self._status & _FEATURES_OK) and self.device.has_feature(feature)

    def _clear_registers(self) -> None:
        """The register state of a device just reset (or just created)."""
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._shm_sel = 0
        #: Whether the live queues are packed (RING_PACKED at DRIVER_OK).
        self._packed = False
        for cfg in self._queues:
            cfg.clear()

    def _reset(self) -> None:
        """Writing 0 to Status (content.tex "Device Reset", transport-mmio.tex reset rules)."""
        self.device.reset()
        self.irq.reset()
        self._clear_registers()

    def _activate(self) -> None:
        """DRIVER_OK: build a device queue per ready queue and start the device.

        A failure (misplaced rings, a device refusing its queues) sets
        DEVICE_NEEDS_RESET and sends a configuration change notification
        (content.tex, "Device Status Field").
        """
        try:
            self._packed = self.device.has_feature(Feature.RING_PACKED)
            queues: list[DeviceQueue] = [
                self._build_queue(cfg) if cfg.ready else DisabledQueue() for cfg in self._queues
            ]
            self.device.activate(self.mem, self.irq, queues)
        except Exception as exc:
            # Rate limited: a guest can loop reset / DRIVER_OK with bad rings.
            self._log.warn("activation", Reg.STATUS, "activation failed: %s", exc)
            self._set_needs_reset()

    def _build_queue(self, cfg: _QueueConfig) -> DeviceQueue:
        assert cfg.desc is not None and cfg.driver is not None and cfg.device is not None
        device = self.device
        cls = PackedDeviceQueue if self._packed else SplitDeviceQueue
        queue: DeviceQueue = cls(
            self.mem,
            cfg.size,
            cfg.desc,
            cfg.driver,
            cfg.device,
            event_idx=device.has_feature(Feature.EVENT_IDX),
            indirect=device.has_feature(Feature.INDIRECT_DESC),
        )
        return queue

    def _enable_live_queue(self, index: int, cfg: _QueueConfig) -> None:
        """Re-enable a queue after QueueReset while the device runs (VIRTIO_F_RING_RESET)."""
        queues = self.device.queues
        if index >= len(queues):
            return  # device not active (activation failed): nothing to hand it
        try:
            queues[index] = self._build_queue(cfg)
        except Exception as exc:
            # Rate limited: a guest can loop QueueReset / QueueReady with bad rings.
            self._log.warn(
                "queue-enable", Reg.QUEUE_READY, "cannot re-enable queue %d: %s", index, exc
            )
            cfg.ready = False
            self._set_needs_reset()

    def _disable_live_queue(self, index: int) -> None:
        """Take queue ``index`` away from a running device (it sees a DisabledQueue)."""
        queues = self.device.queues
        if index < len(queues):
            queues[index] = DisabledQueue()

    def _on_device_needs_reset(self, reason: str) -> None:
        """``VirtioDevice.on_needs_reset``: the device hit an error it cannot recover from."""
        with self._lock:
            self._set_needs_reset()

    def _set_needs_reset(self) -> None:
        if self._status == 0 or self._status & _NEEDS_RESET:
            return
        self._status |= _NEEDS_RESET
        if self._status & _DRIVER_OK:
            self.irq.trigger_config()

    # -- introspection (for VMMs and tests) ------------------------------------------

    @property
    def status(self) -> int:
        """The device status register."""
        with self._lock:
            return self._status

    @property
    def driver_features(self) -> int:
        """The 64 feature bits the driver has written so far."""
        with self._lock:
            return self._driver_features

    def queue_ready(self, index: int) -> bool:
        with self._lock:
            return index < len(self._queues) and self._queues[index].ready

    # -- sleep, wake, snapshot, restore ------------------------------------------------

    @property
    def asleep(self) -> bool:
        return self._asleep

    def sleep(self) -> None:
        """Pause the device (VirtioDevice.sleep); guest writes are ignored until wake."""
        with self._lock:
            if self._asleep:
                raise LifecycleError(f"{self.device.name}: transport already asleep")
            self._sleeping = self.device.sleep()
            self._asleep = True

    def wake(self) -> None:
        """Resume the device with the queues it had (or was restored with)."""
        with self._lock:
            if not self._asleep:
                raise LifecycleError(f"{self.device.name}: transport is not asleep")
            self.device.wake(self._sleeping)
            self._sleeping = None
            self._asleep = False

    def snapshot(self) -> dict[str, Any]:
        """The transport's registers, live queue states and device snapshot; asleep only.

        The result is JSON-compatible; two transports in the same state give
        equal dicts.
        """
        with self._lock:
            if not self._asleep:
                raise LifecycleError(f"{self.device.name}: snapshot while awake")
            live: list[Any] | None = None
            if self._sleeping is not None:
                live = [
                    None
                    if isinstance(queue, DisabledQueue)
                    else {"packed": self._packed, "state": queue.state()}
                    for queue in self._sleeping.queues
                ]
            return {
                "version": 1,
                "status": self._status,
                "device_features_sel": self._device_features_sel,
                "driver_features_sel": self._driver_features_sel,
                "driver_features": self._driver_features,
                "queue_sel": self._queue_sel,
                "shm_sel": self._shm_sel,
                "packed": self._packed,
                "interrupt_status": self.irq.status,
                "queues": [cfg.to_dict() for cfg in self._queues],
                "live_queues": live,
                "device": base64.b64encode(self.device.snapshot()).decode("ascii"),
            }

    def restore(self, doc: dict[str, Any]) -> None:
        """Load a :meth:`snapshot` into this (asleep) transport and its device.

        Rebuilds the live queues from their saved states; :meth:`wake` then
        hands them to the device.  Raises LifecycleError on a malformed or
        mismatched snapshot, leaving the transport unchanged.
        """
        with self._lock:
            if not self._asleep:
                raise LifecycleError(f"{self.device.name}: restore while awake")
            try:
                if doc["version"] != 1:
                    raise ValueError(f"snapshot version {doc['version']}")
                queue_docs = doc["queues"]
                if len(queue_docs) != len(self._queues):
                    raise ValueError(f"{len(queue_docs)} queues, device has {len(self._queues)}")
                configs = [_QueueConfig(cfg.max_size) for cfg in self._queues]
                for cfg, qdoc in zip(configs, queue_docs, strict=True):
                    cfg.load(qdoc)
                sleeping = self._restore_live(doc["live_queues"])
                device_state = base64.b64decode(doc["device"], validate=True)
                registers = {
                    key: _opt_int(doc[key]) or 0
                    for key in (
                        "status",
                        "device_features_sel",
                        "driver_features_sel",
                        "driver_features",
                        "queue_sel",
                        "shm_sel",
                        "interrupt_status",
                    )
                }
                packed = bool(doc["packed"])
            except LifecycleError:
                raise
            except Exception as exc:
                raise LifecycleError(f"{self.device.name}: malformed snapshot: {exc}") from exc
            self.device.restore(device_state)
            self._queues = configs
            self._sleeping = sleeping
            self._packed = packed
            self._status = registers["status"]
            self._device_features_sel = registers["device_features_sel"]
            self._driver_features_sel = registers["driver_features_sel"]
            self._driver_features = registers["driver_features"]
            self._queue_sel = registers["queue_sel"]
            self._shm_sel = registers["shm_sel"]
            self.irq.set_status(registers["interrupt_status"])

    def _restore_live(self, live: Any) -> QueueResources | None:
        if live is None:
            return None
        if len(live) != len(self._queues):
            raise ValueError(f"{len(live)} live queues, device has {len(self._queues)}")
        queues: list[DeviceQueue] = []
        for entry in live:
            if entry is None:
                queues.append(DisabledQueue())
                continue
            factory: Callable[[GuestMemory, dict[str, Any]], DeviceQueue] = (
                PackedDeviceQueue.from_state if entry["packed"] else SplitDeviceQueue.from_state
            )
            queues.append(factory(self.mem, entry["state"]))
        return QueueResources(self.mem, self.irq, queues)
