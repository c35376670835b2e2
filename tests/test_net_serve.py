"""``pyvirtio serve net`` as users run it: a subprocess on a unix socket, no TAP.

The wire is a SOCK_SEQPACKET socket the test holds (``--frames-connect`` to a
listener of the test's, or ``--frames-fd`` inheriting one end of a socket
pair); the front end is VhostUserFrontend with NetDriver.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.net import PEER_MAC, frame_of, serve_net_command, stop, wire_listener
from pyvirtio.constants import DeviceId
from pyvirtio.devices.net.wire import HDR_SIZE, NetFeature
from pyvirtio.driver.net import NetDriver
from pyvirtio.driver.vhost_user import VhostUserFrontend

TIMEOUT = 10.0


@contextmanager
def serving(args: list[str], pass_fds: tuple[int, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        serve_net_command(*args), stderr=subprocess.PIPE, text=True, pass_fds=pass_fds
    )
    try:
        yield proc
    finally:
        err, stopped = stop(proc, TIMEOUT)
        if not stopped:
            pytest.fail("serve net did not stop on SIGTERM")
        assert proc.returncode == 0, err
        assert "stopped" in err


def test_serve_net_on_a_connected_socket_with_two_queue_pairs(tmp_path: Path) -> None:
    listener = wire_listener(tmp_path / "wire", TIMEOUT)
    sock = tmp_path / "vhost.sock"
    args = ["--socket", str(sock), "--frames-connect", str(tmp_path / "wire"), "--queues", "2"]
    with serving(args):
        peer, _ = listener.accept()
        peer.settimeout(TIMEOUT)
        with VhostUserFrontend(sock, device_id=DeviceId.NET, timeout=TIMEOUT) as frontend:
            driver = NetDriver(frontend, timeout=TIMEOUT, ctrl=True, queue_pairs=2)
            assert driver.has(NetFeature.MQ) and driver.max_queue_pairs == 2
            assert driver.queue_pairs == 2
            for pair in (0, 1):
                out = frame_of(100 + pair, dst=PEER_MAC, src=driver.mac, seed=pair)
                driver.send(out, pair=pair)
                assert peer.recv(1 << 17) == bytes(HDR_SIZE) + out
            frames = [frame_of(60 + i, dst=driver.mac, seed=i) for i in range(20)]
            for frame in frames:
                peer.send(bytes(HDR_SIZE) + frame)
            assert [driver.recv(timeout=TIMEOUT) for _ in frames] == frames
            driver.close()
        peer.close()
    listener.close()


def test_serve_net_on_an_inherited_socket_pair_end(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(TIMEOUT)
    sock = tmp_path / "vhost.sock"
    fd = theirs.fileno()
    with serving(["--socket", str(sock), "--frames-fd", str(fd)], pass_fds=(fd,)):
        theirs.close()
        with VhostUserFrontend(sock, device_id=DeviceId.NET, timeout=TIMEOUT) as frontend:
            driver = NetDriver(frontend, timeout=TIMEOUT)
            out = frame_of(1514, dst=PEER_MAC, src=driver.mac)
            driver.send(out)
            assert ours.recv(1 << 17) == bytes(HDR_SIZE) + out
            ours.send(bytes(HDR_SIZE) + frame_of(70, dst=driver.mac))
            assert driver.recv(timeout=TIMEOUT) == frame_of(70, dst=driver.mac)
            driver.close()
    ours.close()


def test_serve_net_refuses_a_frames_fd_that_is_not_a_unix_packet_socket(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            serve_net_command("--socket", str(tmp_path / "s"), "--frames-fd", str(read_end)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            pass_fds=(read_end,),
            check=False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 1
    assert "SOCK_SEQPACKET" in result.stderr or "socket" in result.stderr.lower()
