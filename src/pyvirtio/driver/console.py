"""A minimal virtio-console driver over virtio-MMIO (device-types/console).

Like Linux's ``virtio_console`` it keeps every port's receiveq stocked with
device-writable buffers (re-posting each as soon as its data is copied out),
writes by placing device-readable buffers on the transmitq, and reads the
console size from the configuration space (device-types/console: Device
Initialization).  Transmit buffers are reaped lazily, as Linux does for
non-blocking ports: :meth:`ConsoleDriver.write` only waits when the
transmitq is full, and :meth:`ConsoleDriver.flush` waits for the device to
have taken everything.

With VIRTIO_CONSOLE_F_MULTIPORT (negotiated when offered, unless
``multiport=False``) it runs the driver half of the control protocol
(device-types/console: Multiport Device Operation): it sets up the control
queues and every port's queues, sends DEVICE_READY, answers DEVICE_ADD with
PORT_READY and CONSOLE_PORT with PORT_OPEN 1 (a MUST), records PORT_NAME,
PORT_OPEN and RESIZE.  A port other than the console receives data only once
opened with :meth:`ConsoleDriver.open_port` (the device holds it until then).

Single-threaded: everything happens in the calling thread, by polling the
used rings (and waiting on the interrupt when there is nothing yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyvirtio.constants import COMMON_FEATURES, DeviceId
from pyvirtio.devices.console import (
    CONTROL_HEADER,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    EMERG_WR_OFFSET,
    F_EMERG_WRITE,
    F_MULTIPORT,
    F_SIZE,
    RESIZE_PAYLOAD,
    ControlEvent,
    receiveq_index,
    transmitq_index,
)
from pyvirtio.driver.memory import OwnedBuffers
from pyvirtio.driver.mmio import MmioDriverError, MmioDriverTransport
from pyvirtio.driver.transport import check_device_id, requested_features, wait_until
from pyvirtio.virtqueue.common import DriverQueue

__all__ = ["ConsoleDriver", "ConsoleDriverError"]

#: What the driver can use.
SUPPORTED_FEATURES = COMMON_FEATURES | 1 << F_SIZE | 1 << F_MULTIPORT | 1 << F_EMERG_WRITE

#: Linux posts page-sized buffers on receiveqs and the control receiveq.
DEFAULT_BUFFER_SIZE = 4096
DEFAULT_RX_BUFFERS = 16
#: Control transmit messages are 8 bytes; a few in flight is plenty.
_CONTROL_TX_SIZE = CONTROL_HEADER.size
#: Linux's VIRTIO_CONSOLE_BAD_ID: the port id of DEVICE_READY.
BAD_ID = 0xFFFF_FFFF


class ConsoleDriverError(MmioDriverError):
    """The device misbehaved, needs a reset, or did not answer in time."""


@dataclass
class _PortState:
    rx_queue: DriverQueue | None = None
    tx_queue: DriverQueue | None = None
    received: bytearray = field(default_factory=bytearray)
    added: bool = False
    console: bool = False
    host_connected: bool = False
    name: str | None = None


class ConsoleDriver:
    """Initializes the console behind ``transport``; reads, writes and sizes its ports.

    ``features`` limits what is negotiated (default: everything supported);
    ``multiport=False`` declines MULTIPORT even when offered.  ``rx_buffers``
    receive buffers of ``buffer_size`` bytes are kept posted per port.
    ``timeout`` bounds every wait (set-up handshake, a full transmitq).
    """

    def __init__(
        self,
        transport: MmioDriverTransport,
        *,
        features: int | None = None,
        multiport: bool = True,
        queue_size: int | None = None,
        rx_buffers: int = DEFAULT_RX_BUFFERS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        timeout: float = 5.0,
    ) -> None:
        check_device_id(transport.device_id, DeviceId.CONSOLE, MmioDriverError, "a console")
        if rx_buffers <= 0 or buffer_size <= 0:
            raise ValueError("rx_buffers and buffer_size must be positive")
        self.transport = transport
        self.timeout = timeout
        self.buffer_size = buffer_size
        self.rx_buffers = rx_buffers
        #: Every buffer the driver allocated and has not freed.
        self._buffers = OwnedBuffers(transport.allocator, zero=False)
        wanted = requested_features(SUPPORTED_FEATURES, features)
        if not multiport:
            wanted &= ~(1 << F_MULTIPORT)
        transport.initialize(wanted)
        self.multiport = transport.has_feature(F_MULTIPORT)
        self.max_ports = self._config_field(4, 4) if self.multiport else 1
        #: Size from the last RESIZE control message (multiport), else None.
        self._resized: tuple[int, int] | None = None
        self._driver_ready_sent = False
        self._ports = [_PortState() for _ in range(self.max_ports)]
        self._control_rx: DriverQueue | None = None
        self._control_tx: DriverQueue | None = None
        for port in range(self.max_ports):
            state = self._ports[port]
            state.rx_queue = transport.setup_queue(receiveq_index(port), queue_size)
            state.tx_queue = transport.setup_queue(transmitq_index(port), queue_size)
            if port == 0 and self.multiport:
                self._control_rx = transport.setup_queue(CONTROL_RECEIVEQ, queue_size)
                self._control_tx = transport.setup_queue(CONTROL_TRANSMITQ, queue_size)
        if self._control_rx is not None:
            self._fill(self._control_rx, self.rx_buffers, self.buffer_size, kick=None)
        if not self.multiport:
            # Without MULTIPORT port 0 simply exists (and is the console).
            self._ports[0].added = self._ports[0].console = True
            self._ports[0].host_connected = True
            self._fill_port(0, kick=False)
        transport.driver_ok()
        if self.multiport:
            self._kick_queue(CONTROL_RECEIVEQ)
            self._send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)
            self._driver_ready_sent = True
            self._wait_for(
                lambda: all(p.added for p in self._ports) and self._ports[0].console,
                "the device to add its ports",
            )
        else:
            self._kick_queue(receiveq_index(0))

    # -- public API ---------------------------------------------------------------------

    @property
    def ports(self) -> int:
        """How many ports the driver knows (1 without MULTIPORT)."""
        return self.max_ports

    def port_name(self, port: int) -> str | None:
        """The name the device gave ``port`` (PORT_NAME), if any."""
        return self._port(port).name

    def host_connected(self, port: int) -> bool:
        """Whether the device reported the host side of ``port`` open."""
        self.poll()
        return self._port(port).host_connected

    def is_console(self, port: int) -> bool:
        return self._port(port).console

    def size(self) -> tuple[int, int]:
        """(cols, rows) of the console (port 0).

        With MULTIPORT the latest RESIZE message wins; otherwise the config
        fields, read within one generation (content.tex "Device Configuration
        Space").  (0, 0) without VIRTIO_CONSOLE_F_SIZE.
        """
        self.poll()
        if self._resized is not None:
            return self._resized
        if not self.transport.has_feature(F_SIZE):
            return (0, 0)
        cols, rows = self.transport.consistent(
            lambda: (self._config_field(0, 2), self._config_field(2, 2))
        )
        return cols, rows

    def write(self, data: bytes | bytearray | memoryview, port: int = 0) -> None:
        """Queue ``data`` for the device on ``port``'s transmitq.

        Returns once every byte is in a transmit buffer the device owns;
        waits (up to ``timeout``) only for free ring slots.
        """
        state = self._port(port)
        queue = state.tx_queue
        assert queue is not None
        src = memoryview(data).cast("B")
        for start in range(0, len(src), self.buffer_size):
            chunk = src[start : start + self.buffer_size]
            self._reap_tx(queue)
            if queue.num_free == 0:
                self._wait_for(lambda: queue.num_free > 0, "transmitq space")
            addr = self._buffers.alloc(len(chunk))
            self.transport.mem.write(addr, chunk)
            queue.add([(addr, len(chunk))], [], token=addr)
            if queue.kick_needed():
                self.transport.notify(transmitq_index(port))

    def flush(self, port: int = 0) -> None:
        """Wait until the device has taken every transmit buffer of ``port``."""
        queue = self._port(port).tx_queue
        assert queue is not None
        self._wait_for(lambda: _in_flight(queue) == 0, "flush")

    def read(self, timeout: float | None = 0.0, port: int = 0) -> bytes:
        """Bytes received on ``port`` since the last read.

        ``timeout=0`` (the default) never blocks; otherwise waits up to
        ``timeout`` seconds (``None``: the driver's own timeout) for at least
        one byte, and returns b"" if none came.
        """
        state = self._port(port)
        self.poll()
        if not state.received and timeout != 0:
            wait = self.timeout if timeout is None else timeout
            self._poll_until(lambda: bool(state.received), time.monotonic() + wait)
        data = bytes(state.received)
        state.received.clear()
        return data

    def open_port(self, port: int, is_open: bool = True) -> None:
        """Tell the device a process opened (or closed) ``port`` (PORT_OPEN; multiport only)."""
        self._port(port)
        if not self.multiport:
            return
        self._send_control(port, ControlEvent.PORT_OPEN, int(is_open))

    def emergency_write(self, byte: int) -> None:
        """Write one byte through ``emerg_wr`` (needs VIRTIO_CONSOLE_F_EMERG_WRITE offered)."""
        self.transport.write_config(EMERG_WR_OFFSET, 4, byte & 0xFF)

    def close(self) -> None:
        """Reset the device (it lets go of every buffer) and free all driver memory."""
        self.transport.reset()
        self._buffers.free_all()

    def poll(self) -> None:
        """Collect whatever the device returned: received data, control messages, tx buffers."""
        if self.transport.needs_reset:
            raise ConsoleDriverError("device needs reset")
        if self._control_rx is not None:
            self._drain_control()
        for port, state in enumerate(self._ports):
            if state.rx_queue is not None:
                self._drain_rx(port, state)
            if state.tx_queue is not None:
                self._reap_tx(state.tx_queue)
        if self._control_tx is not None:
            self._reap_tx(self._control_tx)

    # -- receive side ------------------------------------------------------------------

    def _fill(self, queue: DriverQueue, count: int, size: int, kick: int | None) -> None:
        for _ in range(min(count, queue.num_free)):
            addr = self._buffers.alloc(size)
            queue.add([], [(addr, size)], token=addr)
        if kick is not None and queue.kick_needed():
            self.transport.notify(kick)

    def _fill_port(self, port: int, *, kick: bool) -> None:
        queue = self._ports[port].rx_queue
        assert queue is not None
        self._fill(queue, self.rx_buffers, self.buffer_size, receiveq_index(port) if kick else None)

    def _kick_queue(self, index: int) -> None:
        queue = self.transport.queue(index)
        if queue.kick_needed():
            self.transport.notify(index)

    def _received(self, queue: DriverQueue, index: int) -> Iterator[bytes]:
        """What the device wrote into each used receive buffer of ``queue`` (number
        ``index``), the buffer reposted as soon as it is read; one kick at the end."""
        mem = self.transport.mem
        reposted = False
        for token, written in queue.used():
            assert isinstance(token, int)
            data = mem.read(token, written) if written else b""
            queue.add([], [(token, self.buffer_size)], token=token)
            reposted = True
            yield data
        if reposted and queue.kick_needed():
            self.transport.notify(index)

    def _drain_rx(self, port: int, state: _PortState) -> None:
        assert state.rx_queue is not None
        for data in self._received(state.rx_queue, receiveq_index(port)):
            state.received += data

    def _drain_control(self) -> None:
        assert self._control_rx is not None
        for message in self._received(self._control_rx, CONTROL_RECEIVEQ):
            self._handle_control(message)

    def _handle_control(self, message: bytes) -> None:
        if len(message) < CONTROL_HEADER.size:
            raise ConsoleDriverError(f"short control message ({len(message)} bytes)")
        port, event, value = CONTROL_HEADER.unpack_from(message)
        payload = message[CONTROL_HEADER.size :]
        if not 0 <= port < self.max_ports:
            raise ConsoleDriverError(f"control message {event} for port {port} out of range")
        state = self._ports[port]
        if event == ControlEvent.DEVICE_ADD:
            if state.added:
                raise ConsoleDriverError(f"device added port {port} twice")
            state.added = True
            self._fill_port(port, kick=True)
            self._send_control(port, ControlEvent.PORT_READY, 1)
        elif event == ControlEvent.DEVICE_REMOVE:
            state.added = state.console = state.host_connected = False
        elif event == ControlEvent.CONSOLE_PORT:
            state.console = True
            # device-types/console: the driver MUST answer with PORT_OPEN 1.
            self._send_control(port, ControlEvent.PORT_OPEN, 1)
        elif event == ControlEvent.PORT_OPEN:
            state.host_connected = bool(value)
        elif event == ControlEvent.PORT_NAME:
            state.name = payload.decode("utf-8", errors="replace")
        elif event == ControlEvent.RESIZE and port == 0 and len(payload) >= RESIZE_PAYLOAD.size:
            cols, rows = RESIZE_PAYLOAD.unpack_from(payload)
            self._resized = (cols, rows)
        # Anything else is for the device, or unknown: ignored as Linux does.

    # -- transmit side ----------------------------------------------------------------

    def _send_control(self, port: int, event: int, value: int) -> None:
        queue = self._control_tx
        assert queue is not None
        self._reap_tx(queue)
        if queue.num_free == 0:
            self._wait_for(lambda: queue.num_free > 0, "control tx")
        addr = self._buffers.alloc(_CONTROL_TX_SIZE)
        self.transport.mem.write(addr, CONTROL_HEADER.pack(port, event, value))
        queue.add([(addr, _CONTROL_TX_SIZE)], [], token=addr)
        if queue.kick_needed():
            self.transport.notify(CONTROL_TRANSMITQ)

    def _reap_tx(self, queue: DriverQueue) -> int:
        """Free the buffers the device has finished with; returns how many."""
        count = 0
        for token, _written in queue.used():
            assert isinstance(token, int)
            self._buffers.free(token)
            count += 1
        return count

    # -- helpers ------------------------------------------------------------------------

    def _port(self, port: int) -> _PortState:
        if not 0 <= port < self.max_ports:
            raise ValueError(f"no port {port} (the driver has {self.max_ports})")
        return self._ports[port]

    def _config_field(self, offset: int, size: int) -> int:
        return self.transport.read_config(offset, size)

    def _wait_for(self, condition: Callable[[], bool], what: str) -> None:
        if not self._poll_until(condition, time.monotonic() + self.timeout):
            raise ConsoleDriverError(f"timed out waiting for {what}")

    def _poll_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Poll after every interrupt until ``condition()``; False once ``deadline`` passed."""

        def done() -> bool:
            self.poll()
            return condition()

        return wait_until(self.transport, done, deadline)


def _in_flight(queue: DriverQueue) -> int:
    return queue.size - queue.num_free
