"""virtio-net: the device model (:mod:`.device`), its back ends (:mod:`.backends`)
and the wire format both share with the driver (:mod:`.wire`).

Names are imported on first use, so the driver library, which needs only
:mod:`.wire`, does not load the model and its back ends.  ``poll_devices``,
the loop for hosts without one, lives in :mod:`pyvirtio.vmm.host_loop` and is
re-exported here for existing users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvirtio.lazy import lazy_getattr

if TYPE_CHECKING:
    from pyvirtio.devices.net.backends import (
        BackendGone,
        NetBackend,
        SocketPairBackend,
        TapBackend,
    )
    from pyvirtio.devices.net.device import STAT_KEYS, Net, RxFilter
    from pyvirtio.devices.net.wire import NetFeature, NetHeader
    from pyvirtio.vmm.host_loop import poll_devices

__all__ = [
    "STAT_KEYS",
    "BackendGone",
    "Net",
    "NetBackend",
    "NetFeature",
    "NetHeader",
    "RxFilter",
    "SocketPairBackend",
    "TapBackend",
    "poll_devices",
]

_HOMES = {
    "BackendGone": "pyvirtio.devices.net.backends",
    "NetBackend": "pyvirtio.devices.net.backends",
    "SocketPairBackend": "pyvirtio.devices.net.backends",
    "TapBackend": "pyvirtio.devices.net.backends",
    "STAT_KEYS": "pyvirtio.devices.net.device",
    "Net": "pyvirtio.devices.net.device",
    "RxFilter": "pyvirtio.devices.net.device",
    "NetFeature": "pyvirtio.devices.net.wire",
    "NetHeader": "pyvirtio.devices.net.wire",
    "poll_devices": "pyvirtio.vmm.host_loop",
}

__getattr__ = lazy_getattr(__name__, _HOMES, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
