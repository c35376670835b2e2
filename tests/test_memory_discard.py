"""GuestMemory.discard: pages really go back to the host, and read as zeros after."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from pyvirtio.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

MIB = 1 << 20


def allocated_bytes(fd: int) -> int:
    """Bytes of storage the file behind ``fd`` holds (st_blocks is in 512-byte units)."""
    return os.fstat(fd).st_blocks * 512


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def touch(mem: GuestMemory, addr: int, length: int, byte: int = 0xA5) -> None:
    mem.fill(addr, length, byte)


def test_memfd_discard_frees_storage_and_reads_zero() -> None:
    with GuestMemory.memfd(32 * MIB) as mem:
        (region,) = mem.regions
        assert region.fd is not None
        touch(mem, 0, 32 * MIB)
        before = allocated_bytes(region.fd)
        assert before >= 32 * MIB
        mem.discard(8 * MIB, 16 * MIB)
        after = allocated_bytes(region.fd)
        assert before - after >= 16 * MIB * 0.9
        assert os.fstat(region.fd).st_size == 32 * MIB, "discard changed the file size"
        assert mem.read(8 * MIB, 16 * MIB) == bytes(16 * MIB)
        # The neighbours keep their data.
        assert mem.read(8 * MIB - PAGE_SIZE, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
        assert mem.read(24 * MIB, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
        # And the discarded pages are usable again.
        mem.write(12 * MIB, b"back")
        assert mem.read(12 * MIB, 4) == b"back"


def test_memfd_discard_is_seen_by_every_mapping() -> None:
    """A second mapping of the memfd (as a vhost-user peer or QEMU has) sees the hole."""
    with GuestMemory.memfd(4 * MIB) as mem:
        (region,) = mem.regions
        assert region.fd is not None
        other = mmap.mmap(region.fd, 4 * MIB, flags=mmap.MAP_SHARED)
        try:
            other[:] = b"\x5a" * (4 * MIB)
            mem.discard(MIB, MIB)
            assert other[MIB : 2 * MIB] == bytes(MIB)
            assert other[0:PAGE_SIZE] == b"\x5a" * PAGE_SIZE
        finally:
            other.close()


def test_file_backed_region_discard(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MIB)
    with GuestMemory() as mem:
        # A file offset, as a vhost-user front end's mmap_offset gives.
        mem.add_fd(0x10_0000, 4 * MIB, fd, offset=2 * MIB, take_ownership=True)
        touch(mem, 0x10_0000, 4 * MIB)
        os.fsync(fd)
        before = allocated_bytes(fd)
        mem.discard(0x10_0000 + MIB, 2 * MIB)
        assert before - allocated_bytes(fd) >= 2 * MIB * 0.9
        assert mem.read(0x10_0000 + MIB, 2 * MIB) == bytes(2 * MIB)
        assert mem.read(0x10_0000, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
        # The hole is where the region's file offset says, not at file offset 0.
        with open(path, "rb") as f:
            f.seek(3 * MIB)
            assert f.read(2 * MIB) == bytes(2 * MIB)
            f.seek(2 * MIB)
            assert f.read(PAGE_SIZE) == b"\xa5" * PAGE_SIZE


def test_anonymous_discard_drops_resident_pages() -> None:
    with GuestMemory.anonymous(64 * MIB) as mem:
        touch(mem, 0, 64 * MIB)
        before = rss_bytes()
        mem.discard(0, 48 * MIB)
        dropped = before - rss_bytes()
        assert dropped >= 48 * MIB * 0.9, f"RSS fell by only {dropped} bytes"
        assert mem.read(0, 48 * MIB) == bytes(48 * MIB)
        assert mem.read(48 * MIB, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
        mem.write(PAGE_SIZE, b"again")
        assert mem.read(PAGE_SIZE, 5) == b"again"


def test_discard_across_contiguous_regions() -> None:
    with GuestMemory() as mem:
        mem.add_memfd(0, 2 * MIB)
        mem.add_anonymous(2 * MIB, 2 * MIB)
        touch(mem, 0, 4 * MIB)
        mem.discard(MIB, 2 * MIB)
        assert mem.read(MIB, 2 * MIB) == bytes(2 * MIB)
        assert mem.read(0, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
        assert mem.read(3 * MIB, PAGE_SIZE) == b"\xa5" * PAGE_SIZE


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (1, PAGE_SIZE),  # unaligned start
        (0, PAGE_SIZE + 1),  # unaligned length
        (4 * MIB - PAGE_SIZE, 2 * PAGE_SIZE),  # runs off the end
        (8 * MIB, PAGE_SIZE),  # outside every region
        (-PAGE_SIZE, PAGE_SIZE),  # negative
        ((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE),  # wraps the address space
    ],
)
def test_bad_ranges_are_refused_and_release_nothing(addr: int, length: int) -> None:
    with GuestMemory.memfd(4 * MIB) as mem:
        touch(mem, 0, 4 * MIB)
        with pytest.raises(GuestMemoryError):
            mem.discard(addr, length)
        assert mem.read(4 * MIB - 2 * PAGE_SIZE, 2 * PAGE_SIZE) == b"\xa5" * (2 * PAGE_SIZE)
        assert mem.read(0, PAGE_SIZE) == b"\xa5" * PAGE_SIZE


def test_discard_with_a_hole_in_guest_memory_releases_nothing() -> None:
    """A range that starts in RAM and crosses a gap is refused before anything is freed."""
    with GuestMemory() as mem:
        mem.add_memfd(0, MIB)
        mem.add_memfd(2 * MIB, MIB)
        touch(mem, 0, MIB)
        with pytest.raises(GuestMemoryError):
            mem.discard(0, 3 * MIB)
        assert mem.read(0, MIB) == b"\xa5" * MIB


def test_empty_discard_is_a_no_op() -> None:
    with GuestMemory.memfd(MIB) as mem:
        touch(mem, 0, MIB)
        mem.discard(0, 0)
        assert mem.read(0, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
