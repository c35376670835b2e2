"""The back-end side of one vhost-user connection, as a sans-IO state machine.

A :class:`VhostUserSession` is what one front end negotiated with a
:class:`~pyvirtio.device.VirtioDevice`: features, protocol features, the
memory table, the rings, the status byte.  It is fed what the connection
received (bytes and the fds that came with them, :meth:`receive_data`, or
whole messages, :meth:`receive`) and answers with *actions* for its host to
carry out: a :class:`Reply` to send, a kick fd to watch (:class:`WatchKick`),
a call or err fd to signal from now on (:class:`SetNotifyFd`), a back-end
channel (:class:`SetBackendChannel`), fds to close (:class:`CloseFds`), the
connection to drop (:class:`Disconnect`).  It never touches a socket or an
eventfd and never blocks; the host (:class:`~.backend.VhostUserBackend`'s
event loop, a test, a fuzz target) owns those.  What it does itself is
the device's lifecycle (ack_features, activate, sleep/wake, reset,
queue_notify) and the memory table, through
:class:`~pyvirtio.memory.GuestMemory` (which maps the region fds it is given).

Ring states ("Ring states").  A ring is *started* by SET_VRING_KICK and
stopped by GET_VRING_BASE; with VHOST_USER_F_PROTOCOL_FEATURES negotiated it
is also *enabled* only by SET_VRING_ENABLE 1 (else it starts enabled).  A
ring is *ready* when it has a size, addresses, is started and enabled.

Activation policy.  A VirtioDevice is activated once with all its queues,
but QEMU configures and enables rings one message at a time and never says
"done" (unless STATUS is negotiated).  The device is activated when ring 0
is ready and every other *started* ring is ready too: QEMU sends every
SET_VRING_KICK before the first SET_VRING_ENABLE, so activation waits for the
last enable.  Rings never started are passed as
:class:`~pyvirtio.virtqueue.disabled.DisabledQueue`; one that becomes ready
later replaces its placeholder in the running device (as virtio-MMIO's
QueueReady after DRIVER_OK does).  If the device refuses (ActivationError,
e.g. a device that needs all its queues), activation is retried at the next
ring that becomes ready.  SET_STATUS with DRIVER_OK (STATUS negotiated) also
triggers an attempt with whatever rings are ready.

Stopping.  GET_VRING_BASE on a ring of a running device (and SET_STATUS 0,
RESET_OWNER, RESET_DEVICE, a new SET_MEM_TABLE or :meth:`close`) stops the
whole device: it is put to sleep (finishing in-flight requests), woken and
reset, its negotiated features re-acked, and every ring's next available
index is saved as that ring's base, so the GET_VRING_BASE replies (QEMU asks
for each ring in turn) report where each ring really is and a restart
without a new SET_VRING_BASE resumes there (:mod:`.rings` encodes packed
positions).

Addresses.  The memory table is a :class:`~.memory_table.RegionTable`
(``memory_table``): regions mapped into one GuestMemory keyed by
guest-physical address, which is what descriptors hold ("Memory access");
SET_VRING_ADDR gives ring addresses as front-end user addresses, which it
translates when the queue is built.

Hostile input.  A malformed message ends the session (one Disconnect).  A
well-formed request that cannot be honoured is refused: nothing changes,
its fds are closed, the front end gets a non-zero REPLY_ACK status if it
asked, and a log line, rate-limited per session.  Feature changes under
running rings, ring sizes past the maximum, bases outside the ring, user
ranges that overlap, memory that cannot be sealed against shrinking (unless
``unsealed_memory`` allows it) and slots past ``max_mem_slots`` are refused.
A request that defines a reply and fails ends the session (its reply cannot
say "error").

Extending it.  A new request is one handler in
:meth:`VhostUserSession._build_handlers` (payload in, reply payload out,
actions through ``_actions``).  Per-ring work on every pop and completion
(inflight tracking) wraps the queue where every ring's queue is made,
:meth:`VhostUserSession._build_queue`; the device sees only the wrapper.
A rule on memory regions (slots, overlaps, sealing, translation) goes to
:class:`~.memory_table.RegionTable`; the memory handlers here decide only
when the device stops around a change.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from pyvirtio.constants import DeviceStatus, Feature
from pyvirtio.device import DeviceState, VirtioDevice
from pyvirtio.irq import DeviceInterrupt
from pyvirtio.memory import GuestMemoryError
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.transport.vhost_user import actions, protocol
from pyvirtio.transport.vhost_user.inflight import InflightError, in_use
from pyvirtio.transport.vhost_user.inflight_rings import attach
from pyvirtio.transport.vhost_user.inflight_shm import (
    InflightArea,
    allocate,
    map_front_end_region,
)
from pyvirtio.transport.vhost_user.memory_table import RegionRefused, RegionTable
from pyvirtio.transport.vhost_user.rings import (
    QEMU_MAX_RING_SIZE,
    RingError,
    Vring,
    build_queue,
    check_base,
    check_queue_count,
    max_ring_size,
    ring_position,
)
from pyvirtio.virtqueue.common import DeviceQueue, VirtqueueError
from pyvirtio.virtqueue.disabled import DisabledQueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "QEMU_MAX_RING_SIZE",
    "VhostUserSession",
    "check_queue_count",
    "max_ring_size",
]

log = logging.getLogger(__name__)

#: Protocol features offered by default (vhost-user.rst "Protocol features").
DEFAULT_PROTOCOL_FEATURES = (
    protocol.ProtocolFeature.MQ.mask
    | protocol.ProtocolFeature.REPLY_ACK.mask
    | protocol.ProtocolFeature.BACKEND_REQ.mask
    | protocol.ProtocolFeature.CONFIG.mask
    | protocol.ProtocolFeature.RESET_DEVICE.mask
    | protocol.ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | protocol.ProtocolFeature.STATUS.mask
)
#: Protocol features a session can honour at all.  INFLIGHT_SHMFD is offered
#: where a host asks for it (``serve blk``): QEMU 7.2 sends GET/SET_INFLIGHT_FD
#: for vhost-user-blk and -scsi only (to vhost-user-vsock-device it negotiates
#: the bit and nothing more; and a restarted vsock back end has lost its
#: connections, so resubmitted packets would only be answered with resets).
_INFLIGHT_SHMFD = protocol.ProtocolFeature.INFLIGHT_SHMFD.mask
SUPPORTED_PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES | _INFLIGHT_SHMFD
#: Answer to GET_MAX_MEM_SLOTS (QEMU caps it to what the platform supports).
DEFAULT_MAX_MEM_SLOTS = 32
#: A repeated error of one kind is logged at most once per this many seconds.
LOG_INTERVAL = 30.0

F_PROTOCOL = 1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES
#: VHOST_F_LOG_ALL: QEMU re-sends SET_FEATURES with it set or cleared while
#: migrating; the only feature change allowed on running rings.
_F_LOG_ALL = 1 << 26
#: REPLY_ACK status values (vhost-user.rst "REPLY_ACK": zero is success).
_ACK = 0
_NACK = 1
#: Flags of every reply this session sends.
_REPLY_FLAGS = protocol.VERSION | protocol.FLAG_REPLY


#: A request's handler: the message in, the reply payload out (None: no payload).
_Handler = Callable[[protocol.Message], protocol.Payload]


class _Refused(Exception):
    """A well-formed request the session cannot honour (answered with a NACK)."""


class _Fatal(Exception):
    """A request whose failure leaves no way to answer: the connection is dropped."""


#: Errors that refuse a request (a NACK) rather than end the session.
_REFUSALS = (_Refused, RegionRefused, RingError, GuestMemoryError, VirtqueueError)


class VhostUserSession:
    """One front end's session with ``device`` (see the module docstring).

    ``interrupt`` is what the device signals used buffers and config
    changes through once activated (the host's call fds and channel).
    ``device_log`` rate-limits device failures across sessions; refusals
    are rate-limited per session.  Each request's name is appended to
    ``received`` when given.
    """

    def __init__(
        self,
        device: VirtioDevice,
        interrupt: DeviceInterrupt,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        unsealed_memory: actions.UnsealedMemory | str = actions.UnsealedMemory.REFUSE,
        name: str = "vhost-user session",
        device_log: RateLimitedLog | None = None,
        received: collections.deque[str] | None = None,
    ) -> None:
        check_queue_count(device)
        self.device = device
        self.interrupt = interrupt
        self.protocol_features_offered = protocol_features & SUPPORTED_PROTOCOL_FEATURES
        self.unsealed_memory = actions.UnsealedMemory(unsealed_memory)
        self.name = name
        self.parser = protocol.MessageParser(protocol.FrontendRequest, replies=False)
        #: Features of the last accepted SET_FEATURES (including bit 30).
        self.features = 0
        self.features_set = False
        #: Protocol features the front end negotiated.
        self.protocol_features = 0
        self.owner = False
        #: The driver's status byte (SET_STATUS).
        self.status = 0
        #: The front end's regions; ``memory`` is where they are mapped.
        self.memory_table = RegionTable(
            max_slots=max_mem_slots,
            allow_unsealed=self.unsealed_memory is actions.UnsealedMemory.ALLOW,
            name=name,
        )
        self.memory = self.memory_table.memory
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        #: True once the session ended (a Disconnect was issued, or close()).
        self.closed = False
        self._received = received
        self._device_log = device_log or RateLimitedLog(log, name, interval=LOG_INTERVAL)
        self._refusals = RateLimitedLog(log, name, interval=LOG_INTERVAL)
        #: The inflight region (GET/SET_INFLIGHT_FD), None until the front end sets one.
        self.inflight: InflightArea | None = None
        #: Fds the next reply carries (GET_INFLIGHT_FD's memfd).
        self._reply_fds: tuple[int, ...] = ()
        self._actions: list[actions.Action] = []
        self._handlers = self._build_handlers()

    def __repr__(self) -> str:
        return f"VhostUserSession({self.name})"

    # -- input --------------------------------------------------------------------------------

    def wanted(self) -> int:
        """Bytes to read next: at most the rest of the current header or payload."""
        return self.parser.wanted()

    def receive_data(self, data: bytes, fds: list[int]) -> list[actions.Action]:
        """Bytes (and the fds received with them) from the connection: the actions they need."""
        if self.closed:
            return [actions.CloseFds(tuple(fds))] if fds else []
        try:
            messages = self.parser.feed(data, fds)
        except protocol.ProtocolError as exc:
            malformed = self._disconnect(f"malformed message from front end: {exc}")
            return [actions.CloseFds(tuple(exc.fds)), malformed]
        result: list[actions.Action] = []
        for message in messages:
            result += self.receive(message)
        return result

    def receive(self, message: protocol.Message) -> list[actions.Action]:
        """One decoded front-end message (it owns ``message.fds``): the actions it needs."""
        result: list[actions.Action] = []
        self._actions = result
        if self.closed:
            if message.fds:
                result.append(actions.CloseFds(tuple(message.fds)))
            return result
        request = message.request
        assert isinstance(request, protocol.FrontendRequest)
        if self._received is not None:
            self._received.append(request.name)
        log.debug("%s: <- %r", self, message)
        handler = self._handlers.get(request)
        schema_reply = protocol.has_explicit_reply(request)
        try:
            if handler is None:
                self._close(message.fds)
                if schema_reply:
                    raise _Fatal(f"unsupported request {request.name}")
                raise _Refused(f"unsupported request {request.name}")
            reply = handler(message)
        except _Fatal as exc:
            result.append(self._disconnect(f"{request.name} failed: {exc}"))
            return result
        except _REFUSALS as exc:
            if isinstance(exc, RegionRefused):
                self._close(exc.fds)
            self._refusals.warn("refused", request.name, "%s refused: %s", request.name, exc)
            if message.need_reply:
                self._reply(request, _NACK)
            return result
        except Exception:
            self._device_log.log(
                logging.ERROR,
                "device-failed",
                request.name,
                "%s failed in the device",
                request.name,
                exc_info=True,
            )
            if schema_reply:
                result.append(self._disconnect(f"{request.name} failed"))
            elif message.need_reply:
                self._reply(request, _NACK)
            return result
        if schema_reply:
            self._reply(request, reply)
        elif message.need_reply:
            self._reply(request, _ACK)
        return result

    def _reply(self, request: protocol.FrontendRequest, payload: protocol.Payload) -> None:
        fds, self._reply_fds = self._reply_fds, ()
        message = protocol.Message(request, payload, _REPLY_FLAGS)
        self._actions.append(actions.Reply(protocol.encode(message), fds))

    def _close(self, fds: tuple[int, ...] | list[int]) -> None:
        if fds:
            self._actions.append(actions.CloseFds(tuple(fds)))

    def _disconnect(self, reason: str) -> actions.Disconnect:
        self.closed = True
        return actions.Disconnect(reason)

    # -- the host's events --------------------------------------------------------------------

    def kick(self, index: int) -> DeviceQueue | None:
        """Ring ``index`` was kicked: the device processes it (disabled or not:
        a disabled ring's kicks reach the device too, which processes them
        without side effects, vhost-user.rst "Ring states").

        Returns the ring's queue if it runs and is enabled (the host may go
        on polling it), else None.
        """
        vring = self.vrings[index]
        if vring.queue is None:
            return None
        self.notify(index)
        return vring.queue if vring.enabled else None

    def running_queue(self, index: int) -> DeviceQueue | None:
        """Ring ``index``'s queue if the device runs on it, it is enabled and sound."""
        vring = self.vrings[index]
        if not vring.enabled or self.device.needs_reset:
            return None
        return vring.queue

    def notify(self, index: int) -> None:
        """The device processes ring ``index`` (a device failure is logged, rate-limited)."""
        try:
            self.device.queue_notify(index)
        except Exception:
            self._device_log.log(
                logging.ERROR,
                "queue-failed",
                index,
                "device failed processing queue %d",
                index,
                exc_info=True,
            )

    def close(self) -> list[actions.Action]:
        """End the session: the device stopped and reset, the memory unmapped.

        Returns the fds still held for a message never completed.  Every fd
        an action handed to the host is the host's to close.
        """
        self.closed = True
        try:
            self._stop_device("front end gone")
        except Exception:
            # The teardown goes on whatever stopping the device did: ending it
            # here would keep the memory mapped and the device half stopped.
            log.exception("%s: stopping the device failed", self)
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: device reset failed", self)
        for vring in self.vrings:
            vring.queue = None
        self.memory_table.close()
        self.inflight = None  # unmapped once the last queue holding a view of it is gone
        fds = self.parser.take_fds()
        return [actions.CloseFds(tuple(fds))] if fds else []

    # -- requests ------------------------------------------------------------------------------

    def _build_handlers(self) -> dict[protocol.FrontendRequest, _Handler]:
        r = protocol.FrontendRequest
        return {
            r.GET_FEATURES: self._get_features,
            r.SET_FEATURES: self._set_features,
            r.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            r.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            r.SET_OWNER: self._set_owner,
            r.RESET_OWNER: self._reset_owner,
            r.RESET_DEVICE: self._reset_device,
            r.GET_QUEUE_NUM: self._get_queue_num,
            r.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            r.SET_MEM_TABLE: self._set_mem_table,
            r.ADD_MEM_REG: self._add_mem_reg,
            r.REM_MEM_REG: self._rem_mem_reg,
            r.SET_VRING_NUM: self._set_vring_num,
            r.SET_VRING_ADDR: self._set_vring_addr,
            r.SET_VRING_BASE: self._set_vring_base,
            r.GET_VRING_BASE: self._get_vring_base,
            r.SET_VRING_KICK: self._set_vring_kick,
            r.SET_VRING_CALL: self._set_vring_call,
            r.SET_VRING_ERR: self._set_vring_err,
            r.SET_VRING_ENABLE: self._set_vring_enable,
            r.VRING_KICK: self._vring_kick,
            r.GET_CONFIG: self._get_config,
            r.SET_CONFIG: self._set_config,
            r.SET_STATUS: self._set_status,
            r.GET_STATUS: self._get_status,
            r.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            r.GET_INFLIGHT_FD: self._get_inflight_fd,
            r.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise _Refused(f"ring {index} does not exist (the device has {len(self.vrings)})")
        return self.vrings[index]

    def max_ring_size(self, index: int) -> int:
        return max_ring_size(self.device, index)

    # -- features ------------------------------------------------------------------------------

    def offered_features(self) -> int:
        return self.device.offered_features | F_PROTOCOL

    def _get_features(self, message: protocol.Message) -> protocol.Payload:
        return self.offered_features()

    def _set_features(self, message: protocol.Message) -> protocol.Payload:
        """SET_FEATURES: checked whole before anything changes.

        While the device runs, the features its rings were built with stay:
        only a no-op (or a LOG_ALL-only change, as QEMU sends while
        migrating) is accepted; a front end must stop the rings first
        (GET_VRING_BASE) to change anything else.
        """
        value = message.payload_as(int)
        offered = self.offered_features()
        if value & ~offered:
            raise _Refused(f"features {value & ~offered:#x} never offered")
        virtio = value & ~F_PROTOCOL
        if not self.device.features_acceptable(virtio):
            raise _Refused(f"the device does not accept features {virtio:#x}")
        if self.device.state is DeviceState.ACTIVE:
            changed = (value ^ self.features) & ~_F_LOG_ALL
            if changed:
                raise _Refused(
                    f"features {changed:#x} changed while the rings run (stop them first)"
                )
            self.features = value
            return None
        self.features = value
        self.features_set = True
        self.device.ack_features(virtio)
        return None

    def _get_protocol_features(self, message: protocol.Message) -> protocol.Payload:
        return self.protocol_features_offered

    def _set_protocol_features(self, message: protocol.Message) -> protocol.Payload:
        value = message.payload_as(int)
        if value & ~self.protocol_features_offered:
            raise _Refused(
                f"protocol features {value & ~self.protocol_features_offered:#x} never offered"
            )
        self.protocol_features = value
        return None

    def _set_owner(self, message: protocol.Message) -> protocol.Payload:
        self.owner = True
        return None

    def _reset_owner(self, message: protocol.Message) -> protocol.Payload:
        # Deprecated; vhost-user.rst recommends treating it as "disable all rings".
        self._stop_device("RESET_OWNER")
        self._reset_vrings()
        return None

    def _reset_device(self, message: protocol.Message) -> protocol.Payload:
        """RESET_DEVICE: rings disabled, device state (features included) back to initial."""
        self._stop_device("RESET_DEVICE")
        self.device.reset()
        self._reset_vrings()
        self.features = 0
        self.features_set = False
        self.status = 0
        return None

    def _reset_vrings(self) -> None:
        for vring in self.vrings:
            vring.reset()
            self._actions.append(actions.WatchKick(vring.index, None))

    def _get_queue_num(self, message: protocol.Message) -> protocol.Payload:
        return self.device.num_queues

    @property
    def max_mem_slots(self) -> int:
        """The GET_MAX_MEM_SLOTS answer, enforced on ADD_MEM_REG."""
        return self.memory_table.max_slots

    def _get_max_mem_slots(self, message: protocol.Message) -> protocol.Payload:
        return self.max_mem_slots

    # -- memory (what a table may hold is memory_table's) --------------------------------------

    def _set_mem_table(self, message: protocol.Message) -> protocol.Payload:
        """SET_MEM_TABLE: replace every region (mapping all new ones before dropping any)."""
        staged = self.memory_table.stage(message.payload_as(protocol.MemoryTable), message.fds)
        # The rings may move with the memory: stop, swap, and restart below.
        self._stop_device("SET_MEM_TABLE")
        self.memory_table.install(staged)
        self._try_activate()
        return None

    def _add_mem_reg(self, message: protocol.Message) -> protocol.Payload:
        (fd,) = message.fds
        self.memory_table.add(message.payload_as(protocol.SingleMemoryRegion).region, fd)
        self._try_activate()
        return None

    def _rem_mem_reg(self, message: protocol.Message) -> protocol.Payload:
        """REM_MEM_REG: identified by guest address, user address and size; fd is closed."""
        self._close(message.fds)
        region = self.memory_table.find(message.payload_as(protocol.SingleMemoryRegion).region)
        if any(vring.queue is not None and region.holds_ring(vring.addr) for vring in self.vrings):
            self._stop_device("REM_MEM_REG of a region holding a ring")
        self.memory_table.remove(region)
        return None

    def _user_to_guest(self, addr: int, what: str) -> int:
        """A ring address as guest-physical, for ``build_queue`` (refused if in no region)."""
        return self.memory_table.to_guest(addr, what)

    # -- rings ---------------------------------------------------------------------------------

    def _reconfigure(self, vring: Vring, what: str) -> None:
        """A ring's layout changes while the device runs on it: stop the device first."""
        if vring.queue is not None:
            self._stop_device(f"{what} on running ring {vring.index}")

    def _set_vring_num(self, message: protocol.Message) -> protocol.Payload:
        state = message.payload_as(protocol.VringState)
        vring = self._vring(state.index)
        maximum = self.max_ring_size(state.index)
        if not 1 <= state.num <= maximum:
            raise _Refused(f"ring {state.index}: size {state.num} not in 1..{maximum}")
        self._reconfigure(vring, "SET_VRING_NUM")
        vring.num = state.num
        return None

    def _set_vring_addr(self, message: protocol.Message) -> protocol.Payload:
        addr = message.payload_as(protocol.VringAddr)
        vring = self._vring(addr.index)
        self._reconfigure(vring, "SET_VRING_ADDR")
        vring.addr = addr
        return None

    def _set_vring_base(self, message: protocol.Message) -> protocol.Payload:
        state = message.payload_as(protocol.VringState)
        vring = self._vring(state.index)
        packed = bool(self.features & Feature.RING_PACKED.mask)
        check_base(state.index, state.num, vring.num, packed=packed)
        self._reconfigure(vring, "SET_VRING_BASE")
        vring.base = state.num
        return None

    def _get_vring_base(self, message: protocol.Message) -> protocol.Payload:
        """GET_VRING_BASE: stop the ring and report where it is ("Ring states")."""
        state = message.payload_as(protocol.VringState)
        index = state.index
        if not 0 <= index < len(self.vrings):
            raise _Fatal(f"ring {index} does not exist")
        vring = self.vrings[index]
        if vring.queue is not None:
            self._stop_device(f"GET_VRING_BASE of ring {index}")
        vring.started = False
        self._actions.append(actions.WatchKick(index, None))
        return protocol.VringState(index, vring.base)

    def _vring_fd(self, message: protocol.Message) -> tuple[Vring, int | None]:
        """The ring and fd of SET_VRING_KICK/CALL/ERR (the fd is closed if refused)."""
        value = message.payload_as(int)
        fd = None if value & protocol.VRING_FD_NOFD else message.fds[0]
        try:
            vring = self._vring(value & protocol.VRING_FD_INDEX_MASK)
        except _Refused:
            self._close(message.fds)
            raise
        return vring, fd

    def _set_vring_kick(self, message: protocol.Message) -> protocol.Payload:
        vring, fd = self._vring_fd(message)
        if fd is None:
            log.warning(
                "%s: ring %d has no kick fd; it runs only on in-band VRING_KICK", self, vring.index
            )
        self._actions.append(actions.WatchKick(vring.index, fd))
        vring.started = True  # "start ring upon receiving a kick" fd
        if not self.features & F_PROTOCOL:
            vring.enabled = True  # without protocol features rings start enabled
        self._maybe_activate()
        return None

    def _set_vring_call(self, message: protocol.Message) -> protocol.Payload:
        vring, fd = self._vring_fd(message)
        self._actions.append(actions.SetNotifyFd(vring.index, actions.NotifyKind.CALL, fd))
        return None

    def _set_vring_err(self, message: protocol.Message) -> protocol.Payload:
        vring, fd = self._vring_fd(message)
        self._actions.append(actions.SetNotifyFd(vring.index, actions.NotifyKind.ERR, fd))
        return None

    def _set_vring_enable(self, message: protocol.Message) -> protocol.Payload:
        state = message.payload_as(protocol.VringState)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise _Refused(f"ring {state.index}: enable value {state.num} is not 0 or 1")
        vring.enabled = bool(state.num)
        # A started but disabled ring is still processed, without side
        # effects ("Ring states"): its kicks reach the device, which knows
        # what that means for its queue (net discards transmit frames).
        self.device.set_queue_enabled(vring.index, vring.enabled)
        if vring.enabled:
            self._maybe_activate()
            if vring.queue is not None:
                self.notify(vring.index)  # buffers that came while disabled
        return None

    def _vring_kick(self, message: protocol.Message) -> protocol.Payload:
        state = message.payload_as(protocol.VringState)
        self.kick(self._vring(state.index).index)
        return None

    # -- activation ----------------------------------------------------------------------------

    def _build_queue(self, vring: Vring) -> DeviceQueue:
        """The one place a ring's device queue is made (see "Extending it")."""
        queue = build_queue(self.memory, vring, self.device.acked_features, self._user_to_guest)
        self._track_inflight(vring.index, queue)
        return queue

    # -- inflight I/O tracking (vhost-user.rst "Inflight I/O tracking") -------------------------

    def _get_inflight_fd(self, message: protocol.Message) -> protocol.Payload:
        """Allocate a zeroed region for ``num_queues`` rings of ``queue_size``; send its memfd."""
        desc = message.payload
        assert isinstance(desc, protocol.InflightDesc)
        if not self.protocol_features & _INFLIGHT_SHMFD:
            raise _Fatal("GET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
        if desc.num_queues != len(self.vrings):
            raise _Fatal(
                f"GET_INFLIGHT_FD for {desc.num_queues} queues; the device has {len(self.vrings)}"
            )
        # Room for the largest ring this back end accepts, not only the
        # front end's queue_size: QEMU 7.2's virtio-mmio offers drivers
        # 1024-entry rings whatever vhost-user-blk's queue-size says.
        ring_size = max([desc.queue_size] + [self.max_ring_size(v.index) for v in self.vrings])
        try:
            area, fd = allocate(desc.num_queues, ring_size)
        except (InflightError, OSError) as exc:
            raise _Fatal(f"cannot allocate the inflight region: {exc}") from exc
        self.inflight = area
        self._reply_fds = (fd,)
        return protocol.InflightDesc(area.geometry.mmap_size, 0, desc.num_queues, desc.queue_size)

    def _set_inflight_fd(self, message: protocol.Message) -> protocol.Payload:
        """Map the region the front end hands back; it is validated before any use."""
        desc = message.payload
        assert isinstance(desc, protocol.InflightDesc)
        try:
            if not self.protocol_features & _INFLIGHT_SHMFD:
                raise _Refused("SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
            if desc.num_queues != len(self.vrings):
                raise _Refused(
                    f"inflight region for {desc.num_queues} queues; the device has "
                    f"{len(self.vrings)}"
                )
            try:
                area = map_front_end_region(
                    message.fds[0],
                    desc.mmap_size,
                    desc.mmap_offset,
                    desc.num_queues,
                    desc.queue_size,
                    allow_unsealed=self.unsealed_memory is actions.UnsealedMemory.ALLOW,
                )
            except InflightError as exc:
                raise _Refused(f"inflight region: {exc}") from exc
        finally:
            self._close(message.fds)
        self.inflight = area
        return None

    def _track_inflight(self, index: int, queue: DeviceQueue) -> None:
        """Recover ring ``index`` from the inflight region and record its chains from now on.

        Before the device sees the queue: every chain the previous back end
        left in flight is queued for resubmission, oldest first, ahead of
        any new request, and the ring's next available position lands past
        them.  A region that does not check out is refused (logged) and the
        ring runs untracked from the front end's base, as without the
        feature.

        A ring restarted from a region in use is signalled once: the previous
        back end may have published completions and died before it signalled
        them (interrupts are batched), and the driver would wait for them
        forever; a spare used buffer notification costs the driver a look.
        """
        area = self.inflight
        if area is None or not self.protocol_features & _INFLIGHT_SHMFD:
            return
        try:
            region = area.queue(index)
            if in_use(region):
                self.interrupt.signal_used_queue(index)
            assert isinstance(queue, (SplitDeviceQueue, PackedDeviceQueue))
            resubmitted, repaired = attach(region, queue, self.memory)
        except (InflightError, GuestMemoryError) as exc:
            self._device_log.warn(
                "inflight-refused",
                None,
                "ring %d: inflight region refused, the ring runs untracked: %s",
                index,
                exc,
            )
            return
        if resubmitted or repaired:
            log.info(
                "%s: ring %d: resubmitting %d request(s) left in flight%s",
                self,
                index,
                resubmitted,
                ", last batch of completions repaired" if repaired else "",
            )

    def _maybe_activate(self, *, driver_ok: bool = False) -> None:
        """Apply the activation policy (module docstring) after a ring or memory change."""
        device = self.device
        vrings = self.vrings
        if not self.features_set or not vrings:
            return
        if device.state is DeviceState.ACTIVE:
            for vring in vrings:
                if vring.queue is None and vring.ready():
                    queue = self._build_queue(vring)
                    vring.queue = queue
                    device.queues[vring.index] = queue
                    log.info("%s: ring %d added to the running device", self, vring.index)
                    self.notify(vring.index)
            return
        if not vrings[0].ready():
            return
        if not device.features_acceptable(device.acked_features):
            log.warning(
                "%s: rings are ready but features %#x are not acceptable: not activating",
                self,
                device.acked_features,
            )
            return
        if not driver_ok and any(v.started and not v.ready() for v in vrings):
            return  # more rings are coming (QEMU enables them one by one)
        queues = [self._build_queue(v) if v.ready() else DisabledQueue() for v in vrings]
        try:
            device.activate(self.memory, self.interrupt, queues)
        except Exception as exc:
            self._device_log.warn("not-activated", None, "device not activated yet: %s", exc)
            return
        for vring, queue in zip(vrings, queues, strict=True):
            if not isinstance(queue, DisabledQueue):
                vring.queue = queue
        log.info(
            "%s: device activated with %s rings %s",
            self,
            "packed" if self.features & Feature.RING_PACKED.mask else "split",
            [v.index for v in vrings if v.queue is not None],
        )
        for vring in vrings:
            if vring.queue is not None:
                self.notify(vring.index)

    def _try_activate(self) -> None:
        """Activation after a memory change: a ring that cannot be built is only logged."""
        try:
            self._maybe_activate()
        except _REFUSALS as exc:
            self._device_log.warn("rings-unusable", None, "rings not usable yet: %s", exc)

    def _stop_device(self, why: str) -> None:
        """Stop a running device and save every ring's position as its base."""
        device = self.device
        if device.state is not DeviceState.ACTIVE:
            return
        log.info("%s: stopping the device (%s)", self, why)
        try:
            resources = device.sleep()  # finishes in-flight requests
            device.wake(resources)
        except Exception:
            log.exception("%s: device sleep/wake failed; resetting it", self)
        try:
            device.reset()
        except Exception:
            log.exception("%s: device reset failed", self)
        if self.features_set:
            device.ack_features(self.features & ~F_PROTOCOL)
        for vring in self.vrings:
            queue = vring.queue
            if queue is None:
                continue
            vring.queue = None
            vring.base = ring_position(queue)

    # -- config, status, back-end channel ------------------------------------------------------

    def _get_config(self, message: protocol.Message) -> protocol.Payload:
        request = message.payload_as(protocol.ConfigSpace)
        try:
            end = len(self.device.config_bytes())
            if request.offset + request.size > end:
                raise _Refused(
                    f"{request.size} bytes at {request.offset} reach beyond config space "
                    f"({end} bytes)"
                )
            data = self.device.read_config(request.offset, request.size)
        except Exception as exc:
            self._refusals.warn("get-config", None, "GET_CONFIG refused: %s", exc)
            return protocol.ConfigSpace(request.offset, request.flags, b"")  # size 0: an error
        return protocol.ConfigSpace(request.offset, request.flags, data[: request.size])

    def _set_config(self, message: protocol.Message) -> protocol.Payload:
        request = message.payload_as(protocol.ConfigSpace)
        if request.flags not in (0, 1):
            raise _Refused(f"SET_CONFIG flags {request.flags:#x}")
        self.device.write_config(request.offset, request.data)
        return None

    def _set_status(self, message: protocol.Message) -> protocol.Payload:
        """SET_STATUS (STATUS): the driver's status byte as QEMU relays it."""
        value = message.payload_as(int) & 0xFF
        added = value & ~self.status
        if value == 0:
            self._stop_device("SET_STATUS 0")
        if added & DeviceStatus.FEATURES_OK and not self.device.features_acceptable(
            self.features & ~F_PROTOCOL
        ):
            value &= ~DeviceStatus.FEATURES_OK  # read back without it, as on virtio-MMIO
        self.status = value
        if added & DeviceStatus.DRIVER_OK:
            self._maybe_activate(driver_ok=True)
        return None

    def _get_status(self, message: protocol.Message) -> protocol.Payload:
        status = self.status
        if self.device.needs_reset:
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return status

    def _set_backend_req_fd(self, message: protocol.Message) -> protocol.Payload:
        (fd,) = message.fds
        self._actions.append(actions.SetBackendChannel(fd))
        return None
