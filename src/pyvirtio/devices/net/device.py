"""virtio-net (device-types/net), sans-IO, over a pluggable back end.

The device moves frames between its virtqueues and a :class:`~.backends.
NetBackend` (a TAP, a socket pair) and never blocks: the host's event loop
polls what :meth:`Net.host_fds` lists and calls back.

* Guest to back end: on a transmitq notification every available frame is
  validated and sent, its header rebuilt from the checked fields and the
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

import base64
import binascii
import logging
import os
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.constants import DeviceId
from pyvirtio.device import (
    COMMON_FEATURES,
    DeviceState,
    QueueResources,
    VirtioDevice,
    expect_bool,
    expect_str,
    expect_uint,
)
from pyvirtio.devices.net.backends import BackendGone, NetBackend
from pyvirtio.devices.net.wire import (
    BROADCAST,
    CONFIG_LAYOUT,
    CTRL_GUEST_OFFLOADS_SET,
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
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    Gso,
    HdrFlag,
    NetFeature,
    ctrl_queue_index,
    format_mac,
    internet_checksum,
    missing_requirements,
    parse_mac,
)
from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, VirtqueueError
from pyvirtio.virtqueue.disabled import DisabledQueue

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "LOG_INTERVAL",
    "MAC_TABLE_ENTRIES",
    "STAT_KEYS",
    "Net",
]

log = logging.getLogger(__name__)

F = NetFeature

#: The device-specific features offered (MQ is added for more than one pair).
OFFERED_NET_FEATURES = IMPLEMENTED_NET_FEATURES

DEFAULT_QUEUE_SIZE = 256
#: Addresses per MAC filter table; beyond that the device accepts every
#: address of that kind, as the spec's footnote allows (and QEMU does).
MAC_TABLE_ENTRIES = 64
#: Longest control command read (a full MAC table set is about 800 bytes).
MAX_CTRL_COMMAND = 1 << 16
#: Frames moved from the back end per call, so one busy back end cannot
#: monopolise the host loop (the fd stays readable; the host calls again).
RX_BATCH = 256
#: Seconds between two log lines about the same kind of problem.
LOG_INTERVAL = 10.0
#: Flows remembered for steering replies to the transmitq a flow used.
FLOW_TABLE_SIZE = 4096

#: Counters in :attr:`Net.stats`.
STAT_KEYS = (
    "tx_frames",
    "tx_bytes",
    "rx_frames",
    "rx_bytes",
    "tx_dropped_bad_chain",
    "tx_dropped_runt",
    "tx_dropped_oversize",
    "tx_dropped_bad_header",
    "tx_dropped_link_down",
    "tx_dropped_sleep",
    "tx_dropped_ring_disabled",
    "tx_backend_errors",
    "rx_dropped_filter",
    "rx_dropped_runt",
    "rx_dropped_oversize",
    "rx_dropped_offload",
    "rx_dropped_bad_header",
    "rx_dropped_no_room",
    "rx_dropped_reset",
    "rx_bad_chain",
    "rx_buffers_returned",
    "rx_backend_errors",
    "rx_checksums_completed",
    "ctrl_commands",
    "ctrl_errors",
    "ctrl_bad_chain",
    "backend_gone",
)

_HDR = struct.Struct("<BBHHHHH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CSUM = struct.Struct(">H")

#: gso_type (without ECN) -> the feature a driver needs to receive it / the
#: device needs negotiated to accept it from the driver.
_GSO_GUEST: dict[int, int] = {
    Gso.TCPV4: F.GUEST_TSO4.mask,
    Gso.TCPV6: F.GUEST_TSO6.mask,
    Gso.UDP: F.GUEST_UFO.mask,
}
_GSO_HOST: dict[int, int] = {
    Gso.TCPV4: F.HOST_TSO4.mask,
    Gso.TCPV6: F.HOST_TSO6.mask,
    Gso.UDP: F.HOST_UFO.mask,
}
# Plain ints on the per-frame paths: IntFlag arithmetic costs a call each.
_NEEDS_CSUM = int(HdrFlag.NEEDS_CSUM)
_RX_FLAGS = int(HdrFlag.NEEDS_CSUM | HdrFlag.DATA_VALID)
_GSO_ECN = int(Gso.ECN)
_GSO_NONE = int(Gso.NONE)
_F_CSUM = F.CSUM.mask
_F_GUEST_CSUM = F.GUEST_CSUM.mask
_F_HOST_ECN = F.HOST_ECN.mask
_F_GUEST_ECN = F.GUEST_ECN.mask


def _gso_allowed(
    gso: int, flags: int, features: int, need_by_type: dict[int, int], ecn_feature: int
) -> bool:
    """Whether a GSO frame (``gso`` not NONE) may cross to a side with ``features``.

    Its type needs its own TSO/UFO feature (``need_by_type``), the ECN bit
    needs ``ecn_feature``, and it must ask for a checksum (device-types/net:
    Packet Transmission and Processing of Incoming Packets).  Transmit
    checks host features, receive the guest's offloads.
    """
    return (
        bool(features & need_by_type.get(gso & ~_GSO_ECN, 0))
        and (not gso & _GSO_ECN or bool(features & ecn_feature))
        and bool(flags & _NEEDS_CSUM)
    )


_RX_COMMANDS: dict[int, tuple[str, NetFeature]] = {
    CtrlRx.PROMISC: ("promisc", F.CTRL_RX),
    CtrlRx.ALLMULTI: ("allmulti", F.CTRL_RX),
    CtrlRx.ALLUNI: ("alluni", F.CTRL_RX_EXTRA),
    CtrlRx.NOMULTI: ("nomulti", F.CTRL_RX_EXTRA),
    CtrlRx.NOUNI: ("nouni", F.CTRL_RX_EXTRA),
    CtrlRx.NOBCAST: ("nobcast", F.CTRL_RX_EXTRA),
}


class _CtrlError(Exception):
    """A control command answered with VIRTIO_NET_ERR; the message says why."""


@dataclass
class RxFilter:
    """The receive filter (device-types/net: Packet Receive Filtering, MAC Address Filtering).

    The defaults are the state after reset: promiscuous (see the module
    docstring), empty tables (the spec's "MUST have an empty MAC filtering
    table on reset").
    """

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    #: More addresses than MAC_TABLE_ENTRIES were set: accept that kind.
    unicast_overflow: bool = False
    multicast_overflow: bool = False

    def accepts(self, dst: bytes, mac: bytes) -> bool:
        """Whether a frame to ``dst`` reaches a driver whose address is ``mac``."""
        if self.promisc:
            return True  # SHOULD take effect whatever the other modes say
        if dst == BROADCAST:
            return not self.nobcast  # NOMULTI does not apply to broadcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multicast_overflow or dst in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.unicast_overflow or dst == mac or dst in self.unicast

    def to_json(self) -> dict[str, Any]:
        return {
            "promisc": self.promisc,
            "allmulti": self.allmulti,
            "alluni": self.alluni,
            "nomulti": self.nomulti,
            "nouni": self.nouni,
            "nobcast": self.nobcast,
            "unicast": [format_mac(m) for m in self.unicast],
            "multicast": [format_mac(m) for m in self.multicast],
            "unicast_overflow": self.unicast_overflow,
            "multicast_overflow": self.multicast_overflow,
        }

    @classmethod
    def from_json(cls, doc: Any) -> RxFilter:
        if not isinstance(doc, dict):
            raise ValueError("filter state must be an object")
        flags: dict[str, Any] = {
            name: expect_bool(doc[name])
            for name in (
                "promisc",
                "allmulti",
                "alluni",
                "nomulti",
                "nouni",
                "nobcast",
                "unicast_overflow",
                "multicast_overflow",
            )
        }
        tables: dict[str, Any] = {}
        for name in ("unicast", "multicast"):
            entries = doc[name]
            if not isinstance(entries, list) or len(entries) > MAC_TABLE_ENTRIES:
                raise ValueError(f"bad {name} table {entries!r}")
            tables[name] = [parse_mac(expect_str(e)) for e in entries]
        return cls(**flags, **tables)


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
        self._config_change_pending = False
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
        self._rx_stash: list[list[DescriptorChain]] = [[] for _ in range(queue_pairs)]
        #: The receiveq a pending frame needs has no buffers: not reading the back end.
        self._rx_waiting = False
        # Transmit side: the frame the back end refused for now (queue index, chain).
        self._tx_blocked: tuple[int, DescriptorChain] | None = None
        #: flow key -> pair whose transmitq the flow last used (MQ steering).
        self._flows: dict[bytes, int] = {}
        #: The window of the region last used by _guest_view.
        self._region_cache = GuestMemory.NO_WINDOW

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
        if self.state is DeviceState.ASLEEP:
            self._config_change_pending = True
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
        for stash in self._rx_stash:
            stash.clear()  # the queues are gone; the driver reclaims its buffers
        self._tx_blocked = None
        self._rx_waiting = False
        self._flows.clear()
        self.rx_filter = RxFilter()
        self.mac = self.base_mac
        self._pairs = 1
        self._guest_offloads = 0
        self._config_change_pending = False
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
            for pair, stash in enumerate(self._rx_stash):
                if stash:
                    self.stats["rx_buffers_returned"] += len(stash)
                    chains, stash[:] = list(stash), []
                    self._complete(2 * pair, [(chain, 0) for chain in chains])
        except VirtqueueError as exc:  # the queue broke under us: nothing left to hand back
            self.report_broken(str(exc))

    def _on_wake(self, resources: QueueResources) -> None:
        self._configure()
        if self._config_change_pending:
            self._config_change_pending = False
            resources.interrupt.signal_config_change()

    def wake(self, resources: QueueResources | None = None) -> None:
        super().wake(resources)
        # Only an active device can notify; otherwise the driver reads the
        # new state when it next sets the device up.
        self._config_change_pending = False

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

    def _complete(self, index: int, completions: list[tuple[DescriptorChain, int]]) -> None:
        if completions and index < len(self.queues):
            self.queues[index].add_used_batch(completions)
            self.signal_used(index)

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
        done: list[tuple[DescriptorChain, int]] = []
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
        done: list[tuple[DescriptorChain, int]] = []
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

    def _tx_drop(self, counter: str, message: str, *args: object) -> bool:
        self.stats[counter] += 1
        self._limiter.warn(counter, None, message, *args)
        return True

    def _transmit(self, chain: DescriptorChain, pair: int) -> bool:
        """Validate and send one frame; False only when the back end would block.

        Dropped frames return True (the chain is used with 0 bytes either
        way: transmit buffers are device-readable only).  The header sent on
        is rebuilt from the validated fields, so bits a driver must not set
        (DATA_VALID, RSC_INFO: device-types/net: Packet Transmission) never
        reach the back end.
        """
        if chain.writable:
            return self._tx_drop("tx_dropped_bad_chain", "transmit chain has device-writable part")
        total = chain.readable_len
        if total < HDR_SIZE + ETH_HLEN:
            return self._tx_drop("tx_dropped_runt", "transmit of %d bytes, header included", total)
        frame_len = total - HDR_SIZE
        if frame_len > MAX_FRAME:
            return self._tx_drop("tx_dropped_oversize", "transmit frame of %d bytes", frame_len)
        readable = chain.readable
        # Header and frame in one buffer, as Linux sends them: one view.
        whole = self._guest_view(chain.mem, *readable[0]) if len(readable) == 1 else None
        if whole is not None:
            flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack_from(whole)
            frame: list[memoryview] = [whole[HDR_SIZE:]]
        else:
            head = chain.read(0, HDR_SIZE)
            flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack(head)
            frame = chain.readable_views(HDR_SIZE)
        acked = self.acked_features
        if gso & ~_GSO_ECN:
            if not _gso_allowed(gso, flags, acked, _GSO_HOST, _F_HOST_ECN) or gso_size == 0:
                return self._tx_drop(
                    "tx_dropped_bad_header",
                    "transmit with gso_type %#x, gso_size %d not allowed",
                    gso,
                    gso_size,
                )
        else:
            gso = _GSO_NONE
            if self._mtu_limit and frame_len > self._mtu_limit:
                return self._tx_drop(
                    "tx_dropped_oversize", "transmit of %d bytes above the MTU", frame_len
                )
        if flags & _NEEDS_CSUM and (
            not acked & _F_CSUM or csum_start + csum_offset + 2 > frame_len
        ):
            return self._tx_drop(
                "tx_dropped_bad_header",
                "transmit asks checksum at %d+%d of a %d-byte frame%s",
                csum_start,
                csum_offset,
                frame_len,
                "" if acked & _F_CSUM else " without VIRTIO_NET_F_CSUM",
            )
        if not self._link_up or self._backend_gone:
            self.stats["tx_dropped_link_down"] += 1
            return True
        parts: list[bytes | memoryview] = [
            _HDR.pack(flags & _NEEDS_CSUM, gso, hdr_len, gso_size, csum_start, csum_offset, 0),
            *frame,
        ]
        if self._pairs > 1:
            self._remember_flow(chain, pair)
        try:
            if not self.backend.send(parts):
                return False
        except BackendGone as exc:
            self._lose_backend(str(exc))
            self.stats["tx_dropped_link_down"] += 1
            return True
        except OSError as exc:
            return self._tx_drop("tx_backend_errors", "back end refused a frame: %s", exc)
        stats = self.stats
        stats["tx_frames"] += 1
        stats["tx_bytes"] += frame_len
        return True

    def _guest_view(self, mem: GuestMemory, addr: int, length: int) -> memoryview | None:
        """A view of ``[addr, addr + length)``; None when it spans regions.

        Frames of one-buffer chains go through here instead of
        ``GuestMemory.views``, with the last region used kept as a
        ``GuestMemory.RegionWindow``, as ``Block._locate`` does for headers.  A buffer
        across two regions (allowed, and rare) takes the general path.
        """
        window = self._region_cache
        if not window.covers(mem, addr, length):
            try:
                window = mem.window(addr)
            except GuestMemoryError as exc:  # regions removed since the chain was parsed
                raise VirtqueueError(str(exc)) from exc
            if addr + length > window.end:
                return None
            self._region_cache = window
        offset = addr - window.base
        return window.view[offset : offset + length]

    # -- receive -------------------------------------------------------------------------------

    def _rx_pump(self) -> None:
        """Move frames from the back end into receive buffers until either runs out."""
        if not self.link_up or not self._running():
            return
        backend = self.backend
        view = self._rx_view
        completions: dict[int, list[tuple[DescriptorChain, int]]] = {}
        try:
            for _ in range(RX_BATCH):
                if not self._rx_len:
                    if self._pairs == 1 and not self._rx_has_buffer(0):
                        # Leave the frames in the back end (the kernel's queue).
                        self._rx_waiting = True
                        break
                    try:
                        n = backend.recv_into(view)
                    except BackendGone as exc:
                        self._lose_backend(str(exc))
                        break
                    except OSError as exc:
                        self.stats["rx_backend_errors"] += 1
                        self._limiter.warn("rx-backend", None, "back end read failed: %s", exc)
                        break
                    if n is None:
                        break
                    if not self._accept(n):
                        continue
                if not self._place(completions):
                    self._rx_waiting = True
                    break
        finally:
            for index, done in completions.items():
                self._complete(index, done)

    def _rx_drop(self, counter: str, message: str, *args: object) -> bool:
        self.stats[counter] += 1
        self._limiter.warn(counter, None, message, *args)
        return False

    def _accept(self, n: int) -> bool:
        """Check and adapt the frame in the bounce buffer for the driver; False drops it.

        The header is made to say only what the driver negotiated
        (device-types/net: Processing of Incoming Packets): without
        GUEST_CSUM ``flags`` is 0 and a partial checksum is completed here;
        GSO types the driver did not accept are dropped (the device cannot
        segment); ``num_buffers`` is set when the frame is placed.
        """
        buf = self._rx_buf
        if n >= len(buf):
            return self._rx_drop(
                "rx_dropped_oversize", "frame from the back end above %d bytes", MAX_FRAME
            )
        if n < HDR_SIZE + ETH_HLEN:
            return self._rx_drop("rx_dropped_runt", "runt frame of %d bytes from the back end", n)
        frame_len = n - HDR_SIZE
        if self._filtering and not self.rx_filter.accepts(
            bytes(buf[HDR_SIZE : HDR_SIZE + 6]), self.mac
        ):
            self.stats["rx_dropped_filter"] += 1
            return False
        flags = buf[0]
        gso = buf[1]
        offloads = self._guest_offloads
        if gso & ~_GSO_ECN:
            if not _gso_allowed(gso, flags, offloads, _GSO_GUEST, _F_GUEST_ECN):
                return self._rx_drop(
                    "rx_dropped_offload", "GSO frame (type %#x) the driver cannot take", gso
                )
        else:
            gso = _GSO_NONE
            if self._mtu_limit and frame_len > self._mtu_limit:
                return self._rx_drop(
                    "rx_dropped_oversize", "frame of %d bytes above the MTU", frame_len
                )
        if flags & _NEEDS_CSUM:
            csum_start, csum_offset = struct.unpack_from("<HH", buf, 6)
            if csum_start + csum_offset + 2 > frame_len:
                return self._rx_drop(
                    "rx_dropped_bad_header",
                    "checksum at %d+%d of a %d-byte frame",
                    csum_start,
                    csum_offset,
                    frame_len,
                )
            if not offloads & _F_GUEST_CSUM:
                self._complete_checksum(n, csum_start, csum_offset)
                flags = 0
        if not offloads & _F_GUEST_CSUM:
            flags = 0  # MUST be zero without GUEST_CSUM
        buf[0] = flags & _RX_FLAGS
        buf[1] = gso
        self._rx_len = n
        self._rx_pair = self._steer() if self._pairs > 1 else 0
        return True

    def _complete_checksum(self, n: int, csum_start: int, csum_offset: int) -> None:
        """Finish a partial checksum for a driver without GUEST_CSUM.

        The field at csum_start + csum_offset holds the pseudo-header sum;
        summing from csum_start to the end with it in place gives the value
        to store (Packet Transmission, item 3).
        """
        value = internet_checksum(self._rx_view[HDR_SIZE + csum_start : n]) or 0xFFFF
        _CSUM.pack_into(self._rx_buf, HDR_SIZE + csum_start + csum_offset, value)
        self.stats["rx_checksums_completed"] += 1

    def _rx_has_buffer(self, pair: int) -> bool:
        if not self.queue_enabled(2 * pair):
            return False  # a disabled receiveq gets no frames ("Ring states")
        if self._rx_stash[pair]:
            return True
        queue = self.queues[2 * pair]
        return queue.has_available() or queue.enable_notifications()

    def _pop_rx(
        self, queue: DeviceQueue, done: list[tuple[DescriptorChain, int]]
    ) -> DescriptorChain | None:
        """The next usable receive chain; unusable ones are returned empty and counted."""
        retried = False
        while True:
            chain = queue.pop()
            if chain is None:
                # Ask to be notified; buffers may have come in meanwhile.
                if retried or not queue.enable_notifications():
                    return None
                retried = True
                continue
            if chain.readable or chain.writable_len < HDR_SIZE:
                self.stats["rx_bad_chain"] += 1
                self._limiter.warn(
                    "rx_bad_chain",
                    None,
                    "receive chain with %d readable and %d writable bytes",
                    chain.readable_len,
                    chain.writable_len,
                )
                done.append((chain, 0))
                continue
            return chain

    def _place(self, completions: dict[int, list[tuple[DescriptorChain, int]]]) -> bool:
        """Put the pending frame into receive buffers; False when they ran out first.

        Without MRG_RXBUF a frame takes one chain, which must hold it (else
        the frame is dropped and the chain kept for the next one).  With it,
        chains are taken until they hold the frame, every one but the last
        filled completely, and returned together (Setting Up Receive Buffers,
        Processing of Incoming Packets).  Chains taken while the queue runs
        dry wait in the stash for the next call.
        """
        pair = self._rx_pair
        index = 2 * pair
        if not self.queue_enabled(index):
            return False  # the frame waits until the ring is enabled again
        queue = self.queues[index]
        stash = self._rx_stash[pair]
        done = completions.setdefault(index, [])
        n = self._rx_len
        view = self._rx_view
        if not stash:
            # The common case: the next chain holds the whole frame.
            chain = self._pop_rx(queue, done)
            if chain is None:
                return False
            if chain.writable_len >= n:
                _U16.pack_into(self._rx_buf, 10, 1)
                done.append((chain, self._fill(chain, view[:n])))
                return self._placed(n)
            stash.append(chain)
        if not self._mrg:
            if not stash:
                chain = self._pop_rx(queue, done)
                if chain is None:
                    return False
                stash.append(chain)
            chain = stash[0]
            if chain.writable_len < n:
                self._rx_len = 0
                return not self._rx_drop(
                    "rx_dropped_no_room",
                    "%d-byte frame does not fit a %d-byte receive buffer (no MRG_RXBUF)",
                    n,
                    chain.writable_len,
                )
            _U16.pack_into(self._rx_buf, 10, 1)
            done.append((chain, self._fill(chain, view[:n])))
            stash.clear()
        else:
            capacity = sum(c.writable_len for c in stash)
            while capacity < n:
                if len(stash) >= queue.size:
                    self._rx_len = 0
                    return not self._rx_drop(
                        "rx_dropped_no_room",
                        "%d-byte frame does not fit the whole receive queue",
                        n,
                    )
                chain = self._pop_rx(queue, done)
                if chain is None:
                    return False
                stash.append(chain)
                capacity += chain.writable_len
            count = 0
            remaining = n
            while remaining > 0:
                remaining -= stash[count].writable_len
                count += 1
            _U16.pack_into(self._rx_buf, 10, count)
            pos = 0
            for chain in stash[:count]:
                take = min(chain.writable_len, n - pos)
                self._fill(chain, view[pos : pos + take])
                done.append((chain, take))
                pos += take
            del stash[:count]
        return self._placed(n)

    def _placed(self, n: int) -> bool:
        stats = self.stats
        stats["rx_frames"] += 1
        stats["rx_bytes"] += n - HDR_SIZE
        self._rx_len = 0
        return True

    def _fill(self, chain: DescriptorChain, data: memoryview) -> int:
        """Copy ``data`` to the start of the chain's writable part; returns its length."""
        writable = chain.writable
        if len(writable) == 1:
            target = self._guest_view(chain.mem, writable[0][0], len(data))
            if target is not None:
                target[:] = data
                return len(data)
        return chain.write(data)

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
        key = _flow_key(self._rx_view[HDR_SIZE : min(self._rx_len, HDR_SIZE + 128)])
        pairs = self._pairs
        pair = self._flows.get(key, -1) if key is not None else -1
        if not 0 <= pair < pairs:
            pair = hash(key) % pairs if key is not None else 0
        if isinstance(self.queues[2 * pair], DisabledQueue) or not self.queue_enabled(2 * pair):
            pair = 0
        return pair

    def _remember_flow(self, chain: DescriptorChain, pair: int) -> None:
        key = _flow_key(chain.read(HDR_SIZE, 128))
        if key is None:
            return
        if len(self._flows) >= FLOW_TABLE_SIZE:
            self._flows.clear()
        self._flows[key] = pair

    # -- control queue ---------------------------------------------------------------------------

    def _process_ctrl(self, queue: DeviceQueue) -> None:
        """Answer every command (device-types/net: Control Virtqueue)."""
        done: list[tuple[DescriptorChain, int]] = []
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

    def _ctrl_error(self, reason: str) -> int:
        self.stats["ctrl_errors"] += 1
        self._limiter.warn("ctrl", None, "control command refused: %s", reason)
        return CtrlAck.ERR

    def _control(self, command: bytes) -> int:
        self.stats["ctrl_commands"] += 1
        if len(command) < 2:
            return self._ctrl_error(f"{len(command)}-byte command")
        cls, cmd, data = command[0], command[1], command[2:]
        try:
            if cls == CtrlClass.RX:
                self._ctrl_rx(cmd, data)
            elif cls == CtrlClass.MAC:
                self._ctrl_mac(cmd, data)
            elif cls == CtrlClass.MQ:
                self._ctrl_mq(cmd, data)
            elif cls == CtrlClass.GUEST_OFFLOADS:
                self._ctrl_offloads(cmd, data)
            else:
                raise _CtrlError(f"unsupported class {cls}")
        except _CtrlError as exc:
            return self._ctrl_error(f"class {cls} command {cmd}: {exc}")
        return CtrlAck.OK

    def _require(self, feature: NetFeature) -> None:
        if not self.has_feature(feature):
            raise _CtrlError(f"{feature.name} not negotiated")

    def _ctrl_rx(self, cmd: int, data: bytes) -> None:
        """Packet Receive Filtering: one byte, 0 off / non-zero on."""
        entry = _RX_COMMANDS.get(cmd)
        if entry is None:
            raise _CtrlError("unknown RX command")
        name, feature = entry
        self._require(feature)
        if len(data) != 1:
            raise _CtrlError(f"{len(data)} bytes of data, not 1")
        setattr(self.rx_filter, name, bool(data[0]))

    def _ctrl_mac(self, cmd: int, data: bytes) -> None:
        if cmd == CtrlMac.TABLE_SET:
            # Two struct virtio_net_ctrl_mac back to back: unicast, multicast.
            self._require(F.CTRL_RX)
            tables: list[list[bytes]] = []
            pos = 0
            for _ in range(2):
                if pos + 4 > len(data):
                    raise _CtrlError("MAC table truncated")
                (entries,) = _U32.unpack_from(data, pos)
                pos += 4
                end = pos + 6 * entries
                if end > len(data):
                    raise _CtrlError(f"MAC table of {entries} entries truncated")
                tables.append([data[i : i + 6] for i in range(pos, end, 6)])
                pos = end
            if pos != len(data):
                raise _CtrlError(f"{len(data) - pos} bytes after the MAC tables")
            uni, multi = tables
            f = self.rx_filter
            f.unicast_overflow = len(uni) > MAC_TABLE_ENTRIES
            f.multicast_overflow = len(multi) > MAC_TABLE_ENTRIES
            f.unicast = [] if f.unicast_overflow else uni
            f.multicast = [] if f.multicast_overflow else multi
        elif cmd == CtrlMac.ADDR_SET:
            self._require(F.CTRL_MAC_ADDR)
            if len(data) != 6:
                raise _CtrlError(f"address of {len(data)} bytes")
            if data[0] & 1:
                raise _CtrlError(f"{format_mac(data)} is a multicast address")
            if data != self.mac:
                # mac in config space changes before the command is used.
                self.mac = bytes(data)
                self.config_changed()
        else:
            raise _CtrlError("unknown MAC command")

    def _ctrl_mq(self, cmd: int, data: bytes) -> None:
        if cmd != CtrlMq.VQ_PAIRS_SET:
            raise _CtrlError("unknown MQ command")
        self._require(F.MQ)
        if len(data) != 2:
            raise _CtrlError(f"{len(data)} bytes of data, not 2")
        (pairs,) = _U16.unpack(data)
        if not 1 <= pairs <= self.max_queue_pairs:
            raise _CtrlError(f"{pairs} pairs requested, the device has {self.max_queue_pairs}")
        self._pairs = pairs
        self._flows.clear()
        if self._rx_pair >= pairs:
            self._rx_pair = 0

    def _ctrl_offloads(self, cmd: int, data: bytes) -> None:
        if cmd != CTRL_GUEST_OFFLOADS_SET:
            raise _CtrlError("unknown GUEST_OFFLOADS command")
        self._require(F.CTRL_GUEST_OFFLOADS)
        if len(data) != 8:
            raise _CtrlError(f"{len(data)} bytes of data, not 8")
        (offloads,) = _U64.unpack(data)
        allowed = self.acked_features & GUEST_OFFLOADS
        if offloads & ~allowed:
            raise _CtrlError(f"offloads {offloads & ~allowed:#x} not negotiated")
        problems = missing_requirements(offloads)
        if problems:
            raise _CtrlError("; ".join(problems))
        self._guest_offloads = offloads
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
        """Address, link, filters, offloads, pairs, counters, and a frame waiting for buffers.

        Transmit work was finished by ``_on_sleep``; the back end itself (a
        TAP, a socket) is the host's and is not part of the state.
        """
        pending = bytes(self._rx_buf[: self._rx_len])
        return {
            "options": self._options(),
            "mac": format_mac(self.mac),
            "link_up": self._link_up,
            "config_change_pending": self._config_change_pending,
            "pairs": self._pairs,
            "guest_offloads": self._guest_offloads,
            "filter": self.rx_filter.to_json(),
            "stats": dict(self.stats),
            "rx_pending": base64.b64encode(pending).decode("ascii"),
            "rx_pending_pair": self._rx_pair,
        }

    def _restore_model(self, state: Any) -> None:
        try:
            if not isinstance(state, dict):
                raise ValueError("net state must be an object")
            options = state["options"]
            if options != self._options():
                raise ValueError(f"snapshot of a differently configured device: {options!r}")
            mac = parse_mac(expect_str(state["mac"]))
            link_up = expect_bool(state["link_up"])
            pending_change = expect_bool(state["config_change_pending"])
            pairs = expect_uint(state["pairs"])
            if not 1 <= pairs <= self.max_queue_pairs:
                raise ValueError(f"{pairs} queue pairs")
            offloads = expect_uint(state["guest_offloads"])
            if offloads & ~GUEST_OFFLOADS:
                raise ValueError(f"offloads {offloads:#x}")
            rx_filter = RxFilter.from_json(state["filter"])
            stats = state["stats"]
            # A snapshot taken before a counter existed restores with it at 0;
            # a counter this version does not know is refused.
            if not isinstance(stats, dict) or not set(stats) <= set(STAT_KEYS):
                raise ValueError("stats do not match")
            counters = {key: expect_uint(stats.get(key, 0)) for key in STAT_KEYS}
            pending = base64.b64decode(expect_str(state["rx_pending"]), validate=True)
            if pending and not HDR_SIZE + ETH_HLEN <= len(pending) <= HDR_SIZE + MAX_FRAME:
                raise ValueError(f"pending frame of {len(pending)} bytes")
            pending_pair = expect_uint(state["rx_pending_pair"])
            if pending_pair >= pairs:
                raise ValueError(f"pending frame for pair {pending_pair}")
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"malformed net state: {exc!r}") from exc
        self.mac = mac
        self._link_up = link_up
        self._config_change_pending = pending_change
        self._pairs = pairs
        self._guest_offloads = offloads
        self.rx_filter = rx_filter
        self.stats = counters
        self._rx_buf[: len(pending)] = pending
        self._rx_len = len(pending)
        self._rx_pair = pending_pair
        self._tx_blocked = None
        for stash in self._rx_stash:
            stash.clear()


