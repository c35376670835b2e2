"""RegionTable: the front end's memory regions, mapped and translated, and what it refuses.

Regions are real memfds, as a front end shares them; the table maps them
through GuestMemory.  Every refusal hands the fds it did not map back to the
caller, which the tests close, and must leave the table as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvirtio.transport.vhost_user.memory_table import Region, RegionRefused, RegionTable
from pyvirtio.transport.vhost_user.payloads import MemoryRegionDesc, MemoryTable, VringAddr

PAGE = 4096
SIZE = 16 * PAGE
USER = 0x7F00_0000_0000


def memfd(size: int = SIZE, *, sealable: bool = True) -> int:
    fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING if sealable else 0)
    os.ftruncate(fd, size)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def table() -> Iterator[RegionTable]:
    table = RegionTable(max_slots=4, name="test")
    yield table
    table.close()


def desc(guest: int, user: int, size: int = SIZE, offset: int = 0) -> MemoryRegionDesc:
    return MemoryRegionDesc(guest, size, user, offset)


def test_a_region_is_mapped_at_its_guest_address_and_translated_from_its_user_address(
    table: RegionTable,
) -> None:
    fd = memfd()
    os.pwrite(fd, b"hello", 3 * PAGE)
    region = table.add(desc(0x10000, USER), fd)
    assert region == Region(0x10000, SIZE, USER)
    assert table.regions == (region,)
    assert table.memory.read(0x10000 + 3 * PAGE, 5) == b"hello"
    assert table.to_guest(USER + 3 * PAGE, "ring") == 0x10000 + 3 * PAGE
    assert table.to_guest(USER + SIZE - 1, "ring") == 0x10000 + SIZE - 1
    with pytest.raises(RegionRefused, match=r"ring user address 0x\w+ is in no memory region"):
        table.to_guest(USER + SIZE, "ring")
    with pytest.raises(RegionRefused):
        table.to_guest(USER - 1, "ring")


def test_translation_picks_the_region_holding_the_address(table: RegionTable) -> None:
    table.add(desc(0, USER, SIZE), memfd())
    table.add(desc(0x100000, USER + 0x40000, SIZE), memfd())
    assert table.to_guest(USER + 0x40000 + 8, "x") == 0x100008
    assert table.to_guest(USER + 8, "x") == 8


def test_an_overlapping_user_range_is_refused_and_its_fd_handed_back(table: RegionTable) -> None:
    table.add(desc(0, USER), memfd())
    fd = memfd()
    # Another guest range, but its user range starts inside the first region's.
    with pytest.raises(RegionRefused, match="overlaps") as refused:
        table.add(desc(0x100000, USER + SIZE - PAGE), fd)
    assert refused.value.fds == (fd,)
    assert len(table.regions) == 1 and len(table.memory.regions) == 1
    os.close(fd)


def test_slots_past_the_limit_are_refused() -> None:
    table = RegionTable(max_slots=2)
    table.add(desc(0, USER), memfd())
    table.add(desc(SIZE, USER + SIZE), memfd())
    fd = memfd()
    with pytest.raises(RegionRefused, match="all 2 memory slots are in use") as refused:
        table.add(desc(2 * SIZE, USER + 2 * SIZE), fd)
    assert refused.value.fds == (fd,)
    assert len(table.memory.regions) == 2
    os.close(fd)
    table.close()
    assert not table.regions and not table.memory.regions


@pytest.mark.parametrize(
    ("region", "why"),
    [
        (desc(0, USER, size=0), "size 0"),
        (desc(0, USER, size=2 * SIZE), "beyond the end of its file"),
    ],
)
def test_a_region_that_cannot_be_mapped_is_refused(
    table: RegionTable, region: MemoryRegionDesc, why: str
) -> None:
    fd = memfd()
    with pytest.raises(RegionRefused, match=why) as refused:
        table.add(region, fd)
    assert refused.value.fds == (fd,) and is_open(fd)
    assert not table.regions and not table.memory.regions
    os.close(fd)


def test_unsealable_memory_is_refused_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    refusing = RegionTable(max_slots=1)
    fd = memfd(sealable=False)
    with pytest.raises(RegionRefused, match="--unsealed-memory allow") as refused:
        refusing.add(desc(0, USER), fd)
    assert refused.value.fds == (fd,)
    allowing = RegionTable(max_slots=2, allow_unsealed=True, name="trusting")
    allowing.add(desc(0, USER), fd)  # the table owns it now
    allowing.add(desc(SIZE, USER + SIZE), memfd(sealable=False))
    warnings = [r for r in caplog.records if "cannot be sealed" in r.getMessage()]
    assert len(warnings) == 1 and "trusting" in warnings[0].getMessage()  # once per table
    allowing.close()
    assert not is_open(fd)


def test_a_new_table_replaces_the_old_one_in_the_same_memory(table: RegionTable) -> None:
    old = memfd()
    table.add(desc(0, USER), old)
    memory = table.memory
    first, second = memfd(), memfd()
    os.pwrite(second, b"second", 0)
    staged = table.stage(
        MemoryTable((desc(0x200000, USER, SIZE), desc(0x300000, USER + SIZE, SIZE))),
        (first, second),
    )
    # Mapped beside the current table, which is untouched until installed.
    assert table.regions == (Region(0, SIZE, USER),)
    assert table.to_guest(USER, "x") == 0
    table.install(staged)
    assert table.memory is memory
    assert [r.guest_base for r in memory.regions] == [0x200000, 0x300000]
    assert table.to_guest(USER + SIZE, "x") == 0x300000
    assert memory.read(0x300000, 6) == b"second"
    assert not is_open(old)  # the old region was unmapped with its fd
    assert staged.memory.regions == ()


def test_a_refused_table_hands_back_what_it_did_not_map_and_changes_nothing(
    table: RegionTable,
) -> None:
    table.add(desc(0, USER), memfd())
    mapped, overlapping, rest = memfd(), memfd(), memfd()
    new = MemoryTable(
        (
            desc(0x200000, USER),
            desc(0x300000, USER + PAGE),  # its user range overlaps the first one's
            desc(0x400000, USER + 2 * SIZE),
        )
    )
    with pytest.raises(RegionRefused, match="overlaps") as refused:
        table.stage(new, (mapped, overlapping, rest))
    # The overlapping fd was mapped before the check: unmapped with the staging
    # memory, like the first; only the one never reached is the caller's.
    assert refused.value.fds == (rest,)
    assert not is_open(mapped) and not is_open(overlapping)
    os.close(rest)
    assert table.regions == (Region(0, SIZE, USER),)
    assert [r.guest_base for r in table.memory.regions] == [0]

    unmappable, after = memfd(), memfd()
    bad = MemoryTable((desc(0x200000, USER, size=0), desc(0x300000, USER + SIZE)))
    with pytest.raises(RegionRefused, match="size 0") as refused:
        table.stage(bad, (unmappable, after))
    assert refused.value.fds == (unmappable, after)
    for fd in (unmappable, after):
        os.close(fd)


def test_a_table_whose_fds_do_not_match_its_regions_is_refused(table: RegionTable) -> None:
    fd = memfd()
    with pytest.raises(RegionRefused, match="2 regions with 1 fds") as refused:
        table.stage(MemoryTable((desc(0, USER), desc(SIZE, USER + SIZE))), (fd,))
    assert refused.value.fds == (fd,) and is_open(fd)
    os.close(fd)


def test_removal_needs_the_exact_region(table: RegionTable) -> None:
    fd = memfd()
    table.add(desc(0, USER), fd)
    for wrong in (desc(0, USER, size=PAGE), desc(0, USER + PAGE), desc(PAGE, USER)):
        with pytest.raises(RegionRefused, match="no region at"):
            table.find(wrong)
    region = table.find(desc(0, USER))
    table.remove(region)
    assert table.regions == ()
    assert table.memory.regions == ()
    assert not is_open(fd)
    with pytest.raises(RegionRefused):
        table.to_guest(USER, "x")


def test_a_region_holds_a_ring_when_any_of_its_areas_starts_there() -> None:
    region = Region(0, SIZE, USER)
    assert not region.holds_ring(None)
    outside = USER + SIZE
    assert not region.holds_ring(VringAddr(0, 0, outside, outside + 64, outside + 128))
    assert region.holds_ring(VringAddr(0, 0, outside, outside, USER + SIZE - 1))
    assert region.holds_ring(VringAddr(0, 0, USER, outside, outside))
