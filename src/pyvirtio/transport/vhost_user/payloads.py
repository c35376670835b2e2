"""The payload structures of vhost-user messages (QEMU docs/interop/vhost-user.rst "Payload").

Each structure packs itself into its wire layout and unpacks from it,
raising :class:`ProtocolError` for what a peer may not send (more regions
than the protocol allows, an inconsistent size) and ValueError for a value
this process should never build.  :mod:`.protocol` frames them into messages
and re-exports every name here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self, dataclass_transform

__all__ = [
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "ConfigSpace",
    "InflightDesc",
    "LogDesc",
    "MemoryRegionDesc",
    "MemoryTable",
    "ProtocolError",
    "SingleMemoryRegion",
    "VringAddr",
    "VringArea",
    "VringState",
]

_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_TABLE_HEAD = struct.Struct("<II")
_CONFIG_HEAD = struct.Struct("<III")
_LOG = struct.Struct("<QQ")
_AREA = struct.Struct("<QQQ")
_INFLIGHT = struct.Struct("<QQHH")

#: Most regions SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
#: Most file descriptors one message carries: one per region of the table;
#: the back-end channel also limits itself to 8 ("Back-end communication").
MAX_FDS = 8
#: Largest config space access (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256


class ProtocolError(Exception):
    """A malformed vhost-user message; the message says what is wrong.

    ``fds`` are the file descriptors the parser had received for the
    rejected message: the caller owns them now and should close them.
    """

    def __init__(self, message: str, fds: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.fds: list[int] = list(fds)


def _check_fields(name: str, values: Iterable[tuple[int, int]]) -> None:
    for value, bits in values:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name}: {value!r} does not fit in {bits} bits")


@dataclass_transform(frozen_default=True)
class _Fixed:
    """A payload that is one fixed layout: its dataclass fields in order, ``LAYOUT``.

    Every subclass is made a frozen dataclass of the fields it annotates.
    ``pack`` checks that each field fits its width in the layout (ValueError)
    and appends ``PADDING`` zero bytes; ``unpack`` takes any of ``SIZES``
    (struct.error otherwise).
    """

    __slots__ = ()
    LAYOUT: ClassVar[struct.Struct]
    #: Zero bytes after the fields that senders may or may not put there.
    PADDING: ClassVar[int] = 0
    #: The payload sizes a peer may send: the layout's, and with PADDING.
    SIZES: ClassVar[tuple[int, ...]]
    _FIELDS: ClassVar[tuple[str, ...]]
    _WIDTHS: ClassVar[tuple[int, ...]]

    if TYPE_CHECKING:

        def __init__(self, *values: int) -> None: ...

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        dataclass(frozen=True)(cls)
        # The subclass's own annotations are its fields, in order (LAYOUT and
        # PADDING are assigned without one).
        cls._FIELDS = tuple(cls.__annotations__)
        size = cls.LAYOUT.size
        cls.SIZES = (size, size + cls.PADDING) if cls.PADDING else (size,)
        # Bits of each field: its format character's size ("<" first).
        cls._WIDTHS = tuple(8 * struct.calcsize("<" + c) for c in cls.LAYOUT.format[1:])

    def pack(self) -> bytes:
        values = [getattr(self, name) for name in self._FIELDS]
        _check_fields(type(self).__name__, zip(values, self._WIDTHS, strict=True))
        return self.LAYOUT.pack(*values) + bytes(self.PADDING)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        if len(data) not in cls.SIZES:
            raise struct.error(f"{cls.__name__} takes {cls.SIZES} bytes, not {len(data)}")
        return cls(*cls.LAYOUT.unpack_from(data))


class VringState(_Fixed):
    """vhost-user.rst "A vring state description": ring index and a number (size, base...)."""

    LAYOUT = _VRING_STATE

    index: int
    num: int


class VringAddr(_Fixed):
    """vhost-user.rst "A vring address description".

    The three ring addresses are the front end's *user* addresses (unless
    VIRTIO_F_IOMMU_PLATFORM is negotiated); a back end translates them
    through the ``user_addr`` of its memory regions ("Memory access").
    """

    LAYOUT = _VRING_ADDR

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0


class MemoryRegionDesc(_Fixed):
    """One region of "Memory regions description": guest and user base, size, fd offset."""

    LAYOUT = _REGION

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE's payload: up to :data:`MAX_MEM_REGIONS` regions, one fd each."""

    regions: tuple[MemoryRegionDesc, ...]

    def pack(self) -> bytes:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise ValueError(f"{len(self.regions)} regions, at most {MAX_MEM_REGIONS}")
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        count, _padding = _TABLE_HEAD.unpack_from(data)
        if count > MAX_MEM_REGIONS:
            raise ProtocolError(f"memory table has {count} regions, at most {MAX_MEM_REGIONS}")
        expected = _TABLE_HEAD.size + count * _REGION.size
        if len(data) != expected:
            raise ProtocolError(
                f"memory table of {count} regions needs {expected} payload bytes, got {len(data)}"
            )
        view = memoryview(data)
        return cls(
            tuple(
                MemoryRegionDesc.unpack(view[off : off + _REGION.size])
                for off in range(_TABLE_HEAD.size, expected, _REGION.size)
            )
        )


@dataclass(frozen=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding, then one region."""

    region: MemoryRegionDesc

    def pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemoryRegion:
        return cls(MemoryRegionDesc.unpack(data[_U64.size :]))


@dataclass(frozen=True)
class ConfigSpace:
    """vhost-user.rst "Virtio device config space": ``size`` bytes at ``offset``.

    ``flags`` is 0 for a driver's write and 1 for a live-migration write.
    In a GET_CONFIG request ``data`` is what the front end has (usually
    zeros) and the reply carries the back end's bytes; a reply with
    ``size`` 0 means the back end refused.
    """

    offset: int
    flags: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        if len(self.data) > MAX_CONFIG_SIZE:
            raise ValueError(f"config access of {len(self.data)} bytes, at most {MAX_CONFIG_SIZE}")
        _check_fields("ConfigSpace", ((self.offset, 32), (self.flags, 32)))
        return _CONFIG_HEAD.pack(self.offset, len(self.data), self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config access of {size} bytes, at most {MAX_CONFIG_SIZE}")
        if len(data) != _CONFIG_HEAD.size + size:
            raise ProtocolError(
                f"config payload says {size} bytes but carries {len(data) - _CONFIG_HEAD.size}"
            )
        return cls(offset, flags, bytes(data[_CONFIG_HEAD.size :]))


class LogDesc(_Fixed):
    """vhost-user.rst "Log description": size and offset of the dirty log (LOG_SHMFD)."""

    LAYOUT = _LOG

    mmap_size: int
    mmap_offset: int


class VringArea(_Fixed):
    """vhost-user.rst "Vring area description" (back-end VRING_HOST_NOTIFIER_MSG)."""

    LAYOUT = _AREA

    index_flags: int
    size: int
    offset: int


class InflightDesc(_Fixed):
    """vhost-user.rst "Inflight description" (GET/SET_INFLIGHT_FD).

    The spec lists 20 bytes of fields; QEMU and libvhost-user send the C
    struct, padded to 24.  Both decode; encoding gives 24.
    """

    LAYOUT = _INFLIGHT
    PADDING = 4

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
