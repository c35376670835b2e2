"""virtio-net receive buffers: placing one frame into the chains of a receiveq.

device-types/net: Setting Up Receive Buffers and Processing of Incoming
Packets.  Without VIRTIO_NET_F_MRG_RXBUF a frame takes one chain, which must
hold it whole (else the frame is dropped and the chain kept for the next
one).  With it, chains are taken until they hold the frame, every one but
the last filled completely, and ``num_buffers`` says how many.  Chains taken
while the queue runs dry wait in :attr:`RxBuffers.stash` for the next try,
so a frame never waits half placed in the ring.  A chain unfit for receiving
(device-readable parts, no room for the header) is returned empty and
reported.  Sans-IO: the model owns the queues and the counters.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from pyvirtio.devices.net.frames import Dropped, GuestViews
from pyvirtio.devices.net.wire import HDR_SIZE
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue

__all__ = ["Completions", "RxBuffers"]

#: Chains to return to one queue, with the bytes written to each.
Completions = list[tuple[DescriptorChain, int]]

_U16: Final = struct.Struct("<H")
#: ``num_buffers`` in struct virtio_net_hdr.
_NUM_BUFFERS: Final = 10


class RxBuffers:
    """The receive chains of one receiveq taken for the pending frame, and how it is placed.

    ``views`` gives one-buffer targets without the general path;
    ``report`` is told of every unusable chain (counted and logged by the
    model; the chain itself goes back empty).
    """

    __slots__ = ("_report", "_views", "stash")

    def __init__(self, views: GuestViews, report: Callable[[Dropped], None]) -> None:
        self._views = views
        self._report = report
        #: Chains taken for a frame they did not hold yet (MRG_RXBUF), oldest first.
        self.stash: list[DescriptorChain] = []

    def has_buffer(self, queue: DeviceQueue) -> bool:
        """Whether a chain waits (asking to be notified when none does)."""
        return bool(self.stash) or queue.has_available() or queue.enable_notifications()

    def take_stash(self) -> list[DescriptorChain]:
        """The stashed chains, handed back (sleep: they return unused)."""
        chains, self.stash = self.stash, []
        return chains

    def place(
        self, queue: DeviceQueue, frame: memoryview, mergeable: bool, done: Completions
    ) -> bool:
        """Put ``frame`` (header included, writable) into chains, appended to ``done``.

        False when the chains ran out first (the frame waits; chains taken
        stay in the stash).  Raises :class:`Dropped` when the frame can never
        fit: one chain too small without MRG_RXBUF (kept for the next
        frame), or more than the whole queue with it (chains holding every
        descriptor of the queue).
        """
        stash = self.stash
        n = len(frame)
        if not stash:
            # The common case: the next chain holds the whole frame.
            chain = self._pop(queue, done)
            if chain is None:
                return False
            if chain.writable_len >= n:
                _U16.pack_into(frame, _NUM_BUFFERS, 1)
                done.append((chain, self._fill(chain, frame)))
                return True
            stash.append(chain)
        if not mergeable:
            chain = stash[0]
            if chain.writable_len < n:
                raise Dropped(
                    "rx_dropped_no_room",
                    "%d-byte frame does not fit a %d-byte receive buffer (no MRG_RXBUF)",
                    n,
                    chain.writable_len,
                )
            _U16.pack_into(frame, _NUM_BUFFERS, 1)
            done.append((chain, self._fill(chain, frame)))
            stash.clear()
            return True
        capacity = sum(c.writable_len for c in stash)
        # Descriptors held, not chains: with chains of several descriptors
        # the driver runs out of descriptors before the stash has queue.size
        # chains, and the frame would wait for good.
        slots = sum(c.ring_slots for c in stash)
        while capacity < n:
            if slots >= queue.size:
                raise Dropped(
                    "rx_dropped_no_room", "%d-byte frame does not fit the whole receive queue", n
                )
            chain = self._pop(queue, done)
            if chain is None:
                return False
            stash.append(chain)
            capacity += chain.writable_len
            slots += chain.ring_slots
        count = 0
        remaining = n
        while remaining > 0:
            remaining -= stash[count].writable_len
            count += 1
        _U16.pack_into(frame, _NUM_BUFFERS, count)
        pos = 0
        for chain in stash[:count]:
            take = min(chain.writable_len, n - pos)
            self._fill(chain, frame[pos : pos + take])
            done.append((chain, take))
            pos += take
        del stash[:count]
        return True

    def _pop(self, queue: DeviceQueue, done: Completions) -> DescriptorChain | None:
        """The next usable receive chain; unusable ones are returned empty and reported."""
        retried = False
        while True:
            chain = queue.pop()
            if chain is None:
                # Ask to be notified; buffers may have come in meanwhile.
                if retried or not queue.enable_notifications():
                    return None
                retried = True
                continue
            if chain.readable or chain.writable_len < HDR_SIZE:
                self._report(
                    Dropped(
                        "rx_bad_chain",
                        "receive chain with %d readable and %d writable bytes",
                        chain.readable_len,
                        chain.writable_len,
                    )
                )
                done.append((chain, 0))
                continue
            return chain

    def _fill(self, chain: DescriptorChain, data: memoryview) -> int:
        """Copy ``data`` to the start of the chain's writable part; returns its length."""
        writable = chain.writable
        if len(writable) == 1:
            target = self._views.view(chain.mem, writable[0][0], len(data))
            if target is not None:
                target[:] = data
                return len(data)
        return chain.write(data)
