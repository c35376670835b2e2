"""What the fuzz targets share: an input consumer and the command line.

Every target is a script ``fuzz/fuzz_<name>.py`` with a ``run_one(data)``
that raises (or asserts) on a finding, run through :func:`main`:

    python fuzz/fuzz_<name>.py --runs 5000                      # atheris if installed
    python fuzz/fuzz_<name>.py --engine hypothesis --runs 3000  # force hypothesis
    python fuzz/fuzz_<name>.py --runs -1 -max_total_time=600 corpus/   # a long run

Arguments the script does not know go to libFuzzer unchanged (``-seed=``,
``-max_total_time=``, a corpus directory, a crash file to reproduce).
This module is not a target itself: ``make fuzz`` runs ``fuzz/fuzz_*.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class Bytes:
    """Consumes fuzz input little-endian; returns zeros once it runs dry."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> int:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "little")

    def raw(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def pick(self, options: Sequence[T]) -> T:
        return options[self.take(1) % len(options)]

    def flag(self) -> bool:
        return bool(self.take(1) & 1)

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


class LogRecorder(logging.Handler):
    """Keeps the records of the loggers it is attached to; a target checks them per input."""

    def __init__(self, *loggers: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        for name in loggers:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # checked, not printed

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records, self.records = self.records, []
        return records


def _run_hypothesis(name: str, run_one: Callable[[bytes], None], runs: int, max_len: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=runs,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(min_size=4, max_size=max_len))
    def fuzz(data: bytes) -> None:
        run_one(data)

    fuzz()
    print(f"{name}: {runs} hypothesis inputs, no crash")


def _run_atheris(
    run_one: Callable[[bytes], None],
    load: Callable[[], None],
    runs: int,
    max_len: int,
    extra: Sequence[str],
) -> None:
    import atheris  # type: ignore[import-not-found]

    # Coverage feedback from pyvirtio only: instrumenting every loaded module
    # costs half a minute at start-up for nothing.
    with atheris.instrument_imports(include=["pyvirtio"]):
        load()
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", *extra], run_one)
    atheris.Fuzz()


def main(
    name: str,
    description: str,
    run_one: Callable[[bytes], None],
    load: Callable[[], None],
    *,
    max_len: int = 4096,
    libfuzzer_args: Sequence[str] = (),
) -> None:
    """Parse the command line and fuzz ``run_one``; ``load`` imports the code under test.

    ``libfuzzer_args`` are the target's own libFuzzer defaults (the command
    line's come after them, so they win).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=3000, help="number of inputs (-1: no limit)")
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "hypothesis"),
        default="auto",
        help="atheris when installed (auto), or force one",
    )
    args, extra = parser.parse_known_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            engine = "hypothesis"
        else:
            engine = "atheris"
    print(f"{name}: engine {engine}, {args.runs} runs", flush=True)
    if engine == "atheris":
        _run_atheris(run_one, load, args.runs, max_len, [*libfuzzer_args, *extra])  # exits
    else:
        load()
        _run_hypothesis(name, run_one, max(args.runs, 1), max_len)
