"""A vhost-user-blk back end killed and restarted under a running Linux guest.

QEMU 7.2 reconnects (``-chardev socket,...,reconnect=1``).  When the back end
dies, GET_VRING_BASE fails and QEMU rewinds the ring's next available index
to the used index: right only if every request below the used index was
completed and none above.  pyvirtio completes out of order (I/O helper
threads, several queues), so a restart is only correct with inflight
tracking (vhost-user.rst "Inflight I/O tracking").

The out-of-order moment is made deterministic with ``serve blk``'s test hook
(vmm/fault_hooks.py): the first write to one sector is carried out but its
completion withheld; the guest then writes other sectors, which complete;
the back end is killed with one request unfinished below finished ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pyvirtio.vmm.backends import ServedDevice
from pyvirtio.vmm.fault_hooks import DELAY_TRANSFERS_ENV, HOLD_WRITE_ENV
from pyvirtio.vmm.guest import GuestArtifacts, initramfs_with_script
from pyvirtio.vmm.live_guest import LiveGuest
from pyvirtio.vmm.qemu import MicrovmConfig

DISK_MIB = 8
HELD_SECTOR = 2048  # the write the first back end never completes (4 KiB block 256)

# bounded NAME CMD...: run CMD in the background, wait up to 15 s, print
# "NAME ok", "NAME error" or "NAME hung" (a request nobody completes leaves
# its process in D state; the script must go on and tell).
BOUNDED = """
bounded() {
    name=$1; shift
    rm -f /tmp/$name.rc
    ( "$@" 2>/dev/null; echo $? > /tmp/$name.rc ) &
    i=0
    while [ ! -f /tmp/$name.rc ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
    if [ ! -f /tmp/$name.rc ]; then echo "$name hung"
    elif [ "$(cat /tmp/$name.rc)" = 0 ]; then echo "$name ok"
    else echo "$name error"; fi
}
"""

HOLD_SCRIPT = (
    BOUNDED
    + """
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
dd if=/dev/urandom of=/tmp/h bs=4096 count=1 2>/dev/null
echo "held-sum $(sha256sum /tmp/h | cut -d' ' -f1)"
rm -f /tmp/held.rc
( dd if=/tmp/h of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null; echo $? > /tmp/held.rc ) &
echo "held-submitted"
read -r go
# Later writes complete while the first one is held: out of order.
for n in 1 2 3 4; do
    dd if=/dev/urandom of=/tmp/s$n bs=4096 count=1 2>/dev/null
    dd if=/tmp/s$n of=/dev/vda bs=4096 seek=$((512 + n)) oflag=direct 2>/dev/null \
        || echo "small-$n error"
done
echo "small-done"
read -r go
i=0
while [ ! -f /tmp/held.rc ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -f /tmp/held.rc ]; then echo "held lost"
elif [ "$(cat /tmp/held.rc)" = 0 ]; then echo "held completed"
else echo "held error"; fi
# The ring still serves after the restart.
dd if=/dev/urandom of=/tmp/n bs=4096 count=1 2>/dev/null
bounded after-write dd if=/tmp/n of=/dev/vda bs=4096 seek=1024 oflag=direct
if [ "$(cat /tmp/after-write.rc 2>/dev/null)" = 0 ]; then
    bounded after-read dd if=/dev/vda of=/tmp/nb bs=4096 skip=1024 count=1 iflag=direct
    cmp -s /tmp/n /tmp/nb && echo "after-readback ok"
fi
for n in 1 2 3 4; do echo "small-sum $(sha256sum /tmp/s$n | cut -d' ' -f1)"; done
dmesg | grep -i -E "not a head|virtio|I/O error|blk_update|buffer" | sed 's/^/dmesg /'
"""
)


def _lines(output: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(key + " ")]


def kill(device: ServedDevice) -> None:
    """SIGKILL: no clean shutdown, no last word to the front end."""
    assert device.proc is not None
    device.proc.kill()
    device.proc.wait()
    device.proc = None


def run_held_write(
    guest: GuestArtifacts,
    accel: str,
    scratch: Path,
    serve_args: list[str],
    *,
    graceful: bool = False,
    packed: bool = False,
) -> tuple[str, bytes, str]:
    """Hold one write, complete four later ones, kill (``graceful``: SIGTERM), restart;
    (guest output, image, logs).  ``packed``: the device offers packed rings."""
    disk = scratch / "disk.raw"
    disk.write_bytes(bytes(DISK_MIB << 20))
    socket = scratch / "blk.sock"
    marker = scratch / "held"
    initrd = initramfs_with_script(guest, HOLD_SCRIPT, scratch)
    vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
    vm.add_vhost_user_blk(socket, reconnect=1, packed=packed)
    logs = ""
    for attempt in range(2):  # one retry for a boot that hangs (TCG clock calibration)
        marker.unlink(missing_ok=True)
        first = ServedDevice(
            "blk", socket, ["--file", str(disk), "--io-threads", "2", *serve_args],
            log_path=scratch / f"first{attempt}.log",
        )  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(HOLD_WRITE_ENV, f"{HELD_SECTOR}:{marker}")
            first.start()
        second = ServedDevice(
            "blk", socket, ["--file", str(disk), "--io-threads", "2", *serve_args],
            log_path=scratch / f"second{attempt}.log",
        )  # fmt: skip
        try:
            with LiveGuest(vm) as live:
                if not live.booted(timeout=60):
                    continue
                live.wait_for("held-submitted", 30)
                _wait_file(marker, 30, live)
                live.send("go")
                live.wait_for("small-done", 60)
                if graceful:
                    assert first.stop() == 0, first.log()
                else:
                    kill(first)
                second.start()
                live.send("go")
                _status, out = live.wait_exit(timeout=90)
                logs = first.log() + "\n--- restarted ---\n" + second.log()
                return out, disk.read_bytes(), logs
        finally:
            if first.proc is not None:
                kill(first)
            second.stop()
    pytest.fail("guest hung at boot twice")


def _wait_file(path: Path, timeout: float, live: LiveGuest) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the back end never held the write:\n{live.output[-2000:]}")
        time.sleep(0.05)


def test_restart_without_inflight_tracking_loses_the_unfinished_request(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    """The failure, shown: QEMU's rewind serves a finished request again and never the held one."""
    out, image, logs = run_held_write(guest, accel, scratch, ["--no-inflight"])
    # The write that was unfinished when the back end died is below the
    # used index: the restarted back end never serves it.  Above it, QEMU's
    # rewind hands the restarted back end a request the guest already got
    # back and freed (its indirect table is gone): served a second time, it
    # breaks the ring, and later I/O hangs.
    assert _lines(out, "held") == ["lost"], out + logs
    assert _lines(out, "after-write") in (["hung"], ["error"]), out + logs
    assert "after-readback ok" not in out, out + logs
    # The held write's data reached the image (it was carried out, only not completed).
    assert (
        hashlib.sha256(image[HELD_SECTOR * 512 : HELD_SECTOR * 512 + 4096]).hexdigest()
        == (_lines(out, "held-sum")[0])
    )


@pytest.mark.parametrize(
    ("graceful", "packed"),
    [(False, False), (True, False), (False, True)],
    ids=["sigkill", "sigterm", "sigkill-packed"],
)
def test_restart_with_inflight_tracking_resubmits_the_unfinished_request(
    guest: GuestArtifacts, accel: str, scratch: Path, graceful: bool, packed: bool
) -> None:
    """The fix: the restarted back end resubmits the held write first, completes it once.

    With SIGTERM the old process finishes what it can and exits; the write it
    could not finish (held) stays recorded for the new one.  With packed
    rings the region also says where the ring is: QEMU sends back a stale
    packed base after a crash."""
    out, image, logs = run_held_write(guest, accel, scratch, [], graceful=graceful, packed=packed)
    check_ring_format(logs, packed=packed, restarts=1)
    assert _lines(out, "held") == ["completed"], out + logs
    assert _lines(out, "after-write") == ["ok"], out + logs
    assert _lines(out, "after-read") == ["ok"], out + logs
    assert "after-readback ok" in out, out + logs
    assert "resubmitting 1 request(s) left in flight" in logs, logs
    assert not [line for line in out.splitlines() if "error" in line.lower()], out
    held = _lines(out, "held-sum")[0]
    assert hashlib.sha256(image[HELD_SECTOR * 512 : HELD_SECTOR * 512 + 4096]).hexdigest() == held
    for n, digest in enumerate(_lines(out, "small-sum"), start=1):
        offset = (512 + n) * 4096
        assert hashlib.sha256(image[offset : offset + 4096]).hexdigest() == digest


# Four writers, each over its own 2 MiB of the disk with its own request
# size, write a pattern naming the writer and the round with O_DIRECT, read
# it back and compare, round after round, until told to stop; each then says
# which round it finished last.
WRITERS_SCRIPT = """
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
writer() {
    w=$1; bs=$2
    count=$((2097152 / bs)); seek=$((w * 2097152 / bs))
    r=0
    while [ ! -f /tmp/stop ]; do
        r=$((r + 1))
        yes "w$w r$r" | head -c 2097152 > /tmp/p$w
        if ! dd if=/tmp/p$w of=/dev/vda bs=$bs seek=$seek count=$count oflag=direct \
                conv=notrunc 2>/tmp/e$w; then
            echo "writer $w io-error round $r: $(tail -1 /tmp/e$w)"; return 1
        fi
        if ! dd if=/dev/vda of=/tmp/b$w bs=$bs skip=$seek count=$count iflag=direct \
                2>/tmp/e$w; then
            echo "writer $w io-error reading round $r"; return 1
        fi
        if ! cmp -s /tmp/p$w /tmp/b$w; then echo "writer $w verify-error round $r"; return 1; fi
    done
    echo "writer $w done $r"
}
writer 0 4096 & writer 1 65536 & writer 2 262144 & writer 3 1048576 &
echo "writers-started"
read -r stop
touch /tmp/stop
wait
dmesg | grep -i -E "not a head|I/O error|blk_update|virtio" | sed 's/^/dmesg /'
"""


def _final_pattern(writer: int, rounds: int) -> bytes:
    line = f"w{writer} r{rounds}\n".encode()
    return (line * (2097152 // len(line) + 1))[:2097152]


def run_writers_under_kills(
    guest: GuestArtifacts,
    accel: str,
    scratch: Path,
    *,
    kills: int,
    packed: bool = False,
    seed: int = 0,
    graceful: bool = False,
    delay_ms: int = 0,
) -> tuple[str, bytes, str]:
    """SIGKILL (``graceful``: SIGTERM) ``serve blk --io-threads 2`` ``kills`` times at
    random moments under the writers, restarting it on the same socket each time;
    (guest output, image, logs).  ``delay_ms``: each read and write waits up to that
    long first (vmm/fault_hooks.py), so a kill finds requests in flight."""
    import random
    import time

    rng = random.Random(seed)
    disk = scratch / "disk.raw"
    disk.write_bytes(bytes(16 << 20))
    socket = scratch / "blk.sock"
    initrd = initramfs_with_script(guest, WRITERS_SCRIPT, scratch)
    vm = MicrovmConfig(guest.kernel, initrd, accel=accel)
    vm.add_vhost_user_blk(socket, reconnect=1, packed=packed)
    args = ["--file", str(disk), "--io-threads", "2"]
    with pytest.MonkeyPatch.context() as env:
        if delay_ms:
            env.setenv(DELAY_TRANSFERS_ENV, str(delay_ms))  # each back-end process inherits it
        for attempt in range(2):
            logs: list[str] = []
            backend = ServedDevice(
                "blk", socket, args, log_path=scratch / f"b{attempt}-0.log"
            ).start()
            try:
                with LiveGuest(vm) as live:
                    if not live.booted(timeout=60):
                        continue
                    live.wait_for("writers-started", 30)
                    for kill_number in range(1, kills + 1):
                        # A random moment once the front end is back and I/O flows.
                        wait_serving(backend, 30)
                        wait_writing(backend, 30)
                        time.sleep(rng.uniform(0.2, 1.0))
                        if graceful:
                            # Stops taking requests, finishes those in flight, exits 0.
                            assert backend.stop() == 0, backend.log()
                        else:
                            kill(backend)
                        logs.append(backend.log())
                        backend = ServedDevice(
                            "blk", socket, args, log_path=scratch / f"b{attempt}-{kill_number}.log"
                        ).start()
                    time.sleep(rng.uniform(0.5, 1.0))
                    live.send("stop")
                    _status, out = live.wait_exit(timeout=120)
                    return out, disk.read_bytes(), "\n---\n".join([*logs, backend.log()])
            finally:
                if backend.proc is not None:
                    backend.stop()
    pytest.fail("guest hung at boot twice")


def wait_writing(backend: ServedDevice, timeout: float, amount: int = 1 << 20) -> None:
    """Wait until the back end process has written ``amount`` bytes (the writers' data).

    Its log lines count too (``wchar`` of /proc/PID/io), but they are a few
    hundred bytes: the guest's writers take seconds to start under TCG.
    """
    import time

    assert backend.proc is not None
    io = Path(f"/proc/{backend.proc.pid}/io")
    deadline = time.monotonic() + timeout
    while True:
        fields = dict(line.split(": ") for line in io.read_text().splitlines())
        if int(fields["wchar"]) >= amount:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no guest writes in {timeout:.0f}s:\n{backend.log()}")
        time.sleep(0.02)


def wait_serving(backend: ServedDevice, timeout: float) -> None:
    """Wait until the front end reconnected and the device runs again."""
    import time

    deadline = time.monotonic() + timeout
    while "device activated" not in backend.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU did not reconnect in {timeout:.0f}s:\n{backend.log()}")
        time.sleep(0.02)


def check_writers(out: str, image: bytes, logs: str) -> None:
    """No I/O or verify error in the guest; the image holds each writer's last round."""
    done = {int(w): int(r) for w, _, r in (line.split() for line in _lines(out, "writer"))}
    assert sorted(done) == [0, 1, 2, 3], out + logs
    assert all(rounds >= 1 for rounds in done.values()), out
    assert "error" not in out.lower(), out + logs
    for writer, rounds in done.items():
        region = image[writer * 2097152 : (writer + 1) * 2097152]
        assert region == _final_pattern(writer, rounds), f"writer {writer} round {rounds}"


def test_sigkill_under_parallel_o_direct_writers_loses_nothing(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    out, image, logs = run_writers_under_kills(guest, accel, scratch, kills=5, seed=15)
    check_writers(out, image, logs)


def test_sigkill_under_parallel_o_direct_writers_on_packed_rings_loses_nothing(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    """Random SIGKILLs with requests in flight (transfers delayed up to 30 ms, so
    completions are out of order across the two I/O helpers)."""
    out, image, logs = run_writers_under_kills(
        guest, accel, scratch, kills=5, packed=True, seed=17, delay_ms=30
    )
    check_ring_format(logs, packed=True, restarts=5)
    check_writers(out, image, logs)
    # The kills found requests in flight, and the restarted back ends served them.
    assert "resubmitting" in logs, logs


def check_ring_format(logs: str, *, packed: bool, restarts: int) -> None:
    """Every back-end process ran the device on the ring format asked for.

    QEMU offers packed rings only with ``packed=on``, and then the guest
    driver takes them (VIRTIO_F_RING_PACKED is in the features it sets):
    the back end says which format its rings have when the device starts.
    """
    wanted = "packed" if packed else "split"
    other = "split" if packed else "packed"
    assert logs.count(f"device activated with {wanted} rings") >= restarts + 1, logs
    assert f"device activated with {other} rings" not in logs, logs


def test_sigterm_upgrade_under_parallel_o_direct_writers_loses_nothing(
    guest: GuestArtifacts, accel: str, scratch: Path
) -> None:
    """Graceful upgrade: each old process exits cleanly on SIGTERM, the new one carries on."""
    out, image, logs = run_writers_under_kills(
        guest, accel, scratch, kills=3, seed=16, graceful=True
    )
    check_writers(out, image, logs)
    assert logs.count("pyvirtio serve: stopped") == 3, logs
