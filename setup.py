"""Optional mypyc build of pyvirtio's hot modules (everything else is in pyproject.toml).

By default pyvirtio installs as pure Python.  With ``PYVIRTIO_MYPYC=1`` the
modules in ``pyvirtio.compiled.HOT_MODULES`` are compiled to C extensions
by mypyc from the same source; build it into its own environment with a
non-editable install (``make compiled``), so compiled files never sit next
to the sources of an editable checkout.  Needs mypy and a C compiler with
the Python headers, and no build isolation (mypy comes from the build
environment): ``PYVIRTIO_MYPYC=1 pip install --no-build-isolation .``
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from setuptools import setup

SRC = Path(__file__).resolve().parent / "src"


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


def ext_modules() -> list[object]:
    if os.environ.get("PYVIRTIO_MYPYC", "0") in ("", "0"):
        return []
    from mypyc.build import mypycify

    paths = [str(Path("src", *module.split(".")).with_suffix(".py")) for module in hot_modules()]
    # mypy reads [tool.mypy] (strict) from pyproject.toml: what compiles is
    # exactly what the type check accepts.
    return list(mypycify(paths, opt_level="3"))


setup(ext_modules=ext_modules())
