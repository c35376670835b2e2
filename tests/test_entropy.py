"""virtio-rng: requests filled from the source, caps, driver errors, failing sources, e2e."""

from __future__ import annotations

import hashlib
import itertools
import logging

import pytest

from helpers.queues import RING_MODES, DirectRig
from pyvirtio.constants import DeviceId, DeviceStatus, Feature
from pyvirtio.device import DeviceState
from pyvirtio.devices.entropy import DEFAULT_MAX_REQUEST, REQUESTQ, Entropy
from pyvirtio.driver.entropy import EntropyDriver, EntropyDriverError
from pyvirtio.testing import MmioTestRig, device_conformance


class CountingSource:
    """Deterministic "random" bytes: a counter stream, so tests can predict every byte."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._stream = itertools.count()

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        return bytes(next(self._stream) & 0xFF for _ in range(n))


def expected_stream(total: int) -> bytes:
    return bytes(i & 0xFF for i in range(total))


def test_identity() -> None:
    dev = Entropy()
    assert dev.device_id is DeviceId.ENTROPY
    assert dev.queue_max_sizes == (256,)
    assert dev.read_config(0, 8) == bytes(8)  # no configuration space
    assert dev.offered_features & Feature.VERSION_1.mask
    with pytest.raises(ValueError):
        Entropy(max_request=0)


@pytest.mark.parametrize("mode", RING_MODES)
def test_writable_buffers_filled_with_source_bytes(mode: dict[str, bool]) -> None:
    source = CountingSource()
    dev = Entropy(source)
    rig = DirectRig(dev, **mode)
    rig.activate()
    requests = [(1,), (16,), (100, 28), (3, 5, 7)]
    ranges = [rig.post(REQUESTQ, writable=lens, token=i) for i, lens in enumerate(requests)]
    done = dict(rig.used(REQUESTQ))
    assert set(done) == set(range(len(requests)))
    stream = b"".join(rig.read(ranges[i], done[i]) for i in range(len(requests)))
    assert [done[i] for i in range(len(requests))] == [sum(r) for r in requests]
    assert stream == expected_stream(sum(map(sum, requests)))
    assert source.calls == [sum(r) for r in requests]
    assert dev.bytes_served == len(stream)


def test_batch_of_requests_gets_one_interrupt() -> None:
    rig = DirectRig(Entropy(CountingSource()))
    rig.activate()
    for i in range(8):
        rig.post(REQUESTQ, writable=[32], token=i, notify=False)
    rig.device.queue_notify(REQUESTQ)
    assert [tok for tok, _ in rig.used(REQUESTQ)] == list(range(8))
    assert rig.interrupt.used == [REQUESTQ]


def test_each_request_capped_at_max_request() -> None:
    source = CountingSource()
    rig = DirectRig(Entropy(source, max_request=100))
    rig.activate()
    big = rig.post(REQUESTQ, writable=[60, 60, 60], token="big")
    small = rig.post(REQUESTQ, writable=[40], token="small")
    done = dict(rig.used(REQUESTQ))
    assert done == {"big": 100, "small": 40}
    assert source.calls == [100, 40]
    assert rig.read(big, 180) == expected_stream(100) + bytes(80)
    assert rig.read(small, 40) == expected_stream(140)[100:]


def test_default_cap() -> None:
    rig = DirectRig(Entropy())
    rig.activate()
    rig.post(REQUESTQ, writable=[DEFAULT_MAX_REQUEST + 4096], token=0)
    assert rig.used(REQUESTQ) == [(0, DEFAULT_MAX_REQUEST)]


def test_short_source_reads_report_what_was_written() -> None:
    rig = DirectRig(Entropy(lambda n: b"\xaa" * min(n, 5)))
    rig.activate()
    ranges = rig.post(REQUESTQ, writable=[64], token=0)
    assert rig.used(REQUESTQ) == [(0, 5)]
    assert rig.read(ranges, 5) == b"\xaa" * 5


def test_oversized_source_result_is_truncated() -> None:
    rig = DirectRig(Entropy(lambda n: b"\x55" * (n + 100)))
    rig.activate()
    rig.post(REQUESTQ, writable=[8], token=0)
    guard = rig.alloc.alloc(16)  # the next allocation must stay untouched
    rig.post(REQUESTQ, writable=[8], token=1)
    assert rig.used(REQUESTQ) == [(0, 8), (1, 8)]
    assert rig.mem.read(guard, 16) == bytes(16)


@pytest.mark.parametrize("mode", RING_MODES)
def test_readable_descriptors_are_a_driver_error(
    mode: dict[str, bool], caplog: pytest.LogCaptureFixture
) -> None:
    source = CountingSource()
    dev = Entropy(source)
    rig = DirectRig(dev, **mode)
    rig.activate()
    with caplog.at_level(logging.DEBUG, logger="pyvirtio.devices.entropy"):
        rig.post(REQUESTQ, readable=[b"junk"], token="readable-only")
        mixed = rig.post(REQUESTQ, readable=[b"x"], writable=[16], token="mixed")
        good = rig.post(REQUESTQ, writable=[4], token="good")
    done = dict(rig.used(REQUESTQ))
    assert done == {"readable-only": 0, "mixed": 0, "good": 4}
    assert rig.read(mixed, 16) == bytes(16)  # nothing written into a bad request
    assert rig.read(good, 4) == expected_stream(4)
    assert dev.bad_requests == 2
    assert rig.device.state is DeviceState.ACTIVE and not rig.device.needs_reset
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # a guest repeating the mistake costs one warning


def test_failing_source_completes_with_zero_and_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = iter([OSError(5, "EIO from the hardware RNG")])

    def flaky(n: int) -> bytes:
        error = next(failures, None)
        if error is not None:
            raise error
        return b"\x01" * n

    dev = Entropy(flaky)
    rig = DirectRig(dev)
    rig.activate()
    with caplog.at_level(logging.WARNING, logger="pyvirtio.devices.entropy"):
        rig.post(REQUESTQ, writable=[10], token=0)
        rig.post(REQUESTQ, writable=[10], token=1)
    assert rig.used(REQUESTQ) == [(0, 0), (1, 10)]
    assert dev.source_failures == 1
    assert "EIO" in caplog.text
    assert not rig.device.needs_reset


def test_zero_length_writable_and_empty_queue() -> None:
    source = CountingSource()
    rig = DirectRig(Entropy(source))
    rig.activate()
    rig.device.queue_notify(REQUESTQ)  # nothing available: nothing happens
    assert rig.interrupt.used == []
    rig.post(REQUESTQ, writable=[0], token=0)
    assert rig.used(REQUESTQ) == [(0, 0)]
    assert source.calls == []


def test_buffers_posted_before_activation_are_served_at_activation() -> None:
    rig = DirectRig(Entropy(CountingSource()))
    rig.post(REQUESTQ, writable=[8], token=0)  # the notify is ignored: not active yet
    assert rig.used(REQUESTQ) == []
    rig.activate()
    assert rig.used(REQUESTQ) == [(0, 8)]


def test_requests_posted_while_asleep_are_served_on_wake() -> None:
    rig = DirectRig(Entropy(CountingSource()))
    rig.activate()
    resources = rig.device.sleep()
    rig.post(REQUESTQ, writable=[8], token=0)
    assert rig.used(REQUESTQ) == []
    rig.device.wake(resources)
    assert rig.used(REQUESTQ) == [(0, 8)]


def test_snapshot_keeps_counters() -> None:
    rig = DirectRig(Entropy(CountingSource(), max_request=4))
    rig.activate()
    rig.post(REQUESTQ, writable=[10], token=0)
    rig.post(REQUESTQ, readable=[b"x"], token=1)
    rig.device.sleep()
    blob = rig.device.snapshot()
    other = Entropy()
    other.sleep()
    other.restore(blob)
    assert (other.bytes_served, other.bad_requests, other.source_failures) == (4, 1, 0)
    assert other.snapshot() == blob
    with pytest.raises(ValueError):
        other.restore(blob.replace(b'"bytes_served":4', b'"bytes_served":-4'))


def test_malformed_ring_marks_device_broken() -> None:
    rig = DirectRig(Entropy(CountingSource()))
    rig.activate()
    rig.post(REQUESTQ, writable=[8], token=0, notify=False)
    # Point the descriptor outside guest memory.
    rig.mem.write_u64(0x1_0000, 1 << 60)
    rig.device.queue_notify(REQUESTQ)
    assert rig.device.needs_reset


# -- end to end: EntropyDriver over virtio-MMIO ------------------------------------------


@pytest.mark.parametrize("packed_ring", [False, True], ids=["split", "packed"])
def test_driver_reads_random_bytes(packed_ring: bool) -> None:
    source = CountingSource()
    rig = MmioTestRig(Entropy(source, max_request=1000))
    features = None if packed_ring else rig.device.offered_features & ~Feature.RING_PACKED.mask
    driver = EntropyDriver(rig.driver, features=features)
    assert driver.packed_ring is packed_ring
    assert rig.device.state is DeviceState.ACTIVE
    data = driver.read(2500)  # more than one request: the device caps each at 1000
    assert data == expected_stream(2500)
    assert driver.read(0) == b""
    assert rig.controller.pulses  # completions were signalled
    assert driver.read(3) == expected_stream(2503)[2500:]


def test_driver_with_os_urandom() -> None:
    rig = MmioTestRig(Entropy())
    driver = EntropyDriver(rig.driver)
    a, b = driver.read(4096), driver.read(4096)
    assert len(a) == len(b) == 4096
    assert hashlib.sha256(a).digest() != hashlib.sha256(b).digest()


def test_driver_retries_after_empty_completion() -> None:
    results = iter([OSError("busy"), None, None])

    def source(n: int) -> bytes:
        error = next(results, None)
        if error is not None:
            raise error
        return b"\x07" * n

    rig = MmioTestRig(Entropy(source))
    driver = EntropyDriver(rig.driver)
    assert driver.read(16) == b"\x07" * 16


def test_driver_gives_up_when_the_device_never_delivers() -> None:
    def broken(n: int) -> bytes:
        raise OSError("gone")

    rig = MmioTestRig(Entropy(broken))
    driver = EntropyDriver(rig.driver, max_empty=3)
    with pytest.raises(EntropyDriverError):
        driver.read(16)


def test_driver_sees_device_needing_reset() -> None:
    rig = MmioTestRig(Entropy(CountingSource()))
    driver = EntropyDriver(rig.driver)
    rig.device.report_broken("test")
    assert rig.driver.status & DeviceStatus.DEVICE_NEEDS_RESET
    with pytest.raises(EntropyDriverError):
        driver.read(4)


def test_driver_timeout_then_late_completion_and_close() -> None:
    rig = MmioTestRig(Entropy(CountingSource()))
    free_before = rig.allocator.free_bytes
    driver = EntropyDriver(rig.driver, timeout=0.1, buffer_size=16)
    rig.transport.sleep()  # a paused device ignores the notification
    with pytest.raises(EntropyDriverError, match="no completion"):
        driver.read(8)
    rig.transport.wake()  # and serves the request on wake: too late for that read
    assert driver.read(8) == expected_stream(16)[8:]
    driver.close()
    assert rig.allocator.free_bytes == free_before


def _modify(device: object) -> None:
    # Entropy's only state is its statistics; a host can reset or adjust them
    # at any time, including while the device is asleep.
    assert isinstance(device, Entropy)
    device.bytes_served += 4096


TestEntropyConformance = device_conformance(lambda: Entropy(CountingSource()), modify=_modify)
