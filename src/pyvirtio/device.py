"""The interface every pyvirtio device model implements, and its lifecycle.

A device model is sans-IO: a transport (virtio-MMIO, vhost-user) owns it,
feeds it register-level events (features, config accesses, queue
notifications) and hands it guest memory, an interrupt sink and ready
queues at activation.  The model never starts threads and does no I/O of
its own choosing: where it must do host I/O, it calls a backend object its
host gave it (``Block``'s ``BlockBackend``, whose calls block inside
``queue_notify``).  A host that must wait for a back end (a TAP fd, a
console stream) calls the model's own entry points when data is there.

Lifecycle (after crosvm's ``VirtioDevice``)::

                         restore (was inactive)
          +-------------------------------------------------+
          |                                                 |
          |                                                 v
    +-------------+  restore (was active)  +----------+   +------------+
    | asleep(new) | ---------------------> |  asleep  |   |   asleep   |   states in this row
    +-------------+                        | (active) |   | (inactive) |   can be snapshotted
       ^      |                            +----------+   +------------+
       |      |                              ^     |         ^     |
     sleep   wake                          sleep  wake     sleep  wake
       |      |                              |     |         |     |
       |      v                              |     v         |     v
    +-------+         activate            +--------+  reset  +----------+
    |  new  | --------------------------> | active | ------> | inactive |
    +-------+                             +--------+ <------ +----------+
                                                     activate

* ``activate(mem, interrupt, queues)``: new/inactive -> active.
* ``reset()``: active -> inactive (queues dropped, acked features cleared);
  on new/inactive it only clears negotiated state.
* ``sleep()``: any awake state -> asleep(that state); in-flight work is
  finished first and the queues are handed back to the caller.
* ``wake(resources)``: asleep(X) -> X; an asleep(active) device needs its
  memory, interrupt and queues back.
* Whenever the device becomes active (``activate``, or ``wake`` to active)
  the model's ``_serve_posted`` serves what the driver made available
  meanwhile: notifications are ignored while the device is not active.
* ``snapshot()`` (asleep only) -> bytes; ``restore(bytes)`` (asleep only)
  replaces the device's state, including which state ``wake`` returns to.

Any call in the wrong state raises :class:`LifecycleError`.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pyvirtio.constants import COMMON_FEATURES, DeviceId, Feature
from pyvirtio.irq import DeviceInterrupt
from pyvirtio.memory import GuestMemory
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, VirtqueueError

__all__ = [
    "COMMON_FEATURES",
    "DRIVER_ERROR_LOG_INTERVAL",
    "ActivationError",
    "DeviceState",
    "LifecycleError",
    "QueueResources",
    "VirtioDevice",
    "expect_bool",
    "expect_object",
    "expect_str",
    "expect_uint",
]

log = logging.getLogger(__name__)

#: Seconds between two log lines of one kind of driver mistake seen here
#: (a driver can repeat one at will: :mod:`pyvirtio.ratelimit`).
DRIVER_ERROR_LOG_INTERVAL: Final = 10.0


class DeviceState(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    INACTIVE = "inactive"
    ASLEEP = "asleep"


class LifecycleError(Exception):
    """A lifecycle call made in a state that does not allow it."""


class ActivationError(Exception):
    """The device cannot start with what the driver configured."""


@dataclass
class QueueResources:
    """What an active device runs on; taken by ``sleep`` and given back to ``wake``."""

    mem: GuestMemory
    interrupt: DeviceInterrupt
    queues: list[DeviceQueue]


class VirtioDevice:
    """Base class of every device model.

    Subclasses set :attr:`device_id`, pass their offered features and queue
    sizes to ``__init__``, and override the ``_on_*`` hooks and the config
    accessors they need.  The base class enforces the lifecycle and keeps the
    negotiated state; snapshots are canonical JSON, so two devices in the same
    state produce byte-identical snapshots.
    """

    device_id: DeviceId = DeviceId.INVALID

    def __init__(self, features: int, queue_max_sizes: Sequence[int]) -> None:
        #: The feature bits the device offers (DeviceFeatures), fixed for its lifetime.
        self.offered_features: Final = features
        #: Each queue's largest size (QueueNumMax); their number is the device's queue count.
        self.queue_max_sizes: Final = tuple(queue_max_sizes)
        self.num_queues: Final = len(self.queue_max_sizes)
        #: The device's name in log lines ("virtio-net", "virtio-boot-timer").
        self.name: Final = f"virtio-{self.device_id.name.lower().replace('_', '-')}"
        #: Log lines of the driver mistakes the base class sees, rate-limited.
        self._driver_errors: Final = RateLimitedLog(
            log, self.name, interval=DRIVER_ERROR_LOG_INTERVAL
        )
        self._acked = 0
        self._state = DeviceState.NEW
        self._asleep_from: DeviceState | None = None
        self._resources: QueueResources | None = None
        self._config_generation = 0
        #: The config space changed while asleep: the driver is told on wake
        #: ("Device Configuration Space": the device notifies each change).
        self._config_change_pending = False
        #: Queues whose ring the transport has disabled (vhost-user SET_VRING_ENABLE 0).
        self._disabled_queues: set[int] = set()
        self.needs_reset = False
        #: Set by the owning transport: called with a reason when the device
        #: can no longer operate (a broken queue), so it can set
        #: DEVICE_NEEDS_RESET.
        self.on_needs_reset: Any = None

    # -- identity and negotiation --------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def acked_features(self) -> int:
        return self._acked

    def has_feature(self, bit: int) -> bool:
        """Whether feature bit number ``bit`` was negotiated."""
        return bool(self._acked >> bit & 1)

    def ack_features(self, features: int) -> None:
        """Record the driver's feature choice (bits never offered are dropped, with a log line)."""
        self._check_awake("ack_features")
        unknown = features & ~self.offered_features
        if unknown:
            self._driver_errors.warn(
                "unoffered features", None, "driver acked features never offered: %#x", unknown
            )
        self._acked = features & self.offered_features

    def features_acceptable(self, features: int) -> bool:
        """Whether FEATURES_OK may be set for this feature set.

        The default demands VERSION_1 and no bit outside the offer; devices
        with dependent features (content.tex "Feature Bits") add their rules.
        """
        return not features & ~self.offered_features and bool(features & Feature.VERSION_1.mask)

    # -- configuration space ---------------------------------------------------

    def config_bytes(self) -> bytes:
        """The whole device-specific configuration space; override in models that have one."""
        return b""

    def read_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes of config space from ``offset``; zeros past its end."""
        config = self.config_bytes()
        data = config[offset : offset + length] if 0 <= offset < len(config) else b""
        return data + bytes(length - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to config space; read-only by default (logged and ignored)."""
        self._driver_errors.log(
            logging.INFO,
            "config write",
            None,
            "ignored write of %d bytes to config offset %#x",
            len(data),
            offset,
        )

    @property
    def config_generation(self) -> int:
        return self._config_generation

    def config_changed(self) -> None:
        """Called by a model when its config space changed: bump generation, notify."""
        self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
        if self._resources is not None and self._state is DeviceState.ACTIVE:
            self._resources.interrupt.signal_config_change()
        elif self._state is DeviceState.ASLEEP:
            self._config_change_pending = True

    # -- shared memory ---------------------------------------------------------

    def shared_memory_regions(self) -> list[tuple[int, int]]:
        """``(guest base, length)`` of each shared memory region, indexed by shmid.

        Transports enumerate these (transport-mmio.tex SHMSel/SHMLen/SHMBase,
        shared-mem.tex "Shared Memory Regions"); most devices have none.
        """
        return []

    # -- host file descriptors ---------------------------------------------------

    def host_fds(self) -> list[tuple[int, int]]:
        """``(fd, events)`` a host's event loop should poll for this device now.

        ``events`` are ``select.POLLIN``/``POLLOUT`` bits (equal to the
        EPOLL ones).  A model with a back end behind a file descriptor (a TAP,
        a socket) lists it here and the host calls :meth:`host_fd_ready`.
        The interest changes as the model works (a receive path out of guest
        buffers stops asking for POLLIN, so a level-triggered loop does not
        spin), so hosts ask again after every call into the device.  Most
        devices have none.
        """
        return []

    def host_fd_ready(self, fd: int, events: int) -> None:
        """``fd`` from :meth:`host_fds` polled ready with ``events`` (POLLHUP/POLLERR too)."""

    # -- lifecycle -------------------------------------------------------------

    def activate(
        self, mem: GuestMemory, interrupt: DeviceInterrupt, queues: Sequence[DeviceQueue]
    ) -> None:
        """Start operating on ``queues`` (one per entry in ``queue_max_sizes``)."""
        if self._state not in (DeviceState.NEW, DeviceState.INACTIVE):
            raise LifecycleError(f"{self.name}: activate in state {self._state.value}")
        if len(queues) != self.num_queues:
            raise ActivationError(
                f"{self.name}: activated with {len(queues)} queues, expects {self.num_queues}"
            )
        resources = QueueResources(mem, interrupt, list(queues))
        self._on_activate(resources)
        self._resources = resources
        self.needs_reset = False
        self._state = DeviceState.ACTIVE
        self._serve_posted()

    def reset(self) -> None:
        """Return to a fresh state: queues dropped, negotiation forgotten."""
        if self._state is DeviceState.ASLEEP:
            raise LifecycleError(f"{self.name}: reset while asleep")
        if self._state is DeviceState.ACTIVE:
            self._on_reset()
            self._resources = None
            self._state = DeviceState.INACTIVE
        self._acked = 0
        self._disabled_queues.clear()
        self._config_change_pending = False
        self.needs_reset = False

    def sleep(self) -> QueueResources | None:
        """Quiesce and hand back the queues (None when not active)."""
        if self._state is DeviceState.ASLEEP:
            raise LifecycleError(f"{self.name}: sleep while already asleep")
        resources = self._resources
        if self._state is DeviceState.ACTIVE:
            self._on_sleep()
        self._resources = None
        self._asleep_from = self._state
        self._state = DeviceState.ASLEEP
        return resources

    def wake(self, resources: QueueResources | None = None) -> None:
        """Resume in the state ``sleep`` left (or ``restore`` set)."""
        if self._state is not DeviceState.ASLEEP or self._asleep_from is None:
            raise LifecycleError(f"{self.name}: wake while {self._state.value}")
        target = self._asleep_from
        if target is DeviceState.ACTIVE:
            if resources is None:
                raise LifecycleError(f"{self.name}: waking an active device needs its queues")
            if len(resources.queues) != self.num_queues:
                raise ActivationError(f"{self.name}: woken with {len(resources.queues)} queues")
            self._resources = resources
            self._state = DeviceState.ACTIVE
            self._on_wake(resources)
            if self._config_change_pending:
                resources.interrupt.signal_config_change()
            self._serve_posted()
        else:
            # Only an active device can notify; the driver reads the new
            # config when it next sets the device up.
            self._state = target
        self._config_change_pending = False
        self._asleep_from = None

    def snapshot(self) -> bytes:
        """The device's state as canonical bytes; only while asleep."""
        if self._state is not DeviceState.ASLEEP or self._asleep_from is None:
            raise LifecycleError(f"{self.name}: snapshot while {self._state.value}")
        doc = {
            "device_id": int(self.device_id),
            "state": self._asleep_from.value,
            "acked_features": self._acked,
            "config_generation": self._config_generation,
            "needs_reset": self.needs_reset,
            "model": self._snapshot_model(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def restore(self, data: bytes) -> None:
        """Replace the device's state with a snapshot; only while asleep."""
        if self._state is not DeviceState.ASLEEP:
            raise LifecycleError(f"{self.name}: restore while {self._state.value}")
        try:
            doc = json.loads(data)
            if doc["device_id"] != int(self.device_id):
                raise LifecycleError(f"{self.name}: snapshot is of device type {doc['device_id']}")
            target = DeviceState(doc["state"])
            if target is DeviceState.ASLEEP:
                raise ValueError("asleep is not a restorable state")
            acked = int(doc["acked_features"])
            generation = int(doc["config_generation"])
            needs_reset = bool(doc["needs_reset"])
            model = doc["model"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LifecycleError(f"{self.name}: malformed snapshot: {exc}") from exc
        self._restore_model(model)
        self._acked = acked & self.offered_features
        self._config_generation = generation
        self.needs_reset = needs_reset
        self._asleep_from = target

    # -- queue events ------------------------------------------------------------

    @property
    def queues(self) -> list[DeviceQueue]:
        return self._resources.queues if self._resources is not None else []

    @property
    def mem(self) -> GuestMemory | None:
        return self._resources.mem if self._resources is not None else None

    def queue_notify(self, index: int) -> None:
        """The driver notified queue ``index``: process it.  Never raises for guest errors."""
        if self._state is not DeviceState.ACTIVE or self._resources is None:
            self._driver_errors.log(
                logging.INFO,
                "notify while inactive",
                None,
                "notify of queue %d while %s, ignored",
                index,
                self._state.value,
            )
            return
        if not 0 <= index < self.num_queues:
            self._driver_errors.warn(
                "nonexistent queue", None, "notify of nonexistent queue %d", index
            )
            return
        if self.needs_reset:
            return
        try:
            if index in self._disabled_queues:
                self._process_disabled_queue(index, self._resources.queues[index])
            else:
                self._process_queue(index, self._resources.queues[index])
        except VirtqueueError as exc:
            self.report_broken(f"queue {index}: {exc}")

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """The transport enabled or disabled queue ``index``'s ring (vhost-user.rst "Ring states").

        A started but disabled ring is still notified, and the device must
        process it "without causing any side effects"
        (:meth:`_process_disabled_queue`).  Reset enables every queue again.
        """
        if not 0 <= index < self.num_queues:
            return
        if enabled:
            self._disabled_queues.discard(index)
        else:
            self._disabled_queues.add(index)

    def queue_enabled(self, index: int) -> bool:
        """Whether queue ``index`` is enabled (see :meth:`set_queue_enabled`)."""
        return index not in self._disabled_queues

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` if its suppression rules allow."""
        if self._resources is None:
            return
        if self._resources.queues[index].needs_notification():
            self._resources.interrupt.signal_used_queue(index)

    def _return_used(
        self, index: int, queue: DeviceQueue, completions: Sequence[tuple[DescriptorChain, int]]
    ) -> None:
        """Put ``completions`` ((chain, bytes written) pairs) in ``queue``'s used ring at once
        and interrupt the driver for queue ``index`` if it wants; nothing when empty."""
        if completions:
            queue.add_used_batch(completions)
            self.signal_used(index)

    def report_broken(self, reason: str) -> None:
        """The device cannot go on until reset (VIRTIO 2.1.2: DEVICE_NEEDS_RESET)."""
        if not self.needs_reset:
            log.error("%s: needs reset: %s", self.name, reason)
        self.needs_reset = True
        if self.on_needs_reset is not None:
            self.on_needs_reset(reason)

    def _check_awake(self, what: str) -> None:
        if self._state is DeviceState.ASLEEP:
            raise LifecycleError(f"{self.name}: {what} while asleep")

    # -- hooks for models --------------------------------------------------------

    def _on_activate(self, resources: QueueResources) -> None:
        """Validate and take the queues; raise ActivationError to refuse."""

    def _on_reset(self) -> None:
        """Drop per-activation state."""

    def _on_sleep(self) -> None:
        """Finish or park in-flight work so the queues can be handed back."""

    def _on_wake(self, resources: QueueResources) -> None:
        """Resume after sleep; resources are the (possibly restored) queues."""

    def _serve_posted(self) -> None:
        """Serve what the driver made available while the device was not active.

        Called once the device is active, after ``activate`` and after an
        active device wakes: notifications meanwhile were ignored, and a
        driver may post buffers before DRIVER_OK.  Models process their
        queues here (as if notified) and any host-side work that waited.
        """

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        """Handle available buffers on ``queue``; VirtqueueError marks the device broken."""

    def _process_disabled_queue(self, index: int, queue: DeviceQueue) -> None:
        """A disabled queue was notified: by default its buffers wait, untouched.

        Models whose spec defines the disabled state override this (virtio-net
        discards transmit frames).
        """
        log.debug("%s: notify of disabled queue %d, its buffers wait", self.name, index)

    def _snapshot_model(self) -> Any:
        """Model-specific state as JSON-compatible data."""
        return None

    def _restore_model(self, state: Any) -> None:
        """Inverse of ``_snapshot_model``; raise ValueError on bad input."""


# -- checking snapshot models (for _restore_model implementations) --------------------------


def expect_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object; else ValueError naming ``what``."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


def expect_uint(value: Any) -> int:
    """``value`` if it is a non-negative int (not a bool); else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def expect_bool(value: Any) -> bool:
    """``value`` if it is a bool; else ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    return value


def expect_str(value: Any) -> str:
    """``value`` if it is a str; else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value
