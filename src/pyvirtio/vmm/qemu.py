"""Boot a guest under QEMU's ``microvm`` machine, with bounded waits.

:class:`MicrovmConfig` builds the command line that works with Debian's QEMU
7.2 (virtio-MMIO version 2, shareable guest RAM for vhost-user, a serial
console on stdio, a calibrated guest clock) and :func:`boot` runs it until
the guest prints its exit marker (see :mod:`pyvirtio.vmm.guest`), killing and
retrying once if the guest hangs, and raising :class:`GuestHang` with the
console tail if it hangs again.

Accelerator: KVM when the host's KVM can actually run Linux, TCG otherwise.
``/dev/kvm`` existing is not enough (a nested paravirtual KVM may run tiny
guests but fail on a Linux kernel), so :func:`kvm_runs_linux` makes a probe
boot with a short deadline and remembers the verdict until the host reboots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from pyvirtio.vmm.guest import BOOT_MARKER, EXIT_MARKER, GuestArtifacts, default_cache_dir

__all__ = [
    "BootResult",
    "GuestHang",
    "MicrovmConfig",
    "boot",
    "host_tsc_khz",
    "kvm_runs_linux",
    "qemu_binary",
]


class GuestHang(Exception):
    """The guest did not reach its exit marker in time (after the retries)."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (for the guest's ``tsc_early_khz=``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None


@dataclasses.dataclass
class MicrovmConfig:
    """A microvm guest: kernel, initramfs, memory and devices."""

    kernel: Path
    initramfs: Path
    memory_mib: int = 256
    accel: str = "tcg"
    cmdline_extra: str = ""
    #: Guest RAM in a shared memfd: required by vhost-user back ends.
    shared_memory: bool = False
    extra_args: list[str] = dataclasses.field(default_factory=list)
    _devices: list[str] = dataclasses.field(default_factory=list)
    _count: int = 0

    def _id(self, kind: str) -> str:
        self._count += 1
        return f"{kind}{self._count}"

    def add_vhost_user_blk(
        self,
        socket_path: str | Path,
        num_queues: int = 1,
        *,
        reconnect: int | None = None,
        packed: bool = False,
    ) -> None:
        """A vhost-user-blk device; ``reconnect`` (seconds) makes QEMU reconnect when
        the back end goes away, ``packed`` offers the packed ring layout."""
        self.shared_memory = True
        chardev = self._id("chr")
        again = f",reconnect={reconnect}" if reconnect is not None else ""
        layout = ",packed=on" if packed else ""
        self._devices += [
            "-chardev", f"socket,id={chardev},path={socket_path}{again}",
            "-device", f"vhost-user-blk,chardev={chardev},num-queues={num_queues}{layout}",
        ]  # fmt: skip

    def add_vhost_user_device(self, device: str, socket_path: str | Path) -> None:
        """``-device <device>,chardev=...`` over a vhost-user socket (guest RAM shared)."""
        self.shared_memory = True
        chardev = self._id("chr")
        self._devices += [
            "-chardev", f"socket,id={chardev},path={socket_path}",
            "-device", f"{device},chardev={chardev}",
        ]  # fmt: skip

    def add_vhost_user_rng(self, socket_path: str | Path) -> None:
        self.add_vhost_user_device("vhost-user-rng", socket_path)

    def add_vhost_user_net(self, socket_path: str | Path, mac: str = "52:54:00:12:34:56") -> None:
        self.shared_memory = True
        chardev, netdev = self._id("chr"), self._id("net")
        self._devices += [
            "-chardev", f"socket,id={chardev},path={socket_path}",
            "-netdev", f"vhost-user,id={netdev},chardev={chardev}",
            "-device", f"virtio-net-device,netdev={netdev},mac={mac}",
        ]  # fmt: skip

    def add_vhost_user_vsock(self, socket_path: str | Path) -> None:
        """A vsock device served over vhost-user (the guest CID comes from the back end)."""
        self.add_vhost_user_device("vhost-user-vsock-device", socket_path)

    def add_builtin_blk(self, image: str | Path, read_only: bool = False) -> None:
        drive = self._id("drive")
        ro = ",readonly=on" if read_only else ""
        self._devices += [
            "-drive", f"id={drive},file={image},format=raw,if=none{ro}",
            "-device", f"virtio-blk-device,drive={drive}",
        ]  # fmt: skip

    def add_builtin_rng(self) -> None:
        self._devices += ["-device", "virtio-rng-device"]

    def command(self) -> list[str]:
        qemu = qemu_binary()
        if qemu is None:
            raise FileNotFoundError("qemu-system-x86_64 is not installed")
        append = "console=ttyS0 panic=-1 quiet"
        khz = host_tsc_khz()
        if khz:
            append += f" tsc_early_khz={khz}"
        if self.cmdline_extra:
            append += " " + self.cmdline_extra
        cmd = [
            qemu,
            "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-accel", self.accel,
            "-cpu", "max" if self.accel == "tcg" else "host",
            "-global", "virtio-mmio.force-legacy=false",
            "-m", str(self.memory_mib),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio",
            "-no-reboot",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initramfs),
            "-append", append,
        ]  # fmt: skip
        if self.shared_memory:
            cmd += [
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
                "-machine", "memory-backend=mem",
            ]  # fmt: skip
        return cmd + self._devices + self.extra_args


