"""virtio-blk throughput: BlkDriver -> MmioTransport (in process) -> Block -> a file.

Driver and device run in one process and one thread: a notification is an
MMIO write that the in-process bus turns into ``Block.queue_notify``, which
serves every available request before returning.  The backing file is read
once before the read cases so they measure the page cache, not the disk.

Cases (one line each):

* 4 KiB random reads at queue depth 1 and 32 (requests/s);
* 1 MiB sequential reads and writes at queue depth 1 (MB/s; writes in
  writeback mode, no flush).

    python benchmarks/blk.py [--seconds 2] [--size-mib 256] [--ring split|packed|both]
                             [--profile]

``--profile`` prints the top cProfile entries of the 4 KiB cases.
``.venv-compiled/bin/python`` runs it on the mypyc build (``make compiled``);
the first line says which build ran.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyvirtio.compiled import summary
from pyvirtio.devices.block import Block
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MmioTestRig

GUEST_MEMORY = 96 << 20
BLOCK = 4096
BIG = 1 << 20


def make_driver(path: Path, packed: bool) -> tuple[Block, BlkDriver]:
    device = Block(path)
    rig = MmioTestRig(device, GuestMemory.anonymous(GUEST_MEMORY))
    return device, BlkDriver(rig.driver, packed=packed)


def random_reads(drv: BlkDriver, depth: int, seconds: float) -> float:
    """4 KiB reads at random aligned offsets, ``depth`` in flight; requests/s."""
    blocks = drv.size // BLOCK
    rng = random.Random(1)
    bufs = [drv.alloc_buffer(BLOCK) for _ in range(depth)]
    by_token: dict[int, int] = {}
    for i in range(depth):
        token = drv.submit_read(rng.randrange(blocks) * BLOCK, bufs[i].addr, BLOCK, kick=False)
        by_token[token] = i
    drv.kick()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for token, result in drv.wait(1):
            if result:
                raise OSError(-result, "read failed")
            i = by_token.pop(token)
            done += 1
            by_token[
                drv.submit_read(rng.randrange(blocks) * BLOCK, bufs[i].addr, BLOCK, kick=False)
            ] = i
        drv.kick()
        if done & 0xFF == 0 and time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    drv.wait(len(by_token))
    for buf in bufs:
        drv.free_buffer(buf)
    return done / elapsed


def sequential(drv: BlkDriver, write: bool, seconds: float) -> float:
    """1 MiB requests walking through the disk, one in flight; MB/s."""
    buf = drv.alloc_buffer(BIG)
    buf.view[:] = os.urandom(BIG) if write else bytes(BIG)
    submit = drv.submit_write if write else drv.submit_read
    offset = 0
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        token = submit(offset, buf.addr, BIG)
        [(got, result)] = drv.wait(1)
        if got != token or result:
            raise OSError(-result, "request failed")
        done += 1
        offset = (offset + BIG) % drv.size
    elapsed = time.perf_counter() - start
    drv.free_buffer(buf)
    return done * BIG / elapsed / 1e6


def profiled(label: str, func: Callable[[], float], top: int) -> float:
    profile = cProfile.Profile()
    result = profile.runcall(func)
    print(f"\n--- cProfile: {label} (top {top} by own time) ---")
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--ring", choices=("split", "packed", "both"), default="both")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    rings = ["split", "packed"] if args.ring == "both" else [args.ring]
    with tempfile.TemporaryDirectory(prefix="pyvirtio-blk-bench-") as tmp:
        path = Path(tmp) / "disk.img"
        chunk = os.urandom(BIG)
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        with open(path, "rb") as f:  # warm the page cache
            while f.read(8 * BIG):
                pass
        print(
            f"virtio-blk over MmioTransport in process, {args.size_mib} MiB page-cached file, "
            f"{args.seconds:g} s per case; pyvirtio {summary()}"
        )
        for ring in rings:
            device, drv = make_driver(path, ring == "packed")
            for depth in (1, 32):
                label = f"{ring:6s} 4 KiB random read  QD{depth:<2d}"
                if args.profile:
                    rate = profiled(
                        label, lambda v=drv, d=depth: random_reads(v, d, args.seconds), args.top
                    )
                else:
                    rate = random_reads(drv, depth, args.seconds)
                print(f"{label}: {rate:10,.0f} requests/s")
            for write in (False, True):
                what = "write" if write else "read "
                rate = sequential(drv, write, args.seconds)
                print(f"{ring:6s} 1 MiB sequential {what} QD1 : {rate:10,.0f} MB/s")
            device.close()


if __name__ == "__main__":
    main()
