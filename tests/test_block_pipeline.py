"""virtio-blk pipelined serving: one ring served by the ring thread and
IoWorkers helpers at once."""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from helpers.block import (
    DISK_SIZE,
    SECTOR,
    Rig,
    header,
    pattern,
)
from helpers.queues import RING_BASE
from pyvirtio.devices.block import (
    Block,
    RequestType,
    Status,
)
from pyvirtio.workers import IoWorkers

# -- pipelined transfers (io_workers) --------------------------------------------------------


@pytest.fixture
def workers() -> Iterator[IoWorkers]:
    pool = IoWorkers(2, name="test-blk-io")
    yield pool
    pool.close()


def pipelined_rig(image: Path, workers: IoWorkers, **options: Any) -> Rig:
    options.setdefault("io_parallel_min", 2 * SECTOR)
    return Rig(Block(image, io_workers=workers, **options), size=64)


def post_large_read(rig: Rig, i: int) -> list[tuple[int, int]]:
    """Post (without notifying) the i-th 8-sector read, of sectors 8i..8i+7."""
    return rig.request([header(RequestType.IN, 8 * i)], [8 * SECTOR, 1], notify=False)[0]


def large_read_answer(i: int) -> bytes:
    """What the i-th 8-sector read of the untouched image writes: data, then OK."""
    return pattern(DISK_SIZE)[8 * i * SECTOR : 8 * (i + 1) * SECTOR] + b"\0"


@pytest.mark.parametrize("event_idx", [False, True])
def test_pipelined_requests_answer_as_inline(
    image: Path, workers: IoWorkers, event_idx: bool
) -> None:
    """Mixed large and small reads and writes, a FLUSH and a GET_ID in one notification."""
    rig = Rig(
        Block(image, io_workers=workers, io_parallel_min=4 * SECTOR, serial="pipe"),
        size=64,
        event_idx=event_idx,
    )
    expected = bytearray(pattern(DISK_SIZE))
    reads = []
    for i in range(6):
        sectors = 8 if i % 2 else 1  # large (to a worker) and small (inline)
        sector = 64 * i
        data = pattern(sectors * SECTOR, seed=40 + i)
        rig.request([header(RequestType.OUT, sector), data], [1], notify=False)
        expected[sector * SECTOR : sector * SECTOR + len(data)] = data
        wr, _ = rig.request(
            [header(RequestType.IN, 1000 + 16 * i)], [sectors * SECTOR, 1], notify=False
        )
        reads.append((wr, 1000 + 16 * i, sectors))
    id_wr, _ = rig.request([header(RequestType.GET_ID)], [20, 1], notify=False)
    rig.request([header(RequestType.FLUSH)], [1], notify=False)
    rig.device.queue_notify(0)
    used = rig.rig.used(0)
    assert len(used) == 6 * 2 + 2
    assert 1 <= workers.submitted <= workers.threads  # helpers called in, once each
    for wr, sector, sectors in reads:
        data = rig.rig.mem.readv(wr)
        assert data[-1] == Status.OK
        assert data[:-1] == pattern(DISK_SIZE)[sector * SECTOR : (sector + sectors) * SECTOR]
    assert rig.rig.mem.readv(id_wr) == b"pipe".ljust(20, b"\0") + bytes([Status.OK])
    assert image.read_bytes() == bytes(expected)
    assert rig.device.requests == 14


def test_lone_large_request_is_served_inline(image: Path, workers: IoWorkers) -> None:
    rig = pipelined_rig(image, workers)
    assert rig.read(8, 8 * SECTOR) == pattern(DISK_SIZE)[8 * SECTOR : 16 * SECTOR]
    assert rig.write(0, pattern(8 * SECTOR, seed=9)) == Status.OK
    assert workers.submitted == 0  # nothing else waiting: no helper called in
    assert image.read_bytes()[: 8 * SECTOR] == pattern(8 * SECTOR, seed=9)


