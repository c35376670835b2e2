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
