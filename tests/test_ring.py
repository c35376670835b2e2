"""Unit tests of the primitives both ring formats share (virtqueue/ring.py)."""

from __future__ import annotations

import pytest

from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import ring
from pyvirtio.virtqueue.common import MAX_QUEUE_SIZE, VirtqueueError


def test_little_endian_words_match_native_casts() -> None:
    data = bytearray(range(16))
    native = ring.words(memoryview(data), "H")
    fallback = ring.LittleEndianWords(memoryview(data), "H")
    assert len(fallback) == len(native) == 8
    assert [fallback[i] for i in range(8)] == [native[i] for i in range(8)]
    fallback[3] = 0xBEEF
    assert data[6:8] == b"\xef\xbe"
    with pytest.raises(IndexError):
        fallback[8]
    with pytest.raises(ValueError):
        fallback[0] = 0x10000


@pytest.mark.parametrize("native", [True, False])
def test_spans_read_and_write_every_step(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(ring, "NATIVE_LITTLE", native)
    data = bytearray(32)
    slots = ring.words(memoryview(data), "I")
    ring.write_span(slots, 1, [5, 6, 7], step=2)
    assert ring.read_span(slots, 0, 8) == [0, 5, 0, 6, 0, 7, 0, 0]
    with pytest.raises(ValueError):
        ring.write_span(slots, 0, [1 << 32])


def test_queue_sizes() -> None:
    assert ring.check_queue_size(6, power_of_two=False) == 6
    with pytest.raises(VirtqueueError, match="power of two"):
        ring.check_queue_size(6, power_of_two=True)
    for bad in (0, MAX_QUEUE_SIZE + 1, -1):
        with pytest.raises(VirtqueueError):
            ring.check_queue_size(bad, power_of_two=False)
    with pytest.raises(VirtqueueError, match="not an integer"):
        ring.check_queue_size(True, power_of_two=False)


def test_area_view_checks_type_alignment_and_region() -> None:
    with GuestMemory.anonymous(0x1000) as mem:
        assert len(ring.area_view(mem, "ring", 0x10, 0x20, 16)) == 0x20
        with pytest.raises(VirtqueueError, match="not 16-byte aligned"):
            ring.area_view(mem, "ring", 0x8, 0x20, 16)
        with pytest.raises(VirtqueueError, match="not an integer"):
            ring.area_view(mem, "ring", None, 0x20, 16)
        with pytest.raises(VirtqueueError, match="not inside one guest memory region"):
            ring.area_view(mem, "ring", 0xFF0, 0x20, 16)


def test_state_reader_names_the_bad_field() -> None:
    fields = ring.StateReader({"a": 1, "b": True, "c": "x", "d": 0x10000})
    assert fields.integer("a") == 1
    assert fields.flag("b") is True
    with pytest.raises(VirtqueueError, match="lacks 'z'"):
        fields.integer("z")
    with pytest.raises(VirtqueueError, match="'b' is not an int"):
        fields.integer("b")
    with pytest.raises(VirtqueueError, match="'a' is not a bool"):
        fields.flag("a")
    with pytest.raises(VirtqueueError, match="'c' is not an int"):
        fields.u16("c")
    with pytest.raises(VirtqueueError, match="'d' = 65536"):
        fields.u16("d")
    with pytest.raises(VirtqueueError, match="not a dict"):
        ring.StateReader([])  # type: ignore[arg-type]
