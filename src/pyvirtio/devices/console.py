"""virtio-console (device-types/console), sans-IO.

The device connects each port to a pair of host byte streams without doing
any I/O itself:

* host to guest: :meth:`Console.feed_input` appends to a bounded per-port
  buffer and returns how many bytes it accepted (so a host can apply
  backpressure); the bytes go into the port's receiveq buffers as soon as
  the driver has posted some, now or on its next notification.  Nothing
  accepted is ever dropped: input waits in the device while the guest has no
  buffers, while the device is asleep, inactive or not yet activated.
* guest to host: what the driver places on a transmitq is collected per port
  for :meth:`Console.take_output`, or handed to ``on_output`` when one is
  set.  Collected output is bounded too: while a port's unread output is at
  its limit the device leaves that transmitq alone, so the guest waits
  instead of the host losing bytes; :meth:`Console.take_output` resumes it.

Features offered (device-types/console: Feature bits): VIRTIO_CONSOLE_F_SIZE
(cols/rows in config space, changed with :meth:`Console.resize`),
VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to ``emerg_wr`` goes to port 0's
output, even before the driver has set anything up: device-types/console:
Device Requirements: Device Initialization), and VIRTIO_CONSOLE_F_MULTIPORT
when ``ports > 1``.

With MULTIPORT negotiated the control queues carry the handshake
(device-types/console: Multiport Device Operation): the driver's
DEVICE_READY makes the device announce every port with DEVICE_ADD; each
PORT_READY is answered with CONSOLE_PORT (port 0 is the console), PORT_NAME
(for named ports) and PORT_OPEN 1 (the host side is always connected).  A
port receives input only once the guest has opened it (the driver's
PORT_OPEN 1), because Linux discards data that arrives on a port no process
has open.  :meth:`Console.resize` also sends a RESIZE message for port 0,
laid out as the spec says (cols then rows; Linux before commit 5326ab737a47
read them the other way round).  Ports are fixed at construction: there is
no hot-plug (DEVICE_REMOVE is never sent).

Thread safety: none; the host serialises calls into the device, as for every
pyvirtio device model.
"""

from __future__ import annotations

import base64
import enum
import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.constants import DeviceId
from pyvirtio.device import (
    COMMON_FEATURES,
    DeviceState,
    VirtioDevice,
    expect_bool,
    expect_uint,
)
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue

__all__ = [
    "CONFIG_LAYOUT",
    "CONTROL_HEADER",
    "CONTROL_RECEIVEQ",
    "CONTROL_TRANSMITQ",
    "DEFAULT_INPUT_LIMIT",
    "DEFAULT_OUTPUT_LIMIT",
    "F_EMERG_WRITE",
    "F_MULTIPORT",
    "F_SIZE",
    "Console",
    "ControlEvent",
    "receiveq_index",
    "transmitq_index",
]

log = logging.getLogger(__name__)

#: Feature bit numbers (device-types/console: Feature bits).
F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

#: ``struct virtio_console_config``: cols, rows, max_nr_ports, emerg_wr
#: (device-types/console: Device configuration layout).
CONFIG_LAYOUT = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

#: ``struct virtio_console_control``: id, event, value.
CONTROL_HEADER = struct.Struct("<IHH")
#: ``struct virtio_console_resize``: cols, rows.
RESIZE_PAYLOAD = struct.Struct("<HH")

#: Queue indexes of the control queues (device-types/console: Virtqueues).
CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3

DEFAULT_INPUT_LIMIT = 1 << 20
DEFAULT_OUTPUT_LIMIT = 1 << 20
DEFAULT_QUEUE_SIZE = 256
#: Longest control message the device reads from the driver; real ones are 8 bytes.
MAX_CONTROL_MESSAGE = 4096
#: While this many control messages wait for control receiveq buffers the
#: device stops reading the control transmitq, so a driver that never posts
#: buffers cannot make it queue replies without bound.
CONTROL_BACKLOG_LIMIT = 256


class ControlEvent(enum.IntEnum):
    """``event`` values of control messages (device-types/console: Multiport Device Operation).

    The spec calls event 1 DEVICE_ADD; Linux calls it PORT_ADD.
    """

    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


