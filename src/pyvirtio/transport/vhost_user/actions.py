"""What a :class:`~.session.VhostUserSession` asks its host to do: its actions.

The session never touches an fd or a socket; each received fd it keeps is
handed to the host in one of these, and the host carries them out in the
order given (:class:`~.backend.VhostUserBackend` does, and so may a test or
a fuzz target).  Every fd in an action is the host's from then on: to
watch, to signal, or to close.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

__all__ = [
    "Action",
    "CloseFds",
    "Disconnect",
    "NotifyKind",
    "Reply",
    "SetBackendChannel",
    "SetNotifyFd",
    "UnsealedMemory",
    "WatchKick",
    "fds_of",
]


class UnsealedMemory(enum.Enum):
    """What the back end does with shared memory it cannot seal against shrinking.

    A front end that truncates such memory makes the back end's next access
    raise SIGBUS, which kills a Python process (see :mod:`pyvirtio.memory`).
    """

    #: Refuse the region (NACK) with a log line saying why: the default.
    REFUSE = "refuse"
    #: Map it anyway, with a warning: for trusted front ends whose memory
    #: cannot be sealed (DPDK's virtio-user, hugetlbfs files).
    ALLOW = "allow"


class NotifyKind(enum.Enum):
    """The two fds a session signals the front end through, per ring."""

    #: SET_VRING_CALL: used buffers.
    CALL = "call"
    #: SET_VRING_ERR: the device needs a reset.
    ERR = "err"


@dataclass(frozen=True, slots=True)
class Reply:
    """Send these bytes (one encoded reply) to the front end, with ``fds`` if any.

    The fds are the host's once handed over: it closes them after sending
    (GET_INFLIGHT_FD's memfd).
    """

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WatchKick:
    """Ring ``index``'s kick fd is now ``fd`` (None: none); close the one it replaces.

    When ``fd`` is readable the host drains it and calls :meth:`~.session.VhostUserSession.kick`.
    """

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetNotifyFd:
    """Ring ``index``'s call or err fd is now ``fd`` (None: none); close the one it replaces."""

    index: int
    kind: NotifyKind
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetBackendChannel:
    """``fd`` is the back-end channel socket (CONFIG_CHANGE_MSG goes there); close the old one."""

    fd: int


@dataclass(frozen=True, slots=True)
class CloseFds:
    """Close these fds (received with a message that did not keep them)."""

    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Drop the connection (log ``reason`` at ``level``) and close the session."""

    reason: str
    level: int = logging.WARNING


Action = Reply | WatchKick | SetNotifyFd | SetBackendChannel | CloseFds | Disconnect


def fds_of(action: Action) -> tuple[int, ...]:
    """The fds ``action`` hands over (to close when it cannot be carried out)."""
    if isinstance(action, CloseFds):
        return action.fds
    if isinstance(action, (WatchKick, SetNotifyFd)):
        return () if action.fd is None else (action.fd,)
    if isinstance(action, SetBackendChannel):
        return (action.fd,)
    if isinstance(action, Reply):
        return action.fds
    return ()
