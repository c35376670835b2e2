"""Interop with DPDK 22.11's dpdk-testpmd, a real peer nobody here wrote.

* DPDK as the front end: testpmd's virtio-user port drives ``pyvirtio serve
  net`` (a subprocess, its wire a SOCK_SEQPACKET socket the test holds) in
  txonly, rxonly and io forwarding, over split and packed rings, with
  VIRTIO_NET_F_MRG_RXBUF on and off.  Counts are exact: every frame testpmd
  says it sent reaches the wire, every frame the wire sends is counted by
  testpmd, and io echoes are byte-identical.
* DPDK as the back end: testpmd's vhost PMD serves a port that
  VhostUserFrontend + NetDriver drive; io and macswap echo every frame.

EAL runs with ``--no-huge -m 256``, so no hugepage setting of the machine
changes.  Its memory is then a memfd that cannot be sealed against shrinking
(with hugepages it is a hugetlbfs file, no better), so ``serve net`` runs with
``--unsealed-memory allow``.
Every testpmd has a bounded wait for each step and is killed on teardown.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.net import serve_net_command, stop, wire_listener
from pyvirtio.constants import DeviceId
from pyvirtio.devices.net.wire import HDR_SIZE, NetFeature
from pyvirtio.driver.net import NetDriver, NetDriverError
from pyvirtio.driver.vhost_user import VhostUserFrontend

TESTPMD = "dpdk-testpmd"
#: Bound of every wait on testpmd or on frames.
STEP = 15.0
#: EAL options: two lcores (main, one forwarding), no PCI, memfd memory.
EAL = ["-l", "0,1", "-n", "1", "--no-huge", "-m", "256", "--single-file-segments", "--no-pci"]
APP = ["--nb-cores=1", "--total-num-mbufs=4096", "--port-topology=loop", "-i"]
PEER = bytes.fromhex("020000000099")
BURST = 32

PACKED_INDIRECT_WRITE = (
    "DPDK 22.11's packed ring sends multi-segment frames through an indirect table whose "
    "every entry, the device-readable header included, is marked WRITE; the spec forbids "
    "that and pyvirtio refuses the ring (DEVICE_NEEDS_RESET)"
)


@pytest.fixture(scope="module", autouse=True)
def _testpmd_installed() -> None:
    if shutil.which(TESTPMD) is None:
        pytest.fail(f"{TESTPMD} is missing: `make test` installs the Debian package dpdk-dev")


def frame(size: int, seed: int, dst: bytes = PEER) -> bytes:
    """An Ethernet frame (IPv4 ethertype, so testpmd forwards it as is) of ``size`` bytes."""
    body = bytes((seed * 31 + i * 7) & 0xFF for i in range(size - 14))
    return dst + bytes.fromhex("020000000001") + b"\x08\x00" + body


class Testpmd:
    __test__ = False

    """dpdk-testpmd in interactive mode, its output collected by a thread."""

    def __init__(self, vdev: str, mode: str, tmp: Path, *extra: str) -> None:
        self.output = ""
        self._lock = threading.Lock()
        cmd = [
            "stdbuf",  # testpmd prints with stdio: line-buffer it on a pipe
            "-oL",
            TESTPMD,
            *EAL,
            "--file-prefix",
            f"pyvirtio{os.getpid()}_{tmp.name}",
            f"--vdev={vdev}",
            "--",
            f"--forward-mode={mode}",
            *APP,
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Raw reads: the prompt ends no line.
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                self.output += chunk.decode(errors="replace")

    def command(self, line: str, expect: str, since: int | None = None) -> str:
        """Send a command; wait until ``expect`` (a regex) appears in what follows it."""
        start = len(self.output) if since is None else since
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        return self.wait_for(expect, start)

    def wait_for(self, expect: str, start: int = 0) -> str:
        deadline = time.monotonic() + STEP
        while time.monotonic() < deadline:
            with self._lock:
                text = self.output[start:]
            if re.search(expect, text):
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"testpmd: no {expect!r} within {STEP} s; output:\n{self.output}")

    def port_stats(self) -> dict[str, int]:
        text = self.command("show port stats 0", r"TX-bytes:\s+\d+")
        return {
            k: int(v) for k, v in re.findall(r"([RT]X-(?:packets|bytes|errors)):\s+(\d+)", text)
        }

    def start(self) -> None:
        """Start forwarding; returns once frames sent from now on are forwarded.

        testpmd's ``start`` (start_packet_forwarding in DPDK 22.11's
        app/test-pmd/testpmd.c) prints the streams ("... forwards packets on
        N streams") and only then empties every RX queue
        (flush_fwd_rx_queues: two passes over the queues, 10 ms apart,
        freeing every frame read), prints the queue configuration, resets
        the forwarding counters and launches the forwarding lcores.  A frame
        the device places during the flush is read and freed: counted in the
        port's RX-packets, never forwarded nor in the forwarding statistics.
        The prompt returns when start_packet_forwarding has, after the flush.
        """
        self.wait_for(r"testpmd> ")
        self.command("start", r"forwards packets[\s\S]*\ntestpmd> ")

    def stop(self) -> dict[str, int]:
        """Stop forwarding; the port's counters."""
        self.command("stop", r"Done\.")
        return self.port_stats()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.wait(STEP)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._reader.join(STEP)


@contextmanager
def run_testpmd(vdev: str, mode: str, tmp: Path, *extra: str) -> Iterator[Testpmd]:
    pmd = Testpmd(vdev, mode, tmp, *extra)
    try:
        yield pmd
    finally:
        pmd.close()


class Wire:
    """The test's end of ``serve net``'s wire, with a thread counting what arrives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames: list[bytes] = []
        self._stop = False
        # The test sends on this socket too: a send may wait for serve net
        # to drain the wire (a loaded machine), so the timeout is a step's,
        # and the reader looks for data with select instead.
        sock.settimeout(STEP)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if not ready:
                    continue
                data = self.sock.recv(1 << 17)
            except (OSError, ValueError):
                return
            if not data:
                return  # serve net closed its end
            self.frames.append(data)

    def send(self, data: bytes) -> None:
        """Send the frame ``data`` to ``serve net`` (with a zero virtio-net header)."""
        self.sock.sendall(bytes(HDR_SIZE) + data)

    def echo_paced(self, frames: list[bytes], pmd: Testpmd) -> None:
        """Send ``frames`` a burst at a time, each once the bursts before came back:
        testpmd drops what its TX ring cannot take."""
        for start in range(0, len(frames), BURST):
            for data in frames[start : start + BURST]:
                self.send(data)
            self.wait_echoes(frames[: start + BURST], pmd)

    def wait_count(self, count: int) -> None:
        """Wait until ``count`` frames arrived; fail saying how many did."""
        deadline = time.monotonic() + STEP
        while len(self.frames) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{len(self.frames)} of {count} frames arrived in {STEP} s")
            time.sleep(0.01)

    def wait_echoes(self, sent: list[bytes], pmd: Testpmd) -> None:
        """Wait until every frame of ``sent`` came back (in any order); fail naming
        the missing ones, with testpmd's counters."""
        deadline = time.monotonic() + STEP
        while len(self.frames) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = Counter(f[HDR_SIZE:] for f in self.frames)
        missing = []
        for index, data in enumerate(sent):
            if arrived[data]:
                arrived[data] -= 1
            else:
                missing.append(index)
        if missing or len(self.frames) != len(sent):
            raise AssertionError(
                f"{len(self.frames)} of {len(sent)} frames came back in {STEP} s; "
                f"missing: frames {missing}; testpmd port: {pmd.port_stats()}"
            )

    def settle(self) -> None:
        """Wait until nothing more arrives for a while."""
        seen = -1
        while seen != len(self.frames):
            seen = len(self.frames)
            time.sleep(0.3)

    def close(self) -> None:
        self._stop = True
        self._thread.join(STEP)
        self.sock.close()


@contextmanager
def served_net(tmp: Path, queues: int = 1) -> Iterator[tuple[Path, Wire]]:
    """``pyvirtio serve net`` on a socket wire; yields its vhost-user socket and the wire."""
    listener = wire_listener(tmp / "wire", STEP)
    vhost = tmp / "vhost.sock"
    proc = subprocess.Popen(
        serve_net_command(
            "--socket",
            str(vhost),
            "--frames-connect",
            str(tmp / "wire"),
            "--queues",
            str(queues),
            # DPDK's --no-huge memory is a memfd without F_SEAL_SHRINK (its
            # hugepages are hugetlbfs files, unsealable too): trust testpmd.
            "--unsealed-memory",
            "allow",
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    wire = None
    try:
        peer, _ = listener.accept()
        wire = Wire(peer)
        yield vhost, wire
    finally:
        err, _ = stop(proc, STEP)
        if wire is not None:
            wire.close()
        listener.close()
        assert "Traceback" not in err, err


def virtio_user(path: Path, packed: bool, mrg: bool, queues: int = 1) -> str:
    return (
        f"net_virtio_user0,path={path},queues={queues},packed_vq={int(packed)},mrg_rxbuf={int(mrg)}"
    )


@contextmanager
def virtio_user_on_serve_net(
    tmp: Path,
    mode: str,
    packed: bool,
    mrg: bool,
    *,
    queues: int = 1,
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[Wire, Testpmd]]:
    """testpmd's virtio-user port, forwarding in ``mode`` with the ``extra`` options, on
    ``serve net``'s vhost-user socket; yields the wire and testpmd once forwarding started."""
    with (
        served_net(tmp, queues) as (vhost, wire),
        run_testpmd(virtio_user(vhost, packed, mrg, queues), mode, tmp, *extra) as pmd,
    ):
        pmd.start()
        yield wire, pmd


RINGS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
MRG = [pytest.param(True, id="mrg"), pytest.param(False, id="nomrg")]


# -- DPDK as the front end ------------------------------------------------------------------


#: (ring, MRG_RXBUF, segments per frame): MRG_RXBUF changes nothing on transmit,
#: so two-segment frames run once per ring.
TXONLY = [
    pytest.param(False, True, 1, id="split-mrg"),
    pytest.param(False, False, 1, id="split-nomrg"),
    pytest.param(True, True, 1, id="packed-mrg"),
    pytest.param(True, False, 1, id="packed-nomrg"),
    pytest.param(False, True, 2, id="split-2seg"),
    pytest.param(True, True, 2, id="packed-2seg"),
]


@pytest.mark.parametrize(("packed", "mrg", "segments"), TXONLY)
def test_testpmd_txonly_every_frame_reaches_the_wire(
    tmp_path: Path, packed: bool, mrg: bool, segments: int
) -> None:
    """testpmd counts a frame as sent once it is on the transmitq, and closing
    the port disables the rings (SET_VRING_ENABLE 0): frames the device has not
    sent by then are discarded (vhost-user.rst "Ring states"; up to a ring's
    worth when the wire pushed back).  So the port closes only once the wire
    has every frame testpmd counted."""
    if segments > 1 and packed:
        pytest.skip(PACKED_INDIRECT_WRITE)
    extra = ("--txpkts=40,24",) if segments > 1 else ()
    with virtio_user_on_serve_net(tmp_path, "txonly", packed, mrg, extra=extra) as (wire, pmd):
        wire.wait_count(2000)
        stats = pmd.stop()
        wire.wait_count(stats["TX-packets"])
        pmd.close()  # port close: SET_VRING_ENABLE 0, GET_VRING_BASE
        wire.settle()
        assert stats["TX-packets"] >= 2000
        assert len(wire.frames) == stats["TX-packets"]
        assert {len(f) for f in wire.frames} == {HDR_SIZE + 64}
        assert all(f[HDR_SIZE + 12 : HDR_SIZE + 14] == b"\x08\x00" for f in wire.frames)


@pytest.mark.parametrize("mrg", MRG)
@pytest.mark.parametrize("packed", RINGS)
def test_testpmd_rxonly_counts_every_frame_of_the_wire(
    tmp_path: Path, packed: bool, mrg: bool
) -> None:
    frames = [frame(60 + (i * 37) % 1455, i) for i in range(1000)]
    with virtio_user_on_serve_net(tmp_path, "rxonly", packed, mrg) as (wire, pmd):
        for data in frames:
            wire.send(data)
        deadline = time.monotonic() + STEP
        while pmd.port_stats()["RX-packets"] < len(frames) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = pmd.stop()
    assert stats["RX-packets"] == len(frames)
    assert stats["RX-bytes"] == sum(len(f) for f in frames)
    assert stats["RX-errors"] == 0


@pytest.mark.parametrize("mrg", MRG)
@pytest.mark.parametrize("packed", RINGS)
def test_testpmd_io_echoes_every_frame_byte_identical(
    tmp_path: Path, packed: bool, mrg: bool
) -> None:
    frames = [frame(60 + (i * 53) % 1455, i) for i in range(1024)]
    with virtio_user_on_serve_net(tmp_path, "io", packed, mrg) as (wire, pmd):
        wire.echo_paced(frames, pmd)
        stats = pmd.stop()
    assert [f[HDR_SIZE:] for f in wire.frames] == frames
    assert stats["RX-packets"] == stats["TX-packets"] == len(frames)


@pytest.mark.parametrize("packed", RINGS)
def test_testpmd_io_over_two_queue_pairs(tmp_path: Path, packed: bool) -> None:
    """virtio-user with queues=2 owns the control queue: it acks CTRL_RX, CTRL_MAC_ADDR
    and MQ without CTRL_VQ and picks pairs with SET_VRING_ENABLE (pair 0 at
    DRIVER_OK, pair 1 when the port starts, before the prompt).  Frames are
    sent only once ``start`` has flushed testpmd's RX queues (:meth:`Testpmd.start`)."""
    # Distinct UDP flows, so that steering spreads them over both pairs.
    frames = [
        frame(60 + i % 200, i)[:14]
        + bytes.fromhex("4500002e0000000040110000")
        + bytes([10, 0, 0, 1, 10, 0, 1, i & 0xFF])
        + (1000 + i).to_bytes(2, "big")
        + b"\x07\xd0"
        + frame(60 + i % 200, i)[38:]
        for i in range(512)
    ]
    two_pairs = virtio_user_on_serve_net(
        tmp_path, "io", packed, mrg=True, queues=2, extra=("--rxq=2", "--txq=2")
    )
    with two_pairs as (wire, pmd):
        wire.echo_paced(frames, pmd)
        stats = pmd.stop()
    # Two queues need not keep the order between flows.
    assert sorted(f[HDR_SIZE:] for f in wire.frames) == sorted(frames)
    assert stats["RX-packets"] == stats["TX-packets"] == len(frames)
    streams = re.findall(r"RX Port=\s*0/Queue=\s*(\d)[^\n]*\n\s*RX-packets:\s+(\d+)", pmd.output)
    assert {queue for queue, count in streams if int(count) > 0} == {"0", "1"}, streams


# -- DPDK as the back end -------------------------------------------------------------------


@contextmanager
def vhost_pmd(tmp: Path, mode: str) -> Iterator[tuple[Testpmd, Path]]:
    path = tmp / "pmd.sock"
    with run_testpmd(f"net_vhost0,iface={path},queues=1", mode, tmp) as pmd:
        pmd.start()
        deadline = time.monotonic() + STEP
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield pmd, path


@pytest.mark.parametrize("packed", RINGS)
@pytest.mark.parametrize("mode", ["io", "macswap"])
def test_net_driver_against_the_vhost_pmd(tmp_path: Path, mode: str, packed: bool) -> None:
    frames = [frame(60 + (i * 41) % 1455, i) for i in range(1024)]
    with (
        vhost_pmd(tmp_path, mode) as (pmd, path),
        VhostUserFrontend(path, device_id=DeviceId.NET, timeout=STEP) as frontend,
    ):
        assert not frontend.config_readable  # the vhost PMD offers no CONFIG
        driver = NetDriver(frontend, timeout=STEP, packed=packed)
        assert not driver.features & (NetFeature.MTU.mask | NetFeature.CTRL_VQ.mask)
        echoes: list[bytes] = []
        for start in range(0, len(frames), BURST):
            for data in frames[start : start + BURST]:
                driver.send(data)
            while len(echoes) < min(start + BURST, len(frames)):
                echo = driver.recv(timeout=STEP)
                assert echo is not None, f"{len(echoes)} of {len(frames)} echoes came back"
                echoes.append(echo)
        driver.close()
        stats = pmd.stop()
    if mode == "io":
        assert echoes == frames
    else:
        assert echoes == [f[6:12] + f[0:6] + f[12:] for f in frames]
    assert stats["RX-packets"] == stats["TX-packets"] == len(frames)


def test_control_queue_the_vhost_pmd_leaves_unanswered_fails_fast_and_clearly(
    tmp_path: Path,
) -> None:
    """The vhost PMD offers CTRL_VQ (for QEMU) but takes ring 2 as data."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        vhost_pmd(tmp_path / "a", "io") as (_pmd, path),
        VhostUserFrontend(path, device_id=DeviceId.NET, timeout=STEP) as frontend,
    ):
        assert frontend.device_features() & NetFeature.CTRL_VQ.mask
        driver = NetDriver(frontend, timeout=STEP)
        with pytest.raises(NetDriverError, match="ctrl=True"):
            driver.set_rx_mode(promisc=False)
        driver.close()
    with (
        vhost_pmd(tmp_path / "b", "io") as (_pmd, path),
        VhostUserFrontend(path, device_id=DeviceId.NET, timeout=STEP) as frontend,
    ):
        driver = NetDriver(frontend, timeout=1.0, ctrl=True)
        start = time.monotonic()
        with pytest.raises(NetDriverError, match="unanswered"):
            driver.set_rx_mode(promisc=False)
        assert time.monotonic() - start < 3.0
        driver.send(frame(100, 1))  # data still flows
        assert driver.recv(timeout=STEP) == frame(100, 1)
        driver.close()
