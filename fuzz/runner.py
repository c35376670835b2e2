"""How a pyvirtio fuzz target runs: atheris (coverage guided) when installed, else hypothesis.

A target supplies ``load`` (imports the code under test; called after
atheris has hooked imports, so only pyvirtio is instrumented) and
``run_one(data)``, and calls :func:`main`::

    python fuzz/fuzz_X.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_X.py --engine hypothesis --runs 3000  # force hypothesis

Arguments it does not know go to libFuzzer (atheris), e.g. ``-seed=1``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


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
    load: Callable[[], None],
    run_one: Callable[[bytes], None],
    runs: int,
    max_len: int,
    extra: list[str],
) -> None:
    import atheris  # type: ignore[import-not-found]

    # Coverage feedback from pyvirtio only: instrumenting every loaded module
    # costs half a minute at start-up for nothing.
    with atheris.instrument_imports(include=["pyvirtio"]):
        load()
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", "-len_control=0", *extra], run_one
    )
    atheris.Fuzz()


def main(
    name: str,
    description: str,
    load: Callable[[], None],
    run_one: Callable[[bytes], None],
    *,
    max_len: int,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=3000, help="number of inputs")
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
        _run_atheris(load, run_one, args.runs, max_len, extra)  # exits the process when done
    else:
        load()
        _run_hypothesis(name, run_one, args.runs, max_len)
