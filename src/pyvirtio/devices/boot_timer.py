"""virtio-boot-timer: a queue-less latency probe for measuring guest boot time.

Not a device type of the VIRTIO specification (it uses
:attr:`DeviceId.BOOT_TIMER`, an ID the spec leaves unassigned).  The device
has no virtqueues and one read-only register: the 4 bytes at offset 0 of its
device configuration space (offset 0x100 of a virtio-MMIO window, see
transport-mmio.tex "MMIO Device Register Layout") return the microseconds
elapsed since the *start instant*, as a little-endian u32 that saturates at
``0xFFFFFFFF`` (about 71.6 minutes) rather than wrapping, so a late reader
sees "at least this long" instead of a small, wrong number.

A VMM creates the device (or passes ``start``) at the moment the kernel
image has been loaded, and a guest program reads the register once it is
up: the value is its boot latency.

Only an aligned 4-byte read at offset 0 returns the timer; any other offset
or width reads as zeros, so a driver probing the config space with wider or
narrower accesses sees nothing surprising.  Writes are ignored (logged).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import QueueResources, VirtioDevice, expect_object, expect_uint

__all__ = ["BOOT_TIMER_CONFIG_SIZE", "BootTimer"]

log = logging.getLogger(__name__)

#: Size of the config space: the single u32 register.
BOOT_TIMER_CONFIG_SIZE = 4

_U32_MAX = 0xFFFF_FFFF
_U32 = struct.Struct("<I")


class BootTimer(VirtioDevice):
    """The boot-timer device.

    ``clock`` returns nanoseconds from an arbitrary monotonic origin
    (:func:`time.monotonic_ns` by default; tests inject a fake).  ``start``
    is the start instant on that clock; ``None`` means "now".

    The timer is a property of the VM, not of the driver: a device reset
    does not restart it.  It stands still while the device is asleep (the VM
    is paused then, and a paused VM's clocks do not advance), which also
    makes every snapshot of one sleep byte-identical; waking re-bases the
    start instant so the register continues from where it stopped.  See
    :meth:`_snapshot_model` for snapshots.
    """

    device_id = DeviceId.BOOT_TIMER

    def __init__(
        self, start: int | None = None, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        # No queues, so none of the ring features mean anything: offer only
        # VERSION_1, which every non-legacy device must (content.tex
        # "Reserved Feature Bits").
        super().__init__(Feature.VERSION_1.mask, ())
        self._clock = clock
        self._start_ns = clock() if start is None else start
        #: Elapsed microseconds while asleep (the timer is frozen), else None.
        self._frozen_us: int | None = None

    @property
    def start_ns(self) -> int:
        """The start instant on the device's clock, in nanoseconds."""
        return self._start_ns

    def restart(self, start: int | None = None) -> None:
        """Move the start instant (default: now), e.g. when kernel loading has completed.

        For a VMM that builds its devices before loading the kernel.  On an
        asleep device the frozen value changes, and waking continues from it.
        """
        self._start_ns = self._clock() if start is None else start
        if self._frozen_us is not None:
            self._frozen_us = max(0, self._clock() - self._start_ns) // 1000

    def elapsed_us(self) -> int:
        """Microseconds since the start instant, not counting sleep (unbounded, >= 0)."""
        if self._frozen_us is not None:
            return self._frozen_us
        return max(0, self._clock() - self._start_ns) // 1000

    # -- lifecycle -----------------------------------------------------------------

    def sleep(self) -> QueueResources | None:
        frozen = self.elapsed_us()
        resources = super().sleep()
        self._frozen_us = frozen
        return resources

    def wake(self, resources: QueueResources | None = None) -> None:
        super().wake(resources)
        if self._frozen_us is not None:
            self._start_ns = self._clock() - self._frozen_us * 1000
            self._frozen_us = None

    def register_value(self) -> int:
        """What the guest reads: :meth:`elapsed_us` saturated to a u32."""
        return min(self.elapsed_us(), _U32_MAX)

    # -- configuration space ---------------------------------------------------

    def config_bytes(self) -> bytes:
        return _U32.pack(self.register_value())

    def read_config(self, offset: int, length: int) -> bytes:
        """The timer for a 4-byte read at offset 0; zeros for any other access."""
        if offset == 0 and length == BOOT_TIMER_CONFIG_SIZE:
            return self.config_bytes()
        return bytes(max(0, length))

    def write_config(self, offset: int, data: bytes) -> None:
        log.info(
            "%s: write of %d bytes at config offset %#x ignored: the timer is read-only",
            self.name,
            len(data),
            offset,
        )

    # -- snapshot ----------------------------------------------------------------

    def _snapshot_model(self) -> Any:
        """The elapsed microseconds at snapshot time (not the start instant).

        A monotonic clock's origin means nothing in another process or after
        a host reboot, so the start instant cannot be saved as is.  What the
        guest observes is elapsed time, so that is what is kept; restore
        re-bases the start instant so that the register continues from the
        saved value (the time the VM spent saved is not counted, as for a
        paused VM's clock).  The unsaturated value is kept so a restored
        timer still saturates at the right moment.  Snapshots are only taken
        asleep, when the timer is frozen, so they are deterministic.
        """
        return {"elapsed_us": self.elapsed_us()}

    def _restore_model(self, state: Any) -> None:
        elapsed = expect_uint(expect_object(state, "boot-timer state").get("elapsed_us"))
        # Still asleep: freeze at the saved value; wake re-bases the start.
        self._frozen_us = elapsed
