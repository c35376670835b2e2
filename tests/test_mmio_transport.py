"""MmioTransport: every register, every status transition and malformed guest sequences.

Each malformed access must be answered as transport-mmio.tex and content.tex
say (or ignored), never with an exception out of ``read``/``write``.
"""

from __future__ import annotations

import threading

import pytest

from helpers.mmio import (
    ACK,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    NEEDS_RESET,
    Q0,
    Q1,
    SPLIT_FEATURES,
    Harness,
)
from helpers.mmio_devices import CounterDevice, EchoDevice
from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import COMMON_FEATURES, DeviceState
from pyvirtio.irq import INT_CONFIG, INT_VRING
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MAGIC_VALUE, MMIO_VERSION, VENDOR_ID, Reg
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

# -- identification registers ------------------------------------------------------------


def test_identification_registers() -> None:
    h = Harness()
    assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE == 0x74726976
    assert h.r(Reg.VERSION) == MMIO_VERSION == 2
    assert h.r(Reg.DEVICE_ID) == int(h.device.device_id)
    assert h.r(Reg.VENDOR_ID) == VENDOR_ID
    assert VENDOR_ID.to_bytes(4, "little") == b"pyvt"


def test_read_only_registers_ignore_writes() -> None:
    h = Harness()
    for offset in (Reg.MAGIC_VALUE, Reg.VERSION, Reg.DEVICE_ID, Reg.INTERRUPT_STATUS):
        h.w(offset, 0xDEAD)
    assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert h.r(Reg.VERSION) == 2
    assert h.r(Reg.DEVICE_ID) == int(h.device.device_id)
    assert h.r(Reg.INTERRUPT_STATUS) == 0


def test_write_only_registers_read_zero() -> None:
    h = Harness()
    h.w(Reg.QUEUE_SEL, 1)
    h.w(Reg.QUEUE_SIZE, 8)
    for offset in (Reg.QUEUE_SEL, Reg.QUEUE_SIZE, Reg.DEVICE_FEATURES_SEL, Reg.QUEUE_NOTIFY):
        assert h.r(offset) == 0


def test_device_features_pages() -> None:
    offered = COMMON_FEATURES | 1 << 3
    h = Harness(EchoDevice(offered))
    h.w(Reg.DEVICE_FEATURES_SEL, 0)
    assert h.r(Reg.DEVICE_FEATURES) == offered & 0xFFFF_FFFF
    h.w(Reg.DEVICE_FEATURES_SEL, 1)
    assert h.r(Reg.DEVICE_FEATURES) == offered >> 32
    for sel in (2, 7, 0xFFFF_FFFF):
        h.w(Reg.DEVICE_FEATURES_SEL, sel)
        assert h.r(Reg.DEVICE_FEATURES) == 0


# -- feature negotiation ------------------------------------------------------------------


def test_driver_features_pages_and_features_ok() -> None:
    h = Harness()
    assert h.negotiate(SPLIT_FEATURES) == ACK | DRIVER | FEATURES_OK
    assert h.device.acked_features == SPLIT_FEATURES
    assert h.t.driver_features == SPLIT_FEATURES


