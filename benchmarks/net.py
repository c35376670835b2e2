"""virtio-net throughput: NetDriver -> Net -> socket pair -> Net -> NetDriver, in one process.

Two Net devices share an AF_UNIX SOCK_SEQPACKET pair (the wire); each sits
behind an in-process MmioTransport driven by a NetDriver.  One thread plays
everything: driver A fills its transmitq (one notification per batch),
which device A sends on at once; a step of the host loop
(:func:`~pyvirtio.vmm.host_loop.poll_devices`) lets device B read the wire
into its receive buffers; driver B takes the frames and posts the buffers
again.  So the figures are the cost of the whole path in Python: two rings,
two device models, one socket.

Cases: 64-byte and 1500-byte frames (frames/s, MB/s of frame bytes), with
mergeable receive buffers as Linux uses them.

    python benchmarks/net.py [--seconds 2] [--ring split|packed|both] [--profile]

``--profile`` prints the top cProfile entries of each case.

``--dpdk`` measures against DPDK 22.11's dpdk-testpmd instead (EAL
``--no-huge``, one forwarding lcore), median of ``--runs`` runs:

* ``txonly``: testpmd's virtio-user sends 64-byte frames as fast as it can to
  ``pyvirtio serve net``, whose wire this script reads; frames/s reaching it.
* ``vhost-pmd io``: NetDriver over VhostUserFrontend sends 64-byte frames in
  bursts of 32 to testpmd's vhost PMD, which echoes them; echoes/s.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirtio.compiled import summary
from pyvirtio.constants import DeviceId
from pyvirtio.devices.net import Net, SocketPairBackend
from pyvirtio.driver.net import NetDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MmioTestRig
from pyvirtio.vmm.host_loop import poll_devices

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")


def make_wire(packed: bool) -> tuple[Net, Net, NetDriver, NetDriver]:
    end_a, end_b = SocketPairBackend.pair()
    a = Net(end_a, mac=MAC_A)
    b = Net(end_b, mac=MAC_B)
    rig_a = MmioTestRig(a, GuestMemory.anonymous(32 << 20))
    rig_b = MmioTestRig(b, GuestMemory.anonymous(32 << 20))

    def pump(timeout: float) -> None:
        poll_devices([a, b], timeout)

    da = NetDriver(rig_a.driver, packed=packed, wait=pump)
    db = NetDriver(rig_b.driver, packed=packed, wait=pump)
    return a, b, da, db


def run_case(size: int, seconds: float, packed: bool) -> tuple[float, float]:
    """Frames of ``size`` bytes from A to B for ``seconds``; (frames/s, MB/s)."""
    a, b, da, db = make_wire(packed)
    frame = MAC_B + MAC_A + b"\x88\xb5" + bytes(size - 14)
    batch = [frame] * 64
    received = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        da.send_many(batch)
        poll_devices([a, b], 0)
        received += len(db.recv_all())
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    assert b.stats["rx_dropped_filter"] == 0 and b.stats["rx_dropped_no_room"] == 0
    assert received > 0
    return received / elapsed, received * size / elapsed / 1e6


EAL = ["-l", "0,1", "-n", "1", "--no-huge", "-m", "256", "--single-file-segments", "--no-pci"]


def testpmd(vdev: str, mode: str, tmp: Path) -> subprocess.Popen[bytes]:
    cmd = [
        *("dpdk-testpmd", *EAL, "--file-prefix", f"bench{os.getpid()}", f"--vdev={vdev}"),
        *("--", f"--forward-mode={mode}", "--nb-cores=1", "--total-num-mbufs=4096"),
        *("--port-topology=loop", "-i"),
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None
    proc.stdin.write(b"start\n")
    proc.stdin.flush()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"stop\nquit\n")
        proc.stdin.flush()
        proc.wait(15)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def dpdk_txonly(seconds: float, packed: bool) -> float:
    """testpmd txonly -> serve net -> the wire this process reads; frames/s."""
    with tempfile.TemporaryDirectory(prefix="pvnet") as tmp_name:
        tmp = Path(tmp_name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        serve = subprocess.Popen(
            [
                *(sys.executable, "-m", "pyvirtio", "serve", "net", "--socket", str(tmp / "s")),
                *("--frames-fd", str(theirs.fileno()), "--unsealed-memory", "allow"),
            ],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        deadline = time.monotonic() + 15
        while not (tmp / "s").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        pmd = testpmd(f"net_virtio_user0,path={tmp / 's'},packed_vq={int(packed)}", "txonly", tmp)
        try:
            ours.settimeout(15)
            ours.recv(2048)  # traffic flows
            count = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                ours.recv(2048)
                count += 1
            return count / (time.perf_counter() - start)
        finally:
            stop(pmd)
            serve.terminate()
            serve.wait(15)
            ours.close()


def dpdk_vhost_pmd(seconds: float, packed: bool) -> float:
    """NetDriver -> testpmd's vhost PMD (io) -> NetDriver; echoes/s."""
    with tempfile.TemporaryDirectory(prefix="pvnet") as tmp_name:
        tmp = Path(tmp_name)
        pmd = testpmd(f"net_vhost0,iface={tmp / 'p'},queues=1", "io", tmp)
        try:
            with VhostUserFrontend(tmp / "p", device_id=DeviceId.NET, timeout=15) as frontend:
                driver = NetDriver(frontend, packed=packed, timeout=15)
                frame = MAC_B + MAC_A + b"\x08\x00" + bytes(50)
                count = 0
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    driver.send_many([frame] * 32)
                    for _ in range(32):
                        if driver.recv(timeout=15) is None:
                            raise RuntimeError("testpmd did not echo a frame")
                    count += 32
                rate = count / (time.perf_counter() - start)
                driver.close()
                return rate
        finally:
            stop(pmd)


def main_dpdk(seconds: float, rings: list[bool], runs: int) -> None:
    for packed in rings:
        ring = "packed" if packed else "split"
        for name, case in (("txonly -> serve net", dpdk_txonly), ("vhost-pmd io", dpdk_vhost_pmd)):
            rates = [case(seconds, packed) for _ in range(runs)]
            spread = f"{min(rates):,.0f}..{max(rates):,.0f}"
            print(
                f"{ring:6} {name:20} {statistics.median(rates):10,.0f} frames/s "
                f"(median of {runs}, {spread})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--ring", choices=("split", "packed", "both"), default="split")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--dpdk", action="store_true", help="against dpdk-testpmd (see above)")
    parser.add_argument("--runs", type=int, default=3, help="runs per DPDK case")
    args = parser.parse_args()
    rings = {"split": [False], "packed": [True], "both": [False, True]}[args.ring]
    print(f"pyvirtio {summary()}")
    if args.dpdk:
        main_dpdk(args.seconds, rings, args.runs)
        return
    for packed in rings:
        ring = "packed" if packed else "split"
        for size in (64, 1500):
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
            fps, mbps = run_case(size, args.seconds, packed)
            print(f"{ring:6} {size:5d}-byte frames: {fps:10,.0f} frames/s {mbps:9.1f} MB/s")
            if args.profile:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
