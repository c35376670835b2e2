"""Worker threads for blocking host I/O, owned by a host and lent to devices.

Device models never start threads of their own (see ARCHITECTURE.md); a
host that wants a device's large transfers to overlap (``pyvirtio serve blk
--io-threads N``) makes an :class:`IoWorkers` and hands it to the device.
The device submits plain calls, each with the queue its outcome goes to, and
collects the outcomes before its own call returns, so nothing a worker runs
outlives the device call that started it.  What a call may touch is the
device's business: ``Block`` submits whole ring consumers that share the
ring under its lock.

The hand-over is two :class:`queue.SimpleQueue` operations (C code, no
Python-level locks or futures); :mod:`concurrent.futures` measured about
twice the CPU time per call.

Workers block the signals a host stops on (:data:`HOST_SIGNALS`): Python runs
signal handlers in the main thread only, so a SIGTERM the kernel handed to a
worker would leave a main thread asleep in ``epoll_wait`` unaware of it
(``pyvirtio serve --io-threads N`` then ignored SIGTERM until its next
event).  Blocked in the workers, the signal interrupts the main thread.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["HOST_SIGNALS", "IoWorkers", "Outcome"]

#: Signals worker threads block, so that the main thread receives them.
HOST_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})

T = TypeVar("T")


class Outcome(Generic[T]):
    """What a submitted call came to: its ``value``, or the ``error`` it raised."""

    __slots__ = ("error", "tag", "value")

    def __init__(self, tag: object, value: T | None, error: BaseException | None) -> None:
        self.tag = tag
        self.value = value
        self.error = error


_Job = tuple[Callable[..., Any], tuple[Any, ...], "queue.SimpleQueue[Outcome[Any]]", object]


class IoWorkers:
    """``threads`` daemon threads running submitted calls; a context manager.

    :meth:`submit` never blocks; the outcome of each call is put on the
    ``done`` queue given with it, tagged with ``tag``.  :meth:`close` lets
    the calls already submitted finish and stops the threads.
    """

    def __init__(self, threads: int, *, name: str = "pyvirtio-io") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.threads = threads
        #: Calls submitted so far (a statistic).
        self.submitted = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        # A thread starts with its creator's signal mask: block, start, restore.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, HOST_SIGNALS)
        try:
            for thread in self._threads:
                thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)

    def __repr__(self) -> str:
        return f"IoWorkers(threads={self.threads}, submitted={self.submitted})"

    def submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        done: queue.SimpleQueue[Outcome[T]],
        tag: object,
    ) -> None:
        """Run ``fn(*args)`` on a worker; its :class:`Outcome` goes to ``done``."""
        if self._closed:
            raise RuntimeError("IoWorkers is closed")
        self.submitted += 1
        self._jobs.put((fn, args, done, tag))

    def _run(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            fn, args, done, tag = job
            try:
                outcome: Outcome[Any] = Outcome(tag, fn(*args), None)
            except BaseException as exc:  # the submitter decides what it means
                outcome = Outcome(tag, None, exc)
            done.put(outcome)
            # Drop this job's references before waiting for the next: an idle
            # worker must not keep a ring (and through it the front end's
            # guest memory mapping and fd) alive after its device let go.
            del job, fn, args, done, tag, outcome

    def close(self) -> None:
        """Finish the calls submitted, then stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> IoWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
