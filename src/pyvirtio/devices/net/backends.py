"""Where a virtio-net device's frames go: back ends with a file descriptor to poll.

A back end carries whole Ethernet frames, each preceded by the 12-byte
``struct virtio_net_hdr`` (:data:`~.wire.HDR_SIZE`), in both directions.  It
is sans-IO-friendly: every call is non-blocking, and the host's event loop
polls :meth:`NetBackend.fileno` (see ``Net.host_fds``) to learn when to call
the device again.

* :class:`TapBackend`: a Linux TAP interface opened with IFF_VNET_HDR, so
  the kernel reads and writes the virtio header itself (checksum offload,
  GSO) and offloads toward the guest follow what the driver acked
  (TUNSETOFFLOAD).
* :class:`SocketPairBackend`: one end of an AF_UNIX SOCK_SEQPACKET (or
  SOCK_DGRAM) pair, one frame per message.  Two devices, or a device and a
  test, exchange frames through it without privileges.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pyvirtio.devices.net.wire import HDR_SIZE, NetFeature

__all__ = [
    "BackendGone",
    "NetBackend",
    "SocketPairBackend",
    "TapBackend",
    "tun_offload_flags",
]

Buffer = bytes | bytearray | memoryview


class BackendGone(OSError):
    """The back end can carry no more frames (the peer hung up, the TAP was destroyed)."""


@runtime_checkable
class NetBackend(Protocol):
    """What :class:`~pyvirtio.devices.net.device.Net` needs of a back end."""

    def fileno(self) -> int:
        """The fd a host polls: readable means :meth:`recv_into` has a frame."""
        ...

    def recv_into(self, buf: memoryview) -> int | None:
        """Read one frame (virtio header first) into ``buf``; None if none is waiting.

        Returns the frame's length.  A frame that does not fit is cut short
        (and its length is then at least ``len(buf)``), so callers pass a
        buffer one byte larger than any legal frame.  Raises
        :class:`BackendGone` when no frame can ever come again, OSError for
        other failures.
        """
        ...

    def send(self, parts: Sequence[Buffer]) -> bool:
        """Send one frame gathered from ``parts`` (virtio header first).

        False when the back end would block: nothing was sent and the caller
        retries once :meth:`fileno` polls writable.  Raises
        :class:`BackendGone` or OSError (the frame is then lost).
        """
        ...

    def set_offloads(self, guest_features: int) -> None:
        """The receive offloads the driver accepts now (GUEST_* feature bits)."""
        ...

    def close(self) -> None: ...


# -- TAP ------------------------------------------------------------------------------------

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
_IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

#: GUEST_* feature -> TUN offload flag (the guest's receive offloads are
#: what the kernel may hand the TAP's reader).
_TUN_OFFLOADS = (
    (NetFeature.GUEST_CSUM, TUN_F_CSUM),
    (NetFeature.GUEST_TSO4, TUN_F_TSO4),
    (NetFeature.GUEST_TSO6, TUN_F_TSO6),
    (NetFeature.GUEST_ECN, TUN_F_TSO_ECN),
    (NetFeature.GUEST_UFO, TUN_F_UFO),
)


def tun_offload_flags(guest_features: int) -> int:
    """TUNSETOFFLOAD flags for the driver's receive offloads.

    The kernel only segments-offloads with checksum offload on, so the
    segmentation flags are dropped without GUEST_CSUM (the spec makes them
    depend on it anyway).
    """
    flags = 0
    for feature, flag in _TUN_OFFLOADS:
        if guest_features & feature.mask:
            flags |= flag
    if not flags & TUN_F_CSUM:
        flags = 0
    return flags


class TapBackend:
    """A TAP interface named ``name`` (created if missing; "" lets the kernel pick tapN).

    Opens ``/dev/net/tun`` non-blocking with IFF_TAP | IFF_NO_PI |
    IFF_VNET_HDR and sets the vnet header size to 12 bytes
    (``virtio_net_hdr_v1``), so frames cross the fd exactly as virtio-net
    carries them.  The interface lives as long as this object keeps it open
    (it is not made persistent) and may be moved to another network
    namespace meanwhile: the fd stays valid.  Bringing it up and addressing
    it is the host administrator's job (``ip link set NAME up``).
    """

    def __init__(self, name: str = "", *, tun_path: str = "/dev/net/tun") -> None:
        encoded = name.encode()
        if len(encoded) >= _IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {_IFNAMSIZ - 1} bytes")
        self._fd = os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            reply = fcntl.ioctl(
                self._fd, _TUNSETIFF, _IFREQ.pack(encoded, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            )
            self.name = reply[:_IFNAMSIZ].rstrip(b"\0").decode()
            fcntl.ioctl(self._fd, _TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, 0)
        except BaseException:
            os.close(self._fd)
            raise
        self.offload_flags = 0

    def __repr__(self) -> str:
        return f"TapBackend({self.name!r})"

    def fileno(self) -> int:
        return self._fd

    def _raise_if_detached(self, exc: OSError) -> None:
        """The errors of a TAP device that is gone (deleted, or its fd closed) are final."""
        if exc.errno in (errno.EBADFD, errno.EBADF, errno.ENXIO):
            raise BackendGone(exc.errno, f"TAP {self.name}: {exc.strerror}") from exc

    def recv_into(self, buf: memoryview) -> int | None:
        try:
            return os.readv(self._fd, [buf])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._raise_if_detached(exc)
            raise

    def send(self, parts: Sequence[Buffer]) -> bool:
        try:
            os.writev(self._fd, parts)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._raise_if_detached(exc)
            raise
        # tun takes a frame whole or not at all.
        return True

    def set_offloads(self, guest_features: int) -> None:
        flags = tun_offload_flags(guest_features)
        try:
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not flags & TUN_F_UFO:
                raise
            # Kernels between 4.14 and 4.15.x refused UFO: go without it.
            flags &= ~TUN_F_UFO
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, flags)
        self.offload_flags = flags

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- socket pair -------------------------------------------------------------------------------

_SOCKET_BUFFER = 1 << 20
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag arithmetic costs a call per frame


class SocketPairBackend:
    """One end of an AF_UNIX SOCK_SEQPACKET or SOCK_DGRAM socket; one frame per message.

    :meth:`pair` makes two connected back ends (two devices on one wire);
    :meth:`with_peer` gives a back end and the raw peer socket, for a test
    that plays the other side.  The socket is made non-blocking.  Offload
    settings are recorded but change nothing: frames cross as the sender's
    device wrote them, and the receiving device adapts them to its driver.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type not in (
            socket.SOCK_SEQPACKET,
            socket.SOCK_DGRAM,
        ):
            raise ValueError(
                "SocketPairBackend needs an AF_UNIX SOCK_SEQPACKET or SOCK_DGRAM socket"
            )
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        self.sock = sock
        self.guest_features = 0
        self._seqpacket = sock.type == socket.SOCK_SEQPACKET

    @classmethod
    def pair(
        cls, kind: socket.SocketKind = socket.SOCK_SEQPACKET
    ) -> tuple[SocketPairBackend, SocketPairBackend]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        return cls(a), cls(b)

    @classmethod
    def with_peer(
        cls, kind: socket.SocketKind = socket.SOCK_SEQPACKET
    ) -> tuple[SocketPairBackend, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        return cls(a), b

    def __repr__(self) -> str:
        return f"SocketPairBackend(fd={self.sock.fileno()})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buf: memoryview) -> int | None:
        try:
            n, _, flags, _ = self.sock.recvmsg_into([buf])
        except (BlockingIOError, InterruptedError):
            return None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise BackendGone(exc.errno, f"peer gone: {exc.strerror}") from exc
        if flags & _MSG_TRUNC:
            return max(n, len(buf))
        if n == 0 and self._seqpacket and self._peer_closed():
            raise BackendGone(errno.ECONNRESET, "peer closed the socket")
        return n

    def _peer_closed(self) -> bool:
        """A zero-length read is either an empty message or end of stream: ask poll."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
        return any(mask & select.POLLHUP for _, mask in poller.poll(0))

    def send(self, parts: Sequence[Buffer]) -> bool:
        try:
            self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            return False
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
            raise BackendGone(exc.errno, f"peer gone: {exc.strerror}") from exc
        return True

    def set_offloads(self, guest_features: int) -> None:
        self.guest_features = guest_features

    def close(self) -> None:
        self.sock.close()
