"""Fuzz target: the virtio-net device model as a hostile driver and a hostile peer drive it.

The input bytes choose the device (queue pairs, queue size, MTU, whether a
front end owns the control queue), the features the driver acks (any mix
of CSUM, GUEST_* and HOST_* offloads, MRG_RXBUF, CTRL_VQ, CTRL_RX(_EXTRA),
CTRL_MAC_ADDR, CTRL_GUEST_OFFLOADS, MQ, MTU, STATUS, and the unoffered
CTRL_VLAN; a refused set is trimmed to what the rules allow), the ring
layout (split or packed, event index, indirect tables), then a sequence of
steps against the real :class:`~pyvirtio.devices.net.Net` on real rings in
one guest memory:

* transmit chains: a ``virtio_net_hdr`` with fuzz-chosen flags, gso_type,
  hdr_len, gso_size, csum_start/offset and num_buffers, then frames of any
  length (runts, MTU-sized, above the MTU, above the 64 KiB bound), cut into
  several device-readable buffers, sometimes with a device-writable one;
* receive buffers of odd shapes (tiny, header-sized, split, with a
  device-readable part, as large as a GSO frame);
* control commands: any class, command and payload length; MAC tables
  with huge counts, VQ_PAIRS_SET out of range, GUEST_OFFLOADS with bits
  never negotiated; ack buffers of no, one or many bytes;
* frames the peer sends (any header, runts, oversize, to the device's
  address, broadcast, multicast, table entries, strangers);
* notifies of any queue, link changes, sleep and wake, a host loop turn
  (``host_fds``/``host_fd_ready`` through a real poll), the peer draining
  or not (so the back end would block), and rarely raw garbage written over
  a descriptor.

The back end is the real :class:`~.backends.SocketPairBackend` (an AF_UNIX
SOCK_SEQPACKET pair is cheap in-process); the target holds the peer socket.

Findings (checked after every step): an exception out of the model; a log
record with a traceback, or more than a bounded number of records per
input; a counter that went down; a MAC filter table above its limit;
guest memory written outside the device-writable buffers the driver
offered, or inside them beyond the used length; and, while no descriptor
was garbled: a used length larger than the chain offered (the driver queue
checks it), a transmit chain used with a length, a transmit frame neither
sent nor counted as dropped (``tx_used == tx_frames + drops``), a sent
frame whose bytes differ from the guest's or whose header carries a flag,
gso_type or num_buffers the features forbid; a receive frame whose
``num_buffers`` disagrees with the used entries, whose length was never
sent by the peer, whose header carries flags the driver did not negotiate;
peer frames not delivered, dropped (counted), pending or still queued
(``injected == rx_frames + rx drops + pending + unread``); a control command
without exactly one ack byte (or a used length 0 when there is no room), an
ack other than OK/ERR, OK for a command the features or the spec do not
allow, ERR for one they do, and an acknowledged command not in force.  At
the end, a device that did not set needs_reset still sends a well-formed
frame, and a frame waiting for receive buffers is placed or dropped once the
driver has given its queue every descriptor it has.

Runs under atheris (coverage guided) when it is installed, and under
hypothesis otherwise (``fuzz/_common.py``)::

    python fuzz/fuzz_net.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_net.py --engine hypothesis --runs 300   # force hypothesis
"""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

# Run as a script: its directory is on sys.path.
from _common import Bytes, LogRecorder, main

TARGET = "fuzz_net"
#: Two adjacent regions, so buffers can straddle the boundary.
REGION_SIZE = 1 << 20
BOUNDARY = REGION_SIZE
RING_BASE = 0x1000
RING_STRIDE = 0x2000
INDIRECT_BASE = 0x20000
INDIRECT_STRIDE = 0x4000
MAX_INDIRECT = 8
#: Buffers are allocated from here up; everything above RING_BASE and below
#: DATA_BASE is rings and indirect tables.
DATA_BASE = 0x48000
DATA_END = 2 * REGION_SIZE
PATTERN = 0xA5
MAX_STEPS = 40
#: Log records allowed per input: every kind of problem logs at most once
#: per interval, plus the one-off lines (needs reset, refused features).
MAX_LOG_RECORDS = 40

HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = 12
ETH_HLEN = 14
SPLIT_SIZES = (1, 2, 4, 8, 16, 64)
PACKED_SIZES = (1, 2, 3, 4, 7, 16, 64)
GSO_TYPES = (0, 1, 3, 4, 5, 0x81, 0x84, 0x80, 0x83)
FRAME_LENGTHS = (60, 0, 1, 13, 14, 15, 46, 64, 1000, 1514, 1518, 1522, 1523, 9000, 65550, 65551)
RX_LENGTHS = (1526, 2048, 0, 1, 11, 12, 13, 26, 60, 74, 4096, 65562)
DEVICE_MAC = bytes.fromhex("525400123456")
OTHER_MACS = (
    DEVICE_MAC,
    b"\xff" * 6,
    bytes.fromhex("01005e000001"),
    bytes.fromhex("333300000001"),
    bytes.fromhex("525400abcdef"),
    bytes.fromhex("020000000001"),
)

_DESC = struct.Struct("<QIHH")


def _load() -> None:
    """Import the code under test (after atheris has hooked imports, when it is used)."""
    global Feature, GuestMemory, Net, NetFeature, SocketPairBackend, VirtqueueError
    global QueueFullError, split, packed, wire, LOG, MEM, STAT_DROPS_TX, STAT_DROPS_RX
    from pyvirtio.constants import Feature
    from pyvirtio.devices.net import Net, NetFeature, wire
    from pyvirtio.devices.net.backends import SocketPairBackend
    from pyvirtio.devices.net.stats import STAT_KEYS
    from pyvirtio.memory import GuestMemory
    from pyvirtio.virtqueue import packed, split
    from pyvirtio.virtqueue.common import VirtqueueError
    from pyvirtio.virtqueue.errors import QueueFullError

    # Every drop has a counter named so (stats.py); a transmit the back end
    # refused is counted apart.
    STAT_DROPS_TX = [k for k in STAT_KEYS if k.startswith("tx_dropped_")] + ["tx_backend_errors"]
    STAT_DROPS_RX = [k for k in STAT_KEYS if k.startswith("rx_dropped_")]
    LOG = LogRecorder("pyvirtio")
    MEM = GuestMemory()
    MEM.add_anonymous(0, REGION_SIZE)
    MEM.add_anonymous(REGION_SIZE, REGION_SIZE)


class _Interrupt:
    def signal_used_queue(self, queue_index: int) -> None:
        pass

    def signal_config_change(self) -> None:
        pass


# -- the oracle: what the spec lets a control command do ----------------------------------------

#: "Feature bit requirements" among the receive offloads, written out
#: independently of pyvirtio's table.
_OFFLOAD_NEEDS = {1 << 7: 1 << 1, 1 << 8: 1 << 1, 1 << 10: 1 << 1, 1 << 9: (1 << 7) | (1 << 8)}
_GUEST_OFFLOADS = (1 << 1) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)


def ctrl_allowed(command: bytes, features: int, max_pairs: int) -> bool:
    """Whether the device may answer VIRTIO_NET_OK (device-types/net: Control Virtqueue)."""

    def has(bit: int) -> bool:
        return bool(features >> bit & 1)

    if len(command) < 2:
        return False
    cls, cmd, data = command[0], command[1], command[2:]
    if cls == 0:  # RX
        needs = {0: 18, 1: 18, 2: 20, 3: 20, 4: 20, 5: 20}.get(cmd)
        return needs is not None and has(needs) and len(data) == 1
    if cls == 1 and cmd == 0:  # MAC_TABLE_SET
        if not has(18):
            return False
        pos = 0
        for _ in range(2):
            if pos + 4 > len(data):
                return False
            entries = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4 + 6 * entries
        return pos == len(data)
    if cls == 1 and cmd == 1:  # MAC_ADDR_SET
        return has(23) and len(data) == 6 and not data[0] & 1
    if cls == 4 and cmd == 0:  # MQ_VQ_PAIRS_SET
        if not has(22) or len(data) != 2:
            return False
        return 1 <= int.from_bytes(data, "little") <= max_pairs
    if cls == 5 and cmd == 0:  # GUEST_OFFLOADS_SET
        if not has(2) or len(data) != 8:
            return False
        offloads = int.from_bytes(data, "little")
        if offloads & ~(features & _GUEST_OFFLOADS):
            return False
        return all(not offloads & bit or offloads & need for bit, need in _OFFLOAD_NEEDS.items())
    return False  # VLAN, ANNOUNCE (never negotiated), unknown classes and commands


# -- one input's guest --------------------------------------------------------------------------


