"""vhost-user: serving a virtio device to another process over a unix socket.

The protocol is QEMU's docs/interop/vhost-user.rst.  :mod:`.protocol` is the
wire format as a pure codec; :mod:`.session` is one connection's back-end
state machine, sans-IO (messages and fds in, replies and :mod:`.actions`
out; :mod:`.rings` builds the device queues); :mod:`.backend` is the event
loop that serves a :class:`~pyvirtio.device.VirtioDevice` through it.  The
front end (a driver-side peer) is
:class:`pyvirtio.driver.vhost_user.VhostUserFrontend`.
"""

from __future__ import annotations

from pyvirtio.transport.vhost_user.actions import UnsealedMemory
from pyvirtio.transport.vhost_user.backend import VhostUserBackend
from pyvirtio.transport.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    FrontendRequest,
    Message,
    MessageParser,
    ProtocolError,
    ProtocolFeature,
)
from pyvirtio.transport.vhost_user.session import (
    DEFAULT_MAX_MEM_SLOTS,
    DEFAULT_PROTOCOL_FEATURES,
    VhostUserSession,
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
    "UnsealedMemory",
    "VhostUserBackend",
    "VhostUserSession",
]
