"""Names a package exports but imports only on first use (PEP 562 module ``__getattr__``).

A device package re-exports its model for users while the driver library
imports only its wire module: the model and its host dependencies load when
a user first asks for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each lazy name to its module.

    A home may be relative to ``package`` (``".device"``).  The first look-up
    imports the home and stores the name in ``namespace`` (the package's
    ``globals()``), so later ones do not come here.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        namespace[name] = value
        return value

    return __getattr__
