"""BalloonDriver against two devices, on one script: pyvirtio's model in-process and
QEMU's own ``virtio-balloon-device`` over qtest.

Each host is driven through its own host API: pyvirtio's through the model's
methods; QEMU's through QMP (``balloon`` takes the target *VM size* in bytes,
``query-balloon`` reports the VM size left, and statistics come from
``qom-get`` of ``guest-stats`` once ``guest-stats-polling-interval`` is set).
Host memory is measured on the memfd both devices release pages of.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Protocol

import pytest

from pyvirtio.constants import DeviceId
from pyvirtio.devices.balloon.device import Balloon
from pyvirtio.devices.balloon.wire import BALLOON_PAGE_SIZE, PAGES_PER_MIB, STAT_NAMES, StatTag
from pyvirtio.driver.balloon import BalloonDriver, BalloonDriverError, PagePool
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.mmio import InProcessBus, MmioDriverTransport
from pyvirtio.driver.qtest import QtestError, QtestMachine, qemu_binary
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MmioTransport

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
MEMORY = 256 * MIB
POOL = 192 * MIB
TIMEOUT = 10.0
MMIO_BASE = 0x1000_0000
#: Where both rigs' allocators start (QtestMachine leaves the first MiB alone).
LOW = 1 * MIB
#: QOM path of the one anonymous -device on QEMU's command line.
QEMU_BALLOON = "/machine/peripheral-anon/device[0]"
#: QEMU's names for the stats tags (hw/virtio/virtio-balloon.c).
QEMU_STAT_NAMES = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
}


class Host(Protocol):
    """The host side of a balloon, whichever device it is."""

    name: str
    mem: GuestMemory
    transport: MmioDriverTransport

    def set_target_pages(self, pages: int) -> None: ...

    def actual_pages(self) -> int: ...

    def stats(self, driver: BalloonDriver) -> dict[int, int]:
        """The guest's latest statistics by tag, after asking the driver for fresh ones."""
        ...


class PyvirtioHost:
    name = "pyvirtio"

    def __init__(self) -> None:
        self.mem = GuestMemory.memfd(MEMORY)
        self.device = Balloon(memory_size=MEMORY, deflate_on_oom=True, free_page_reporting=True)
        controller = RecordingInterruptController()
        transport = MmioTransport(self.device, self.mem, IrqLine(controller, 5))
        bus = InProcessBus({MMIO_BASE: transport}, controller=controller)
        allocator = GuestAllocator(self.mem, LOW, MEMORY - LOW)
        self.transport = MmioDriverTransport(bus, MMIO_BASE, self.mem, allocator)

    def set_target_pages(self, pages: int) -> None:
        self.device.set_target_pages(pages)

    def actual_pages(self) -> int:
        return self.device.actual_pages

    def stats(self, driver: BalloonDriver) -> dict[int, int]:
        assert self.device.request_stats()
        driver.poll(0.1)
        tags = {name: tag for tag, name in STAT_NAMES.items()}
        return {
            tags[key] if isinstance(key, str) else key: value
            for key, value in self.device.stats().items()
            if isinstance(key, int) or key in tags
        }

    def close(self) -> None:
        self.mem.close()


