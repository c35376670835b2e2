"""The pyvirtio demo: a Linux guest on pyvirtio devices, after a ring self-check.

1. Ring self-check: a driver queue and a device queue share one guest
   memory, as a guest driver and a device model would.  The driver posts
   requests (a readable payload and a writable reply buffer), the device
   reverses each payload into the reply, the driver checks every reply.
   One line per ring format and feature set: requests, notifications the
   suppression rules left, rate.
2. A real guest: ``pyvirtio serve blk`` and ``pyvirtio serve rng`` back ends,
   QEMU's microvm with vhost-user front ends for both, and the Debian cloud
   kernel's own virtio drivers.  The guest reports the devices it found and
   the I/O it did; the demo checks the disk image from the host afterwards.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

from pyvirtio.driver.memory import GuestAllocator, allocate_driver_queue
from pyvirtio.memory import GuestMemory
from pyvirtio.virtqueue import packed, split
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue, DriverQueue

__all__ = ["RingReport", "exercise_ring", "run"]

RING_BASE = 0x1_0000
DATA_BASE = 0x10_0000
SLOT = 4096
MAX_INDIRECT = 8


@dataclass
class RingReport:
    ring: str
    event_idx: bool
    indirect: bool
    requests: int
    kicks: int
    interrupts: int
    seconds: float


def _make_queues(
    mem: GuestMemory, ring: str, size: int, event_idx: bool, indirect: bool
) -> tuple[DriverQueue, DeviceQueue]:
    """Both sides of one ring, placed below DATA_BASE as a guest driver would place them."""
    packed_ring = ring == "packed"
    allocator = GuestAllocator(mem, RING_BASE, DATA_BASE - RING_BASE)
    driver, allocations = allocate_driver_queue(
        mem,
        allocator,
        size,
        packed_ring=packed_ring,
        event_idx=event_idx,
        indirect=indirect,
        max_indirect=MAX_INDIRECT,
    )
    device_queue = packed.PackedDeviceQueue if packed_ring else split.SplitDeviceQueue
    ring_areas = allocations[:3]  # descriptor, driver and device areas
    device = device_queue(mem, size, *ring_areas, event_idx=event_idx, indirect=indirect)
    return driver, device


def _serve(chain: DescriptorChain) -> int:
    """The demo device: write the readable payload back reversed."""
    return chain.write(chain.read_all()[::-1])


def exercise_ring(
    ring: str, *, event_idx: bool, indirect: bool, requests: int, size: int = 64, seed: int = 1
) -> RingReport:
    """Push ``requests`` requests through one ring and verify every reply."""
    rng = random.Random(seed)
    mem = GuestMemory.anonymous(DATA_BASE + size * SLOT)
    driver, device = _make_queues(mem, ring, size, event_idx, indirect)
    device.enable_notifications()
    free_slots = list(range(size))
    expected: dict[int, bytes] = {}
    kicks = interrupts = sent = completed = 0
    start = time.perf_counter()
    while completed < requests:
        # Driver: post a random-sized batch, split over 1-3 payload buffers.
        for _ in range(rng.randint(1, 16)):
            if sent >= requests or not free_slots or driver.num_free < 4:
                break
            slot = free_slots.pop()
            base = DATA_BASE + slot * SLOT
            payload = rng.randbytes(rng.randint(1, 1024))
            mem.write(base, payload)
            cut = sorted(rng.sample(range(1, len(payload) + 1), k=min(2, len(payload))))
            pieces = [0, *cut[:-1], len(payload)] if len(payload) > 1 else [0, 1]
            readable = [(base + a, b - a) for a, b in itertools.pairwise(pieces) if b > a]
            writable = [(base + 2048, len(payload))]
            driver.add(readable, writable, slot)
            expected[slot] = payload[::-1]
            sent += 1
        if driver.kick_needed():
            kicks += 1
        # Device: complete what is available, in a shuffled order.
        chains = []
        while (chain := device.pop()) is not None:
            chains.append(chain)
        rng.shuffle(chains)
        if chains:
            device.add_used_batch([(c, _serve(c)) for c in chains])
            if device.needs_notification():
                interrupts += 1
        # Driver: collect and check.
        for token, written in driver.used():
            assert isinstance(token, int)
            slot = token
            reply = mem.read(DATA_BASE + slot * SLOT + 2048, written)
            if reply != expected.pop(slot):
                raise AssertionError(f"{ring}: reply for slot {slot} is wrong")
            free_slots.append(slot)
            completed += 1
    return RingReport(
        ring, event_idx, indirect, requests, kicks, interrupts, time.perf_counter() - start
    )


def run_rings(requests: int) -> None:
    print("== ring self-check: driver and device virtqueues on one guest memory")
    print(
        f"{'ring':7s} {'EVENT_IDX':9s} {'INDIRECT':8s} {'requests':>8s} "
        f"{'kicks':>6s} {'irqs':>6s} {'req/s':>9s}"
    )
    for ring in ("split", "packed"):
        for event_idx in (False, True):
            for indirect in (False, True):
                rep = exercise_ring(ring, event_idx=event_idx, indirect=indirect, requests=requests)
                print(
                    f"{rep.ring:7s} {rep.event_idx!s:9s} {rep.indirect!s:8s} "
                    f"{rep.requests:8d} {rep.kicks:6d} {rep.interrupts:6d} "
                    f"{rep.requests / rep.seconds:9,.0f}"
                )
    print("every reply checked byte for byte: OK")


GUEST_REPORT = r"""
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "== guest: $(uname -sr), booted in $(cut -d' ' -f1 /proc/uptime)s"
echo "virtio devices found:"
for d in /sys/bus/virtio/devices/*; do
    id=$(cat $d/device); drv=$(basename $(readlink $d/driver) 2>/dev/null)
    bits=$(awk '{for(i=1;i<=length($0);i++) if(substr($0,i,1)=="1") printf "%d ", i-1}' $d/features)
    echo "  $(basename $d): device id $id, driver $drv, feature bits: $bits"
done
mib=$(($(cat /sys/block/vda/size) / 2048))
echo "disk /dev/vda: $mib MiB, serial '$(cat /sys/block/vda/serial)'"
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M seek=16 oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=1M skip=16 count=8 iflag=direct 2>/dev/null
if cmp -s /tmp/data /tmp/back; then echo "wrote and read back 8 MiB at offset 16 MiB: identical"
else echo "8 MiB read back DIFFERS"; fi
echo "sha256 of those 8 MiB: $(sha256sum /tmp/data | cut -d' ' -f1)"
mke2fs -q -b 1024 /dev/vda 8192 >/dev/null 2>&1 && mount -t ext2 /dev/vda /mnt
echo "written by the guest through pyvirtio" > /mnt/hello.txt
sync; umount /mnt
echo "ext2 on /dev/vda: created, file written, synced, unmounted"
rng=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')
echo "hwrng: $(cat /sys/class/misc/hw_random/rng_current), 16 bytes: $rng"
"""


def run_guest() -> int:
    """Boot the guest on pyvirtio back ends and print its report; 0 on success."""
    import hashlib
    import tempfile
    from pathlib import Path

    from pyvirtio.vmm.backends import ServedDevice
    from pyvirtio.vmm.guest import build_guest, initramfs_with_script
    from pyvirtio.vmm.qemu import GuestHang, MicrovmConfig, boot, kvm_runs_linux, qemu_binary

    print("== real guest: Linux drivers on pyvirtio devices over vhost-user")
    if qemu_binary() is None:
        print("qemu-system-x86_64 is not installed (make demo installs it)")
        return 1
    artifacts = build_guest()
    ok, reason = kvm_runs_linux(artifacts)
    accel = "kvm" if ok else "tcg"
    print(f"accelerator: {accel} ({reason})")
    with tempfile.TemporaryDirectory(prefix="pyvirtio-demo-") as tmp:
        work = Path(tmp)
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        initrd = initramfs_with_script(artifacts, GUEST_REPORT, work)
        blk = ServedDevice(
            "blk", work / "blk.sock", ["--file", str(disk), "--serial", "pyvirtio-demo"]
        )
        rng = ServedDevice("rng", work / "rng.sock")
        start = time.monotonic()
        with blk, rng:
            print(f"started: {' '.join(blk.command[2:])}")
            print(f"started: {' '.join(rng.command[2:])}")
            vm = MicrovmConfig(artifacts.kernel, initrd, accel=accel)
            vm.add_vhost_user_blk(blk.socket_path)
            vm.add_vhost_user_rng(rng.socket_path)
            try:
                result = boot(vm, timeout=90)
            except GuestHang as exc:
                print(f"the guest hung: {exc}")
                return 1
        print(result.guest_output)
        print(
            f"== host: guest ran {time.monotonic() - start:.1f}s wall "
            f"(to init {result.wall_to_init or 0:.1f}s), exit status {result.exit_status}, "
            f"back ends stopped with {blk.returncode} and {rng.returncode}"
        )
        data = disk.read_bytes()
        digest = hashlib.sha256(data[16 << 20 : 24 << 20]).hexdigest()
        in_guest = digest in result.guest_output
        print(
            f"host reads the guest's 8 MiB from the image: sha256 {digest[:16]}... "
            f"{'matches' if in_guest else 'DOES NOT match'} the guest's"
        )
        has_file = b"written by the guest through pyvirtio" in data[: 8 << 20]
        print(f"host finds the guest's ext2 file in the image: {'yes' if has_file else 'NO'}")
        good = result.exit_status == 0 and in_guest and has_file
        good = good and blk.returncode == 0 and rng.returncode == 0
        print("demo: OK" if good else "demo: FAILED")
        return 0 if good else 1


def run(requests: int = 2000, guest: bool = True) -> int:
    run_rings(requests)
    return run_guest() if guest else 0
