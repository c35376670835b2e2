"""Helpers for the virtio-net tests: frame builders, a device bench where the test is the
driver, ``pyvirtio serve net`` run as a subprocess, and a network namespace of the test's own.

:class:`NetBench` activates a :class:`~pyvirtio.devices.net.Net` directly on
ring pairs (:class:`helpers.queues.DirectRig`) with a socket-pair back end
whose other end (``peer``) the test holds: the test plays the guest driver
on the rings and the network on the socket.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.queues import DirectRig
from pyvirtio.constants import Feature
from pyvirtio.devices.net import Net, NetHeader, SocketPairBackend
from pyvirtio.devices.net.wire import HDR_SIZE, NetFeature, ctrl_queue_index, internet_checksum

F = NetFeature

DEV_MAC = bytes.fromhex("020000000001")
PEER_MAC = bytes.fromhex("020000000099")
OTHER_MAC = bytes.fromhex("0200000000aa")
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")
IP_A = bytes([10, 0, 0, 1])
IP_B = bytes([10, 0, 0, 2])


# -- frames ------------------------------------------------------------------------------


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def frame_of(size: int, dst: bytes = DEV_MAC, src: bytes = PEER_MAC, seed: int = 0) -> bytes:
    """An Ethernet frame of exactly ``size`` bytes with a recognisable payload."""
    body = bytes((seed + i * 7) & 0xFF for i in range(max(0, size - 14)))
    return eth(dst, src, 0x88B5, body)[:size]


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + payload


def udp_frame(
    payload: bytes,
    *,
    dst_mac: bytes = DEV_MAC,
    src_mac: bytes = PEER_MAC,
    src: bytes = IP_A,
    dst: bytes = IP_B,
    sport: int = 1000,
    dport: int = 2000,
    partial: bool = False,
) -> bytes:
    """IPv4/UDP in Ethernet; ``partial``: checksum field holds only the pseudo-header sum."""
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if partial:
        # The folded, not complemented, pseudo-header sum (what a driver leaves).
        csum = (~internet_checksum(pseudo)) & 0xFFFF
    else:
        csum = internet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return eth(dst_mac, src_mac, 0x0800, ipv4(src, dst, 17, udp))


def udp_checksum_ok(frame: bytes) -> bool:
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    udp = ip[ihl:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    return internet_checksum(pseudo + udp) == 0


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + bytes(6) + target_ip
    return eth(BCAST, src_mac, 0x0806, body)


def icmp_echo(
    src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, ident: int, seq: int
) -> bytes:
    payload = bytes(range(32))
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
    return eth(dst_mac, src_mac, 0x0800, ipv4(src_ip, dst_ip, 1, icmp))


# -- ``pyvirtio serve net`` as a subprocess ------------------------------------------------


def serve_net_command(*args: str) -> list[str]:
    """The command line of ``pyvirtio serve net args...``, run by this Python."""
    return [sys.executable, "-m", "pyvirtio", "serve", "net", *args]


def wire_listener(path: Path, timeout: float) -> socket.socket:
    """The test's SOCK_SEQPACKET listener that ``serve net --frames-connect path`` connects to."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(timeout)
    return listener


