"""A minimal host event loop over devices' host file descriptors.

Device models never wait: a model with host fds (net's TAP or socket) lists
them in :meth:`~pyvirtio.device.VirtioDevice.host_fds` and is called back
through :meth:`~pyvirtio.device.VirtioDevice.host_fd_ready`.  A host with an
event loop of its own (the vhost-user back end's epoll) polls those fds
itself; :func:`poll_devices` is the loop for hosts without one: tests,
benchmarks, a single-threaded in-process VMM whose driver waits by calling it.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterable

from pyvirtio.device import VirtioDevice

__all__ = ["poll_devices"]

#: Longest sleep when no device has an fd to wait on.
_IDLE_SLEEP = 0.001


def poll_devices(devices: Iterable[VirtioDevice], timeout: float = 0.0) -> int:
    """One step of the loop over the devices' :meth:`~VirtioDevice.host_fds`.

    Waits up to ``timeout`` seconds for any of them and hands each ready fd
    to its device; returns how many were ready.  With nothing to poll it
    sleeps at most a millisecond, since nothing can change until the caller
    acts.
    """
    poller = select.poll()
    owners: dict[int, VirtioDevice] = {}
    for device in devices:
        for fd, events in device.host_fds():
            poller.register(fd, events)
            owners[fd] = device
    if not owners:
        if timeout > 0:
            time.sleep(min(timeout, _IDLE_SLEEP))
        return 0
    ready = poller.poll(max(0, round(timeout * 1000)))
    for fd, events in ready:
        owners[fd].host_fd_ready(fd, events)
    return len(ready)
