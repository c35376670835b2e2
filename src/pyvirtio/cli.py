"""The ``pyvirtio`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pyvirtio import __version__

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from pyvirtio import demo

    return demo.run(requests=args.requests)


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvirtio.vmm.guest import GuestBuildError, build_guest, initramfs_with_script

    cache = Path(args.cache) if args.cache else None
    try:
        artifacts = build_guest(cache, force=args.force)
    except GuestBuildError as exc:
        print(f"pyvirtio guest build: {exc}", file=sys.stderr)
        return 1
    initramfs = artifacts.initramfs
    if args.script:
        script = Path(args.script).read_text()
        initramfs = initramfs_with_script(artifacts, script, artifacts.initramfs.parent / "scripts")
    print(f"kernel:    {artifacts.kernel}")
    print(f"initramfs: {initramfs}")
    print(f"modules:   {' '.join(artifacts.modules)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvirtio", description="virtio devices, transports and drivers in Python"
    )
    parser.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="logging level (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the self-check demo")
    demo.add_argument("--requests", type=int, default=20000, help="requests per ring format")
    demo.set_defaults(func=_cmd_demo)

    guest = sub.add_parser("guest", help="guest kernel and initramfs for testing devices")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True)
    build = guest_sub.add_parser(
        "build",
        help="fetch the Debian cloud kernel and busybox, build an initramfs (cached)",
        description="Fetch the Debian cloud kernel and busybox-static with apt-get download "
        "(nothing is installed), and build an initramfs that loads the virtio modules and "
        "runs the given script as /test.sh.",
    )
    build.add_argument("--script", help="shell script the guest runs after loading modules")
    build.add_argument("--cache", help="cache directory (default: ~/.cache/pyvirtio)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_cmd_guest_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
