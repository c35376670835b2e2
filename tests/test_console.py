"""virtio-console: host streams, backpressure, resize, emergency write, multiport, e2e."""

from __future__ import annotations

import json
import logging
import random
import struct
from typing import Any

import pytest

from helpers.queues import RING_MODES, DirectRig
from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import DeviceState
from pyvirtio.devices.console import (
    CONTROL_HEADER,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    F_EMERG_WRITE,
    F_MULTIPORT,
    F_SIZE,
    Console,
    ControlEvent,
    receiveq_index,
    transmitq_index,
)
from pyvirtio.driver.console import ConsoleDriver, ConsoleDriverError
from pyvirtio.irq import INT_CONFIG
from pyvirtio.testing import MMIO_BASE, MmioTestRig, device_conformance
from pyvirtio.transport.mmio import CONFIG_OFFSET, Reg

RX0, TX0 = receiveq_index(0), transmitq_index(0)


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def receive(rig: DirectRig, index: int, ranges: dict[Any, list[tuple[int, int]]]) -> bytes:
    """Collect used receive buffers of queue ``index`` in used order."""
    out = bytearray()
    for token, written in rig.used(index):
        out += rig.read(ranges.pop(token), written)
    return bytes(out)


# -- identity and configuration ---------------------------------------------------------


def test_single_port_identity_and_config() -> None:
    dev = Console(cols=132, rows=43)
    assert dev.device_id is DeviceId.CONSOLE
    assert dev.num_queues == 2
    offered = dev.offered_features
    assert offered & 1 << F_SIZE and offered & 1 << F_EMERG_WRITE
    assert not offered & 1 << F_MULTIPORT
    assert offered & Feature.VERSION_1.mask
    assert dev.config_bytes() == struct.pack("<HHII", 132, 43, 1, 0)
    assert dev.read_config(0, 2) == struct.pack("<H", 132)
    assert dev.read_config(2, 2) == struct.pack("<H", 43)


def test_multiport_identity() -> None:
    dev = Console(ports=3)
    assert dev.offered_features & 1 << F_MULTIPORT
    assert dev.num_queues == 8
    assert dev.read_config(4, 4) == struct.pack("<I", 3)
    assert [receiveq_index(p) for p in range(3)] == [0, 4, 6]
    assert [transmitq_index(p) for p in range(3)] == [1, 5, 7]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ports": 0},
        {"cols": 70000},
        {"rows": -1},
        {"input_limit": 0},
        {"ports": 1, "names": ["a", "b"]},
    ],
)
def test_bad_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Console(**kwargs)  # type: ignore[arg-type]


# -- host to guest --------------------------------------------------------------------


@pytest.mark.parametrize("mode", RING_MODES)
def test_input_fed_before_buffers_is_delivered_later_without_loss(mode: dict[str, bool]) -> None:
    dev = Console()
    rig = DirectRig(dev, **mode)
    rig.activate()
    data = pattern(100 * 1024)
    assert dev.feed_input(data) == len(data)  # no buffers yet: all of it waits
    assert dev.pending_input() == len(data)
    ranges: dict[object, list[tuple[int, int]]] = {}
    got = bytearray()
    token = 0
    rng = random.Random(7)
    while len(got) < len(data):
        # The guest posts a few small buffers at a time, slowly.
        for _ in range(rng.randint(1, 3)):
            ranges[token] = rig.post(RX0, writable=[rng.choice([1, 17, 64, 100])], token=token)
            token += 1
        got += receive(rig, RX0, ranges)
    assert bytes(got) == data
    assert dev.pending_input() == 0
    assert len(ranges) < 3  # buffers posted after the last byte stay with the device


@pytest.mark.parametrize("mode", RING_MODES)
def test_input_interleaved_with_buffers(mode: dict[str, bool]) -> None:
    dev = Console()
    rig = DirectRig(dev, **mode)
    rig.activate()
    data = pattern(20_000, seed=3)
    ranges: dict[object, list[tuple[int, int]]] = {}
    got = bytearray()
    fed = 0
    token = 0
    rng = random.Random(11)
    while len(got) < len(data):
        if fed < len(data) and rng.random() < 0.5:
            n = rng.randint(1, 700)
            fed += dev.feed_input(data[fed : fed + n])
        elif len(ranges) < 12:
            ranges[token] = rig.post(RX0, writable=[rng.randint(1, 300), 50], token=token)
            token += 1
        got += receive(rig, RX0, ranges)
    assert bytes(got) == data


