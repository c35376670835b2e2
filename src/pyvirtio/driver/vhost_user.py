"""A vhost-user front end: drive any vhost-user back end from a host program.

:class:`VhostUserFrontend` plays QEMU's part of docs/interop/vhost-user.rst
against a back end (qemu-storage-daemon, a pyvirtio
:class:`~pyvirtio.transport.vhost_user.backend.VhostUserBackend`, ...): it
negotiates features and protocol features, shares memfd-backed guest memory,
sets rings up with kick and call eventfds and reads config space.  It offers
the driver-transport interface of
:class:`~pyvirtio.driver.mmio.MmioDriverTransport` (``initialize``,
``setup_queue``, ``driver_ok``, ``notify``, ``wait_interrupt``,
``read_config``, ``mem``, ``allocator``, ...), so the device drivers of
:mod:`pyvirtio.driver` (e.g. :class:`~pyvirtio.driver.blk.BlkDriver`) run
over vhost-user unchanged.

Addresses.  Guest memory is one memfd region at guest-physical
``memory_base``.  The *user address* of the region (vhost-user.rst "Memory
access") is this process's real mmap address of it, as QEMU's is, so ring
addresses in SET_VRING_ADDR are user addresses and descriptors carry guest-
physical ones: a back end that forgets to translate fails visibly.

Nothing blocks forever.  Every reply is awaited for at most ``timeout``
seconds, and :meth:`wait_interrupt` without a timeout is bounded by it too;
a back end that dies, hangs up, stays silent or answers wrongly raises
:class:`VhostUserError` (the connection is then unusable).  Wake-ups are only
hints: qemu-storage-daemon fires the call eventfd once when SET_VRING_CALL
arrives, so callers check the used ring (``queue.used()``), never trust a
wake-up alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from pyvirtio.constants import DeviceStatus
from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.transport import (
    DriverTransportBase,
    FeatureNegotiationError,
    MmioDriverError,
    QueueSetupError,
    RingPlan,
)
from pyvirtio.irq import INT_VRING
from pyvirtio.memory import GuestMemory, MemoryRegion
from pyvirtio.transport.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    FrontendRequest,
    InflightDesc,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    Payload,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    encode,
    fds_from_ancillary,
    has_explicit_reply,
    vring_fd_payload,
)
from pyvirtio.virtqueue.common import DriverQueue

__all__ = [
    "DEFAULT_FRONTEND_PROTOCOL_FEATURES",
    "RequestRefused",
    "VhostUserError",
    "VhostUserFrontend",
]

T = TypeVar("T")

#: Protocol features the front end takes when offered.
DEFAULT_FRONTEND_PROTOCOL_FEATURES: Final = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.CONFIG.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.RESET_DEVICE.mask
    | ProtocolFeature.STATUS.mask
    | ProtocolFeature.INFLIGHT_SHMFD.mask
)
_F_PROTOCOL: Final = 1 << VHOST_USER_F_PROTOCOL_FEATURES
#: SET_VRING_BASE of a fresh packed ring: avail and used index 0 with wrap
#: counters 1, in QEMU's encoding (avail in bits 0-15, used in 16-31).
_PACKED_FRESH_BASE: Final = 0x8000 | 0x8000 << 16
_ANCILLARY_SPACE: Final = socket.CMSG_SPACE(4 * MAX_FDS)
_CONNECT_RETRY: Final = 0.01
#: Largest ring a vhost-user front end sets up (a split ring's 2^15 limit).
_MAX_RING_SIZE: Final = 32768


class VhostUserError(MmioDriverError):
    """The back end is gone, silent, or answered something the protocol does not allow.

    A subclass of :class:`~pyvirtio.driver.mmio.MmioDriverError`, so drivers
    that handle transport errors handle this one too.
    """


class RequestRefused(VhostUserError):
    """The back end answered a request with a non-zero REPLY_ACK status."""

    def __init__(self, request: FrontendRequest, status: int) -> None:
        super().__init__(f"back end refused {request.name} (status {status})")
        self.request = request
        self.status = status


@dataclass
class _Queue:
    queue: DriverQueue
    kick_fd: int
    call_fd: int
    err_fd: int
    allocations: list[int] = field(default_factory=list)
    enabled: bool = False


def _mapping_address(region: MemoryRegion) -> int:
    """This process's address of a region's mapping: its vhost-user user address."""
    anchor = ctypes.c_char.from_buffer(region.mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the buffer export so the mapping can be closed later


class VhostUserFrontend(DriverTransportBase[_Queue]):
    """A vhost-user front end connected to the back end at ``socket_path``.

    Construction connects (retrying while the socket does not accept yet, up
    to ``timeout``), and performs what QEMU does when it creates a device:
    GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
    GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS) and SET_OWNER.

    ``device_id`` is what the caller knows it connected to (vhost-user does
    not carry a device type); drivers that check ``device_id`` need it.
    ``max_queue_size`` is the ring size ``setup_queue`` uses by default.
    """

    #: Whether a control queue the back end offers is surely answered by it:
    #: not over vhost-user.  By convention the front end owns a net device's
    #: control queue (QEMU's virtio-net answers it and never hands that ring
    #: to the back end), so back ends such as DPDK's vhost PMD offer
    #: VIRTIO_NET_F_CTRL_VQ on QEMU's behalf and treat the ring as data.
    #: Drivers take a control queue here only when asked to.
    device_answers_control_queue = False

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        memory_size: int = 32 << 20,
        memory_base: int = 1 << 20,
        timeout: float = 5.0,
        device_id: int = 0,
        protocol_features: int = DEFAULT_FRONTEND_PROTOCOL_FEATURES,
        max_queue_size: int = 256,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.device_id = device_id
        self.vendor_id = 0
        self.max_queue_size = max_queue_size
        self._lock = threading.RLock()
        self._parser = MessageParser(FrontendRequest, replies=True)
        self._broken: str | None = None
        self._status = 0
        self._features = 0
        self._initialized = False
        self._memory_shared = False
        self._needs_reset = False
        self._queues: dict[int, _Queue] = {}
        #: wait_interrupt's poll set and the call fds it was built for.
        self._poller: tuple[select.poll, frozenset[int], int] | None = None
        #: Ring positions GET_VRING_BASE reported when queues were last stopped.
        self.last_bases: dict[int, int] = {}
        self._offered = 0
        #: What GET_PROTOCOL_FEATURES offered, and what was negotiated.
        self.protocol_features_offered = 0
        self.protocol_features = 0
        #: GET_QUEUE_NUM's answer (MQ) and GET_MAX_MEM_SLOTS's (CONFIGURE_MEM_SLOTS).
        self.num_queues: int | None = None
        self.max_mem_slots: int | None = None
        #: The back end's inflight region (GET_INFLIGHT_FD), kept to hand back.
        self._inflight: tuple[InflightDesc, int] | None = None
        self.mem = GuestMemory.memfd(memory_size, base=memory_base, name="pyvirtio-vhost-user")
        region = self.mem.regions[0]
        self._user_base = _mapping_address(region)
        self.allocator = GuestAllocator(self.mem, memory_base, memory_size)
        self._sock = self._connect()
        try:
            self._handshake(protocol_features)
        except BaseException:
            self._sock.close()
            self.mem.close()
            raise

    def __repr__(self) -> str:
        return f"VhostUserFrontend({str(self.socket_path)!r})"

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    self.mem.close()
                    raise VhostUserError(f"cannot connect to {self.socket_path}: {exc}") from exc
                time.sleep(_CONNECT_RETRY)
                continue
            except OSError as exc:
                sock.close()
                self.mem.close()
                raise VhostUserError(f"cannot connect to {self.socket_path}: {exc}") from exc
            return sock

    def _handshake(self, wanted_protocol: int) -> None:
        """QEMU's device-creation sequence (platform facts: GET_FEATURES .. SET_OWNER)."""
        features = self._call_int(FrontendRequest.GET_FEATURES)
        self._offered = features
        if features & _F_PROTOCOL:
            offered = self._call_int(FrontendRequest.GET_PROTOCOL_FEATURES)
            self.protocol_features_offered = offered
            # Sent before REPLY_ACK is in force, so never with NEED_REPLY.
            self._call(FrontendRequest.SET_PROTOCOL_FEATURES, offered & wanted_protocol)
            self.protocol_features = offered & wanted_protocol
        if self._has_protocol(ProtocolFeature.MQ):
            self.num_queues = self._call_int(FrontendRequest.GET_QUEUE_NUM)
        if self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._call_int(FrontendRequest.GET_MAX_MEM_SLOTS)
        self._call(FrontendRequest.SET_OWNER)

    def _has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature.mask)

    def _fail_connection(self, reason: str) -> VhostUserError:
        self._broken = reason
        return VhostUserError(f"{self}: {reason}")

    def _send(self, message: Message) -> None:
        if self._broken is not None:
            raise VhostUserError(f"{self}: connection unusable: {self._broken}")
        data = encode(message)
        name = message.request.name
        with self._socket_errors(
            f"back end not reading (sending {name} timed out)", f"sending {name}"
        ):
            self._sock.settimeout(self.timeout)
            if message.fds:
                ancillary = [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        b"".join(fd.to_bytes(4, "little") for fd in message.fds),
                    )
                ]
                sent = self._sock.sendmsg([data], ancillary)
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)

    @contextlib.contextmanager
    def _socket_errors(self, timed_out: str, doing: str) -> Iterator[None]:
        """Socket errors break the connection: a timeout says ``timed_out``, any
        other error that the back end is gone while ``doing``."""
        try:
            yield
        except TimeoutError as exc:
            raise self._fail_connection(timed_out) from exc
        except OSError as exc:
            raise self._fail_connection(f"back end gone ({doing}: {exc})") from exc

    def _receive_reply(self, request: FrontendRequest) -> Message:
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail_connection(f"no reply to {request.name} within {self.timeout} s")
            with self._socket_errors(
                f"no reply to {request.name} within {self.timeout} s",
                f"waiting for the reply to {request.name}",
            ):
                self._sock.settimeout(remaining)
                data, ancdata, _, _ = self._sock.recvmsg(
                    self._parser.wanted(), _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            fds = fds_from_ancillary(ancdata)
            if not data:
                _close_fds(fds)
                raise self._fail_connection(
                    f"back end closed the connection (waiting for the reply to {request.name})"
                )
            try:
                messages = self._parser.feed(data, fds)
            except ProtocolError as exc:
                _close_fds(exc.fds)
                raise self._fail_connection(f"malformed reply to {request.name}: {exc}") from exc
            if not messages:
                continue
            (reply,) = messages  # reads stop at message boundaries
            if request is not FrontendRequest.GET_INFLIGHT_FD:
                _close_fds(list(reply.fds))  # no other reply this front end asks for has fds
            if reply.request is not request:
                raise self._fail_connection(
                    f"back end answered {reply.request.name} to {request.name}"
                )
            return reply

    def _call(
        self, request: FrontendRequest, payload: Payload = None, fds: Sequence[int] = ()
    ) -> Payload:
        """Send a request; return its reply body, or check its REPLY_ACK when negotiated."""
        with self._lock:
            explicit = has_explicit_reply(request)
            ack = not explicit and self._has_protocol(ProtocolFeature.REPLY_ACK)
            flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
            self._send(Message(request, payload, flags, tuple(fds)))
            if explicit:
                return self._receive_reply(request).payload
            if ack:
                status = self._receive_reply(request).payload
                if status != 0:
                    assert isinstance(status, int)
                    raise RequestRefused(request, status)
            return None

    def request(
        self, request: FrontendRequest, payload: Payload = None, fds: Sequence[int] = ()
    ) -> Payload:
        """Send any request and return its reply body (None for an acknowledged one).

        The low-level path every method here uses, for requests this class
        has no method for.  A non-zero REPLY_ACK raises :class:`RequestRefused`.
        """
        return self._call(request, payload, fds)

    def _call_int(self, request: FrontendRequest, payload: Payload = None) -> int:
        value = self._call(request, payload)
        if not isinstance(value, int):
            raise self._fail_connection(f"reply to {request.name} is not a u64")
        return value

    # -- status and features ---------------------------------------------------------------

    @property
    def status(self) -> int:
        """The device status this front end has set (relayed with SET_STATUS when negotiated)."""
        return self._status

    def add_status(self, bits: int) -> int:
        """Set status bits; with STATUS negotiated the back end's view is read back."""
        with self._lock:
            self._status |= bits
            if self._has_protocol(ProtocolFeature.STATUS):
                self._call(FrontendRequest.SET_STATUS, self._status)
                self._status = self._call_int(FrontendRequest.GET_STATUS) & 0xFF
            return self._status

    @property
    def needs_reset(self) -> bool:
        """Whether the back end signalled a ring error eventfd (its device needs a reset)."""
        if not self._needs_reset:
            for q in self._queues.values():
                if _drain(q.err_fd):
                    self._needs_reset = True
        return self._needs_reset

    def device_features(self) -> int:
        """The device's features as GET_FEATURES reported them (without bit 30)."""
        return self._offered & ~_F_PROTOCOL

    def initialize(self, wanted_features: int) -> int:
        """Negotiate ``offer & wanted_features`` and share guest memory; returns the features.

        Mirrors content.tex "Device Initialization" steps 1-6 over vhost-user:
        SET_FEATURES (with bit 30 when protocol features are spoken), the
        status bits through SET_STATUS when negotiated, then the memory
        table (ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE).
        """
        with self._lock:
            if self._initialized or self._queues:
                self.reset()
            self._status = 0
            self.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
            negotiated = self.device_features() & wanted_features
            value = negotiated | (self._offered & _F_PROTOCOL)
            try:
                self._call(FrontendRequest.SET_FEATURES, value)
            except RequestRefused as exc:
                self._status |= DeviceStatus.FAILED
                raise FeatureNegotiationError(f"back end refused features {negotiated:#x}") from exc
            status = self.add_status(DeviceStatus.FEATURES_OK)
            if not status & DeviceStatus.FEATURES_OK:
                self.add_status(DeviceStatus.FAILED)
                raise FeatureNegotiationError(f"back end refused features {negotiated:#x}")
            self._features = negotiated
            self._share_memory()
            self._initialized = True
            return negotiated

    def _share_memory(self) -> None:
        if self._memory_shared:
            return
        for region in self.mem.regions:
            assert region.fd is not None
            desc = MemoryRegionDesc(
                region.guest_base, region.size, self._user_base, region.fd_offset
            )
            if self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self._call(FrontendRequest.ADD_MEM_REG, SingleMemoryRegion(desc), (region.fd,))
            else:
                self._call(FrontendRequest.SET_MEM_TABLE, MemoryTable((desc,)), (region.fd,))
        self._memory_shared = True

    def share_inflight_region(self, queue_size: int) -> InflightDesc:
        """Have the back end track requests in flight (vhost-user.rst "Inflight I/O tracking").

        GET_INFLIGHT_FD the first time (the back end allocates the region),
        then SET_INFLIGHT_FD with it, as QEMU does before starting rings; a
        back end restarted on the same socket gets the same region back and
        resubmits what its predecessor left in flight.  Needs
        INFLIGHT_SHMFD negotiated.
        """
        with self._lock:
            if not self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
                raise VhostUserError("the back end did not negotiate INFLIGHT_SHMFD")
            if self._inflight is None:
                num_queues = self.num_queues or 1
                self._send(
                    Message(
                        FrontendRequest.GET_INFLIGHT_FD,
                        InflightDesc(0, 0, num_queues, queue_size),
                        VERSION,
                    )
                )
                reply = self._receive_reply(FrontendRequest.GET_INFLIGHT_FD)
                if not isinstance(reply.payload, InflightDesc) or len(reply.fds) != 1:
                    _close_fds(list(reply.fds))
                    raise self._fail_connection("GET_INFLIGHT_FD reply without a region")
                self._inflight = (reply.payload, reply.fds[0])
            desc, fd = self._inflight
            self._call(FrontendRequest.SET_INFLIGHT_FD, desc, (fd,))
            return desc

    def _user_addr(self, guest_addr: int) -> int:
        """The front-end user address of a guest-physical address in our one region."""
        region = self.mem.region_at(guest_addr)
        return self._user_base + (guest_addr - region.guest_base)

    def driver_ok(self) -> None:
        """Enable every ring set up (SET_VRING_ENABLE 1) and set DRIVER_OK."""
        with self._lock:
            for index, q in sorted(self._queues.items()):
                if not q.enabled:
                    self._enable(index, q)
            self.add_status(DeviceStatus.DRIVER_OK)

    def _enable(self, index: int, q: _Queue) -> None:
        if self._offered & _F_PROTOCOL:
            self._call(FrontendRequest.SET_VRING_ENABLE, VringState(index, 1))
        q.enabled = True

    # -- queues ------------------------------------------------------------------------------

    def queue_max_size(self, index: int) -> int:
        """The ring size used by default; 0 for a queue the back end does not have."""
        if self.num_queues is not None and index >= self.num_queues:
            return 0
        return self.max_queue_size

    def _queue_size_bounds(self, index: int) -> tuple[int, int]:
        """:meth:`queue_max_size` by default, up to a split ring's largest; ring
        indices are 8 bits in the vring messages."""
        max_size = self.queue_max_size(index)
        if max_size == 0 or index > 0xFF:
            raise QueueSetupError(f"queue {index} is not available")
        return max_size, _MAX_RING_SIZE

    def _program_queue(self, index: int, plan: RingPlan) -> _Queue:
        """Give ring ``index`` eventfds and hand it to the back end.

        Sends SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (user
        addresses), SET_VRING_CALL, SET_VRING_ERR and SET_VRING_KICK; the
        ring is enabled by :meth:`driver_ok` (or at once if that came
        already).
        """
        queue, allocations = self._allocate_ring(plan)
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            setup = _Queue(queue, fds[0], fds[1], fds[2], allocations)
            desc, driver, device = allocations[:3]
            base = _PACKED_FRESH_BASE if plan.packed else 0
            self._call(FrontendRequest.SET_VRING_NUM, VringState(index, plan.size))
            self._call(FrontendRequest.SET_VRING_BASE, VringState(index, base))
            self._call(
                FrontendRequest.SET_VRING_ADDR,
                VringAddr(
                    index,
                    0,
                    self._user_addr(desc),
                    self._user_addr(device),
                    self._user_addr(driver),
                    0,
                ),
            )
            self._call(
                FrontendRequest.SET_VRING_CALL,
                vring_fd_payload(index, True),
                (setup.call_fd,),
            )
            self._call(
                FrontendRequest.SET_VRING_ERR, vring_fd_payload(index, True), (setup.err_fd,)
            )
            self._call(
                FrontendRequest.SET_VRING_KICK,
                vring_fd_payload(index, True),
                (setup.kick_fd,),
            )
            if self._status & DeviceStatus.DRIVER_OK:
                self._enable(index, setup)
        except BaseException:
            _close_fds(fds)
            self._free_allocations(allocations)
            raise
        return setup

    def _queue_added(self, index: int) -> None:
        self._poller = None  # the next wait polls the new ring's call eventfd too

    def reset_queue(self, index: int) -> None:
        """Not available over vhost-user (no per-ring reset message)."""
        raise QueueSetupError("vhost-user has no per-queue reset")

    def notify(self, index: int) -> None:
        """Available buffer notification: write the ring's kick eventfd."""
        os.eventfd_write(self._queues[index].kick_fd, 1)

    def stop_queue(self, index: int) -> int:
        """SET_VRING_ENABLE 0 and GET_VRING_BASE: stop ring ``index``; returns its base."""
        with self._lock:
            q = self._queues[index]
            if q.enabled and self._offered & _F_PROTOCOL:
                self._call(FrontendRequest.SET_VRING_ENABLE, VringState(index, 0))
            q.enabled = False
            state = self._call(FrontendRequest.GET_VRING_BASE, VringState(index, 0))
            if not isinstance(state, VringState) or state.index != index:
                raise self._fail_connection(f"GET_VRING_BASE of ring {index} answered {state!r}")
            self.last_bases[index] = state.num
            return state.num

    # -- interrupts ----------------------------------------------------------------------------

    def interrupt_status(self) -> int:
        """INT_VRING if a call eventfd fired since the last look (drains them), else 0."""
        fired = False
        for q in self._queues.values():
            fired |= _drain(q.call_fd)
        return INT_VRING if fired else 0

    def ack_interrupt(self, bits: int) -> None:
        """Nothing to acknowledge: reading the eventfd did it."""

    def wait_interrupt(self, timeout: float | None = None) -> int:
        """Wait for a call eventfd; returns INT_VRING, or 0 when ``timeout`` passes.

        ``timeout=None`` waits at most the front end's ``timeout`` and then
        raises :class:`VhostUserError`: a back end that stops answering is an
        error, not a hang.  A back end that hangs up meanwhile raises at once.
        """
        bounded = timeout is None
        limit = self.timeout if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + limit
        poller, calls, sock_fd = self._interrupt_poller()
        while True:
            remaining = deadline - time.monotonic()
            events = poller.poll(max(0, int(remaining * 1000 + 0.999)))
            fired = False
            for fd, _mask in events:
                if fd == sock_fd:
                    self._check_socket()
                elif fd in calls:
                    fired |= _drain(fd)
            if fired:
                return INT_VRING
            if time.monotonic() >= deadline:
                if bounded:
                    raise VhostUserError(f"{self}: no interrupt from the back end in {limit} s")
                return 0

    def _interrupt_poller(self) -> tuple[select.poll, frozenset[int], int]:
        """The poll set of :meth:`wait_interrupt` (call eventfds and the socket).

        Built once per set of queues (forgotten whenever a queue is set up or
        dropped) rather than per wait: a driver at queue depth 1 waits once
        per request.
        """
        cached = self._poller
        if cached is not None:
            return cached
        calls = frozenset(q.call_fd for q in self._queues.values())
        poller = select.poll()
        for fd in calls:
            poller.register(fd, select.POLLIN)
        sock_fd = self._sock.fileno()
        poller.register(sock_fd, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
        self._poller = (poller, calls, sock_fd)
        return self._poller

    def _check_socket(self) -> None:
        """The socket is readable outside a request: the back end hung up or misbehaves."""
        with self._lock:
            try:
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._fail_connection(f"back end gone: {exc}") from exc
            if not data:
                raise self._fail_connection("back end closed the connection")
            raise self._fail_connection("back end sent a message nobody asked for")

    def wait_used(self, index: int, timeout: float | None = None) -> list[tuple[object, int]]:
        """Used buffers of queue ``index``, waiting for at least one.

        The used ring decides, not the wake-up.  Raises VhostUserError when
        nothing is used within ``timeout`` (default: the front end's).
        """
        queue = self._queues[index].queue
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            done = list(queue.used())
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VhostUserError(f"{self}: nothing used on queue {index} within {limit} s")
            self.wait_interrupt(remaining)

    # -- configuration space -------------------------------------------------------------------

    @property
    def config_generation(self) -> int:
        """vhost-user has no generation counter: GET_CONFIG reads are whole."""
        return 0

    def consistent(self, read: Callable[[], T]) -> T:
        """``read()``: one GET_CONFIG is already a consistent snapshot."""
        return read()

    @property
    def config_readable(self) -> bool:
        """Whether config space can be read: GET_CONFIG needs the CONFIG protocol feature."""
        return self._has_protocol(ProtocolFeature.CONFIG)

    def read_config_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes of config space at ``offset`` (GET_CONFIG; needs CONFIG).

        The request always starts at offset 0 and covers ``offset + length``
        bytes, as QEMU's do: libvhost-user back ends (qemu-storage-daemon)
        ignore the offset field and answer from the start of config space.
        """
        if not self._has_protocol(ProtocolFeature.CONFIG):
            raise VhostUserError(f"{self}: the back end does not offer the CONFIG protocol feature")
        if offset < 0 or length < 0 or offset + length > MAX_CONFIG_SIZE:
            raise ValueError(f"config range {offset}+{length} outside 0..{MAX_CONFIG_SIZE}")
        size = offset + length
        reply = self._call(FrontendRequest.GET_CONFIG, ConfigSpace(0, 0, bytes(size)))
        if not isinstance(reply, ConfigSpace):
            raise self._fail_connection(f"GET_CONFIG answered {reply!r}")
        if reply.size == 0 and size:
            raise VhostUserError(f"{self}: back end refused GET_CONFIG of {size} bytes")
        if reply.size != size or reply.offset != 0:
            raise self._fail_connection(
                f"GET_CONFIG of {size} bytes at 0 answered {reply.size} at {reply.offset}"
            )
        return reply.data[offset:]

    def read_config(self, offset: int, size: int) -> int:
        """A little-endian config field of 1, 2, 4 or 8 bytes."""
        if size not in (1, 2, 4, 8):
            raise ValueError(f"config field size must be 1, 2, 4 or 8, not {size}")
        return int.from_bytes(self.read_config_bytes(offset, size), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write a config field (SET_CONFIG, flags 0: a driver write)."""
        if size not in (1, 2, 4, 8):
            raise ValueError(f"config field size must be 1, 2, 4 or 8, not {size}")
        if not self._has_protocol(ProtocolFeature.CONFIG):
            raise VhostUserError(f"{self}: the back end does not offer the CONFIG protocol feature")
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._call(FrontendRequest.SET_CONFIG, ConfigSpace(offset, 0, data))

    def shared_memory_region(self, shmid: int) -> tuple[int, int] | None:
        """vhost-user shares no device memory this way: always None."""
        return None

    # -- reset and close ---------------------------------------------------------------------

    def reset(self) -> None:
        """Stop every ring (GET_VRING_BASE), reset the back end's device, free the rings.

        RESET_DEVICE when negotiated, else SET_STATUS 0 when STATUS is.
        Local resources are released even if the back end fails meanwhile
        (the error is raised afterwards).
        """
        with self._lock:
            try:
                if self._broken is None:
                    for index in sorted(self._queues):
                        self.stop_queue(index)
                    if self._has_protocol(ProtocolFeature.RESET_DEVICE):
                        self._call(FrontendRequest.RESET_DEVICE)
                    elif self._has_protocol(ProtocolFeature.STATUS):
                        self._call(FrontendRequest.SET_STATUS, 0)
            finally:
                for q in self._queues.values():
                    _close_fds([q.kick_fd, q.call_fd, q.err_fd])
                    self._free_allocations(q.allocations)
                self._queues.clear()
                self._poller = None
                self._status = 0
                self._features = 0
                self._initialized = False
                self._needs_reset = False

    def close(self) -> None:
        """Stop the rings if the back end still answers, then drop the connection and memory."""
        with self._lock:
            if self._broken is None and (self._initialized or self._queues):
                with contextlib.suppress(VhostUserError):
                    self.reset()
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once, rings running, as a crashing front end would."""
        with self._lock:
            self._broken = self._broken or "closed"
            self._sock.close()
            for q in self._queues.values():
                _close_fds([q.kick_fd, q.call_fd, q.err_fd])
            self._queues.clear()
            self._poller = None
            if self._inflight is not None:
                _close_fds([self._inflight[1]])
                self._inflight = None
            self.mem.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drain(fd: int) -> bool:
    """Read an eventfd if it fired; whether it had."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