def stop(proc: subprocess.Popen[str], timeout: float) -> tuple[str, bool]:
    """SIGTERM ``proc`` and collect its stderr, killing it if it has not stopped
    within ``timeout``; returns its stderr and whether SIGTERM stopped it."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return err, False
    return err, True


# -- a network namespace -------------------------------------------------------------------


def run(*cmd: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (``ip``, mostly), its output captured; the caller checks the status."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@contextmanager
def network_namespace(name: str) -> Iterator[str]:
    """A fresh network namespace ``name``, deleted (with whatever was moved into it)
    afterwards; the test is skipped where TAP devices or namespaces cannot be made."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is not available")
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed")
    made = run("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"ip netns add failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        run("ip", "netns", "del", name)


# -- the bench -----------------------------------------------------------------------------


class NetBench:
    """A Net on DirectRig rings; ``peer`` is the other end of its socket-pair back end."""

    def __init__(
        self,
        *,
        features: int | None = None,
        drop: int = 0,
        mtu: int = 1500,
        queue_pairs: int = 1,
        packed: bool = False,
        event_idx: bool = False,
        size: int = 16,
        kind: socket.SocketKind = socket.SOCK_SEQPACKET,
    ) -> None:
        self.backend, self.peer = SocketPairBackend.with_peer(kind)
        self.peer.settimeout(2.0)
        self.net = Net(self.backend, mac=DEV_MAC, mtu=mtu, queue_pairs=queue_pairs)
        if features is None:
            features = self.net.offered_features
        ring_bits = Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        features &= ~(drop | ring_bits)
        self.rig = DirectRig(
            self.net, packed_ring=packed, event_idx=event_idx, size=size, features=features
        )
        self.tokens = itertools.count()
        self.ranges: dict[object, list[tuple[int, int]]] = {}
        self.rig.activate()

    @property
    def ctrl_index(self) -> int:
        return ctrl_queue_index(self.net.max_queue_pairs, self.net.has_feature(F.MQ))

    def close(self) -> None:
        self.peer.close()
        self.backend.close()

    # guest side
    def post_rx(self, count: int = 1, size: int = 2048, pair: int = 0) -> list[object]:
        tokens = []
        for _ in range(count):
            token = next(self.tokens)
            self.ranges[token] = self.rig.post(2 * pair, (), [size], token)
            tokens.append(token)
        return tokens

    def post_raw_rx(
        self, readable: Sequence[bytes], writable: Sequence[int], pair: int = 0
    ) -> object:
        """A receive chain of any shape (device-readable parts included)."""
        token = next(self.tokens)
        self.ranges[token] = self.rig.post(2 * pair, readable, writable, token)
        return token

    def rx_used(self, pair: int = 0) -> list[tuple[object, int]]:
        return self.rig.used(2 * pair)

    def rx_data(self, token: object, written: int) -> bytes:
        return self.rig.read(self.ranges[token], written)

    def received(self, pair: int = 0) -> list[tuple[NetHeader, bytes]]:
        """Frames in the used receive buffers (merging MRG_RXBUF continuations)."""
        out: list[tuple[NetHeader, bytes]] = []
        pending: list[bytes] = []
        header: NetHeader | None = None
        due = 0
        for token, written in self.rx_used(pair):
            if not due and written < HDR_SIZE:
                continue  # a buffer handed back unused (bad chain, sleep)
            data = self.rx_data(token, written)
            if due:
                pending.append(data)
                due -= 1
            else:
                header = NetHeader.unpack(data)
                pending = [data[HDR_SIZE:]]
                due = header.num_buffers - 1
            if not due and header is not None:
                out.append((header, b"".join(pending)))
                header = None
        return out

    def transmit(
        self,
        frame: bytes,
        header: NetHeader | bytes | None = None,
        *,
        pair: int = 0,
        writable: Sequence[int] = (),
        split_at: int | None = None,
    ) -> object:
        """Put one frame on ``pair``'s transmitq; ``header`` may be raw bytes (malformed)."""
        head = header if isinstance(header, bytes) else (header or NetHeader()).pack()
        data = head + frame
        parts = [data] if split_at is None else [data[:split_at], data[split_at:]]
        token = next(self.tokens)
        self.rig.post(2 * pair + 1, parts, writable, token)
        return token

    def tx_used(self, pair: int = 0) -> list[tuple[object, int]]:
        return self.rig.used(2 * pair + 1)

    def ctrl(self, command: bytes, ack_room: int = 1) -> int | None:
        """Send a raw control command; returns the ack byte (None if nothing was written)."""
        token = next(self.tokens)
        writable = [ack_room] if ack_room else []
        ranges = self.rig.post(self.ctrl_index, [command], writable, token)
        used = dict(self.rig.used(self.ctrl_index))
        assert token in used, "control command not answered"
        if not used[token]:
            return None
        return self.rig.read(ranges, used[token])[0]

    # network side
    def inject(self, frame: bytes, header: NetHeader | bytes | None = None) -> None:
        """The network sends a frame; the host tells the device its back end is readable."""
        head = header if isinstance(header, bytes) else (header or NetHeader()).pack()
        self.peer.send(head + frame)
        self.net.backend_readable()

    def wire(self, timeout: float = 0.0) -> list[bytes]:
        """Everything the device sent to the network (header included)."""
        out = []
        while select.select([self.peer], [], [], timeout)[0]:
            out.append(self.peer.recv(1 << 17))
            timeout = 0.0
        return out

    def backend_has_data(self) -> bool:
        return bool(select.select([self.backend.fileno()], [], [], 0)[0])
