"""A real Linux guest on pyvirtio's vsock: QEMU's vhost-user-vsock-device, Linux's vsock drivers.

``pyvirtio serve vsock`` runs as a user would run it; the guest uses socat
(added to the initramfs with its libraries by ``build_guest(packages=...)``)
through the kernel's vsock, vmw_vsock_virtio_transport_common and
vmw_vsock_virtio_transport modules; host programs use the Firecracker-style
Unix sockets.  Every boot has a deadline and one retry.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.devices.vsock.unix import connect_to_guest
from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import GuestArtifacts, GuestBuildError, build_guest, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot

CONNECTIONS = 50
BLOB = 1 << 20
GUEST_CID = 7
#: Guest -> host ports.
G2H_PORT = 1234
CLOSE_PORT = 1235
SEQ_PORT = 1236
REFUSED_PORT = 999
#: Host -> guest port.
H2G_PORT = 5000

#: struct sockaddr_vm after its family (reserved, port, CID 2, flags and padding),
#: for socat's generic socket address: AF_VSOCK is 40, SOCK_SEQPACKET 5.
SEQ_SOCKADDR = struct.pack("<HIII", 0, SEQ_PORT, 2, 0).hex()

#: socat option: a 30 s connect timeout (SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD, a
#: struct timeval) instead of Linux's 2 s, which 50 connects at once can
#: exceed in a guest under TCG on a loaded host.
CONNECT_TIMEOUT = "setsockopt-bin=40:6:x" + struct.pack("<qq", 30, 0).hex()

MAIN_SCRIPT = f"""
head -c {BLOB} /dev/urandom > /tmp/blob
echo "blob-sha $(sha256sum /tmp/blob | cut -d' ' -f1)"
pids=""
for i in $(seq {CONNECTIONS}); do
    (printf '%08d' $i; cat /tmp/blob) | \
        socat -u - VSOCK-CONNECT:2:{G2H_PORT},{CONNECT_TIMEOUT} 2>/tmp/g2h.$i &
    pids="$pids $!"
done
fails=0
for p in $pids; do wait $p || fails=$((fails + 1)); done
echo "g2h-failures $fails"
cat /tmp/g2h.* | sed 's/^/g2h-error /'
# Host -> guest: the host's 50 clients retry until this listens.
mkdir -p /tmp/h2g
socat VSOCK-LISTEN:{H2G_PORT},fork,backlog=128 \
    SYSTEM:'sha256sum > /tmp/h2g/$$.t; mv /tmp/h2g/$$.t /tmp/h2g/$$.sum' &
# Nobody listens on the host side of this port: the guest gets a reset.
socat -u /dev/null VSOCK-CONNECT:2:{REFUSED_PORT} 2>/tmp/refused.err
echo "refused-rc $?"
echo "refused-msg $(cat /tmp/refused.err)"
# The host closes after 64 KiB: the writer must fail, not hang.
dd if=/dev/zero bs=65536 count=256 2>/dev/null | \
    timeout 60 socat -u - VSOCK-CONNECT:2:{CLOSE_PORT},{CONNECT_TIMEOUT} 2>/tmp/close.err
echo "midclose-rc $?"
echo "midclose-msg $(cat /tmp/close.err)"
# SEQPACKET: socat reads the file in 1000-byte blocks, one message each.
head -c 3500 /dev/urandom > /tmp/seq
echo "seq-sha $(sha256sum /tmp/seq | cut -d' ' -f1)"
socat -u -b 1000 /tmp/seq SOCKET-CONNECT:40:0:x{SEQ_SOCKADDR},socktype=5,{CONNECT_TIMEOUT} \
    2>/tmp/seq.err
echo "seq-rc $?"
echo "seq-err $(cat /tmp/seq.err)"
for i in $(seq 900); do
    [ "$(ls /tmp/h2g/ | grep -c sum)" -ge {CONNECTIONS} ] && break
    sleep 0.1