def test_input_goes_straight_into_available_buffers() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    ranges = {0: rig.post(RX0, writable=[16], token=0)}
    assert rig.used(RX0) == []  # a buffer with nothing to put in it stays with the device
    assert dev.feed_input(b"hello") == 5
    assert receive(rig, RX0, ranges) == b"hello"
    assert rig.interrupt.used == [RX0]


def test_input_limit_gives_backpressure() -> None:
    dev = Console(input_limit=1000)
    rig = DirectRig(dev)
    rig.activate()
    data = pattern(2500)
    assert dev.feed_input(data) == 1000
    assert dev.input_room() == 0
    assert dev.feed_input(data[1000:]) == 0
    ranges = {0: rig.post(RX0, writable=[300], token=0)}
    got = receive(rig, RX0, ranges)
    assert dev.input_room() == 300
    assert dev.feed_input(data[1000:]) == 300
    for token in range(1, 10):
        ranges[token] = rig.post(RX0, writable=[256], token=token)
    got += receive(rig, RX0, ranges)
    assert got == data[:1300]


def test_readable_buffer_in_receiveq_loses_no_input(caplog: pytest.LogCaptureFixture) -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    dev.feed_input(b"abc")
    with caplog.at_level(logging.WARNING, logger="pyvirtio.devices.console"):
        rig.post(RX0, readable=[b"oops"], token="bad")
    assert rig.used(RX0) == [("bad", 0)]
    assert "receiveq" in caplog.text
    ranges = {"good": rig.post(RX0, writable=[8], token="good")}
    assert receive(rig, RX0, ranges) == b"abc"


def test_input_fed_while_asleep_touches_no_queue() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    ranges = {0: rig.post(RX0, writable=[64], token=0)}
    resources = dev.sleep()
    assert dev.feed_input(b"while asleep") == 12
    assert rig.used(RX0) == []
    assert rig.interrupt.used == []
    dev.wake(resources)
    assert receive(rig, RX0, ranges) == b"while asleep"


def test_input_fed_before_activation_and_across_reset() -> None:
    dev = Console()
    assert dev.feed_input(b"early ") == 6
    rig = DirectRig(dev)
    ranges = {0: rig.post(RX0, writable=[64], token=0)}  # notify ignored: not active
    rig.activate()
    assert receive(rig, RX0, ranges) == b"early "
    dev.feed_input(b"kept over reset")
    dev.reset()
    assert dev.state is DeviceState.INACTIVE
    assert dev.pending_input() == 15
    rig2 = DirectRig(dev)
    rig2.activate()
    ranges2 = {0: rig2.post(RX0, writable=[64], token=0)}
    assert receive(rig2, RX0, ranges2) == b"kept over reset"


def test_bad_port_is_a_value_error() -> None:
    dev = Console()
    with pytest.raises(ValueError):
        dev.feed_input(b"x", port=1)
    with pytest.raises(ValueError):
        dev.take_output(port=-1)


# -- guest to host ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RING_MODES)
def test_output_collected_in_order(mode: dict[str, bool]) -> None:
    dev = Console()
    rig = DirectRig(dev, **mode)
    rig.activate()
    chunks = [pattern(n, seed=n) for n in (1, 10, 300, 4096, 7)]
    for i, chunk in enumerate(chunks):
        parts = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]] if len(chunk) > 1 else [chunk]
        rig.post(TX0, readable=parts, token=i)
    assert rig.used(TX0) == [(i, 0) for i in range(len(chunks))]
    assert dev.take_output() == b"".join(chunks)
    assert dev.take_output() == b""


def test_output_callback_receives_port_and_bytes() -> None:
    seen: list[tuple[int, bytes]] = []
    dev = Console(on_output=lambda port, data: seen.append((port, data)))
    rig = DirectRig(dev)
    rig.activate()
    rig.post(TX0, readable=[b"one"], token=0)
    rig.post(TX0, readable=[b"two"], token=1)
    assert seen == [(0, b"one"), (0, b"two")]
    assert dev.take_output() == b""


