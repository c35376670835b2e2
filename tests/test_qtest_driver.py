"""pyvirtio's drivers against QEMU's own virtio-mmio devices, over qtest.

Each test starts a QEMU microvm (about 50 ms) whose vCPU only halts; the
driver reaches its registers through qtest and its rings through the shared
guest RAM.  Data is checked in the image file QEMU writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.constants import DeviceId, Feature
from pyvirtio.devices.block import BlkFeature
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.entropy import EntropyDriver
from pyvirtio.driver.qtest import (
    MICROVM_IRQ_BASE,
    MICROVM_MMIO_BASE,
    MICROVM_MMIO_SLOTS,
    MICROVM_MMIO_STRIDE,
    QtestError,
    QtestMachine,
    VirtioMmioSlot,
    qemu_binary,
)

pytestmark = [
    pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.timeout(60),
]

TIMEOUT = 10.0
IMAGE_SIZE = 4 << 20
SERIAL = "pyvirtio-qtest-sn"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def blk_args(image: Path) -> list[str]:
    return [
        "-blockdev",
        f"driver=file,node-name=d0,filename={image},discard=unmap",
    ]


def the_device(machine: QtestMachine, device_id: int) -> VirtioMmioSlot:
    (slot,) = [s for s in machine.find_devices() if s.device_id == device_id]
    return slot


@pytest.fixture
def blk_machine(image: Path) -> Iterator[QtestMachine]:
    with QtestMachine(
        [f"virtio-blk-device,drive=d0,serial={SERIAL}"], args=blk_args(image), timeout=TIMEOUT
    ) as machine:
        yield machine


def test_microvm_slots_and_interrupt_lines(image: Path) -> None:
    """Command-line order fills slots from the top; slot i interrupts on GSI 16 + i."""
    with QtestMachine(
        [
            "virtio-blk-device,drive=d0",
            "virtio-rng-device",
            "virtio-net-device,netdev=n0",
        ],
        args=[*blk_args(image), "-netdev", "hubport,id=n0,hubid=0"],
        timeout=TIMEOUT,
    ) as machine:
        slots = machine.find_devices(include_empty=True)
        assert [s.base for s in slots] == [
            MICROVM_MMIO_BASE + i * MICROVM_MMIO_STRIDE for i in range(MICROVM_MMIO_SLOTS)
        ]
        assert [s.irq for s in slots] == [MICROVM_IRQ_BASE + i for i in range(MICROVM_MMIO_SLOTS)]
        assert [s.device_id for s in slots[-3:]] == [DeviceId.NET, DeviceId.ENTROPY, DeviceId.BLOCK]
        assert [s.device_id for s in slots[:-3]] == [0] * (MICROVM_MMIO_SLOTS - 3)
        assert machine.find_devices() == slots[-3:]
        # Beyond the last window nothing answers.
        assert machine.readl(MICROVM_MMIO_BASE + MICROVM_MMIO_SLOTS * MICROVM_MMIO_STRIDE) == 0

        # The interrupt line really is the slot's: a request on the rng raises it
        # (without EVENT_IDX, so that no suppression can hold the interrupt back).
        rng = slots[-2]
        driver = EntropyDriver(
            machine.transport(rng),
            features=~Feature.EVENT_IDX.mask,
            buffer_size=64,
            timeout=TIMEOUT,
        )
        driver.read(64)
        # The driver may have slept on the line and acked it already, or found
        # the buffer used first: the line's history says it was raised either way.
        deadline = time.monotonic() + TIMEOUT
        while not machine.irqs.raised.get(rng.irq) and time.monotonic() < deadline:
            machine.wait_irq([rng.irq], 0.1)
        assert machine.irqs.raised.get(rng.irq, 0) >= 1
        assert set(machine.irqs.raised) == {rng.irq}
        machine.transport(rng).ack_interrupt(1)
        machine.poll_irqs()
        assert not machine.irqs.is_high([rng.irq])


@pytest.mark.parametrize(
    ("event_idx", "indirect"),
    [(True, True), (False, False)],
    ids=["event_idx+indirect", "plain"],
)
def test_blk_driver_against_qemu(
    blk_machine: QtestMachine, image: Path, event_idx: bool, indirect: bool
) -> None:
    machine = blk_machine
    slot = the_device(machine, DeviceId.BLOCK)
    blk = BlkDriver(
        machine.transport(slot), event_idx=event_idx, indirect=indirect, timeout=TIMEOUT
    )
    assert blk.has(Feature.EVENT_IDX) is event_idx
    assert blk.has(Feature.INDIRECT_DESC) is indirect
    assert not blk.has(Feature.RING_PACKED)
    assert blk.size == IMAGE_SIZE
    assert blk.get_id() == SERIAL

    pattern = bytes(range(256)) * 64  # 16 KiB
    blk.write(8192, pattern)
    assert blk.read(8192, len(pattern)) == pattern
    blk.flush()
    assert image.read_bytes()[8192 : 8192 + len(pattern)] == pattern

    # A batch of scattered requests in flight at once, one kick.
    buf = blk.alloc_buffer(32 * 4096)
    for i in range(32):
        buf.view[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
    tokens = {
        blk.submit_write(65536 + i * 8192, buf.addr + i * 4096, 4096, kick=False) for i in range(32)
    }
    blk.kick()
    done: dict[int, int] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(done) < len(tokens) and time.monotonic() < deadline:
        done.update(blk.wait(1, timeout=TIMEOUT))
    assert done == dict.fromkeys(tokens, 0)
    data = image.read_bytes()
    for i in range(32):
        offset = 65536 + i * 8192
        assert data[offset : offset + 4096] == bytes([i + 1]) * 4096
        assert data[offset + 4096 : offset + 8192] == bytes(4096)

    # The driver's RAM is QEMU's: the same bytes through qtest.
    assert machine.memread(buf.addr, 4096) == bytes(buf.view[:4096])
    blk.free_buffer(buf)
    assert machine.irqs.raised.get(slot.irq, 0) >= 1


def test_blk_discard_and_write_zeroes(blk_machine: QtestMachine, image: Path) -> None:
    slot = the_device(blk_machine, DeviceId.BLOCK)
    blk = BlkDriver(blk_machine.transport(slot), timeout=TIMEOUT)
    assert blk.has(BlkFeature.DISCARD) and blk.has(BlkFeature.WRITE_ZEROES)
    blk.write(0, b"\xaa" * (1 << 20))
    blk.write_zeroes(4096, 8192)
    blk.discard(512 << 10, 256 << 10)  # 64 KiB aligned: QEMU punches a hole
    blk.flush()
    data = image.read_bytes()
    assert data[:4096] == b"\xaa" * 4096
    assert data[4096 : 3 * 4096] == bytes(8192)
    assert data[3 * 4096 : 4 * 4096] == b"\xaa" * 4096
    assert data[512 << 10 : 768 << 10] == bytes(256 << 10)
    assert data[768 << 10 : 1 << 20] == b"\xaa" * (256 << 10)
    assert blk.read(4096, 8192) == bytes(8192)


def test_entropy_driver_against_qemu() -> None:
    with QtestMachine(["virtio-rng-device"], timeout=TIMEOUT) as machine:
        slot = the_device(machine, DeviceId.ENTROPY)
        driver = EntropyDriver(machine.transport(slot), buffer_size=4096, timeout=TIMEOUT)
        assert not driver.packed_ring
        data = driver.read(20000)
        assert len(data) == 20000 and len(set(data)) > 200
        driver.close()


def test_packed_ring_against_qemu(image: Path) -> None:
    with QtestMachine(
        [f"virtio-blk-device,drive=d0,serial={SERIAL},packed=on", "virtio-rng-device,packed=on"],
        args=blk_args(image),
        timeout=TIMEOUT,
    ) as machine:
        blk = BlkDriver(
            machine.transport(the_device(machine, DeviceId.BLOCK)), packed=True, timeout=TIMEOUT
        )
        assert blk.has(Feature.RING_PACKED)
        blk.write(0, b"packed!!" * 512)
        assert blk.read(0, 4096) == b"packed!!" * 512
        assert blk.get_id() == SERIAL
        rng = EntropyDriver(
            machine.transport(the_device(machine, DeviceId.ENTROPY)), timeout=TIMEOUT
        )
        assert rng.packed_ring and len(rng.read(5000)) == 5000


def test_qemu_created_memfd_is_shared_too(image: Path) -> None:
    with QtestMachine(
        ["virtio-blk-device,drive=d0"], args=blk_args(image), memory="qemu-memfd", timeout=TIMEOUT
    ) as machine:
        blk = BlkDriver(machine.transport(the_device(machine, DeviceId.BLOCK)), timeout=TIMEOUT)
        blk.write(4096, b"\x5a" * 4096)
        assert blk.read(4096, 4096) == b"\x5a" * 4096
    assert image.read_bytes()[4096:8192] == b"\x5a" * 4096


def test_memory_access_and_registers() -> None:
    with QtestMachine(timeout=TIMEOUT) as machine:
        addr = machine.allocator.alloc(3 << 20)  # spans b64 chunks
        data = os.urandom(3 << 20)
        machine.memwrite(addr, data)
        assert machine.mem.read(addr, len(data)) == data  # QEMU's write, our mapping
        machine.mem.write(addr + 100, b"from python")
        assert machine.memread(addr + 100, 11) == b"from python"
        machine.memset(addr, 16, 0x41)
        assert machine.mem.read(addr, 16) == b"A" * 16
        machine.writeq(addr, 0x0102_0304_0506_0708)
        assert machine.readb(addr) == 0x08 and machine.readw(addr) == 0x0708
        assert machine.readl(addr + 4) == 0x0102_0304
        assert machine.readq(addr) == 0x0102_0304_0506_0708
        start = time.monotonic()
        assert machine.wait_irq(None, 0.1) is False  # nothing raises anything
        assert time.monotonic() - start < 2
        with pytest.raises(QtestError, match="FAIL"):
            machine.command("irq_intercept_in no-such-device")


def test_qemu_failing_to_start_is_reported(tmp_path: Path) -> None:
    with pytest.raises(QtestError, match="no-such-device"):
        QtestMachine(["no-such-device"], timeout=TIMEOUT)


def test_close_kills_qemu() -> None:
    machine = QtestMachine(timeout=TIMEOUT)
    pid = machine.pid
    assert pid is not None
    machine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(QtestError, match="closed"):
        machine.readl(MICROVM_MMIO_BASE)
    machine.close()  # idempotent


def test_qmp_through_qemu_qmp() -> None:
    """``qmp=True`` machines answer QMP through QEMU's own Python library."""
    pytest.importorskip("qemu.qmp", reason="the qemu.qmp package is not installed")
    with QtestMachine(["virtio-rng-device"], qmp=True, timeout=TIMEOUT) as machine:
        assert machine.qmp("query-status")["status"] == "running"
        with pytest.raises(QtestError, match="no-such-command"):
            machine.qmp("no-such-command")
        # The connection survives an error.
        assert machine.qmp("query-status")["running"] is True
    with (
        QtestMachine(["virtio-rng-device"], timeout=TIMEOUT) as machine,
        pytest.raises(QtestError, match="qmp=True"),
    ):
        machine.qmp("query-status")
