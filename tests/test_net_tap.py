"""The TAP back end for real: a Net on a TAP inside a network namespace of the test's own.

The TAP is created by :class:`TapBackend`, moved into a fresh namespace and
given 10.213.78.1/24 there; the device (driven by NetDriver over MMIO in
this process) sends an ARP request and an ICMP echo request from
10.213.78.2 and receives the kernel's replies.  Nothing leaves the machine:
the namespace has only this link.  The namespace (and the TAP with it) is
deleted afterwards.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from helpers.net import arp_request, icmp_echo, network_namespace, run
from pyvirtio.devices.net import Net, TapBackend, poll_devices
from pyvirtio.devices.net.backends import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, BackendGone
from pyvirtio.devices.net.wire import HDR_SIZE, internet_checksum
from pyvirtio.driver.net import NetDriver
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import MmioTestRig

NS_IP = bytes([10, 213, 78, 1])
DEV_IP = bytes([10, 213, 78, 2])
DEV_MAC = bytes.fromhex("02000000d00d")


@pytest.fixture
def tap_in_netns() -> Iterator[tuple[TapBackend, str]]:
    with network_namespace(f"pyvtap{os.getpid()}") as ns:
        try:
            tap = TapBackend(f"pyvtap{os.getpid() % 100000}")
        except PermissionError as exc:
            pytest.skip(f"cannot create a TAP device: {exc}")
        try:
            for cmd in (
                ("ip", "link", "set", tap.name, "netns", ns),
                ("ip", "-n", ns, "addr", "add", "10.213.78.1/24", "dev", tap.name),
                ("ip", "-n", ns, "link", "set", tap.name, "up"),
            ):
                done = run(*cmd)
                assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
            yield tap, ns
        finally:
            tap.close()


def _wait_for(
    driver: NetDriver, match: Callable[[bytes], bool], seen: list[bytes], timeout: float = 5.0
) -> bytes:
    """The first received frame ``match`` accepts; every frame goes to ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = driver.recv(timeout=deadline - time.monotonic())
        if frame is not None:
            seen.append(frame)
            if match(frame):
                return frame
    raise AssertionError("no matching frame from the kernel")


def test_arp_and_ping_through_a_tap(tap_in_netns: tuple[TapBackend, str]) -> None:
    tap, ns = tap_in_netns
    net = Net(tap, mac=DEV_MAC, mtu=1500)
    rig = MmioTestRig(net, GuestMemory.anonymous(16 << 20))
    driver = NetDriver(rig.driver, wait=lambda t: poll_devices([net], t), timeout=5.0)
    # Offloads toward the driver follow what it acked (TUNSETOFFLOAD).
    assert tap.offload_flags & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    )
    driver.set_rx_mode(promisc=False)
    # What came in before, while the device was promiscuous as after reset.
    driver.recv_all()
    seen: list[bytes] = []

    driver.send(arp_request(DEV_MAC, DEV_IP, NS_IP))
    reply = _wait_for(
        driver, lambda f: f[12:14] == b"\x08\x06" and struct.unpack("!H", f[20:22])[0] == 2, seen
    )
    ns_mac = reply[22:28]
    assert reply[:6] == DEV_MAC and reply[28:32] == NS_IP and reply[38:42] == DEV_IP

    driver.send(icmp_echo(DEV_MAC, ns_mac, DEV_IP, NS_IP, ident=0x77, seq=1))
    echo = _wait_for(driver, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1, seen)
    ip = echo[14:34]
    icmp = echo[34:]
    assert ip[12:16] == NS_IP and ip[16:20] == DEV_IP
    assert icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x77, 1)  # echo reply
    assert icmp[8:] == bytes(range(32))
    assert internet_checksum(ip) == 0 and internet_checksum(icmp) == 0
    assert net.stats["tx_frames"] == 2 and net.stats["rx_frames"] >= 2
    # The kernel's IPv6 multicast chatter never got past the filter (promiscuous mode off,
    # empty multicast table): only frames to our address or broadcast arrived.
    assert all(f[:6] in (DEV_MAC, b"\xff" * 6) for f in seen)
    # And the namespace's kernel learned our address from the ARP request.
    neighbours = run("ip", "-n", ns, "neigh", "show", "10.213.78.2").stdout
    assert "02:00:00:00:d0:0d" in neighbours, neighbours
    driver.close()
    assert tap.offload_flags == 0  # reset: no offloads toward a driver that is gone


def test_a_tap_whose_fd_is_gone_raises_backend_gone() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is not available")
    try:
        tap = TapBackend("")
    except PermissionError as exc:
        pytest.skip(f"cannot create a TAP device: {exc}")
    fd = tap.fileno()
    os.close(fd)  # as if the fd were closed under the back end: EBADF from now on
    try:
        with pytest.raises(BackendGone, match="TAP"):
            tap.recv_into(memoryview(bytearray(2048)))
        with pytest.raises(BackendGone, match="TAP"):
            tap.send([bytes(HDR_SIZE + 60)])
    finally:
        tap._fd = -1  # already closed
