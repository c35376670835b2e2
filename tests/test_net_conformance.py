"""The device conformance kit (pyvirtio.testing) applied to virtio-net."""

from __future__ import annotations

from typing import cast

from pyvirtio.devices.net import Net, SocketPairBackend
from pyvirtio.testing import device_conformance

TestNetConformance = device_conformance(
    lambda: Net(SocketPairBackend.pair()[0], mac="02:00:00:00:00:01"),
    modify=lambda device: cast(Net, device).set_link(False),
)
