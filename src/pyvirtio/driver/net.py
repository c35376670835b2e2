"""A minimal virtio-net driver: frames to and from any virtio-net device.

:class:`NetDriver` sits on a driver transport
(:class:`~pyvirtio.driver.mmio.MmioDriverTransport`, or
:class:`~pyvirtio.driver.vhost_user.VhostUserFrontend`; :class:`NetTransport`
says what is used).  It negotiates features, reads ``mac``/``status``/
``mtu``/``max_virtqueue_pairs`` (device-types/net: Device configuration
layout), keeps the receiveqs filled (Setting Up Receive Buffers) and offers:

* :meth:`NetDriver.send` / :meth:`NetDriver.try_send` / :meth:`NetDriver.
  send_many`: a frame (optionally with a :class:`~pyvirtio.devices.net.wire.
  NetHeader` for checksum or segmentation offload) into a transmitq;
* :meth:`NetDriver.recv` / :meth:`NetDriver.recv_packet`: the next received
  frame, merged from several buffers with VIRTIO_NET_F_MRG_RXBUF;
* control-queue helpers (:meth:`NetDriver.set_rx_mode`, :meth:`NetDriver.
  set_mac_table`, :meth:`NetDriver.set_mac`, :meth:`NetDriver.
  set_queue_pairs`, :meth:`NetDriver.set_guest_offloads`) and the raw
  :meth:`NetDriver.control`.

Waiting: every blocking call is bounded by ``timeout``.  By default the
driver waits for the device's interrupt; ``wait`` replaces that, e.g. with a
step of an in-process host loop (:func:`pyvirtio.vmm.host_loop.poll_devices`)
when device and driver share one thread.

Not thread-safe: use one driver from one thread.
"""

from __future__ import annotations

import collections
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from pyvirtio.constants import COMMON_FEATURES, DeviceId, Feature
from pyvirtio.devices.net.wire import (
    CONFIG_MAC,
    CONFIG_MAX_PAIRS,
    CONFIG_MTU,
    CONFIG_STATUS,
    CTRL_GUEST_OFFLOADS_SET,
    ETH_HLEN,
    GUEST_OFFLOADS,
    HDR_SIZE,
    IMPLEMENTED_NET_FEATURES,
    MAX_FRAME,
    S_LINK_UP,
    VLAN_HLEN,
    CtrlAck,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    NetFeature,
    NetHeader,
    ctrl_queue_index,
    mac_table,
    missing_requirements,
    parse_mac,
)
from pyvirtio.driver.memory import OwnedBuffers
from pyvirtio.driver.mmio import MmioDriverError
from pyvirtio.driver.transport import (
    DriverTransport,
    FeatureChoice,
    check_device_id,
    check_required_features,
    requested_features,
)
from pyvirtio.virtqueue.common import DriverQueue

__all__ = ["NetDriver", "NetDriverError", "NetTransport", "Packet"]

F = NetFeature

#: What this driver can use.
SUPPORTED_FEATURES = COMMON_FEATURES | IMPLEMENTED_NET_FEATURES | F.MQ.mask
#: Features only usable by reading config space (``mac``, ``status``, ``mtu``,
#: ``max_virtqueue_pairs``): not negotiated over a transport that cannot read
#: it, e.g. vhost-user without the CONFIG protocol feature (DPDK's vhost PMD).
CONFIG_FEATURES = F.MAC.mask | F.STATUS.mask | F.MTU.mask | F.MQ.mask
#: Receive buffer size with MRG_RXBUF: Linux's GOOD_PACKET_LEN plus the header.
MERGEABLE_BUFFER = HDR_SIZE + ETH_HLEN + VLAN_HLEN + 1500
#: Transmit frames up to this size (header included) use preallocated slots.
_TX_SLOT: Final = 2048
_ACK_UNSET: Final = 0xFF
_ZERO_HEADER: Final = bytes(HDR_SIZE)

_U16: Final = struct.Struct("<H")
_U64: Final = struct.Struct("<Q")


class NetDriverError(MmioDriverError):
    """The device refused a command, misbehaved, needs a reset, or did not answer in time."""


