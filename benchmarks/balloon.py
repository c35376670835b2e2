"""Inflate and deflate 1 GiB of 4 KiB pages: pyvirtio's balloon in-process vs QEMU's over qtest.

The same :class:`~pyvirtio.driver.balloon.BalloonDriver` works both devices:

* ``pyvirtio-memfd``: pyvirtio's model behind MmioTransport, guest RAM a memfd
  (pages released with fallocate(PUNCH_HOLE));
* ``pyvirtio-anon``: the same over anonymous RAM (MADV_DONTNEED);
* ``qemu``: QEMU's ``virtio-balloon-device`` on a microvm under qtest, guest
  RAM a memfd shared with this process; the target is set through QMP.

Before each run the pool is touched so every page is backed; the inflate is
timed from the target change until the driver has ``actual`` at the target,
the deflate likewise back to 0.  Host memory released is the fall of the
memfd's allocated blocks (or of this process's RSS for anonymous RAM) over
the inflate.  Cases run interleaved, ``--runs`` times each; the median is
printed with the spread (min..max).

    python benchmarks/balloon.py [--mib 1024] [--runs 5] [--cases pyvirtio-memfd,pyvirtio-anon,qemu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

from pyvirtio.constants import DeviceId
from pyvirtio.devices.balloon.device import Balloon
from pyvirtio.devices.balloon.wire import BALLOON_PAGE_SIZE, PAGES_PER_MIB
from pyvirtio.driver.balloon import BalloonDriver, PagePool
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.mmio import InProcessBus, MmioDriverTransport
from pyvirtio.driver.qtest import QtestMachine
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MmioTransport

MIB = 1 << 20
LOW = 1 * MIB
#: Guest RAM beyond the pool: rings and request buffers.
SLACK = 32 * MIB
MMIO_BASE = 0x1000_0000


class Result(NamedTuple):
    inflate_s: float
    deflate_s: float
    released: int


def _allocated(mem: GuestMemory) -> int:
    fd = mem.regions[0].fd
    if fd is not None:
        return os.fstat(fd).st_blocks * 512
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cycle(
    mem: GuestMemory,
    driver: BalloonDriver,
    set_target: Callable[[int], None],
    pages: int,
) -> Result:
    pool = driver.pool
    mem.fill(pool.base, pool.length, 0x5A)
    before = _allocated(mem)
    start = time.perf_counter()
    set_target(pages)
    while driver.actual_pages < pages:
        driver.poll(0.01)
    inflated = time.perf_counter()
    released = before - _allocated(mem)
    set_target(0)
    while driver.actual_pages > 0:
        driver.poll(0.01)
    done = time.perf_counter()
    return Result(inflated - start, done - inflated, released)


def run_pyvirtio(mib: int, memfd: bool) -> Result:
    size = mib * MIB + SLACK
    mem = GuestMemory.memfd(size) if memfd else GuestMemory.anonymous(size)
    try:
        device = Balloon(memory_size=size)
        controller = RecordingInterruptController()
        transport = MmioTransport(device, mem, IrqLine(controller, 5))
        bus = InProcessBus({MMIO_BASE: transport}, controller=controller)
        allocator = GuestAllocator(mem, LOW, size - LOW)
        driver_transport = MmioDriverTransport(bus, MMIO_BASE, mem, allocator)
        pool = PagePool.from_allocator(allocator, mib * MIB)
        driver = BalloonDriver(driver_transport, pool)
        return _cycle(mem, driver, device.set_target_pages, mib * PAGES_PER_MIB)
    finally:
        mem.close()


def run_qemu(mib: int) -> Result:
    size = mib * MIB + SLACK
    with QtestMachine(["virtio-balloon-device"], memory_size=size, qmp=True) as machine:
        (slot,) = [s for s in machine.find_devices() if s.device_id == DeviceId.BALLOON]
        pool = PagePool.from_allocator(machine.allocator, mib * MIB)
        driver = BalloonDriver(machine.transport(slot), pool)

        def set_target(pages: int) -> None:
            # QEMU's "balloon" takes the VM size in bytes, not the balloon's.
            machine.qmp("balloon", value=size - pages * BALLOON_PAGE_SIZE)

        return _cycle(machine.mem, driver, set_target, mib * PAGES_PER_MIB)


CASES: dict[str, Callable[[int], Result]] = {
    "pyvirtio-memfd": lambda mib: run_pyvirtio(mib, memfd=True),
    "pyvirtio-anon": lambda mib: run_pyvirtio(mib, memfd=False),
    "qemu": run_qemu,
}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f} ({min(values):,.0f}..{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="balloon size per cycle")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    pages = args.mib * PAGES_PER_MIB
    results: dict[str, list[Result]] = {case: [] for case in cases}
    for _ in range(args.runs):
        for case in cases:  # interleaved, so load hits every case alike
            results[case].append(CASES[case](args.mib))
    print(f"balloon of {args.mib} MiB ({pages} pages of 4 KiB), median (min..max) of {args.runs}")
    print(f"{'case':<16}{'inflate pages/s':>28}{'deflate pages/s':>28}{'released MiB/s':>28}")
    for case, runs in results.items():
        inflate = [pages / r.inflate_s for r in runs]
        deflate = [pages / r.deflate_s for r in runs]
        released = [r.released / MIB / r.inflate_s for r in runs]
        print(f"{case:<16}{_summary(inflate):>28}{_summary(deflate):>28}{_summary(released):>28}")
    for case, runs in results.items():
        fractions = [r.released / (args.mib * MIB) for r in runs]
        print(f"{case}: released {statistics.median(fractions):.1%} of the inflated memory")


if __name__ == "__main__":
    main()
