"""Drive QEMU's own virtio-mmio devices from pyvirtio's drivers, over qtest.

QEMU's qtest protocol (docs/devel/qtest.rst) lets a test process read and
write guest-physical addresses and MMIO registers and watch interrupt lines
of a QEMU whose vCPU never runs guest code of ours.  This module turns that
into an :class:`~pyvirtio.driver.mmio.MmioBus`, so the same
:class:`~pyvirtio.driver.mmio.MmioDriverTransport` and device drivers that
run against pyvirtio's device models run against QEMU's ``virtio-blk-device``,
``virtio-rng-device``, ``virtio-net-device`` ...: a conformance check of the
drivers against an independent implementation.

* :class:`QtestMachine` starts ``qemu-system-x86_64 -M microvm`` with the
  devices given and a firmware that only halts (so nothing in the guest
  competes with our driver for the devices), connects to its qtest socket
  and offers ``readb``/``readw``/``readl``/``readq``, the ``write*``
  counterparts, ``memread``/``memwrite`` (base64, the fast form) and an
  interrupt-line tracker fed by qtest's asynchronous ``IRQ raise``/``IRQ
  lower`` lines (``irq_intercept_in`` on the IOAPIC, done at start).  Every
  wait is bounded; :meth:`QtestMachine.close` kills QEMU.
* Guest RAM is shared: by default QEMU maps a memfd this process created and
  passes on (``memory-backend-file`` on ``/proc/self/fd/N``); with
  ``memory="qemu-memfd"`` QEMU creates it and this process maps it through
  ``/proc/PID/fd``.  Either way :attr:`QtestMachine.mem` is an ordinary
  :class:`~pyvirtio.memory.GuestMemory` over the same pages, so rings and
  buffers are read and written directly and only register accesses and
  notifications cross the qtest socket.
* With ``qmp=True`` QEMU also serves QMP on a socket, and
  :meth:`QtestMachine.qmp` runs commands through QEMU's own Python library
  (``qemu.qmp``): how tests act as the host of a device (``balloon``,
  ``qom-set`` ...) while the driver works it over qtest.
* :class:`QtestBus` is the MMIO bus (with ``wait_interrupt``, blocking on
  a device's interrupt line), and :meth:`QtestMachine.find_devices` lists
  the virtio-mmio slots that hold a device, with their interrupt lines.

Layout of QEMU 7.2's microvm (probed, see the tests): virtio-mmio transports
at ``0xfeb00000 + 0x200 * slot``; devices are placed from the last slot
downwards in command-line order.  With the second IOAPIC (QEMU's default)
there are 24 slots on GSIs 24-47, wired to an IOAPIC without a fixed QOM
name (it sits in /machine/unattached) for qtest to intercept; this module
therefore starts the machine with
``ioapic2=off``, which gives 8 slots on GSIs 16-23 of the primary IOAPIC
(``irq_intercept_in ioapic``), so slot ``i`` interrupts on line ``16 + i``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pyvirtio.driver.memory import GuestAllocator
from pyvirtio.driver.mmio import MmioDriverError, MmioDriverTransport
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.mmio import MAGIC_VALUE, Reg

__all__ = [
    "MICROVM_IRQ_BASE",
    "MICROVM_MMIO_BASE",
    "MICROVM_MMIO_SLOTS",
    "MICROVM_MMIO_STRIDE",
    "IrqTracker",
    "QtestBus",
    "QtestError",
    "QtestMachine",
    "VirtioMmioSlot",
    "qemu_binary",
]

#: First virtio-mmio window of QEMU's microvm, and the distance between windows.
MICROVM_MMIO_BASE = 0xFEB0_0000
MICROVM_MMIO_STRIDE = 0x200
#: Slots and first GSI with ``ioapic2=off`` (and ACPI on, microvm's default).
MICROVM_MMIO_SLOTS = 8
MICROVM_IRQ_BASE = 16
#: Guest-physical RAM below this is left to the machine: the BIOS ROM is
#: mapped over 0xe0000-0xfffff, so QEMU would not see our bytes there.
_LOW_RESERVED = 1 << 20
#: Largest RAM size that microvm maps in one piece at guest-physical 0.
_MAX_MEMORY = 2 << 30
_READ_CMDS = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}
_WRITE_CMDS = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}
#: Bytes per b64read/b64write command: QEMU buffers whole lines.
_B64_CHUNK = 1 << 20


#: The firmware the vCPU runs: 64 KiB of HLT with ``cli; hlt; jmp .-1`` at the
#: reset vector (offset 0xfff0 of a ROM that ends at 4 GiB).  QEMU's own
#: microvm firmware (SeaBIOS) would probe and drive the virtio devices and
#: then reboot; stopping the vCPU with -S instead would stop devices that
#: only work in a running VM (virtio-rng delivers nothing while stopped).
_HALT_FIRMWARE = bytes([0xF4]) * 0xFFF0 + bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes([0xF4]) * 12


def _die_with_parent() -> list[str]:
    """A command prefix that gives QEMU SIGKILL when the thread that started it dies.

    QEMU keeps running when its qtest peer disappears, so a test process
    killed before :meth:`QtestMachine.close` would leave it behind.
    util-linux's ``setpriv --pdeathsig`` sets that up and execs QEMU (a
    ``preexec_fn`` would do the same but is unsafe in threaded programs).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64``, or None when it is not installed."""
    return shutil.which("qemu-system-x86_64")


class QtestError(MmioDriverError):
    """QEMU refused a command, did not answer in time, or is gone (with its stderr tail)."""


class VirtioMmioSlot(NamedTuple):
    """A virtio-mmio window holding a device: where, what, and its interrupt line."""

    base: int
    device_id: int
    irq: int


class IrqTracker:
    """Interrupt-line levels as reported by qtest's ``IRQ raise/lower N`` lines.

    qtest reports only changes of level; virtio-mmio's line is level
    triggered (high while InterruptStatus is non-zero), so the level is
    what a waiter checks, and ``raised[n]`` counts rising edges for tests.
    """

    def __init__(self) -> None:
        self.levels: dict[int, bool] = {}
        self.raised: dict[int, int] = {}

    def update(self, line: str) -> None:
        """Apply one ``IRQ raise N`` / ``IRQ lower N`` line."""
        _, what, num = line.split()
        n = int(num, 0)
        high = what == "raise"
        if high and not self.levels.get(n, False):
            self.raised[n] = self.raised.get(n, 0) + 1
        self.levels[n] = high

    def is_high(self, lines: Sequence[int] | None = None) -> bool:
        """Whether any of ``lines`` (any line when None) is high."""
        if lines is None:
            return any(self.levels.values())
        return any(self.levels.get(n, False) for n in lines)


class QtestMachine:
    """A QEMU microvm under qtest, with shared guest RAM and intercepted IRQs.

    * ``devices``: ``-device`` specifications, e.g.
      ``"virtio-blk-device,drive=d0,serial=pyvirtio"``.
    * ``args``: further command-line arguments (``-blockdev``, ``-netdev``, ...).
    * ``memory_size``: guest RAM in bytes (at guest-physical 0, at most 2 GiB).
    * ``memory``: ``"inherit"`` (default) passes a memfd of ours to QEMU;
      ``"qemu-memfd"`` lets QEMU create it and maps it through ``/proc``.
    * ``timeout``: bound of every wait (start-up, each command's answer).
    * ``qmp``: also serve QMP, for :meth:`qmp` (needs the ``qemu.qmp`` package).

    :attr:`mem` is the shared RAM and :attr:`allocator` hands out the part of
    it above 1 MiB.  Commands are serialised by a lock, so several drivers
    (threads) may share one machine.  QEMU is killed if the thread that
    created the machine dies without closing it (``setpriv --pdeathsig``).
    """

    def __init__(
        self,
        devices: Sequence[str] = (),
        *,
        args: Sequence[str] = (),
        memory_size: int = 64 << 20,
        memory: Literal["inherit", "qemu-memfd"] = "inherit",
        timeout: float = 10.0,
        qemu: str | None = None,
        qmp: bool = False,
    ) -> None:
        if not _LOW_RESERVED < memory_size <= _MAX_MEMORY or memory_size % 4096:
            raise ValueError(f"memory_size {memory_size:#x} must be page-aligned, 1 MiB..2 GiB")
        binary = qemu or qemu_binary()
        if binary is None:
            raise QtestError("qemu-system-x86_64 is not installed")
        self.timeout = timeout
        self.memory_size = memory_size
        self.irqs = IrqTracker()
        self._lock = threading.RLock()
        self._buf = bytearray()
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._dir = tempfile.TemporaryDirectory(prefix="pyvirtio-qtest-")
        self._stderr_path = Path(self._dir.name) / "stderr"
        self._qmp_path = Path(self._dir.name) / "qmp.sock" if qmp else None
        self._qmp_loop: asyncio.AbstractEventLoop | None = None
        self._qmp_client: Any = None
        self.mem = GuestMemory()
        try:
            self._start(binary, devices, args, memory)
            # The first answer also means QEMU finished creating its objects
            # (the qtest socket connects before the memory backend exists).
            self._command("irq_intercept_in ioapic")
            if memory == "qemu-memfd":
                self._map_qemu_memfd()
            self.allocator = GuestAllocator(self.mem, _LOW_RESERVED, memory_size - _LOW_RESERVED)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"QtestMachine(pid={pid}, memory_size={self.memory_size:#x})"

    # -- start and stop ------------------------------------------------------------

    def _start(
        self,
        binary: str,
        devices: Sequence[str],
        args: Sequence[str],
        memory: Literal["inherit", "qemu-memfd"],
    ) -> None:
        size = self.memory_size
        qtest_path = Path(self._dir.name) / "qtest.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        pass_fds: tuple[int, ...] = ()
        try:
            listener.bind(str(qtest_path))
            listener.listen(1)
            if memory == "inherit":
                region = self.mem.add_memfd(0, size, name="pyvirtio-qtest-ram")
                assert region.fd is not None
                backend = (
                    f"memory-backend-file,id=pyvirtio-ram,size={size},"
                    f"mem-path=/proc/self/fd/{region.fd},share=on"
                )
                pass_fds = (region.fd,)
            elif memory == "qemu-memfd":
                backend = f"memory-backend-memfd,id=pyvirtio-ram,size={size},share=on"
            else:
                raise ValueError(f"unknown memory sharing {memory!r}")
            firmware = Path(self._dir.name) / "halt.bin"
            firmware.write_bytes(_HALT_FIRMWARE)
            cmd = [
                *_die_with_parent(),
                binary,
                "-M",
                "microvm,x-option-roms=off,isa-serial=off,rtc=off,pit=off,pic=off,ioapic2=off,"
                "memory-backend=pyvirtio-ram",
                # Debian's QEMU has no qtest accelerator, so the vCPU exists;
                # it runs a firmware that only halts (see _HALT_FIRMWARE).
                "-accel",
                "tcg",
                "-bios",
                str(firmware),
                "-qtest",
                f"unix:{qtest_path}",
                "-qtest-log",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-m",
                f"{size}B",  # a bare number would be MiB
                "-object",
                backend,
                *args,
            ]
            if self._qmp_path is not None:
                cmd += ["-qmp", f"unix:{self._qmp_path},server=on,wait=off"]
            for device in devices:
                cmd += ["-device", device]
            with open(self._stderr_path, "wb") as stderr:
                self._process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    pass_fds=pass_fds,
                )
            self._sock = self._accept(listener)
        finally:
            listener.close()

    def _accept(self, listener: socket.socket) -> socket.socket:
        """QEMU connects to our socket during its start-up; wait for that, or its death."""
        deadline = time.monotonic() + self.timeout
        listener.settimeout(0.05)
        while True:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                if self._process is not None and self._process.poll() is not None:
                    raise self._error("QEMU exited during start-up") from None
                if time.monotonic() > deadline:
                    raise self._error(
                        f"QEMU did not connect to qtest within {self.timeout} s"
                    ) from None
                continue
            sock.setblocking(True)
            return sock

    def _map_qemu_memfd(self) -> None:
        """Map QEMU's guest-RAM memfd through /proc/PID/fd (memory="qemu-memfd")."""
        assert self._process is not None
        fd_dir = Path(f"/proc/{self._process.pid}/fd")
        candidates: list[Path] = []
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(entry).startswith("/memfd:memory-backend-memfd"):
                    candidates.append(entry)
        for entry in candidates:
            fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(fd).st_size == self.memory_size:
                self.mem.add_fd(0, self.memory_size, fd, take_ownership=True)
                return
            os.close(fd)
        raise self._error("cannot find QEMU's guest-RAM memfd in /proc")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def stderr(self) -> str:
        """What QEMU printed so far."""
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _error(self, message: str) -> QtestError:
        tail = self.stderr.strip()[-2000:]
        return QtestError(f"{message}" + (f"; QEMU said: {tail}" if tail else ""))

    def close(self) -> None:
        """Kill QEMU and release the socket, the shared memory and the temp directory."""
        if self._closed:
            return
        self._closed = True
        self._close_qmp()
        if self._sock is not None:
            self._sock.close()
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a QEMU stuck in the kernel
                process.wait(self.timeout)
        self.mem.close()
        self._dir.cleanup()

    def __enter__(self) -> QtestMachine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the protocol --------------------------------------------------------------------

    def _readline(self, deadline: float) -> str:
        """One line from QEMU, waiting until ``deadline`` at most."""
        sock = self._sock
        assert sock is not None
        buf = self._buf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                return line.decode("ascii", "replace")
            # A deadline already past still takes what the socket holds.
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([sock], [], [], remaining)
            if not ready:
                raise TimeoutError
            try:
                chunk = sock.recv(1 << 16)
            except OSError as exc:
                raise self._error(f"qtest connection failed: {exc}") from exc
            if not chunk:
                raise self._error("QEMU closed the qtest connection")
            buf += chunk

    def _command(self, line: str) -> str:
        """Send one command and return its answer after ``OK`` (raise on ``FAIL``)."""
        with self._lock:
            if self._closed or self._sock is None:
                raise QtestError("the qtest machine is closed")
            try:
                self._sock.sendall(line.encode("ascii") + b"\n")
            except OSError as exc:
                raise self._error(f"cannot send {line[:60]!r} to QEMU: {exc}") from exc
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    reply = self._readline(deadline)
                except TimeoutError:
                    raise self._error(
                        f"no answer to {line[:60]!r} within {self.timeout} s"
                    ) from None
                if reply.startswith("IRQ "):
                    self.irqs.update(reply)
                    continue
                if reply == "OK" or reply.startswith("OK "):
                    return reply[3:]
                raise self._error(f"QEMU answered {reply!r} to {line[:60]!r}")

    def command(self, line: str) -> str:
        """Any qtest command (e.g. ``clock_step``); returns what follows ``OK``.

        QEMU aborts on malformed arguments (its parser asserts), so callers
        build lines carefully.
        """
        return self._command(line)

    def read_mmio(self, addr: int, size: int) -> int:
        """A little-endian load of 1, 2, 4 or 8 bytes at guest-physical ``addr``."""
        return int(self._command(f"{_READ_CMDS[size]} {addr:#x}"), 16)

    def write_mmio(self, addr: int, size: int, value: int) -> None:
        """A little-endian store of 1, 2, 4 or 8 bytes at guest-physical ``addr``."""
        mask = (1 << (8 * size)) - 1
        self._command(f"{_WRITE_CMDS[size]} {addr:#x} {value & mask:#x}")

    def readb(self, addr: int) -> int:
        return self.read_mmio(addr, 1)

    def readw(self, addr: int) -> int:
        return self.read_mmio(addr, 2)

    def readl(self, addr: int) -> int:
        return self.read_mmio(addr, 4)

    def readq(self, addr: int) -> int:
        return self.read_mmio(addr, 8)

    def writeb(self, addr: int, value: int) -> None:
        self.write_mmio(addr, 1, value)

    def writew(self, addr: int, value: int) -> None:
        self.write_mmio(addr, 2, value)

    def writel(self, addr: int, value: int) -> None:
        self.write_mmio(addr, 4, value)

    def writeq(self, addr: int, value: int) -> None:
        self.write_mmio(addr, 8, value)

    def memread(self, addr: int, length: int) -> bytes:
        """``length`` bytes at ``addr`` as QEMU sees them (b64read, in chunks)."""
        out = bytearray()
        while len(out) < length:
            n = min(_B64_CHUNK, length - len(out))
            data = base64.b64decode(self._command(f"b64read {addr + len(out):#x} {n:#x}"))
            if len(data) != n:
                raise QtestError(f"b64read of {n} bytes returned {len(data)}")
            out += data
        return bytes(out)

    def memwrite(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``addr`` through QEMU (b64write, in chunks)."""
        src = memoryview(data).cast("B")
        for pos in range(0, len(src), _B64_CHUNK):
            piece = src[pos : pos + _B64_CHUNK]
            encoded = base64.b64encode(piece).decode("ascii")
            self._command(f"b64write {addr + pos:#x} {len(piece):#x} {encoded}")

    def memset(self, addr: int, length: int, value: int) -> None:
        self._command(f"memset {addr:#x} {length:#x} {value & 0xFF:#x}")

    # -- QMP ----------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command (``qmp=True`` machines) and return its result.

        Raises :class:`QtestError` when QEMU answers with an error or does
        not answer within the machine's timeout.
        """
        if self._qmp_path is None:
            raise QtestError("this machine was started without qmp=True")
        if self._closed:
            raise QtestError("the qtest machine is closed")
        try:
            from qemu.qmp import QMPClient, QMPError
        except ImportError as exc:  # pragma: no cover - a dev extra
            raise QtestError("QMP needs the qemu.qmp package (pip install qemu.qmp)") from exc
        with self._lock:
            if self._qmp_loop is None:
                self._qmp_loop = asyncio.new_event_loop()
                client = QMPClient("pyvirtio-qtest")
                try:
                    self._qmp_loop.run_until_complete(
                        asyncio.wait_for(client.connect(str(self._qmp_path)), self.timeout)
                    )
                except (QMPError, OSError, TimeoutError) as exc:
                    raise self._error(f"cannot connect to QMP: {exc}") from exc
                self._qmp_client = client
            try:
                return self._qmp_loop.run_until_complete(
                    asyncio.wait_for(
                        self._qmp_client.execute(command, arguments or None), self.timeout
                    )
                )
            except (QMPError, OSError, TimeoutError) as exc:
                raise self._error(f"QMP {command} failed: {exc}") from exc

    def _close_qmp(self) -> None:
        loop, client = self._qmp_loop, self._qmp_client
        self._qmp_loop = self._qmp_client = None
        if loop is None:
            return
        if client is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(client.disconnect(), self.timeout))
        loop.close()

    # -- interrupts ---------------------------------------------------------------------

    def poll_irqs(self) -> None:
        """Take in any ``IRQ`` lines QEMU sent while no command was running."""
        with self._lock:
            self._drain_async(time.monotonic())

    def _drain_async(self, deadline: float) -> bool:
        """Read asynchronous lines until ``deadline``; whether any arrived."""
        got = False
        while True:
            try:
                line = self._readline(deadline)
            except TimeoutError:
                return got
            if line.startswith("IRQ "):
                self.irqs.update(line)
                got = True
            else:
                raise self._error(f"unexpected line from QEMU: {line!r}")
            if got:
                deadline = time.monotonic()  # take what is buffered, then return

    def wait_irq(self, lines: Sequence[int] | None = None, timeout: float | None = None) -> bool:
        """Wait until one of ``lines`` (any line when None) is high; False on timeout.

        ``timeout=None`` waits at most the machine's ``timeout``.
        """
        limit = self.timeout if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + limit
        with self._lock:
            self._drain_async(time.monotonic())
            while not self.irqs.is_high(lines):
                if time.monotonic() >= deadline:
                    return False
                self._drain_async(deadline)
            return True

    # -- devices --------------------------------------------------------------------------

    def slot_base(self, slot: int) -> int:
        return MICROVM_MMIO_BASE + slot * MICROVM_MMIO_STRIDE

    def find_devices(self, *, include_empty: bool = False) -> list[VirtioMmioSlot]:
        """The virtio-mmio slots holding a device (DeviceID != 0), lowest address first."""
        found: list[VirtioMmioSlot] = []
        for slot in range(MICROVM_MMIO_SLOTS):
            base = self.slot_base(slot)
            if self.readl(base + Reg.MAGIC_VALUE) != MAGIC_VALUE:
                continue
            device_id = self.readl(base + Reg.DEVICE_ID)
            if device_id or include_empty:
                found.append(VirtioMmioSlot(base, device_id, MICROVM_IRQ_BASE + slot))
        return found

    def bus(self, irq: int | None = None) -> QtestBus:
        """A bus over this machine whose ``wait_interrupt`` watches ``irq`` (None: any)."""
        return QtestBus(self, irq)

    def transport(self, slot: VirtioMmioSlot) -> MmioDriverTransport:
        """A driver transport for the device in ``slot`` (from :meth:`find_devices`).

        Its rings and buffers come from :attr:`allocator`, in the shared RAM;
        it waits for interrupts on the slot's own line.
        """
        return MmioDriverTransport(
            self.bus(slot.irq), slot.base, self.mem, self.allocator, device_id=slot.device_id
        )


class QtestBus:
    """:class:`~pyvirtio.driver.mmio.MmioBus` over a :class:`QtestMachine`.

    ``irq`` is the line of the device the driver talks to; ``wait_interrupt``
    blocks until it is high (any line when None), bounded by ``timeout``.
    """

    def __init__(self, machine: QtestMachine, irq: int | None = None) -> None:
        self.machine = machine
        self.irq = irq
        self._lines: tuple[int, ...] | None = None if irq is None else (irq,)

    def read(self, addr: int, size: int) -> int:
        return self.machine.read_mmio(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self.machine.write_mmio(addr, size, value)

    def wait_interrupt(self, timeout: float | None) -> bool:
        return self.machine.wait_irq(self._lines, timeout)
