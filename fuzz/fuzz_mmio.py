"""Fuzz target: the virtio-MMIO register file (transport/mmio.py) as a hostile guest drives it.

The input is a sequence of guest actions against an :class:`MmioTransport`
with a real device model (entropy, or block over a small temporary file)
behind it on real guest memory (two regions with a hole between them):
reads and writes of every width at any offset, status writes (mostly the
initialisation sequence, sometimes anything), feature pages, queue setup
with fuzz-chosen sizes and ring addresses (in RAM, straddling a region's
end, in the hole, beyond 4 GiB), descriptor chains published into the
rings, notifies, interrupt acks, config accesses, and the host's
sleep / snapshot / wake in between (restoring is left to the device tests).

Properties (the transport's contract, module docstring of mmio.py):
``read``/``write`` never raise; every read fills exactly the bytes asked
for; the identification registers never change; the status register holds
only bits the driver set plus DEVICE_NEEDS_RESET; no unexpected exception
reaches the transport's catch-all (it logs "error on ..."); no model
failure is logged with a traceback; the transport never logs the same line
twice (a guest repeating a mistake costs one line); a snapshot stays
unchanged by guest writes while the device sleeps.  Guest memory is only
reachable through :class:`GuestMemory`, which refuses anything outside the
regions.
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

# Run as a script: its directory is on sys.path.
from _common import Bytes, LogRecorder, main

TARGET = "fuzz_mmio"
RAM = ((0x0, 0x10000), (0x20000, 0x4000))
#: Ring addresses the fuzzer picks from: aligned in RAM, at region ends, in
#: the hole, far beyond RAM, near the top of the 64-bit space.
ADDRESSES = (
    0x1000,
    0x2000,
    0x3000,
    0x4000,
    0x8000,
    0x20000,
    0x22000,
    0xFFF0,
    0x23FF8,
    0x18000,
    0x1_0000_0000,
    0xFFFF_FFFF_FFFF_F000,
)
#: Where published descriptor chains point their buffers.
DATA_AREA = 0xA000
BLOCK_FILE_SIZE = 64 * 1024
MAX_OPS = 48

_DESC = struct.Struct("<QIHH")
_WIDTHS = (4, 4, 4, 1, 2, 8, 3, 0, 16)


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global DeviceStatus, Feature, Entropy, Block, IrqLine, RecordingInterruptController
    global GuestMemory, mmio, LOG, MEM, BLOCK_FD
    from pyvirtio.constants import DeviceStatus, Feature
    from pyvirtio.devices.block import Block
    from pyvirtio.devices.entropy import Entropy
    from pyvirtio.irq import IrqLine, RecordingInterruptController
    from pyvirtio.memory import GuestMemory
    from pyvirtio.transport import mmio

    LOG = LogRecorder("pyvirtio")
    MEM = GuestMemory()
    for base, size in RAM:
        MEM.add_anonymous(base, size)
    fd, path = tempfile.mkstemp(prefix="pyvirtio-fuzz-blk-")
    os.unlink(path)
    os.ftruncate(fd, BLOCK_FILE_SIZE)
    BLOCK_FD = fd


def _device(src: Bytes) -> Any:
    kind = src.take(1) % 3
    if kind == 0:
        return Entropy(lambda n: b"\x5a" * n, queue_size=src.pick((8, 16, 256)))
    if kind == 1:
        return Block(BLOCK_FD, queue_size=src.pick((8, 16, 256)))
    # Entropy that also offers RING_RESET and NOTIFICATION_DATA: the
    # transport's queue-reset and notification-data paths need a device
    # that offers them, and entropy has no reason to refuse them.  The offer
    # is fixed at construction (Final) for the library; only this harness
    # widens it, before any transport has read it.
    device = Entropy(lambda n: b"\x5a" * n, queue_size=8)
    device.offered_features |= Feature.RING_RESET.mask | Feature.NOTIFICATION_DATA.mask  # type: ignore[misc]
    return device


class _Guest:
    """One fuzz input's guest: the transport and what the driver programmed."""

    def __init__(self, src: Bytes) -> None:
        self.src = src
        self.device = _device(src)
        self.irq = IrqLine(RecordingInterruptController(), 5)
        self.t = mmio.MmioTransport(self.device, MEM, self.irq)
        self.status_written = 0
        #: queue -> (size, desc, driver, device) as programmed
        self.rings: dict[int, tuple[int, int, int, int]] = {}
        self.avail_idx: dict[int, int] = {}

    # -- raw accesses -------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        data = bytearray(size)
        self.t.read(offset, data)
        assert len(data) == size, f"{size}-byte read at {offset:#x} gave {len(data)} bytes"
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int = 4) -> None:
        value &= (1 << (8 * size)) - 1
        self.t.write(offset, value.to_bytes(size, "little"))
        if offset == mmio.Reg.STATUS and size == 4:
            self.status_written = 0 if value == 0 else self.status_written | (value & 0xFF)

    def value(self) -> int:
        sel = self.src.take(1)
        if sel < 128:
            return sel & 0x0F
        if sel < 192:
            return self.src.take(4)
        if sel < 224:
            return 1 << (sel & 31)
        return 0xFFFF_FFFF

    # -- driver steps ---------------------------------------------------------------

    def init_status(self) -> None:
        """The initialisation sequence up to a fuzz-chosen step, or one odd value."""
        steps = (
            DeviceStatus.ACKNOWLEDGE,
            DeviceStatus.DRIVER,
            DeviceStatus.FEATURES_OK,
            DeviceStatus.DRIVER_OK,
        )
        sel = self.src.take(1)
        if sel >= 0xF0:
            self.write(mmio.Reg.STATUS, self.value())
            return
        status = self.status_written
        for step in steps[: sel % 5]:
            status |= step
        self.write(mmio.Reg.STATUS, status)

    def features(self) -> None:
        """Driver features: the offer masked by the input, or anything."""
        offered = self.device.offered_features
        mask = self.src.take(8) | (Feature.VERSION_1.mask if self.src.flag() else 0)
        chosen = offered & mask if self.src.take(1) < 224 else self.src.take(8)
        for page in (0, 1):
            self.write(mmio.Reg.DRIVER_FEATURES_SEL, page)
            self.write(mmio.Reg.DRIVER_FEATURES, chosen >> (32 * page))

    def queue_setup(self) -> None:
        src = self.src
        queue = src.take(1) % 3
        size = src.pick((8, 16, 4, 1, 256, 3, 0, 0x8000, src.take(4)))
        addrs = [src.pick(ADDRESSES) + (src.take(1) & 0x30) for _ in range(3)]
        self.write(mmio.Reg.QUEUE_SEL, queue)
        self.read(mmio.Reg.QUEUE_SIZE_MAX, 4)
        self.write(mmio.Reg.QUEUE_SIZE, size)
        for (low, high), addr in zip(
            (
                (mmio.Reg.QUEUE_DESC_LOW, mmio.Reg.QUEUE_DESC_HIGH),
                (mmio.Reg.QUEUE_DRIVER_LOW, mmio.Reg.QUEUE_DRIVER_HIGH),
                (mmio.Reg.QUEUE_DEVICE_LOW, mmio.Reg.QUEUE_DEVICE_HIGH),
            ),
            addrs,
            strict=True,
        ):
            if src.take(1) < 240:  # sometimes a half left unset
                self.write(low, addr)
                self.write(high, addr >> 32)
        if src.take(1) < 224:
            self.write(mmio.Reg.QUEUE_READY, 1)
        self.rings[queue] = (size, *addrs)

    def publish(self) -> None:
        """Write a descriptor chain and an avail entry into a programmed split ring."""
        src = self.src
        if not self.rings:
            return
        queue = src.pick(sorted(self.rings))
        size, desc, driver, _device = self.rings[queue]
        if not 0 < size <= 256:
            return
        head = src.take(1) % size
        count = 1 + src.take(1) % 4
        index = head
        for i in range(count):
            flags = src.take(1) & 0x7 if i + 1 < count else src.take(1) & 0x6
            nxt = (index + 1) % size
            length = src.pick((16, 64, 512, 4096, src.take(4)))
            addr = DATA_AREA + src.take(1) * 64 if src.take(1) < 240 else src.take(8)
            if src.take(1) < 200 and i + 1 < count:
                flags |= 1  # NEXT
            if i == 0 and src.take(1) < 64:
                flags |= 2  # WRITE on the head (a malformed block request)
            self._mem_write(desc + 16 * index, _DESC.pack(addr & (1 << 64) - 1, length, flags, nxt))
            index = nxt
        idx = self.avail_idx.get(queue, 0)
        self._mem_write(driver + 4 + 2 * (idx % size), struct.pack("<H", head))
        idx = (idx + 1) & 0xFFFF
        self.avail_idx[queue] = idx
        self._mem_write(driver + 2, struct.pack("<H", idx))

    def _mem_write(self, addr: int, data: bytes) -> None:
        if MEM.is_valid(addr, len(data)):
            MEM.write(addr, data)

    def snapshot_cycle(self) -> None:
        """Host sleep and snapshot: guest writes while asleep change nothing."""
        t = self.t
        t.sleep()
        try:
            doc = t.snapshot()
            self.read(mmio.Reg.STATUS, 4)
            self.write(mmio.Reg.QUEUE_NOTIFY, 0)  # ignored while asleep
            assert t.snapshot() == doc, "a write while asleep changed the snapshot"
        finally:
            t.wake()

    def step(self) -> None:
        src = self.src
        op = src.take(1) % 14
        if op == 0:
            offset = src.take(2) % 0x1100
            self.read(offset, src.pick(_WIDTHS))
        elif op == 1:
            offset = src.take(2) % 0x1100
            width = src.pick(_WIDTHS)
            self.write(offset, src.take(8), width) if width else self.t.write(offset, b"")
        elif op == 2:
            self.write(src.pick(_REGISTERS), self.value())
        elif op == 3:
            self.read(src.pick(_REGISTERS), 4)
        elif op in (4, 5):
            self.init_status()
        elif op == 6:
            self.features()
        elif op in (7, 8):
            self.queue_setup()
        elif op == 9:
            self.publish()
        elif op == 10:
            self.write(mmio.Reg.QUEUE_NOTIFY, src.take(1) % 4 | (src.take(2) << 16))
        elif op == 11:
            self.write(mmio.Reg.INTERRUPT_ACK, self.read(mmio.Reg.INTERRUPT_STATUS, 4))
        elif op == 12:
            offset = mmio.CONFIG_OFFSET + src.take(1) % 0x80
            width = src.pick((1, 2, 4, 8, 3))
            if src.flag():
                self.write(offset, src.take(8), width)
            else:
                self.read(offset, width)
        else:
            self.snapshot_cycle()

    def check_identity(self) -> None:
        assert self.read(mmio.Reg.MAGIC_VALUE, 4) == mmio.MAGIC_VALUE
        assert self.read(mmio.Reg.VERSION, 4) == mmio.MMIO_VERSION
        assert self.read(mmio.Reg.DEVICE_ID, 4) == int(self.device.device_id)

    def check_status(self) -> None:
        status = self.read(mmio.Reg.STATUS, 4)
        extra = status & ~self.status_written & ~DeviceStatus.DEVICE_NEEDS_RESET
        assert not extra, f"status {status:#x} has bits {extra:#x} the driver never set"


