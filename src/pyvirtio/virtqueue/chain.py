"""A descriptor chain as the device sees it: :class:`DescriptorChain`.

Both ring formats' walkers end by building one (virtio's "descriptor
chain": split-ring.tex, "The Virtqueue Descriptor Table"; packed-ring.tex,
"Scatter-Gather Support"); device models read and write guest memory
through it.  It is a hot class: one is built per request, so the compiled
build compiles this module (:mod:`pyvirtio.compiled`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.virtqueue.errors import VirtqueueError

__all__ = ["DescriptorChain"]


class DescriptorChain:
    """One available buffer as the device sees it.

    ``head`` is the identifier the device hands back in ``add_used``: the head
    descriptor index for split rings, the buffer ID for packed rings.
    ``readable`` and ``writable`` are the driver-to-device and
    device-to-driver parts as ordered ``(guest address, length)`` lists, with
    indirect tables already flattened.  ``ring_slots`` is how many ring
    descriptors the chain occupied: packed rings need it to skip them, and a
    device holding chains counts them to know when the driver has none left
    (split rings: entries of the descriptor table; an indirect table takes one).
    Every range was checked against guest memory when the chain was parsed.
    """

    __slots__ = (
        "head",
        "mem",
        "readable",
        "readable_len",
        "ring_slots",
        "writable",
        "writable_len",
    )

    def __init__(
        self,
        mem: GuestMemory,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
        ring_slots: int = 1,
    ) -> None:
        self.mem = mem
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.ring_slots = ring_slots

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B/"
            f"{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )

    # -- readable part --------------------------------------------------------

    def read_all(self) -> bytes:
        """Every readable byte, gathered."""
        readable = self.readable
        if len(readable) == 1:
            addr, length = readable[0]
            return self.mem.read(addr, length)
        return self.mem.readv(readable)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` readable bytes from ``offset`` (fewer if the part is shorter)."""
        return b"".join(bytes(v) for v in _slice_views(self.mem, self.readable, offset, length))

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the readable part (optionally a sub-range), e.g. for pwritev."""
        if length is None:
            length = max(0, self.readable_len - offset)
        return _slice_views(self.mem, self.readable, offset, length)

    # -- writable part --------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable part at ``offset``; returns bytes written."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in _slice_views(self.mem, self.writable, offset, len(src)):
            n = len(view)
            view[:] = src[pos : pos + n]
            pos += n
        return pos

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of the writable part (optionally a sub-range), e.g. for preadv."""
        if length is None:
            length = max(0, self.writable_len - offset)
        return _slice_views(self.mem, self.writable, offset, length)


def _slice_views(
    mem: GuestMemory, ranges: Sequence[tuple[int, int]], offset: int, length: int
) -> list[memoryview]:
    """Views covering ``length`` bytes from ``offset`` of a scatter-gather list."""
    out: list[memoryview] = []
    if length <= 0:
        return out
    for addr, size in ranges:
        if offset >= size:
            offset -= size
            continue
        n = min(size - offset, length)
        try:
            out.extend(mem.views([(addr + offset, n)]))
        except GuestMemoryError as exc:  # regions removed since the chain was parsed
            raise VirtqueueError(str(exc)) from exc
        length -= n
        offset = 0
        if length == 0:
            break
    return out