class QemuHost:
    name = "qemu"

    def __init__(self) -> None:
        self.machine = QtestMachine(
            ["virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on"],
            memory_size=MEMORY,
            qmp=True,
            timeout=TIMEOUT,
        )
        self.mem = self.machine.mem
        (slot,) = [s for s in self.machine.find_devices() if s.device_id == DeviceId.BALLOON]
        self.transport = self.machine.transport(slot)
        self._polling = False

    def set_target_pages(self, pages: int) -> None:
        # QEMU's "balloon" is the size the VM should have, not the balloon's.
        self.machine.qmp("balloon", value=MEMORY - pages * BALLOON_PAGE_SIZE)

    def actual_pages(self) -> int:
        vm_size = self.machine.qmp("query-balloon")["actual"]
        return (MEMORY - vm_size) // BALLOON_PAGE_SIZE

    def stats(self, driver: BalloonDriver) -> dict[int, int]:
        if not self._polling:
            self.machine.qmp(
                "qom-set", path=QEMU_BALLOON, property="guest-stats-polling-interval", value=1
            )
            self._polling = True
        answered = driver.stats_answered
        deadline = time.monotonic() + 5
        # QEMU's timer returns the buffer every second; wait for the driver's answer.
        while driver.stats_answered == answered and time.monotonic() < deadline:
            driver.poll(0.1)
        assert driver.stats_answered > answered, "QEMU never asked for statistics"
        got = self.machine.qmp("qom-get", path=QEMU_BALLOON, property="guest-stats")["stats"]
        unset = (1 << 64) - 1  # QEMU's "no figure"
        return {
            tag: got[name] for tag, name in QEMU_STAT_NAMES.items() if got.get(name, unset) != unset
        }

    def close(self) -> None:
        self.machine.close()


