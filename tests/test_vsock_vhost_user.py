"""VsockDriver over vhost-user against the vsock device in a VhostUserBackend (as `serve vsock`)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.constants import DeviceId
from pyvirtio.devices.vsock.device import Vsock
from pyvirtio.devices.vsock.unix import UnixVsockHost
from pyvirtio.devices.vsock.wire import ShutdownFlag
from pyvirtio.driver.vhost_user import VhostUserFrontend
from pyvirtio.driver.vsock import VsockDriver
from pyvirtio.transport.vhost_user import VhostUserBackend
from vsock_harness import in_thread, listen_unix


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VsockDriver, Path]]:
    uds = tmp_path / "h.sock"
    device = Vsock(9, UnixVsockHost(uds))
    backend = VhostUserBackend(device, tmp_path / "vu.sock")
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    frontend = VhostUserFrontend(tmp_path / "vu.sock", device_id=DeviceId.VSOCK, timeout=10)
    try:
        yield VsockDriver(frontend, timeout=10), uds
    finally:
        frontend.close()
        backend.stop()
        thread.join(10)
        backend.close()
        device.close()


def test_both_directions_and_fd_reuse(served: tuple[VsockDriver, Path]) -> None:
    driver, uds = served
    assert driver.guest_cid == 9
    server = listen_unix(Path(f"{uds}_700"))
    data = os.urandom(300_000)

    def host_reader() -> str:
        conn, _ = server.accept()
        h = hashlib.sha256()
        while chunk := conn.recv(65536):
            h.update(chunk)
        conn.close()
        return h.hexdigest()

    thread, out = in_thread(host_reader)
    sock = driver.connect(700)
    sock.send(data)
    sock.shutdown(ShutdownFlag.SEND)
    thread.join(10)
    assert out == [hashlib.sha256(data).hexdigest()]
    driver.listen(800)
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    # The device closes that connection's host socket; the next host
    # connection it accepts gets the same fd number, and must be served.
    sock.close()
    driver._wait(driver._deadline(5), lambda: sock.conn.state.value == "killed")

    def host_writer() -> bytes:
        c = clients.pop()
        c.settimeout(10)
        c.connect(str(uds))
        c.sendall(b"CONNECT 800\n")
        line = c.recv(64)
        c.sendall(b"ping")
        reply = c.recv(64)
        c.close()
        return line + reply

    for _ in range(3):
        thread, out = in_thread(host_writer)
        conn = driver.accept(800, timeout=10)
        assert conn.recv_exactly(4) == b"ping"
        conn.send(b"pong")
        thread.join(10)
        assert len(out) == 1 and isinstance(out[0], bytes) and out[0].startswith(b"OK ")
        assert out[0].endswith(b"pong")
        conn.close()
    server.close()


def test_host_socket_closed_and_fd_reused_in_one_loop_round(tmp_path: Path) -> None:
    """A connection's host socket is closed and a new host connection accepted in the
    same round of the back end's loop: the new socket gets the old fd number and
    must still be polled (the loop only learns of fds through the device's list)."""
    uds = tmp_path / "h.sock"
    device = Vsock(9, UnixVsockHost(uds))
    backend = VhostUserBackend(device, tmp_path / "vu.sock")
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    frontend = VhostUserFrontend(tmp_path / "vu.sock", device_id=DeviceId.VSOCK, timeout=10)
    server = listen_unix(Path(f"{uds}_700"))
    try:
        driver = VsockDriver(frontend, timeout=10)
        driver.listen(800)
        sock = driver.connect(700)
        peer, _ = server.accept()
        # From here on this thread runs the back end's loop, one round at a time.
        backend.stop()
        thread.join(10)
        client = socket.socket(socket.AF_UNIX)
        driver.endpoint.connections[sock.conn.key].reset("test")
        driver._flush()  # RST on the TX ring, kick pending
        client.connect(str(uds))  # listener readable in the same round
        client.sendall(b"CONNECT 800\n")
        backend.run_once(1.0)
        for _ in range(50):
            backend.run_once(0.02)
            driver.poll()
        conn = driver.accept(800, timeout=0)
        client.settimeout(5)
        assert client.recv(64).startswith(b"OK ")
        conn.close()
        client.close()
        peer.close()
    finally:
        server.close()
        backend.close()
        frontend.close()
        device.close()