def test_driver_features_page_beyond_64_bits_ignored() -> None:
    h = Harness()
    h.set_status(ACK | DRIVER)
    h.write_features(SPLIT_FEATURES)
    h.w(Reg.DRIVER_FEATURES_SEL, 2)
    h.w(Reg.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert h.t.driver_features == SPLIT_FEATURES
    assert h.set_status(FEATURES_OK) & FEATURES_OK


def test_features_ok_refused_for_unoffered_bits() -> None:
    h = Harness()
    status = h.negotiate(SPLIT_FEATURES | 1 << 5)
    assert status == ACK | DRIVER  # FEATURES_OK reads back clear
    assert h.device.acked_features == 0


def test_features_ok_refused_without_version_1() -> None:
    h = Harness()
    assert not h.negotiate(SPLIT_FEATURES & ~Feature.VERSION_1.mask) & FEATURES_OK


def test_features_ok_refused_when_device_says_so() -> None:
    device = EchoDevice()
    device.acceptable = False
    h = Harness(device)
    assert not h.negotiate() & FEATURES_OK


def test_features_ok_refused_can_retry_with_other_features() -> None:
    h = Harness()
    h.set_status(ACK | DRIVER)
    h.write_features(1 << 5)
    assert not h.set_status(FEATURES_OK) & FEATURES_OK
    h.write_features(SPLIT_FEATURES)
    assert h.set_status(FEATURES_OK) & FEATURES_OK


def test_driver_features_after_features_ok_ignored() -> None:
    h = Harness()
    h.negotiate()
    h.w(Reg.DRIVER_FEATURES_SEL, 0)
    h.w(Reg.DRIVER_FEATURES, 0)
    assert h.t.driver_features == SPLIT_FEATURES
    assert h.device.acked_features == SPLIT_FEATURES


# -- status --------------------------------------------------------------------------------


def test_status_clearing_bits_refused() -> None:
    h = Harness()
    h.negotiate()
    h.w(Reg.STATUS, ACK)  # clears DRIVER and FEATURES_OK: refused whole
    assert h.status() == ACK | DRIVER | FEATURES_OK


def test_driver_cannot_set_or_clear_needs_reset() -> None:
    h = Harness()
    h.w(Reg.STATUS, ACK | NEEDS_RESET)
    assert h.status() == ACK
    h.start()
    h.device.report_broken("test")
    assert h.status() & NEEDS_RESET
    h.w(Reg.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK | DeviceStatus.FAILED)
    assert h.status() & NEEDS_RESET
    assert h.status() & DeviceStatus.FAILED


def test_driver_ok_without_features_ok_refused() -> None:
    h = Harness()
    h.set_status(ACK | DRIVER)
    assert h.set_status(DRIVER_OK) == ACK | DRIVER
    assert h.device.state is DeviceState.NEW


def test_reset_clears_everything() -> None:
    h = Harness(EchoDevice(shm=[(0x10_0000, 0x1000)]))
    h.start()
    h.irq.trigger_queue()
    h.irq.trigger_config()
    h.w(Reg.DEVICE_FEATURES_SEL, 1)
    h.w(Reg.QUEUE_SEL, 1)
    h.w(Reg.SHM_SEL, 3)
    h.w(Reg.STATUS, 0)
    assert h.status() == 0
    assert h.r(Reg.INTERRUPT_STATUS) == 0
    assert h.device.state is DeviceState.INACTIVE
    assert h.device.acked_features == 0
    assert h.t.driver_features == 0
    assert h.queue_ready(0) == 0
    assert h.queue_ready(1) == 0
    # Selectors are back to 0: DeviceFeatures shows page 0, SHM shows region 0.
    h.w(Reg.QUEUE_SEL, 0)
    assert h.r(Reg.DEVICE_FEATURES) == COMMON_FEATURES & 0xFFFF_FFFF
    assert h.r(Reg.SHM_LEN_LOW) == 0x1000
    # Queue configuration is forgotten: QueueReady needs size and addresses again.
    h.negotiate()
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_READY, 1)
    assert h.r(Reg.QUEUE_READY) == 0


def test_reinitialize_after_reset_mid_operation() -> None:
    h = Harness()
    h.start()
    dq = h.driver_queue()
    buf = 0x8000
    h.mem.write(buf, b"abc")
    dq.add([(buf, 3)], [(buf + 16, 3)], "x")
    h.w(Reg.STATUS, 0)
    h.w(Reg.QUEUE_NOTIFY, 0)  # after reset: ignored
    assert h.device.echoed == 0
    h.start()
    dq = h.driver_queue()
    dq.add([(buf, 3)], [(buf + 16, 3)], "y")
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert list(dq.used()) == [("y", 3)]
    assert h.mem.read(buf + 16, 3) == b"abc"


