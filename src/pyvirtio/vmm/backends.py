"""Run ``pyvirtio serve`` back ends as child processes, with bounded waits.

The demo, the real-guest tests and the boot benchmark start each device the
way a user would, as its own ``pyvirtio serve`` process, and stop it with
SIGTERM (the clean-shutdown path) when done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BackendError", "ServedDevice"]


class BackendError(Exception):
    """A back end did not start, or did not stop cleanly."""


class ServedDevice:
    """``pyvirtio serve <device> --socket PATH ...`` as a context manager."""

    def __init__(
        self,
        device: str,
        socket_path: Path,
        args: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        start_timeout: float = 15.0,
        log_level: str = "info",
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        self.args = list(args)
        self.log_path = log_path or socket_path.with_suffix(".log")
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "pyvirtio", "--log-level", self.log_level,
            "serve", self.device, "--socket", str(self.socket_path), *self.args,
        ]  # fmt: skip

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> ServedDevice:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None:
                raise BackendError(
                    f"pyvirtio serve {self.device} exited ({self.proc.returncode}): {self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"pyvirtio serve {self.device}: no socket after "
                                   f"{self.start_timeout:.0f}s: {self.log()}")  # fmt: skip
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not stop in time. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return self.returncode or 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.returncode = proc.returncode
                self.proc = None
                raise BackendError(
                    f"pyvirtio serve {self.device} ignored SIGTERM for {timeout:.0f}s"
                ) from None
        self.returncode = proc.returncode
        self.proc = None
        return self.returncode

    def __enter__(self) -> ServedDevice:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGKILL)