class NetTransport(DriverTransport, Protocol):
    """What :class:`NetDriver` needs of a driver transport."""

    device_id: int

    def read_config_bytes(self, offset: int, length: int) -> bytes: ...

    def reset(self) -> None: ...

    @property
    def needs_reset(self) -> bool: ...


@dataclass
class Packet:
    """A received frame and the header the device gave it."""

    header: NetHeader
    frame: bytes


@dataclass
class _RxQueue:
    index: int
    queue: DriverQueue
    #: A frame spread over several buffers (MRG_RXBUF): header, parts, buffers still due.
    partial: tuple[NetHeader, list[bytes], int] | None = None
    #: Buffers used by the device and not posted again (refill=False).
    idle: list[int] = field(default_factory=list)


@dataclass
class _TxQueue:
    index: int
    queue: DriverQueue
    slots: list[int]
    #: Buffers on the ring: token -> whether it is a slot (else freed after use).
    in_flight: dict[int, bool] = field(default_factory=dict)


class NetDriver:
    """Initializes the virtio-net device behind ``transport``; sends and receives frames.

    * ``features``: limit what is negotiated (default: all :data:`SUPPORTED_FEATURES`
      the device offers).  ``packed``, ``event_idx``, ``mrg_rxbuf``, ``ctrl``:
      True requires the feature, False declines it, None takes it if offered.
      Only what the transport can use is taken: nothing of :data:`CONFIG_FEATURES`
      without readable config space (``transport.config_readable``), and with
      ``ctrl=None`` no control queue over a transport whose device may leave it
      unanswered (``transport.device_answers_control_queue``: vhost-user, where
      the front end owns it by convention).  A control command left unanswered
      for ``timeout`` raises :class:`NetDriverError` and turns control off.
    * ``queue_pairs``: pairs to use (needs VIRTIO_NET_F_MQ beyond 1; capped
      by ``max_virtqueue_pairs``).
    * ``rx_buffers`` / ``rx_buffer_size``: receive buffers kept posted per
      receiveq, and their size (default: :data:`MERGEABLE_BUFFER` with
      MRG_RXBUF, else room for the largest frame the negotiated features
      allow, as the spec's "Setting Up Receive Buffers" asks).
    * ``refill``: post each buffer again as soon as its frame is taken; with
      False the caller posts with :meth:`post_rx` (to starve the device).
    * ``timeout``: bound of every wait; ``wait(seconds)``: how to wait
      (default: for the device's interrupt).
    """

    def __init__(
        self,
        transport: NetTransport,
        *,
        features: int | None = None,
        packed: bool | None = None,
        event_idx: bool | None = None,
        mrg_rxbuf: bool | None = None,
        ctrl: bool | None = None,
        queue_pairs: int = 1,
        queue_size: int | None = None,
        rx_buffers: int | None = None,
        rx_buffer_size: int | None = None,
        refill: bool = True,
        timeout: float = 5.0,
        wait: Callable[[float], object] | None = None,
    ) -> None:
        check_device_id(
            transport.device_id, DeviceId.NET, NetDriverError, "a network device", unknown_ok=True
        )
        if queue_pairs < 1:
            raise ValueError(f"queue_pairs must be at least 1, not {queue_pairs}")
        self.transport = transport
        self.mem = transport.mem
        self.timeout = timeout
        self.refill = refill
        self._wait_hook = wait
        #: Every buffer the driver allocated and has not freed.
        self._buffers = OwnedBuffers(transport.allocator)
        #: Views of the transmit slots and receive buffers, which live for
        #: the driver's lifetime: frames are copied through them directly.
        self._views: dict[int, memoryview] = {}
        self._received: collections.deque[Packet] = collections.deque()
        #: Frames dropped by the driver: used buffers that carried no valid frame.
        self.rx_errors = 0
        choices: tuple[FeatureChoice, ...] = (
            (packed, Feature.RING_PACKED),
            (event_idx, Feature.EVENT_IDX),
            (mrg_rxbuf, F.MRG_RXBUF),
            (ctrl, F.CTRL_VQ),
        )
        wanted = requested_features(SUPPORTED_FEATURES, features, choices)
        if not getattr(transport, "config_readable", True):
            wanted &= ~CONFIG_FEATURES
        if ctrl is None and not getattr(transport, "device_answers_control_queue", True):
            wanted &= ~F.CTRL_VQ.mask
        if not wanted & F.CTRL_VQ.mask:
            wanted &= ~(
                F.CTRL_RX.mask
                | F.CTRL_RX_EXTRA.mask
                | F.CTRL_MAC_ADDR.mask
                | F.MQ.mask
                | F.CTRL_GUEST_OFFLOADS.mask
            )
        if queue_pairs == 1:
            wanted &= ~F.MQ.mask
        negotiated = transport.initialize(_consistent(wanted & self._offer(transport)))
        check_required_features(negotiated, choices, NetDriverError)
        self.features = negotiated
        self.mac = (
            bytes(transport.read_config_bytes(CONFIG_MAC, 6)) if self.has(F.MAC) else _random_mac()
        )
        self.mtu = transport.read_config(CONFIG_MTU, 2) if self.has(F.MTU) else 1500
        self.max_queue_pairs = (
            max(1, transport.read_config(CONFIG_MAX_PAIRS, 2)) if self.has(F.MQ) else 1
        )
        self.queue_pairs = 1
        self.mrg = self.has(F.MRG_RXBUF)
        self.rx_buffer_size = rx_buffer_size or self._default_buffer_size()
        if self.rx_buffer_size < HDR_SIZE:
            raise ValueError(f"receive buffers must hold the {HDR_SIZE}-byte header")
        pairs = min(queue_pairs, self.max_queue_pairs)
        self._rx: list[_RxQueue] = []
        self._tx: list[_TxQueue] = []
        for pair in range(pairs):
            rxq = transport.setup_queue(2 * pair, queue_size)
            txq = transport.setup_queue(2 * pair + 1, queue_size)
            self._rx.append(_RxQueue(2 * pair, rxq))
            slots = [self._alloc_viewed(_TX_SLOT) for _ in range(min(txq.size, 256))]
            self._tx.append(_TxQueue(2 * pair + 1, txq, slots))
        self._ctrl: DriverQueue | None = None
        #: Why control commands are off: the device left one unanswered.
        self._ctrl_unanswered: str | None = None
        self._ctrl_index = ctrl_queue_index(self.max_queue_pairs, self.has(F.MQ))
        if self.has(F.CTRL_VQ):
            self._ctrl = transport.setup_queue(self._ctrl_index, queue_size)
        count = rx_buffers
        for rx in self._rx:
            n = rx.queue.size if count is None else min(count, rx.queue.size)
            if count is None and self.rx_buffer_size > 4096:
                n = min(n, 16)  # big buffers: enough for a burst, not the whole ring
            for _ in range(n):
                self._post(rx, self._alloc_viewed(self.rx_buffer_size))
        transport.driver_ok()
        for rx in self._rx:
            self._kick(rx.index, rx.queue)
        if pairs > 1:
            self.set_queue_pairs(pairs)

    @staticmethod
    def _offer(transport: NetTransport) -> int:
        device_features = getattr(transport, "device_features", None)
        if callable(device_features):
            offered = device_features()
            if isinstance(offered, int):
                return offered
        return (1 << 64) - 1

    def _default_buffer_size(self) -> int:
        if self.mrg:
            return MERGEABLE_BUFFER
        if self.features & (F.GUEST_TSO4.mask | F.GUEST_TSO6.mask | F.GUEST_UFO.mask):
            return HDR_SIZE + MAX_FRAME
        return HDR_SIZE + ETH_HLEN + VLAN_HLEN + max(self.mtu, 1500)

    # -- configuration --------------------------------------------------------------------

    def has(self, feature: NetFeature | Feature) -> bool:
        return bool(self.features >> int(feature) & 1)

    @property
    def link_up(self) -> bool:
        """``status & VIRTIO_NET_S_LINK_UP``; up without STATUS, as the spec says."""
        if not self.has(F.STATUS):
            return True
        return bool(self.transport.read_config(CONFIG_STATUS, 2) & S_LINK_UP)

    def read_mac(self) -> bytes:
        """The ``mac`` field now (it follows VIRTIO_NET_CTRL_MAC_ADDR_SET)."""
        return bytes(self.transport.read_config_bytes(CONFIG_MAC, 6))

    # -- transmit ---------------------------------------------------------------------------

    def try_send(
        self, frame: bytes | bytearray | memoryview, header: NetHeader | None = None, pair: int = 0
    ) -> bool:
        """Queue one frame on ``pair``'s transmitq; False when the ring is full (nothing queued)."""
        tx = self._tx_queue(pair)
        if not self._add_tx(tx, frame, header):
            return False
        self._kick(tx.index, tx.queue)
        return True

    def send(
        self, frame: bytes | bytearray | memoryview, header: NetHeader | None = None, pair: int = 0
    ) -> None:
        """Queue one frame, waiting (up to ``timeout``) for room in the ring."""
        tx = self._tx_queue(pair)
        deadline = time.monotonic() + self.timeout
        while not self._add_tx(tx, frame, header):
            self._wait_until(deadline, "room in the transmitq")
        self._kick(tx.index, tx.queue)

    def send_many(self, frames: Iterable[bytes | bytearray | memoryview], pair: int = 0) -> int:
        """Queue frames until the ring is full, with one notification; returns how many."""
        tx = self._tx_queue(pair)
        count = 0
        for frame in frames:
            if not self._add_tx(tx, frame, None):
                break
            count += 1
        if count:
            self._kick(tx.index, tx.queue)
        return count

    def flush(self) -> None:
        """Wait until the device has taken every queued frame."""
        deadline = time.monotonic() + self.timeout
        for tx in self._tx:
            while True:
                self._reap(tx)
                if not tx.in_flight:
                    break
                self._wait_until(deadline, "the transmitq to drain")

    def _tx_queue(self, pair: int) -> _TxQueue:
        if not 0 <= pair < len(self._tx):
            raise ValueError(f"no queue pair {pair} (the driver set up {len(self._tx)})")
        return self._tx[pair]

    def _add_tx(
        self, tx: _TxQueue, frame: bytes | bytearray | memoryview, header: NetHeader | None
    ) -> bool:
        length = HDR_SIZE + len(frame)
        if not tx.queue.num_free:
            self._reap(tx)
            if not tx.queue.num_free:
                return False
        head = header.pack() if header is not None else _ZERO_HEADER
        if length <= _TX_SLOT and tx.slots:
            addr = tx.slots.pop()
            slot = True
            view = self._views[addr]
            view[:HDR_SIZE] = head
            view[HDR_SIZE:length] = frame
        else:
            addr = self._buffers.alloc(length)
            slot = False
            self.mem.write(addr, head)
            self.mem.write(addr + HDR_SIZE, frame)
        tx.queue.add([(addr, length)], [], addr)
        tx.in_flight[addr] = slot
        return True

    def _reap(self, tx: _TxQueue) -> None:
        for token, _written in tx.queue.used():
            assert isinstance(token, int)
            if tx.in_flight.pop(token):
                tx.slots.append(token)
            else:
                self._buffers.free(token)

    # -- receive ------------------------------------------------------------------------------

    def recv(self, timeout: float | None = 0.0) -> bytes | None:
        """The next received frame (without its header), or None.

        ``timeout=0`` never waits; otherwise waits up to ``timeout`` seconds
        (None: the driver's ``timeout``).
        """
        packet = self.recv_packet(timeout)
        return packet.frame if packet is not None else None

    def recv_packet(self, timeout: float | None = 0.0) -> Packet | None:
        """Like :meth:`recv`, with the header the device wrote."""
        self.poll()
        if not self._received and timeout != 0:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while not self._received and time.monotonic() < deadline:
                self._wait(deadline - time.monotonic())
                self.poll()
        return self._received.popleft() if self._received else None

    def recv_all(self) -> list[bytes]:
        """Every frame received so far, without waiting."""
        self.poll()
        frames = [p.frame for p in self._received]
        self._received.clear()
        return frames

    @property
    def rx_posted(self) -> int:
        """Receive buffers the device holds now."""
        return sum(rx.queue.size - rx.queue.num_free for rx in self._rx)

    def post_rx(self, count: int, pair: int = 0) -> int:
        """Post up to ``count`` idle receive buffers again (with ``refill=False``)."""
        self.poll()
        rx = self._rx[pair]
        posted = 0
        while posted < count and rx.idle and rx.queue.num_free:
            self._post(rx, rx.idle.pop())
            posted += 1
        if posted:
            self._kick(rx.index, rx.queue)
        return posted

    def poll(self) -> None:
        """Collect received frames and finished transmit buffers."""
        if self.transport.needs_reset:
            raise NetDriverError("the device needs a reset")
        for rx in self._rx:
            self._drain_rx(rx)
        for tx in self._tx:
            self._reap(tx)

    def _post(self, rx: _RxQueue, addr: int) -> None:
        rx.queue.add([], [(addr, self.rx_buffer_size)], addr)

    def _drain_rx(self, rx: _RxQueue) -> None:
        reposted = False
        for token, written in rx.queue.used():
            assert isinstance(token, int)
            self._take(rx, token, written)
            if self.refill:
                self._post(rx, token)
                reposted = True
            else:
                rx.idle.append(token)
        if reposted:
            self._kick(rx.index, rx.queue)

    def _take(self, rx: _RxQueue, addr: int, written: int) -> None:
        """One used receive buffer: a whole frame, its start, or a continuation."""
        view = self._views[addr]
        written = min(written, self.rx_buffer_size)
        if rx.partial is not None:
            header, parts, due = rx.partial
            parts.append(bytes(view[:written]))
            due -= 1
            if due:
                rx.partial = (header, parts, due)
            else:
                rx.partial = None
                self._received.append(Packet(header, b"".join(parts)))
            return
        if written < HDR_SIZE + ETH_HLEN:
            self.rx_errors += 1  # e.g. a buffer returned unused (length 0)
            return
        header = NetHeader.unpack(view)
        frame = bytes(view[HDR_SIZE:written])
        due = header.num_buffers - 1 if self.mrg else 0
        if due > 0:
            rx.partial = (header, [frame], due)
        elif self.mrg and header.num_buffers == 0:
            self.rx_errors += 1
        else:
            self._received.append(Packet(header, frame))

    # -- control queue --------------------------------------------------------------------

    def control(self, cls: int, command: int, data: bytes = b"") -> int:
        """Send one control command; returns the device's ack (VIRTIO_NET_OK is 0)."""
        queue = self._ctrl
        if queue is None:
            hint = ""
            if not getattr(self.transport, "device_answers_control_queue", True):
                hint = " (over this transport only with ctrl=True: its device may not answer it)"
            raise NetDriverError(f"VIRTIO_NET_F_CTRL_VQ was not negotiated{hint}")
        if self._ctrl_unanswered is not None:
            raise NetDriverError(self._ctrl_unanswered)
        out = self._buffers.alloc(2 + len(data))
        ack = self._buffers.alloc(1)
        answered = False
        try:
            self.mem.write(out, bytes([cls, command]) + data)
            self.mem.write(ack, bytes([_ACK_UNSET]))
            token = object()
            queue.add([(out, 2 + len(data))], [(ack, 1)], token)
            self._kick(self._ctrl_index, queue)
            deadline = time.monotonic() + self.timeout
            while token not in [t for t, _ in queue.used()]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # The device still holds the buffers: they stay allocated.
                    self._ctrl_unanswered = (
                        f"the device left control command {cls}/{command} unanswered for "
                        f"{self.timeout:g} s: its control queue (ring {self._ctrl_index}) is not "
                        "served (vhost-user back ends such as DPDK's vhost PMD use that ring "
                        "for data); control commands are off for this driver"
                    )
                    raise NetDriverError(self._ctrl_unanswered)
                self._wait(remaining)
                self.poll()
            answered = True
            return self.mem.read(ack, 1)[0]
        finally:
            if answered or self._ctrl_unanswered is None:
                self._buffers.free(out)
                self._buffers.free(ack)

    def _command(self, cls: int, command: int, data: bytes, what: str) -> None:
        result = self.control(cls, command, data)
        if result != CtrlAck.OK:
            raise NetDriverError(f"the device refused {what} (ack {result})")

    def set_rx_mode(
        self,
        *,
        promisc: bool | None = None,
        allmulti: bool | None = None,
        alluni: bool | None = None,
        nomulti: bool | None = None,
        nouni: bool | None = None,
        nobcast: bool | None = None,
    ) -> None:
        """Switch receive modes (Packet Receive Filtering); None leaves a mode alone."""
        for command, value in (
            (CtrlRx.PROMISC, promisc),
            (CtrlRx.ALLMULTI, allmulti),
            (CtrlRx.ALLUNI, alluni),
            (CtrlRx.NOMULTI, nomulti),
            (CtrlRx.NOUNI, nouni),
            (CtrlRx.NOBCAST, nobcast),
        ):
            if value is not None:
                self._command(CtrlClass.RX, command, bytes([value]), command.name)

    def set_mac_table(
        self,
        unicast: Sequence[str | bytes] = (),
        multicast: Sequence[str | bytes] = (),
    ) -> None:
        """Set the MAC filter tables (VIRTIO_NET_CTRL_MAC_TABLE_SET)."""
        data = mac_table([parse_mac(m) for m in unicast], [parse_mac(m) for m in multicast])
        self._command(CtrlClass.MAC, CtrlMac.TABLE_SET, data, "MAC_TABLE_SET")

    def set_mac(self, mac: str | bytes) -> None:
        """Change the device's address (VIRTIO_NET_CTRL_MAC_ADDR_SET)."""
        address = parse_mac(mac)
        self._command(CtrlClass.MAC, CtrlMac.ADDR_SET, address, "MAC_ADDR_SET")
        self.mac = address

    def set_queue_pairs(self, pairs: int) -> None:
        """Use ``pairs`` queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)."""
        if not 1 <= pairs <= len(self._tx):
            raise ValueError(f"{pairs} pairs: the driver set up {len(self._tx)}")
        self._command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, _U16.pack(pairs), "VQ_PAIRS_SET")
        self.queue_pairs = pairs

    def set_guest_offloads(self, offloads: int) -> None:
        """Enable exactly these receive offloads (GUEST_* feature bits)."""
        if offloads & ~(self.features & GUEST_OFFLOADS):
            raise ValueError(f"offloads {offloads:#x} were not negotiated")
        self._command(
            CtrlClass.GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, _U64.pack(offloads), "offloads"
        )

    # -- helpers ------------------------------------------------------------------------------

    def close(self) -> None:
        """Reset the device (it lets go of every buffer) and free all driver memory."""
        self.transport.reset()
        for view in self._views.values():
            view.release()
        self._views.clear()
        self._buffers.free_all()

    def _kick(self, index: int, queue: DriverQueue) -> None:
        if queue.kick_needed():
            self.transport.notify(index)

    def _alloc_viewed(self, size: int) -> int:
        addr = self._buffers.alloc(size)
        self._views[addr] = self.mem.view(addr, size)
        return addr

    def _wait(self, remaining: float) -> None:
        step = max(0.0, min(remaining, 0.05))
        if self._wait_hook is not None:
            self._wait_hook(step)
        else:
            self.transport.wait_interrupt(step)

    def _wait_until(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetDriverError(f"timed out waiting for {what}")
        self._wait(remaining)
        self.poll()


def _random_mac() -> bytes:
    """A random unicast, locally administered address: the driver's own without
    VIRTIO_NET_F_MAC (device-types/net: "SHOULD generate a random MAC address")."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw)


def _consistent(features: int) -> int:
    """Drop features whose requirements are missing, until none is (at most a few rounds)."""
    for _ in range(4):
        problems = missing_requirements(features)
        if not problems:
            break
        for name in problems:
            feature = NetFeature[name.split(" ", 1)[0]]
            features &= ~feature.mask
    return features
