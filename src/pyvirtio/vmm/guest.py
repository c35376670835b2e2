"""Guest artifacts: a Debian cloud kernel and a busybox initramfs that runs a script.

``build_guest()`` fetches Debian's ``linux-image-cloud-amd64`` kernel and
``busybox-static`` with ``apt-get download`` and unpacks them with
``dpkg -x`` (nothing is installed on the host), then builds a gzip'd cpio
initramfs holding busybox, the virtio modules with everything they depend on,
any extra Debian packages asked for (``packages``: their executables and
the shared libraries those load, found with the packages' own dynamic
loader), and an ``/init`` that loads the modules in dependency order, runs
``/test.sh`` if present and powers the machine off.  Results are cached per
kernel version under the cache directory.

A test script is added without rebuilding anything: Linux accepts several
concatenated cpio archives as one initramfs, so :func:`initramfs_with_script`
appends a small second archive holding ``/test.sh``.

The guest prints markers on its console that hosts parse:
``PYVIRTIO-BOOTED <uptime>`` once modules are loaded, and
``PYVIRTIO-EXIT <status>`` after the script.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "BOOT_MARKER",
    "EXIT_MARKER",
    "GUEST_MODULES",
    "GuestArtifacts",
    "GuestBuildError",
    "build_guest",
    "cpio_archive",
    "default_cache_dir",
    "initramfs_with_script",
    "module_load_order",
    "package_files",
]

BOOT_MARKER = "PYVIRTIO-BOOTED"
EXIT_MARKER = "PYVIRTIO-EXIT"

#: The modules the guest loads, in the order asked; dependencies come first
#: automatically (virtio_ring, virtio, virtio_mmio, failover, vsock...).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_rng",
    "virtio_console",
    "virtio_balloon",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "tun",
)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || echo "pyvirtio-init: insmod $m failed"
done
ip link set lo up 2>/dev/null
echo "{BOOT_MARKER} $(cut -d' ' -f1 /proc/uptime)"
status=0
if [ -f /test.sh ]; then
    sh /test.sh
    status=$?
fi
echo "{EXIT_MARKER} $status"
sync
poweroff -f
reboot -f
"""


class GuestBuildError(Exception):
    """Building the guest artifacts failed; the message says at which step."""


