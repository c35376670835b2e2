"""MicrovmConfig's device arguments (no QEMU run: the command line only)."""

from __future__ import annotations

from pathlib import Path

from pyvirtio.vmm.qemu import MicrovmConfig


def test_vhost_user_devices_get_their_own_chardev_and_shared_memory() -> None:
    config = MicrovmConfig(Path("vmlinuz"), Path("initrd"))
    assert not config.shared_memory
    config.add_vhost_user_blk("/run/blk.sock", num_queues=2)
    config.add_vhost_user_net("/run/net.sock", mac="52:54:00:00:00:02")
    config.add_vhost_user_rng("/run/rng.sock")
    assert config.shared_memory
    assert config._devices == [
        "-chardev", "socket,id=chr1,path=/run/blk.sock",
        "-device", "vhost-user-blk,chardev=chr1,num-queues=2",
        "-chardev", "socket,id=chr2,path=/run/net.sock",
        "-netdev", "vhost-user,id=net3,chardev=chr2",
        "-device", "virtio-net-device,netdev=net3,mac=52:54:00:00:00:02",
        "-chardev", "socket,id=chr4,path=/run/rng.sock",
        "-device", "vhost-user-rng,chardev=chr4",
    ]  # fmt: skip


def test_builtin_devices_need_no_shared_memory() -> None:
    config = MicrovmConfig(Path("vmlinuz"), Path("initrd"))
    config.add_builtin_blk("disk.img", read_only=True)
    config.add_builtin_rng()
    assert not config.shared_memory
    assert config._devices == [
        "-drive", "id=drive1,file=disk.img,format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=drive1",
        "-device", "virtio-rng-device",
    ]  # fmt: skip
