"""Real Linux guests on pyvirtio devices: QEMU's vhost-user front end, Linux's drivers.

Each test starts ``pyvirtio serve`` back ends as a user would, boots the
Debian cloud kernel under QEMU microvm (KVM where it can run Linux, TCG
otherwise) with the devices attached over vhost-user, lets a script in the
guest exercise them through the kernel's virtio drivers, and checks the
results from both sides.  Every boot has a deadline and one retry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import GuestArtifacts, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot

DISK_MIB = 16

BLOCK_SCRIPT = """
set -e
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "vda-size $(cat /sys/block/vda/size)"
echo "vda-serial $(cat /sys/block/vda/serial 2>/dev/null)"
echo "devices $(cat /sys/bus/virtio/devices/*/device | tr '\\n' ' ')"
# A raw pattern at 12 MiB, written with O_DIRECT and read back from the device.
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=3072 oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=3072 count=64 iflag=direct 2>/dev/null
echo "pattern-guest $(sha256sum /tmp/pattern | cut -d' ' -f1)"
cmp /tmp/pattern /tmp/back && echo "pattern-readback ok"
# 4 MiB at 8 MiB through the page cache: large requests, several in flight.
dd if=/dev/urandom of=/tmp/big bs=1M count=4 2>/dev/null
dd if=/tmp/big of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "big-guest $(sha256sum /tmp/big | cut -d' ' -f1)"
echo "big-back $(dd if=/dev/vda bs=1M skip=8 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
# An ext2 file system over the first 8 MiB: mkfs, mount, write, sync, unmount.
mke2fs -q -b 1024 /dev/vda 8192
mount -t ext2 /dev/vda /mnt
echo hello-from-ext2 > /mnt/greeting
sync
umount /mnt
mount -t ext2 -o ro /dev/vda /mnt
echo "fs-read $(cat /mnt/greeting)"
umount /mnt
blockdev --flushbufs /dev/vda
sync
"""

RO_SCRIPT = """
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "ro-flag $(cat /sys/block/vda/ro)"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo "ro-write accepted"
else
    echo "ro-write refused"
fi
dd if=/dev/vda bs=16 count=1 2>/dev/null | head -c 16; echo
"""

RNG_SCRIPT = """
echo "rng-current $(cat /sys/class/misc/hw_random/rng_current)"
echo "rng-bytes $(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)"
"""


def _lines(output: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] if " " in line else "" for line in output.splitlines()
            if line.startswith(key + " ") or line == key]  # fmt: skip


def test_linux_guest_uses_pyvirtio_block_and_entropy(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    disk = scratch / "disk.raw"
    disk.write_bytes(bytes(DISK_MIB << 20))
    initrd = initramfs_with_script(guest, BLOCK_SCRIPT + RNG_SCRIPT, scratch)
    blk = ServedDevice(
        "blk",
        scratch / "blk.sock",
        # Worker threads: Linux's concurrent requests meet the multi-consumer path.
        ["--file", str(disk), "--serial", "pyv-e2e", "--io-threads", "2"],
    )
    rng = ServedDevice("rng", scratch / "rng.sock")
    with blk, rng:
        vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
        vm.add_vhost_user_blk(blk.socket_path)
        vm.add_vhost_user_rng(rng.socket_path)
        result = boot(vm, timeout=90)
    assert blk.returncode == 0, blk.log()
    assert rng.returncode == 0, rng.log()
    out = result.guest_output
    assert result.exit_status == 0, result.tail + "\n" + blk.log()[-3000:]
    assert _lines(out, "vda-size") == [str(DISK_MIB * 2048)]
    assert _lines(out, "vda-serial") == ["pyv-e2e"]
    devices = _lines(out, "devices")[0].split()
    assert "0x0002" in devices and "0x0004" in devices
    assert "pattern-readback ok" in out
    # The pattern the guest wrote is in the image file on the host.
    guest_sum = _lines(out, "pattern-guest")[0]
    data = disk.read_bytes()
    assert hashlib.sha256(data[12 << 20 : (12 << 20) + 64 * 4096]).hexdigest() == guest_sum
    big_sum = _lines(out, "big-guest")[0]
    assert _lines(out, "big-back") == [big_sum]
    assert hashlib.sha256(data[8 << 20 : 12 << 20]).hexdigest() == big_sum
    # The file system survived unmount and remount, and its data is in the image.
    assert _lines(out, "fs-read") == ["hello-from-ext2"]
    assert data[1024 + 56 : 1024 + 58] == b"\x53\xef"  # ext2 superblock magic
    assert b"hello-from-ext2" in data[: 8 << 20]
    # Entropy came from the pyvirtio device through Linux's virtio-rng driver.
    assert _lines(out, "rng-current")[0].startswith("virtio_rng")
    assert _lines(out, "rng-bytes") == ["256"]


def test_read_only_disk_refuses_guest_writes(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    disk = scratch / "ro.raw"
    disk.write_bytes(b"read-only-marker" + bytes((4 << 20) - 16))
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    initrd = initramfs_with_script(guest, RO_SCRIPT, scratch)
    with ServedDevice("blk", scratch / "ro.sock", ["--file", str(disk), "--read-only"]) as blk:
        vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
        vm.add_vhost_user_blk(blk.socket_path)
        result = boot(vm, timeout=90)
    out = result.guest_output
    assert result.exit_status == 0, result.tail
    assert _lines(out, "ro-flag") == ["1"]
    assert "ro-write refused" in out
    assert "read-only-marker" in out
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
