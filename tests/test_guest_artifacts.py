"""Guest artifact building blocks: the cpio writer and module ordering."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirtio.vmm.guest import GuestBuildError, cpio_archive, module_load_order


def _ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # .modinfo is a run of NUL-separated key=value strings inside the ELF file.
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=x\0")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (busybox-static) missing")
def test_cpio_archive_extracts_with_a_real_cpio(tmp_path: Path) -> None:
    archive = cpio_archive(
        [
            ("bin", 0o040755, b""),
            ("bin/hello", 0o100755, b"#!/bin/sh\necho hi\n"),
            ("bin/link", 0o120777, b"hello"),
            ("etc", 0o040755, b""),
            ("etc/odd", 0o100644, b"x" * 5),
        ]
    )
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive, cwd=out, check=True)
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/link").is_symlink()
    assert (out / "bin/link").readlink() == Path("hello")
    assert (out / "etc/odd").read_bytes() == b"xxxxx"
    # Concatenated gzip'd archives (how test scripts are appended) stay readable.
    both = gzip.compress(archive) + gzip.compress(cpio_archive([("extra", 0o100644, b"e")]))
    out2 = tmp_path / "y"
    out2.mkdir()
    listing = subprocess.run(
        ["busybox", "cpio", "-t"], input=gzip.decompress(both), capture_output=True, check=True
    )
    assert b"bin/hello" in listing.stdout


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    mods = tmp_path / "lib/modules/6.1"
    _ko(mods / "kernel/drivers/virtio/virtio_ring.ko", "")
    _ko(mods / "kernel/drivers/virtio/virtio.ko", "virtio_ring")
    _ko(mods / "kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring")
    _ko(mods / "kernel/drivers/char/hw_random/virtio-rng.ko", "virtio,virtio_ring")
    _ko(mods / "kernel/net/core/failover.ko", "")
    _ko(mods / "kernel/drivers/net/net_failover.ko", "failover")
    _ko(mods / "kernel/drivers/net/virtio_net.ko", "net_failover,virtio_ring,virtio,crc32c")
    (mods / "modules.builtin").write_text("kernel/lib/crc32c.ko\n")
    order = [p.name for p in module_load_order(mods, ["virtio_mmio", "virtio_rng", "virtio_net"])]
    assert order == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_mmio.ko",
        "virtio-rng.ko",
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
    ]
    with pytest.raises(GuestBuildError, match="not in"):
        module_load_order(mods, ["nonexistent"])


def test_module_dependency_loop_is_reported(tmp_path: Path) -> None:
    mods = tmp_path / "m"
    _ko(mods / "a.ko", "b")
    _ko(mods / "b.ko", "a")
    with pytest.raises(GuestBuildError, match="loop"):
        module_load_order(mods, ["a"])


def test_package_symlinks_resolve_inside_the_unpacked_tree(tmp_path: Path) -> None:
    """Debian's /lib64/ld-linux-x86-64.so.2 is an absolute symlink: it must be
    followed inside the unpacked package tree, never to the host's file."""
    from pyvirtio.vmm.guest import _in_tree

    root = tmp_path / "root"
    (root / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    real = root / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"
    real.write_bytes(b"loader from the package")
    (root / "lib64" / "ld-linux-x86-64.so.2").symlink_to(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )
    (root / "lib" / "x86_64-linux-gnu" / "libfoo.so.1").symlink_to("ld-linux-x86-64.so.2")
    assert _in_tree(root, root / "lib64" / "ld-linux-x86-64.so.2") == real
    assert _in_tree(root, root / "lib" / "x86_64-linux-gnu" / "libfoo.so.1").read_bytes() == (
        b"loader from the package"
    )