# -- queue configuration -------------------------------------------------------------------


def test_queue_size_max_and_out_of_range_selector() -> None:
    h = Harness()
    h.w(Reg.QUEUE_SEL, 0)
    assert h.r(Reg.QUEUE_SIZE_MAX) == 16
    h.w(Reg.QUEUE_SEL, 1)
    assert h.r(Reg.QUEUE_SIZE_MAX) == 8
    h.negotiate()
    for sel in (2, 1000, 0xFFFF_FFFF):
        h.w(Reg.QUEUE_SEL, sel)
        assert h.r(Reg.QUEUE_SIZE_MAX) == 0
        h.program_queue(sel, 4, Q0)
        assert h.r(Reg.QUEUE_READY) == 0
        h.w(Reg.QUEUE_RESET, 1)
        assert h.r(Reg.QUEUE_RESET) == 0
    assert not h.status() & NEEDS_RESET


@pytest.mark.parametrize(
    ("size", "ok"), [(0, False), (17, False), (32, False), (12, False), (16, True), (1, True)]
)
def test_queue_ready_checks_split_size(size: int, ok: bool) -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, size, Q0)
    assert h.r(Reg.QUEUE_READY) == int(ok)


def test_packed_queue_size_need_not_be_power_of_two() -> None:
    h = Harness()
    h.negotiate(COMMON_FEATURES)
    h.program_queue(0, 12, Q0)
    assert h.r(Reg.QUEUE_READY) == 1
    assert h.set_status(DRIVER_OK) & DRIVER_OK
    assert not h.status() & NEEDS_RESET
    assert isinstance(h.device.queues[0], PackedDeviceQueue)


@pytest.mark.parametrize(
    "missing", [Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW]
)
def test_queue_ready_needs_every_address(missing: int) -> None:
    h = Harness()
    h.negotiate()
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_SIZE, 16)
    for low, addr in zip(
        (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW), Q0, strict=True
    ):
        if low != missing:
            h.w(low, addr)
    h.w(Reg.QUEUE_READY, 1)
    assert h.r(Reg.QUEUE_READY) == 0
    h.w(missing + 4, 0)  # writing only the high half sets the address too
    h.w(Reg.QUEUE_READY, 1)
    assert h.r(Reg.QUEUE_READY) == 1


def test_queue_ready_before_features_ok_refused() -> None:
    h = Harness()
    h.set_status(ACK | DRIVER)
    h.program_queue(0, 16, Q0)
    assert h.r(Reg.QUEUE_READY) == 0


def test_queue_ready_other_values_ignored() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0, ready=False)
    h.w(Reg.QUEUE_READY, 2)
    assert h.r(Reg.QUEUE_READY) == 0


def test_queue_registers_ignored_while_ready() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0)
    h.w(Reg.QUEUE_SIZE, 4)
    h.w(Reg.QUEUE_DESC_LOW, 0x7000)
    h.set_status(DRIVER_OK)
    queue = h.device.queues[0]
    assert isinstance(queue, SplitDeviceQueue)
    assert queue.size == 16
    assert queue.desc_addr == Q0[0]


def test_queue_registers_ignored_after_driver_ok() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0)
    h.set_status(DRIVER_OK)
    h.program_queue(1, 8, Q1)  # not ready before DRIVER_OK: too late now
    assert h.r(Reg.QUEUE_READY) == 0
    assert isinstance(h.device.queues[1], DisabledQueue)


def test_high_address_halves() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0x1_0000_0000, 0x10_0000)
    h = Harness(mem=mem)
    h.negotiate()
    areas = (0x1_0000_1000, 0x1_0000_2000, 0x1_0000_3000)
    h.program_queue(0, 16, areas)
    h.set_status(DRIVER_OK)
    assert not h.status() & NEEDS_RESET
    queue = h.device.queues[0]
    assert isinstance(queue, SplitDeviceQueue)
    assert (queue.desc_addr, queue.driver_addr, queue.device_addr) == areas
    dq = h.driver_queue(16, areas)
    buf = 0x1_0000_8000
    mem.write(buf, b"hi")
    dq.add([(buf, 2)], [(buf + 8, 2)], 1)
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert list(dq.used()) == [(1, 2)]


