"""What the four queue classes share: geometry, features, state plumbing, region window.

Each ring format has a device side and a driver side
(:class:`~.split_device.SplitDeviceQueue`, :class:`~.split_driver.SplitDriverQueue`,
:class:`~.packed_device.PackedDeviceQueue`, :class:`~.packed_driver.PackedDriverQueue`).
They differ in how they read and write the ring, but are built, described
and rebuilt alike: three guest areas at the transport's descriptor, driver
and device addresses, checked and mapped once at construction; the
negotiated EVENT_IDX and INDIRECT_DESC features; a ``broken`` flag; a state
dict for snapshots.  :class:`RingQueue` holds that once, :class:`DeviceRing`
adds the device sides' region window and :class:`DriverRing` the driver
sides' indirect table area and idle rebuild.

Only construction and snapshot paths live here; the per-request paths (pop,
add, add_used, used) stay in the format modules and read these attributes
as plain slots, which costs the same as slots of their own class.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue.common import QueueState
from pyvirtio.virtqueue.errors import VirtqueueError
from pyvirtio.virtqueue.ring import (
    INDIRECT_ALIGN,
    StateReader,
    area_view,
    indirect_area_size,
)

__all__ = ["DeviceRing", "DriverRing", "RingQueue"]

_Queue = TypeVar("_Queue", bound="RingQueue")
_Driver = TypeVar("_Driver", bound="DriverRing")


class RingQueue:
    """A virtqueue of either format and side: its guest areas and negotiated features.

    ``desc_addr``, ``driver_addr`` and ``device_addr`` are the transport's
    Descriptor, Driver and Device Area addresses; ``event_idx`` and
    ``indirect`` the negotiated VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC
    (content.tex, "Reserved Feature Bits").  A subclass checks the geometry
    and maps its areas in :meth:`_map_rings`, which the constructor calls
    once the attributes are set.
    """

    __slots__ = (
        "broken",
        "desc_addr",
        "device_addr",
        "driver_addr",
        "event_idx",
        "indirect",
        "mem",
        "size",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.broken = False
        self._map_rings()

    def _map_rings(self) -> None:
        """Check the geometry and map the ring areas; VirtqueueError if they are unusable."""
        raise NotImplementedError

    def _fail(self, message: str) -> VirtqueueError:
        """Mark the queue broken and return the error to raise."""
        self.broken = True
        return VirtqueueError(message)

    def _state(self, positions: QueueState) -> QueueState:
        """The state dict: geometry, then the format's ``positions``, then features."""
        return {
            "size": self.size,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            **positions,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "broken": self.broken,
        }

    @classmethod
    def _from_geometry(
        cls: type[_Queue], mem: GuestMemory, fields: StateReader, **options: Any
    ) -> _Queue:
        """A queue with the geometry and features of a state dict; guest memory untouched.

        The positions are the caller's to restore.  ``options`` are further
        constructor arguments: a driver side passes ``zero_rings=False``, as
        the rings are wherever the snapshot left them.  (Through the
        constructor, never ``cls.__new__``: a class compiled by mypyc is only
        ever built by its ``__init__``.)
        """
        queue = cls(
            mem,
            fields.integer("size"),
            fields.integer("desc_addr"),
            fields.integer("driver_addr"),
            fields.integer("device_addr"),
            event_idx=fields.flag("event_idx"),
            indirect=fields.flag("indirect"),
            **options,
        )
        queue.broken = fields.flag("broken")
        return queue


class DeviceRing(RingQueue):
    """A device side: checks buffers inline against the largest guest region.

    The pop paths compare a buffer with ``_lo``/``_hi`` (the window's
    bounds, in slots: NamedTuple fields load slower) and fall back to the
    general check outside it; they call :meth:`_take_window` whenever the
    region table is no longer ``_window_table`` (GuestMemory.largest_window).
    """

    __slots__ = ("_hi", "_lo", "_window", "_window_table")

    def _forget_window(self) -> None:
        """No window yet: the first pop takes one."""
        self._window = GuestMemory.NO_WINDOW
        self._window_table: object = None
        self._lo = 1
        self._hi = 0

    def _take_window(self) -> None:
        """The region table changed: check buffers against its largest region from now on."""
        window = self._window = self.mem.largest_window()
        self._window_table = window.table
        self._lo = window.base
        self._hi = window.end


class DriverRing(RingQueue):
    """A driver side: zeroes its rings when built, and may own indirect tables.

    ``zero_rings=False`` takes over rings that already hold a driver's state
    instead (what :meth:`_idle_from_state` does).

    With ``indirect``, a request of 2..``max_indirect`` buffers takes one
    ring descriptor pointing at a table of the area at ``indirect_addr``
    (:func:`~.ring.indirect_area_size` bytes, one table per head slot or
    buffer ID); each format checks those arguments in :meth:`_map_indirect`.
    """

    __slots__ = ("_indirect_base", "_num_free", "indirect_addr", "max_indirect")

    _num_free: int
    #: ``indirect_addr`` as an int (0 without tables), for address arithmetic.
    _indirect_base: int
    #: Where the indirect tables are: split rings say 0, packed rings None, without them.
    indirect_addr: int | None
    max_indirect: int

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_addr: int | None = None,
        max_indirect: int = 0,
        zero_rings: bool = True,
    ) -> None:
        super().__init__(
            mem, size, desc_addr, driver_addr, device_addr, event_idx=event_idx, indirect=indirect
        )
        self._map_indirect(indirect_addr, max_indirect)
        if not zero_rings:  # taking over rings that hold a driver's state (from_state)
            return
        # The driver initialises the rings: split-ring.tex, "Available Buffer
        # Notification Suppression" (used flags 0, idx fields 0);
        # packed-ring.tex, "The Virtqueue Descriptor Format" ("The descriptor
        # ring is zero-initialized", and zeroed event areas mean ENABLE).
        for addr, length in zip(
            (desc_addr, driver_addr, device_addr), self._area_sizes(), strict=True
        ):
            mem.fill(addr, length, 0)

    def _area_sizes(self) -> tuple[int, int, int]:
        """Bytes of the descriptor, driver and device areas."""
        raise NotImplementedError

    def _map_indirect(self, indirect_addr: int | None, max_indirect: int) -> None:
        """Check the indirect table arguments; set ``indirect_addr`` and ``max_indirect``."""
        raise NotImplementedError

    def _indirect_area(self, what: str, indirect_addr: int, max_indirect: int) -> memoryview:
        """A view of the indirect table area; VirtqueueError if misaligned or outside one region."""
        length = indirect_area_size(self.size, max_indirect)
        return area_view(self.mem, what, indirect_addr, length, INDIRECT_ALIGN)

    @property
    def num_free(self) -> int:
        """Ring descriptors free for new requests."""
        return self._num_free

    @classmethod
    def _idle_from_state(cls: type[_Driver], mem: GuestMemory, fields: StateReader) -> _Driver:
        """An idle queue (nothing in flight) with the geometry of a state dict.

        Tokens are arbitrary objects, not part of the state, hence the idle
        rule (ValueError otherwise).  Guest memory is not touched; the
        caller restores the positions.
        """
        if fields.integer("in_flight") != 0:
            raise ValueError("only a queue with nothing in flight can be rebuilt from state")
        max_indirect = fields.integer("max_indirect") if fields.flag("indirect") else 0
        indirect_addr = fields.integer("indirect_addr") if max_indirect else None
        return cls._from_geometry(
            mem, fields, indirect_addr=indirect_addr, max_indirect=max_indirect, zero_rings=False
        )
