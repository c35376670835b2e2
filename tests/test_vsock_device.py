"""The vsock device with VsockDriver in process, and real Unix sockets on the host side."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest

from helpers.vsock import GUEST_CID, VsockRig, in_thread, listen_unix
from pyvirtio.devices.vsock.device import Vsock
from pyvirtio.devices.vsock.unix import UnixVsockHost, connect_to_guest
from pyvirtio.devices.vsock.wire import HEADER_SIZE, Header, Op, ShutdownFlag, SockType
from pyvirtio.testing import device_conformance


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = VsockRig(tmp_path)
    yield r
    r.close()


def test_guest_cid_in_config(rig: VsockRig) -> None:
    assert rig.driver.guest_cid == GUEST_CID


def test_driver_close_frees_its_buffers(rig: VsockRig) -> None:
    """The reset gives every receive, event and transmit buffer back to the allocator."""
    free_before = rig.rig.allocator.free_bytes
    server = listen_unix(Path(f"{rig.uds}_1234"))
    sock = rig.driver.connect(1234)
    sock.send(b"hello")
    rig.driver.close()
    assert rig.rig.allocator.free_bytes == free_before
    server.close()


def test_guest_to_host_stream(rig: VsockRig) -> None:
    server = listen_unix(Path(f"{rig.uds}_1234"))
    data = os.urandom(1 << 20)

    def host() -> str:
        conn, _ = server.accept()
        h = hashlib.sha256()
        while chunk := conn.recv(65536):
            h.update(chunk)
        conn.sendall(b"done")
        conn.close()
        return h.hexdigest()

    thread, out = in_thread(host)
    sock = rig.driver.connect(1234)
    sock.send(data)
    sock.shutdown(ShutdownFlag.SEND)
    assert sock.recv_exactly(4) == b"done"
    assert sock.recv(10) == b""
    thread.join(10)
    assert out == [hashlib.sha256(data).hexdigest()]
    server.close()


def test_host_to_guest_stream(rig: VsockRig) -> None:
    rig.driver.listen(5000)
    data = os.urandom(1 << 20)

    def host() -> bytes:
        c, port = connect_to_guest(rig.uds, 5000)
        line = f"OK {port}\n".encode()
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := c.recv(65536):
            back += chunk
        c.close()
        return line + back

    thread, out = in_thread(host)
    sock = rig.driver.accept(5000, timeout=10)
    got = bytearray()
    while chunk := sock.recv(65536, timeout=10):
        got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    sock.send(b"thanks")
    sock.close()
    thread.join(10)
    assert out and isinstance(out[0], bytes)
    assert out[0].startswith(b"OK 1073741824\n") and out[0].endswith(b"thanks")


def test_connect_to_nobody_is_refused(rig: VsockRig) -> None:
    with pytest.raises(ConnectionRefusedError):
        rig.driver.connect(4321)
    assert rig.device.stats["host_refused"] == 1
    assert len(rig.device.endpoint) == 0


def test_seqpacket_boundaries_guest_to_host(rig: VsockRig) -> None:
    server = listen_unix(Path(f"{rig.uds}_77"), socket.SOCK_SEQPACKET)
    messages = [b"a", b"", os.urandom(3000), os.urandom(100_000), b"end"]

    def host() -> list[bytes]:
        conn, _ = server.accept()
        got = [conn.recv(1 << 20) for _ in messages]
        conn.send(b"reply-1")
        conn.send(b"reply-2")
        conn.close()
        return got

    thread, out = in_thread(host)
    sock = rig.driver.connect(77, SockType.SEQPACKET)
    for m in messages:
        sock.send_message(m)
    assert sock.recv_message() == (b"reply-1", True)
    assert sock.recv_message() == (b"reply-2", True)
    thread.join(10)
    assert out == [messages]


def _conformance_device() -> Vsock:
    tmp = Path(tempfile.mkdtemp(prefix="pyvirtio-vsock-"))
    host = UnixVsockHost(tmp / "v.sock")
    device = Vsock(GUEST_CID, host)
    weakref.finalize(device, lambda: (host.close(), shutil.rmtree(tmp, ignore_errors=True)))
    return device


TestVsockConformance = device_conformance(_conformance_device)


def test_wire_header_is_44_bytes_and_round_trips() -> None:
    header = Header(3, 2, 1024, 80, 5, SockType.SEQPACKET, Op.RW, 3, 262144, 99)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE == 44
    assert Header.unpack(packed) == header
    # Field offsets of struct virtio_vsock_hdr (device-types/vsock).
    assert packed[16:20] == (1024).to_bytes(4, "little")
    assert packed[28:30] == (2).to_bytes(2, "little")
    assert packed[36:40] == (262144).to_bytes(4, "little")


def test_driver_package_imports_no_device_model() -> None:
    code = (
        "import sys, pyvirtio.driver.vsock; "
        "bad = [m for m in sys.modules if m in ('pyvirtio.devices.vsock.device', "
        "'pyvirtio.devices.vsock.unix', 'pyvirtio.device')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_credit_update_sent_when_guest_view_runs_low(rig: VsockRig) -> None:
    """A host that reads slowly: the guest's 1 MiB needs CREDIT_UPDATEs (buf_alloc is 256 KiB)."""
    server = listen_unix(Path(f"{rig.uds}_90"))
    data = os.urandom(1 << 20)

    def host() -> bytes:
        conn, _ = server.accept()
        got = bytearray()
        while chunk := conn.recv(4096):
            got += chunk
        return bytes(got)

    thread, out = in_thread(host)
    sock = rig.driver.connect(90)
    sock.send(data)
    sock.close()
    # The device writes what it still holds as the host reads: keep its fds served.
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        rig.pump(0.02)
    assert out == [data]
    conn = sock.conn
    assert conn.tx_cnt == len(data)
    assert conn.peer_buf_alloc == 256 * 1024


