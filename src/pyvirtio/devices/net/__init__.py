"""virtio-net, split by job (device-types/net).

* :mod:`.wire`: the format the device and the driver share (feature bits,
  the packet header, config space, control commands);
* :mod:`.frames`: each frame's checks and header rewrites, both ways, pure;
* :mod:`.receive`: placing a received frame into receive buffers (MRG_RXBUF);
* :mod:`.control`: control command parsing and the receive filter, pure;
* :mod:`.steering`: multiqueue receive steering by flow;
* :mod:`.stats`: the counters; :mod:`.persist`: what a snapshot holds;
* :mod:`.backends`: TAP, socket pair: the I/O objects a host gives the model;
* :mod:`.device`: the model, :class:`Net`.

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
    from pyvirtio.devices.net.control import RxFilter
    from pyvirtio.devices.net.device import Net
    from pyvirtio.devices.net.stats import STAT_KEYS
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
    "STAT_KEYS": "pyvirtio.devices.net.stats",
    "Net": "pyvirtio.devices.net.device",
    "RxFilter": "pyvirtio.devices.net.control",
    "NetFeature": "pyvirtio.devices.net.wire",
    "NetHeader": "pyvirtio.devices.net.wire",
    "poll_devices": "pyvirtio.vmm.host_loop",
}

__getattr__ = lazy_getattr(__name__, _HOMES, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
