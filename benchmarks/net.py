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
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from pyvirtio.devices.net import Net, SocketPairBackend
from pyvirtio.driver.net import NetDriver
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--ring", choices=("split", "packed", "both"), default="split")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rings = {"split": [False], "packed": [True], "both": [False, True]}[args.ring]
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