@pytest.fixture(params=["pyvirtio", "qemu"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    if request.param == "qemu":
        if qemu_binary() is None:
            pytest.skip("qemu-system-x86_64 is not installed")
        pytest.importorskip("qemu.qmp", reason="the qemu.qmp package is not installed")
        made: PyvirtioHost | QemuHost = QemuHost()
    else:
        made = PyvirtioHost()
    try:
        yield made
    finally:
        made.close()


def make_driver(host: Host, **kwargs: object) -> BalloonDriver:
    pool = PagePool.from_allocator(host.transport.allocator, POOL)
    return BalloonDriver(host.transport, pool, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def allocated(mem: GuestMemory) -> int:
    (region,) = mem.regions
    assert region.fd is not None
    return os.fstat(region.fd).st_blocks * 512


# -- the script ----------------------------------------------------------------------------


def test_follows_the_target(host: Host) -> None:
    driver = make_driver(host)
    assert driver.target_pages == 0 and host.actual_pages() == 0
    host.set_target_pages(1000)
    assert driver.target_pages == 1000
    driver.poll(0.1)
    assert driver.actual_pages == 1000
    assert host.actual_pages() == 1000
    assert driver.pool.free_pages == POOL // BALLOON_PAGE_SIZE - 1000
    host.set_target_pages(300)
    driver.poll(0.1)
    assert driver.actual_pages == host.actual_pages() == 300
    host.set_target_pages(16 * PAGES_PER_MIB)
    driver.poll(0.1)
    assert host.actual_pages() == 16 * PAGES_PER_MIB
    host.set_target_pages(0)
    driver.poll(0.1)
    assert host.actual_pages() == 0
    assert driver.pool.free_pages == POOL // BALLOON_PAGE_SIZE


def test_target_beyond_the_pool_inflates_what_the_pool_has(host: Host) -> None:
    driver = make_driver(host)
    # All but one page of the VM (QEMU refuses a VM size of 0).
    host.set_target_pages(MEMORY // BALLOON_PAGE_SIZE - 1)
    driver.poll(0.1)
    assert driver.actual_pages == host.actual_pages() == POOL // BALLOON_PAGE_SIZE
    assert driver.pool.free_pages == 0


def test_statistics_reach_the_host(host: Host) -> None:
    figures = {StatTag.SWAP_IN: 11, StatTag.MAJFLT: 22, StatTag.CACHES: 1 << 40}
    driver = make_driver(host, stats_source=lambda: figures)
    host.set_target_pages(256)
    driver.poll(0.1)
    stats = host.stats(driver)
    assert stats[StatTag.SWAP_IN] == 11
    assert stats[StatTag.MAJFLT] == 22
    assert stats[StatTag.CACHES] == 1 << 40
    assert stats[StatTag.MEMTOT] == POOL
    assert stats[StatTag.MEMFREE] == POOL - 256 * BALLOON_PAGE_SIZE
    figures[StatTag.SWAP_IN] = 12
    assert host.stats(driver)[StatTag.SWAP_IN] == 12


def test_deflate_on_oom(host: Host) -> None:
    driver = make_driver(host)
    host.set_target_pages(500)
    driver.poll(0.1)
    assert driver.deflate_on_oom(200) == 200
    assert driver.actual_pages == host.actual_pages() == 300
    assert driver.target_pages == 500


def test_no_deflate_on_oom_without_the_feature(host: Host) -> None:
    driver = make_driver(host, features=~(1 << 2))
    host.set_target_pages(10)
    driver.poll(0.1)
    with pytest.raises(BalloonDriverError, match="DEFLATE_ON_OOM"):
        driver.deflate_on_oom(5)
    assert host.actual_pages() == 10


def test_inflated_memory_goes_back_to_the_host(host: Host) -> None:
    """256 MiB memfd guest, 128 MiB inflated: the memfd's blocks fall by >= 90% of that."""
    driver = make_driver(host)
    pool = driver.pool
    host.mem.fill(pool.base, pool.length, 0x5A)
    before = allocated(host.mem)
    host.set_target_pages(128 * PAGES_PER_MIB)
    driver.poll(0.1)
    assert host.actual_pages() == 128 * PAGES_PER_MIB
    released = before - allocated(host.mem)
    assert released >= 0.9 * 128 * MIB, f"{host.name} released {released / MIB:.1f} MiB"
    host.set_target_pages(0)
    driver.poll(0.1)
    assert host.actual_pages() == 0
    # Deflated pages are usable again and read as zeros.
    assert host.mem.read(pool.base, 128 * MIB) == bytes(128 * MIB)
    host.mem.fill(pool.base, 128 * MIB, 0x11)
    assert host.mem.read(pool.base + 64 * MIB, 4) == b"\x11" * 4
    assert host.mem.read(pool.base + 128 * MIB, 4) == b"\x5a" * 4


def test_free_page_reporting_releases_memory(host: Host) -> None:
    driver = make_driver(host)
    pool = driver.pool
    host.mem.fill(pool.base, pool.length, 0x5A)
    host.set_target_pages(PAGES_PER_MIB)
    driver.poll(0.1)
    before = allocated(host.mem)
    reported = driver.report_free_pages()
    assert reported == pool.total_pages - PAGES_PER_MIB
    assert pool.free_pages == reported, "reported pages did not come back to the pool"
    released = before - allocated(host.mem)
    assert released >= 0.9 * reported * BALLOON_PAGE_SIZE, f"{host.name} released {released}"
    assert host.actual_pages() == PAGES_PER_MIB


# -- QEMU's host API --------------------------------------------------------------------------


def test_qemu_balloon_takes_the_vm_size_in_bytes() -> None:
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    pytest.importorskip("qemu.qmp", reason="the qemu.qmp package is not installed")
    host = QemuHost()
    try:
        driver = make_driver(host)
        machine = host.machine
        assert machine.qmp("query-balloon") == {"actual": MEMORY}
        # A VM of 200 MiB: a balloon of 56 MiB.
        machine.qmp("balloon", value=200 * MIB)
        assert driver.target_pages == 56 * PAGES_PER_MIB
        driver.poll(0.1)
        assert driver.actual_pages == 56 * PAGES_PER_MIB
        assert machine.qmp("query-balloon") == {"actual": 200 * MIB}
        # Sizes are truncated to whole 4 KiB pages of balloon.
        machine.qmp("balloon", value=200 * MIB + 100)
        assert driver.target_pages == 56 * PAGES_PER_MIB - 1
        # A VM larger than its RAM means an empty balloon.
        machine.qmp("balloon", value=2 * MEMORY)
        assert driver.target_pages == 0
        with pytest.raises(QtestError, match="size"):
            machine.qmp("balloon", value=0)
    finally:
        host.close()
