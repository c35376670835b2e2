"""MmioTransport under malformed, random and concurrent register traffic.

Each malformed access must be answered as transport-mmio.tex says (or
ignored), never with an exception out of ``read``/``write``; the log stays
bounded whatever the guest does.
"""

from __future__ import annotations

import logging
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.mmio import ACK, DRIVER_OK, Harness
from helpers.mmio_devices import CounterDevice
from pyvirtio.device import COMMON_FEATURES
from pyvirtio.irq import IrqLine, RecordingInterruptController
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MAGIC_VALUE, MMIO_VERSION, MmioTransport, Reg

# -- malformed accesses ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 8])
def test_register_accesses_must_be_32_bit(size: int) -> None:
    h = Harness()
    assert h.r(Reg.MAGIC_VALUE, size) == 0
    h.w(Reg.STATUS, ACK, size)
    assert h.status() == 0


def test_unaligned_and_unknown_register_accesses() -> None:
    h = Harness()
    assert h.r(Reg.MAGIC_VALUE + 1) == 0
    assert h.r(0x018) == 0  # a hole in the register map
    assert h.r(0x0F8) == 0
    h.w(0x071, ACK)
    h.w(0x018, 1)
    assert h.status() == 0
    assert h.r(-4) == 0


def test_malformed_accesses_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    with caplog.at_level(logging.WARNING, logger="pyvirtio.transport.mmio"):
        for _ in range(100):
            h.r(0x018)
            h.w(Reg.MAGIC_VALUE, 1)
            h.r(Reg.STATUS, 2)
    assert len(caplog.records) == 3


def test_log_keys_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    with caplog.at_level(logging.WARNING, logger="pyvirtio.transport.mmio"):
        for offset in range(0x2000, 0x2000 + 4 * 2000, 4):
            h.r(offset)
    assert len(caplog.records) < 600


# -- concurrency and fuzzing --------------------------------------------------------------


def test_concurrent_register_traffic() -> None:
    h = Harness()
    h.start()
    errors: list[BaseException] = []

    def hammer_status() -> None:
        try:
            for _ in range(300):
                h.start()
                h.w(Reg.STATUS, 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def hammer_reads() -> None:
        try:
            for _ in range(3000):
                assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
                h.r(Reg.STATUS)
                h.w(Reg.QUEUE_NOTIFY, 0)
                if h.status() & DRIVER_OK:
                    h.device.report_broken("x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer_status), threading.Thread(target=hammer_reads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


_OFFSETS = st.one_of(
    st.sampled_from(
        [v for k, v in vars(Reg).items() if not k.startswith("_") and isinstance(v, int)]
    ),
    st.integers(0, 0x1100),
    st.integers(-8, 1 << 64),
)
_VALUES = st.one_of(
    st.integers(0, 0xFFFF_FFFF),
    st.sampled_from([0, 1, 2, 3, 0xB, 0xF, 0x8000_0000, 0x1000, 0x2000, 0x3000, 16, 8]),
)
_ACCESS = st.tuples(st.booleans(), _OFFSETS, st.sampled_from([1, 2, 4, 8, 3, 0, 16]), _VALUES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accesses=st.lists(_ACCESS, max_size=60), packed=st.booleans())
def test_random_register_traffic_never_escapes(
    accesses: list[tuple[bool, int, int, int]], packed: bool
) -> None:
    h = Harness(mem=GuestMemory.anonymous(0x10000))
    if packed:
        h.negotiate(COMMON_FEATURES)
    for is_write, offset, size, value in accesses:
        if is_write:
            h.t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            data = bytearray(size)
            h.t.read(offset, data)
            assert len(data) == size
        assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
        assert h.r(Reg.VERSION) == MMIO_VERSION


def test_public_lock_serialises_host_calls_with_register_accesses() -> None:
    """A host thread holding ``transport.lock`` keeps vCPU accesses out until it lets go."""
    import time

    transport = MmioTransport(
        CounterDevice(), GuestMemory.anonymous(1 << 16), IrqLine(RecordingInterruptController(), 5)
    )
    order: list[str] = []

    def vcpu() -> None:
        data = bytearray(4)
        transport.read(0x70, data)
        order.append("vcpu-read")

    with transport.lock:
        thread = threading.Thread(target=vcpu)
        thread.start()
        time.sleep(0.05)
        order.append("host-done")
    thread.join(timeout=5)
    assert order == ["host-done", "vcpu-read"]
