"""The front end's memory table, as a back end keeps it (vhost-user.rst "Memory access").

A front end shares its guest RAM as regions, each one fd with three
coordinates: the guest-physical base descriptors use, the front end's own
user address that SET_VRING_ADDR uses, and the offset in the fd.  A
:class:`RegionTable` maps the regions into one
:class:`~pyvirtio.memory.GuestMemory` keyed by guest-physical address and
keeps the user-address side beside it, for :meth:`RegionTable.to_guest`.

It is what SET_MEM_TABLE (a whole new table, :meth:`RegionTable.stage` then
:meth:`RegionTable.install`), ADD_MEM_REG and REM_MEM_REG
(CONFIGURE_MEM_SLOTS) change, and it refuses, with
:class:`RegionRefused`, what a hostile front end may send: regions of size
0, user ranges that overlap, more regions than ``max_slots``, a REM_MEM_REG
of a region it never added, an fd that cannot be sealed against shrinking
(unless ``allow_unsealed``; see :mod:`pyvirtio.memory`), an fd that does not
map.  Sans-IO: the only system calls are :class:`~pyvirtio.memory.GuestMemory`'s
mmaps; an fd it does not map is handed back in the refusal for the caller
to close, so the session can give it to its host.  When to stop the device
around a change is the session's business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pyvirtio.memory import GuestMemory, GuestMemoryError, UnsealedMemoryError
from pyvirtio.transport.vhost_user.payloads import MemoryRegionDesc, MemoryTable, VringAddr

__all__ = ["Region", "RegionRefused", "RegionTable", "StagedTable"]

log = logging.getLogger(__name__)


class RegionRefused(Exception):
    """A memory table change that cannot be honoured; nothing changed.

    ``fds`` are the request's fds that were not mapped: the caller owns them
    now and closes them (or has its host close them).
    """

    def __init__(self, message: str, fds: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.fds: tuple[int, ...] = tuple(fds)


@dataclass(frozen=True)
class Region:
    """One shared memory region: where it is for the guest and for the front end."""

    guest_addr: int
    size: int
    user_addr: int

    @classmethod
    def of(cls, desc: MemoryRegionDesc) -> Region:
        return cls(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr)

    def contains_user(self, addr: int) -> bool:
        return self.user_addr <= addr < self.user_addr + self.size

    def overlaps_user(self, other: Region) -> bool:
        return (
            self.user_addr < other.user_addr + other.size
            and other.user_addr < self.user_addr + self.size
        )

    def holds_ring(self, addr: VringAddr | None) -> bool:
        """Whether any of a ring's three areas starts in this region."""
        if addr is None:
            return False
        return any(
            self.contains_user(a)
            for a in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        )

    def __str__(self) -> str:
        return f"guest {self.guest_addr:#x} / user {self.user_addr:#x} of size {self.size:#x}"


class StagedTable(NamedTuple):
    """A SET_MEM_TABLE mapped beside the current table, not yet in use."""

    memory: GuestMemory
    regions: tuple[Region, ...]


