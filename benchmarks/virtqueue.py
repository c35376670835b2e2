"""Virtqueue round trips per second: driver -> device -> driver, both ring formats.

One round trip is a driver ``add``, the device's ``pop`` and ``add_used``, and
the driver collecting the completion from ``used()``.  Work is batched per
notification, as real hosts do: the driver adds up to ``--batch`` chains,
the device pops them all and completes them with one ``add_used_batch``, the
driver drains the used ring.  One line per case; the target is at least
600,000 single-buffer split round trips per second on one core.

    python benchmarks/virtqueue.py [--seconds 1.0] [--runs 3] [--batch 64] [--size 256]

Any environment's interpreter runs it: ``.venv-compiled/bin/python`` measures
the mypyc build (``make compiled``); the first line says which build ran.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from pyvirtio.compiled import summary
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed, split

RING_BASE = 0x10000
DATA_BASE = 0x100000
BUF_LEN = 512

QueueFactory = Callable[[GuestMemory, int, bool], tuple[object, object]]


def make_split(mem: GuestMemory, size: int, event_idx: bool) -> tuple[object, object]:
    desc_len, avail_len, _ = split.area_sizes(size)
    desc = RING_BASE
    avail = desc + desc_len
    used = (avail + avail_len + 3) & ~3
    drv = split.SplitDriverQueue(mem, size, desc, avail, used, event_idx=event_idx)
    dev = split.SplitDeviceQueue(mem, size, desc, avail, used, event_idx=event_idx)
    return drv, dev


def make_packed(mem: GuestMemory, size: int, event_idx: bool) -> tuple[object, object]:
    desc_len, _, _ = packed.area_sizes(size)
    desc = RING_BASE
    drv_evt = desc + desc_len
    dev_evt = drv_evt + 4
    drv = packed.PackedDriverQueue(mem, size, desc, drv_evt, dev_evt, event_idx=event_idx)
    dev = packed.PackedDeviceQueue(mem, size, desc, drv_evt, dev_evt, event_idx=event_idx)
    return drv, dev


def run_case(
    factory: QueueFactory,
    buffers: int,
    size: int,
    batch: int,
    seconds: float,
    rounds: int = 0,
) -> float:
    """Round trips per second for chains of ``buffers`` buffers (first readable, rest writable).

    With ``rounds``, exactly that many notification rounds run whatever the
    time: fixed work, for instruction counts under callgrind.
    """
    mem = GuestMemory.anonymous(16 << 20)
    drv, dev = factory(mem, size, True)
    add = drv.add  # type: ignore[attr-defined]
    used = drv.used  # type: ignore[attr-defined]
    kick_needed = drv.kick_needed  # type: ignore[attr-defined]
    pop = dev.pop  # type: ignore[attr-defined]
    add_used_batch = dev.add_used_batch  # type: ignore[attr-defined]
    needs_notification = dev.needs_notification  # type: ignore[attr-defined]
    batch = min(batch, size // buffers if buffers > 1 else size)
    requests = []
    for i in range(batch):
        base = DATA_BASE + i * buffers * BUF_LEN
        readable = [(base, BUF_LEN)]
        writable = [(base + (j + 1) * BUF_LEN, BUF_LEN) for j in range(buffers - 1)]
        requests.append((readable, writable, i))
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        for readable, writable, token in requests:
            add(readable, writable, token)
        kick_needed()
        add_used_batch([(chain, chain.writable_len) for chain in iter(pop, None)])
        needs_notification()
        for _token, _written in used():
            done += 1
        if rounds:
            rounds -= 1
            if not rounds:
                break
        elif time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--batch", type=int, default=64, help="chains per notification")
    parser.add_argument("--size", type=int, default=256, help="queue size")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="fixed notification rounds per run instead of --seconds (for callgrind)",
    )
    parser.add_argument(
        "--format", choices=("split", "packed"), help="only this ring format (default both)"
    )
    args = parser.parse_args()
    print(
        f"queue size {args.size}, batch {args.batch}, EVENT_IDX on, median of {args.runs}; "
        f"pyvirtio {summary()}"
    )
    for name, factory in (("split", make_split), ("packed", make_packed)):
        if args.format not in (None, name):
            continue
        for buffers in (1, 2, 4):
            rates = [
                run_case(factory, buffers, args.size, args.batch, args.seconds, args.rounds)
                for _ in range(args.runs)
            ]
            rate = statistics.median(rates)
            per = 1e6 / rate
            print(
                f"{name:6s} {buffers} buffer(s)/chain: {rate:10,.0f} round trips/s"
                f"  ({per:.2f} us each)"
            )


if __name__ == "__main__":
    main()
