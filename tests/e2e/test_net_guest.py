"""A real Linux guest on pyvirtio's virtio-net: QEMU's vhost-user front end, Linux's driver.

``pyvirtio serve net --tap TAP`` serves the device; the TAP is moved into a
network namespace this test creates, with 10.213.77.1/24 on it.  The guest
(Debian cloud kernel under QEMU microvm, ``-netdev vhost-user`` +
``virtio-net-device``) configures 10.213.77.2/24 on eth0 and pings the
namespace side; meanwhile the host pings the guest from inside the
namespace.  No packet can leave the machine: the only link is the TAP, and
the namespace has no other interface.  Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.net import network_namespace, run
from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.guest import GuestArtifacts, initramfs_with_script
from pyvirtio.vmm.qemu import MicrovmConfig, boot

HOST_IP = "10.213.77.1"
GUEST_IP = "10.213.77.2"
GUEST_MAC = "52:54:00:77:13:02"
#: How long the guest waits for the host's echo requests (seconds).
GUEST_WAIT = 40

GUEST_SCRIPT = f"""
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
echo "eth0-driver $(basename $(readlink /sys/class/net/eth0/device/driver))"
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ping -c 3 -W 2 {HOST_IP} > /tmp/ping.out 2>&1
echo "guest-ping-status $?"
echo "guest-ping $(grep 'packets received' /tmp/ping.out)"
in_echos() {{
    awk '/^Icmp:/ {{ if (!col) {{ for (i = 1; i <= NF; i++) if ($i == "InEchos") col = i }}
                    else print $col }}' /proc/net/snmp
}}
# The host probes with one echo request, then sends three: wait for four,
# then linger so the last reply leaves before the guest powers off.
for i in $(seq {GUEST_WAIT * 5}); do
    [ "$(in_echos)" -ge 4 ] && break
    sleep 0.2
done
sleep 3
echo "guest-in-echos $(in_echos)"
"""


def _lines(output: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(key + " ")]


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted (with whatever was moved into it) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating TAP devices and network namespaces needs root")
    with network_namespace(f"pyvnet{os.getpid()}") as name:
        yield name


def _wait_for_link(name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while run("ip", "link", "show", "dev", name).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"TAP {name} did not appear within {timeout} s")
        time.sleep(0.05)


class HostPinger(threading.Thread):
    """Pings the guest from the namespace once it answers; bounded by ``deadline``."""

    def __init__(self, ns: str, deadline: float) -> None:
        super().__init__(name="host-pinger", daemon=True)
        self.ns = ns
        self.deadline = deadline
        self.stop = threading.Event()
        self.output = ""

    def run(self) -> None:
        busybox = shutil.which("busybox") or "busybox"
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            probe = run("ip", "netns", "exec", self.ns, busybox, "ping", "-c", "1", "-W", "1",
                         GUEST_IP, timeout=5)  # fmt: skip
            if probe.returncode == 0:
                result = run("ip", "netns", "exec", self.ns, busybox, "ping", "-c", "3",
                              "-W", "2", GUEST_IP, timeout=15)  # fmt: skip
                self.output = result.stdout + result.stderr
                return
            self.stop.wait(0.2)


def test_linux_guest_pings_through_pyvirtio_net(
    guest: GuestArtifacts, accel: str, scratch: Path, netns: str
) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("busybox (for ping in the namespace) is not installed")
    tap = f"pyvt{os.getpid() % 100000}"
    initrd = initramfs_with_script(guest, GUEST_SCRIPT, scratch)
    served = ServedDevice("net", scratch / "net.sock", ["--tap", tap])
    with served:
        _wait_for_link(tap)
        for cmd in (
            ("ip", "link", "set", tap, "netns", netns),
            ("ip", "-n", netns, "addr", "add", f"{HOST_IP}/24", "dev", tap),
            ("ip", "-n", netns, "link", "set", tap, "up"),
        ):
            done = run(*cmd)
            assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
        pinger = HostPinger(netns, time.monotonic() + 100)
        pinger.start()
        try:
            vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
            vm.add_vhost_user_net(served.socket_path, mac=GUEST_MAC)
            result = boot(vm, timeout=100)
        finally:
            pinger.stop.set()
            pinger.join(20)
    assert served.returncode == 0, served.log()
    out = result.guest_output
    context = f"{result.tail}\n--- serve log ---\n{served.log()[-3000:]}"
    assert result.exit_status == 0, context
    assert _lines(out, "eth0-driver") == ["virtio_net"], context
    assert _lines(out, "guest-ping-status") == ["0"], out + context
    assert re.search(r"\b3 packets received", _lines(out, "guest-ping")[0]), out
    # The host side reached the guest from inside the namespace too.
    assert re.search(r"\b3 packets received", pinger.output), pinger.output or "no host ping"
    assert int(_lines(out, "guest-in-echos")[0]) >= 4, out
