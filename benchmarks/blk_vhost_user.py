"""virtio-blk over vhost-user: BlkDriver -> VhostUserFrontend -> a back-end process.

The driver runs in this process; each back end in its own process, on the
same page-cached image:

* ``qsd-file``: qemu-storage-daemon exporting the image with its defaults
  (file driver, no iothread: served from its main loop);
* ``qsd-uring`` / ``qsd-threads``: qemu-storage-daemon at its best: the
  export on an iothread polling as long as pyvirtio does
  (``poll-max-ns`` = ``--backend-poll-us``), ``aio=io_uring`` or
  ``aio=threads`` (both work in Debian's qsd 7.2; ``aio=native`` needs
  O_DIRECT, which a page-cached image does not use);
* ``pyvirtio``: ``pyvirtio serve blk`` on the image (VhostUserBackend + Block);
* ``qsd-null``: qemu-storage-daemon exporting a ``null-co`` node: no storage
  cost, so it shows the driver's own ceiling;
* ``pyvirtio-inflight`` (not in the default list): ``pyvirtio serve blk`` with
  the driver sharing an inflight region, so every request is recorded
  (vhost-user.rst "Inflight I/O tracking"); with ``pyvirtio`` in the list the
  paired ratio of the two gives the cost of tracking.

Cases: 4 KiB random reads at queue depth 1 and 32 (IOPS) and 1 MiB
sequential reads at queue depth 1 and 8 (MB/s), split rings.  All back ends
run at once and each run of a case visits them in turn (in a new order
each run), so a change in the machine's load hits all of them alike; the
medians of ``--runs`` runs are printed with the CPU time per request of the
driver and of the back-end process (less sensitive to load than
throughput).  pyvirtio against qemu-storage-daemon is printed as the ratio
of the medians and as the median of each run's own ratio ("paired"),
which the targets use: on a shared machine one back end's runs and the
other's are seconds apart, and the paired ratio compares only neighbours.
"tuned" is qsd at its best: in each run, the faster of qsd-uring and
qsd-threads; "default" is qsd-file.

    python benchmarks/blk_vhost_user.py [--seconds 1] [--runs 11] [--size-mib 256]
        [--backends qsd-file,qsd-uring,qsd-threads,pyvirtio,qsd-null] [--cases 4k-qd1,...]
        [--backend-poll-us 50] [--backend-io-threads 1] [--driver-poll-us 0]
        [--kick-every 8] [--profile-driver CASE] [--profile-backend] [--instructions]

``--backend-poll-us N`` serves pyvirtio with ``pyvirtio serve --poll-us N``,
``--backend-io-threads N`` (N > 0) with ``--io-threads N`` (the defaults
are what the README advises for a machine of two CPUs or more).
``--driver-poll-us N`` gives every back end's BlkDriver ``poll_us=N``: waits
spin on the used ring for up to N microseconds before sleeping on the call
eventfd (the driver's CPU time then includes the spinning).

The loop replaces each completion with a new read at once and notifies the
device every ``--kick-every`` submissions: with one notification per
wake-up the device would sit idle while the driver resubmits 32 requests,
and the driver while the device serves them.

``--profile-driver CASE`` (e.g. ``4k-qd32``) prints cProfile's top entries of
the driver side for that case against each back end; ``--profile-backend``
runs ``pyvirtio serve`` under cProfile and prints its top entries at the end.

The pyvirtio back end runs under this script's interpreter: run it with
``.venv-compiled/bin/python`` to measure the mypyc build (``make compiled``)
on both sides; the first line says which build ran.

``--instructions`` times nothing: it counts the instructions the ``pyvirtio
serve blk`` process executes per request, under ``valgrind
--tool=callgrind`` with PYTHONHASHSEED=0 and ``--poll-us 0`` (no spinning
counted), a figure the machine's load does not change.  For each case the
back end serves N and then 5N reads, in rounds of one queue depth
(submit, one kick, wait for all), each in a process of its own; the
difference of the two totals over 4N leaves out start-up and shutdown.

Targets: the driver at least 150k IOPS at QD32 against qsd-null; the
pyvirtio back end at least 0.75x tuned qsd's 4 KiB IOPS at QD1 and QD32 and
at least as many MB/s for 1 MiB reads at QD8 (paired ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from pyvirtio.compiled import summary
from pyvirtio.constants import DeviceId
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend

BLOCK = 4096
BIG = 1 << 20
MEMORY = 64 << 20
START_TIMEOUT = 10.0
#: Start and stop of a back end under callgrind, tens of times slower.
CALLGRIND_TIMEOUT = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: qemu-storage-daemon at its best: back-end name -> aio mode.
TUNED_QSD = {"qsd-uring": "io_uring", "qsd-threads": "threads"}

CASES: dict[str, tuple[int, int]] = {  # name -> (request size, queue depth)
    "4k-qd1": (BLOCK, 1),
    "4k-qd32": (BLOCK, 32),
    "1m-qd1": (BIG, 1),
    "1m-qd8": (BIG, 8),
}


def backend_command(
    kind: str,
    image: Path,
    size: int,
    sock: Path,
    profile: Path | None,
    poll_us: float,
    io_threads: int = 0,
    callgrind: Path | None = None,
) -> list[str]:
    if kind in ("pyvirtio", "pyvirtio-inflight"):
        python = [sys.executable]
        if callgrind is not None:
            python = ["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={callgrind}"]
            python += [sys.executable]
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile)]
        command = [
            *python,
            "-m",
            "pyvirtio",
            "serve",
            "blk",
            "--socket",
            str(sock),
            "--file",
            str(image),
            "--poll-us",
            str(poll_us),
        ]
        if io_threads > 0:
            command += ["--io-threads", str(io_threads)]
        return command
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon is not installed")
    export = f"type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path={sock},writable=on"
    if kind in TUNED_QSD:
        # An iothread polling as long as pyvirtio's back end does, the export on it.
        poll_ns = int(poll_us * 1000)
        return [
            qsd,
            "--object",
            f"iothread,id=io0,poll-max-ns={poll_ns}",
            "--blockdev",
            f"driver=file,node-name=disk,filename={image},aio={TUNED_QSD[kind]}",
            "--export",
            f"{export},iothread=io0",
        ]
    if kind == "qsd-file":
        node = f"driver=file,node-name=disk,filename={image}"
    elif kind == "qsd-null":
        node = f"driver=null-co,node-name=disk,size={size}"
    else:
        raise SystemExit(f"unknown back end {kind}")
    return [qsd, "--blockdev", node, "--export", export]


class Backend:
    """A back-end process serving the image on a socket of its own."""

    def __init__(
        self,
        kind: str,
        image: Path,
        size: int,
        tmp: Path,
        profile: Path | None,
        poll_us: float,
        io_threads: int = 0,
        callgrind: Path | None = None,
    ) -> None:
        self.kind = kind
        self.sock = tmp / f"{kind}.sock"
        self.timeout = START_TIMEOUT if callgrind is None else CALLGRIND_TIMEOUT
        env = None if callgrind is None else {**os.environ, "PYTHONHASHSEED": "0"}
        self.process = subprocess.Popen(
            backend_command(kind, image, size, self.sock, profile, poll_us, io_threads, callgrind),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + self.timeout
        while not self.sock.exists():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise SystemExit(f"{kind} exited: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{kind} did not create {self.sock} in {self.timeout} s")
            time.sleep(0.01)

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time of the whole process (all its threads) so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def stop(self) -> None:
        """SIGTERM (pyvirtio serve then writes its profile), SIGKILL if it lingers."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def run_case(
    drv: BlkDriver, size: int, depth: int, seconds: float, sequential: bool, kick_every: int
) -> float:
    """Reads of ``size`` bytes, ``depth`` in flight, for ``seconds``; returns requests/s.

    Each completion is replaced by a new read at once; the device is
    notified after every ``kick_every`` submissions and after the last of
    each wake-up's, so it starts on them while the loop submits the rest
    (as fio's iodepth_batch_submit does).
    """
    blocks = drv.size // size
    bufs = [drv.alloc_buffer(size) for _ in range(depth)]
    # Offsets drawn beforehand (as fio does in C), so the loop measures the
    # driver rather than the random module.
    if sequential:
        offsets = [i * size for i in range(blocks)]
    else:
        rng = random.Random(1)
        offsets = [rng.randrange(blocks) * size for _ in range(1 << 16)]
    position = 0

    def next_offset() -> int:
        nonlocal position
        position += 1
        if position == len(offsets):
            position = 0
        return offsets[position]

    by_token: dict[int, int] = {}
    for i in range(depth):
        by_token[drv.submit_read(next_offset(), bufs[i].addr, size, kick=False)] = i
    drv.kick()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    submit = drv.submit_read
    wait = drv.wait
    kick = drv.kick
    while True:
        for token, result in wait(1):
            if result:
                raise OSError(-result, "read failed")
            i = by_token.pop(token)
            done += 1
            by_token[submit(next_offset(), bufs[i].addr, size, kick=False)] = i
            if not done % kick_every:
                kick()
        kick()
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    while by_token:
        for token, _ in wait(1):
            by_token.pop(token)
    for buf in bufs:
        drv.free_buffer(buf)
    return done / elapsed


