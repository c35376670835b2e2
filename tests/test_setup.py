"""setup.py: when an install compiles the hot modules, and when it falls back to pure Python."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def load_setup() -> ModuleType:
    # Imported under another name, so the ``__main__`` guard keeps setup() from running.
    spec = importlib.util.spec_from_file_location("pyvirtio_setup", SETUP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = load_setup()
WHEEL = ["setup.py", "bdist_wheel", "--dist-dir", "/tmp/x"]


def test_a_wheel_is_compiled_by_default() -> None:
    assert setup.should_compile({}, WHEEL, []) is True


def test_without_a_toolchain_the_default_falls_back_to_pure_python_and_says_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert setup.should_compile({}, WHEEL, ["a C compiler (cc)"]) is False
    assert "pure Python" in capsys.readouterr().err


def test_an_editable_install_stays_pure_python() -> None:
    assert setup.should_compile({}, ["setup.py", "editable_wheel", "--dist-dir", "d"], []) is False
    assert setup.should_compile({}, ["setup.py", "develop", "build_ext"], []) is False


def test_metadata_steps_compile_nothing() -> None:
    assert setup.should_compile({}, ["setup.py", "egg_info"], []) is False
    assert setup.should_compile({"PYVIRTIO_MYPYC": "1"}, ["setup.py", "dist_info"], []) is False


def test_the_variable_forces_either_build() -> None:
    assert setup.should_compile({"PYVIRTIO_MYPYC": "0"}, WHEEL, []) is False
    editable = ["setup.py", "develop", "build_ext"]
    assert setup.should_compile({"PYVIRTIO_MYPYC": "1"}, editable, []) is True
    with pytest.raises(SystemExit, match="lacks the Python headers"):
        setup.should_compile({"PYVIRTIO_MYPYC": "1"}, WHEEL, ["the Python headers"])
    with pytest.raises(SystemExit, match="expected 0"):
        setup.should_compile({"PYVIRTIO_MYPYC": "yes"}, WHEEL, [])


def test_the_hot_module_list_is_read_from_its_one_home() -> None:
    from pyvirtio.compiled import HOT_MODULES

    assert setup.hot_modules() == list(HOT_MODULES)
