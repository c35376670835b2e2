"""Fuzz target: the virtio-vsock device model against a hostile guest and host peers.

The input bytes choose the device's options (SEQPACKET offered and
negotiated, ``max_connections``, ``buf_alloc``, queue size, split or packed
rings, EVENT_IDX, indirect descriptors), then a sequence of steps, each run
through the real :class:`~pyvirtio.devices.vsock.device.Vsock` on real rings
in a :class:`~pyvirtio.memory.GuestMemory` with its real
:class:`~pyvirtio.devices.vsock.unix.UnixVsockHost` on Unix sockets in a
directory under /tmp:

* the guest's TX packets: headers with chosen CIDs, ports (mostly those of
  live connections), ``len``, type, op, flags, ``buf_alloc`` and ``fwd_cnt``
  (honest or not), payloads, cut across descriptors at chosen places, short
  headers, trailing device-writable descriptors, raw garbage;
* RX and event buffers of odd shapes (shorter than a header, split,
  behind a device-readable descriptor);
* host peers: a host program connecting to a guest port through the
  ``CONNECT <port>`` handshake (or sending garbage lines), programs
  listening on ``<uds>_1``, ``<uds>_2`` (stream) and ``<uds>_3``
  (seqpacket) accepting the guest's connections, sending, reading, shutting
  down and closing their sockets; one round of the host event loop
  (``poll_devices`` with a zero timeout);
* time passing (the endpoint's clock is a fake one the input advances, so
  connect/close timeouts fire deterministically), driver reset and
  re-activation, sleep/snapshot/restore/wake, a corrupted TX ring.

Unix sockets in one process are synchronous (what one end sends is readable
at the other at once), so an input runs in milliseconds and does the same
thing every time.

Findings (asserted after every step): an exception out of the device; a log
record with a traceback, or more than :data:`MAX_LOG_RECORDS` per input;
more than ``max_connections`` connections; a connection holding more than
its ``buf_alloc`` of received bytes; an RW packet to the guest beyond the
credit the guest last advertised for its connection, or data bytes that
disagree with the connection's ``tx_cnt``; a counter of ``device.stats``
going down, or a refused packet (short header, bad length, bad address,
type or op, no connection, over the limit, nobody listening) not counted in
its counter; a used length on the TX queue, or an RX packet that is not a
well-formed header from the host to the guest; guest memory written outside
the device-writable buffers the guest offered; after the input, a device
(not needing reset) that does not answer a well-formed REQUEST, and an fd
opened during the input still open once the device is reset (connection
sockets) or closed (everything).  An input that runs for seconds is a hang
(libFuzzer's ``-timeout``, 10 s here).

Not real, and why: the guest's side is played by this script on the driver
queues (no guest kernel); the clock of the endpoint is a fake one (real
timeouts would need real waits); the host programs are this script's own
non-blocking sockets.  The host's handshake timeout (real time, 5 s) is not
reached.

Runs under atheris (coverage guided) when it is installed, and under
hypothesis otherwise (``fuzz/_common.py``)::

    python fuzz/fuzz_vsock.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_vsock.py --engine hypothesis --runs 300   # force hypothesis
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes.util
import functools
import os
import select
import shutil
import socket
import tempfile
from typing import TYPE_CHECKING, Any

from _common import Bytes, LogRecorder, main

if TYPE_CHECKING:
    from pyvirtio.constants import Feature
    from pyvirtio.device import DeviceState
    from pyvirtio.devices.vsock.connection import Connection, ConnKey, ConnState
    from pyvirtio.devices.vsock.device import EVENTQ, FIRST_HOST_PORT, RXQ, TXQ, Vsock
    from pyvirtio.devices.vsock.unix import UnixVsockHost
    from pyvirtio.devices.vsock.wire import (
        HEADER_SIZE,
        HOST_CID,
        MAX_PKT_PAYLOAD,
        Header,
        Op,
        VsockFeature,
    )
    from pyvirtio.driver.memory import AllocationError, GuestAllocator
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue import packed, split
    from pyvirtio.virtqueue.errors import QueueFullError
    from pyvirtio.vmm.host_loop import poll_devices

MEM_SIZE = 1 << 20
#: Rings of queue i at RING_BASE + i * RING_STRIDE (queues of at most 64 entries).
RING_BASE = 0x1000
RING_STRIDE = 0x4000
INDIRECT_BASE = 0x10000
MAX_INDIRECT = 8
#: TX packets are written here (the device takes them at once: the area is reused).
TX_AREA = 0x20000
TX_AREA_SIZE = 0x40000
#: RX and event buffers are allocated from here.
RX_AREA = TX_AREA + TX_AREA_SIZE
RX_AREA_SIZE = MEM_SIZE - RX_AREA
PATTERN = 0xA5
#: The host side's sockets live in /tmp/<TMP_PREFIX><pid>.
TMP_PREFIX = "fuzz-vsock-"

GUEST_CID = 3
#: Ports programs listen on (<uds>_<port>) for the guest's connections, and their kind.
HOST_LISTENERS = {1: socket.SOCK_STREAM, 2: socket.SOCK_STREAM, 3: socket.SOCK_SEQPACKET}
GUEST_PORTS = (1000, 1001, 1002, 1003)
BUF_ALLOCS = (0, 1, 44, 4096, 65536, 256 * 1024, 0xFFFF_FFFF)
DEVICE_BUF_ALLOCS = (1, 64, 4096, 65536, 256 * 1024)
MAX_STEPS = 48
#: Log records one input may cause at most (rate limiting bounds them), besides
#: one per host program's handshake (the host's, not the guest's to repeat).
MAX_LOG_RECORDS = 16
U32 = 0xFFFF_FFFF


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global Vsock, UnixVsockHost, RXQ, TXQ, EVENTQ, FIRST_HOST_PORT, ConnKey, ConnState
    global HEADER_SIZE, MAX_PKT_PAYLOAD, HOST_CID, Header, Op, VsockFeature
    global GuestMemory, GuestAllocator, AllocationError, split, packed, Feature
    global poll_devices, DeviceState, QueueFullError
    from pyvirtio.constants import Feature
    from pyvirtio.device import DeviceState
    from pyvirtio.devices.vsock.connection import ConnKey, ConnState
    from pyvirtio.devices.vsock.device import EVENTQ, FIRST_HOST_PORT, RXQ, TXQ, Vsock
    from pyvirtio.devices.vsock.unix import UnixVsockHost
    from pyvirtio.devices.vsock.wire import (
        HEADER_SIZE,
        HOST_CID,
        MAX_PKT_PAYLOAD,
        Header,
        Op,
        VsockFeature,
    )
    from pyvirtio.driver.memory import AllocationError, GuestAllocator
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue import packed, split
    from pyvirtio.virtqueue.errors import QueueFullError
    from pyvirtio.vmm.host_loop import poll_devices

    _setup()


# -- the host programs' side, made once -----------------------------------------------

_state: dict[str, Any] = {}


def _setup() -> None:
    # The timer fd of every UnixVsockHost looks libc up; find_library runs
    # ldconfig each time, far dearer than an input: ask once.
    ctypes.util.find_library = functools.lru_cache(maxsize=None)(ctypes.util.find_library)
    # libFuzzer leaves without running atexit: the directories of runs that
    # are over (their pid gone) are removed here instead.
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        pid = name.removeprefix(TMP_PREFIX)
        if name.startswith(TMP_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    tmp = os.path.join(base, f"{TMP_PREFIX}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    uds = os.path.join(tmp, "v.sock")
    listeners = {}
    for port, kind in HOST_LISTENERS.items():
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(f"{uds}_{port}")
        sock.listen(8)
        sock.setblocking(False)
        listeners[port] = sock
    _state["uds"] = uds
    _state["listeners"] = listeners

    def cleanup() -> None:
        for sock in listeners.values():
            sock.close()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    _state["recorder"] = LogRecorder("pyvirtio")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeClock:
    """The endpoint's clock: time passes only when the input says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the guest: rings, buffers and what it saw ------------------------------------------