done
for f in /tmp/h2g/*.sum; do echo "h2g-sum $(cut -d' ' -f1 $f)"; done
"""

REBOOT_SCRIPT = f"""
echo again | socat -u - VSOCK-CONNECT:2:{G2H_PORT}
echo "again-rc $?"
"""


def _lines(output: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] if " " in line else "" for line in output.splitlines()
            if line.startswith(key + " ") or line == key]  # fmt: skip


@pytest.fixture(scope="module")
def socat_guest(guest: GuestArtifacts) -> GuestArtifacts:
    try:
        return build_guest(packages=("socat",), progress=None)
    except GuestBuildError as exc:
        pytest.fail(f"cannot build a guest with socat: {exc}")


class HostSide:
    """The host programs of the test: Unix-socket servers and clients, in threads."""

    def __init__(self, uds: Path) -> None:
        self.uds = uds
        self.lock = threading.Lock()
        self.g2h: list[tuple[bytes, str]] = []
        self.h2g_sent: list[str] = []
        self.h2g_errors: list[str] = []
        self.seq_messages: list[bytes] = []
        self.midclose_read = 0
        self.again: list[bytes] = []
        self.threads: list[threading.Thread] = []
        self.servers: list[socket.socket] = []
        self.stop = threading.Event()

    def _thread(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _server(self, port: int, kind: int, handler: Callable[[socket.socket], None]) -> None:
        server = socket.socket(socket.AF_UNIX, kind)
        server.bind(f"{self.uds}_{port}")
        server.listen(128)
        server.settimeout(0.2)
        self.servers.append(server)

        def accept_loop() -> None:
            while not self.stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(60)
                self._thread(handler, conn)

        self._thread(accept_loop)

    def _g2h(self, conn: socket.socket) -> None:
        data = bytearray()
        with conn:
            while chunk := conn.recv(1 << 16):
                data += chunk
        with self.lock:
            if data.startswith(b"again"):
                self.again.append(bytes(data))
            else:
                self.g2h.append((bytes(data[:8]), hashlib.sha256(data[8:]).hexdigest()))

    def _close_early(self, conn: socket.socket) -> None:
        got = 0
        while got < 65536:
            chunk = conn.recv(65536 - got)
            if not chunk:
                break
            got += len(chunk)
        self.midclose_read = got
        conn.close()

    def _seq(self, conn: socket.socket) -> None:
        with conn:
            while message := conn.recv(1 << 16):
                self.seq_messages.append(message)

    def _h2g(self, index: int) -> None:
        data = os.urandom(BLOB)
        deadline = time.monotonic() + 200
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                sock, _port = connect_to_guest(self.uds, H2G_PORT, timeout=60)
            except ConnectionRefusedError:
                time.sleep(0.3)  # the guest is not listening yet
                continue
            except OSError as exc:
                with self.lock:
                    self.h2g_errors.append(f"{index}: {exc}")
                return
            with sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):  # the guest closes after hashing
                        pass
                except OSError as exc:
                    with self.lock:
                        self.h2g_errors.append(f"{index}: {exc}")
                    return
            with self.lock:
                self.h2g_sent.append(hashlib.sha256(data).hexdigest())
            return

    def start(self) -> None:
        self._server(G2H_PORT, socket.SOCK_STREAM, self._g2h)
        self._server(CLOSE_PORT, socket.SOCK_STREAM, self._close_early)
        self._server(SEQ_PORT, socket.SOCK_SEQPACKET, self._seq)

    def start_h2g(self) -> None:
        for index in range(CONNECTIONS):
            self._thread(self._h2g, index)

    def close(self) -> None:
        self.stop.set()
        for server in self.servers:
            server.close()


def test_linux_guest_vsock_both_ways(
    socat_guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    uds = scratch / "h.sock"
    host = HostSide(uds)
    host.start()
    vsock = ServedDevice(
        "vsock", scratch / "vsock.sock", ["--guest-cid", str(GUEST_CID), "--uds-path", str(uds)]
    )
    try:
        with vsock:
            host.start_h2g()
            vm = MicrovmConfig(
                socat_guest.kernel,
                initramfs_with_script(socat_guest, MAIN_SCRIPT, scratch),
                accel=accel,
            )
            vm.add_vhost_user_vsock(vsock.socket_path)
            result = boot(vm, timeout=150)
            out = result.guest_output
            assert result.exit_status == 0, result.tail + "\n" + vsock.log()[-3000:]
            # The same back end serves the guest after it rebooted.
            vm2 = MicrovmConfig(
                socat_guest.kernel,
                initramfs_with_script(socat_guest, REBOOT_SCRIPT, scratch),
                accel=accel,
            )
            vm2.add_vhost_user_vsock(vsock.socket_path)
            again = boot(vm2, timeout=90)
    finally:
        host.close()
    log = vsock.log()
    assert vsock.returncode == 0, log[-3000:]
    # Guest -> host: 50 concurrent connections, each 1 MiB intact.
    assert _lines(out, "g2h-failures") == ["0"], out[-3000:]
    blob_sha = _lines(out, "blob-sha")[0]
    assert sorted(i for i, _ in host.g2h) == [b"%08d" % i for i in range(1, CONNECTIONS + 1)]
    assert {sha for _, sha in host.g2h} == {blob_sha}
    # Host -> guest: 50 concurrent connections, each 1 MiB intact.
    assert not host.h2g_errors, host.h2g_errors
    assert sorted(_lines(out, "h2g-sum")) == sorted(host.h2g_sent)
    assert len(host.h2g_sent) == CONNECTIONS
    # Refused: nobody listens on the host.
    assert _lines(out, "refused-rc") != ["0"]
    assert "reset" in _lines(out, "refused-msg")[0].lower() or "refused" in out.lower()
    # Host closed mid-transfer: an error, not a hang (timeout(1) would give 124/143).
    assert _lines(out, "midclose-rc")[0] not in ("0", "124", "143"), out[-2000:]
    assert host.midclose_read == 65536, _lines(out, "midclose-msg")
    # SEQPACKET boundaries: four messages, as written.
    assert _lines(out, "seq-rc") == ["0"], _lines(out, "seq-err")
    assert [len(m) for m in host.seq_messages] == [1000, 1000, 1000, 500]
    assert hashlib.sha256(b"".join(host.seq_messages)).hexdigest() == _lines(out, "seq-sha")[0]
    # After the reboot.
    assert again.exit_status == 0 and _lines(again.guest_output, "again-rc") == ["0"]
    assert host.again == [b"again\n"]
