"""How long a Linux guest's I/O stalls when its vhost-user-blk back end is killed and restarted.

QEMU microvm (TCG unless KVM can run Linux here) with ``vhost-user-blk`` on a
chardev with ``reconnect=1``; in the guest, one process writes 4 KiB with
O_DIRECT back to back and reports every gap between two completions longer
than 0.2 s (guest clock, 10 ms resolution); three more writers keep requests
of other sizes in flight.  ``pyvirtio serve blk --io-threads 2`` is SIGKILLed
``--kills`` times at random moments once I/O flows again, and restarted on
the same socket at once.  Printed: the guest's stall per restart (median and
max), and on the host the time from the kill to the device running again
(QEMU reconnects on a one-second timer), with inflight tracking on (the
default) or off (``--no-inflight``), plus how many restarts had requests to
resubmit.

    python benchmarks/reconnect.py [--kills 20] [--no-inflight] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import build_guest, initramfs_with_script
from pyvirtio.vmm.live_guest import LiveGuest
from pyvirtio.vmm.qemu import MicrovmConfig, kvm_runs_linux

SCRIPT = """
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
load() {
    while [ ! -f /tmp/stop ]; do
        dd if=/dev/zero of=/dev/vda bs=$1 seek=$2 count=$3 oflag=direct 2>/dev/null \
            || echo "load-error $1"
    done
}
load 65536 32 32 & load 262144 16 8 & load 1048576 8 4 &
(
    read up _ < /proc/uptime; last=${up%.*}${up#*.}
    while [ ! -f /tmp/stop ]; do
        dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null || echo "probe-error"
        read up _ < /proc/uptime; now=${up%.*}${up#*.}
        if [ $((now - last)) -gt 20 ]; then echo "gap $last $((now - last))"; fi
        last=$now
    done
) &
echo "io-started"
read -r stop
touch /tmp/stop
wait
echo "io-stopped"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--no-inflight", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--packed", action="store_true", help="the device offers packed rings")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    guest = build_guest(progress=None)
    accel = "kvm" if kvm_runs_linux(guest)[0] else "tcg"
    with tempfile.TemporaryDirectory(prefix="pyvirtio-reconnect-") as tmp_name:
        tmp = Path(tmp_name)
        disk = tmp / "disk.raw"
        disk.write_bytes(bytes(16 << 20))
        sock = tmp / "blk.sock"
        vm = MicrovmConfig(guest.kernel, initramfs_with_script(guest, SCRIPT, tmp), accel=accel)
        vm.add_vhost_user_blk(sock, reconnect=1, packed=args.packed)
        serve = ["--file", str(disk), "--io-threads", "2"]
        if args.no_inflight:
            serve.append("--no-inflight")
        back_to_running: list[float] = []
        resubmitted = 0
        on_packed = 0
        backend = ServedDevice("blk", sock, serve, log_path=tmp / "b0.log").start()
        try:
            with LiveGuest(vm) as live:
                if not live.booted(timeout=90):
                    raise SystemExit("the guest hung at boot (TCG clock calibration): run again")
                live.wait_for("io-started", 30)
                for number in range(1, args.kills + 1):
                    _wait_log(backend, "device activated", 30)
                    time.sleep(rng.uniform(0.3, 1.0))
                    assert backend.proc is not None
                    backend.proc.kill()
                    killed = time.monotonic()
                    backend.proc.wait()
                    backend.proc = None
                    backend = ServedDevice(
                        "blk", sock, serve, log_path=tmp / f"b{number}.log"
                    ).start()
                    _wait_log(backend, "device activated", 30)
                    back_to_running.append(time.monotonic() - killed)
                    resubmitted += "resubmitting" in backend.log()
                    on_packed += "activated with packed rings" in backend.log()
                _wait_log(backend, "device activated", 30)
                time.sleep(1.0)
                live.send("stop")
                output = live.wait_for("io-stopped", 120)
        finally:
            if backend.proc is not None:
                backend.stop()
    gaps = sorted(
        (int(line.split()[1]), int(line.split()[2]) * 10)
        for line in output.splitlines()
        if line.startswith("gap ")
    )
    errors = [line for line in output.splitlines() if "error" in line]
    stalls = sorted(ms for _, ms in gaps)[-args.kills :]
    mode = "off" if args.no_inflight else "on"
    print(
        f"{args.kills} SIGKILLs of serve blk --io-threads 2 under guest O_DIRECT writers, "
        f"inflight tracking {mode}, {'packed' if args.packed else 'split'} rings, accel {accel}"
    )
    print(
        f"guest stall per restart (largest {len(stalls)} gaps): median "
        f"{statistics.median(stalls):.0f} ms, max {max(stalls):.0f} ms"
        if stalls
        else "no stall seen by the guest"
    )
    print(
        f"host: kill to device running again: median "
        f"{statistics.median(back_to_running) * 1000:.0f} ms, "
        f"max {max(back_to_running) * 1000:.0f} ms"
    )
    print(f"restarts that resubmitted requests left in flight: {resubmitted} of {args.kills}")
    print(f"restarts whose device ran packed rings: {on_packed} of {args.kills}")
    print(f"guest I/O errors: {len(errors)}" + (f" ({errors[0]})" if errors else ""))


def _wait_log(backend: ServedDevice, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in backend.log():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text!r} within {timeout:.0f}s:\n{backend.log()}")
        time.sleep(0.01)


if __name__ == "__main__":
    main()
