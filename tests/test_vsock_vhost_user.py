"""VsockDriver over vhost-user against the vsock device in a VhostUserBackend (as `serve vsock`)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.vsock import in_thread, listen_unix
from pyvirtio.constants import DeviceId
from pyvirtio.devices.vsock.device import Vsock
from pyvirtio.devices.vsock.unix import UnixVsockHost
from pyvirtio.devices.vsock.wire import ShutdownFlag
from pyvirtio.driver.vhost_user import VhostUserFrontend
from pyvirtio.driver.vsock import VsockDriver
from pyvirtio.transport.vhost_user import VhostUserBackend
from pyvirtio.vmm.backends import ServedDevice


class Served:
    """A Vsock device in a VhostUserBackend on a thread, and VsockDriver over a front end."""

    def __init__(self, tmp: Path) -> None:
        self.uds = tmp / "h.sock"
        self.device = Vsock(9, UnixVsockHost(self.uds))
        self.backend = VhostUserBackend(self.device, tmp / "vu.sock")
        self.thread = threading.Thread(target=self.backend.serve_forever, daemon=True)
        self.thread.start()
        self.frontend = VhostUserFrontend(tmp / "vu.sock", device_id=DeviceId.VSOCK, timeout=10)
        self.driver = VsockDriver(self.frontend, timeout=10)

    def take_loop(self) -> None:
        """From now on the caller runs the back end's loop (``backend.run_once``)."""
        self.backend.stop()
        self.thread.join(10)

    def close(self) -> None:
        self.backend.stop()
        self.thread.join(10)
        self.backend.close()
        self.frontend.close()
        self.device.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


def test_both_directions_and_fd_reuse(served: Served) -> None:
    driver, uds = served.driver, served.uds
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


def test_host_socket_closed_and_fd_reused_in_one_loop_round(served: Served) -> None:
    """A connection's host socket is closed and a new host connection accepted in the
    same round of the back end's loop: the new socket gets the old fd number and
    must still be polled (the loop only learns of fds through the device's list)."""
    driver, backend = served.driver, served.backend
    server = listen_unix(Path(f"{served.uds}_700"))
    driver.listen(800)
    sock = driver.connect(700)
    peer, _ = server.accept()
    served.take_loop()
    client = socket.socket(socket.AF_UNIX)
    driver.endpoint.connections[sock.conn.key].reset("test")
    driver._flush()  # RST on the TX ring, kick pending
    client.connect(str(served.uds))  # listener readable in the same round
    client.sendall(b"CONNECT 800\n")
    backend.run_once(1.0)
    for _ in range(50):
        backend.run_once(0.02)
        driver.poll()
    conn = driver.accept(800, timeout=0)
    client.settimeout(5)
    assert client.recv(64).startswith(b"OK ")
    conn.close()
    for s in (client, peer, server):
        s.close()


def test_serve_vsock_command(tmp_path: Path) -> None:
    """`pyvirtio serve vsock` as a user runs it: VsockDriver over vhost-user, then SIGTERM."""
    uds = tmp_path / "h.sock"
    server = listen_unix(Path(f"{uds}_42"))
    served = ServedDevice(
        "vsock", tmp_path / "vu.sock", ["--guest-cid", "12", "--uds-path", str(uds)]
    )
    with served:
        frontend = VhostUserFrontend(served.socket_path, device_id=DeviceId.VSOCK, timeout=10)
        try:
            driver = VsockDriver(frontend, timeout=10)
            assert driver.guest_cid == 12
            sock = driver.connect(42)
            peer, _ = server.accept()
            sock.send(b"hello host")
            peer.settimeout(10)
            assert peer.recv(64) == b"hello host"
            peer.sendall(b"hello guest")
            assert sock.recv_exactly(11) == b"hello guest"
            peer.close()
        finally:
            frontend.close()
    assert served.returncode == 0, served.log()
    assert not uds.exists()
    server.close()


def test_serve_vsock_rejects_a_reserved_cid(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "serve", "vsock", "--socket", str(tmp_path / "s"),
         "--guest-cid", "2", "--uds-path", str(tmp_path / "h")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "guest CID must be in [3" in done.stderr
    assert not (tmp_path / "h").exists()
