"""Interrupt delivery from a device to its driver.

A device model signals two kinds of events: "queue N has used buffers" and
"my config space changed".  How that reaches the driver depends on the host:

* virtio-MMIO (transport-mmio.tex, "Notifications"): one interrupt line per
  device; the InterruptStatus register says why it fired (bit 0 used buffer,
  bit 1 configuration change) and the driver clears bits through
  InterruptACK.  :class:`IrqLine` implements this over an
  :class:`InterruptController`.
* vhost-user: one call eventfd per queue; the back end implements
  :class:`DeviceInterrupt` with eventfd writes.

Device models only see :class:`DeviceInterrupt`.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

__all__ = [
    "INT_CONFIG",
    "INT_VRING",
    "DeviceInterrupt",
    "InterruptController",
    "IrqLine",
    "RecordingInterruptController",
]

#: InterruptStatus bit: one or more queues have new used buffers.
INT_VRING = 0x1
#: InterruptStatus bit: the device configuration has changed.
INT_CONFIG = 0x2


@runtime_checkable
class DeviceInterrupt(Protocol):
    """What a device model calls to notify its driver."""

    def signal_used_queue(self, queue_index: int) -> None: ...

    def signal_config_change(self) -> None: ...


@runtime_checkable
class InterruptController(Protocol):
    """An interrupt controller as a VMM exposes it to devices.

    Edge lines are pulsed; level lines are set and cleared.  The controller
    can save and restore its own state for VM snapshots.
    """

    def pulse(self, line: int) -> None: ...

    def set_level(self, line: int, level: bool) -> None: ...

    def save_state(self) -> bytes: ...

    def restore_state(self, data: bytes) -> None: ...


class IrqLine:
    """One virtio-MMIO device's interrupt: InterruptStatus bits plus a line.

    ``trigger_queue`` / ``trigger_config`` set bit 0x1 / 0x2 and pulse the
    controller; ``ack`` clears only the acknowledged bits.  The status word is
    guarded by a lock so a vCPU thread reading InterruptStatus never sees a
    half-applied update from a device thread.

    With ``level=True`` the line is level-triggered instead: it is raised
    while any status bit is set and lowered when the driver acks the last one.
    """

    def __init__(self, controller: InterruptController, line: int, *, level: bool = False) -> None:
        self.controller = controller
        self.line = line
        self.level = level
        self._status = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IrqLine(line={self.line}, status={self.status:#x}, level={self.level})"

    @property
    def status(self) -> int:
        """The InterruptStatus register value."""
        with self._lock:
            return self._status

    def _raise(self, bit: int) -> None:
        with self._lock:
            self._status |= bit
        if self.level:
            self.controller.set_level(self.line, True)
        else:
            self.controller.pulse(self.line)

    def trigger_queue(self) -> None:
        """Mark used buffers and interrupt."""
        self._raise(INT_VRING)

    def trigger_config(self) -> None:
        """Mark a configuration change and interrupt."""
        self._raise(INT_CONFIG)

    def ack(self, mask: int) -> None:
        """Clear the bits the driver wrote to InterruptACK, and only those."""
        with self._lock:
            self._status &= ~mask
            remaining = self._status
        if self.level and not remaining:
            self.controller.set_level(self.line, False)

    def reset(self) -> None:
        """Clear every status bit (device reset)."""
        self.ack(INT_VRING | INT_CONFIG)

    def set_status(self, value: int) -> None:
        """Restore the status word (snapshot restore); re-raises a level line if needed."""
        with self._lock:
            self._status = value & (INT_VRING | INT_CONFIG)
            remaining = self._status
        if self.level:
            self.controller.set_level(self.line, bool(remaining))

    # DeviceInterrupt: every queue shares the one line on virtio-MMIO.
    def signal_used_queue(self, queue_index: int) -> None:
        self.trigger_queue()

    def signal_config_change(self) -> None:
        self.trigger_config()


class RecordingInterruptController:
    """An interrupt controller that records what it was asked to do.

    For tests and for in-process hosts with no real interrupt controller: a
    driver polling InterruptStatus can wait on :attr:`event`.
    """

    def __init__(self) -> None:
        self.pulses: list[int] = []
        self.levels: dict[int, bool] = {}
        self.event = threading.Event()

    def pulse(self, line: int) -> None:
        self.pulses.append(line)
        self.event.set()

    def set_level(self, line: int, level: bool) -> None:
        self.levels[line] = level
        if level:
            self.event.set()

    def save_state(self) -> bytes:
        return bytes(
            b for line, level in sorted(self.levels.items()) for b in (line & 0xFF, int(level))
        )

    def restore_state(self, data: bytes) -> None:
        self.levels = {data[i]: bool(data[i + 1]) for i in range(0, len(data) - 1, 2)}
