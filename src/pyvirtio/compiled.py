"""Which of pyvirtio's hot modules the running install has compiled with mypyc.

pyvirtio ships one source.  An install compiles the modules listed in
:data:`HOT_MODULES` to C extensions with mypyc, as black and mypy ship; an
editable install, ``PYVIRTIO_MYPYC=0`` or a missing toolchain gives pure
Python (setup.py), and a module that is not compiled is simply imported
from its ``.py`` file.  Behaviour is the same either way; only speed differs.

:data:`HOT_MODULES` is the one list: ``setup.py`` reads it (without
importing pyvirtio) to know what to compile, and :func:`compiled_modules`
reports which of them this interpreter actually loads compiled.
``pyvirtio --version`` prints the summary.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

__all__ = ["HOT_MODULES", "compiled_modules", "is_compiled", "mypyc_attr", "summary"]

_T = TypeVar("_T")

if TYPE_CHECKING:
    # What mypyc reads (it knows the decorator by this name).
    from mypy_extensions import mypyc_attr
else:

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        """mypyc's options for a class, which it reads while compiling: at run
        time nothing, so pyvirtio needs no mypy_extensions installed."""
        return lambda cls: cls


#: The modules a compiled build compiles: what every request or frame
#: crosses (guest memory, both sides of both ring formats, the block model,
#: its request parsing and pipeline, the vhost-user back end's loop and
#: front end, the virtio-net model's frame path and the net driver), chosen
#: by instruction counts.  ARCHITECTURE.md ("Compiled build")
#: says what is left out and why.  setup.py parses this tuple, so it stays
#: a literal of string literals.
HOT_MODULES = (
    "pyvirtio.memory",
    "pyvirtio.virtqueue.ring",
    "pyvirtio.virtqueue.chain",
    "pyvirtio.virtqueue.base",
    "pyvirtio.virtqueue.split_layout",
    "pyvirtio.virtqueue.split_device",
    "pyvirtio.virtqueue.split_driver",
    "pyvirtio.virtqueue.packed_layout",
    "pyvirtio.virtqueue.packed_device",
    "pyvirtio.virtqueue.packed_driver",
    "pyvirtio.devices.block.wire",
    "pyvirtio.devices.block.request",
    "pyvirtio.devices.block.pipeline",
    "pyvirtio.devices.block.device",
    "pyvirtio.devices.net.wire",
    "pyvirtio.devices.net.frames",
    "pyvirtio.devices.net.receive",
    "pyvirtio.devices.net.steering",
    "pyvirtio.devices.net.device",
    "pyvirtio.transport.vhost_user.backend",
    "pyvirtio.driver.vhost_user",
    "pyvirtio.driver.net",
)


def is_compiled(module: str) -> bool:
    """Whether ``module`` is imported from a C extension (False if it cannot be found)."""
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The :data:`HOT_MODULES` this interpreter loads compiled (empty: pure Python)."""
    return [module for module in HOT_MODULES if is_compiled(module)]


def summary() -> str:
    """One line for ``pyvirtio --version``: pure Python, or how many hot modules are compiled."""
    count = len(compiled_modules())
    if count == 0:
        return "pure Python"
    return f"compiled with mypyc: {count} of {len(HOT_MODULES)} hot modules"
