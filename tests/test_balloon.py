"""The virtio-balloon device model: conformance, host API, snapshots and a hostile driver.

Hostile requests are put on the rings by hand through the driver queues of an
:class:`~pyvirtio.testing.MmioTestRig`; the driver-level script shared with
QEMU's device lives in test_balloon_driver.py.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.constants import Feature
from pyvirtio.device import DeviceState
from pyvirtio.devices.balloon.device import Balloon, BalloonError
from pyvirtio.devices.balloon.request import BalloonLimits
from pyvirtio.devices.balloon.wire import (
    BALLOON_PAGE_SIZE,
    CMD_ID_DONE,
    CMD_ID_STOP,
    PAGES_PER_MIB,
    STAT_ENTRY,
    BalloonConfig,
    BalloonFeature,
    BalloonQueue,
    ConfigField,
    StatTag,
    coalesce_pfns,
    encode_pfns,
    encode_stats,
    queue_layout,
)
from pyvirtio.driver.balloon import BalloonDriver, BalloonDriverError, PagePool
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MMIO_BASE, RIG_MEMORY_SIZE, MmioTestRig, device_conformance
from pyvirtio.transport.mmio import MmioTransport
from pyvirtio.virtqueue.common import DriverQueue

MIB = 1 << 20
RIG_PAGES = RIG_MEMORY_SIZE // BALLOON_PAGE_SIZE
#: Pages of the rig's memory the tests inflate (above the allocator's rings).
FIRST_PFN = (2 * MIB) // BALLOON_PAGE_SIZE


def full_balloon(**kwargs: Any) -> Balloon:
    return Balloon(
        memory_size=RIG_MEMORY_SIZE,
        deflate_on_oom=True,
        free_page_reporting=True,
        free_page_hinting=True,
        page_poison=True,
        **kwargs,
    )


def _modify(device: Any) -> None:
    device.counters["stats_updates"] += 3


TestBalloonConformance = device_conformance(full_balloon, modify=_modify)
TestBalloonWithoutStatsConformance = device_conformance(
    lambda: Balloon(memory_size=RIG_MEMORY_SIZE, stats=False)
)


# -- wire format ------------------------------------------------------------------------


def test_queue_layout_is_consecutive_over_negotiated_queues() -> None:
    assert queue_layout(0) == {BalloonQueue.INFLATE: 0, BalloonQueue.DEFLATE: 1}
    assert queue_layout(BalloonFeature.PAGE_REPORTING.mask) == {
        BalloonQueue.INFLATE: 0,
        BalloonQueue.DEFLATE: 1,
        BalloonQueue.REPORTING: 2,
    }
    everything = (
        BalloonFeature.STATS_VQ.mask
        | BalloonFeature.FREE_PAGE_HINT.mask
        | BalloonFeature.PAGE_REPORTING.mask
    )
    assert list(queue_layout(everything).values()) == [0, 1, 2, 3, 4]


def test_wire_encodings() -> None:
    assert STAT_ENTRY.size == 10
    assert encode_stats([(StatTag.MEMFREE, 0x0102)]) == b"\x04\x00\x02\x01" + bytes(6)
    assert encode_pfns([1, 0x01020304]) == b"\x01\x00\x00\x00\x04\x03\x02\x01"
    assert BalloonConfig(5, 6, 7, 8).pack() == bytes(
        [5, 0, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0]
    )
    assert BalloonConfig.unpack(BalloonConfig(1, 2).pack()) == (1, 2, 0, 0)
    assert coalesce_pfns([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
    assert coalesce_pfns([]) == []


# -- host API ---------------------------------------------------------------------------


def test_target_refused_above_guest_memory() -> None:
    device = Balloon(memory_size=64 * MIB)
    device.set_target_mib(64)
    assert device.target_pages == 64 * PAGES_PER_MIB
    for bad in (64 * PAGES_PER_MIB + 1, -1, 1 << 32):
        with pytest.raises(BalloonError):
            device.set_target_pages(bad)
    with pytest.raises(BalloonError):
        device.set_target_mib(65)
    assert device.target_pages == 64 * PAGES_PER_MIB
    with pytest.raises(BalloonError, match="unknown"):
        Balloon(memory_size=None).set_target_pages(1)
    with pytest.raises(BalloonError):
        Balloon(10, memory_size=4096)


def test_target_change_raises_config_interrupt_and_reads_back() -> None:
    rig = MmioTestRig(full_balloon())
    rig.start()
    rig.driver.wait_interrupt(0)  # clear what start-up raised
    rig.device.set_target_pages(100)  # type: ignore[attr-defined]
    assert rig.driver.interrupt_status() & 2, "no configuration change interrupt"
    assert rig.driver.read_config(ConfigField.NUM_PAGES, 4) == 100
    # Setting the same target again is no change.
    rig.driver.ack_interrupt(3)
    rig.device.set_target_pages(100)  # type: ignore[attr-defined]
    assert rig.driver.interrupt_status() == 0


def test_driver_writes_actual_but_not_num_pages() -> None:
    rig = MmioTestRig(full_balloon())
    rig.start()
    device: Balloon = rig.device  # type: ignore[assignment]
    device.set_target_pages(50)
    rig.driver.write_config(ConfigField.ACTUAL, 4, 7)
    rig.driver.write_config(ConfigField.NUM_PAGES, 4, 9999)
    rig.driver.write_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4, 5)
    rig.driver.write_config(ConfigField.POISON_VAL, 4, 0xAA)
    assert device.actual_pages == 7
    assert device.target_pages == 50
    # Read-only: still DONE, nothing hinted yet.
    assert rig.driver.read_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4) == CMD_ID_DONE
    assert rig.driver.read_config(ConfigField.POISON_VAL, 4) == 0xAA
    stats = device.stats()
    assert stats["actual_pages"] == 7 and stats["target_pages"] == 50
    # A reset driver starts over with an empty balloon; the target stays.
    rig.driver.reset()
    assert device.actual_pages == 0 and device.target_pages == 50


def test_ignored_config_writes_are_logged_at_a_limited_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = full_balloon()
    with caplog.at_level(logging.INFO, logger="pyvirtio.devices.balloon.device"):
        for _ in range(50):
            device.write_config(ConfigField.NUM_PAGES, b"\x01\x00\x00\x00")
            device.write_config(ConfigField.FREE_PAGE_HINT_CMD_ID, b"\x05\x00\x00\x00")
            device.write_config(14, b"\x01\x02\x03\x04")
    assert device.target_pages == 0 and device.free_page_hint_cmd_id == CMD_ID_DONE
    # One line for each kind of write (num_pages, cmd_id, outside), not one per write.
    assert len(caplog.records) == 3, [r.getMessage() for r in caplog.records]


# -- a rig with raw queues -----------------------------------------------------------------


class RawBalloon:
    """Our device behind MMIO, with the driver's queues used by hand."""

    def __init__(
        self,
        device: Balloon | None = None,
        features: int | None = None,
        mem: GuestMemory | None = None,
    ) -> None:
        self.device = device if device is not None else full_balloon()
        self.rig = MmioTestRig(self.device, mem)
        self.queues = self.rig.start(features)
        self.layout = queue_layout(self.rig.device.acked_features)
        self.mem = self.rig.mem

    def queue(self, role: BalloonQueue) -> DriverQueue:
        return self.queues[self.layout[role]]

    def send(
        self,
        role: BalloonQueue,
        readable: list[bytes] = (),  # type: ignore[assignment]
        writable: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> list[tuple[object, int]]:
        """Put one request on ``role``'s queue, notify, and return what came back used."""
        ranges = []
        for data in readable:
            addr = self.rig.allocator.alloc(max(len(data), 1))
            self.mem.write(addr, data)
            ranges.append((addr, len(data)))
        queue = self.queue(role)
        queue.add(ranges, list(writable), token=len(ranges))
        self.rig.driver.notify(self.layout[role])
        used = list(queue.used())
        for addr, _ in ranges:
            self.rig.allocator.free(addr)
        return used


def test_inflate_validates_every_pfn() -> None:
    raw = RawBalloon()
    device = raw.device
    pfns = [FIRST_PFN, FIRST_PFN + 1, RIG_PAGES, RIG_PAGES + 5, 0xFFFF_FFFF, FIRST_PFN + 1]
    used = raw.send(BalloonQueue.INFLATE, [encode_pfns(pfns)])
    assert used == [(1, 0)], "inflate request not used with 0 bytes written"
    assert device.inflated_pages == 2
    assert device.counters["pfns_out_of_range"] == 3
    assert device.counters["pages_inflated"] == 2
    assert device.counters["bytes_released"] == 2 * BALLOON_PAGE_SIZE
    assert not device.needs_reset


@pytest.mark.parametrize(
    ("what", "readable", "writable"),
    [
        ("too many PFNs in a descriptor", [encode_pfns(range(FIRST_PFN, FIRST_PFN + 257))], []),
        ("not a PFN array", [b"\x01\x02\x03"], []),
        (
            "too many PFNs in a request",
            [encode_pfns(range(FIRST_PFN + i * 256, FIRST_PFN + (i + 1) * 256)) for i in range(5)],
            [],
        ),
        ("device-writable part", [encode_pfns([FIRST_PFN])], [(3 * MIB, 4096)]),
    ],
)
def test_malformed_page_requests_are_refused_whole(
    what: str, readable: list[bytes], writable: list[tuple[int, int]]
) -> None:
    raw = RawBalloon()
    raw.mem.fill(FIRST_PFN * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE, 0x77)
    used = raw.send(BalloonQueue.INFLATE, readable, writable)
    assert len(used) == 1 and used[0][1] == 0, what
    assert raw.device.inflated_pages == 0, what
    assert raw.device.counters["malformed_requests"] == 1, what
    # Nothing was released: the page keeps its bytes.
    assert raw.mem.read(FIRST_PFN * BALLOON_PAGE_SIZE, 4) == b"\x77" * 4
    # And the device still works.
    raw.send(BalloonQueue.INFLATE, [encode_pfns([FIRST_PFN])])
    assert raw.device.inflated_pages == 1
    assert not raw.device.needs_reset


def test_deflate_of_pages_never_inflated_is_counted() -> None:
    raw = RawBalloon()
    raw.send(BalloonQueue.INFLATE, [encode_pfns(range(FIRST_PFN, FIRST_PFN + 10))])
    raw.send(BalloonQueue.DEFLATE, [encode_pfns([FIRST_PFN, FIRST_PFN + 20, RIG_PAGES + 1])])
    device = raw.device
    assert device.inflated_pages == 9
    assert device.counters["pages_deflated"] == 1
    assert device.counters["deflate_of_unknown_pages"] == 1
    assert device.counters["pfns_out_of_range"] == 1


def stats_raw() -> RawBalloon:
    raw = RawBalloon()
    # The conformance rig's driver set up the queues but posted nothing.
    return raw


def test_stats_are_bounded_and_unknown_tags_kept_by_number() -> None:
    raw = stats_raw()
    device = raw.device
    entries = [(StatTag.SWAP_IN, 1), (StatTag.MAJFLT, 2), (1000, 3), (StatTag.SWAP_IN, 4)]
    entries += [(StatTag.MEMFREE, 5)] * 400
    raw.send(BalloonQueue.STATS, [encode_stats(entries) + b"\x01\x02"])
    stats = device.stats()
    assert stats["swap_in"] == 4, "a later entry of a tag wins"
    assert stats["major_faults"] == 2
    assert stats[1000] == 3
    assert stats["free_memory"] == 5
    assert device.counters["stats_entries_dropped"] == len(entries) - 256 + 1
    # Unknown tags cannot grow the table without bound.
    many = [(5000 + i, i) for i in range(200)]
    raw.device.request_stats()
    raw.send(BalloonQueue.STATS, [encode_stats(many)])
    unknown = [key for key in device.stats() if isinstance(key, int)]
    assert len(unknown) == BalloonLimits().unknown_stat_tags


def test_second_stats_buffer_is_returned() -> None:
    raw = stats_raw()
    device = raw.device
    assert raw.send(BalloonQueue.STATS, [encode_stats([(StatTag.MEMTOT, 1)])]) == []
    used = raw.send(BalloonQueue.STATS, [encode_stats([(StatTag.MEMTOT, 2)])])
    assert len(used) == 1, "the first buffer was not handed back"
    assert device.counters["stats_extra_buffers"] == 1
    assert device.stats()["total_memory"] == 2
    assert device.request_stats()
    assert not device.request_stats(), "returned a buffer the device no longer holds"


def test_stats_request_while_asleep_keeps_the_held_buffer() -> None:
    raw = RawBalloon(full_balloon(stats_interval=1.0))
    device = raw.device
    assert raw.send(BalloonQueue.STATS, [encode_stats([(StatTag.SWAP_IN, 1)])]) == []
    assert device.poll_stats(0.0) == 1.0
    # The host's timer fires while the device is asleep (for a snapshot).
    raw.rig.transport.sleep()
    assert device.poll_stats(5.0) == 6.0
    assert not device.request_stats()
    raw.rig.transport.wake()
    # The buffer was held all along: the driver gets it back now.
    assert device.request_stats()
    assert list(raw.queue(BalloonQueue.STATS).used()) == [(1, 0)]


def test_free_page_report_releases_valid_ranges_only() -> None:
    raw = RawBalloon()
    base = FIRST_PFN * BALLOON_PAGE_SIZE
    raw.mem.fill(base, 64 * BALLOON_PAGE_SIZE, 0x33)
    used = raw.send(
        BalloonQueue.REPORTING,
        writable=[
            (base, 16 * BALLOON_PAGE_SIZE),
            (base + 32 * BALLOON_PAGE_SIZE + 8, 4096),  # unaligned
            (base + 40 * BALLOON_PAGE_SIZE, 100),  # not whole pages
        ],
    )
    assert used == [(0, 0)]
    assert raw.mem.read(base, 16 * BALLOON_PAGE_SIZE) == bytes(16 * BALLOON_PAGE_SIZE)
    assert raw.mem.read(base + 32 * BALLOON_PAGE_SIZE, 4) == b"\x33" * 4
    assert raw.device.counters["report_ranges_rejected"] == 2
    assert raw.device.counters["bytes_released"] == 16 * BALLOON_PAGE_SIZE


def test_poisoned_pages_are_not_released_on_report() -> None:
    """With PAGE_POISON and a non-zero poison_val, a report must not zero the pages."""
    raw = RawBalloon()
    raw.rig.driver.write_config(ConfigField.POISON_VAL, 4, 0xAA)
    base = FIRST_PFN * BALLOON_PAGE_SIZE
    raw.mem.fill(base, BALLOON_PAGE_SIZE, 0xAA)
    raw.send(BalloonQueue.REPORTING, writable=[(base, BALLOON_PAGE_SIZE)])
    assert raw.mem.read(base, 4) == b"\xaa" * 4
    assert raw.device.counters["bytes_released"] == 0


def test_hostile_requests_leave_fds_and_memory_at_baseline() -> None:
    raw = RawBalloon()
    bad = [
        (BalloonQueue.INFLATE, [encode_pfns(range(0, 300))]),
        (BalloonQueue.INFLATE, [encode_pfns([0xFFFF_FFF0 + i for i in range(16)])]),
        (BalloonQueue.DEFLATE, [b"\xff" * 7]),
        (BalloonQueue.STATS, [encode_stats([(60000 + i % 50, i) for i in range(300)])]),
    ]

    def round_of_abuse() -> None:
        for role, readable in bad:
            raw.send(role, readable)

    round_of_abuse()
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(200):
            round_of_abuse()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert after - before < 64 * 1024, f"memory grew by {after - before} bytes"
    assert raw.device.counters["malformed_requests"] >= 400
    assert raw.device.inflated_pages == 0
    assert not raw.device.needs_reset
    assert raw.device.state is DeviceState.ACTIVE


# -- snapshots -----------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_snapshot_keeps_target_actual_inflated_pages_and_stats(packed: bool) -> None:
    mem = GuestMemory.anonymous(RIG_MEMORY_SIZE)
    rig = MmioTestRig(full_balloon(), mem)
    features = None if packed else rig.device.offered_features & ~Feature.RING_PACKED.mask
    driver = BalloonDriver(
        rig.driver,
        PagePool(2 * MIB, MIB),
        stats_source=lambda: {StatTag.SWAP_OUT: 9, 77: 1},
        features=features,
    )
    device: Balloon = rig.device  # type: ignore[assignment]
    device.set_target_pages(100)
    driver.poll(0.1)
    assert device.actual_pages == device.inflated_pages == 100
    rig.transport.sleep()
    snap = rig.transport.snapshot()

    # The device moves (as in a migration): a fresh one restored from the
    # snapshot takes the old one's MMIO window; the guest's driver goes on.
    restored = full_balloon()
    transport = MmioTransport(restored, mem, rig.irq)
    transport.sleep()
    transport.restore(snap)
    transport.wake()
    rig.bus.add(MMIO_BASE, transport)
    assert restored.target_pages == 100
    assert restored.actual_pages == 100
    assert restored.inflated_pages == 100
    assert restored.stats()["swap_out"] == 9 and restored.stats()[77] == 1
    # The held stats buffer survived: the restored device can ask for stats.
    assert restored.request_stats()
    driver.stats_source = lambda: {StatTag.SWAP_OUT: 10}
    driver.poll(0.1)
    assert restored.stats()["swap_out"] == 10
    # And the accounting goes on: deflating what was inflated before.
    restored.set_target_pages(40)
    driver.poll(0.1)
    assert restored.inflated_pages == restored.actual_pages == 40
    assert restored.counters["deflate_of_unknown_pages"] == 0


def test_restore_refuses_malformed_model() -> None:
    device = full_balloon()
    device.sleep()
    good = json.loads(device.snapshot())
    for key, bad in (("num_pages", -1), ("inflated", [[1]]), ("counters", {}), ("actual", 1 << 32)):
        doc = json.loads(json.dumps(good))
        doc["model"][key] = bad
        with pytest.raises(ValueError):
            device.restore(json.dumps(doc).encode())
    assert device.target_pages == 0 and device.counters["stats_updates"] == 0


def test_restore_refuses_a_stats_interval_the_device_cannot_poll() -> None:
    polled = full_balloon(stats_interval=5)
    polled.sleep()
    snap = json.loads(polled.snapshot())
    no_stats = Balloon(memory_size=RIG_MEMORY_SIZE, stats=False)
    no_stats.sleep()
    with pytest.raises(BalloonError, match="STATS_VQ"):
        no_stats.restore(polled.snapshot())
    snap["model"]["stats_interval"] = -1
    with pytest.raises(BalloonError, match="negative"):
        polled.restore(json.dumps(snap).encode())
    assert no_stats.stats_interval == 0 and polled.stats_interval == 5


def test_inflated_anonymous_memory_leaves_the_resident_set() -> None:
    """Anonymous guest RAM (MADV_DONTNEED): the process's RSS falls by the inflated amount."""
    size = 256 * MIB
    with GuestMemory.anonymous(size) as mem:
        rig = MmioTestRig(Balloon(memory_size=size), mem)
        pool = PagePool(2 * MIB, 192 * MIB)
        driver = BalloonDriver(rig.driver, pool)
        mem.fill(pool.base, pool.length, 0x5A)
        before = rss_bytes()
        rig.device.set_target_mib(128)  # type: ignore[attr-defined]
        driver.poll(0.1)
        assert driver.actual_pages == 128 * PAGES_PER_MIB
        dropped = before - rss_bytes()
        assert dropped >= 0.9 * 128 * MIB, f"RSS fell by only {dropped / MIB:.1f} MiB"
        rig.device.set_target_mib(0)  # type: ignore[attr-defined]
        driver.poll(0.1)
        assert mem.read(pool.base, 128 * MIB) == bytes(128 * MIB)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- free page hinting ------------------------------------------------------------------------


def test_free_page_hinting_round() -> None:
    mem = GuestMemory.memfd(RIG_MEMORY_SIZE)
    rig = MmioTestRig(full_balloon(), mem)
    device: Balloon = rig.device  # type: ignore[assignment]
    pool = PagePool(2 * MIB, MIB)
    driver = BalloonDriver(rig.driver, pool)
    assert driver.hint_free_pages() == 0, "hinted without a round open"
    mem.fill(pool.base, pool.length, 0x42)
    rig.driver.wait_interrupt(0)
    cmd_id = device.start_hinting()
    assert cmd_id >= 2
    assert rig.driver.interrupt_status() & 2, "no configuration change interrupt"
    assert rig.driver.read_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4) == cmd_id
    assert driver.hint_free_pages() == pool.total_pages
    assert device.hinted_runs() == [(pool.base // BALLOON_PAGE_SIZE, pool.total_pages)]
    assert device.counters["hinted_pages"] == pool.total_pages
    assert pool.free_pages == pool.total_pages, "hinted pages did not come back to the pool"
    # Hints never release memory: the guest may have reused the pages already.
    assert mem.read(pool.base, 4) == b"\x42" * 4
    assert driver.hint_free_pages() == 0, "answered the same round twice"
    device.stop_hinting(done=True)
    assert rig.driver.read_config(ConfigField.FREE_PAGE_HINT_CMD_ID, 4) == CMD_ID_DONE
    # A new round takes a new ID and forgets the old hints.
    assert device.start_hinting() == cmd_id + 1
    assert device.hinted_runs() == []
    device.stop_hinting()
    assert device.free_page_hint_cmd_id == CMD_ID_STOP


def test_hints_under_a_stale_or_malformed_id_are_ignored() -> None:
    raw = RawBalloon()
    device = raw.device
    base = FIRST_PFN * BALLOON_PAGE_SIZE
    cmd_id = device.start_hinting()
    raw.send(BalloonQueue.FREE_PAGE, [(cmd_id + 7).to_bytes(4, "little")])
    raw.send(BalloonQueue.FREE_PAGE, writable=[(base, 4 * BALLOON_PAGE_SIZE)])
    assert device.hinted_runs() == []
    raw.send(BalloonQueue.FREE_PAGE, [b"\x02\x00\x00"])  # not a 4-byte ID
    assert device.counters["hints_ignored"] == 2
    raw.send(BalloonQueue.FREE_PAGE, [cmd_id.to_bytes(4, "little")])
    raw.send(
        BalloonQueue.FREE_PAGE,
        writable=[(base, 4 * BALLOON_PAGE_SIZE), (base + 16 * BALLOON_PAGE_SIZE + 8, 64)],
    )
    assert device.hinted_runs() == [(FIRST_PFN, 4)]
    assert device.counters["hints_ignored"] == 3
    # After the driver's STOP, pages are ignored again.
    raw.send(BalloonQueue.FREE_PAGE, [CMD_ID_STOP.to_bytes(4, "little")])
    raw.send(BalloonQueue.FREE_PAGE, writable=[(base + 8 * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE)])
    assert device.hinted_runs() == [(FIRST_PFN, 4)]


def test_a_hint_buffer_names_a_bounded_number_of_pages() -> None:
    raw = RawBalloon(full_balloon(limits=BalloonLimits(pages_per_hint=6)))
    device = raw.device
    base = FIRST_PFN * BALLOON_PAGE_SIZE
    cmd_id = device.start_hinting()
    raw.send(BalloonQueue.FREE_PAGE, [cmd_id.to_bytes(4, "little")])
    # The same range named again and again: only as many pages as the bound.
    four = (base, 4 * BALLOON_PAGE_SIZE)
    two = (base + 8 * BALLOON_PAGE_SIZE, 2 * BALLOON_PAGE_SIZE)
    used = raw.send(BalloonQueue.FREE_PAGE, writable=[four, four, two, four])
    assert [n for _, n in used] == [0]
    assert device.hinted_runs() == [(FIRST_PFN, 4), (FIRST_PFN + 8, 2)]
    assert device.counters["hinted_pages"] == 6
    assert device.counters["hints_ignored"] == 2
    assert not device.needs_reset


def test_hint_buffers_naming_all_of_ram_again_and_again_are_bounded() -> None:
    # 1 GiB of guest RAM (mapped, never touched): a buffer of ranges each
    # covering half of it made the device record hundreds of millions of pages.
    raw = RawBalloon(mem=GuestMemory.anonymous(1 << 30))
    device = raw.device
    cmd_id = device.start_hinting()
    raw.send(BalloonQueue.FREE_PAGE, [cmd_id.to_bytes(4, "little")])
    bound = 1 << 17  # pages: 512 MiB, the largest block a Linux driver hints
    raw.send(BalloonQueue.FREE_PAGE, writable=[(0, bound * BALLOON_PAGE_SIZE)] * 16)
    assert device.counters["hints_ignored"] == 15
    assert device.counters["hinted_pages"] == bound
    assert device.hinted_runs() == [(0, bound)]
    assert device.limits.pages_per_hint == bound


def test_hinting_needs_the_feature() -> None:
    with pytest.raises(BalloonError, match="hinting"):
        Balloon(memory_size=RIG_MEMORY_SIZE).start_hinting()


def test_stats_polling_interval_is_the_hosts_timer() -> None:
    rig = MmioTestRig(full_balloon(stats_interval=2.0))
    device: Balloon = rig.device  # type: ignore[assignment]
    returned: list[int] = []
    driver = BalloonDriver(
        rig.driver, PagePool(2 * MIB, MIB), stats_source=lambda: {StatTag.SWAP_IN: len(returned)}
    )
    assert device.stats_interval == 2.0
    assert device.poll_stats(100.0) == 102.0, "the first call only starts the clock"
    assert driver.poll() == 0 and driver.stats_answered == 0
    assert device.poll_stats(101.0) == 102.0
    driver.poll()
    assert driver.stats_answered == 0
    returned.append(1)
    assert device.poll_stats(102.5) == 104.5
    driver.poll()
    assert driver.stats_answered == 1
    assert device.stats()["swap_in"] == 1
    device.set_stats_interval(0)
    assert device.poll_stats(200.0) is None
    with pytest.raises(BalloonError):
        device.set_stats_interval(-1)
    with pytest.raises(BalloonError, match="STATS_VQ"):
        Balloon(memory_size=RIG_MEMORY_SIZE, stats=False, stats_interval=1)
    # The interval is part of the device's state.
    device.set_stats_interval(5)
    device.sleep()
    fresh = full_balloon()
    fresh.sleep()
    fresh.restore(device.snapshot())
    assert fresh.stats_interval == 5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(BalloonQueue)),
            st.lists(st.binary(max_size=1200), max_size=3),
            st.lists(
                st.tuples(
                    st.integers(0, RIG_MEMORY_SIZE - 1), st.integers(1, 3 * BALLOON_PAGE_SIZE)
                ),
                max_size=3,
            ),
        ),
        max_size=12,
    )
)
def test_arbitrary_requests_never_break_the_device(
    requests: list[tuple[BalloonQueue, list[bytes], list[tuple[int, int]]]],
) -> None:
    """Whatever a driver puts in (in-memory) buffers, on any queue, is bounded and answered."""
    raw = RawBalloon()
    device = raw.device
    device.start_hinting()
    for role, readable, ranges in requests:
        writable = [(a, min(n, RIG_MEMORY_SIZE - a)) for a, n in ranges]
        parts = [r for r in readable if r]
        if not parts and not writable:
            continue  # a buffer needs at least one descriptor
        used = raw.send(role, parts, writable)
        assert not device.needs_reset
        # Every buffer comes back, but a stats buffer is held (returning
        # the one held before, if any).
        if role is BalloonQueue.STATS:
            assert len(used) <= 1
        else:
            assert len(used) == 1
    assert device.state is DeviceState.ACTIVE
    assert all(pfn < RIG_PAGES for pfn in device._inflated)
    stats = device.stats()
    assert len(stats) <= 4 + len(StatTag) + BalloonLimits().unknown_stat_tags