def test_unready_queue_is_activated_as_disabled() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0)
    h.set_status(DRIVER_OK)
    assert h.device.state is DeviceState.ACTIVE
    assert isinstance(h.device.activated_with[0], SplitDeviceQueue)
    assert isinstance(h.device.activated_with[1], DisabledQueue)
    h.w(Reg.QUEUE_NOTIFY, 1)  # unready: ignored
    assert h.device.echoed == 0


def test_device_may_refuse_disabled_queues() -> None:
    device = EchoDevice()
    device.require_all_queues = True
    h = Harness(device)
    h.negotiate()
    h.program_queue(0, 16, Q0)
    h.set_status(DRIVER_OK)
    assert h.status() & NEEDS_RESET
    assert h.r(Reg.INTERRUPT_STATUS) == INT_CONFIG


def test_queue_ready_zero_stops_a_live_queue() -> None:
    h = Harness()
    h.start()
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_READY, 0)
    assert h.r(Reg.QUEUE_READY) == 0
    assert isinstance(h.device.queues[0], DisabledQueue)
    dq = h.driver_queue()
    dq.add([(0x8000, 4)], [(0x8010, 4)], 1)
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert not list(dq.used())


# -- activation failures -------------------------------------------------------------------


def _assert_needs_reset(h: Harness) -> None:
    assert h.status() & NEEDS_RESET
    assert h.status() & DRIVER_OK
    assert h.r(Reg.INTERRUPT_STATUS) & INT_CONFIG
    assert h.controller.pulses


def test_misaligned_ring_sets_needs_reset() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, (0x1001, 0x2000, 0x3000))
    h.set_status(DRIVER_OK)
    _assert_needs_reset(h)
    assert h.device.state is DeviceState.NEW


def test_ring_outside_memory_sets_needs_reset() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, (0x4000_0000, 0x2000, 0x3000))
    h.set_status(DRIVER_OK)
    _assert_needs_reset(h)


def test_activation_error_sets_needs_reset_and_reset_recovers() -> None:
    device = EchoDevice()
    device.refuse_activation = True
    h = Harness(device)
    h.start()
    _assert_needs_reset(h)
    h.w(Reg.QUEUE_NOTIFY, 0)  # ignored: the device needs a reset
    device.refuse_activation = False
    h.w(Reg.STATUS, 0)
    assert h.status() == 0
    h.start()
    assert not h.status() & NEEDS_RESET
    assert device.state is DeviceState.ACTIVE


def _post_bad_chain(h: Harness) -> None:
    """A descriptor pointing outside guest memory, made available in queue 0."""
    desc, avail, _ = Q0
    h.mem.write_u64(desc, 0xFFFF_0000_0000)
    h.mem.write_u32(desc + 8, 64)
    h.mem.write_u16(desc + 12, 0)
    h.mem.write_u16(avail + 4, 0)
    h.mem.write_u16(avail + 2, 1)


def test_broken_queue_sets_needs_reset() -> None:
    h = Harness()
    h.start()
    h.controller.pulses.clear()
    _post_bad_chain(h)
    h.w(Reg.QUEUE_NOTIFY, 0)
    _assert_needs_reset(h)
    assert h.device.needs_reset


def test_broken_queue_detected_even_if_device_swallows_the_error() -> None:
    device = EchoDevice()
    device.swallow_errors = True
    h = Harness(device)
    h.start()
    _post_bad_chain(h)
    h.w(Reg.QUEUE_NOTIFY, 0)
    _assert_needs_reset(h)


