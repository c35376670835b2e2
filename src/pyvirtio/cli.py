"""The ``pyvirtio`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING

from pyvirtio import __version__

if TYPE_CHECKING:
    from pyvirtio.device import VirtioDevice
    from pyvirtio.devices.net import NetBackend

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from pyvirtio import demo

    return demo.run(requests=args.requests, guest=not args.no_guest)


def _cmd_info(args: argparse.Namespace) -> int:
    from pyvirtio import compiled

    print(f"pyvirtio {__version__} ({compiled.summary()})")
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for module in compiled.HOT_MODULES:
        print(f"  {module}: {'compiled' if compiled.is_compiled(module) else 'pure Python'}")
    return 0


class _VersionAction(argparse.Action):
    """``--version``: the version and whether the hot modules run compiled (looked up on use)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings,
            dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show the version, pure Python or compiled, and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from pyvirtio.compiled import summary

        print(f"pyvirtio {__version__} ({summary()})")
        parser.exit()


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvirtio.vmm.guest import GuestBuildError, build_guest, initramfs_with_script

    cache = Path(args.cache) if args.cache else None
    try:
        artifacts = build_guest(cache, packages=args.package, force=args.force)
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


def _make_device(args: argparse.Namespace, stack: contextlib.ExitStack) -> VirtioDevice:
    """The device ``args`` describe; worker threads it needs are shut down by ``stack``."""
    if args.device == "blk":
        from pyvirtio.devices.block import Block

        if args.io_threads < 0:
            raise ValueError("--io-threads must be >= 0")
        workers = None
        if args.io_threads:
            from pyvirtio.workers import IoWorkers

            workers = stack.enter_context(IoWorkers(args.io_threads, name="blk-io"))
        block = Block(
            args.file,
            read_only=args.read_only,
            serial=args.serial,
            num_queues=args.queues,
            cache=args.cache,
            direct=args.direct,
            logical_block_size=args.block_size,
            io_workers=workers,
        )
        import os

        from pyvirtio.vmm.fault_hooks import (
            DELAY_TRANSFERS_ENV,
            HOLD_WRITE_ENV,
            delay_transfers,
            hold_write,
        )

        # Test hooks: see vmm/fault_hooks.py.
        if os.environ.get(HOLD_WRITE_ENV):
            hold_write(block, os.environ[HOLD_WRITE_ENV])
        if os.environ.get(DELAY_TRANSFERS_ENV):
            delay_transfers(block, os.environ[DELAY_TRANSFERS_ENV])
        return block
    if args.device == "rng":
        from pyvirtio.devices.entropy import Entropy

        return Entropy(max_request=args.max_request)
    if args.device == "net":
        from pyvirtio.devices.net import Net

        backend = _net_backend(args)
        try:
            return Net(
                backend,
                mac=args.mac,
                mtu=args.mtu,
                queue_pairs=args.queues,
                front_end_control=True,  # vhost-user: the front end owns the control queue
            )
        except BaseException:
            backend.close()
            raise
    if args.device == "vsock":
        from pyvirtio.devices.vsock.device import Vsock
        from pyvirtio.devices.vsock.unix import UnixVsockHost

        host = UnixVsockHost(args.uds_path, seqpacket=not args.no_seqpacket)
        try:
            return Vsock(
                args.guest_cid,
                host,
                seqpacket=not args.no_seqpacket,
                max_connections=args.max_connections,
            )
        except BaseException:
            host.close()
            raise
    raise SystemExit(f"pyvirtio serve: unknown device {args.device}")


def _net_backend(args: argparse.Namespace) -> NetBackend:
    """The wire of ``serve net``: a TAP, an inherited socket, or a connected one."""
    import socket

    from pyvirtio.devices.net import SocketPairBackend, TapBackend

    if args.tap is not None:
        return TapBackend(args.tap)
    if args.frames_fd is not None:
        sock = socket.socket(fileno=args.frames_fd)
        try:
            return SocketPairBackend(sock)
        except ValueError:
            sock.detach()  # not ours to close
            raise
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(args.frames_connect)
        return SocketPairBackend(sock)
    except BaseException:
        sock.close()
        raise