def run_rounds(drv: BlkDriver, size: int, depth: int, requests: int) -> None:
    """``requests`` random reads of ``size`` bytes in rounds of ``depth``: submit, kick, wait."""
    blocks = drv.size // size
    bufs = [drv.alloc_buffer(size) for _ in range(depth)]
    rng = random.Random(1)
    for _ in range(requests // depth):
        for buf in bufs:
            drv.submit_read(rng.randrange(blocks) * size, buf.addr, size, kick=False)
        drv.kick()
        done = 0
        while done < depth:
            for _token, result in drv.wait(1):
                if result:
                    raise OSError(-result, "read failed")
                done += 1
    for buf in bufs:
        drv.free_buffer(buf)


def callgrind_total(path: Path) -> int:
    """The instructions a callgrind output file counts in all."""
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"{path}: no totals line")


def count_instructions(
    image: Path, size: int, tmp: Path, cases: list[str], io_threads: int
) -> None:
    """Print the pyvirtio back end's instructions per request for each case (--instructions)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    print(f"pyvirtio serve blk under callgrind, polling 0 us, {io_threads} I/O threads")
    for case in cases:
        req_size, depth = CASES[case]
        few = depth * max(10, 400 // depth)
        totals = []
        for requests in (few, 5 * few):
            out = tmp / f"callgrind-{case}-{requests}.out"
            backend = Backend("pyvirtio", image, size, tmp, None, 0.0, io_threads, out)
            try:
                with VhostUserFrontend(
                    backend.sock, device_id=DeviceId.BLOCK, memory_size=MEMORY
                ) as frontend:
                    drv = BlkDriver(frontend, packed=False, timeout=CALLGRIND_TIMEOUT)
                    run_rounds(drv, req_size, depth, requests)
            finally:
                backend.stop()
            totals.append(callgrind_total(out))
        per_request = (totals[1] - totals[0]) / (4 * few)
        print(
            f"{case:8s} {per_request:10,.0f} instructions per request "
            f"({few} and {5 * few} requests: {totals[0]:,} and {totals[1]:,})"
        )


class Result(NamedTuple):
    rate: float  # requests/s
    driver_us: float  # CPU microseconds per request, driver process
    backend_us: float  # CPU microseconds per request, back-end process
    backend_sys_us: float  # the part of backend_us spent in the kernel


def measure_once(
    drv: BlkDriver, backend: Backend, case: str, seconds: float, kick_every: int
) -> Result:
    size, depth = CASES[case]
    cpu0, (user0, kernel0) = time.process_time(), backend.cpu_seconds()
    wall0 = time.perf_counter()
    rate = run_case(drv, size, depth, seconds, size == BIG, kick_every)
    requests = rate * (time.perf_counter() - wall0)
    cpu, (user, kernel) = time.process_time() - cpu0, backend.cpu_seconds()
    per_request = 1e6 / requests
    return Result(
        rate,
        cpu * per_request,
        (user - user0 + kernel - kernel0) * per_request,
        (kernel - kernel0) * per_request,
    )


def median(results: list[Result]) -> Result:
    return Result(*(statistics.median(column) for column in zip(*results, strict=True)))


def fmt(name: str, rate: float) -> str:
    size, _ = CASES[name]
    if size == BIG:
        return f"{rate * size / 1e6:9,.0f} MB/s"
    return f"{rate:9,.0f} IOPS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--backends", default="qsd-file,qsd-uring,qsd-threads,pyvirtio,qsd-null")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--profile-driver", choices=list(CASES), default=None)
    parser.add_argument("--profile-backend", action="store_true")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the pyvirtio back end's instructions per request under callgrind",
    )
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--backend-poll-us",
        type=float,
        default=50.0,
        help="busy-poll after serving, in the pyvirtio back end (serve --poll-us)",
    )
    parser.add_argument(
        "--backend-io-threads",
        type=int,
        default=1,
        help="I/O threads of the pyvirtio back end (serve --io-threads; 0: none)",
    )
    parser.add_argument(
        "--driver-poll-us",
        type=float,
        default=0.0,
        help="BlkDriver poll_us: spin on the used ring before sleeping, for every back end",
    )
    parser.add_argument(
        "--kick-every",
        type=int,
        default=8,
        help="notify the device after this many submissions (and after each wake-up's last)",
    )
    args = parser.parse_args()
    if args.kick_every < 1:
        parser.error("--kick-every must be at least 1")
    kinds = args.backends.split(",")
    cases = args.cases.split(",")

    with tempfile.TemporaryDirectory(prefix="pyvirtio-vu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "disk.img"
        size = args.size_mib * BIG
        chunk = os.urandom(BIG)
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        with open(image, "rb") as f:  # into the page cache
            while f.read(8 * BIG):
                pass
        if args.instructions:
            count_instructions(image, size, tmp, cases, args.backend_io_threads)
            return
        profile_path = tmp / "backend.prof" if args.profile_backend else None
        threads = f", {args.backend_io_threads} I/O threads" if args.backend_io_threads > 0 else ""
        print(
            f"BlkDriver over vhost-user, {args.size_mib} MiB page-cached image, split ring, "
            f"pyvirtio back end polling {args.backend_poll_us:g} us{threads}, tuned qsd: "
            f"iothread poll-max-ns={int(args.backend_poll_us * 1000)}, "
            f"driver polling {args.driver_poll_us:g} us, kick every {args.kick_every}; "
            f"{args.seconds:g} s x {args.runs} runs per case, back ends interleaved, medians; "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
            f"pyvirtio (driver and back end: {sys.executable}) {summary()}"
        )
        backends: dict[str, Backend] = {}
        table: dict[str, dict[str, Result]] = {kind: {} for kind in kinds}
        # peer -> case -> median of the runs' pyvirtio/peer ratios, and their spread
        paired: dict[str, dict[str, Spread]] = {"default": {}, "tuned": {}}
        # case -> pyvirtio-inflight / pyvirtio over the paired runs
        tracked: dict[str, Spread] = {}
        order = random.Random(2)
        with contextlib.ExitStack() as stack:
            drivers: dict[str, BlkDriver] = {}
            for kind in kinds:
                be = Backend(
                    kind,
                    image,
                    size,
                    tmp,
                    profile_path if kind == "pyvirtio" else None,
                    args.backend_poll_us,
                    args.backend_io_threads,
                )
                stack.callback(be.stop)
                backends[kind] = be
                frontend = stack.enter_context(
                    VhostUserFrontend(be.sock, device_id=DeviceId.BLOCK, memory_size=MEMORY)
                )
                if kind == "pyvirtio-inflight":
                    # The same back end, recording every request in an inflight region.
                    frontend.share_inflight_region(frontend.max_queue_size)
                # Split rings everywhere: qemu-storage-daemon offers no packed ring.
                drivers[kind] = BlkDriver(
                    frontend, packed=False, timeout=10.0, poll_us=args.driver_poll_us
                )
            for case in cases:
                runs: dict[str, list[Result]] = {kind: [] for kind in kinds}
                for kind in kinds:  # warm-up: buffers, the image, caches
                    measure_once(
                        drivers[kind], backends[kind], case, min(args.seconds, 0.3), args.kick_every
                    )
                for _ in range(args.runs):
                    # Interleaved, so load changes hit all alike, and in a
                    # new order each run: whichever runs right after
                    # another back end measurably gains or loses.
                    for kind in order.sample(kinds, len(kinds)):
                        runs[kind].append(
                            measure_once(
                                drivers[kind], backends[kind], case, args.seconds, args.kick_every
                            )
                        )
                for kind in kinds:
                    table[kind][case] = median(runs[kind])
                if "pyvirtio" in runs:
                    py_rates = [r.rate for r in runs["pyvirtio"]]
                    if "qsd-file" in runs:
                        default_rates = [r.rate for r in runs["qsd-file"]]
                        paired["default"][case] = spread(py_rates, default_rates)
                    tuned = [k for k in TUNED_QSD if k in runs]
                    if tuned:
                        best = [max(rs) for rs in zip(*(runs[k] for k in tuned), strict=True)]
                        tuned_rates = [r.rate for r in best]
                        paired["tuned"][case] = spread(py_rates, tuned_rates)
                if "pyvirtio" in runs and "pyvirtio-inflight" in runs:
                    tracked[case] = spread(
                        [r.rate for r in runs["pyvirtio-inflight"]],
                        [r.rate for r in runs["pyvirtio"]],
                    )
                if case == args.profile_driver:
                    for kind in kinds:
                        profile = cProfile.Profile()
                        profile.runcall(
                            measure_once,
                            drivers[kind],
                            backends[kind],
                            case,
                            args.seconds,
                            args.kick_every,
                        )
                        print(f"\n--- driver cProfile, {case} against {kind} ---")
                        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)

        print(f"{'':10s}" + "".join(f"{c:>34s}" for c in cases))
        for kind in kinds:
            cells = "".join(
                f"{fmt(c, table[kind][c].rate):>16s} ({table[kind][c].driver_us:5.1f}"
                f"/{table[kind][c].backend_us:6.1f} us)"
                for c in cases
            )
            print(f"{kind:10s}{cells}")
        print("(CPU microseconds per request: driver / back end)")
        cells = "".join(
            f"{kind}: " + ", ".join(f"{table[kind][c].backend_sys_us:.1f}" for c in cases) + "; "
            for kind in kinds
        )
        print(f"(of the back end's, in the kernel, by case: {cells[:-2]})")
        if "pyvirtio" in table and "qsd-file" in table:
            ratios = "".join(
                f"{table['pyvirtio'][c].rate / table['qsd-file'][c].rate:34.2f}" for c in cases
            )
            print(f"{'py/qsd-file':12s}{ratios[2:]}   (ratio of the medians)")
        for peer, by_case in paired.items():
            if by_case:
                cells = "".join(f"{by_case[c]!s:>34s}" for c in cases)
                print(f"{'py/' + peer:12s}{cells[2:]}   (paired: median [min-max] of run ratios)")
        if tracked:
            cells = "".join(f"{tracked[c]!s:>34s}" for c in cases)
            print(f"{'inflight':12s}{cells[2:]}   (pyvirtio-inflight / pyvirtio, paired runs)")
        print_targets({k: {c: r.rate for c, r in v.items()} for k, v in table.items()}, paired)
        if profile_path is not None and profile_path.exists():
            print(f"\n--- pyvirtio serve cProfile (top {args.top} by own time) ---")
            pstats.Stats(str(profile_path)).sort_stats("tottime").print_stats(args.top)


class Spread(NamedTuple):
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.low:.2f}-{self.high:.2f}]"


def spread(ours: list[float], theirs: list[float]) -> Spread:
    """Median, min and max of the run-by-run ratios ours / theirs."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return Spread(statistics.median(ratios), min(ratios), max(ratios))


def print_targets(table: dict[str, dict[str, float]], paired: dict[str, dict[str, Spread]]) -> None:
    def rate(kind: str, case: str) -> float | None:
        return table.get(kind, {}).get(case)

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "MISSED"

    def at_least(a: float | None, b: float | None, factor: float = 1.0) -> bool | None:
        return None if a is None or b is None else a >= factor * b

    null32 = rate("qsd-null", "4k-qd32")
    print(f"target driver >= 150k IOPS at QD32 (qsd-null): {verdict(at_least(null32, 150_000))}")
    for case, factor in (("4k-qd1", 0.75), ("4k-qd32", 0.75), ("1m-qd8", 1.0)):
        ratio = paired["tuned"].get(case)
        ok = None if ratio is None else ratio.median >= factor
        print(f"target pyvirtio >= {factor:g} x tuned qsd (paired), {case}: {verdict(ok)}")


if __name__ == "__main__":
    main()
