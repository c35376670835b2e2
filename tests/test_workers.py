"""IoWorkers: the host's worker threads for blocking I/O."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers.vhost_user import wait_until
from pyvirtio.workers import HOST_SIGNALS, IoWorkers, Outcome


def test_calls_run_on_the_workers_and_report_to_their_queue() -> None:
    with IoWorkers(3, name="t") as workers:
        done: queue.SimpleQueue[Outcome[tuple[int, str]]] = queue.SimpleQueue()
        for i in range(20):
            workers.submit(lambda n: (n * n, threading.current_thread().name), (i,), done, i)
        outcomes = [done.get(timeout=10) for _ in range(20)]
        assert workers.submitted == 20
    assert sorted(o.tag for o in outcomes) == list(range(20))  # type: ignore[type-var]
    for outcome in outcomes:
        assert outcome.error is None and outcome.value is not None
        square, thread = outcome.value
        assert square == outcome.tag * outcome.tag  # type: ignore[operator]
        assert thread.startswith("t-") and thread != threading.current_thread().name
    assert done.empty()


def test_an_exception_is_an_outcome_not_a_dead_worker() -> None:
    def fail() -> None:
        raise OSError(5, "boom")

    with IoWorkers(1) as workers:
        done: queue.SimpleQueue[Outcome[object]] = queue.SimpleQueue()
        workers.submit(fail, (), done, "a")
        workers.submit(lambda: 42, (), done, "b")
        first, second = done.get(timeout=10), done.get(timeout=10)
    assert first.tag == "a" and isinstance(first.error, OSError) and first.value is None
    assert second.tag == "b" and second.value == 42 and second.error is None


def test_close_finishes_submitted_calls_and_stops_threads() -> None:
    gate = threading.Event()
    workers = IoWorkers(2, name="closing")
    done: queue.SimpleQueue[Outcome[bool]] = queue.SimpleQueue()
    for i in range(4):
        workers.submit(gate.wait, (10,), done, i)
    gate.set()
    workers.close()
    assert done.qsize() == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("closing-")]
    workers.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        workers.submit(bool, (), done, None)


def test_thread_count_validated() -> None:
    with pytest.raises(ValueError, match="threads"):
        IoWorkers(0)


def test_workers_block_the_host_signals_and_leave_the_creator_s_mask_alone() -> None:
    # Python runs handlers in the main thread only: a SIGTERM the kernel gave
    # a worker would not wake a main thread asleep in epoll_wait.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    masks: queue.SimpleQueue[Outcome[set[signal.Signals]]] = queue.SimpleQueue()
    with IoWorkers(2, name="masked") as workers:
        for i in range(2):
            workers.submit(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, []), (), masks, i)
        for _ in range(2):
            outcome = masks.get(timeout=10)
            assert outcome.value is not None and outcome.value >= HOST_SIGNALS
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert not before >= HOST_SIGNALS


def test_sigterm_stops_serve_with_io_threads_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    command = [sys.executable, "-m", "pyvirtio", "serve", "blk", "--socket", str(sock)]
    command += ["--file", str(image), "--io-threads", "4"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        wait_until(sock.exists, 20)
        # Whichever thread the kernel would pick, only the main thread may take it.
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            if int(task.name) != process.pid:
                status = (task / "status").read_text()
                blocked = int(status.split("SigBlk:")[1].split()[0], 16)
                assert blocked & (1 << (signal.SIGTERM - 1)), task.name
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()
