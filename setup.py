"""The mypyc build of pyvirtio's hot modules (everything else is in pyproject.toml).

An install compiles the modules in ``pyvirtio.compiled.HOT_MODULES`` to C
extensions with mypyc, from the same source, as black and mypy ship: a
wheel or ``pip install .`` is compiled whenever it can be.  The pure-Python
modules are the fallback, and an install falls back to them (saying so)
when mypyc, a C compiler or the Python headers are missing.  An editable
install stays pure Python, so no compiled file ever sits next to (and
shadows) a source being edited.

``PYVIRTIO_MYPYC`` overrides the choice: ``1`` compiles or fails the build,
``0`` never compiles.  The build needs mypy (pyproject.toml lists it as a
build requirement; with ``--no-build-isolation`` it comes from the
environment).
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"

#: setuptools commands that build extensions (the metadata steps before them need none).
BUILD_COMMANDS = frozenset({"bdist_wheel", "build", "build_ext", "install"})
#: setuptools commands that build an editable (in-place) install.
EDITABLE_COMMANDS = frozenset({"editable_wheel", "develop"})


def hot_modules() -> list[str]:
    """``HOT_MODULES`` from src/pyvirtio/compiled.py, read without importing pyvirtio."""
    tree = ast.parse((SRC / "pyvirtio" / "compiled.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "HOT_MODULES" for t in node.targets)
            and isinstance(node.value, ast.Tuple)
        ):
            return [ast.literal_eval(element) for element in node.value.elts]
    raise RuntimeError("src/pyvirtio/compiled.py has no HOT_MODULES tuple")


def missing_toolchain() -> list[str]:
    """What a compiled build needs and this machine lacks (empty: it can compile)."""
    missing = []
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        missing.append("mypyc (pip install mypy)")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        missing.append(f"a C compiler ({compiler})")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        missing.append("the Python headers (Python.h; Debian: python3-dev)")
    return missing


def should_compile(env: Mapping[str, str], argv: Sequence[str], missing: Sequence[str]) -> bool:
    """Whether this build compiles the hot modules (see the module docstring).

    ``missing`` is what :func:`missing_toolchain` found; with
    ``PYVIRTIO_MYPYC=1`` anything missing is an error, by default it means
    the pure-Python fallback.
    """
    choice = env.get("PYVIRTIO_MYPYC", "")
    if choice not in ("", "0", "1"):
        raise SystemExit(f"PYVIRTIO_MYPYC={choice!r}: expected 0 (pure Python) or 1 (compiled)")
    if choice == "0" or not BUILD_COMMANDS.intersection(argv):
        return False
    if choice == "1":
        if missing:
            raise SystemExit("PYVIRTIO_MYPYC=1 but the build lacks " + ", ".join(missing))
        return True
    if EDITABLE_COMMANDS.intersection(argv):
        return False
    if missing:
        print(
            "pyvirtio: installing pure Python, without the compiled hot modules: missing "
            + ", ".join(missing),
            file=sys.stderr,
        )
        return False
    return True


def ext_modules() -> list[object]:
    if not should_compile(os.environ, sys.argv, missing_toolchain()):
        return []
    from mypyc.build import mypycify

    paths = [str(Path("src", *module.split(".")).with_suffix(".py")) for module in hot_modules()]
    # mypy reads [tool.mypy] (strict) from pyproject.toml: what compiles is
    # exactly what the type check accepts.
    return list(mypycify(paths, opt_level="3"))


if __name__ == "__main__":
    from setuptools import setup

    setup(ext_modules=ext_modules())