def _flow_key(frame: bytes | bytearray | memoryview) -> bytes | None:
    """A direction-independent key of an IP flow (addresses, protocol, TCP/UDP ports)."""
    data = bytes(frame)
    if len(data) < ETH_HLEN:
        return None
    ethertype = data[12:14]
    off = ETH_HLEN
    if ethertype == b"\x81\x00" and len(data) >= off + VLAN_HLEN:
        ethertype = data[16:18]
        off += VLAN_HLEN
    if ethertype == b"\x08\x00" and len(data) >= off + 20:
        ihl = (data[off] & 0x0F) * 4
        proto = data[off + 9]
        src, dst = data[off + 12 : off + 16], data[off + 16 : off + 20]
        fragment = int.from_bytes(data[off + 6 : off + 8], "big") & 0x3FFF
        ports_at = off + ihl if proto in (6, 17) and not fragment else -1
    elif ethertype == b"\x86\xdd" and len(data) >= off + 40:
        proto = data[off + 6]
        src, dst = data[off + 8 : off + 24], data[off + 24 : off + 40]
        ports_at = off + 40 if proto in (6, 17) else -1
    else:
        return None
    sport = dport = b""
    if ports_at >= 0 and len(data) >= ports_at + 4:
        sport, dport = data[ports_at : ports_at + 2], data[ports_at + 2 : ports_at + 4]
    a, b = src + sport, dst + dport
    return bytes([proto]) + min(a, b) + max(a, b)
