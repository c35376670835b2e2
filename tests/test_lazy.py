"""pyvirtio.lazy: package names imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyvirtio.devices.block import wire
from pyvirtio.lazy import lazy_getattr


def test_first_use_imports_the_home_and_keeps_the_name() -> None:
    namespace: dict[str, object] = {}
    homes = {"HEADER": ".wire", "dumps": "json"}
    getattr_ = lazy_getattr("pyvirtio.devices.block", homes, namespace)
    assert getattr_("HEADER") is wire.HEADER  # relative to the package
    assert getattr_("dumps") is json.dumps  # absolute
    assert namespace == {"HEADER": wire.HEADER, "dumps": json.dumps}


def test_unknown_name_is_an_attribute_error() -> None:
    getattr_ = lazy_getattr("pyvirtio.devices", {}, {})
    with pytest.raises(AttributeError, match=r"module 'pyvirtio\.devices' has no attribute 'x'"):
        getattr_("x")


def test_packages_load_their_models_only_when_asked() -> None:
    code = (
        "import sys, pyvirtio.devices.block as b, pyvirtio.devices.net as n\n"
        "heavy = ('pyvirtio.devices.block.device', 'pyvirtio.devices.net.device')\n"
        "assert not [m for m in heavy if m in sys.modules]\n"
        "assert b.Block.__module__ == heavy[0] and n.Net.__module__ == heavy[1]\n"
        "assert 'Block' in vars(b) and 'Net' in vars(n)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