def receiveq_index(port: int) -> int:
    """Queue index of port ``port``'s receiveq: 0 for port 0, then 4, 6, ..."""
    return 0 if port == 0 else 2 + 2 * port


def transmitq_index(port: int) -> int:
    """Queue index of port ``port``'s transmitq: 1 for port 0, then 5, 7, ..."""
    return receiveq_index(port) + 1


def control_message(port: int, event: int, value: int = 0, payload: bytes = b"") -> bytes:
    """Encode one control message."""
    return CONTROL_HEADER.pack(port, event, value) + payload


@dataclass
class _Port:
    """Per-port state: the two host streams and the multiport handshake."""

    name: str | None
    input: bytearray = field(default_factory=bytearray)
    output: bytearray = field(default_factory=bytearray)
    #: The driver answered DEVICE_ADD with PORT_READY 1.
    ready: bool = False
    #: The driver reported the port open (PORT_OPEN 1).
    guest_open: bool = False
    #: The transmitq was left alone because ``output`` was full.
    tx_stalled: bool = False

    def snapshot(self) -> dict[str, Any]:
        """The port's streams (base64) and handshake state; the name is configuration."""
        return {
            "input": _b64(self.input),
            "output": _b64(self.output),
            "ready": self.ready,
            "guest_open": self.guest_open,
            "tx_stalled": self.tx_stalled,
        }

    @classmethod
    def restored(cls, name: str | None, state: Any) -> _Port:
        """A port named ``name`` in the state :meth:`snapshot` saved (ValueError if malformed)."""
        return cls(
            name,
            bytearray(_unb64(state["input"])),
            bytearray(_unb64(state["output"])),
            ready=expect_bool(state["ready"]),
            guest_open=expect_bool(state["guest_open"]),
            tx_stalled=expect_bool(state["tx_stalled"]),
        )


