"""vsock throughput and connection setup: in process, and a real Linux guest against virtio-net.

In process: VsockDriver <-> the Vsock device over in-process MMIO, the host
side a Unix socket served by a thread: guest->host and host->guest MB/s with
64 KiB sends, and connections set up and closed per second.

Real guest (QEMU microvm, Linux's drivers, socat in the guest with 64 KiB
blocks), in one boot: guest->host and host->guest MB/s over ``pyvirtio serve
vsock`` (Unix sockets on the host) and over ``pyvirtio serve net`` (a TAP in
a network namespace, TCP on both ends), and the rate of host->guest vsock
connection setup (CONNECT .. OK; the guest kernel answers from its listen
queue).  Medians of ``--runs`` transfers each, and the vsock/net ratio.

    python benchmarks/vsock.py [--runs 3] [--mib 32] [--no-guest]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyvirtio.devices.vsock.unix import connect_to_guest
from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import build_guest, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot, kvm_runs_linux

CHUNK = 64 * 1024
HOST_IP = "10.213.78.1"
GUEST_IP = "10.213.78.2"
G2H_PORT, H2G_PORT, SETUP_PORT, DONE_PORT = 1300, 1400, 1402, 1401
NET_G2H_PORT, NET_H2G_PORT = 7001, 7002


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


# -- in process -------------------------------------------------------------------------


def in_process(mib: int, runs: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers.vsock import VsockRig, listen_unix

    total = mib << 20
    payload = os.urandom(CHUNK)
    with tempfile.TemporaryDirectory() as tmp:
        rig = VsockRig(Path(tmp))
        driver = rig.driver
        server = listen_unix(Path(f"{rig.uds}_{G2H_PORT}"))

        def drain() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    while conn.recv(1 << 20):
                        pass

        threading.Thread(target=drain, daemon=True).start()
        g2h = []
        for _ in range(runs):
            sock = driver.connect(G2H_PORT)
            start = time.perf_counter()
            for _ in range(total // CHUNK):
                sock.send(payload)
            sock.close()
            g2h.append(_mbps(total, time.perf_counter() - start))
        driver.listen(H2G_PORT)
        h2g = []
        for _ in range(runs):

            def feed() -> None:
                c = connect_to_guest(rig.uds, H2G_PORT)[0]
                for _ in range(total // CHUNK):
                    c.sendall(payload)
                c.close()

            threading.Thread(target=feed, daemon=True).start()
            sock = driver.accept(H2G_PORT, timeout=10)
            start = time.perf_counter()
            got = 0
            while chunk := sock.recv(1 << 20, timeout=10):
                got += len(chunk)
            h2g.append(_mbps(got, time.perf_counter() - start))
            sock.close()
        setups = []
        for _ in range(runs):
            n = 300
            start = time.perf_counter()
            for _ in range(n):
                driver.connect(G2H_PORT).close()
            setups.append(n / (time.perf_counter() - start))
        server.close()
        rig.close()
    print(f"in process ({mib} MiB per transfer, {CHUNK // 1024} KiB sends, median of {runs}):")
    print(f"  guest->host  {statistics.median(g2h):8.1f} MB/s   (runs: {_fmt(g2h)})")
    print(f"  host->guest  {statistics.median(h2g):8.1f} MB/s   (runs: {_fmt(h2g)})")
    print(f"  connect+close {statistics.median(setups):7.0f} /s     (runs: {_fmt(setups)})")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


# -- real guest ---------------------------------------------------------------------------

NET_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept(); n = 0; t = None
    while True:
        d = c.recv(1 << 20)
        if t is None: t = time.perf_counter()
        if not d: break
        n += len(d)
    print(n, time.perf_counter() - t, flush=True); c.close()
"""

NET_SENDER = """
import socket, sys, time
total = int(sys.argv[3]); buf = b"\\0" * 65536
deadline = time.monotonic() + 120
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.3)
t = time.perf_counter()
for _ in range(total // 65536): c.sendall(buf)
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print(total, time.perf_counter() - t, flush=True)
"""


def _guest_script(mib: int, runs: int) -> str:
    nbytes = mib << 20
    return f"""
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
for i in $(seq 50); do ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1 && break; done
for r in $(seq {runs}); do
    socat -u -b {CHUNK} /dev/zero,readbytes={nbytes} VSOCK-CONNECT:2:{G2H_PORT}
    socat -u -b {CHUNK} /dev/zero,readbytes={nbytes} TCP:{HOST_IP}:{NET_G2H_PORT}
done
socat -u -b {CHUNK} VSOCK-LISTEN:{H2G_PORT},fork,backlog=16 OPEN:/dev/null &
socat -u -b {CHUNK} TCP-LISTEN:{NET_H2G_PORT},fork,reuseaddr OPEN:/dev/null &
socat -u VSOCK-LISTEN:{SETUP_PORT},fork,backlog=128 OPEN:/dev/null &
socat -u VSOCK-LISTEN:{DONE_PORT} OPEN:/dev/null
echo bench-done
"""


def _vsock_connect(uds: Path, port: int, deadline: float) -> socket.socket:
    """A host->guest connection, retried until the guest listens."""
    while True:
        try:
            return connect_to_guest(uds, port, timeout=30)[0]
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest never listened on vsock port {port}") from None
            time.sleep(0.3)


