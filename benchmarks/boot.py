"""Guest boot to init: pyvirtio's vhost-user block and entropy vs QEMU's built-in devices.

Same kernel, initramfs, accelerator and machine; the guest loads the virtio
modules, waits for /dev/vda, reads a block and a few random bytes, and prints
its boot marker.  Reported per configuration: the median over ``--runs`` of
the wall-clock time from starting QEMU to the guest's marker, and of the
guest's own uptime at that point; then the ratio pyvirtio / built-in.

    python benchmarks/boot.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import build_guest, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot, kvm_runs_linux

SCRIPT = """
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.05; done
dd if=/dev/vda bs=4096 count=1 2>/dev/null | wc -c
dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c
echo "ready $(cut -d' ' -f1 /proc/uptime)"
"""


def _ready_uptime(output: str) -> float:
    for line in output.splitlines():
        if line.startswith("ready "):
            return float(line.split()[1])
    raise RuntimeError("guest did not print its ready line:\n" + output[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="boots per configuration")
    args = parser.parse_args()
    artifacts = build_guest()
    ok, reason = kvm_runs_linux(artifacts)
    accel = "kvm" if ok else "tcg"
    print(
        f"accelerator {accel} ({reason}); {args.runs} boots each; kernel {artifacts.kernel_version}"
    )
    results: dict[str, tuple[list[float], list[float]]] = {
        "builtin": ([], []),
        "pyvirtio": ([], []),
    }
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bootbench-") as tmp:
        work = Path(tmp)
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        initrd = initramfs_with_script(artifacts, SCRIPT, work)
        for run in range(args.runs):
            for name in ("builtin", "pyvirtio"):  # interleaved, so drift hits both alike
                vm = MicrovmConfig(artifacts.kernel, initrd, accel=accel)
                if name == "builtin":
                    vm.add_builtin_blk(disk)
                    vm.add_builtin_rng()
                    result = boot(vm, timeout=90)
                else:
                    with (
                        ServedDevice("blk", work / "blk.sock", ["--file", str(disk)]) as blk,
                        ServedDevice("rng", work / "rng.sock") as rng,
                    ):
                        vm.add_vhost_user_blk(blk.socket_path)
                        vm.add_vhost_user_rng(rng.socket_path)
                        result = boot(vm, timeout=90)
                if result.exit_status != 0 or result.wall_to_init is None:
                    raise RuntimeError(f"{name} boot {run} failed:\n{result.tail}")
                walls, uptimes = results[name]
                walls.append(result.wall_to_init)
                uptimes.append(_ready_uptime(result.guest_output))
    medians = {}
    for name, (walls, uptimes) in results.items():
        medians[name] = (statistics.median(walls), statistics.median(uptimes))
        print(
            f"{name:9s} wall to init: median {medians[name][0]:.2f}s "
            f"(min {min(walls):.2f}, max {max(walls):.2f}); "
            f"guest uptime at ready: median {medians[name][1]:.2f}s"
        )
    wall_ratio = medians["pyvirtio"][0] / medians["builtin"][0]
    up_ratio = medians["pyvirtio"][1] / medians["builtin"][1]
    print(f"ratio pyvirtio / built-in: wall {wall_ratio:.2f}, guest uptime {up_ratio:.2f}")


if __name__ == "__main__":
    main()