def test_device_report_broken_from_another_thread() -> None:
    h = Harness()
    h.start()
    thread = threading.Thread(target=h.device.report_broken, args=("backend died",))
    thread.start()
    thread.join()
    _assert_needs_reset(h)
    pulses = len(h.controller.pulses)
    h.device.report_broken("again")  # already set: no second interrupt
    assert len(h.controller.pulses) == pulses


# -- notifications and interrupts ---------------------------------------------------------


def test_notify_processes_queue_and_interrupts() -> None:
    h = Harness()
    h.start()
    dq = h.driver_queue()
    h.mem.write(0x8000, b"ping")
    dq.add([(0x8000, 4)], [(0x8010, 4)], "t")
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert list(dq.used()) == [("t", 4)]
    assert h.r(Reg.INTERRUPT_STATUS) == INT_VRING
    h.w(Reg.INTERRUPT_ACK, INT_VRING)
    assert h.r(Reg.INTERRUPT_STATUS) == 0


def test_notify_before_driver_ok_is_ignored() -> None:
    h = Harness()
    h.negotiate()
    h.program_queue(0, 16, Q0)
    dq = h.driver_queue()
    dq.add([(0x8000, 4)], [(0x8010, 4)], "t")
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert not list(dq.used())
    assert h.r(Reg.INTERRUPT_STATUS) == 0


@pytest.mark.parametrize("index", [2, 0xFFFF, 0x1_0000, 0xFFFF_FFFF])
def test_notify_of_nonexistent_queue_is_ignored(index: int) -> None:
    h = Harness()
    h.start()
    h.w(Reg.QUEUE_NOTIFY, index)
    assert not h.status() & NEEDS_RESET


def test_notification_data_uses_low_16_bits() -> None:
    features = SPLIT_FEATURES | Feature.NOTIFICATION_DATA.mask
    h = Harness(EchoDevice(features))
    h.start(features)
    dq = h.driver_queue()
    dq.add([(0x8000, 4)], [(0x8010, 4)], "t")
    h.w(Reg.QUEUE_NOTIFY, 0x8001_0000)  # next_off/wrap in the high half, queue 0
    assert list(dq.used()) == [("t", 4)]


def test_notify_value_with_high_bits_without_notification_data_is_ignored() -> None:
    h = Harness()
    h.start()
    dq = h.driver_queue()
    dq.add([(0x8000, 4)], [(0x8010, 4)], "t")
    h.w(Reg.QUEUE_NOTIFY, 0x8001_0000)
    assert not list(dq.used())


def test_interrupt_ack_clears_only_acked_bits() -> None:
    h = Harness()
    h.irq.trigger_queue()
    h.irq.trigger_config()
    assert h.r(Reg.INTERRUPT_STATUS) == INT_VRING | INT_CONFIG
    h.w(Reg.INTERRUPT_ACK, INT_CONFIG)
    assert h.r(Reg.INTERRUPT_STATUS) == INT_VRING


def test_exception_in_device_is_contained() -> None:
    device = EchoDevice()
    h = Harness(device)
    h.start()
    device.raise_in_notify = RuntimeError("model bug")
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE
    _assert_needs_reset(h)


def test_exception_in_config_read_answers_zero() -> None:
    class Faulty(EchoDevice):
        def read_config(self, offset: int, length: int) -> bytes:
            raise RuntimeError("model bug")

    h = Harness(Faulty())
    assert h.r(0x100) == 0
    assert h.r(Reg.MAGIC_VALUE) == MAGIC_VALUE


# -- queue reset ---------------------------------------------------------------------------


def test_queue_reset_needs_ring_reset() -> None:
    h = Harness()
    h.start()
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_RESET, 1)
    assert h.r(Reg.QUEUE_READY) == 1
    assert isinstance(h.device.queues[0], SplitDeviceQueue)