@dataclasses.dataclass(frozen=True)
class GuestArtifacts:
    """A kernel and a base initramfs ready to boot."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    modules: tuple[str, ...]


Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$PYVIRTIO_CACHE``, else ``$XDG_CACHE_HOME/pyvirtio``, else ``~/.cache/pyvirtio``."""
    env = os.environ.get("PYVIRTIO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pyvirtio"


def _stderr_progress(message: str) -> None:
    print(f"pyvirtio guest: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], step: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{step}: {cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(f"{step}: {' '.join(cmd)} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{step}: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _kernel_package(progress: Progress) -> str:
    """The versioned kernel package the cloud meta package points at."""

    def lookup() -> str | None:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "look up the kernel package")
        match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
        return match.group(1) if match else None

    try:
        package = lookup()
    except GuestBuildError:
        package = None
    if package is None:
        progress("package lists are missing or stale: apt-get update")
        _run(["apt-get", "update", "-qq"], "apt-get update", timeout=900)
        package = lookup()
    if package is None:
        raise GuestBuildError(f"apt-cache knows no dependency of {KERNEL_META_PACKAGE}")
    return package


def _download_and_unpack(
    packages: Iterable[str], dest: Path, progress: Progress, keep: Path | None = None
) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-debs-") as tmp:
        tmp_path = Path(tmp)
        # apt-get download writes to the current directory; as root it warns that
        # the _apt user cannot write there, which is harmless.
        os.chmod(tmp_path, 0o777)
        names = list(packages)
        progress(f"downloading {', '.join(names)}")
        _run(["apt-get", "download", *names], "apt-get download", cwd=tmp_path)
        for deb in sorted(tmp_path.glob("*.deb")):
            progress(f"unpacking {deb.name}")
            _run(["dpkg", "-x", str(deb), str(dest)], "dpkg -x")
            if keep is not None:
                keep.mkdir(exist_ok=True)
                shutil.copyfile(deb, keep / deb.name)


# -- kernel modules ---------------------------------------------------------------


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def _module_depends(path: Path) -> list[str]:
    """The ``depends=`` list of a module, read from its ``.modinfo`` strings."""
    data = path.read_bytes()
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None:
        return []
    return [d.replace("-", "_") for d in match.group(1).decode().split(",") if d]


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and their dependencies, dependencies first.

    ``modules_dir`` is ``lib/modules/<version>``.  Modules built into the kernel
    (listed in ``modules.builtin``) are skipped; unknown names raise.
    """
    index = {_module_name(p): p for p in modules_dir.rglob("*.ko")}
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {
            _module_name(Path(line.strip())) for line in builtin_file.read_text().splitlines()
        }
    order: list[Path] = []
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in visiting:
            raise GuestBuildError(f"module dependency loop at {name}")
        path = index.get(name)
        if path is None:
            raise GuestBuildError(f"module {name} is not in {modules_dir}")
        visiting.add(name)
        for dep in _module_depends(path):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


# -- cpio (newc) ------------------------------------------------------------------

CpioEntry = tuple[str, int, bytes]  # (path, mode, data); device nodes: data = b"" and rdev below


def cpio_archive(
    entries: Iterable[tuple[str, int, bytes]], *, devices: dict[str, int] | None = None
) -> bytes:
    """A cpio archive in the "newc" format the kernel's initramfs unpacker reads.

    ``entries`` are ``(path, mode, data)``; ``mode`` holds the file type bits
    (``0o100000`` regular, ``0o040000`` directory, ``0o120000`` symlink with
    the target as data, ``0o020000`` character device with ``devices[path]``
    as ``major << 8 | minor``).
    """
    devices = devices or {}
    out = io.BytesIO()
    ino = 1

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def record(name: str, mode: int, data: bytes, rdev: int = 0) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        fields = (
            ino, mode, 0, 0, 1 if not mode & 0o040000 else 2, 0, len(data),
            0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0,
        )  # fmt: skip
        out.write(b"070701" + b"".join(f"{f:08x}".encode() for f in fields))
        out.write(encoded)
        pad()
        out.write(data)
        pad()
        ino += 1

    for path, mode, data in entries:
        record(path.lstrip("/"), mode, data, devices.get(path, 0))
    record("TRAILER!!!", 0, b"")
    return out.getvalue()


def _dirs_for(paths: Iterable[str]) -> list[str]:
    dirs: set[str] = set()
    for path in paths:
        parent = Path(path.lstrip("/")).parent
        while str(parent) not in (".", ""):
            dirs.add(str(parent))
            parent = parent.parent
    return sorted(dirs, key=lambda d: (d.count("/"), d))


# -- extra Debian packages ------------------------------------------------------------

#: Where Debian puts executables and the dynamic loader of x86-64.
_EXEC_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin")
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib")
_LOADER = "lib64/ld-linux-x86-64.so.2"


def _library_packages(packages: Iterable[str]) -> list[str]:
    """The packages and every library package they depend on, recursively."""
    out = _run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        "resolve package dependencies",
    )  # fmt: skip
    names = set(packages)
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").removeprefix("PreDepends:").strip()
        if line.startswith(" ") and name.startswith("lib") and "<" not in name:
            names.add(name.split(":")[0])
    return sorted(names)


def package_files(unpacked: Path, packages: Iterable[str]) -> dict[str, tuple[int, bytes]]:
    """Executables of ``packages`` (already in ``unpacked``) and the libraries they load.

    The shared libraries are those the packages' dynamic loader lists for
    each executable (``ld.so --list`` over the unpacked tree), so only what
    is really loaded goes into the initramfs.
    """
    loader = _in_tree(unpacked, unpacked / _LOADER)
    if not loader.exists():
        raise GuestBuildError(f"no dynamic loader at {loader} (is libc6 unpacked?)")
    lib_path = ":".join(str(unpacked / d) for d in _LIB_DIRS)
    files: dict[str, tuple[int, bytes]] = {}
    for name in packages:
        listing = _run(["dpkg-deb", "-c", str(_deb_of(unpacked, name))], f"list {name}")
        for line in listing.splitlines():
            path = line.split()[-1].removeprefix("./")
            if not any(path.startswith(d + "/") for d in _EXEC_DIRS):
                continue
            target = _in_tree(unpacked, unpacked / path)
            if not target.is_file() or not os.access(target, os.X_OK):
                continue
            files[f"usr/bin/{Path(path).name}"] = (0o100755, target.read_bytes())
            libs = _run(
                [str(loader), "--library-path", lib_path, "--list", str(target)],
                f"list the libraries of {path}",
            )
            for lib in re.findall(r"=> (\S+) \(", libs):
                files[f"lib/x86_64-linux-gnu/{Path(lib).name}"] = (
                    0o100755,
                    _in_tree(unpacked, Path(lib)).read_bytes(),
                )
    files[_LOADER] = (0o100755, loader.read_bytes())
    return files


def _in_tree(root: Path, path: Path) -> Path:
    """``path`` with its symlinks followed inside ``root`` (absolute targets re-rooted)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise GuestBuildError(f"symlink loop at {path}")


def _deb_of(unpacked: Path, package: str) -> Path:
    debs = sorted((unpacked.parent / "debs").glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"package {package} was not downloaded")
    return debs[0]


def _base_initramfs(
    unpacked: Path, modules: list[Path], extra: dict[str, tuple[int, bytes]] | None = None
) -> bytes:
    busybox = unpacked / "bin" / "busybox"
    if not busybox.exists():
        raise GuestBuildError(f"busybox-static did not unpack {busybox}")
    files: list[tuple[str, int, bytes]] = [
        ("init", 0o100755, INIT_SCRIPT.encode()),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("lib/modules/load-order", 0o100644,
         "".join(f"{_module_name(m)}\n" for m in modules).encode()),
    ]  # fmt: skip
    for module in modules:
        files.append((f"lib/modules/{_module_name(module)}.ko", 0o100644, module.read_bytes()))
    for path, (mode, data) in sorted((extra or {}).items()):
        files.append((path, mode, data))
    entries = [(d, 0o040755, b"") for d in _dirs_for([f[0] for f in files] + ["dev/x", "proc/x"])]
    entries.append(("dev/console", 0o020600, b""))
    entries.append(("dev/null", 0o020666, b""))
    entries.extend(files)
    archive = cpio_archive(entries, devices={"dev/console": 5 << 8 | 1, "dev/null": 1 << 8 | 3})
    return gzip.compress(archive, compresslevel=6, mtime=0)


def build_guest(
    cache_dir: Path | None = None,
    *,
    modules: Iterable[str] = GUEST_MODULES,
    packages: Iterable[str] = (),
    progress: Progress | None = _stderr_progress,
    force: bool = False,
) -> GuestArtifacts:
    """Fetch, unpack and assemble the guest kernel and base initramfs (cached).

    ``packages`` are Debian packages (e.g. ``socat``) whose executables go
    into the guest's ``/usr/bin`` with the shared libraries they load; each
    set of packages has a cache of its own.
    """
    say: Progress = progress or (lambda _m: None)
    extra_packages = tuple(sorted(set(packages)))
    cache = (cache_dir or default_cache_dir()) / (
        "guest" if not extra_packages else "guest-" + "+".join(extra_packages)
    )
    module_names = tuple(modules)
    wanted = module_names + tuple(f"package:{p}" for p in extra_packages)
    manifest = cache / "manifest.json"
    if manifest.exists() and not force:
        try:
            meta = json.loads(manifest.read_text())
            arts = GuestArtifacts(
                Path(meta["kernel"]),
                Path(meta["initramfs"]),
                meta["version"],
                tuple(meta["modules"]),
            )
        except (ValueError, KeyError, TypeError):
            arts = None
        if (
            arts is not None
            and arts.kernel.exists()
            and arts.initramfs.exists()
            and meta.get("wanted") == list(wanted)
        ):
            say(f"using cached guest {arts.kernel_version} in {cache}")
            return arts
    steps = 4
    say(f"[1/{steps}] resolving the Debian cloud kernel package")
    package = _kernel_package(say)
    version = package.removeprefix("linux-image-")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyvirtio-guest-", dir=cache) as tmp:
        unpacked = Path(tmp) / "root"
        unpacked.mkdir()
        say(f"[2/{steps}] fetching {package} and {BUSYBOX_PACKAGE}")
        _download_and_unpack([package, BUSYBOX_PACKAGE], unpacked, say)
        extra: dict[str, tuple[int, bytes]] = {}
        if extra_packages:
            lib_packages = _library_packages(extra_packages)
            _download_and_unpack(lib_packages, unpacked, say, keep=Path(tmp) / "debs")
            extra = package_files(unpacked, extra_packages)
        vmlinuz = unpacked / "boot" / f"vmlinuz-{version}"
        modules_dir = unpacked / "lib" / "modules" / version
        if not vmlinuz.exists() or not modules_dir.is_dir():
            raise GuestBuildError(f"{package} did not unpack a kernel and modules for {version}")
        say(f"[3/{steps}] resolving module dependencies")
        order = module_load_order(modules_dir, module_names)
        say(f"[4/{steps}] writing the initramfs ({len(order)} modules)")
        image = _base_initramfs(unpacked, order, extra)
        kernel = cache / f"vmlinuz-{version}"
        initramfs = cache / f"initramfs-{version}.cpio.gz"
        shutil.copyfile(vmlinuz, kernel)
        initramfs.write_bytes(image)
    names = tuple(_module_name(m) for m in order)
    manifest.write_text(
        json.dumps(
            {
                "kernel": str(kernel),
                "initramfs": str(initramfs),
                "version": version,
                "modules": list(names),
                "wanted": list(wanted),
            },
            indent=1,
        )
    )
    say(f"guest ready: {kernel.name}, {initramfs.name} ({initramfs.stat().st_size // 1024} KiB)")
    return GuestArtifacts(kernel, initramfs, version, names)


def initramfs_with_script(
    base: GuestArtifacts, script: str, out_dir: Path, extra_files: dict[str, bytes] | None = None
) -> Path:
    """The base initramfs with ``/test.sh`` (and any extra files) appended.

    The result is cached by content hash in ``out_dir``.
    """
    files = {"test.sh": script.encode(), **(extra_files or {})}
    stat = base.initramfs.stat()
    digest = hashlib.sha256(f"{base.initramfs}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + data)
    out = out_dir / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    entries = [(d, 0o040755, b"") for d in _dirs_for(files)]
    entries.extend((name, 0o100755, data) for name, data in sorted(files.items()))
    extra = gzip.compress(cpio_archive(entries), mtime=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(base.initramfs.read_bytes() + extra)
    tmp.replace(out)
    return out
