"""Helpers for the tests of VhostUserBackend over a real socket.

:func:`served` runs a back end in a thread of the test process, every wait
bounded by :data:`TIMEOUT`; :class:`RawFrontend` is a scripted front end that
sends exactly the messages a test gives it (QEMU's order, or garbage);
:class:`StopFailsOnce` is a model that fails on purpose while being stopped.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyvirtio.device import VirtioDevice
from pyvirtio.devices.entropy import Entropy
from pyvirtio.transport.vhost_user import VhostUserBackend
from pyvirtio.transport.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    Message,
    MessageParser,
    Payload,
    encode,
    fds_from_ancillary,
    has_explicit_reply,
)

TIMEOUT = 5.0
F_PROTOCOL = 1 << VHOST_USER_F_PROTOCOL_FEATURES


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@contextmanager
def served(device: VirtioDevice, path: Path, **kwargs: float) -> Iterator[VhostUserBackend]:
    backend = VhostUserBackend(device, path, **kwargs)
    thread = threading.Thread(target=backend.serve_forever, name="vhost-user-backend")
    thread.start()
    try:
        yield backend
    finally:
        backend.stop()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "serve_forever did not return after stop()"
        backend.close()


class RawFrontend:
    """A scripted front end: exactly the messages a test sends, QEMU's order or garbage."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.parser = MessageParser(replies=True)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            payload = struct.pack(f"<{len(fds)}i", *fds)
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, payload)])
        else:
            self.sock.sendall(data)

    def send(
        self,
        request: FrontendRequest,
        payload: Payload = None,
        fds: Sequence[int] = (),
        flags: int = VERSION,
    ) -> None:
        self.send_raw(encode(Message(request, payload, flags, tuple(fds))), fds)

    def reply(self, request: FrontendRequest) -> Payload:
        while True:
            data, anc, _, _ = self.sock.recvmsg(self.parser.wanted(), socket.CMSG_SPACE(32))
            assert data, f"back end closed the connection instead of answering {request.name}"
            for fd in fds_from_ancillary(anc):
                os.close(fd)
            messages = self.parser.feed(data)
            if messages:
                assert messages[0].request is request
                return messages[0].payload

    def call(
        self, request: FrontendRequest, payload: Payload = None, fds: Sequence[int] = ()
    ) -> Payload:
        """Send with NEED_REPLY (unless the reply is explicit) and return the reply."""
        explicit = has_explicit_reply(request)
        self.send(request, payload, fds, VERSION if explicit else VERSION | FLAG_NEED_REPLY)
        return self.reply(request)

    def wait_eof(self) -> None:
        """The back end must close the connection."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.sock.recv(4096) == b"":
                    return
            except ConnectionResetError:
                return
        raise AssertionError("back end kept the connection open")

    def close(self) -> None:
        self.sock.close()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class StopFailsOnce(Entropy):
    """A model whose feature re-ack raises once when armed (a bug in a model)."""

    armed = False

    def ack_features(self, features: int) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("model bug while the back end stops the device")
        super().ack_features(features)
