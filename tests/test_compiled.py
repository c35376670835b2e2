"""pyvirtio.compiled and ``pyvirtio --version``: an install says whether it runs compiled.

``make test`` runs the core tests twice: in the editable pure-Python
environment and in the mypyc build (``make compiled``), setting
``PYVIRTIO_EXPECT_COMPILED`` to 0 or 1 so that each run first proves it
tests what it claims to, rather than silently testing the other one.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtio import compiled
from pyvirtio.cli import main

EXPECT = os.environ.get("PYVIRTIO_EXPECT_COMPILED")
SRC = Path(__file__).resolve().parents[1] / "src" / "pyvirtio"


def test_hot_modules_exist_and_are_listed_once() -> None:
    assert len(set(compiled.HOT_MODULES)) == len(compiled.HOT_MODULES)
    for module in compiled.HOT_MODULES:
        assert importlib.import_module(module).__name__ == module


def test_a_module_outside_the_list_is_reported_pure() -> None:
    assert not compiled.is_compiled("pyvirtio.cli")
    assert not compiled.is_compiled("pyvirtio.no_such_module")


def test_summary_matches_the_modules_loaded() -> None:
    count = len(compiled.compiled_modules())
    if count:
        assert compiled.summary() == (
            f"compiled with mypyc: {count} of {len(compiled.HOT_MODULES)} hot modules"
        )
    else:
        assert compiled.summary() == "pure Python"


def test_version_names_the_build(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"pyvirtio 0.1.0 ({compiled.summary()})\n"


def test_info_lists_every_hot_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "info"], capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0] == f"pyvirtio 0.1.0 ({compiled.summary()})"
    for module in compiled.HOT_MODULES:
        state = "compiled" if compiled.is_compiled(module) else "pure Python"
        assert f"  {module}: {state}" in lines


@pytest.mark.skipif(EXPECT != "1", reason="runs in the compiled build (make compiled)")
def test_compiled_build_runs_every_hot_module_compiled() -> None:
    assert compiled.compiled_modules() == list(compiled.HOT_MODULES)
    # Installed, not the checkout's sources: nothing compiled lands in src/.
    for module in compiled.HOT_MODULES:
        origin = importlib.import_module(module).__file__
        assert origin is not None
        assert not Path(origin).resolve().is_relative_to(SRC), origin
    assert not list(SRC.rglob("*.so"))


@pytest.mark.skipif(EXPECT != "1", reason="runs in the compiled build (make compiled)")
def test_compiled_build_is_of_the_sources_under_test() -> None:
    # The wheel installs each module's source beside its extension: a build
    # older than the checkout would test stale code.
    for module in compiled.HOT_MODULES:
        origin = importlib.import_module(module).__file__
        assert origin is not None
        installed = Path(origin).with_name(Path(origin).name.split(".")[0] + ".py")
        checkout = SRC.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert installed.read_text() == checkout.read_text(), f"{module}: rebuild (make compiled)"


@pytest.mark.skipif(EXPECT != "0", reason="runs in the pure-Python environment (make unit)")
def test_pure_environment_runs_no_module_compiled() -> None:
    assert compiled.compiled_modules() == []
    assert compiled.summary() == "pure Python"


def test_modules_with_mypyc_options_import_without_mypy_extensions() -> None:
    # mypyc_attr is read by mypyc; an install without mypy still imports them.
    code = (
        "import sys; sys.modules['mypy_extensions'] = None; "
        "import pyvirtio.devices.net.device as d; print(d.Net.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "Net\n"
