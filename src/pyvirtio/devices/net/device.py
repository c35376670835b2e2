"""virtio-net: the device model (device-types/net), sans-IO, over a pluggable back end.

The device moves frames between its virtqueues and a :class:`~.backends.
NetBackend` (a TAP, a socket pair) and never blocks: the host's event loop
polls what :meth:`Net.host_fds` lists and calls back.  The model holds the
negotiated shape, the queues and the counters; each frame's checks are
:mod:`.frames`', placing received frames in buffers is :mod:`.receive`'s,
control commands are parsed by :mod:`.control`, multiqueue steering is
:mod:`.steering`'s and snapshots :mod:`.persist`'s.

* Guest to back end: on a transmitq notification every available frame is
  checked and sent, its header rebuilt from the checked fields and the
  frame gathered straight from guest memory (no copy).  When the back end
  would block the frame stays pending (:meth:`Net.wants_writable`, POLLOUT in
  ``host_fds``) and the transmitqs wait until :meth:`Net.backend_writable`.
* Back end to guest: :meth:`Net.backend_readable` reads frames into one
  bounce buffer, filters them and scatters them into receive buffers, one
  chain each, or several with VIRTIO_NET_F_MRG_RXBUF (``num_buffers``).
  When the guest has no receive buffers the device stops reading (POLLIN
  leaves ``host_fds``), so frames wait in the kernel, and resumes on the next
  receiveq notification: no frame is lost for want of buffers.

Features (device-types/net: Feature bits): VERSION_1 and the ring features;
MAC, STATUS (link state, :meth:`Net.set_link`), MTU; CSUM and HOST_TSO4/6,
HOST_ECN, HOST_UFO (the back end finishes checksums and segments); GUEST_CSUM
and GUEST_TSO4/6, GUEST_ECN, GUEST_UFO (handed to the back end as its
offloads); MRG_RXBUF; CTRL_VQ with CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR,
CTRL_GUEST_OFFLOADS; MQ when ``queue_pairs > 1`` (VQ_PAIRS_SET, flow
steering: replies follow the transmitq a flow last used).
:meth:`Net.features_acceptable` enforces "Feature bit requirements".

Receive filtering (Control Virtqueue: Packet Receive Filtering, Setting MAC
Address Filtering) applies once CTRL_RX is negotiated.  As in QEMU the device
starts promiscuous after reset; drivers (Linux, :class:`~pyvirtio.driver.
net.NetDriver`) set their mode when they start.  Without CTRL_RX every frame
is delivered.

Nothing a driver or a peer sends crashes the device: runt, oversize and
malformed frames, chains with the wrong direction, bad control commands
(answered VIRTIO_NET_ERR) are dropped and counted in :attr:`Net.stats`, with
one log line per kind of problem every :data:`LOG_INTERVAL` seconds.  Only a
malformed ring (VirtqueueError) stops the device (DEVICE_NEEDS_RESET).

Thread safety: none; the host serialises calls into the device.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from typing import Any, Final

from pyvirtio.compiled import mypyc_attr
from pyvirtio.constants import DeviceId
from pyvirtio.device import COMMON_FEATURES, DeviceState, QueueResources, VirtioDevice
from pyvirtio.devices.net import control, persist
from pyvirtio.devices.net.backends import BackendGone, NetBackend
from pyvirtio.devices.net.control import MAC_TABLE_ENTRIES, MAX_CTRL_COMMAND, RxFilter
from pyvirtio.devices.net.frames import Dropped, GuestViews, adapt_rx, gather_tx
from pyvirtio.devices.net.receive import Completions, RxBuffers
from pyvirtio.devices.net.stats import STAT_KEYS
from pyvirtio.devices.net.steering import FLOW_KEY_BYTES, FLOW_TABLE_SIZE, FlowTable
from pyvirtio.devices.net.wire import (
    CONFIG_LAYOUT,
    ETH_HLEN,
    GUEST_OFFLOADS,
    HDR_SIZE,
    IMPLEMENTED_NET_FEATURES,
    MAX_FRAME,
    MAX_MTU,
    MIN_MTU,
    MQ_PAIRS_MAX,
    S_LINK_UP,
    VLAN_HLEN,
    CtrlAck,
    NetFeature,
    ctrl_queue_index,
    format_mac,
    missing_requirements,
    parse_mac,
)
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, VirtqueueError
from pyvirtio.virtqueue.disabled import DisabledQueue

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "FLOW_TABLE_SIZE",
    "LOG_INTERVAL",
    "MAC_TABLE_ENTRIES",
    "MAX_CTRL_COMMAND",
    "STAT_KEYS",
    "Net",
    "RxFilter",
]

log = logging.getLogger(__name__)

F = NetFeature

#: The device-specific features offered (MQ is added for more than one pair).
OFFERED_NET_FEATURES = IMPLEMENTED_NET_FEATURES

DEFAULT_QUEUE_SIZE = 256
#: Frames moved from the back end per call, so one busy back end cannot
#: monopolise the host loop (the fd stays readable; the host calls again).
RX_BATCH: Final = 256
#: Seconds between two log lines about the same kind of problem.
LOG_INTERVAL = 10.0


# Subclassed like any VirtioDevice (a test double overrides _process_queue).
@mypyc_attr(allow_interpreted_subclasses=True)
class Net(VirtioDevice):
    """A virtio network device whose wire is ``backend``.

    * ``mac``: the device's address (``"52:54:00:..."`` or 6 bytes); None
      picks a random locally administered one.  VIRTIO_NET_F_MAC is always
      offered.
    * ``mtu``: the ``mtu`` config field (VIRTIO_NET_F_MTU), 68..65535; frames
      without GSO above it (plus Ethernet and one VLAN header) are dropped in
      both directions once the driver negotiated MTU.
    * ``queue_pairs``: receiveq/transmitq pairs; more than one offers
      VIRTIO_NET_F_MQ.  Queues are ``rx0, tx0, rx1, tx1, ..., controlq``.
    * ``link_up``: the initial link state (VIRTIO_NET_F_STATUS).
    * ``front_end_control``: the transport's front end may own the control
      queue, as vhost-user front ends do (QEMU's virtio-net answers it;
      DPDK's virtio-user emulates it and acks CTRL_RX, CTRL_MAC_ADDR and MQ
      without CTRL_VQ).  Control features are then accepted without
      CTRL_VQ, and with MQ so negotiated every pair is in use, the front end
      choosing pairs by enabling and disabling their rings.

    Host-facing API: :meth:`host_fds` / :meth:`host_fd_ready` for an event
    loop, or :meth:`backend_readable`, :meth:`backend_writable` and
    :meth:`wants_writable` directly (a host without a loop of its own uses
    :func:`pyvirtio.vmm.host_loop.poll_devices`); :meth:`set_link`; :attr:`stats`.
    """

    device_id = DeviceId.NET

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: str | bytes | None = None,
        mtu: int = 1500,
        queue_pairs: int = 1,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        link_up: bool = True,
        front_end_control: bool = False,
    ) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu must be in [{MIN_MTU}, {MAX_MTU}], not {mtu}")
        if not 1 <= queue_pairs <= MQ_PAIRS_MAX:
            raise ValueError(f"queue_pairs must be in [1, {MQ_PAIRS_MAX}], not {queue_pairs}")
        if not 1 <= queue_size <= 32768:
            raise ValueError(f"queue_size must be in [1, 32768], not {queue_size}")
        if mac is None:
            raw = bytearray(os.urandom(6))
            raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
            base_mac = bytes(raw)
        else:
            base_mac = parse_mac(mac)
            if base_mac[0] & 1:
                raise ValueError(f"{format_mac(base_mac)} is a multicast address")
        features = COMMON_FEATURES | OFFERED_NET_FEATURES
        if queue_pairs > 1:
            features |= F.MQ.mask
        super().__init__(features, (queue_size,) * (2 * queue_pairs + 1))
        self.backend = backend
        self.base_mac = base_mac
        #: The address the receive filter accepts (VIRTIO_NET_CTRL_MAC_ADDR_SET changes it).
        self.mac = base_mac
        self.mtu = mtu
        self.max_queue_pairs = queue_pairs
        self.queue_size = queue_size
        self.front_end_control = front_end_control
        #: Counters of frames, bytes and every kind of drop (see STAT_KEYS).
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.rx_filter = RxFilter()
        self._link_up = link_up
        self._backend_gone = False
        self._limiter = RateLimitedLog(log, self.name, interval=LOG_INTERVAL)
        # Negotiated shape, set at activation and wake.
        self._mrg = False
        self._filtering = False
        self._data_pairs = 1
        self._ctrl_index = -1
        self._mtu_limit = 0
        self._guest_offloads = 0
        #: Pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
        self._pairs = 1
        # Receive side: one frame in the bounce buffer, and per receiveq the
        # chains taken for it but not yet used.
        self._rx_buf = bytearray(HDR_SIZE + MAX_FRAME + 1)
        self._rx_view = memoryview(self._rx_buf)
        self._rx_len = 0
        self._rx_pair = 0
        #: One-buffer frames both ways go through the last guest region used.
        self._views = GuestViews()
        self._rx = [RxBuffers(self._views, self._count) for _ in range(queue_pairs)]
        #: The receiveq a pending frame needs has no buffers: not reading the back end.
        self._rx_waiting = False
        # Transmit side: the frame the back end refused for now (queue index, chain).
        self._tx_blocked: tuple[int, DescriptorChain] | None = None
        #: Where each flow was last sent from (MQ steering).
        self._flows = FlowTable()

    def __repr__(self) -> str:
        return f"Net({self.backend!r}, mac={format_mac(self.mac)})"

    # -- negotiation and config space ------------------------------------------------------

    def features_acceptable(self, features: int) -> bool:
        """The generic rules plus the spec's "Feature bit requirements"."""
        if not super().features_acceptable(features):
            return False
        # A front end that owns the control queue satisfies what needs it.
        problems = missing_requirements(
            features | (F.CTRL_VQ.mask if self.front_end_control else 0)
        )
        if problems:
            log.info("%s: refusing features %#x: %s", self.name, features, "; ".join(problems))
            return False
        return True

    @property
    def link_up(self) -> bool:
        """The link state the driver sees: set by the host, and down once the back end is gone."""
        return self._link_up and not self._backend_gone

    def config_bytes(self) -> bytes:
        """``struct virtio_net_config`` up to ``mtu`` (device-types/net: Device configuration
        layout); ``status`` reports the link, ``max_virtqueue_pairs`` the pairs offered."""
        status = S_LINK_UP if self.link_up else 0
        return CONFIG_LAYOUT.pack(self.mac, status, self.max_queue_pairs, self.mtu)

    def write_config(self, offset: int, data: bytes) -> None:
        """Every field is read-only for the driver (Device configuration layout)."""
        self._limiter.warn(
            "config-write", None, "ignored driver write to config offset %#x", offset
        )

    # -- host-facing API ---------------------------------------------------------------------

    def set_link(self, up: bool) -> None:
        """Change the link state and tell the driver (a configuration change)."""
        if up == self._link_up:
            return
        self._link_up = up
        self.config_changed()
        if up:
            self._guarded(self._service_all)

    def host_fds(self) -> list[tuple[int, int]]:
        """The back end's fd with POLLIN while frames can be taken, POLLOUT while TX waits."""
        if self.state is not DeviceState.ACTIVE or self.needs_reset or self._backend_gone:
            return []
        events = 0
        if self._link_up and not self._rx_waiting:
            events |= select.POLLIN
        if self._tx_blocked is not None:
            events |= select.POLLOUT
        return [(self.backend.fileno(), events)] if events else []

    def host_fd_ready(self, fd: int, events: int) -> None:
        if events & select.POLLOUT:
            self.backend_writable()
        if events & select.POLLIN:
            self.backend_readable()
        elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            self._lose_backend(f"poll reported {events:#x}")

    def backend_readable(self) -> None:
        """The back end has frames: move them into receive buffers while there are some."""
        self._guarded(self._rx_pump)

    def backend_writable(self) -> None:
        """The back end can take frames again: send the pending one and resume the transmitqs."""
        self._guarded(self._tx_resume)

    def wants_writable(self) -> bool:
        """Whether a frame waits for the back end to become writable."""
        return self._tx_blocked is not None

    def close(self) -> None:
        """Close the back end; the link is down from now on and no fd is listed."""
        if not self._backend_gone:
            self._backend_gone = True
            if self._link_up:
                self.config_changed()
        self.backend.close()

    @property
    def queue_pairs(self) -> int:
        """Queue pairs in use (VQ_PAIRS_SET), 1 until the driver asks for more."""
        return self._pairs

    @property
    def guest_offloads(self) -> int:
        """The receive offloads in force (GUEST_* feature bits)."""
        return self._guest_offloads

    # -- lifecycle ----------------------------------------------------------------------------

    def _serve_posted(self) -> None:
        # Buffers posted meanwhile, frames waiting in the back end.
        self._guarded(self._service_all)

    def _on_activate(self, resources: QueueResources) -> None:
        acked = self.acked_features
        front_end_pairs = acked & F.MQ.mask and not acked & F.CTRL_VQ.mask
        self._pairs = self.max_queue_pairs if front_end_pairs else 1
        self._guest_offloads = self.acked_features & GUEST_OFFLOADS
        self._configure()

    def _configure(self) -> None:
        """Derive the negotiated shape from the acked features (activation, wake)."""
        acked = self.acked_features
        mq = bool(acked & F.MQ.mask)
        self._mrg = bool(acked & F.MRG_RXBUF.mask)
        self._filtering = bool(acked & F.CTRL_RX.mask)
        self._data_pairs = self.max_queue_pairs if mq else 1
        self._ctrl_index = (
            ctrl_queue_index(self.max_queue_pairs, mq) if acked & F.CTRL_VQ.mask else -1
        )
        self._mtu_limit = self.mtu + ETH_HLEN + VLAN_HLEN if acked & F.MTU.mask else 0
        self._rx_waiting = False
        self._apply_offloads()

    def _apply_offloads(self) -> None:
        try:
            self.backend.set_offloads(self._guest_offloads)
        except OSError as exc:
            log.warning(
                "%s: back end refused offloads %#x: %s", self.name, self._guest_offloads, exc
            )

    def _on_reset(self) -> None:
        if self._rx_len:
            self.stats["rx_dropped_reset"] += 1
            self._rx_len = 0
        for rx in self._rx:
            rx.stash.clear()  # the queues are gone; the driver reclaims its buffers
        self._tx_blocked = None
        self._rx_waiting = False
        self._flows.clear()
        self.rx_filter = RxFilter()
        self.mac = self.base_mac
        self._pairs = 1
        self._guest_offloads = 0
        self._apply_offloads()

    def _on_sleep(self) -> None:
        """Finish in-flight work: the pending transmit frame, receive chains taken early.

        A frame the back end still refuses is dropped (counted): sleeping
        must not wait.  Receive chains taken for a frame that did not fit yet
        go back unused (length 0; drivers drop and repost such buffers); the
        frame itself stays in the device and is part of the snapshot.
        """
        blocked, self._tx_blocked = self._tx_blocked, None
        try:
            if blocked is not None:
                index, chain = blocked
                if not self._transmit(chain, index // 2):
                    self.stats["tx_dropped_sleep"] += 1
                self._complete(index, [(chain, 0)])
            for pair, rx in enumerate(self._rx):
                chains = rx.take_stash()
                if chains:
                    self.stats["rx_buffers_returned"] += len(chains)
                    self._complete(2 * pair, [(chain, 0) for chain in chains])
        except VirtqueueError as exc:  # the queue broke under us: nothing left to hand back
            self.report_broken(str(exc))

    def _on_wake(self, resources: QueueResources) -> None:
        self._configure()

    def _running(self) -> bool:
        return self.state is DeviceState.ACTIVE and not self.needs_reset

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run a host-triggered step; a malformed ring breaks the device, as in queue_notify."""
        if not self._running():
            return
        try:
            work()
        except VirtqueueError as exc:
            self.report_broken(str(exc))

    def _service_all(self) -> None:
        for pair in range(self._data_pairs):
            self._kick(2 * pair + 1)
        self._rx_pump()
        if self._ctrl_index >= 0:
            self._kick(self._ctrl_index)

    def _kick(self, index: int) -> None:
        if self._running() and index < len(self.queues):
            self.queue_notify(index)

    def _complete(self, index: int, completions: Completions) -> None:
        if index < len(self.queues):
            self._return_used(index, self.queues[index], completions)

    # -- queue dispatch ------------------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        if index == self._ctrl_index:
            self._process_ctrl(queue)
        elif index < 2 * self._data_pairs:
            if index % 2:
                self._process_tx(index, queue)
            else:
                self._rx_waiting = False  # new buffers, perhaps the ones a frame waits for
                self._rx_pump()
        else:
            self._limiter.warn("notify", None, "notify of queue %d, which has no role", index)

    # -- transmit ------------------------------------------------------------------------------

    def _process_tx(self, index: int, queue: DeviceQueue) -> None:
        """Send every available frame, pausing while the back end would block."""
        if self._tx_blocked is not None:
            return  # resumed by backend_writable, in order
        done: Completions = []
        try:
            while (chain := queue.pop()) is not None:
                if not self._transmit(chain, index // 2):
                    self._tx_blocked = (index, chain)
                    break
                done.append((chain, 0))
        finally:
            self._complete(index, done)

    def _process_disabled_queue(self, index: int, queue: DeviceQueue) -> None:
        """A disabled ring (vhost-user.rst "Ring states"): transmit frames are
        taken and discarded (counted), never sent later; receive buffers and
        control commands wait for the ring to be enabled again."""
        if index == self._ctrl_index or index >= 2 * self._data_pairs or not index % 2:
            return
        done: Completions = []
        try:
            while (chain := queue.pop()) is not None:
                done.append((chain, 0))
        finally:
            if done:
                self.stats["tx_dropped_ring_disabled"] += len(done)
                self._limiter.warn(
                    "tx_dropped_ring_disabled",
                    None,
                    "discarded %d frames of disabled transmitq %d",
                    len(done),
                    index,
                )
            self._complete(index, done)

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """As :meth:`VirtioDevice.set_queue_enabled`; a frame waiting for a receiveq
        the front end disables is steered afresh at once (:meth:`_steer`).

        Front ends choose pairs by disabling rings (QEMU's virtio-net, DPDK's
        virtio-user), and nothing says a disabled ring comes back: a frame
        left waiting for it would hold up every later frame of every pair.
        """
        super().set_queue_enabled(index, enabled)
        if not enabled and self._rx_len and index == 2 * self._rx_pair:
            self._rx_waiting = False
            self._guarded(self._rx_pump)

    def _tx_resume(self) -> None:
        blocked, self._tx_blocked = self._tx_blocked, None
        if blocked is None:
            return
        index, chain = blocked
        if not self._transmit(chain, index // 2):
            self._tx_blocked = blocked
            return
        self._complete(index, [(chain, 0)])
        for pair in range(self._data_pairs):
            if self._tx_blocked is None:
                self._kick(2 * pair + 1)

    def _count(self, drop: Dropped) -> None:
        """Count a dropped frame or chain, with a log line (rate-limited) unless it is no error."""
        self.stats[drop.counter] += 1
        if drop.message:
            self._limiter.warn(drop.counter, None, drop.message, *drop.log_args)

    def _transmit(self, chain: DescriptorChain, pair: int) -> bool:
        """Check and send one frame (:func:`~.frames.gather_tx`); False only when the
        back end would block.

        Dropped frames return True (the chain is used with 0 bytes either
        way: transmit buffers are device-readable only).
        """
        try:
            parts = gather_tx(chain, self._views, self.acked_features, self._mtu_limit)
        except Dropped as drop:
            self._count(drop)
            return True
        if not self._link_up or self._backend_gone:
            self.stats["tx_dropped_link_down"] += 1
            return True
        if self._pairs > 1:
            self._flows.remember(chain.read(HDR_SIZE, FLOW_KEY_BYTES), pair)
        try:
            if not self.backend.send(parts):
                return False
        except BackendGone as exc:
            self._lose_backend(str(exc))
            self.stats["tx_dropped_link_down"] += 1
            return True
        except OSError as exc:
            self._count(Dropped("tx_backend_errors", "back end refused a frame: %s", exc))
            return True
        stats = self.stats
        stats["tx_frames"] += 1
        stats["tx_bytes"] += chain.readable_len - HDR_SIZE
        return True

    # -- receive -------------------------------------------------------------------------------

    def _rx_pump(self) -> None:
        """Move frames from the back end into receive buffers until either runs out.

        Each frame is checked and its header adapted (:func:`~.frames.adapt_rx`),
        steered to a pair and placed (:meth:`~.receive.RxBuffers.place`); one
        that does not fit yet waits in the bounce buffer, and the back end is
        not read until it is placed.
        """
        if not self.link_up or not self._running():
            return
        backend = self.backend
        buf = self._rx_buf
        view = self._rx_view
        stats = self.stats
        completions: dict[int, Completions] = {}
        try:
            for _ in range(RX_BATCH):
                n = self._rx_len
                if not n:
                    if self._pairs == 1 and not (
                        self.queue_enabled(0) and self._rx[0].has_buffer(self.queues[0])
                    ):
                        # Leave the frames in the back end (the kernel's queue); a
                        # disabled receiveq gets none ("Ring states").
                        self._rx_waiting = True
                        break
                    try:
                        received = backend.recv_into(view)
                    except BackendGone as exc:
                        self._lose_backend(str(exc))
                        break
                    except OSError as exc:
                        stats["rx_backend_errors"] += 1
                        self._limiter.warn("rx-backend", None, "back end read failed: %s", exc)
                        break
                    if received is None:
                        break
                    n = received
                    rx_filter = self.rx_filter if self._filtering else None
                    try:
                        if adapt_rx(
                            buf, n, self._guest_offloads, self._mtu_limit, rx_filter, self.mac
                        ):
                            stats["rx_checksums_completed"] += 1
                    except Dropped as drop:
                        self._count(drop)
                        continue
                    self._rx_len = n
                    self._rx_pair = self._steer() if self._pairs > 1 else 0
                elif self._pairs > 1 and not self.queue_enabled(2 * self._rx_pair):
                    # Its receiveq was disabled while it waited (set_queue_enabled).
                    self._rx_pair = self._steer()
                index = 2 * self._rx_pair
                if not self.queue_enabled(index):
                    self._rx_waiting = True  # the frame waits until the ring is enabled again
                    break
                done = completions.setdefault(index, [])
                try:
                    if not self._rx[self._rx_pair].place(
                        self.queues[index], view[:n], self._mrg, done
                    ):
                        self._rx_waiting = True
                        break
                except Dropped as drop:
                    self._count(drop)
                else:
                    stats["rx_frames"] += 1
                    stats["rx_bytes"] += n - HDR_SIZE
                self._rx_len = 0
        finally:
            for index, done in completions.items():
                self._complete(index, done)

    def _lose_backend(self, reason: str) -> None:
        """The back end is gone for good: the link goes down, frames are dropped."""
        if self._backend_gone:
            return
        log.error("%s: back end %r is gone (%s): link down", self.name, self.backend, reason)
        self.stats["backend_gone"] += 1
        was_up = self.link_up
        self._backend_gone = True
        if was_up:
            self.config_changed()

    # -- multiqueue steering ---------------------------------------------------------------------

    def _steer(self) -> int:
        """The receiveq of the pending frame: where its flow was last sent from, else by hash."""
        frame = self._rx_view[HDR_SIZE : min(self._rx_len, HDR_SIZE + FLOW_KEY_BYTES)]
        pair = self._flows.steer(frame, self._pairs)
        if isinstance(self.queues[2 * pair], DisabledQueue) or not self.queue_enabled(2 * pair):
            pair = 0
        return pair

    # -- control queue ---------------------------------------------------------------------------

    def _process_ctrl(self, queue: DeviceQueue) -> None:
        """Answer every command (device-types/net: Control Virtqueue)."""
        done: Completions = []
        try:
            while (chain := queue.pop()) is not None:
                if chain.writable_len < 1:
                    self.stats["ctrl_bad_chain"] += 1
                    self._limiter.warn(
                        "ctrl_bad_chain", None, "control command with no room for ack"
                    )
                    done.append((chain, 0))
                    continue
                if chain.readable_len > MAX_CTRL_COMMAND:
                    ack = self._ctrl_error(f"command of {chain.readable_len} bytes")
                else:
                    ack = self._control(chain.read(0, chain.readable_len))
                done.append((chain, chain.write(bytes([ack]))))
        finally:
            self._complete(self._ctrl_index, done)

    def _control(self, command: bytes) -> int:
        """Carry out one command (:func:`~.control.parse_command`); the ack byte."""
        self.stats["ctrl_commands"] += 1
        try:
            self._apply(control.parse_command(command, self.acked_features, self.max_queue_pairs))
        except control.CtrlError as exc:
            return self._ctrl_error(str(exc))
        return CtrlAck.OK

    def _ctrl_error(self, reason: str) -> int:
        self.stats["ctrl_errors"] += 1
        self._limiter.warn("ctrl", None, "control command refused: %s", reason)
        return CtrlAck.ERR

    def _apply(self, command: control.Command) -> None:
        if isinstance(command, control.RxMode):
            setattr(self.rx_filter, command.name, command.on)
        elif isinstance(command, control.MacTable):
            self.rx_filter.set_tables(command.unicast, command.multicast)
        elif isinstance(command, control.MacAddr):
            if command.mac != self.mac:
                # mac in config space changes before the command is used.
                self.mac = command.mac
                self.config_changed()
        elif isinstance(command, control.QueuePairs):
            self._pairs = command.pairs
            self._flows.clear()
            if self._rx_pair >= command.pairs:
                self._rx_pair = 0
        elif isinstance(command, control.GuestOffloads):
            self._guest_offloads = command.offloads
            self._apply_offloads()

    # -- snapshot --------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "base_mac": format_mac(self.base_mac),
            "mtu": self.mtu,
            "queue_pairs": self.max_queue_pairs,
            "queue_size": self.queue_size,
        }

    def _snapshot_model(self) -> Any:
        """Address, link, filters, offloads, pairs, counters, and a frame waiting for buffers
        (:mod:`.persist`)."""
        state = persist.NetState(
            mac=self.mac,
            link_up=self._link_up,
            config_change_pending=self._config_change_pending,
            pairs=self._pairs,
            guest_offloads=self._guest_offloads,
            rx_filter=self.rx_filter,
            stats=self.stats,
            rx_pending=bytes(self._rx_buf[: self._rx_len]),
            rx_pending_pair=self._rx_pair,
        )
        return persist.save(self._options(), state)

    def _restore_model(self, state: Any) -> None:
        restored = persist.load(state, self._options(), self.max_queue_pairs)
        self.mac = restored.mac
        self._link_up = restored.link_up
        self._config_change_pending = restored.config_change_pending
        self._pairs = restored.pairs
        self._guest_offloads = restored.guest_offloads
        self.rx_filter = restored.rx_filter
        self.stats = restored.stats
        pending = restored.rx_pending
        self._rx_buf[: len(pending)] = pending
        self._rx_len = len(pending)
        self._rx_pair = restored.rx_pending_pair
        self._tx_blocked = None
        for rx in self._rx:
            rx.stash.clear()