class Console(VirtioDevice):
    """The console device with ``ports`` ports (``ports > 1`` offers MULTIPORT).

    ``names`` optionally tags ports (PORT_NAME, multiport only; ``None``
    entries are unnamed).  ``on_output(port, data)``, when set, receives the
    guest's output instead of the take_output buffer.  ``input_limit`` and
    ``output_limit`` bound the per-port host-to-guest and guest-to-host
    buffers.
    """

    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        ports: int = 1,
        cols: int = 80,
        rows: int = 25,
        *,
        names: Sequence[str | None] | None = None,
        on_output: Callable[[int, bytes], None] | None = None,
        input_limit: int = DEFAULT_INPUT_LIMIT,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if ports < 1:
            raise ValueError(f"a console has at least one port, not {ports}")
        if input_limit <= 0 or output_limit <= 0:
            raise ValueError("input_limit and output_limit must be positive")
        names = list(names) if names is not None else []
        if len(names) > ports:
            raise ValueError(f"{len(names)} names for {ports} ports")
        features = COMMON_FEATURES | 1 << F_SIZE | 1 << F_EMERG_WRITE
        num_queues = 2
        if ports > 1:
            features |= 1 << F_MULTIPORT
            num_queues = 2 * ports + 2
        super().__init__(features, (queue_size,) * num_queues)
        self._check_size(cols, rows)
        self.ports = ports
        self.cols = cols
        self.rows = rows
        self.on_output = on_output
        self.input_limit = input_limit
        self.output_limit = output_limit
        self._ports = [_Port(names[p] if p < len(names) else None) for p in range(ports)]
        #: Control messages waiting for control receiveq buffers.
        self._control_pending: deque[bytes] = deque()
        self._driver_ready = False
        #: The control transmitq was left alone because too many replies wait.
        self._control_tx_stalled = False
        #: emerg_wr bytes dropped because port 0's output was full.
        self.emergency_dropped = 0
        self._warned: set[str] = set()

    @staticmethod
    def _check_size(cols: int, rows: int) -> None:
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows} does not fit in u16")

    @property
    def multiport(self) -> bool:
        """Whether the driver negotiated VIRTIO_CONSOLE_F_MULTIPORT."""
        return self.has_feature(F_MULTIPORT)

    # -- host side -------------------------------------------------------------------

    def feed_input(self, data: bytes | bytearray | memoryview, port: int = 0) -> int:
        """Queue bytes for the guest; returns how many were accepted (the rest is the caller's).

        Accepts up to the room left under ``input_limit``.  Delivers at once
        when the device is active and the guest has receive buffers; never
        touches the queues otherwise (asleep, inactive, not yet activated).
        """
        state = self._port(port)
        src = memoryview(data).cast("B")
        accepted = max(0, min(self.input_limit - len(state.input), len(src)))
        if accepted:
            state.input += src[:accepted]
            self._deliver_input(port)
        return accepted

    def pending_input(self, port: int = 0) -> int:
        """Bytes accepted by :meth:`feed_input` that the guest has not received yet."""
        return len(self._port(port).input)

    def input_room(self, port: int = 0) -> int:
        """How many bytes :meth:`feed_input` would accept now."""
        return self.input_limit - len(self._port(port).input)

    def take_output(self, port: int = 0) -> bytes:
        """Everything the guest wrote to ``port`` since the last call (b"" if nothing).

        Resumes a transmitq that was left alone because the buffer was full.
        """
        state = self._port(port)
        data = bytes(state.output)
        state.output.clear()
        if state.tx_stalled:
            state.tx_stalled = False
            self._kick(transmitq_index(port))
        return data

    def resize(self, cols: int, rows: int) -> None:
        """Change the console size and tell the driver.

        Updates the config fields and raises a configuration change
        notification (device-types/console: Device Operation, item 3); a
        multiport driver also gets a RESIZE control message for port 0, the
        console port.  A change made while asleep is notified on wake.
        """
        self._check_size(cols, rows)
        if (cols, rows) == (self.cols, self.rows):
            return
        self.cols, self.rows = cols, rows
        self.config_changed()
        if self.multiport and self._driver_ready:
            message = control_message(0, ControlEvent.RESIZE, 0, RESIZE_PAYLOAD.pack(cols, rows))
            # Only the latest size matters: replace a RESIZE still queued.
            self._control_pending = deque(m for m in self._control_pending if not _is_resize(m))
            self._queue_control(message)

    # -- configuration space ---------------------------------------------------------

    def config_bytes(self) -> bytes:
        """``struct virtio_console_config``; emerg_wr reads as 0."""
        return CONFIG_LAYOUT.pack(self.cols, self.rows, self.ports, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """A write covering emerg_wr's first byte outputs that byte on port 0.

        Allowed at any time, even with nothing negotiated (device-types/console:
        Device Requirements: Device Initialization); the other fields are
        read-only.
        """
        if offset <= EMERG_WR_OFFSET < offset + len(data):
            self._emit_emergency(data[EMERG_WR_OFFSET - offset])
        else:
            self._warn_once(
                f"config-write-{offset}",
                f"ignored write of {len(data)} bytes to read-only config offset {offset:#x}",
                logging.INFO,
            )

    def _emit_emergency(self, byte: int) -> None:
        if self.on_output is not None:
            self.on_output(0, bytes([byte]))
            return
        output = self._ports[0].output
        if len(output) >= self.output_limit:
            self.emergency_dropped += 1
            self._warn_once("emerg", "emergency write dropped: port 0 output is full")
            return
        output.append(byte)

    # -- lifecycle -----------------------------------------------------------------

    def _on_reset(self) -> None:
        # The host streams survive a reset (the host side never saw it); the
        # handshake and replies meant for the old driver do not.
        self._control_pending.clear()
        self._driver_ready = False
        self._control_tx_stalled = False
        for state in self._ports:
            state.ready = False
            state.guest_open = False
            state.tx_stalled = False

    def _serve_posted(self) -> None:
        # Input the host fed meanwhile waits too.
        for port in range(self.ports):
            self._kick(transmitq_index(port))
            self._deliver_input(port)
        self._kick(CONTROL_TRANSMITQ)
        self._deliver_control()

    def _kick(self, index: int) -> None:
        """Process queue ``index`` as if notified, when that queue is in use."""
        if self._queue_in_use(index):
            self.queue_notify(index)

    def _queue_in_use(self, index: int) -> bool:
        return (
            self.state is DeviceState.ACTIVE
            and not self.needs_reset
            and index < len(self.queues)
            and (index < 2 or self.multiport)
        )

    # -- queue processing ------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        if index >= 2 and not self.multiport:
            log.info("%s: notify of queue %d without MULTIPORT, ignored", self.name, index)
            return
        if index == CONTROL_RECEIVEQ:
            self._deliver_control()
        elif index == CONTROL_TRANSMITQ:
            self._process_control(queue)
        else:
            port = 0 if index < 2 else index // 2 - 1
            if index % 2 == 0:
                self._deliver_input(port)
            else:
                self._process_output(port, queue)

    def _deliver_input(self, port: int) -> None:
        """Move pending input into the port's receive buffers; one interrupt at the end."""
        state = self._ports[port]
        index = receiveq_index(port)
        if not state.input or not self._queue_in_use(index):
            return
        if self.multiport and not state.guest_open:
            return  # Linux would discard it; hold it until the port is opened
        queue = self.queues[index]
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while state.input and (chain := queue.pop()) is not None:
                if chain.readable:
                    self._warn_once(
                        f"rx{port}", f"device-readable buffer in receiveq of port {port}"
                    )
                    completions.append((chain, 0))
                    continue
                written = chain.write(memoryview(state.input)[: chain.writable_len])
                del state.input[:written]
                completions.append((chain, written))
        finally:
            self._return_used(index, queue, completions)

    def _process_output(self, port: int, queue: DeviceQueue) -> None:
        """Collect the port's transmit buffers, pausing while its output buffer is full."""
        state = self._ports[port]
        index = transmitq_index(port)
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while True:
                if self.on_output is None and len(state.output) >= self.output_limit:
                    state.tx_stalled = queue.has_available()
                    break
                chain = queue.pop()
                if chain is None:
                    break
                if chain.writable:
                    self._warn_once(
                        f"tx{port}", f"device-writable buffer in transmitq of port {port}"
                    )
                data = chain.read_all()
                completions.append((chain, 0))
                if not data:
                    continue
                if self.on_output is not None:
                    self.on_output(port, data)
                else:
                    state.output += data
        finally:
            self._return_used(index, queue, completions)

    # -- control queues ----------------------------------------------------------------

    def _queue_control(self, message: bytes) -> None:
        self._control_pending.append(message)
        self._deliver_control()

    def _deliver_control(self) -> None:
        """Move pending control messages into control receiveq buffers, one per buffer."""
        if not self._control_pending or not self._queue_in_use(CONTROL_RECEIVEQ):
            return
        queue = self.queues[CONTROL_RECEIVEQ]
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while self._control_pending and (chain := queue.pop()) is not None:
                message = self._control_pending[0]
                if chain.readable or chain.writable_len < len(message):
                    # A message must not be split over buffers; a driver that
                    # posts unusable ones loses the message rather than
                    # wedging the queue.
                    self._warn_once(
                        "ctrl-rx", "unusable control receiveq buffer; control message dropped"
                    )
                    self._control_pending.popleft()
                    completions.append((chain, 0))
                    continue
                completions.append((chain, chain.write(message)))
                self._control_pending.popleft()
        finally:
            self._return_used(CONTROL_RECEIVEQ, queue, completions)
        if len(self._control_pending) < CONTROL_BACKLOG_LIMIT:
            self._kick_control_tx_if_stalled()

    def _kick_control_tx_if_stalled(self) -> None:
        if self._control_tx_stalled:
            self._control_tx_stalled = False
            self._kick(CONTROL_TRANSMITQ)

    def _process_control(self, queue: DeviceQueue) -> None:
        """Handle driver control messages (device-types/console: Multiport Device Operation)."""
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while True:
                if len(self._control_pending) >= CONTROL_BACKLOG_LIMIT:
                    self._control_tx_stalled = queue.has_available()
                    break
                chain = queue.pop()
                if chain is None:
                    break
                completions.append((chain, 0))
                raw = chain.read(0, MAX_CONTROL_MESSAGE)
                if len(raw) < CONTROL_HEADER.size:
                    self._warn_once("ctrl-short", f"short control message ({len(raw)} bytes)")
                    continue
                self._handle_control(*CONTROL_HEADER.unpack_from(raw))
        finally:
            self._return_used(CONTROL_TRANSMITQ, queue, completions)
        self._deliver_control()

    def _handle_control(self, port: int, event: int, value: int) -> None:
        if event == ControlEvent.DEVICE_READY:
            if value != 1:
                log.warning("%s: driver reports it failed to initialise", self.name)
            elif self._driver_ready:
                log.info("%s: repeated DEVICE_READY ignored", self.name)
            else:
                self._driver_ready = True
                for p in range(self.ports):
                    self._control_pending.append(control_message(p, ControlEvent.DEVICE_ADD))
            return
        if not 0 <= port < self.ports:
            self._warn_once("ctrl-port", f"control message {event} for unknown port {port}")
            return
        state = self._ports[port]
        if event == ControlEvent.PORT_READY:
            if value != 1:
                log.warning("%s: driver failed to add port %d", self.name, port)
                return
            if state.ready:
                return
            state.ready = True
            if port == 0:
                self._control_pending.append(control_message(0, ControlEvent.CONSOLE_PORT, 1))
            if state.name is not None:
                self._control_pending.append(
                    control_message(port, ControlEvent.PORT_NAME, 0, state.name.encode())
                )
            self._control_pending.append(control_message(port, ControlEvent.PORT_OPEN, 1))
        elif event == ControlEvent.PORT_OPEN:
            state.guest_open = bool(value)
            if state.guest_open:
                self._deliver_input(port)
        else:
            self._warn_once(f"ctrl-ev{event}", f"unexpected control event {event} from driver")

    # -- helpers -------------------------------------------------------------------

    def _port(self, port: int) -> _Port:
        if not 0 <= port < self.ports:
            raise ValueError(f"no port {port} (the console has {self.ports})")
        return self._ports[port]

    def _warn_once(self, key: str, message: str, level: int = logging.WARNING) -> None:
        """Log a guest error at ``level`` the first time, DEBUG after (guests can repeat them)."""
        if key in self._warned:
            level = logging.DEBUG
        elif len(self._warned) < 256:  # bounded: keys can embed guest-chosen numbers
            self._warned.add(key)
        log.log(level, "%s: %s", self.name, message)

    # -- snapshot ------------------------------------------------------------------

    def _snapshot_model(self) -> Any:
        """Size, per-port streams and handshake state, and queued control messages.

        Byte buffers are base64 so the model stays JSON.  Work on the queues
        is always completed synchronously, so nothing else is in flight.
        """
        return {
            "cols": self.cols,
            "rows": self.rows,
            "driver_ready": self._driver_ready,
            "config_change_pending": self._config_change_pending,
            "control_tx_stalled": self._control_tx_stalled,
            "emergency_dropped": self.emergency_dropped,
            "control_pending": [_b64(m) for m in self._control_pending],
            "ports": [port.snapshot() for port in self._ports],
        }

    def _restore_model(self, state: Any) -> None:
        try:
            cols, rows = expect_uint(state["cols"]), expect_uint(state["rows"])
            self._check_size(cols, rows)
            ports = state["ports"]
            if not isinstance(ports, list) or len(ports) != self.ports:
                raise ValueError(f"snapshot has ports {ports!r}, device has {self.ports}")
            restored = [
                _Port.restored(port.name, saved)
                for port, saved in zip(self._ports, ports, strict=True)
            ]
            control = [_unb64(m) for m in state["control_pending"]]
            driver_ready = expect_bool(state["driver_ready"])
            config_change_pending = expect_bool(state["config_change_pending"])
            control_tx_stalled = expect_bool(state["control_tx_stalled"])
            emergency_dropped = expect_uint(state["emergency_dropped"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed console state: {exc!r}") from exc
        self.cols, self.rows = cols, rows
        self._ports = restored
        self._control_pending = deque(control)
        self._driver_ready = driver_ready
        self._config_change_pending = config_change_pending
        self._control_tx_stalled = control_tx_stalled
        self.emergency_dropped = emergency_dropped


def _is_resize(message: bytes) -> bool:
    return (
        len(message) >= CONTROL_HEADER.size
        and CONTROL_HEADER.unpack_from(message)[1] == ControlEvent.RESIZE
    )


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError(f"bad base64: {exc}") from exc
