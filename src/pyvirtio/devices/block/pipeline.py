"""virtio-blk pipelined serving: one ``queue_notify`` served from several threads.

With ``io_workers`` (:class:`~pyvirtio.workers.IoWorkers`, threads the host
owns: ``pyvirtio serve blk --io-threads N``), when the ring's thread takes a
large read or write while more requests wait, workers are called in as extra
consumers.  Each consumer takes a request, carries it out and completes it
on its own (no request is handed between threads); the ring, its used
entries, the status bytes, the parser and the statistics are touched only
under the device's ring lock; the copies run outside it and in parallel.
While requests wait in the ring a few completions share one interrupt; once
it is empty every completion is signalled at once (the driver is waiting).
In writethrough mode each write is synced on its own, before its completion.
:meth:`Pipeline.run` returns only when nothing is in flight, so the device
lifecycle holds unchanged.  Requests in flight together have no order
between them (the driver's concern: device-types/blk gives none); a FLUSH
covers the writes completed before it, which are the only ones a driver can
have seen.
"""

from __future__ import annotations

import logging
import queue as _queue
from typing import TYPE_CHECKING, Final

from pyvirtio.devices.block.request import TRANSFERS, Request, Served
from pyvirtio.devices.block.wire import Status
from pyvirtio.virtqueue.common import DeviceQueue, VirtqueueError
from pyvirtio.workers import IoWorkers, Outcome

if TYPE_CHECKING:
    from pyvirtio.devices.block.device import Block

__all__ = ["SIGNAL_BATCH", "Pipeline"]

log = logging.getLogger(__name__)

#: Completions that may share one interrupt while requests wait in the ring.
SIGNAL_BATCH: Final = 4
#: Tag of the event a helper sends the idle ring thread: requests wait again.
_CALL_BACK: Final = object()