@dataclasses.dataclass
class BootResult:
    output: str
    exit_status: int | None
    #: Guest uptime when init printed the boot marker (seconds), if it did.
    guest_boot_seconds: float | None
    #: Wall-clock seconds from starting QEMU to the boot marker.
    wall_to_init: float | None
    wall_total: float
    attempts: int
    #: The deadline passed with QEMU still running.
    hung: bool = False

    @property
    def tail(self) -> str:
        return "\n".join(self.output.strip().splitlines()[-15:])

    @property
    def guest_output(self) -> str:
        """What the guest printed between the boot and exit markers."""
        lines = self.output.splitlines()
        out: list[str] = []
        inside = False
        for line in lines:
            if line.startswith(BOOT_MARKER):
                inside = True
                continue
            if line.startswith(EXIT_MARKER):
                break
            if inside:
                out.append(line)
        return "\n".join(out)


def _boot_once(cmd: list[str], timeout: float, stop_at_boot: bool) -> BootResult:
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    text = ""
    wall_to_init: float | None = None
    finished = False
    try:
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    finished = True
                    break
                chunks.append(data)
                text = b"".join(chunks).decode(errors="replace")
                if wall_to_init is None and BOOT_MARKER in text:
                    wall_to_init = time.monotonic() - start
                    if stop_at_boot:
                        break
                if EXIT_MARKER in text and "\n" in text.split(EXIT_MARKER, 1)[1]:
                    # The guest powers off next; give QEMU a moment to exit.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                    finished = True
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    text = b"".join(chunks).decode(errors="replace")
    hung = not finished and not (stop_at_boot and wall_to_init is not None)
    exit_status: int | None = None
    boot_seconds: float | None = None
    for line in text.splitlines():
        if line.startswith(EXIT_MARKER):
            with contextlib.suppress(ValueError, IndexError):
                exit_status = int(line.split()[1])
        elif line.startswith(BOOT_MARKER):
            with contextlib.suppress(ValueError, IndexError):
                boot_seconds = float(line.split()[1])
    return BootResult(text, exit_status, boot_seconds, wall_to_init,
                      time.monotonic() - start, 1, hung)  # fmt: skip


def boot(
    config: MicrovmConfig, *, timeout: float = 60.0, retries: int = 1, stop_at_boot: bool = False
) -> BootResult:
    """Boot and wait for the exit marker (or only the boot marker).

    A guest that hangs (TCG clock calibration can stall a boot) is killed and
    retried ``retries`` times; if it hangs every time, :class:`GuestHang`
    carries the console output.  A QEMU that exits without the marker is
    returned as is: ``exit_status`` is then None and ``tail`` says why.
    """
    cmd = config.command()
    result = _boot_once(cmd, timeout, stop_at_boot)
    for attempt in range(2, retries + 2):
        if not result.hung:
            break
        result = _boot_once(cmd, timeout, stop_at_boot)
        result.attempts = attempt
    if result.hung:
        raise GuestHang(
            f"guest hung: no {'boot' if stop_at_boot else 'exit'} marker within {timeout:.0f}s "
            f"in {result.attempts} attempts; console tail:\n{result.tail}",
            result.output,
        )
    return result


def kvm_runs_linux(artifacts: GuestArtifacts, *, deadline: float = 20.0) -> tuple[bool, str]:
    """Whether this host's KVM boots a Linux guest; ``(verdict, reason)``.

    The verdict comes from a probe boot and is cached until the host reboots.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    cache = default_cache_dir() / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(cache.read_text())
        if doc["boot_id"] == boot_id and doc["kernel"] == artifacts.kernel_version:
            return bool(doc["ok"]), str(doc["reason"])
    config = MicrovmConfig(artifacts.kernel, artifacts.initramfs, accel="kvm")
    try:
        result = _boot_once(config.command(), deadline, stop_at_boot=True)
    except OSError as exc:
        ok, reason = False, f"cannot start QEMU with KVM: {exc}"
    else:
        if result.wall_to_init is not None:
            ok, reason = True, f"KVM booted Linux to init in {result.wall_to_init:.1f}s"
        elif result.hung:
            ok, reason = False, f"KVM did not boot a Linux guest to init within {deadline:.0f}s"
        else:
            last = result.tail.splitlines()[-1] if result.tail else "no output"
            ok, reason = False, f"QEMU with KVM could not boot a Linux guest: {last}"
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"boot_id": boot_id, "kernel": artifacts.kernel_version,
                                     "ok": ok, "reason": reason}))  # fmt: skip
    return ok, reason