class Guest:
    """The driver side: rings over the device's, buffers, and the oracle's records."""

    def __init__(self, src: Bytes, device: Any, mem: Any, options: int) -> None:
        self.src = src
        self.device = device
        self.mem = mem
        self.packed = bool(options & 1)
        self.event_idx = bool(options & 2)
        self.indirect = bool(options & 4)
        self.size = (4, 16, 64)[(options >> 3) % 3]
        self.alloc = GuestAllocator(mem, RX_AREA, RX_AREA_SIZE)
        self.seqpacket = False
        #: Device-writable ranges of buffers on the RX and event queues, by token.
        self.offered: dict[int, list[tuple[int, int]]] = {}
        self.writable_len: dict[int, int] = {}
        self.token = 0
        #: Connections as the guest knows them: (guest port, host port).
        self.keys: list[tuple[int, int]] = []
        #: Per device connection: the guest's last advertised (buf_alloc, fwd_cnt)
        #: and the data bytes it received.
        self.advertised: dict[int, tuple[int, int]] = {}
        self.received: dict[int, int] = {}
        self.conn_refs: dict[int, Connection] = {}

    def start(self, features: int) -> None:
        device = self.device
        device.ack_features(features)
        self.seqpacket = bool(features & VsockFeature.SEQPACKET.mask)
        module = packed if self.packed else split
        self.driver_queues = []
        device_queues = []
        for index in range(device.num_queues):
            base = RING_BASE + index * RING_STRIDE
            desc_len, driver_len, _ = module.area_sizes(self.size)
            desc = base
            drv_area = (desc + desc_len + 63) & ~63
            dev_area = (drv_area + driver_len + 63) & ~63
            indirect_addr = INDIRECT_BASE + index * 0x2000 if self.indirect else None
            drv_cls = packed.PackedDriverQueue if self.packed else split.SplitDriverQueue
            dev_cls = packed.PackedDeviceQueue if self.packed else split.SplitDeviceQueue
            rings = (self.mem, self.size, desc, drv_area, dev_area)
            features = {"event_idx": self.event_idx, "indirect": self.indirect}
            max_indirect = MAX_INDIRECT if self.indirect else 0
            self.driver_queues.append(
                drv_cls(*rings, **features, indirect_addr=indirect_addr, max_indirect=max_indirect)
            )
            device_queues.append(dev_cls(*rings, **features))
        self.device_queues = device_queues
        for addr in list(self.offered):
            self.alloc.free(addr)
        self.offered.clear()
        self.writable_len.clear()
        self.device.activate(self.mem, Interrupt(), device_queues)

    # -- credit oracle --------------------------------------------------------------

    def track(self, conn: Connection) -> int:
        ident = id(conn)
        self.conn_refs[ident] = conn  # keeps id() unique while tracked
        return ident

    def forget_dead(self) -> None:
        live = {id(c) for c in self.device.endpoint}
        for ident in list(self.conn_refs):
            if ident not in live:
                del self.conn_refs[ident]
                self.advertised.pop(ident, None)
                self.received.pop(ident, None)