def test_helpers_copy_in_parallel(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large reads are copied by more than one thread at once."""
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv
    together = threading.Barrier(2, timeout=10)  # the first two copies must overlap
    threads: set[int] = set()

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        threads.add(threading.get_ident())
        if offset < 16 * SECTOR:
            together.wait()
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    reads = [post_large_read(rig, i) for i in range(6)]
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 6
    for i, wr in enumerate(reads):
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert len(threads) >= 2
    assert threading.get_ident() in threads  # the ring's thread is a consumer too
    assert rig.device.io_errors == 0


def used_idx(rig: Rig) -> int:
    """The split used ring's idx, read as the driver sees it (nothing consumed)."""
    state = rig.rig.driver_queues[0].state()
    return int.from_bytes(rig.rig.mem.read(state["device_addr"] + 2, 2), "little")


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


class LateReads(NamedTuple):
    """How copy_late_reads went."""

    copied_by: dict[int, int]  # read -> the thread that copied it
    ring_thread: int  # the thread that ran queue_notify
    helper_calls: int


def copy_late_reads(
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    on_first_copies: Callable[[int, Rig, Callable[[], None]], None],
) -> LateReads:
    """Serve reads 0 and 1 on a ring thread with one helper; reads 2 and 3
    come during their copies and must be copied at once.

    ``on_first_copies(i, rig, post_later)`` runs as read ``i`` (0 or 1)
    starts its copy; ``post_later()`` posts reads 2 and 3.  Every read is
    checked to be answered correctly.
    """
    with IoWorkers(1, name="test-blk-io") as workers:
        rig = pipelined_rig(image, workers)
        real_preadv = os.preadv
        together = threading.Barrier(2, timeout=10)  # reads 2 and 3 must overlap
        copied_by: dict[int, int] = {}
        later: list[list[tuple[int, int]]] = []

        def post_later() -> None:
            later.extend(post_large_read(rig, k) for k in (2, 3))

        def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            i = offset // (8 * SECTOR)
            copied_by[i] = threading.get_ident()
            if i < 2:
                on_first_copies(i, rig, post_later)
            else:
                together.wait()
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        first = [post_large_read(rig, i) for i in range(2)]
        # queue_notify on a thread of its own, as a host's serving thread runs it.
        serving = threading.Thread(target=rig.device.queue_notify, args=(0,))
        serving.start()
        serving.join(30)
        assert not serving.is_alive()
        assert len(rig.rig.used(0)) == 4
        for i, wr in enumerate(first + later):
            assert rig.rig.mem.readv(wr) == large_read_answer(i)
        assert rig.device.io_errors == 0
        assert serving.ident is not None
        return LateReads(copied_by, serving.ident, workers.submitted)


def test_idle_ring_thread_is_called_back_when_requests_come_during_a_copy(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring's thread found the ring empty and waits for its helper; the
    driver posts two more large reads while the helper copies: the helper
    calls the ring's thread back, and the two are copied at once."""
    second_started = threading.Event()

    def on_first_copies(i: int, rig: Rig, post_later: Callable[[], None]) -> None:
        if i == 0:  # the ring's thread: let the helper take read 1 first
            assert second_started.wait(10)
        else:  # the helper: once read 0 is answered, the ring is empty
            second_started.set()
            wait_until(lambda: used_idx(rig) == 1, "read 0 is answered")
            post_later()

    run = copy_late_reads(image, monkeypatch, on_first_copies)
    assert run.copied_by[0] == run.ring_thread
    assert run.copied_by[1] != run.ring_thread
    assert {run.copied_by[2], run.copied_by[3]} == {run.copied_by[0], run.copied_by[1]}
    assert run.helper_calls == 1


def test_helper_that_found_the_ring_empty_can_be_called_in_again(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper found the ring empty and stopped while the ring's thread
    still copies; requests that come meanwhile get a helper again at once,
    not when the ring next runs dry."""

    def on_first_copies(i: int, rig: Rig, post_later: Callable[[], None]) -> None:
        if i == 0:  # the ring's thread: the helper answers read 1 and stops
            wait_until(lambda: used_idx(rig) == 1, "read 1 is answered")
            post_later()

    run = copy_late_reads(image, monkeypatch, on_first_copies)
    assert run.copied_by[0] == run.ring_thread
    assert run.copied_by[1] != run.ring_thread
    assert run.copied_by[2] != run.copied_by[3]
    assert run.helper_calls == 2


def test_pipelined_completions_are_published_as_served_and_interrupts_shared(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request is in the used ring as soon as it is done; while others
    wait, four completions share an interrupt, and the last is signalled."""
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv
    interrupts_seen: list[int] = []  # when each copy starts

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        interrupts_seen.append(len(rig.rig.interrupt.used))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    tokens = [
        rig.request([header(RequestType.IN, i)], [SECTOR, 1], notify=False)[1] for i in range(10)
    ]  # small: served by the ring's thread alone, in order
    rig.device.queue_notify(0)
    assert workers.submitted == 0
    assert interrupts_seen == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert rig.rig.interrupt.used == [0, 0, 0]  # after 4, after 8, and the last
    assert [token for token, _ in rig.rig.used(0)] == tokens


def test_pipelined_writethrough_syncs_each_write_before_its_completion(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers, cache="writethrough")
    real = os.fdatasync
    synced: list[bytes] = []  # status bytes of the writes, as each sync starts
    statuses: list[list[tuple[int, int]]] = []
    unset = 0xFF  # no status is 0xFF

    def fdatasync(fd: int) -> None:
        synced.append(bytes(rig.rig.mem.readv(wr)[0] for wr in statuses))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for i in range(4):
        wr, _ = rig.request(
            [header(RequestType.OUT, 8 * i), pattern(8 * SECTOR, seed=60 + i)], [1], notify=False
        )
        rig.rig.mem.write(wr[0][0], bytes([unset]))
        statuses.append(wr)
    rig.request([header(RequestType.IN, 100)], [8 * SECTOR, 1], notify=False)
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 5
    assert len(synced) == 4  # one per write, none for the read
    # Each sync comes before the completion of the write it covers: when the
    # k-th sync starts, at most k - 1 writes are answered.
    for k, seen in enumerate(synced, 1):
        assert seen.count(Status.OK) <= k - 1, (k, seen)
    assert all(rig.rig.mem.readv(wr) == bytes([Status.OK]) for wr in statuses)
    expected = b"".join(pattern(8 * SECTOR, seed=60 + i) for i in range(4))
    assert image.read_bytes()[: 32 * SECTOR] == expected


def test_pipelined_writethrough_sync_failure_fails_the_writes(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers, cache="writethrough")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", fail)
    writes = [
        rig.request([header(RequestType.OUT, 8 * i), bytes(8 * SECTOR)], [1], notify=False)[0]
        for i in range(3)
    ]
    read, _ = rig.request([header(RequestType.IN, 100)], [8 * SECTOR, 1], notify=False)
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 4
    for wr in writes:
        assert rig.rig.mem.readv(wr) == bytes([Status.IOERR])
    assert rig.rig.mem.readv(read)[-1] == Status.OK
    assert rig.device.io_errors == 3


def test_pipelined_io_error_fails_only_that_request(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers)
    real_preadv = os.preadv

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if offset == 16 * SECTOR:
            raise OSError(errno.EIO, "injected")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    requests = [post_large_read(rig, i) for i in range(4)]
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 4
    for i, wr in enumerate(requests):
        data = rig.rig.mem.readv(wr)
        if i == 2:
            assert data == bytes(8 * SECTOR) + bytes([Status.IOERR])
        else:
            assert data == large_read_answer(i)
    assert rig.device.io_errors == 1
    assert workers.submitted >= 1


def test_pipelined_unexpected_worker_failure_is_ioerr(
    image: Path, workers: IoWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = pipelined_rig(image, workers)

    def pwritev(*args: object) -> int:
        raise ValueError("not an OSError")

    monkeypatch.setattr(os, "pwritev", pwritev)
    for i in range(2):
        rig.request([header(RequestType.OUT, 8 * i), bytes(8 * SECTOR)], [1], notify=False)
    rig.device.queue_notify(0)
    used = rig.rig.used(0)
    assert [written for _, written in used] == [1, 1]
    assert rig.device.io_errors == 2
    assert not rig.device.needs_reset  # the device keeps serving
    monkeypatch.undo()
    assert rig.read(0, SECTOR) == pattern(SECTOR)


def test_broken_ring_lets_transfers_in_flight_finish(image: Path, workers: IoWorkers) -> None:
    """A malformed chain behind two transfers in flight: they complete, then the
    device needs a reset; nothing is written for the malformed one."""
    rig = pipelined_rig(image, workers)
    reads = [post_large_read(rig, i) for i in range(2)]
    rig.request([header(RequestType.OUT)], [SECTOR, 1], notify=False)
    # Descriptors 6, 7, 8 are the third chain: make its status byte readable
    # after a writable descriptor (split-ring.tex forbids it).
    flags_addr = RING_BASE + 8 * 16 + 12
    assert rig.rig.mem.read_u16(flags_addr) == 2  # VIRTQ_DESC_F_WRITE
    rig.rig.mem.write_u16(flags_addr, 0)
    rig.device.queue_notify(0)
    assert rig.device.needs_reset
    assert len(rig.rig.used(0)) == 2
    for i, wr in enumerate(reads):
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert image.read_bytes() == pattern(DISK_SIZE)


def test_io_parallel_min_validated(image: Path) -> None:
    with pytest.raises(ValueError, match="io_parallel_min"):
        Block(image, io_parallel_min=-1)


@pytest.mark.parametrize("refill", [False, True], ids=["posted-first", "refilled"])
@pytest.mark.parametrize("packed", [False, True])
def test_pipelined_random_batches_match_a_model(
    image: Path,
    workers: IoWorkers,
    packed: bool,
    refill: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds of mixed reads and writes, large and small, served by several
    consumers: every answer and the file match a plain model of the disk.
    Threads switch as often as the interpreter allows, so unguarded ring
    updates would interleave.  ``refilled``: most of each round is posted
    by the driver while the consumers copy, so consumers run dry, wait and
    are called in again mid-round."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    request.addfinalizer(lambda: sys.setswitchinterval(interval))
    rig = Rig(
        Block(image, io_workers=workers, io_parallel_min=4 * SECTOR),
        packed_ring=packed,
        event_idx=True,
        size=64,
    )
    model = bytearray(pattern(DISK_SIZE))
    rng = random.Random(7)
    pending: list[tuple[int, int, int]] = []  # (data seed, sector, sectors) to post
    posted: list[tuple[list[tuple[int, int]], int, int] | None] = []
    driver = threading.Lock()  # the test's driver side is one thread at a time

    def post_pending(count: int) -> None:
        with driver:
            for _ in range(min(count, len(pending))):
                seed, sector, sectors = pending.pop(0)
                if rng.random() < 0.5:
                    data = pattern(sectors * SECTOR, seed=seed)
                    rig.request([header(RequestType.OUT, sector), data], [1], notify=False)
                    model[sector * SECTOR : sector * SECTOR + len(data)] = data
                    posted.append(None)
                else:
                    wr, _ = rig.request(
                        [header(RequestType.IN, sector)], [sectors * SECTOR, 1], notify=False
                    )
                    posted.append((wr, sector, sectors))

    if refill:
        real_preadv, real_pwritev = os.preadv, os.pwritev
        ring_thread = threading.current_thread()  # queue_notify runs here

        def driver_acts() -> None:
            # Post 0, 1 or, from a helper, late (the ring's thread may
            # have found the ring empty meanwhile) 3 requests.
            with driver:
                roll = rng.random()
            if roll < 0.5 and threading.current_thread() is not ring_thread:
                time.sleep(0.0005)
                post_pending(3)
            else:
                post_pending(1 if roll < 0.9 else 0)

        def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            driver_acts()
            return real_preadv(fd, buffers, offset)

        def pwritev(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            driver_acts()
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pwritev", pwritev)
    for round_ in range(60):
        # Disjoint ranges: requests in flight together have no order.
        starts = rng.sample(range(0, 2048 - 16, 16), 20 if refill else 12)
        before = bytes(model)  # what every read of this round finds
        pending[:] = [
            (round_ * 32 + n, sector, rng.choice((1, 2, 8, 16))) for n, sector in enumerate(starts)
        ]
        posted.clear()
        post_pending(4 if refill else 12)
        rig.device.queue_notify(0)
        while pending:  # the driver did not post them all during copies
            post_pending(len(pending))
            rig.device.queue_notify(0)
        used = rig.rig.used(0)
        assert len(used) == len(starts)
        for item in posted:
            if item is not None:
                wr, sector, sectors = item
                expected = before[sector * SECTOR : (sector + sectors) * SECTOR]
                assert rig.rig.mem.readv(wr) == expected + bytes([Status.OK])
    monkeypatch.undo()
    assert image.read_bytes() == bytes(model)
    assert rig.device.io_errors == 0
    assert workers.submitted > 0


def test_pipelined_sleep_finds_nothing_in_flight(image: Path, workers: IoWorkers) -> None:
    """Helpers have finished when queue_notify returns: sleep hands back rings
    with every request answered, and the device serves on after wake."""
    rig = pipelined_rig(image, workers)
    for i in range(6):
        post_large_read(rig, i)
    rig.device.queue_notify(0)
    assert workers.submitted > 0
    resources = rig.device.sleep()
    assert resources is not None
    (queue,) = resources.queues
    assert not queue.has_available()
    assert len(rig.rig.used(0)) == 6  # all in the used ring before sleep returned
    assert rig.device.snapshot()  # allowed: asleep
    rig.device.wake(resources)
    assert rig.read(64, 8 * SECTOR) == pattern(DISK_SIZE)[64 * SECTOR : 72 * SECTOR]


def test_pipelined_bad_request_among_large_ones_gets_ioerr_alone(
    image: Path, workers: IoWorkers
) -> None:
    rig = pipelined_rig(image, workers)
    good = []
    for i in range(5):
        if i == 2:  # past the end of the disk
            bad, _ = rig.request(
                [header(RequestType.IN, DISK_SIZE // SECTOR - 4)], [8 * SECTOR, 1], notify=False
            )
            continue
        good.append((post_large_read(rig, i), i))
    rig.device.queue_notify(0)
    assert len(rig.rig.used(0)) == 5
    assert rig.rig.mem.readv(bad) == bytes(8 * SECTOR) + bytes([Status.IOERR])
    for wr, i in good:
        data = rig.rig.mem.readv(wr)
        assert data == large_read_answer(i)
    assert rig.device.bad_requests == 1
    assert workers.submitted >= 1
    assert not rig.device.needs_reset