def test_output_limit_stalls_transmitq_until_taken() -> None:
    dev = Console(output_limit=100)
    rig = DirectRig(dev)
    rig.activate()
    for i in range(5):
        rig.post(TX0, readable=[bytes([65 + i]) * 60], token=i)
    # Two buffers fit under the limit; the rest wait in the ring.
    assert [tok for tok, _ in rig.used(TX0)] == [0, 1]
    first = dev.take_output()
    assert first == b"A" * 60 + b"B" * 60
    assert [tok for tok, _ in rig.used(TX0)] == [2, 3]
    second = dev.take_output()
    assert [tok for tok, _ in rig.used(TX0)] == [4]
    assert first + second + dev.take_output() == b"".join(bytes([65 + i]) * 60 for i in range(5))


def test_writable_descriptors_in_transmitq_are_ignored() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    ranges = rig.post(TX0, readable=[b"data"], writable=[8], token=0)
    assert rig.used(TX0) == [(0, 0)]
    assert rig.read(ranges, 8) == bytes(8)
    assert dev.take_output() == b"data"


def test_output_posted_while_asleep_is_collected_on_wake() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    resources = dev.sleep()
    rig.post(TX0, readable=[b"zzz"], token=0)
    assert rig.used(TX0) == []
    dev.wake(resources)
    assert rig.used(TX0) == [(0, 0)]
    assert dev.take_output() == b"zzz"


# -- configuration changes and emergency write ------------------------------------------------


def test_resize_updates_config_and_notifies() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    generation = dev.config_generation
    dev.resize(100, 40)
    assert dev.read_config(0, 4) == struct.pack("<HH", 100, 40)
    assert dev.config_generation == generation + 1
    assert rig.interrupt.config_changes == 1
    dev.resize(100, 40)  # no change, no notification
    assert rig.interrupt.config_changes == 1
    with pytest.raises(ValueError):
        dev.resize(1 << 16, 1)


def test_resize_while_asleep_is_notified_on_wake() -> None:
    dev = Console()
    rig = DirectRig(dev)
    rig.activate()
    resources = dev.sleep()
    dev.resize(81, 26)
    assert rig.interrupt.config_changes == 0
    dev.wake(resources)
    assert rig.interrupt.config_changes == 1


def test_emergency_write_goes_to_output() -> None:
    dev = Console()
    dev.write_config(8, b"H\0\0\0")  # before anything is negotiated
    dev.write_config(8, b"i")
    dev.write_config(0, b"\x01\x00")  # cols are read-only
    assert dev.take_output() == b"Hi"
    assert dev.cols == 80


def test_emergency_write_dropped_when_output_full() -> None:
    dev = Console(output_limit=2)
    for byte in b"abcd":
        dev.write_config(8, bytes([byte, 0, 0, 0]))
    assert dev.take_output() == b"ab"
    assert dev.emergency_dropped == 2


# -- snapshot -------------------------------------------------------------------------------


def test_snapshot_keeps_pending_input_and_unread_output() -> None:
    dev = Console(cols=90, rows=30)
    rig = DirectRig(dev)
    rig.activate()
    rig.post(TX0, readable=[b"unread output \xff"], token=0)
    dev.feed_input(b"pending input \x00")
    dev.sleep()
    blob = dev.snapshot()
    model = json.loads(blob)["model"]
    assert model["cols"] == 90 and len(model["ports"]) == 1

    other = Console()
    other.sleep()
    other.restore(blob)
    assert other.snapshot() == blob
    assert other.pending_input() == 15
    assert other.take_output() == b"unread output \xff"
    assert (other.cols, other.rows) == (90, 30)

    multi = Console(ports=2)
    multi.sleep()
    with pytest.raises(ValueError):
        multi.restore(blob)  # port count differs


@pytest.mark.parametrize(
    "patch",
    [
        lambda m: m.update(cols=-1),
        lambda m: m["ports"][0].update(input="not base64!"),
        lambda m: m["ports"][0].update(ready="yes"),
        lambda m: m.pop("control_pending"),
        lambda m: m.update(ports=None),
    ],
)
def test_restore_rejects_malformed_model(patch: object) -> None:
    dev = Console()
    dev.sleep()
    doc = json.loads(dev.snapshot())
    patch(doc["model"])  # type: ignore[operator]
    with pytest.raises(ValueError):
        dev.restore(json.dumps(doc).encode())