class Pipeline:
    """One pipelined ``queue_notify`` of ``device``'s queue ``index``.

    Every consumer (the ring's thread and each helper) runs :meth:`consume`.
    Helpers are called in only while a large transfer is being taken and
    more requests wait: a lone request is served by the ring's thread alone.
    When that thread finds the ring empty while helpers still serve, it waits
    for them, and a helper that takes a large transfer while more requests
    wait calls it back: the driver refills the ring while a helper copies,
    and the ring's thread must not idle then.
    """

    def __init__(self, device: Block, index: int, queue: DeviceQueue, workers: IoWorkers) -> None:
        resources = device._resources
        assert resources is not None  # only an active device serves its rings
        self.device = device
        self.index = index
        self.queue = queue
        self.interrupt = resources.interrupt
        self.workers = workers
        #: Helpers' outcomes, and calls back (tag _CALL_BACK) for the ring's thread.
        self.events: _queue.SimpleQueue[Outcome[None]] = _queue.SimpleQueue()
        #: Completions published and not yet signalled (under the ring lock).
        self.unsignalled = 0
        #: Helpers serving now (a helper that found the ring empty is done).
        self.helpers = 0
        #: The ring's thread found the ring empty and waits for the helpers.
        self.idle = False
        #: Helpers called in whose outcome has not come yet (ring's thread only).
        self._outcomes_due = 0
        #: The first error a helper raised (a broken ring).
        self._error: BaseException | None = None

    def run(self) -> None:
        """Serve until the ring is empty and every helper has stopped."""
        queue = self.queue
        # No kicks while consumers take requests anyway: the driver saves
        # the syscalls, the host the wake-ups (split-ring.tex and
        # packed-ring.tex, "Notification Suppression").
        queue.disable_notifications()
        try:
            while True:
                try:
                    self.consume(ring_thread=True)
                except BaseException:
                    # Helpers write guest memory: wait for them even when
                    # this consumer found the ring broken.
                    self._wait_helpers(call_back=False)
                    raise
                if self._wait_helpers(call_back=self._error is None):
                    continue
                if self._error is not None:
                    raise self._error  # a helper found the ring broken
                if not queue.enable_notifications():
                    return
                queue.disable_notifications()  # buffers came after the last look
        finally:
            if self.unsignalled:
                self.device.signal_used(self.index)
            if not queue.broken:
                queue.enable_notifications()

    def _call_helpers(self) -> None:
        """Call idle workers in while requests wait (under the ring lock, ring's thread)."""
        workers = self.workers
        while self.helpers < workers.threads and self.queue.has_available():
            workers.submit(self.consume, (False,), self.events, None)
            self.helpers += 1
            self._outcomes_due += 1

    def _wait_helpers(self, call_back: bool) -> bool:
        """Wait until every helper stopped; True if called back (if ``call_back``) first."""
        events = self.events
        while self._outcomes_due:
            event = events.get()
            if event.tag is _CALL_BACK:
                if call_back and self._error is None:
                    return True
                continue
            self._outcomes_due -= 1
            if event.error is not None and self._error is None:
                self._error = event.error
        return False

    def _publish(self, done: list[Served], ring_empty: bool) -> bool:
        """Publish ``done`` (under the ring lock); True if the driver is to be signalled now.

        While requests wait in the ring the consumers are busy anyway: a few
        completions share one interrupt.  Once it is empty the driver is
        waiting for us: signal now.
        """
        queue = self.queue
        self.device._publish(queue, done, False)
        self.unsignalled += len(done)
        if self.unsignalled >= SIGNAL_BATCH or ring_empty:
            self.unsignalled = 0
            return queue.needs_notification()
        return False

    def consume(self, ring_thread: bool) -> None:
        """Take, serve and complete requests until the ring is empty.

        One critical section per request: take the next, publish what was
        served.  A read or write is carried out (and, in writethrough mode,
        synced) outside the lock; any other request, rare, inside it.  The
        ring's thread, while no helper serves, publishes up to
        ``SIGNAL_BATCH`` small requests at once (one used-index update);
        anything else publishes each request as it is served.  Before each
        large transfer the ring's thread calls helpers in; a helper calls the
        ring's thread back if it waits idle and more requests wait.
        """
        device = self.device
        lock = device._ring_lock
        queue = self.queue
        take = device._take
        carry_out = device._carry_out
        parallel_min = device._io_parallel_min
        done: list[Served] = []  # served, not yet published
        call_back = False
        while True:
            notify = False
            transfer: Request | None = None
            served: Served | None = None  # carried out now; synced before it is published
            with lock:
                try:
                    chain = queue.pop()
                except VirtqueueError:
                    if done:  # served before the ring broke: still theirs to see
                        notify = self._publish(done, ring_empty=False)
                    if notify:  # leave it to the caller's final signal
                        self.unsignalled = 1
                    raise
                if chain is None:
                    if done:
                        notify = self._publish(done, ring_empty=True)
                    if ring_thread:
                        self.idle = True
                    else:
                        self.helpers -= 1  # this helper is done
                else:
                    if done and (len(done) >= SIGNAL_BATCH or self.helpers or not ring_thread):
                        notify = self._publish(done, ring_empty=False)
                        done = []
                    taken = take(chain)
                    if isinstance(taken, Served):
                        done.append(taken)
                    elif taken.type not in TRANSFERS:
                        served = carry_out(chain, taken)
                    else:
                        transfer = taken
                        if taken.length >= parallel_min:
                            if done:  # not kept waiting behind a long copy
                                notify = self._publish(done, ring_empty=False) or notify
                                done = []
                            if ring_thread:
                                self._call_helpers()
                            elif self.idle and queue.has_available():
                                self.idle = False
                                call_back = True
            if notify:  # the system call outside the lock
                self.interrupt.signal_used_queue(self.index)
            if call_back:
                call_back = False
                self.events.put(Outcome(_CALL_BACK, None, None))
            if chain is None:
                return
            if transfer is not None:
                try:
                    served = carry_out(chain, transfer)
                except Exception as exc:  # not an OSError: still answer, keep serving
                    log.error("%s: request %d: transfer failed: %r", device.name, chain.head, exc)
                    # It may have written part of the data (and of the disk).
                    served = Served(chain, int(Status.IOERR), True, True)
            if served is not None:
                if served.modified and device._sync([served]):
                    served = served.failed(int(Status.IOERR))
                done.append(served)