def _link_exists(name: str) -> bool:
    shown = subprocess.run(["ip", "link", "show", name], capture_output=True, check=False)
    return shown.returncode == 0


def real_guest(mib: int, runs: int) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("real guest: skipped (needs root and iproute2 for the TAP in a namespace)")
        return
    artifacts = build_guest(packages=("socat",), progress=None)
    ok, _reason = kvm_runs_linux(artifacts)
    accel = "kvm" if ok else "tcg"
    nbytes = mib << 20
    ns = f"pyvbench{os.getpid()}"
    tap = f"pyvb{os.getpid() % 100000}"
    results: dict[str, list[float]] = {k: [] for k in ("vg2h", "vh2g", "ng2h", "nh2g", "setup")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        uds = tmp / "h.sock"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            vsock = ServedDevice(
                "vsock", tmp / "vsock.sock", ["--guest-cid", "3", "--uds-path", str(uds)],
                log_level="warning",
            )  # fmt: skip
            net = ServedDevice("net", tmp / "net.sock", ["--tap", tap], log_level="warning")
            with vsock, net:
                for _ in range(100):
                    if _link_exists(tap):
                        break
                    time.sleep(0.05)
                for cmd in (
                    ["ip", "link", "set", tap, "netns", ns],
                    ["ip", "-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", tap],
                    ["ip", "-n", ns, "link", "set", tap, "up"],
                ):
                    subprocess.run(cmd, check=True)
                receiver = subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", NET_RECEIVER,
                     HOST_IP, str(NET_G2H_PORT), str(runs)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                server = socket.socket(socket.AF_UNIX)
                server.bind(f"{uds}_{G2H_PORT}")
                server.listen(4)

                def vsock_g2h() -> None:
                    for _ in range(runs):
                        conn, _ = server.accept()
                        got, start = 0, None
                        while chunk := conn.recv(1 << 20):
                            start = start or time.perf_counter()
                            got += len(chunk)
                        if start is not None:
                            results["vg2h"].append(_mbps(got, time.perf_counter() - start))
                        conn.close()

                def host_side() -> None:
                    vsock_g2h()
                    deadline = time.monotonic() + 300
                    payload = bytes(CHUNK)
                    for _ in range(runs):
                        sock = _vsock_connect(uds, H2G_PORT, deadline)
                        start = time.perf_counter()
                        for _ in range(nbytes // CHUNK):
                            sock.sendall(payload)
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(4096):
                            pass
                        results["vh2g"].append(_mbps(nbytes, time.perf_counter() - start))
                        sock.close()
                    for _ in range(runs):
                        out = subprocess.run(
                            ["ip", "netns", "exec", ns, sys.executable, "-c", NET_SENDER,
                             GUEST_IP, str(NET_H2G_PORT), str(nbytes)],
                            capture_output=True, text=True, timeout=300, check=True,
                        )  # fmt: skip
                        n, seconds = out.stdout.split()
                        results["nh2g"].append(_mbps(int(n), float(seconds)))
                    for _ in range(runs):
                        count = 50
                        start = time.perf_counter()
                        for _ in range(count):
                            _vsock_connect(uds, SETUP_PORT, deadline).close()
                        results["setup"].append(count / (time.perf_counter() - start))
                    _vsock_connect(uds, DONE_PORT, deadline).close()

                worker = threading.Thread(target=host_side, daemon=True)
                worker.start()
                vm = MicrovmConfig(
                    artifacts.kernel,
                    initramfs_with_script(artifacts, _guest_script(mib, runs), tmp),
                    accel=accel,
                )
                vm.add_vhost_user_vsock(vsock.socket_path)
                vm.add_vhost_user_net(net.socket_path, mac="52:54:00:78:00:02")
                result = boot(vm, timeout=600)
                worker.join(30)
                server.close()
                assert receiver.stdout is not None
                for line in receiver.stdout.read().splitlines():
                    n, seconds = line.split()
                    results["ng2h"].append(_mbps(int(n), float(seconds)))
                receiver.wait(10)
            if "bench-done" not in result.guest_output:
                print("real guest: the guest did not finish:\n" + result.tail)
                return
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    med = {k: statistics.median(v) if v else float("nan") for k, v in results.items()}
    print(f"real guest ({accel}, socat {CHUNK // 1024} KiB blocks, {mib} MiB, median of {runs}):")
    print(f"  guest->host  vsock {med['vg2h']:7.1f} MB/s ({_fmt(results['vg2h'])})  "
          f"net {med['ng2h']:7.1f} MB/s ({_fmt(results['ng2h'])})  "
          f"vsock/net {med['vg2h'] / med['ng2h']:.2f}")  # fmt: skip
    print(f"  host->guest  vsock {med['vh2g']:7.1f} MB/s ({_fmt(results['vh2g'])})  "
          f"net {med['nh2g']:7.1f} MB/s ({_fmt(results['nh2g'])})  "
          f"vsock/net {med['vh2g'] / med['nh2g']:.2f}")  # fmt: skip
    print(f"  host->guest vsock connection setup {med['setup']:.0f} /s ({_fmt(results['setup'])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer")
    parser.add_argument("--no-guest", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    in_process(args.mib, args.runs)
    if not args.no_guest:
        real_guest(args.mib, args.runs)


if __name__ == "__main__":
    main()