# -- multiport, driven by hand ----------------------------------------------------------------


def control(port: int, event: int, value: int = 0) -> bytes:
    return CONTROL_HEADER.pack(port, event, value)


class MultiportGuest:
    """Plays a multiport driver on a DirectRig, checking each control message."""

    def __init__(self, dev: Console, **mode: bool) -> None:
        self.rig = DirectRig(dev, **mode)
        self.rig.activate()
        self.ctrl_ranges: dict[object, list[tuple[int, int]]] = {}
        self.token = 0
        for _ in range(8):
            self.post_control_buffer()

    def post_control_buffer(self) -> None:
        self.token += 1
        self.ctrl_ranges[self.token] = self.rig.post(
            CONTROL_RECEIVEQ, writable=[64], token=self.token
        )

    def send(self, port: int, event: int, value: int = 0) -> None:
        self.rig.post(CONTROL_TRANSMITQ, readable=[control(port, event, value)])
        assert [w for _, w in self.rig.used(CONTROL_TRANSMITQ)] == [0]

    def messages(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for token, written in self.rig.used(CONTROL_RECEIVEQ):
            raw = self.rig.read(self.ctrl_ranges.pop(token), written)
            out.append((*CONTROL_HEADER.unpack_from(raw), raw[CONTROL_HEADER.size :]))
            self.post_control_buffer()
        return out


def test_multiport_handshake() -> None:
    dev = Console(ports=3, names=[None, "org.example.agent"])
    guest = MultiportGuest(dev)
    assert guest.messages() == []
    guest.send(0xFFFF_FFFF, ControlEvent.DEVICE_READY, 1)
    assert guest.messages() == [(p, ControlEvent.DEVICE_ADD, 0, b"") for p in range(3)]
    guest.send(0, ControlEvent.PORT_READY, 1)
    assert guest.messages() == [
        (0, ControlEvent.CONSOLE_PORT, 1, b""),
        (0, ControlEvent.PORT_OPEN, 1, b""),
    ]
    guest.send(1, ControlEvent.PORT_READY, 1)
    assert guest.messages() == [
        (1, ControlEvent.PORT_NAME, 0, b"org.example.agent"),
        (1, ControlEvent.PORT_OPEN, 1, b""),
    ]
    guest.send(2, ControlEvent.PORT_READY, 1)
    assert guest.messages() == [(2, ControlEvent.PORT_OPEN, 1, b"")]
    guest.send(2, ControlEvent.PORT_READY, 1)  # repeated: no second announcement
    guest.send(0xFFFF_FFFF, ControlEvent.DEVICE_READY, 1)  # repeated: ignored
    guest.send(9, ControlEvent.PORT_OPEN, 1)  # no such port: ignored
    assert guest.messages() == []
    assert not dev.needs_reset


def test_multiport_input_waits_until_the_guest_opens_the_port() -> None:
    dev = Console(ports=2)
    guest = MultiportGuest(dev)
    rig = guest.rig
    rx1 = receiveq_index(1)
    ranges = {0: rig.post(rx1, writable=[64], token=0)}
    dev.feed_input(b"for port one", port=1)
    assert rig.used(rx1) == []  # Linux would discard data on an unopened port
    guest.send(1, ControlEvent.PORT_OPEN, 1)
    assert receive(rig, rx1, ranges) == b"for port one"
    # Output on port 1 is kept apart from port 0's.
    rig.post(transmitq_index(1), readable=[b"from port one"])
    rig.post(TX0, readable=[b"from console"])
    assert dev.take_output(1) == b"from port one"
    assert dev.take_output(0) == b"from console"


def test_multiport_resize_sends_resize_message() -> None:
    dev = Console(ports=2)
    guest = MultiportGuest(dev)
    guest.send(0, ControlEvent.DEVICE_READY, 1)
    guest.messages()
    dev.resize(120, 50)
    assert guest.messages() == [(0, ControlEvent.RESIZE, 0, struct.pack("<HH", 120, 50))]
    assert guest.rig.interrupt.config_changes == 1


def test_multiport_control_backlog_is_bounded_and_coalesces_resizes() -> None:
    dev = Console(ports=2)
    rig = DirectRig(dev, size=256)
    rig.activate()
    rig.post(CONTROL_TRANSMITQ, readable=[control(0, ControlEvent.DEVICE_READY, 1)])
    for size in range(10):
        dev.resize(100 + size, 30)
    model = _model(dev)
    # Two DEVICE_ADDs and only the latest RESIZE wait for buffers.
    assert len(model["control_pending"]) == 3
    # A driver that floods PORT_READY/PORT_OPEN without posting buffers:
    for _ in range(200):
        rig.post(CONTROL_TRANSMITQ, readable=[control(1, ControlEvent.PORT_OPEN, 1)])
    assert len(_model(dev)["control_pending"]) <= 256


def test_multiport_short_control_message_and_bad_buffers() -> None:
    dev = Console(ports=2)
    guest = MultiportGuest(dev)
    guest.rig.post(CONTROL_TRANSMITQ, readable=[b"\x00\x01"])
    assert [w for _, w in guest.rig.used(CONTROL_TRANSMITQ)] == [0]
    # A control receive buffer too small for the message.
    small = DirectRig(Console(ports=2))
    small.activate()
    small.post(CONTROL_RECEIVEQ, writable=[4], token="tiny")
    small.post(CONTROL_TRANSMITQ, readable=[control(0, ControlEvent.DEVICE_READY, 1)])
    assert small.used(CONTROL_RECEIVEQ) == [("tiny", 0)]
    assert not small.device.needs_reset


def test_multiport_without_negotiating_it_is_a_single_port_console() -> None:
    dev = Console(ports=2)
    rig = DirectRig(dev, features=dev.offered_features & ~(1 << F_MULTIPORT))
    rig.activate()
    assert not dev.multiport
    ranges = {0: rig.post(RX0, writable=[8], token=0)}
    dev.feed_input(b"plain")
    assert receive(rig, RX0, ranges) == b"plain"
    rig.post(CONTROL_TRANSMITQ, readable=[control(0, ControlEvent.DEVICE_READY, 1)])
    assert rig.used(CONTROL_TRANSMITQ) == []  # control queues are not in use


def _model(dev: Console) -> dict[str, Any]:
    """The device's model state, via a sleep/snapshot/wake round."""
    resources = dev.sleep()
    model: dict[str, Any] = json.loads(dev.snapshot())["model"]
    dev.wake(resources)
    return model


# -- end to end: ConsoleDriver over virtio-MMIO ----------------------------------------------


def _offer_without_packed(dev: Console) -> int:
    return dev.offered_features & ~Feature.RING_PACKED.mask


@pytest.mark.parametrize("packed_ring", [False, True], ids=["split", "packed"])
def test_e2e_single_port(packed_ring: bool) -> None:
    dev = Console(cols=100, rows=30)
    dev.feed_input(b"typed before boot\n")
    rig = MmioTestRig(dev)
    features = None if packed_ring else _offer_without_packed(dev)
    driver = ConsoleDriver(rig.driver, features=features, rx_buffers=4, buffer_size=64)
    assert rig.driver.has_feature(Feature.RING_PACKED) is packed_ring
    assert not driver.multiport and driver.ports == 1
    assert driver.size() == (100, 30)
    assert driver.read() == b"typed before boot\n"
    assert driver.read() == b""

    data = pattern(50_000, seed=5)
    pos = 0
    got = bytearray()
    while len(got) < len(data):
        pos += dev.feed_input(data[pos : pos + 3000])
        got += driver.read()
    assert bytes(got) == data

    message = pattern(10_000, seed=6)
    driver.write(message)
    driver.flush()
    assert dev.take_output() == message

    generation = rig.read_register(Reg.CONFIG_GENERATION)
    rig.controller.pulses.clear()
    dev.resize(120, 48)
    assert rig.read_register(Reg.CONFIG_GENERATION) == generation + 1
    assert rig.driver.interrupt_status() & INT_CONFIG
    assert rig.controller.pulses
    assert driver.size() == (120, 48)

    driver.emergency_write(ord("!"))
    assert dev.take_output() == b"!"


def test_e2e_read_with_timeout_returns_empty() -> None:
    rig = MmioTestRig(Console())
    driver = ConsoleDriver(rig.driver)
    assert driver.read(timeout=0.05) == b""


def test_e2e_output_backpressure_blocks_the_writer_until_taken() -> None:
    dev = Console(output_limit=256)
    rig = MmioTestRig(dev)
    driver = ConsoleDriver(rig.driver, buffer_size=128, timeout=0.2, queue_size=4)
    driver.write(b"a" * 512)  # 4 buffers: 2 taken, 2 wait in the ring
    driver.write(b"b" * 256)  # the ring is full now
    with pytest.raises(ConsoleDriverError):
        driver.write(b"c" * 128)  # and the host reads nothing
    out = bytearray()
    while len(out) < 768:
        out += dev.take_output()  # each take lets the device consume more
    driver.flush()
    assert bytes(out) == b"a" * 512 + b"b" * 256


@pytest.mark.parametrize("packed_ring", [False, True], ids=["split", "packed"])
def test_e2e_multiport(packed_ring: bool) -> None:
    dev = Console(ports=3, names=[None, "org.example.agent", None])
    rig = MmioTestRig(dev)
    features = None if packed_ring else _offer_without_packed(dev)
    driver = ConsoleDriver(rig.driver, features=features, rx_buffers=4, buffer_size=256)
    assert driver.multiport and driver.ports == 3
    assert driver.is_console(0) and not driver.is_console(1)
    assert driver.port_name(1) == "org.example.agent"
    assert driver.port_name(2) is None
    assert all(driver.host_connected(p) for p in range(3))

    dev.feed_input(b"console input")
    assert driver.read() == b"console input"

    dev.feed_input(b"agent input", port=1)
    assert driver.read(port=1) == b""  # not opened yet: the device holds it
    driver.open_port(1)
    assert driver.read(port=1) == b"agent input"

    driver.write(b"to agent", port=1)
    driver.write(b"to console")
    driver.write(b"to two", port=2)
    assert dev.take_output(1) == b"to agent"
    assert dev.take_output(0) == b"to console"
    assert dev.take_output(2) == b"to two"

    dev.resize(200, 60)
    assert driver.size() == (200, 60)


def test_e2e_close_frees_driver_memory() -> None:
    dev = Console(ports=2)
    rig = MmioTestRig(dev)
    free_before = rig.allocator.free_bytes
    driver = ConsoleDriver(rig.driver)
    driver.write(b"x" * 10_000)
    dev.feed_input(b"y" * 10_000)
    driver.close()
    assert rig.allocator.free_bytes == free_before
    assert dev.state is DeviceState.INACTIVE


def test_e2e_multiport_declined() -> None:
    dev = Console(ports=2)
    rig = MmioTestRig(dev)
    driver = ConsoleDriver(rig.driver, multiport=False)
    assert not driver.multiport and driver.ports == 1
    dev.feed_input(b"x")
    assert driver.read() == b"x"


def test_e2e_emergency_write_on_unconfigured_device() -> None:
    dev = Console()
    rig = MmioTestRig(dev)
    rig.bus.write(MMIO_BASE + CONFIG_OFFSET + 8, 4, ord("E"))
    assert dev.take_output() == b"E"
    assert dev.state is DeviceState.NEW


def test_e2e_snapshot_restore_keeps_streams() -> None:
    dev = Console()
    rig = MmioTestRig(dev)
    driver = ConsoleDriver(rig.driver, rx_buffers=1, buffer_size=8)
    dev.feed_input(b"0123456789abcdef")  # 8 bytes reach the guest, 8 wait
    driver.write(b"unread")
    rig.transport.sleep()
    snap = rig.transport.snapshot()
    rig.transport.wake()

    fresh_dev = Console()
    fresh = MmioTestRig(fresh_dev, rig.mem)
    fresh.transport.sleep()
    fresh.transport.restore(snap)
    fresh.transport.wake()
    assert fresh_dev.take_output() == b"unread"
    assert fresh_dev.pending_input() == 8


# -- the conformance kit ---------------------------------------------------------------------


def _feed_and_resize(device: object) -> None:
    # Runs while asleep: input is buffered without touching the queues.
    assert isinstance(device, Console)
    assert device.feed_input(b"typed while paused") == 18
    device.resize(99, 33)


TestConsoleConformance = device_conformance(Console, modify=_feed_and_resize)
TestMultiportConsoleConformance = device_conformance(
    lambda: Console(ports=3, names=["console", "agent"]), modify=_feed_and_resize
)
