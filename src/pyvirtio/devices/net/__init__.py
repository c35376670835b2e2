"""virtio-net: the device model (:mod:`.device`), its back ends (:mod:`.backends`)
and the wire format both share with the driver (:mod:`.wire`)."""

from pyvirtio.devices.net.backends import (
    BackendGone,
    NetBackend,
    SocketPairBackend,
    TapBackend,
)
from pyvirtio.devices.net.device import STAT_KEYS, Net, RxFilter, poll_devices
from pyvirtio.devices.net.wire import NetFeature, NetHeader

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
