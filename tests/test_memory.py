"""GuestMemory: region kinds, bounds checks, scatter-gather, scalar accessors."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.memory import GuestMemory, GuestMemoryError

PAGE = mmap.PAGESIZE


def test_anonymous_round_trip() -> None:
    with GuestMemory.anonymous(4 * PAGE, base=0x1000) as mem:
        mem.write(0x1000, b"hello")
        assert mem.read(0x1000, 5) == b"hello"
        assert mem.size == 4 * PAGE
        assert mem.regions[0].fd is None


def test_scalars_are_little_endian() -> None:
    mem = GuestMemory.anonymous(PAGE)
    mem.write_u64(8, 0x0102030405060708)
    assert mem.read(8, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert mem.read_u32(8) == 0x05060708
    assert mem.read_u16(8) == 0x0708
    assert mem.read_u8(15) == 1
    mem.write_u16(0, 0x1FFFF)  # truncated to 16 bits, not an error
    assert mem.read_u16(0) == 0xFFFF
    mem.write_u32(100, 0xDEADBEEF)
    assert mem.read(100, 4) == b"\xef\xbe\xad\xde"
    mem.write_u8(200, 0x1AB)
    assert mem.read_u8(200) == 0xAB


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (PAGE, 1),  # just past the end
        (PAGE - 1, 2),  # straddles the end
        (-1, 1),
        (0, -1),
        ((1 << 64) - 1, 2),  # end overflows 2**64
        (1 << 64, 0),
        (0x10_0000_0000, 4),
    ],
)
def test_out_of_bounds_raises(addr: int, length: int) -> None:
    mem = GuestMemory.anonymous(PAGE)
    with pytest.raises(GuestMemoryError):
        mem.read(addr, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(addr, b"\0" * length)
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)
    assert not mem.is_valid(addr, length)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_scalar_accessors_check_bounds(width: int) -> None:
    mem = GuestMemory.anonymous(PAGE, base=PAGE)
    reader = getattr(mem, f"read_u{width * 8}")
    writer = getattr(mem, f"write_u{width * 8}")
    for addr in (PAGE + PAGE - width + 1, PAGE - 1, 0, -8, (1 << 64) - 1):
        with pytest.raises(GuestMemoryError):
            reader(addr)
        with pytest.raises(GuestMemoryError):
            writer(addr, 0)
    writer(2 * PAGE - width, 1)
    assert reader(2 * PAGE - width) == 1


def test_gap_between_regions_is_not_memory() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, PAGE)
    mem.add_anonymous(2 * PAGE, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.read(PAGE, 1)
    with pytest.raises(GuestMemoryError):
        mem.read(PAGE - 1, 2)
    assert mem.is_valid(2 * PAGE, PAGE)


def test_contiguous_regions_read_and_write_across_the_boundary() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, PAGE)
    mem.add_memfd(PAGE, PAGE)
    mem.write(PAGE - 3, b"abcdef")
    assert mem.read(PAGE - 3, 6) == b"abcdef"
    assert mem.read(PAGE, 3) == b"def"
    # A zero-copy view must stay inside one region.
    with pytest.raises(GuestMemoryError):
        mem.view(PAGE - 3, 6)
    views = mem.views([(PAGE - 3, 6)])
    assert [bytes(v) for v in views] == [b"abc", b"def"]


def test_overlapping_regions_are_refused() -> None:
    mem = GuestMemory.anonymous(2 * PAGE)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_anonymous(PAGE, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.add_anonymous(0, 0)


def test_failed_write_touches_nothing() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, PAGE)
    mem.add_anonymous(PAGE, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.write(2 * PAGE - 2, b"xxxx")
    assert mem.read(2 * PAGE - 2, 2) == b"\0\0"
    with pytest.raises(GuestMemoryError):
        mem.writev([(0, 4), (3 * PAGE, 4)], b"yyyyyyyy")
    assert mem.read(0, 4) == b"\0\0\0\0"


def test_view_is_zero_copy() -> None:
    mem = GuestMemory.anonymous(PAGE)
    view = mem.view(16, 4)
    view[:] = b"wxyz"
    assert mem.read(16, 4) == b"wxyz"
    mem.write(16, b"1234")
    assert bytes(view) == b"1234"


def test_readv_writev() -> None:
    mem = GuestMemory.anonymous(PAGE)
    ranges = [(0, 3), (100, 2), (200, 5)]
    assert mem.writev(ranges, b"abcdefghij") == 10
    assert mem.readv(ranges) == b"abcdefghij"
    assert mem.read(100, 2) == b"de"
    # Short data fills the first ranges only.
    assert mem.writev(ranges, b"XY") == 2
    assert mem.readv(ranges) == b"XYcdefghij"
    buf = bytearray(5)
    mem.read_into(200, buf)
    assert buf == b"fghij"


def test_fill() -> None:
    mem = GuestMemory.anonymous(PAGE)
    mem.fill(10, 20, 0xAA)
    assert mem.read(9, 22) == b"\0" + b"\xaa" * 20 + b"\0"


def test_memfd_is_shared_with_another_process() -> None:
    mem = GuestMemory.memfd(PAGE, base=0x4000)
    region = mem.regions[0]
    assert region.fd is not None
    mem.write(0x4000 + 10, b"from parent")
    child = (
        "import mmap,os,sys\n"
        "fd=int(sys.argv[1])\n"
        "m=mmap.mmap(fd, 4096)\n"
        "assert m[10:21]==b'from parent', m[10:21]\n"
        "m[0:5]=b'child'\n"
    )
    subprocess.run(
        [sys.executable, "-c", child, str(region.fd)], check=True, pass_fds=[region.fd], timeout=30
    )
    assert mem.read(0x4000, 5) == b"child"
    mem.close()


def test_caller_fd_with_unaligned_offset() -> None:
    fd = os.memfd_create("test", 0)
    try:
        os.ftruncate(fd, 4 * PAGE)
        os.pwrite(fd, b"marker", PAGE + 123)
        mem = GuestMemory()
        mem.add_fd(0x10000, PAGE, fd, offset=PAGE + 123)
        assert mem.read(0x10000, 6) == b"marker"
        mem.write(0x10000 + 6, b"!")
        assert os.pread(fd, 7, PAGE + 123) == b"marker!"
        with pytest.raises(GuestMemoryError):
            mem.read(0x10000 + PAGE, 1)
        mem.close()
        os.fstat(fd)  # not owned, still open
    finally:
        os.close(fd)


def test_add_fd_with_bad_fd_raises_guest_memory_error() -> None:
    mem = GuestMemory()
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError):
            mem.add_fd(0, PAGE, r)
    finally:
        os.close(r)
        os.close(w)


def test_remove_region() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, PAGE)
    mem.add_memfd(PAGE * 4, PAGE)
    removed = mem.remove_region(PAGE * 4)
    assert removed.fd is None  # owned fd closed
    with pytest.raises(GuestMemoryError):
        mem.read(PAGE * 4, 1)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(PAGE * 4)
    assert mem.read(0, 1) == b"\0"


def test_remove_region_with_live_view_does_not_crash() -> None:
    mem = GuestMemory.anonymous(PAGE)
    view = mem.view(0, 16)
    mem.remove_region(0)
    assert len(view) == 16  # the mapping lives on until the view is dropped
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)


@settings(max_examples=300, deadline=None)
@given(addr=st.integers(min_value=-(1 << 65), max_value=1 << 65), length=st.integers(0, 1 << 20))
def test_any_range_either_works_or_raises_guest_memory_error(addr: int, length: int) -> None:
    mem = _two_regions()
    inside = any(r.start <= addr and addr + length <= r.stop for r in _merged(mem)) or (
        length == 0 and 0 <= addr < 1 << 64
    )
    try:
        data = mem.read(addr, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside
        assert len(data) == length


_MEM: GuestMemory | None = None


def _two_regions() -> GuestMemory:
    global _MEM
    if _MEM is None:
        _MEM = GuestMemory()
        _MEM.add_anonymous(0x1000, 2 * PAGE)
        _MEM.add_anonymous(0x1000 + 2 * PAGE, PAGE)  # contiguous with the first
        _MEM.add_anonymous(0x100000, PAGE)
    return _MEM


def _merged(mem: GuestMemory) -> list[range]:
    """Contiguous runs of regions, as ranges of guest addresses."""
    runs: list[list[int]] = []
    for r in mem.regions:
        if runs and runs[-1][1] == r.guest_base:
            runs[-1][1] = r.guest_end
        else:
            runs.append([r.guest_base, r.guest_end])
    return [range(a, b) for a, b in runs]


# -- region windows ------------------------------------------------------------------------


def test_window_covers_its_region_while_the_table_is_unchanged() -> None:
    with GuestMemory.anonymous(0x2000) as mem:
        window = mem.window(0x100, 0x10)
        assert (window.base, window.end) == (0, 0x2000)
        assert window.covers(mem, 0, 0x2000)
        assert not window.covers(mem, 0x1FFF, 2)
        window.view[0x100] = 7
        assert mem.read_u8(0x100) == 7


def test_adding_or_removing_a_region_invalidates_every_window() -> None:
    with GuestMemory.anonymous(0x1000) as mem:
        window = mem.window(0)
        mem.add_anonymous(0x10000, 0x1000)
        assert not window.covers(mem, 0, 1)  # table replaced, even though region 0 stayed
        window = mem.window(0x10000)
        mem.remove_region(0x10000)
        assert not window.covers(mem, 0x10000, 1)
        with pytest.raises(GuestMemoryError):
            mem.window(0x10000)


def test_window_refuses_a_range_that_leaves_its_region() -> None:
    with GuestMemory() as mem:
        mem.add_anonymous(0, 0x1000)
        mem.add_anonymous(0x1000, 0x1000)  # contiguous, but a window is one region
        with pytest.raises(GuestMemoryError, match="leaves region"):
            mem.window(0xFF0, 0x20)
        with pytest.raises(GuestMemoryError):
            mem.window(0x5000)


def test_largest_window_and_the_empty_window() -> None:
    with GuestMemory() as mem:
        assert not mem.largest_window().covers(mem, 0, 0)
        assert not GuestMemory.NO_WINDOW.covers(mem, 0, 0)
        mem.add_anonymous(0, 0x1000)
        mem.add_anonymous(0x100000, 0x4000)
        window = mem.largest_window()
        assert (window.base, window.end) == (0x100000, 0x104000)
        assert window.covers(mem, 0x100000, 0x4000)
        mem.close()
        assert not window.covers(mem, 0x100000, 1)