class RegionTable:
    """The regions one front end shared: mapped in :attr:`memory`, with their user addresses.

    :attr:`memory` stays the same object for the table's life (devices and
    queues hold it); a new table swaps its regions.
    """

    def __init__(self, *, max_slots: int, allow_unsealed: bool = False, name: str = "") -> None:
        self.memory = GuestMemory()
        #: Most regions at once (GET_MAX_MEM_SLOTS).
        self.max_slots = max_slots
        self.allow_unsealed = allow_unsealed
        self.name = name
        self._regions: list[Region] = []
        self._warned_unsealed = False

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    # -- changes ---------------------------------------------------------------------------

    def stage(self, table: MemoryTable, fds: Sequence[int]) -> StagedTable:
        """Map every region of a SET_MEM_TABLE (``fds`` one each) without touching the current.

        On a refusal whatever was staged is unmapped (closing the fds it
        took) and the fds not mapped are in the :class:`RegionRefused`.
        """
        if len(fds) != len(table.regions):
            raise RegionRefused(f"{len(table.regions)} regions with {len(fds)} fds", fds)
        staging = GuestMemory()
        regions: list[Region] = []
        try:
            for taken, (desc, fd) in enumerate(zip(table.regions, fds, strict=True)):
                try:
                    region = self._map(staging, desc, fd)
                    self._check_user_overlap(regions, region)
                except RegionRefused as exc:
                    # A mapped fd is staging's (closed with it); the rest were never taken.
                    raise RegionRefused(str(exc), (*exc.fds, *fds[taken + 1 :])) from exc
                regions.append(region)
        except BaseException:
            staging.close()
            raise
        return StagedTable(staging, tuple(regions))

    def install(self, staged: StagedTable) -> None:
        """Replace every region by the staged ones (unmapping the old)."""
        memory = self.memory
        for old in list(memory.regions):
            memory.remove_region(old.guest_base)
        for mapped in list(staged.memory.regions):
            memory.add_region(staged.memory.remove_region(mapped.guest_base, close=False))
        self._regions = list(staged.regions)

    def add(self, desc: MemoryRegionDesc, fd: int) -> Region:
        """ADD_MEM_REG: one more region, in a free slot, overlapping none in user space."""
        new = Region.of(desc)
        if len(self._regions) >= self.max_slots:
            raise RegionRefused(f"all {self.max_slots} memory slots are in use", (fd,))
        try:
            self._check_user_overlap(self._regions, new)
        except RegionRefused as exc:
            raise RegionRefused(str(exc), (fd,)) from None
        mapped = self._map(self.memory, desc, fd)
        self._regions.append(mapped)
        return mapped

    def find(self, desc: MemoryRegionDesc) -> Region:
        """REM_MEM_REG's region: the one with the same guest address, user address and size."""
        wanted = Region.of(desc)
        if wanted not in self._regions:
            raise RegionRefused(f"no region at {wanted}")
        return wanted

    def remove(self, region: Region) -> None:
        """Unmap ``region`` (one :meth:`find` returned)."""
        self._regions.remove(region)
        self.memory.remove_region(region.guest_addr)

    def close(self) -> None:
        """Unmap every region."""
        self.memory.close()
        self._regions.clear()

    # -- translation -----------------------------------------------------------------------

    def to_guest(self, addr: int, what: str) -> int:
        """A front-end user address as guest-physical (vhost-user.rst "Memory access")."""
        for region in self._regions:
            if region.contains_user(addr):
                return region.guest_addr + (addr - region.user_addr)
        raise RegionRefused(f"{what} user address {addr:#x} is in no memory region")

    # -- internals -------------------------------------------------------------------------

    def _map(self, mem: GuestMemory, desc: MemoryRegionDesc, fd: int) -> Region:
        """Map ``fd`` for ``desc`` into ``mem``, which then owns the fd (else it is refused)."""
        if desc.memory_size == 0:
            raise RegionRefused("memory region of size 0", (fd,))
        try:
            region = mem.add_fd(
                desc.guest_phys_addr,
                desc.memory_size,
                fd,
                desc.mmap_offset,
                take_ownership=True,
                allow_unsealed=self.allow_unsealed,
            )
        except UnsealedMemoryError as exc:
            raise RegionRefused(
                f"memory region at guest {desc.guest_phys_addr:#x}: {exc} (a memfd made "
                "without MFD_ALLOW_SEALING, or a hugetlbfs or regular file), so the front "
                "end could truncate it and crash this back end; refused (start with "
                "--unsealed-memory allow to accept such memory from a trusted front end)",
                (fd,),
            ) from exc
        except GuestMemoryError as exc:
            raise RegionRefused(f"cannot map memory region: {exc}", (fd,)) from exc
        if not region.sealed and not self._warned_unsealed:
            self._warned_unsealed = True
            log.warning(
                "%s: memory region at guest %#x cannot be sealed against shrinking; mapped "
                "as --unsealed-memory allow says: this front end can crash this back end "
                "by truncating it",
                self.name,
                desc.guest_phys_addr,
            )
        return Region.of(desc)

    @staticmethod
    def _check_user_overlap(regions: Iterable[Region], new: Region) -> None:
        for other in regions:
            if new.overlaps_user(other):
                raise RegionRefused(
                    f"user range [{new.user_addr:#x}, +{new.size:#x}) overlaps "
                    f"[{other.user_addr:#x}, +{other.size:#x})"
                )
