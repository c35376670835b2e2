"""vhost-user: serving a virtio device to another process over a unix socket.

The protocol is QEMU's docs/interop/vhost-user.rst.  :mod:`.protocol` is the
wire format as a pure codec; :mod:`.backend` runs a
:class:`~pyvirtio.device.VirtioDevice` as a vhost-user back end.  The front
end (a driver-side peer) is :class:`pyvirtio.driver.vhost_user.VhostUserFrontend`.
"""

from __future__ import annotations

from pyvirtio.transport.vhost_user.backend import (
    DEFAULT_MAX_MEM_SLOTS,
    DEFAULT_PROTOCOL_FEATURES,
    VhostUserBackend,
)
from pyvirtio.transport.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    FrontendRequest,
    Message,
    MessageParser,
    ProtocolError,
    ProtocolFeature,
)

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "BackendRequest",
    "FrontendRequest",
    "Message",
    "MessageParser",
    "ProtocolError",
    "ProtocolFeature",
    "VhostUserBackend",
]