class Interrupt:
    def signal_used_queue(self, queue_index: int) -> None:
        pass

    def signal_config_change(self) -> None:
        pass


def _split(src: Bytes, total: int, pieces: int) -> list[int]:
    """``total`` cut into ``pieces`` lengths at chosen places (some may be 0)."""
    cuts = sorted(src.take(2) % (total + 1) for _ in range(pieces - 1))
    out, last = [], 0
    for cut in [*cuts, total]:
        out.append(cut - last)
        last = cut
    return out


def _header(src: Bytes, guest: Guest) -> tuple[Any, bytes]:
    """A header and its payload: well formed where the input says 0 (as it does once
    it runs dry), a known connection's, each field spoiled by a bit of ``sel``."""
    sel = src.take(1)
    src_cid = src.pick((0, 2, GUEST_CID + 1, 1 << 32 | GUEST_CID, U32)) if sel & 1 else GUEST_CID
    dst_cid = src.pick((0, GUEST_CID, 1 << 32 | HOST_CID, U32)) if sel & 2 else HOST_CID
    if guest.keys and not sel & 4:
        guest_port, host_port = src.pick(guest.keys)
    else:
        guest_port = src.take(4) if src.flag() else src.pick(GUEST_PORTS)
        host_port = src.take(4) if src.flag() else src.pick((1, 2, 3, 4, FIRST_HOST_PORT))
    conn = guest.device.endpoint.connections.get(ConnKey(host_port, guest_port))
    if sel & 32:
        sock_type = src.pick((0, 1, 2, 3, 0xFFFF))
    elif conn is not None:
        sock_type = conn.type
    else:
        sock_type = 2 if host_port == 3 else 1
    op_sel = src.take(1) % 16
    if 1 <= op_sel <= 7:
        op = op_sel
    elif op_sel == 8:
        op = src.pick((0, 8, 0xFFFF))
    elif conn is None:
        op = Op.REQUEST
    else:
        op = Op.RESPONSE if conn.state is ConnState.LOCAL_INIT else Op.RW
    payload = src.raw(src.take(2) % 1024) if op == Op.RW else b""
    length = src.pick((0, 1, len(payload) + 1, 1 << 16, U32)) if sel & 128 else len(payload)
    if sel & 8:
        flags = src.take(4) if src.flag() else src.take(1) % 4
    else:
        flags = 3 if op == Op.RW and sock_type == 2 else 0  # a whole message (EOM|EOR)
    buf_alloc = src.pick(BUF_ALLOCS) if sel & 16 else 256 * 1024
    # Honest (everything received was read), or anything.
    fwd_cnt = src.take(4) if sel & 64 else guest.received.get(id(conn), 0)
    header = Header(
        src_cid, dst_cid, guest_port, host_port, length, sock_type, op, flags, buf_alloc, fwd_cnt
    )
    return header, payload


