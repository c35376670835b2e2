"""A QEMU guest its host talks to while it runs: console lines in, lines to its console out.

:func:`pyvirtio.vmm.qemu.boot` runs a guest to its end; tests and
benchmarks that act on the host in the middle of a guest's run (kill a back
end at a moment the guest reports) need the console as it comes, and a way
to tell the guest to go on: the guest script reads a line from its console,
the host writes it to QEMU's stdin (``-serial stdio``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

from pyvirtio.vmm.guest import BOOT_MARKER, EXIT_MARKER
from pyvirtio.vmm.qemu import MicrovmConfig

__all__ = ["GuestTimeout", "LiveGuest"]


class GuestTimeout(AssertionError):
    """The guest did not print what was awaited in time."""


class LiveGuest:
    """Runs ``config`` under QEMU; ``wait_for`` console lines, ``send`` lines, ``wait_exit``."""

    def __init__(self, config: MicrovmConfig) -> None:
        self._cmd = config.command()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._text = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> LiveGuest:
        self._proc = subprocess.Popen(
            self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            with self._changed:
                if not data:
                    self._text += "\n<qemu exited>\n"
                    self._changed.notify_all()
                    return
                self._text += data.decode(errors="replace")
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._lock:
            return self._text

    def wait_for(self, marker: str, timeout: float) -> str:
        """Wait until ``marker`` is on the console; return the console so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while marker not in self._text:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or "<qemu exited>" in self._text:
                    tail = "\n".join(self._text.splitlines()[-25:])
                    raise GuestTimeout(f"no {marker!r} on the console in {timeout:.0f}s:\n{tail}")
                self._changed.wait(remaining)
            return self._text

    def booted(self, timeout: float) -> bool:
        """True once the guest's init started; False if it hung (TCG calibration)."""
        try:
            self.wait_for(BOOT_MARKER, timeout)
        except GuestTimeout:
            return False
        return True

    def send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def wait_exit(self, timeout: float) -> tuple[int | None, str]:
        """(the script's exit status, what it printed between the boot and exit markers)."""
        text = self.wait_for(EXIT_MARKER, timeout)
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        status: int | None = None
        inside: list[str] = []
        started = False
        for line in text.splitlines():
            if line.startswith(BOOT_MARKER):
                started = True
            elif line.startswith(EXIT_MARKER):
                with contextlib.suppress(ValueError, IndexError):
                    status = int(line.split()[1])
                break
            elif started:
                inside.append(line)
        return status, "\n".join(inside)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill QEMU if it still runs and release its pipes and the console reader."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