def test_driver_waits_are_bounded() -> None:
    """A device that stops answering (here: asleep) makes the driver fail in its timeout."""
    rig = MmioTestRig(full_balloon())
    pool = PagePool(2 * MIB, MIB)
    driver = BalloonDriver(rig.driver, pool, timeout=0.2)
    device: Balloon = rig.device  # type: ignore[assignment]
    device.set_target_pages(10)
    resources = device.sleep()
    start = time.monotonic()
    with pytest.raises(BalloonDriverError, match="not used within"):
        driver.update()
    assert time.monotonic() - start < 2
    # The pages stay out of the pool: the device may still hold them.
    assert pool.free_pages == pool.total_pages - 10
    device.wake(resources)


def test_driver_close_frees_a_buffer_the_device_never_used() -> None:
    """A hint the device did not take in time stays allocated, until close gives it back."""
    rig = MmioTestRig(full_balloon())
    free_before = rig.allocator.free_bytes
    driver = BalloonDriver(rig.driver, PagePool(2 * MIB, MIB), timeout=0.2)
    device: Balloon = rig.device  # type: ignore[assignment]
    device.start_hinting()
    resources = device.sleep()
    with pytest.raises(BalloonDriverError, match="not used within"):
        driver.hint_free_pages()
    device.wake(resources)
    driver.close()
    assert rig.allocator.free_bytes == free_before


def test_driver_reports_a_device_that_needs_reset() -> None:
    rig = MmioTestRig(full_balloon())
    driver = BalloonDriver(rig.driver, PagePool(2 * MIB, MIB), timeout=1.0)
    rig.device.report_broken("test")
    rig.device.set_target_pages(10)  # type: ignore[attr-defined]
    with pytest.raises(BalloonDriverError, match="needs reset"):
        driver.poll()
