"""The guest image and launcher against QEMU's own virtio-mmio devices.

This is the baseline every pyvirtio back end is compared with: the Debian
kernel's virtio drivers find QEMU's built-in virtio-blk and virtio-rng.
"""

from __future__ import annotations

from pathlib import Path

from pyvirtio.vmm.guest import GuestArtifacts, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot

SCRIPT = """
cat /sys/bus/virtio/devices/*/device
dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c
echo pattern-$((6*7)) | dd of=/dev/vda bs=512 conv=sync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 10; echo
"""


def test_guest_boots_and_drives_builtin_devices(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    disk = scratch / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    initrd = initramfs_with_script(guest, SCRIPT, scratch)
    vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
    vm.add_builtin_blk(disk)
    vm.add_builtin_rng()
    result = boot(vm, timeout=60)
    assert result.exit_status == 0, result.tail
    out = result.guest_output.split()
    assert "0x0002" in out  # virtio-blk
    assert "0x0004" in out  # virtio-rng
    assert "32" in out
    assert "pattern-42" in out
    assert disk.read_bytes()[:10] == b"pattern-42"
