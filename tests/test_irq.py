"""pyvirtio.irq: InterruptStatus bits and the line of a virtio-MMIO device (IrqLine),
and the recording controller in-process hosts use."""

from __future__ import annotations

import threading

import pytest

from pyvirtio.irq import (
    INT_CONFIG,
    INT_VRING,
    DeviceInterrupt,
    InterruptController,
    IrqLine,
    RecordingInterruptController,
)


def test_bits_are_the_spec_values() -> None:
    # transport-mmio.tex, InterruptStatus: bit 0 used buffer, bit 1 config change.
    assert (INT_VRING, INT_CONFIG) == (1, 2)


def test_protocols_are_met() -> None:
    controller = RecordingInterruptController()
    assert isinstance(controller, InterruptController)
    assert isinstance(IrqLine(controller, 5), DeviceInterrupt)


def test_edge_line_pulses_and_sets_status_bits() -> None:
    controller = RecordingInterruptController()
    line = IrqLine(controller, 7)
    assert line.status == 0
    line.signal_used_queue(3)  # every queue shares the one line
    assert line.status == INT_VRING
    assert controller.pulses == [7]
    assert controller.event.is_set()
    line.signal_config_change()
    assert line.status == INT_VRING | INT_CONFIG
    assert controller.pulses == [7, 7]
    assert controller.levels == {}  # an edge line never sets a level
    assert "line=7" in repr(line)


def test_ack_clears_only_the_acknowledged_bits() -> None:
    controller = RecordingInterruptController()
    line = IrqLine(controller, 1)
    line.trigger_queue()
    line.trigger_config()
    line.ack(INT_VRING)
    assert line.status == INT_CONFIG
    line.ack(0)
    assert line.status == INT_CONFIG
    line.ack(0xFFFF_FFFF)  # bits that were never set are ignored
    assert line.status == 0


def test_level_line_follows_the_status_word() -> None:
    controller = RecordingInterruptController()
    line = IrqLine(controller, 4, level=True)
    line.trigger_queue()
    assert controller.levels == {4: True}
    assert controller.pulses == []
    line.trigger_config()
    line.ack(INT_VRING)
    assert controller.levels == {4: True}  # the config bit still holds it up
    line.ack(INT_CONFIG)
    assert controller.levels == {4: False}
    line.trigger_config()
    line.reset()
    assert line.status == 0
    assert controller.levels == {4: False}


@pytest.mark.parametrize("level", [False, True])
def test_set_status_restores_and_masks(level: bool) -> None:
    controller = RecordingInterruptController()
    line = IrqLine(controller, 2, level=level)
    line.set_status(0xFF)
    assert line.status == INT_VRING | INT_CONFIG
    if level:
        assert controller.levels == {2: True}
        line.set_status(0)
        assert controller.levels == {2: False}
    else:
        assert controller.pulses == []  # restoring an edge line fires nothing


def test_recording_controller_state_round_trip() -> None:
    controller = RecordingInterruptController()
    controller.set_level(9, True)
    controller.set_level(3, False)
    state = controller.save_state()
    assert state == bytes([3, 0, 9, 1])
    other = RecordingInterruptController()
    other.restore_state(state)
    assert other.levels == {3: False, 9: True}


def test_status_updates_from_many_threads_are_not_lost() -> None:
    """The status word is read by a vCPU thread while device threads raise bits."""
    controller = RecordingInterruptController()
    line = IrqLine(controller, 0)
    barrier = threading.Barrier(4)

    triggers = {INT_VRING: line.trigger_queue, INT_CONFIG: line.trigger_config}

    def raise_and_ack(bit: int) -> None:
        trigger = triggers[bit]
        barrier.wait()
        for _ in range(2000):
            trigger()
            line.ack(bit)
        trigger()  # every ack of a thread is followed by its own raise

    threads = [
        threading.Thread(target=raise_and_ack, args=(bit,))
        for bit in (INT_VRING, INT_CONFIG, INT_VRING, INT_CONFIG)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert line.status == INT_VRING | INT_CONFIG
    assert len(controller.pulses) == 4 * 2001