class Guest:
    """The driver, the peer and the bookkeeping of one input."""

    def __init__(self, src: Bytes) -> None:
        self.src = src
        opts = src.take(1)
        self.pairs = (1, 1, 2, 3)[opts & 3]
        self.front_end_control = bool(opts & 4) and bool(opts & 8)
        self.packed = bool(opts & 0x10)
        self.event_idx = bool(opts & 0x20)
        self.indirect = bool(opts & 0x40)
        sizes = PACKED_SIZES if self.packed else SPLIT_SIZES
        self.size = sizes[src.take(1) % len(sizes)]
        mtu = src.pick((1500, 68, 9000, 65535))
        self.backend, self.peer = SocketPairBackend.with_peer()
        self.peer.setblocking(False)
        # The host may give the back end a small send buffer: frames then
        # wait (POLLOUT) or, above it, are refused (EMSGSIZE).
        sndbuf = (0, 0, 8192, 65536)[(opts >> 7) | (src.take(1) & 1) << 1]
        if sndbuf:
            self.backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.device = Net(
            self.backend,
            mac=DEVICE_MAC,
            mtu=mtu,
            queue_pairs=self.pairs,
            queue_size=self.size,
            front_end_control=self.front_end_control,
        )
        self.features = self._negotiate()
        F = NetFeature
        self.mrg = bool(self.features & F.MRG_RXBUF.mask)
        self.mq = bool(self.features & F.MQ.mask)
        self.data_pairs = self.pairs if self.mq else 1
        self.ctrl_index = (
            wire.ctrl_queue_index(self.pairs, self.mq) if self.features & F.CTRL_VQ.mask else -1
        )
        # Guest memory: the data area filled with the pattern (rings: start).
        MEM.fill(DATA_BASE, DATA_END - DATA_BASE, PATTERN)
        self.shadow = bytearray([PATTERN]) * (DATA_END - DATA_BASE)
        self.cursor = DATA_BASE
        #: Region base -> the end of the last buffer allocated in it.
        self.high: dict[int, int] = {}
        self.straddled = False
        self.driver_queues: list[Any] = []
        self.tainted = False
        # Accounting.
        self.tx_posted = 0
        self.tx_used = 0
        self.tx_expected: dict[bytes, int] = {}
        self.tx_seen = 0
        #: Messages the peer sent, by length.
        self.rx_injected: dict[int, list[bytes]] = {}
        self.rx_injected_count = 0
        self.rx_delivered = 0
        #: Per receiveq: (continuation buffers still expected, frame length so far).
        self.rx_partial: dict[int, tuple[list[int], bytearray]] = {}
        #: Receive offloads in force at some point of the current step.
        self.offloads = 0
        self.stats_before = dict(self.device.stats)
        self.start()

    def start(self) -> None:
        """Set the rings up (zeroed) and activate the device on them."""
        MEM.fill(0, DATA_BASE, 0)
        self.driver_queues = []
        device_queues = []
        module = packed if self.packed else split
        for index in range(self.device.num_queues):
            drv, dev = self._make_pair(module, index)
            self.driver_queues.append(drv)
            device_queues.append(dev)
        self.device.ack_features(self.features)
        self.device.activate(MEM, _Interrupt(), device_queues)

    def reset(self) -> None:
        """The driver resets the device and starts it again: chains in flight are abandoned."""
        self.harvest()
        self.device.reset()
        self.rx_partial.clear()
        self.start()

    def _make_pair(self, module: Any, index: int) -> tuple[Any, Any]:
        desc_len, driver_len, _ = module.area_sizes(self.size)
        desc = RING_BASE + index * RING_STRIDE
        driver = (desc + desc_len + 63) & ~63
        dev_area = (driver + driver_len + 63) & ~63
        assert dev_area + 0x400 < RING_BASE + (index + 1) * RING_STRIDE
        indirect_addr = INDIRECT_BASE + index * INDIRECT_STRIDE if self.indirect else None
        drv_cls = packed.PackedDriverQueue if self.packed else split.SplitDriverQueue
        dev_cls = packed.PackedDeviceQueue if self.packed else split.SplitDeviceQueue
        drv = drv_cls(
            MEM,
            self.size,
            desc,
            driver,
            dev_area,
            event_idx=self.event_idx,
            indirect=self.indirect,
            indirect_addr=indirect_addr,
            max_indirect=MAX_INDIRECT if self.indirect else 0,
        )
        dev = dev_cls(
            MEM, self.size, desc, driver, dev_area, event_idx=self.event_idx, indirect=self.indirect
        )
        return drv, dev

    def _negotiate(self) -> int:
        """The input's feature choice; a set the device refuses is trimmed until accepted."""
        device = self.device
        ring_bits = Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        offered = device.offered_features & ~ring_bits
        # Mostly the whole offer (as Linux acks it) less a few bits; sometimes anything.
        mode = self.src.take(1) % 3
        if mode == 2:
            wanted = self.src.take(4) | (self.src.take(1) & 1) << NetFeature.CTRL_VLAN
        else:
            wanted = ~(self.src.take(4) & self.src.take(4) & self.src.take(4)) if mode else -1
        features = (offered | NetFeature.CTRL_VLAN.mask) & wanted
        features |= Feature.VERSION_1.mask
        for flag, feature in (
            (self.packed, Feature.RING_PACKED),
            (self.event_idx, Feature.EVENT_IDX),
            (self.indirect, Feature.INDIRECT_DESC),
        ):
            if flag:
                features |= feature.mask
        if not device.features_acceptable(features):
            problems = wire.missing_requirements(
                features | (NetFeature.CTRL_VQ.mask if self.front_end_control else 0)
            )
            assert features & ~device.offered_features or problems, hex(features)
            features &= device.offered_features
            for _ in range(4):
                for feature, needs in wire.FEATURE_REQUIREMENTS.items():
                    if features & feature.mask and not any(features & n.mask for n in needs):
                        features &= ~feature.mask
            assert device.features_acceptable(features), hex(features)
        return features

    # -- guest memory ---------------------------------------------------------------------

    def alloc(self, length: int) -> int | None:
        """A fresh buffer (never overlapping another); sometimes across the region boundary."""
        if not self.straddled and self.src.take(1) & 0x20 and self.cursor < BOUNDARY - 64:
            self.straddled = True
            self.cursor = BOUNDARY - 1 - self.src.take(1) % 63
        addr = self.cursor
        if addr + length > DATA_END:
            return None
        self.cursor = addr + max(length, 1)
        region = DATA_BASE if addr < BOUNDARY else BOUNDARY
        self.high[region] = min(self.cursor, BOUNDARY) if region == DATA_BASE else self.cursor
        if self.cursor > BOUNDARY:
            self.high[BOUNDARY] = self.cursor
        return addr

    def write(self, addr: int, data: bytes) -> None:
        MEM.write(addr, data)
        self.shadow[addr - DATA_BASE : addr - DATA_BASE + len(data)] = data

    def accept_written(self, ranges: list[tuple[int, int]], written: int) -> bytes:
        """The device wrote ``written`` bytes at the start of ``ranges``: take them into the
        shadow (the rest must still hold what the guest left there)."""
        out = bytearray()
        for addr, length in ranges:
            if len(out) >= written:
                break
            take = min(length, written - len(out))
            data = MEM.read(addr, take)
            self.shadow[addr - DATA_BASE : addr - DATA_BASE + take] = data
            out += data
        return bytes(out)

    def role(self, index: int) -> str:
        """What the device makes of queue ``index`` (Virtqueues; controlq after the pairs)."""
        if index == self.ctrl_index:
            return "ctrl"
        if index < 2 * self.data_pairs:
            return "tx" if index % 2 else "rx"
        return "other"

    def post(
        self, index: int, readable: list[bytes], writable: list[int]
    ) -> list[tuple[int, int]] | None:
        """Post a chain to queue ``index``; it is checked as its queue's role says."""
        rd = []
        for data in readable:
            addr = self.alloc(len(data))
            if addr is None:
                return None
            self.write(addr, data)
            rd.append((addr, len(data)))
        wr = []
        for length in writable:
            addr = self.alloc(length)
            if addr is None:
                return None
            wr.append((addr, length))
        try:
            self.driver_queues[index].add(rd, wr, ((self.role(index), b"".join(readable)), wr))
        except (QueueFullError, ValueError):
            return None
        if self.role(index) == "tx":
            self.tx_posted += 1
            frame = b"".join(readable)[HDR_SIZE:]
            self.tx_expected[frame] = self.tx_expected.get(frame, 0) + 1
        return wr

    def notify(self, index: int) -> None:
        if self.src.take(1) & 3 or self.driver_queues[index].kick_needed():
            self.device.queue_notify(index)

    def pieces(self, data: bytes, count: int) -> list[bytes]:
        """``data`` cut into ``count`` fuzz-chosen pieces (some may be empty)."""
        cuts = sorted(self.src.take(2) % (len(data) + 1) for _ in range(count - 1))
        out, pos = [], 0
        for cut in [*cuts, len(data)]:
            out.append(data[pos:cut])
            pos = cut
        return out

    # -- steps ------------------------------------------------------------------------------

    def frame_bytes(self, length: int) -> bytes:
        src = self.src
        dst = src.pick(OTHER_MACS) if src.take(1) & 1 else src.raw(6)
        head = (
            dst + bytes.fromhex("020000000002") + src.pick((b"\x08\x00", b"\x86\xdd", b"\x81\x00"))
        )
        ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, src.pick((6, 17)), 0, 0]) + src.raw(8)
        body = head + ip + src.raw(4)
        filler = src.raw(2) or b"\0"
        body += (filler * (length // len(filler) + 1))[: max(0, length - len(body))]
        return body[:length]

    def header(self) -> bytes:
        src = self.src
        sel = src.take(1)
        flags = src.take(1) if sel & 1 else src.pick((1, 0, 2, 4, 7))
        gso = src.take(1) if sel & 2 else src.pick(GSO_TYPES)
        gso_size = src.pick((0, 1448, 1, 0xFFFF)) if sel & 4 else src.take(2)
        csum_start, csum_offset = (34, 16) if sel & 8 else (src.take(2), src.take(2))
        return HDR.pack(flags, gso, src.take(2), gso_size, csum_start, csum_offset, src.take(2))

    def frame_length(self) -> int:
        sel = self.src.take(1)
        if sel & 0x80:
            return self.src.take(3) % 70000
        return FRAME_LENGTHS[sel % len(FRAME_LENGTHS)]

    def tx(self) -> None:
        pair = self.src.take(1) % self.pairs
        index = 2 * pair + 1
        frame = self.frame_bytes(self.frame_length())
        data = self.header() + frame
        readable = self.pieces(data, 1 + self.src.take(1) % 4)
        writable = [self.src.pick((1, 12, 64))] if self.src.take(1) & 0x10 == 0x10 else []
        if self.post(index, readable, writable) is not None:
            self.notify(index)

    def rx_buffers(self) -> None:
        index = 2 * (self.src.take(1) % self.pairs)
        for _ in range(1 + self.src.take(1) % 4):
            sel = self.src.take(1)
            count = 1 + (sel >> 4) % 3
            lengths = []
            for _ in range(count):
                length = RX_LENGTHS[self.src.take(1) % len(RX_LENGTHS)]
                if self.src.take(1) & 0x40:
                    length = self.src.take(2)
                lengths.append(length)
            readable = [self.src.raw(4)] if sel & 0x0F == 0x0F else []
            if self.post(index, readable, lengths) is None:
                break
        self.notify(index)

    def ctrl_command(self) -> bytes:
        src = self.src
        cls = src.pick((0, 0, 1, 1, 1, 2, 3, 4, 4, 5, 5, 6)) if src.take(1) & 7 else src.take(1)
        cmd = src.take(1) % 7 if src.take(1) & 7 else src.take(1)
        sel = src.take(1)
        if cls == 0:
            data = src.raw(1)
        elif cls == 1 and cmd == 0:
            data = b""
            for _ in range(2):
                entries = src.pick((0, 1, 2, 64, 65, 100, 0xFFFFFFFF, 0x2AAAAAAB))
                data += entries.to_bytes(4, "little")
                macs = b"".join(src.pick(OTHER_MACS) for _ in range(min(entries, 8)))
                real = min(entries, 130) if sel & 1 else src.take(1) % 8
                data += (macs * (real // 8 + 1) if macs else b"")[: 6 * real]
        elif cls == 1:
            data = src.pick(OTHER_MACS) if sel & 1 else src.raw(6)
        elif cls == 4:
            data = src.pick((2, 1, 3, 0, 4, 0x8000, 0xFFFF)).to_bytes(2, "little")
        elif cls == 5:
            acked = self.features & _GUEST_OFFLOADS
            value = acked & src.take(2) << 1 if sel & 1 else src.take(8)
            data = value.to_bytes(8, "little")
        else:
            data = src.raw(src.take(1) % 16)
        if sel & 0x30 == 0x30:  # a wrong length
            data = data[: src.take(1) % (len(data) + 1)] + src.raw(src.take(1) % 3)
        if sel == 0xFF:
            data += bytes(1 << 16)  # above MAX_CTRL_COMMAND
        return bytes([cls, cmd]) + data

    def ctrl(self) -> None:
        # Without a control queue the command goes to whatever queue has its index.
        index = self.ctrl_index if self.ctrl_index >= 0 else 2
        command = self.ctrl_command()
        readable = self.pieces(command, 1 + self.src.take(1) % 3)
        writable = [] if self.src.take(1) & 0x1F == 0x1F else [self.src.pick((1, 1, 1, 0, 2, 16))]
        writable = [n for n in writable if n]
        if self.post(index, readable, writable) is not None:
            self.notify(index)

    def inject(self) -> None:
        for _ in range(1 + self.src.take(1) % 3):
            sel = self.src.take(1)
            if sel == 0xFF:
                message = b""
            else:
                frame = self.frame_bytes(self.frame_length())
                message = self.header() + frame
            try:
                self.peer.send(message)
            except (BlockingIOError, OSError):
                continue
            n = len(message)
            self.rx_injected.setdefault(n, []).append(message)
            self.rx_injected_count += 1
        self.device.backend_readable()

    def drain_peer(self) -> None:
        while True:
            try:
                message = self.peer.recv(1 << 17)
            except BlockingIOError:
                return
            self.check_sent(message)

    def check_sent(self, message: bytes) -> None:
        self.tx_seen += 1
        if self.tainted:
            return
        assert len(message) >= HDR_SIZE + ETH_HLEN, len(message)
        flags, gso, _, gso_size, _, _, num_buffers = HDR.unpack_from(message)
        assert flags in (0, 1), f"flags {flags:#x} passed to the back end"
        assert num_buffers == 0, num_buffers
        host_gso = {1: NetFeature.HOST_TSO4, 3: NetFeature.HOST_UFO, 4: NetFeature.HOST_TSO6}
        if gso != 0:
            feature = host_gso.get(gso & 0x7F)
            assert feature is not None and self.features & feature.mask, f"gso {gso:#x} sent"
            assert not gso & 0x80 or self.features & NetFeature.HOST_ECN.mask
            assert flags & 1 and gso_size, "GSO without checksum or size"
        if flags & 1:
            assert self.features & NetFeature.CSUM.mask
        frame = message[HDR_SIZE:]
        count = self.tx_expected.get(frame, 0)
        assert count > 0, "a frame the guest never sent reached the back end"
        self.tx_expected[frame] = count - 1

    def host_loop(self) -> None:
        fds = self.device.host_fds()
        if not fds:
            return
        poller = select.poll()
        for fd, events in fds:
            poller.register(fd, events)
        for fd, events in poller.poll(0):
            self.device.host_fd_ready(fd, events)

    def sleep_wake(self) -> None:
        resources = self.device.sleep()
        self.harvest()
        self.device.wake(resources)

    def garble(self) -> None:
        """Raw bytes over a descriptor (or an avail/used word) of some queue."""
        index = self.src.take(1) % len(self.driver_queues)
        offset = self.src.take(2) % RING_STRIDE
        MEM.write(RING_BASE + index * RING_STRIDE + offset, self.src.raw(1 + self.src.take(1) % 16))
        self.tainted = True

    def step(self) -> None:
        src = self.src
        op = src.take(1) % 17
        if op in (0, 1, 2):
            self.tx()
        elif op in (3, 4):
            self.rx_buffers()
        elif op in (5, 6):
            self.ctrl()
        elif op in (7, 8):
            self.inject()
        elif op == 9:
            self.device.backend_readable()
        elif op == 10:
            if src.take(1) & 1:
                self.drain_peer()
            self.device.backend_writable()
        elif op == 11:
            self.device.queue_notify(src.take(1) % self.device.num_queues)
        elif op == 12:
            self.device.set_link(bool(src.take(1) & 1))
        elif op == 13:
            if src.take(1) & 1:
                self.sleep_wake()
            else:
                self.host_loop()
        elif op == 14:
            # The front end (vhost-user SET_VRING_ENABLE) turns a ring off or on.
            self.device.set_queue_enabled(src.take(1) % self.device.num_queues, src.flag())
        elif op == 15:
            self.reset()
        elif src.take(1) & 0x0F == 0x0F:
            self.garble()

    # -- checks ------------------------------------------------------------------------------

    def harvest(self) -> None:
        """Take every used entry, checking it against what was posted."""
        last_ctrl = None
        for index, queue in enumerate(self.driver_queues):
            try:
                used = list(queue.used())
            except VirtqueueError as exc:
                assert self.tainted, f"queue {index}: the device returned a bad used entry: {exc}"
                continue
            for ((kind, data), wr), written in used:
                got = self.accept_written(wr, written)
                if self.tainted:
                    continue
                if kind == "tx":
                    assert written == 0, f"transmit chain used with {written} bytes"
                    self.tx_used += 1
                elif kind == "rx":
                    self.rx_entry(index, wr, written, got)
                elif kind == "ctrl":
                    last_ctrl = data if self.ctrl_entry(data, wr, written, got) else None
                else:
                    assert written == 0, f"queue {index} with no role wrote {written} bytes"
        if last_ctrl is not None:
            self.check_ctrl_effect(last_ctrl)

    def check_ctrl_effect(self, command: bytes) -> None:
        """The last command acknowledged OK is in force."""
        device = self.device
        cls, cmd, data = command[0], command[1], command[2:]
        if cls == 0:
            name = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")[cmd]
            assert getattr(device.rx_filter, name) == bool(data[0]), name
        elif cls == 1 and cmd == 0:
            n_uni = int.from_bytes(data[:4], "little")
            uni = [data[4 + 6 * i : 10 + 6 * i] for i in range(n_uni)]
            rest = data[4 + 6 * n_uni :]
            multi = [
                rest[4 + 6 * i : 10 + 6 * i] for i in range(int.from_bytes(rest[:4], "little"))
            ]
            flt = device.rx_filter
            assert flt.unicast_overflow == (len(uni) > 64)
            assert flt.multicast_overflow == (len(multi) > 64)
            assert flt.unicast == ([] if len(uni) > 64 else uni)
            assert flt.multicast == ([] if len(multi) > 64 else multi)
        elif cls == 1:
            assert device.mac == data and device.config_bytes()[:6] == data
        elif cls == 4:
            assert device.queue_pairs == int.from_bytes(data, "little")
        else:
            offloads = int.from_bytes(data, "little")
            assert device.guest_offloads == offloads
            assert self.backend.guest_features == offloads

    def rx_entry(self, index: int, wr: list[tuple[int, int]], written: int, got: bytes) -> None:
        capacity = sum(n for _, n in wr)
        partial = self.rx_partial.get(index)
        if partial is not None:  # a continuation buffer of a merged frame
            assert written > 0, "empty buffer inside a merged frame"
            left, data = partial
            left[0] -= 1
            data += got
            if left[0]:
                assert written == capacity, "a merged frame's buffer other than the last not full"
            else:
                del self.rx_partial[index]
                self.rx_frame_done(bytes(data))
            return
        if written == 0:
            return  # an unusable chain or one handed back on sleep
        assert written >= HDR_SIZE, f"receive of {written} bytes: no room for the header"
        flags, gso, _, _, _, _, num_buffers = HDR.unpack_from(got)
        offloads = self.offloads
        assert not flags & ~3, f"receive flags {flags:#x}"
        if not offloads & NetFeature.GUEST_CSUM.mask:
            assert flags == 0, "flags without GUEST_CSUM"
        guest_gso = {1: NetFeature.GUEST_TSO4, 3: NetFeature.GUEST_UFO, 4: NetFeature.GUEST_TSO6}
        if gso:
            feature = guest_gso.get(gso & 0x7F)
            assert feature is not None and offloads & feature.mask, f"gso {gso:#x} received"
            assert not gso & 0x80 or offloads & NetFeature.GUEST_ECN.mask
        if not self.mrg:
            assert num_buffers == 1, num_buffers
        assert num_buffers >= 1, num_buffers
        if num_buffers == 1:
            self.rx_frame_done(got)
            return
        assert written == capacity, "a merged frame's first buffer not full"
        self.rx_partial[index] = ([num_buffers - 1], bytearray(got))

    def rx_frame_done(self, data: bytes) -> None:
        """A whole frame reached the driver: it is one the peer sent, header fields kept,
        the frame unchanged but for a checksum the device completed."""
        sent = self.rx_injected.get(len(data), [])
        for i in range(len(sent)):
            message = sent[i]
            if message[2:10] != data[2:10]:
                continue
            if message[HDR_SIZE:] == data[HDR_SIZE:]:
                break
            if message[0] & 1 and not self.offloads & NetFeature.GUEST_CSUM.mask:
                at = HDR_SIZE + int.from_bytes(message[6:8], "little")
                at += int.from_bytes(message[8:10], "little")
                if (
                    message[HDR_SIZE:at] == data[HDR_SIZE:at]
                    and message[at + 2 :] == data[at + 2 :]
                ):
                    break
        else:
            raise AssertionError(f"a {len(data)}-byte frame the peer never sent was received")
        del sent[i]
        self.rx_delivered += 1

    def ctrl_entry(
        self, command: bytes, wr: list[tuple[int, int]], written: int, got: bytes
    ) -> bool:
        """Check one answered command; whether it was acknowledged OK."""
        if not sum(n for _, n in wr):
            assert written == 0, "ack written with no room"
            return False
        assert written == 1, f"control command used with {written} bytes"
        ack = got[0]
        assert ack in (0, 1), f"ack {ack}"
        if len(command) > 1 << 16:
            assert ack == 1, "an oversized command acknowledged"
            return False
        allowed = ctrl_allowed(command, self.features, self.pairs)
        assert (ack == 0) == allowed, f"ack {ack} for {command[:16].hex()}, allowed {allowed}"
        return allowed

    def check_memory(self) -> None:
        """Guest memory holds what the guest wrote, except what the device reported writing.

        Checked up to a page past the last buffer of each region: nothing
        beyond was ever offered, and comparing all of it costs more than
        the rest of the input.
        """
        shadow = self.shadow
        for base, end in ((DATA_BASE, BOUNDARY), (BOUNDARY, DATA_END)):
            top = min(end, max(base, self.high.get(base, base)) + 4096)
            data = bytes(MEM.view(base, top - base))
            expected = shadow[base - DATA_BASE : top - DATA_BASE]
            if data != expected:
                at = next(i for i in range(len(data)) if data[i] != expected[i])
                raise AssertionError(f"guest memory written outside the buffers at {base + at:#x}")

    def check(self) -> None:
        self.offloads |= self.device.guest_offloads
        self.harvest()
        device = self.device
        if not self.tainted:
            self.check_memory()
        stats = device.stats
        for key, value in stats.items():
            assert value >= self.stats_before.get(key, 0), f"counter {key} went down"
        self.stats_before = dict(stats)
        flt = device.rx_filter
        assert len(flt.unicast) <= 64 and len(flt.multicast) <= 64
        assert not (flt.unicast_overflow and flt.unicast)
        assert not (flt.multicast_overflow and flt.multicast)
        for record in LOG.records:
            assert not record.exc_info, f"traceback logged: {record.getMessage()}"
        assert len(LOG.records) <= MAX_LOG_RECORDS, [r.getMessage() for r in LOG.records]
        if self.tainted:
            return
        drops = sum(stats[k] for k in STAT_DROPS_TX)
        assert self.tx_used == stats["tx_frames"] + drops, (self.tx_used, stats)
        assert self.tx_used + (1 if device.wants_writable() else 0) <= self.tx_posted
        assert self.rx_delivered <= stats["rx_frames"]

    def finish(self) -> None:
        """The end of the input: accounting in full, then a device that is fine still works."""
        device = self.device
        self.drain_peer()
        self.check()
        stats = device.stats
        if not self.tainted:
            assert self.tx_seen == stats["tx_frames"], (self.tx_seen, stats["tx_frames"])
            unread = 0
            while True:
                try:
                    self.backend.sock.recv(1 << 17)
                except BlockingIOError:
                    break
                unread += 1
            pending = 1 if device._rx_len else 0
            rx_drops = sum(stats[k] for k in STAT_DROPS_RX)
            accounted = stats["rx_frames"] + rx_drops + pending + unread
            assert self.rx_injected_count == accounted, (self.rx_injected_count, accounted, stats)
        if device.needs_reset or self.tainted:
            return
        # A well-formed frame still goes out (every ring enabled, the link up).
        for index in range(device.num_queues):
            device.set_queue_enabled(index, True)
        device.set_link(True)
        self.check_rx_progress()
        device.backend_writable()
        self.drain_peer()
        device.backend_writable()
        self.drain_peer()
        self.harvest()
        if device.wants_writable():
            return  # the peer's queue is full of what it could not read yet
        sent = stats["tx_frames"]
        frame = DEVICE_MAC + bytes.fromhex("0200000000020800") + bytes(46)
        data = HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame
        if self.post(1, [data], []) is None:
            return
        device.queue_notify(1)
        self.drain_peer()
        self.check()
        assert stats["tx_frames"] == sent + 1, "a healthy device stopped sending"

    def check_rx_progress(self) -> None:
        """A frame waiting for receive buffers is placed or dropped once the driver has given
        its queue every descriptor it has (as 4 KiB buffers): it never waits for good."""
        device = self.device
        if not device._rx_len or device.needs_reset:
            return
        stats = device.stats
        index = 2 * device._rx_pair
        before = stats["rx_frames"] + sum(stats[k] for k in STAT_DROPS_RX)
        while True:
            addr = self.alloc(4096)
            if addr is None:
                return  # guest memory used up: nothing to conclude
            wr = [(addr, 4096)]
            try:
                self.driver_queues[index].add([], wr, (("rx", b""), wr))
            except QueueFullError:
                break
        device.queue_notify(index)
        self.harvest()
        after = stats["rx_frames"] + sum(stats[k] for k in STAT_DROPS_RX)
        assert after > before, (
            f"receive stalled: a {device._rx_len}-byte frame waits on queue {index}, "
            f"which has no descriptor left for the driver to give"
        )

    def close(self) -> None:
        self.peer.close()
        self.backend.close()


def run_one(data: bytes) -> None:
    src = Bytes(data)
    LOG.take()
    guest = Guest(src)
    try:
        guest.check()
        for _ in range(MAX_STEPS):
            if src.exhausted:
                break
            guest.offloads = guest.device.guest_offloads
            guest.step()
            guest.check()
        guest.finish()
    finally:
        guest.close()
        LOG.take()


if __name__ == "__main__":
    main(
        "fuzz_net",
        "Fuzz the virtio-net device model.",
        run_one,
        _load,
        max_len=4096,
        libfuzzer_args=["-len_control=0"],
    )
