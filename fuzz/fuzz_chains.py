"""Fuzz target: device-side descriptor-chain parsing, split and packed rings.

The input bytes are a driver's worst behaviour: they choose the ring format,
size and features, then fill the descriptor table, indirect tables and ring
indices with whatever they hold.  The device side must return chains whose
every range lies in guest memory, or raise ``VirtqueueError`` and stay
broken; any other exception is a bug.

Runs under atheris (coverage guided) when it is installed, and under
hypothesis otherwise::

    python fuzz/fuzz_chains.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_chains.py --engine hypothesis --runs 3000  # force hypothesis
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

# Run as a script: its directory is on sys.path.
from _common import Bytes, main

if TYPE_CHECKING:
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue.packed import PackedDeviceQueue
    from pyvirtio.virtqueue.split import SplitDeviceQueue

MEM_SIZE = 1 << 20
DESC_ADDR = 0x1000
DRIVER_ADDR = 0x40000
DEVICE_ADDR = 0x50000
INDIRECT_ADDR = 0x60000
SPLIT_SIZES = (1, 2, 4, 8, 16, 64, 256)
PACKED_SIZES = (1, 2, 3, 4, 7, 16, 64, 255)

_DESC = struct.Struct("<QIHH")


def _descriptor(src: Bytes, size: int, wrap_bits: int) -> bytes:
    """A descriptor biased towards the interesting: mostly in memory, flags mixed."""
    selector = src.take(1)
    # Mostly addresses inside guest memory; sometimes anywhere, overflow included.
    addr = src.take(8) if selector & 0x80 else src.take(2) * 16
    length = src.take(4) if selector & 0x40 else src.take(2)
    if selector & 0x20 and selector & 0x04:
        addr = INDIRECT_ADDR + src.take(1) * 16
    flags = (selector & 0x07) | wrap_bits
    if selector & 0x18 == 0x18:
        flags = src.take(2)
    nxt = src.take(2) % (size + 2)
    return _DESC.pack(addr & (1 << 64) - 1, length, flags, nxt)


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global GuestMemory, VirtqueueError, PackedDeviceQueue, SplitDeviceQueue
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue import VirtqueueError
    from pyvirtio.virtqueue.packed import PackedDeviceQueue
    from pyvirtio.virtqueue.split import SplitDeviceQueue


def run_one(data: bytes) -> None:
    src = Bytes(data)
    packed = bool(src.take(1) & 1)
    opts = src.take(1)
    event_idx, indirect = bool(opts & 1), bool(opts & 2)
    sizes = PACKED_SIZES if packed else SPLIT_SIZES
    size = sizes[src.take(1) % len(sizes)]
    mem = GuestMemory.anonymous(MEM_SIZE)

    # Indirect tables and descriptor ring from the input.
    for i in range(src.take(1) % 32):
        mem.write(INDIRECT_ADDR + i * 16, _descriptor(src, size, 0))
    for i in range(size):
        wrap = 0x80 if packed and src.take(1) & 1 else 0  # AVAIL bit for wrap counter 1
        mem.write(DESC_ADDR + i * 16, _descriptor(src, size, wrap << 0))
    queue: SplitDeviceQueue | PackedDeviceQueue
    try:
        if packed:
            queue = PackedDeviceQueue(
                mem,
                size,
                DESC_ADDR,
                DRIVER_ADDR,
                DEVICE_ADDR,
                event_idx=event_idx,
                indirect=indirect,
            )
        else:
            for i in range(size):
                mem.write_u16(DRIVER_ADDR + 4 + 2 * i, src.take(2) % (size + 4))
            mem.write_u16(DRIVER_ADDR + 2, src.take(2))
            queue = SplitDeviceQueue(
                mem,
                size,
                DESC_ADDR,
                DRIVER_ADDR,
                DEVICE_ADDR,
                event_idx=event_idx,
                indirect=indirect,
            )
    except VirtqueueError:
        return

    for _ in range(2 * size + 2):
        try:
            chain = queue.pop()
        except VirtqueueError:
            assert queue.broken, "a VirtqueueError must leave the queue broken"
            try:
                queue.pop()
            except VirtqueueError:
                return
            raise AssertionError("a broken queue popped without raising") from None
        if chain is None:
            break
        for addr, length in chain.readable + chain.writable:
            assert mem.is_valid(addr, length), f"chain range {addr:#x}+{length} outside memory"
        assert chain.readable_len == sum(n for _, n in chain.readable)
        assert chain.writable_len == sum(n for _, n in chain.writable)
        chain.read_all()
        chain.write(b"\xa5" * min(chain.writable_len, 64))
        queue.add_used(chain, min(chain.writable_len, 64))
        queue.needs_notification()
        if src.take(1) & 1 and packed:
            # The driver may publish more descriptors between pops.
            idx = src.take(1) % size
            mem.write(DESC_ADDR + idx * 16, _descriptor(src, size, src.take(1) & 0x80))


if __name__ == "__main__":
    main(
        "fuzz_chains",
        "Fuzz device-side chain parsing.",
        run_one,
        _load,
        max_len=8192,
        libfuzzer_args=["-len_control=0"],
    )