def _cmd_serve(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _serve(args, stack)


def _serve(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from pyvirtio.transport.vhost_user.backend import VhostUserBackend

    log = logging.getLogger("pyvirtio.serve")
    if args.poll_us < 0:
        print(f"pyvirtio serve {args.device}: --poll-us must be >= 0", file=sys.stderr)
        return 2
    try:
        device = _make_device(args, stack)
    except (OSError, ValueError) as exc:
        print(f"pyvirtio serve {args.device}: {exc}", file=sys.stderr)
        return 1
    from pyvirtio.transport.vhost_user.protocol import ProtocolFeature
    from pyvirtio.transport.vhost_user.session import DEFAULT_PROTOCOL_FEATURES

    protocol_features = DEFAULT_PROTOCOL_FEATURES
    if args.device == "blk" and not args.no_inflight:
        # Restarts without losing requests (vhost-user.rst "Inflight I/O tracking").
        protocol_features |= ProtocolFeature.INFLIGHT_SHMFD.mask
    backend = VhostUserBackend(
        device,
        args.socket,
        poll_us=args.poll_us,
        unsealed_memory=args.unsealed_memory,
        protocol_features=protocol_features,
    )

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        backend.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    extras = []
    if getattr(args, "io_threads", 0):
        extras.append(f"{args.io_threads} I/O threads")
    if args.poll_us:
        extras.append(f"polling {args.poll_us:g} us")
    detail = f" ({', '.join(extras)})" if extras else ""
    print(f"pyvirtio serve: {device.name} on {args.socket}{detail}", file=sys.stderr, flush=True)
    try:
        backend.serve_forever()
    finally:
        backend.close()
        close = getattr(device, "close", None)
        if callable(close):
            close()
    print("pyvirtio serve: stopped", file=sys.stderr, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvirtio", description="virtio devices, transports and drivers in Python"
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="logging level (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the self-check demo")
    demo.add_argument("--requests", type=int, default=2000, help="requests per ring case")
    demo.add_argument(
        "--no-guest", action="store_true", help="only the ring self-check, no QEMU guest"
    )
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser(
        "info", help="version, interpreter, and which hot modules run compiled (mypyc)"
    )
    info.set_defaults(func=_cmd_info)

    serve = sub.add_parser(
        "serve",
        help="serve a device to a vhost-user front end (e.g. QEMU)",
        description="Serve a pyvirtio device over vhost-user on a unix socket until "
        "SIGINT or SIGTERM. Front ends may disconnect and reconnect.",
    )
    serve_sub = serve.add_subparsers(dest="device", required=True)
    blk = serve_sub.add_parser("blk", help="virtio-blk over a file or block device")
    blk.add_argument("--socket", required=True, help="unix socket path to listen on")
    blk.add_argument("--file", required=True, help="disk image or block device")
    blk.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    blk.add_argument("--serial", default="", help="serial number for GET_ID (20 bytes max)")
    blk.add_argument("--queues", type=int, default=1, help="number of request queues")
    blk.add_argument(
        "--cache",
        choices=("writeback", "writethrough"),
        default="writeback",
        help="writeback: FLUSH syncs; writethrough: every write is durable on completion",
    )
    blk.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    blk.add_argument("--block-size", type=int, default=512, help="logical block size")
    blk.add_argument(
        "--io-threads",
        type=int,
        default=0,
        help="worker threads that help the serving thread with a ring of large reads "
        "and writes, copying in parallel; one less than the CPUs to use is a good start "
        "(default 0: all I/O on the serving thread)",
    )
    blk.add_argument(
        "--no-inflight",
        action="store_true",
        help="do not offer inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD); "
        "without it a restarted back end cannot resubmit requests that were in flight",
    )
    rng = serve_sub.add_parser("rng", help="virtio-rng from the host's os.urandom")
    rng.add_argument("--socket", required=True, help="unix socket path to listen on")
    rng.add_argument(
        "--max-request", type=int, default=65536, help="cap on bytes served per request"
    )
    net = serve_sub.add_parser(
        "net",
        help="virtio-net over a TAP interface or a unix socket",
        description="virtio-net whose wire is a TAP interface (created if missing, with "
        "IFF_VNET_HDR; bring it up, address it or move it to a network namespace with ip(8); "
        "it stays usable while this process holds it), or, without root, a unix "
        "SOCK_SEQPACKET or SOCK_DGRAM socket carrying one frame per message, each preceded "
        "by the 12-byte virtio_net_hdr.",
    )
    net.add_argument("--socket", required=True, help="unix socket path to listen on")
    wire = net.add_mutually_exclusive_group(required=True)
    wire.add_argument("--tap", help="TAP interface name")
    wire.add_argument(
        "--frames-fd",
        type=int,
        metavar="FD",
        help="an inherited AF_UNIX SOCK_SEQPACKET/SOCK_DGRAM socket (one end of a socketpair)",
    )
    wire.add_argument(
        "--frames-connect",
        metavar="PATH",
        help="connect to a listening AF_UNIX SOCK_SEQPACKET socket at PATH and use it",
    )
    net.add_argument(
        "--queues",
        type=int,
        default=1,
        help="receive/transmit queue pairs (more than 1 offers VIRTIO_NET_F_MQ)",
    )
    net.add_argument("--mac", default=None, help="device MAC address (default: random, local)")
    net.add_argument("--mtu", type=int, default=1500, help="MTU advertised (VIRTIO_NET_F_MTU)")
    vsock = serve_sub.add_parser(
        "vsock",
        help="virtio-vsock to host Unix sockets (Firecracker's hybrid vsock)",
        description="virtio-vsock whose host side is Unix sockets, as Firecracker's: host "
        "processes connect to --uds-path and write 'CONNECT <port>\\n' (answered "
        "'OK <host port>\\n'); guest connections to port P go to the Unix socket "
        "<uds-path>_<P>.",
    )
    vsock.add_argument("--socket", required=True, help="unix socket path to listen on")
    vsock.add_argument("--guest-cid", type=int, required=True, help="the guest's CID (>= 3)")
    vsock.add_argument("--uds-path", required=True, help="host-side Unix socket path")
    vsock.add_argument(
        "--max-connections", type=int, default=1023, help="connections at most (default 1023)"
    )
    vsock.add_argument(
        "--no-seqpacket", action="store_true", help="do not offer VIRTIO_VSOCK_F_SEQPACKET"
    )
    for parser_ in (blk, rng, net, vsock):
        parser_.add_argument(
            "--poll-us",
            type=float,
            default=0.0,
            help="after serving a ring, busy-poll it this many microseconds with driver "
            "notifications off (fewer kicks and wake-ups for a CPU spent spinning; default 0)",
        )
        parser_.add_argument(
            "--unsealed-memory",
            choices=("refuse", "allow"),
            default="refuse",
            help="guest memory the front end shares but that cannot be sealed against "
            "shrinking (memfds without MFD_ALLOW_SEALING, hugetlbfs files: DPDK's "
            "virtio-user) lets the front end crash this process by truncating it; refuse "
            "it (default) or allow it, for a trusted front end",
        )
        parser_.set_defaults(func=_cmd_serve)

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
    build.add_argument(
        "--package",
        action="append",
        default=[],
        help="a Debian package whose programs (and the shared libraries they load) go "
        "into the initramfs, e.g. socat; repeat for more",
    )
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