def _registers() -> tuple[int, ...]:
    return tuple(v for k, v in vars(mmio.Reg).items() if k.isupper())


_REGISTERS: tuple[int, ...] = ()


def _check_log() -> None:
    records = LOG.take()
    seen: set[tuple[str, str]] = set()
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            import traceback

            trace = "".join(traceback.format_exception(*record.exc_info))
            raise AssertionError(f"exception reached the transport: {text}\n{trace}")
        if record.name != "pyvirtio.transport.mmio":
            continue
        key = (record.levelname, text)
        assert key not in seen, f"logged twice: {text}"
        seen.add(key)


def run_one(data: bytes) -> None:
    global _REGISTERS
    if not _REGISTERS:
        _REGISTERS = _registers()
    LOG.take()
    for base, size in RAM:
        MEM.fill(base, size)
    src = Bytes(data)
    guest = _Guest(src)
    try:
        for _ in range(MAX_OPS):
            if src.exhausted:
                break
            guest.step()
            guest.check_status()
        guest.check_identity()
        guest.write(mmio.Reg.STATUS, 0)  # reset ends every input
        assert guest.read(mmio.Reg.STATUS, 4) == 0
    finally:
        if isinstance(guest.device, Block):
            guest.device.close()
    _check_log()


if __name__ == "__main__":
    main(TARGET, "Fuzz the virtio-MMIO register file.", run_one, _load, max_len=1024)
