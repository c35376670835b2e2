"""pyvirtio.device: the VirtioDevice base every model builds on: negotiation,
config space, the lifecycle state machine, queue notifications, snapshots."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from helpers.queues import DirectRig, RecordingInterrupt
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import (
    COMMON_FEATURES,
    ActivationError,
    DeviceState,
    LifecycleError,
    QueueResources,
    VirtioDevice,
    expect_bool,
    expect_object,
    expect_str,
    expect_uint,
)
from pyvirtio.virtqueue.common import DeviceQueue, VirtqueueError

OWN_FEATURE = 1 << 3


class Toy(VirtioDevice):
    """A two-queue device recording its hooks; queue 0 echoes, queue 1 breaks."""

    device_id = DeviceId.ENTROPY

    def __init__(self) -> None:
        super().__init__(COMMON_FEATURES | OWN_FEATURE, (16, 16))
        self.hooks: list[str] = []
        self.value = 0
        self.refuse_activation = False

    def config_bytes(self) -> bytes:
        return bytes([1, 2, 3, 4])

    def _on_activate(self, resources: QueueResources) -> None:
        self.hooks.append("activate")
        if self.refuse_activation:
            raise ActivationError("refused")

    def _on_reset(self) -> None:
        self.hooks.append("reset")

    def _on_sleep(self) -> None:
        self.hooks.append("sleep")

    def _on_wake(self, resources: QueueResources) -> None:
        self.hooks.append("wake")

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        self.hooks.append(f"queue {index}")
        if index == 1:
            raise VirtqueueError("broken on purpose")
        echoed = []
        while (chain := queue.pop()) is not None:
            echoed.append((chain, chain.write(chain.read_all())))
        self._return_used(index, queue, echoed)

    def _snapshot_model(self) -> Any:
        return {"value": self.value}

    def _restore_model(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ValueError("not an object")
        self.value = expect_uint(state.get("value"))


def active_toy() -> tuple[Toy, DirectRig]:
    toy = Toy()
    rig = DirectRig(toy)
    rig.activate()
    return toy, rig


# -- identity and negotiation --------------------------------------------------------------


def test_identity() -> None:
    toy = Toy()
    assert toy.name == "virtio-entropy"
    assert toy.state is DeviceState.NEW
    assert toy.num_queues == 2
    assert toy.queue_max_sizes == (16, 16)
    assert toy.offered_features == COMMON_FEATURES | OWN_FEATURE
    assert toy.queues == [] and toy.mem is None


def test_ack_drops_bits_never_offered(caplog: pytest.LogCaptureFixture) -> None:
    toy = Toy()
    with caplog.at_level(logging.WARNING):
        toy.ack_features(Feature.VERSION_1.mask | OWN_FEATURE | 1 << 50)
    assert "never offered" in caplog.text
    assert toy.acked_features == Feature.VERSION_1.mask | OWN_FEATURE
    assert toy.has_feature(3) and not toy.has_feature(50)


def test_features_acceptable_needs_version_1_and_nothing_unoffered() -> None:
    toy = Toy()
    assert toy.features_acceptable(Feature.VERSION_1.mask)
    assert toy.features_acceptable(Feature.VERSION_1.mask | OWN_FEATURE)
    assert not toy.features_acceptable(OWN_FEATURE)  # no legacy interface
    assert not toy.features_acceptable(Feature.VERSION_1.mask | 1 << 50)


# -- configuration space --------------------------------------------------------------------


def test_read_config_zero_fills_past_the_end() -> None:
    toy = Toy()
    assert toy.read_config(0, 4) == bytes([1, 2, 3, 4])
    assert toy.read_config(2, 4) == bytes([3, 4, 0, 0])
    assert toy.read_config(100, 2) == bytes(2)
    assert toy.read_config(-1, 2) == bytes(2)


def test_config_writes_are_ignored_by_default(caplog: pytest.LogCaptureFixture) -> None:
    toy = Toy()
    with caplog.at_level(logging.INFO):
        toy.write_config(0, b"\xff")
    assert "ignored write" in caplog.text
    assert toy.read_config(0, 1) == b"\x01"


def test_config_changed_bumps_generation_and_signals_only_when_active() -> None:
    toy = Toy()
    toy.config_changed()
    assert toy.config_generation == 1
    toy, rig = active_toy()
    toy.config_changed()
    assert toy.config_generation == 1
    assert rig.interrupt.config_changes == 1
    toy._config_generation = 0xFFFF_FFFF
    toy.config_changed()
    assert toy.config_generation == 0  # a 32-bit register wraps


def test_a_config_change_while_asleep_is_signalled_once_on_wake() -> None:
    toy, rig = active_toy()
    resources = toy.sleep()
    assert resources is not None
    toy.config_changed()
    toy.config_changed()
    assert rig.interrupt.config_changes == 0  # asleep: nothing reaches the driver
    toy.wake(resources)
    assert rig.interrupt.config_changes == 1
    toy.sleep()
    toy.wake(resources)
    assert rig.interrupt.config_changes == 1  # told once, not again


def test_a_config_change_while_asleep_inactive_is_not_signalled() -> None:
    toy, rig = active_toy()
    toy.reset()
    toy.sleep()
    toy.config_changed()
    toy.wake()
    rig.activate()
    assert rig.interrupt.config_changes == 0  # the new driver reads the config anyway


# -- lifecycle --------------------------------------------------------------------------------


def test_activate_reset_activate() -> None:
    toy, rig = active_toy()
    assert toy.state is DeviceState.ACTIVE
    assert toy.mem is rig.mem and len(toy.queues) == 2
    acked = toy.acked_features
    assert acked
    with pytest.raises(LifecycleError):
        toy.activate(rig.mem, rig.interrupt, rig.device_queues)
    toy.reset()
    assert toy.state is DeviceState.INACTIVE
    assert toy.acked_features == 0 and toy.queues == []
    toy.reset()  # on an inactive device it only clears negotiation
    assert toy.hooks == ["activate", "reset"]
    toy.activate(rig.mem, rig.interrupt, rig.device_queues)
    assert toy.state is DeviceState.ACTIVE


def test_activation_checks_queue_count_and_the_model_may_refuse() -> None:
    toy = Toy()
    rig = DirectRig(toy)
    with pytest.raises(ActivationError, match="1 queues"):
        toy.activate(rig.mem, rig.interrupt, rig.device_queues[:1])
    toy.refuse_activation = True
    with pytest.raises(ActivationError, match="refused"):
        toy.activate(rig.mem, rig.interrupt, rig.device_queues)
    assert toy.state is DeviceState.NEW and toy.queues == []


def test_sleep_wake_hands_the_queues_back_and_forth() -> None:
    toy, rig = active_toy()
    resources = toy.sleep()
    assert resources is not None and resources.queues == rig.device_queues
    assert toy.state is DeviceState.ASLEEP and toy.queues == []
    for call in (toy.sleep, toy.reset, lambda: toy.ack_features(0)):
        with pytest.raises(LifecycleError):
            call()
    with pytest.raises(LifecycleError, match="needs its queues"):
        toy.wake()
    with pytest.raises(ActivationError):
        toy.wake(QueueResources(rig.mem, rig.interrupt, rig.device_queues[:1]))
    toy.wake(resources)
    assert toy.state is DeviceState.ACTIVE
    assert toy.hooks[-2:] == ["sleep", "wake"]
    with pytest.raises(LifecycleError):
        toy.wake(resources)


class ServesPosted(Toy):
    """A Toy that serves queue 0 whenever it becomes active."""

    def _serve_posted(self) -> None:
        self.hooks.append("serve posted")
        self.queue_notify(0)


def test_buffers_posted_while_not_active_are_served_once_active() -> None:
    toy = ServesPosted()
    rig = DirectRig(toy)
    rig.post(0, [b"early"], [5], "before DRIVER_OK")  # the notify is ignored
    rig.activate()
    assert toy.hooks == ["activate", "serve posted", "queue 0"]
    assert rig.used(0) == [("before DRIVER_OK", 5)]
    resources = toy.sleep()
    rig.post(0, [b"late"], [4], "while asleep")  # ignored too
    assert rig.used(0) == []
    toy.wake(resources)
    assert toy.hooks[-4:] == ["sleep", "wake", "serve posted", "queue 0"]
    assert rig.used(0) == [("while asleep", 4)]
    # Waking a device that was not active serves nothing.
    toy.reset()
    toy.wake(toy.sleep())
    assert toy.hooks[-1] == "reset"


def test_a_model_serves_nothing_on_activation_unless_it_says_so() -> None:
    toy = Toy()
    rig = DirectRig(toy)
    rig.post(0, [b"early"], [5], "before DRIVER_OK")
    rig.activate()
    assert toy.hooks == ["activate"]
    assert rig.used(0) == []


def test_sleep_of_an_inactive_device_wakes_inactive() -> None:
    toy = Toy()
    assert toy.sleep() is None
    toy.wake()
    assert toy.state is DeviceState.NEW
    assert "sleep" not in toy.hooks


# -- queue notifications -----------------------------------------------------------------------


def test_queue_notify_serves_only_an_active_device(caplog: pytest.LogCaptureFixture) -> None:
    toy = Toy()
    rig = DirectRig(toy)
    token = object()
    rig.post(0, [b"ping"], [4], token)  # notify ignored: not active yet
    assert toy.hooks == []
    rig.activate()
    toy.queue_notify(0)
    assert rig.used(0) == [(token, 4)]
    assert rig.interrupt.used == [0]
    # Nothing served, nothing returned: no interrupt.
    toy.queue_notify(0)
    assert rig.interrupt.used == [0]
    with caplog.at_level(logging.WARNING):
        toy.queue_notify(7)
    assert "nonexistent queue 7" in caplog.text


def test_repeated_driver_mistakes_log_one_line_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """A driver can repeat a mistake at will; the log gets one line per kind per interval."""
    toy = Toy()
    with caplog.at_level(logging.INFO, logger="pyvirtio.device"):
        for _ in range(1000):
            toy.queue_notify(0)  # not active yet
            toy.write_config(0, b"\xff")
            toy.ack_features(Feature.VERSION_1.mask | 1 << 50)
        rig = DirectRig(toy)
        rig.activate()
        for index in range(1000):
            toy.queue_notify(2 + index)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4, messages
    assert [m.split(":", 1)[0] for m in messages] == [toy.name] * 4
    assert "while new" in messages[0]
    assert "ignored write" in messages[1]
    assert "never offered" in messages[2]
    assert "nonexistent queue 2" in messages[3]


def test_a_broken_queue_needs_reset_and_tells_the_transport() -> None:
    toy, _ = active_toy()
    reasons: list[str] = []
    toy.on_needs_reset = reasons.append
    toy.queue_notify(1)
    assert toy.needs_reset
    assert reasons == ["queue 1: broken on purpose"]
    calls = len(toy.hooks)
    toy.queue_notify(0)  # nothing is served until reset
    assert len(toy.hooks) == calls
    toy.reset()
    assert not toy.needs_reset


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_only_while_asleep_and_canonical() -> None:
    toy, _ = active_toy()
    with pytest.raises(LifecycleError):
        toy.snapshot()
    toy.value = 42
    resources = toy.sleep()
    snap = toy.snapshot()
    assert snap == toy.snapshot()
    doc = json.loads(snap)
    assert doc["state"] == "active" and doc["model"] == {"value": 42}
    assert snap == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    other = Toy()
    other.sleep()
    other.restore(snap)
    assert other.value == 42
    assert other.acked_features == toy.acked_features
    assert other.snapshot() == snap
    other.wake(resources)  # restored as active: wakes on the queues
    assert other.state is DeviceState.ACTIVE


def test_restore_refuses_what_is_not_a_snapshot_of_this_device() -> None:
    toy = Toy()
    toy.sleep()
    good = json.loads(toy.snapshot())
    with pytest.raises(LifecycleError):
        Toy().restore(toy.snapshot())  # not asleep
    bad = [
        b"not json",
        json.dumps({**good, "device_id": 2}).encode(),
        json.dumps({**good, "state": "asleep"}).encode(),
        json.dumps({**good, "state": "dancing"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "model"}).encode(),
    ]
    for data in bad:
        with pytest.raises(LifecycleError):
            toy.restore(data)
    with pytest.raises(ValueError):
        toy.restore(json.dumps({**good, "model": {"value": -1}}).encode())
    toy.restore(json.dumps({**good, "acked_features": -1}).encode())
    assert toy.acked_features == toy.offered_features  # masked to the offer


def test_expect_helpers() -> None:
    assert expect_uint(3) == 3
    assert expect_bool(False) is False
    assert expect_str("x") == "x"
    for call, value in ((expect_uint, True), (expect_uint, -1), (expect_uint, "1")):
        with pytest.raises(ValueError):
            call(value)
    with pytest.raises(ValueError):
        expect_bool(1)
    with pytest.raises(ValueError):
        expect_str(b"x")
    state = {"a": 1}
    assert expect_object(state, "toy state") is state
    for value in ([], None, "{}"):
        with pytest.raises(ValueError, match="toy state must be an object"):
            expect_object(value, "toy state")


def test_recording_interrupt_is_a_device_interrupt() -> None:
    from pyvirtio.irq import DeviceInterrupt

    assert isinstance(RecordingInterrupt(), DeviceInterrupt)