def test_seqpacket_host_to_guest(rig: VsockRig) -> None:
    """Host-initiated SEQPACKET through <uds_path>_seqpacket: messages keep their boundaries."""
    rig.driver.listen(6100)
    messages = [b"first", os.urandom(70_000), b"last"]

    def host() -> list[bytes]:
        c, _port = connect_to_guest(rig.uds, 6100, sock_type=SockType.SEQPACKET)
        for m in messages:
            c.send(m)
        replies = [c.recv(1 << 20), c.recv(1 << 20)]
        c.close()
        return replies

    thread, out = in_thread(host)
    sock = rig.driver.accept(6100, timeout=10)
    assert sock.conn.type is SockType.SEQPACKET
    got = [sock.recv_message(timeout=10)[0] for _ in messages]
    sock.send_message(b"reply-a")
    sock.send_message(b"reply-b")
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        rig.pump(0.02)
    assert got == messages
    assert out == [[b"reply-a", b"reply-b"]]


def test_seqpacket_messages_wait_for_a_slow_host_reader(rig: VsockRig) -> None:
    """A host SEQPACKET socket that is full refuses a message: it stays queued, not lost."""
    server = listen_unix(Path(f"{rig.uds}_78"), socket.SOCK_SEQPACKET)
    messages = [os.urandom(60_000) for _ in range(40)]

    def host() -> list[bytes]:
        conn, _ = server.accept()
        time.sleep(0.5)  # meanwhile the guest fills the socket and its credit
        conn.settimeout(10)
        return [conn.recv(1 << 17) for _ in messages]

    thread, out = in_thread(host)
    sock = rig.driver.connect(78, SockType.SEQPACKET)
    for m in messages:
        sock.send_message(m, timeout=20)
    deadline = time.monotonic() + 20
    while thread.is_alive() and time.monotonic() < deadline:
        rig.pump(0.02)
    assert out == [messages]