class Run:
    """One input: the device, the guest, the host programs and the checks."""

    def __init__(self, data: bytes) -> None:
        self.src = src = Bytes(data)
        options = src.take(1)
        self.offer_seqpacket = bool(options & 1)
        self.max_connections = (1, 2, 4, 8)[(options >> 1) & 3]
        buf_alloc = src.pick(DEVICE_BUF_ALLOCS)
        self.baseline_fds = _open_fds()
        self.host = UnixVsockHost(_state["uds"], seqpacket=self.offer_seqpacket)
        self.device = Vsock(
            GUEST_CID,
            self.host,
            seqpacket=self.offer_seqpacket,
            queue_size=64,
            max_connections=self.max_connections,
            buf_alloc=buf_alloc,
        )
        self.clock = FakeClock()
        self.mem = GuestMemory.anonymous(MEM_SIZE)
        self.mem.fill(TX_AREA, MEM_SIZE - TX_AREA, PATTERN)
        #: What the data areas hold as far as the guest knows (its own writes).
        self.expected = bytearray(self.mem.read(TX_AREA, MEM_SIZE - TX_AREA))
        self.guest = Guest(src, self.device, self.mem, src.take(1))
        self.features = self._features(src.take(1))
        #: Host programs' sockets: accepted from the listeners and connected to the device.
        self.peers: list[socket.socket] = []
        self.stats = dict(self.device.stats)
        self.offered: list[tuple[int, int]] = []
        self.handshakes = 0

    def _features(self, choice: int) -> int:
        offered = self.device.offered_features
        features = offered & ~(
            Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        )
        if choice & 1:
            features &= ~VsockFeature.SEQPACKET.mask
        guest = self.guest
        for flag, feature in (
            (guest.packed, Feature.RING_PACKED),
            (guest.event_idx, Feature.EVENT_IDX),
            (guest.indirect, Feature.INDIRECT_DESC),
        ):
            if flag:
                features |= feature.mask
        return features

    def activate(self) -> None:
        self.guest.start(self.features)
        self.device.endpoint.clock = self.clock
        self.guest.keys.clear()

    # -- one step, checked ------------------------------------------------------------

    def step(self) -> None:
        src = self.src
        action = src.take(1) % 16
        # Writable buffers offered before the step or during it (_post adds to it).
        self.offered = offered = [r for ranges in self.guest.offered.values() for r in ranges]
        expect: str | None = None
        if action <= 4 and self.tx_enabled():
            expect = self.tx_packet()
        elif action == 5 and self.tx_enabled():
            expect = self.tx_garbage()
        elif action in (6, 7):
            self.post_rx()
        elif action == 8:
            self.post_event()
        elif action == 9:
            self.host_connect()
        elif action == 10:
            self.host_send()
        elif action == 11:
            self.host_close_or_read()
        elif action == 12:
            self.accept_peers()
        elif action == 13:
            self.clock.now += src.pick((0.5, 1.5, 2.5, 10.0))
            timer = self.host._timer.fd  # what the loop hands the device when the alarm rings
            self.device.host_fd_ready(timer, select.POLLIN)
        elif action == 14:
            self.lifecycle()
        # Host programs accept the guest's connections at once; the loop runs (mostly once).
        self.accept_peers()
        for _ in range((src.take(1) + 1) % 3):
            poll_devices([self.device], 0)
        self.harvest()
        self.check_memory(offered)
        self.check_state(expect)

    def tx_chain(self, data: bytes, extra: int) -> tuple[list[tuple[int, int]], int]:
        """``data`` (plus ``extra`` pattern bytes) cut into device-readable buffers."""
        src = self.src
        total = len(data) + extra
        total = min(total, TX_AREA_SIZE - 8192)
        data = data.ljust(total, bytes([PATTERN]))
        pieces = 1 + src.take(1) % 4
        readable, addr, pos = [], TX_AREA, 0
        for length in _split(src, total, pieces):
            if length:
                readable.append((addr, length))
                self.guest_write(addr, data[pos : pos + length])
            pos += length
            addr += length + (src.take(1) % 4) * 16  # gaps the device must not read into
        return readable, total

    def tx_enabled(self) -> bool:
        # A disabled queue's buffers wait untouched; one waiting in the reused
        # TX area would be rewritten under it: the guest sends nothing then.
        return self.device.queue_enabled(TXQ)

    def send_tx(self, readable: list[tuple[int, int]], writable_len: int) -> bool:
        """Put a packet on the TX ring and notify; False if the ring had no room or
        the device stopped (needs a reset: it takes nothing more)."""
        writable = [(RX_AREA - 4096, writable_len)] if writable_len else []
        queue = self.guest.driver_queues[TXQ]
        try:
            queue.add(readable, writable, None)
        except (QueueFullError, ValueError):
            return False
        self.device.queue_notify(TXQ)
        for _token, used in queue.used():
            assert used == 0, f"TX buffer with used length {used}"
        return not self.device.needs_reset

    def tx_packet(self) -> str | None:
        src = self.src
        guest = self.guest
        header, payload = _header(src, guest)
        data = header.pack() + payload
        cut = src.take(1)
        if cut & 0xC0 == 0xC0:
            data = data[: src.take(1) % HEADER_SIZE]  # a short header
        extra = src.take(2) % 128 if cut & 0x20 else 0
        if cut & 0x10 and header.len <= MAX_PKT_PAYLOAD + 16:
            extra = max(extra, header.len - len(payload))  # a long len: pattern bytes
        readable, total = self.tx_chain(data, extra)
        if not readable:
            return None
        if total >= HEADER_SIZE:  # what the device reads (a cut header padded with pattern)
            header = Header.unpack(data.ljust(HEADER_SIZE, bytes([PATTERN])))
        key = ConnKey(header.dst_port, header.src_port)
        expect = self.classify(header, total, self.device.endpoint.connections.get(key))
        if not self.send_tx(readable, src.take(1) % 64 if cut & 8 else 0):
            return None
        after = self.device.endpoint.connections.get(key)
        if expect is None and after is not None and after.state is not ConnState.KILLED:
            # The device took this packet's credit: remember what the guest said.
            ident = guest.track(after)
            guest.advertised[ident] = (header.buf_alloc, header.fwd_cnt)
            guest.received.setdefault(ident, 0)
            pair = (header.src_port, header.dst_port)
            if pair not in guest.keys:
                guest.keys.append(pair)
        return expect

    def classify(self, header: Any, total: int, conn: Connection | None) -> str | None:
        """The counter a packet must land in, or None if the device takes it."""
        if total < HEADER_SIZE:
            return "short_header"
        if header.len > MAX_PKT_PAYLOAD or header.len > total - HEADER_SIZE:
            return "bad_length"
        if header.src_cid != GUEST_CID or header.dst_cid != HOST_CID:
            return "bad_address"
        if header.type not in (1, 2) or (header.type == 2 and not self.guest.seqpacket):
            return "bad_type"
        if not 1 <= header.op <= 7:
            return "bad_op"
        if conn is None:
            if header.op == Op.RST:
                return "rst"  # dropped, nothing to count
            if header.op != Op.REQUEST:
                return "no_connection"
            if len(self.device.endpoint) >= self.max_connections:
                return "over_limit"
            kind = HOST_LISTENERS.get(header.dst_port)
            wanted = socket.SOCK_SEQPACKET if header.type == 2 else socket.SOCK_STREAM
            if kind != wanted:
                return "host_refused"
            return None
        if header.type != conn.type:
            return "bad_type"
        return None

    def tx_garbage(self) -> str | None:
        src = self.src
        data = src.raw(src.take(1) % 64)
        readable, total = self.tx_chain(data, 0)
        if not readable:
            return None
        sent = self.send_tx(readable, 0)
        return "short_header" if sent and total < HEADER_SIZE else None

    def post_rx(self) -> None:
        src = self.src
        for _ in range(1 + src.take(1) % 4):
            sel = src.take(1)
            if sel & 0x80:
                length = src.take(2) % 8192
            else:
                length = (1, 43, 44, 45, 60, 300, HEADER_SIZE + 4096, 0)[sel & 7]
            self._post(RXQ, max(1, length), 1 + (sel >> 3) % 3, bool(sel & 0x40))
        self.device.queue_notify(RXQ)

    def post_event(self) -> None:
        src = self.src
        self._post(EVENTQ, src.pick((1, 3, 4, 8)), 1, False)
        self.device.queue_notify(EVENTQ)

    def _post(self, index: int, length: int, pieces: int, readable_first: bool) -> None:
        guest = self.guest
        try:
            addr = guest.alloc.alloc(length + 16 * pieces, zero=False)
        except AllocationError:
            return
        writable, at = [], addr
        for piece in _split(self.src, length, pieces):
            if piece:
                writable.append((at, piece))
            at += piece + 16
        readable = [(addr + length + 16 * (pieces - 1), 16)] if readable_first else []
        try:
            guest.driver_queues[index].add(readable, writable, addr)
        except (QueueFullError, ValueError):
            guest.alloc.free(addr)
            return
        guest.offered[addr] = writable
        self.offered += writable
        guest.writable_len[addr] = length

    # -- host programs -----------------------------------------------------------------

    def host_connect(self) -> None:
        src = self.src
        kind = socket.SOCK_SEQPACKET if src.flag() else socket.SOCK_STREAM
        path = _state["uds"] + ("_seqpacket" if kind == socket.SOCK_SEQPACKET else "")
        self.handshakes += 1
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            return
        sel = src.take(1)
        if sel & 3 == 3:
            line = src.raw(src.take(1) % 40)
        else:
            port = src.pick(GUEST_PORTS) if sel & 4 else src.take(4)
            line = f"CONNECT {port}\n".encode()
        with contextlib.suppress(OSError):
            sock.send(line)
        self.peers.append(sock)

    def _peer(self) -> socket.socket | None:
        # The newest first (the input's zeros pick it).
        return self.peers[-1 - self.src.take(1) % len(self.peers)] if self.peers else None

    def host_send(self) -> None:
        peer = self._peer()
        if peer is None:
            return
        with contextlib.suppress(OSError):
            peer.send(self.src.raw(self.src.take(2) % 2048) or b"x")

    def host_close_or_read(self) -> None:
        peer = self._peer()
        if peer is None:
            return
        how = self.src.take(1) % 4
        try:
            if how == 0:
                self.peers.remove(peer)
                peer.close()
            elif how == 1:
                peer.shutdown(socket.SHUT_WR)
            else:
                while peer.recv(65536):
                    pass
        except OSError:
            pass

    def accept_peers(self) -> None:
        for listener in _state["listeners"].values():
            while True:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    break
                sock.setblocking(False)
                self.peers.append(sock)

    def lifecycle(self) -> None:
        src = self.src
        device = self.device
        how = src.take(1) % 4
        if how == 0:
            device.reset()
            self.check_reset_fds()
            self.activate()
        elif how == 1 and device.state is DeviceState.ACTIVE:
            resources = device.sleep()
            device.restore(device.snapshot())
            device.wake(resources)
            self.guest.keys.clear()
        elif how == 2 and self.tx_enabled():
            # A driver that scribbles over its own TX ring: the device stops, never crashes.
            queue = self.guest.driver_queues[TXQ]
            desc = RING_BASE + TXQ * RING_STRIDE
            self.mem.write(desc, src.raw(32))
            try:
                queue.add([(TX_AREA, 64)], [], None)
            except (QueueFullError, ValueError):
                return
            self.device.queue_notify(TXQ)
            # The driver's side of a broken ring may raise; not the device's business.
            with contextlib.suppress(Exception):
                list(queue.used())
        else:
            device.set_queue_enabled(src.take(1) % 3, src.flag())

    # -- checks -----------------------------------------------------------------------

    def harvest(self) -> None:
        """Take the used RX and event buffers and check what the device put there."""
        guest = self.guest
        device = self.device
        new_data: set[int] = set()
        for index in (RXQ, EVENTQ):
            queue = guest.driver_queues[index]
            try:
                used = list(queue.used())
            except Exception:
                if device.needs_reset:
                    continue
                raise
            for token, written in used:
                assert isinstance(token, int)
                ranges = guest.offered.pop(token)
                capacity = guest.writable_len.pop(token)
                assert written <= capacity, (written, capacity)
                data = self.mem.readv(ranges)[:written]
                guest.alloc.free(token)
                if index == EVENTQ:
                    assert written in (0, 4), written  # never a cut event
                    if written:
                        assert data == b"\0\0\0\0", data
                    continue
                if written == 0:
                    continue
                assert written >= HEADER_SIZE, written
                header = Header.unpack(data)
                assert header.src_cid == HOST_CID and header.dst_cid == GUEST_CID, header
                assert 1 <= header.op <= 7, header
                # An RST to a packet of a type not negotiated echoes it (as Linux does).
                types = (1, 2) if guest.seqpacket or header.op == Op.RST else (1,)
                assert header.type in types, header
                if header.op == Op.RW:
                    assert written == HEADER_SIZE + header.len, (written, header)
                    assert header.len > 0 or header.type == 2, header
                else:
                    assert written == HEADER_SIZE and header.len == 0, header
                pair = (header.dst_port, header.src_port)
                if header.op == Op.REQUEST and pair not in guest.keys:
                    guest.keys.append(pair)
                conn = device.endpoint.connections.get(ConnKey(header.src_port, header.dst_port))
                if conn is None:
                    continue
                ident = guest.track(conn)
                if header.op == Op.REQUEST:
                    guest.received[ident] = 0
                if header.op == Op.RW:
                    guest.received[ident] = guest.received.get(ident, 0) + header.len
                    new_data.add(ident)
        for ident in new_data:
            conn = guest.conn_refs[ident]
            if conn.state is ConnState.KILLED:
                continue
            got = guest.received[ident]
            assert got == conn.tx_cnt, (conn, got, conn.tx_cnt)
            if ident in guest.advertised:
                buf_alloc, fwd_cnt = guest.advertised[ident]
                assert (got - fwd_cnt) & U32 <= buf_alloc, (conn, got, buf_alloc, fwd_cnt)
        guest.forget_dead()

    def guest_write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)
        self.expected[addr - TX_AREA : addr - TX_AREA + len(data)] = data

    def check_memory(self, offered: list[tuple[int, int]]) -> None:
        """Only the writable buffers offered at the start of the step may have changed."""
        after = bytearray(self.mem.read(TX_AREA, MEM_SIZE - TX_AREA))
        expected = self.expected
        for addr, length in offered:
            start = addr - TX_AREA
            expected[start : start + length] = after[start : start + length]
        if after != expected:
            first = next(i for i, (a, b) in enumerate(zip(after, expected, strict=True)) if a != b)
            raise AssertionError(f"guest memory written at {TX_AREA + first:#x}, not offered")

    def check_state(self, expect: str | None) -> None:
        device = self.device
        stats = device.stats
        for name, value in stats.items():
            assert value >= self.stats.get(name, 0), f"counter {name} went down"
        if expect is not None and expect != "rst":
            assert stats[expect] > self.stats[expect], f"refused packet not counted: {expect}"
        self.stats = dict(stats)
        endpoint = device.endpoint
        assert len(endpoint) <= self.max_connections, len(endpoint)
        for conn in endpoint:
            assert conn.state is not ConnState.KILLED, conn
            assert conn.rx_bytes == sum(len(d) for d, _ in conn.rx), conn
            assert conn.rx_bytes <= conn.buf_alloc, (conn, conn.rx_bytes)
        records = _state["recorder"].records
        for record in records:
            assert not record.exc_info, record.getMessage()
        limit = MAX_LOG_RECORDS + self.handshakes
        assert len(records) <= limit, [r.getMessage() for r in records]

    def check_reset_fds(self) -> None:
        """A reset device holds no connection sockets once the loop has moved on."""
        device = self.device
        for _ in range(2):
            poll_devices([device], 0)
        assert not device._by_fd, device._by_fd
        host = self.host
        # What the host keeps across a reset: its listeners, its timer, the
        # handshakes of host programs (private tables: no public count).
        own = len(host._listeners) + 1 + len(host._handshakes)
        opened = _open_fds() - self.baseline_fds - len(self.peers)
        assert opened == own, f"{opened} fds open after reset, the host owns {own}"

    # -- the end ----------------------------------------------------------------------

    def still_works(self) -> None:
        """A well-formed REQUEST to a listening port gets its RESPONSE (or RST, when full)."""
        device = self.device
        if device.needs_reset or device.state is not DeviceState.ACTIVE:
            return
        guest = self.guest
        self.accept_peers()  # room in the listener's backlog
        for queue in (RXQ, TXQ, EVENTQ):
            device.set_queue_enabled(queue, True)
        port = 60000
        while ConnKey(1, port) in device.endpoint.connections:
            port += 1
        full = len(device.endpoint) >= self.max_connections
        request = Header(GUEST_CID, HOST_CID, port, 1, 0, 1, Op.REQUEST, 0, 4096, 0)
        queue = guest.driver_queues[TXQ]
        try:
            queue.add([(TX_AREA, HEADER_SIZE)], [], None)
        except QueueFullError:
            return  # the ring holds buffers the device never saw (a corrupted ring)
        self.guest_write(TX_AREA, request.pack())
        device.queue_notify(TXQ)
        list(queue.used())
        if device.needs_reset:
            return
        answer = None
        for _ in range(64):
            for token, written in list(guest.driver_queues[RXQ].used()):
                assert isinstance(token, int)
                ranges = guest.offered.pop(token)
                guest.writable_len.pop(token)
                data = self.mem.readv(ranges)[:written]
                guest.alloc.free(token)
                if written >= HEADER_SIZE:
                    header = Header.unpack(data)
                    if (header.dst_port, header.src_port) == (port, 1) and header.op in (
                        Op.RESPONSE,
                        Op.RST,
                    ):
                        answer = header.op
            if answer is not None:
                break
            for _ in range(8):
                self._post(RXQ, HEADER_SIZE + 64, 1, False)
            device.queue_notify(RXQ)
        assert answer == (Op.RST if full else Op.RESPONSE), (answer, full)

    def finish(self) -> None:
        for peer in self.peers:
            peer.close()
        self.peers.clear()
        self.device.close()
        self.accept_peers()
        for peer in self.peers:
            peer.close()
        self.peers.clear()
        self.mem.close()
        opened = _open_fds() - self.baseline_fds
        assert opened == 0, f"{opened} fds left open after close"


def run_one(data: bytes) -> None:
    recorder = _state["recorder"]
    recorder.take()
    run = Run(data)
    try:
        run.activate()
        for _ in range(MAX_STEPS):
            if run.src.exhausted:
                break
            run.step()
        run.still_works()
        if run.src.flag():
            run.device.reset()
            run.check_reset_fds()
        run.check_state(None)
    except BaseException:
        with contextlib.suppress(AssertionError):  # the first finding is the one to report
            run.finish()
        raise
    run.finish()


if __name__ == "__main__":
    main(
        "fuzz_vsock",
        "Fuzz the virtio-vsock device model.",
        run_one,
        _load,
        max_len=2048,
        libfuzzer_args=["-len_control=0", "-timeout=10"],
    )
