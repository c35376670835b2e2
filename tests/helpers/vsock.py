"""Rigs for vsock tests: the device in process with its host fds served by the driver's waits."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from pyvirtio.devices.vsock.device import Vsock
from pyvirtio.devices.vsock.unix import UnixVsockHost
from pyvirtio.driver.vsock import VsockDriver
from pyvirtio.testing import MmioTestRig
from pyvirtio.vmm.host_loop import poll_devices

GUEST_CID = 3


class VsockRig:
    """A Vsock device behind in-process MMIO, its VsockDriver, and its Unix-socket host side.

    The driver's interrupt waits also run the device's host fds, so the
    whole rig runs on the test's thread; host peers run in threads of their
    own and only touch their sockets.
    """

    def __init__(self, tmp: Path, **device_args: object) -> None:
        self.uds = tmp / "v.sock"
        self.host = UnixVsockHost(self.uds)
        self.device = Vsock(GUEST_CID, self.host, **device_args)  # type: ignore[arg-type]
        self.rig = MmioTestRig(self.device)
        bus = self.rig.bus
        inner = bus.wait_interrupt

        def wait_interrupt(timeout: float | None) -> bool:
            poll_devices([self.device], min(timeout or 0.01, 0.01))
            return inner(0)

        bus.wait_interrupt = wait_interrupt  # type: ignore[method-assign]
        self._driver: VsockDriver | None = None

    @property
    def driver(self) -> VsockDriver:
        if self._driver is None:
            self._driver = VsockDriver(self.rig.driver, timeout=10.0)
        return self._driver

    def pump(self, seconds: float = 0.05) -> None:
        """Serve host fds and driver completions for ``seconds``."""
        import time

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.driver.poll()
            poll_devices([self.device], 0.005)

    def close(self) -> None:
        self.device.close()


def listen_unix(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    sock.listen(64)
    return sock


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a daemon thread; the list gets its result or exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out