def test_queue_reset_and_reenable() -> None:
    features = SPLIT_FEATURES | Feature.RING_RESET.mask
    h = Harness(EchoDevice(features))
    h.start(features)
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_RESET, 1)
    assert h.r(Reg.QUEUE_RESET) == 0
    assert h.r(Reg.QUEUE_READY) == 0
    assert isinstance(h.device.queues[0], DisabledQueue)
    # Re-enable at a new place, with a new size, while DRIVER_OK stays set.
    areas = (0x9000, 0xA000, 0xB000)
    h.program_queue(0, 8, areas)
    assert h.r(Reg.QUEUE_READY) == 1
    dq = h.driver_queue(8, areas)
    h.mem.write(0xC000, b"again")
    dq.add([(0xC000, 5)], [(0xC010, 5)], "r")
    h.w(Reg.QUEUE_NOTIFY, 0)
    assert list(dq.used()) == [("r", 5)]
    assert h.mem.read(0xC010, 5) == b"again"


def test_queue_reenable_with_bad_ring_sets_needs_reset() -> None:
    features = SPLIT_FEATURES | Feature.RING_RESET.mask
    h = Harness(EchoDevice(features))
    h.start(features)
    h.w(Reg.QUEUE_SEL, 0)
    h.w(Reg.QUEUE_RESET, 1)
    h.program_queue(0, 8, (0x9001, 0xA000, 0xB000))
    assert h.r(Reg.QUEUE_READY) == 0
    _assert_needs_reset(h)


# -- shared memory, config space, generation ------------------------------------------


def test_shared_memory_regions() -> None:
    h = Harness(EchoDevice(shm=[(0x2_0000_0000, 0x1_2000_0000)]))
    h.w(Reg.SHM_SEL, 0)
    assert h.r(Reg.SHM_LEN_LOW) == 0x2000_0000
    assert h.r(Reg.SHM_LEN_HIGH) == 0x1
    assert h.r(Reg.SHM_BASE_LOW) == 0
    assert h.r(Reg.SHM_BASE_HIGH) == 0x2
    h.w(Reg.SHM_SEL, 1)
    for offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
        assert h.r(offset) == 0xFFFF_FFFF


def test_no_shared_memory_reads_all_ones() -> None:
    h = Harness()
    assert h.r(Reg.SHM_LEN_LOW) == h.r(Reg.SHM_BASE_HIGH) == 0xFFFF_FFFF


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_config_reads_of_every_width(size: int) -> None:
    h = Harness()
    expected = bytes(h.device.config[:size])
    assert h.r(0x100, size) == int.from_bytes(expected, "little")
    assert h.r(0x101, 1) == 2  # byte alignment is allowed in config space


def test_config_read_past_end_and_bad_width() -> None:
    h = Harness()
    assert h.r(0x104, 8) == int.from_bytes(bytes([5, 6, 7, 8, 0, 0, 0, 0]), "little")
    assert h.r(0x100, 3) == 0
    assert h.r(0x1000, 4) == 0  # past the window


def test_config_writes() -> None:
    h = Harness()
    h.w(0x102, 0xAABB, 2)
    assert h.device.config[2:4] == b"\xbb\xaa"
    h.w(0x100, 0x1122334455667788, 8)
    assert bytes(h.device.config) == (0x1122334455667788).to_bytes(8, "little")
    h.w(0x100, 0, 3)  # bad width: ignored
    assert bytes(h.device.config) == (0x1122334455667788).to_bytes(8, "little")


def test_config_generation_and_change_notification() -> None:
    device = CounterDevice()
    h = Harness(device)  # type: ignore[arg-type]
    assert h.r(Reg.CONFIG_GENERATION) == 0
    device.bump()
    assert h.r(Reg.CONFIG_GENERATION) == 1
    assert h.r(Reg.INTERRUPT_STATUS) == 0  # not active yet: no notification
    assert h.negotiate(Feature.VERSION_1.mask) & FEATURES_OK
    assert h.set_status(DRIVER_OK) & DRIVER_OK
    device.bump()
    assert h.r(Reg.CONFIG_GENERATION) == 2
    assert h.r(Reg.INTERRUPT_STATUS) == INT_CONFIG
    assert h.r(0x100) == 2
