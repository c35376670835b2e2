"""Fuzz target: the virtio-balloon device model driven by a hostile driver.

The input bytes choose the device's offer (stats, deflate-on-OOM, free page
reporting, free page hinting, page poison), the request bounds
(``BalloonLimits``, the defaults or tiny ones), which features the driver
acks, the ring layout (split or packed, event idx, indirect, size) and a
second RAM region (adjacent, behind a hole, at an unaligned base, anonymous
or memfd).  Then a sequence of steps, each one of:

* a chain on inflateq or deflateq: a PFN array of any u32 values (pages of
  RAM, past its end, in the hole, duplicates, runs up to and past the
  limits), split over descriptors at any point, odd lengths, sometimes with
  device-writable parts or zero-length descriptors;
* a stats buffer: entries with known, unknown and repeated tags, a partial
  trailing entry, sometimes device-writable parts;
* a free page report or hint: page ranges at any address and length, an ID
  buffer of any length and value;
* a driver config write (any offset and width), a host target change, a
  host stats request, poll or hinting round;
* a snapshot restored into a fresh device (which then carries on), a reset
  and re-activation, a notify of any queue index, raw bytes in a ring.

Everything but the ring garbage is followed by a reference model of the
balloon's documented behaviour (device.py and request.py docstrings, and
device-types/balloon), so the checks are exact until the rings are
scribbled on: the inflated page set, ``actual``/``poison_val`` in config
space, the latest statistics, the hinted pages, every counter, which
requests are refused, which buffers come back used (with 0 bytes written,
the held stats buffer excepted) and when the device needs a reset.

Invariants checked always: no exception escapes the model but the host
API's documented ``BalloonError``; no log record carries a traceback and
each input logs a bounded number of lines; counters only grow; the
inflated set holds only pages of guest RAM and never more than RAM has;
``GuestMemory.discard`` is only ever called on page-aligned ranges inside
guest RAM (this target's ``CheckedMemory`` subclass checks each call);
a snapshot restored into a fresh device snapshots to the same bytes and
shows the same state.  While exact: a page of the guest's data area reads
as zeros only if the guest gave it (an accepted inflate, a report when
poison does not forbid it), and otherwise keeps its fill pattern (hinted
and deflated pages included); the device keeps serving a well-formed
inflate at the end of the input.

PFNs and ranges the fuzzer picks at random are moved off the pages holding
the rings and request buffers: a driver that balloons its own rings only
harms itself, and keeping them readable is what lets the reference model
stay exact.  The raw-garbage step covers what that leaves out.

Runs under atheris (coverage guided) when it is installed, and under
hypothesis otherwise (``fuzz/_common.py``)::

    python fuzz/fuzz_balloon.py --runs 3000                      # atheris if installed
    python fuzz/fuzz_balloon.py --engine hypothesis --runs 3000  # force hypothesis
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

from _common import Bytes, LogRecorder, main

if TYPE_CHECKING:
    from pyvirtio.devices.balloon.device import Balloon
    from pyvirtio.devices.balloon.request import BalloonLimits

PAGE = 4096
#: Region 0: rings and indirect tables, then request buffers, then data pages.
RING_BASE = 0x1000
RING_STRIDE = 0x2000
INDIRECT_BASE = 0x10000
INDIRECT_STRIDE = 0x2000
BUF_BASE = 0x20000
DATA_BASE = 0x80000
REGION0_SIZE = 0x100000
DATA_PFN = DATA_BASE // PAGE
#: Second region: (base, size) choices; adjacent, behind a hole, unaligned.
REGION1_BASES = (0x100000, 0x180000, 0x100800, 0x140000)
REGION1_SIZES = (0x40000, 0x40800, 0x1000, 0x21000)
MAX_INDIRECT = 8
MAX_STEPS = 48
#: Lines the balloon may log per device instance in one input: each kind of
#: guest error once per interval (an input takes well under one).
LOG_BUDGET = 16
BALLOON_LOGGER = "pyvirtio.devices.balloon.device"
STAT = struct.Struct("<HQ")

# Imported in _load (after atheris hooks imports).
LOG = LogRecorder("pyvirtio")
CheckedMemory: Any = None


def _load() -> None:
    global Balloon, BalloonLimits, GuestMemory, CheckedMemory
    global BalloonError, BalloonFeature, BalloonQueue, Feature, DeviceState, VirtqueueError
    global split, packed, PAGE_SIZE, GuestMemoryError, QueueFullError, queue_layout
    from pyvirtio.constants import Feature
    from pyvirtio.device import DeviceState
    from pyvirtio.devices.balloon.device import Balloon, BalloonError
    from pyvirtio.devices.balloon.request import BalloonLimits
    from pyvirtio.devices.balloon.wire import BalloonFeature, BalloonQueue, queue_layout
    from pyvirtio.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
    from pyvirtio.virtqueue import packed, split
    from pyvirtio.virtqueue.common import VirtqueueError
    from pyvirtio.virtqueue.errors import QueueFullError

    class _CheckedMemory(GuestMemory):
        """Guest RAM whose discard checks every call (the balloon's only way to
        give memory back): page aligned, non-empty, wholly inside guest RAM."""

        def __init__(self) -> None:
            super().__init__()
            self.discards: list[tuple[int, int]] = []

        def discard(self, addr: int, length: int) -> None:
            assert addr % PAGE_SIZE == 0 and length % PAGE_SIZE == 0, (addr, length)
            assert length > 0, f"empty discard at {addr:#x}"
            assert self.is_valid(addr, length), f"discard {addr:#x}+{length:#x} outside RAM"
            self.discards.append((addr, length))
            super().discard(addr, length)

    CheckedMemory = _CheckedMemory


def _pattern(pfn: int) -> bytes:
    return bytes([(pfn * 7 + 1) & 0xFF | 1]) * PAGE


class Interrupt:
    """Records the device's interrupts (the host side of a transport)."""

    def __init__(self) -> None:
        self.config_changes = 0

    def signal_used_queue(self, queue_index: int) -> None:
        pass

    def signal_config_change(self) -> None:
        self.config_changes += 1


class Model:
    """The balloon's documented behaviour, applied to the requests the guest sent."""

    def __init__(self, device: Balloon, ram: list[tuple[int, int]]) -> None:
        self.ram = ram
        self.limits = device.limits
        self.target = 0
        self.actual = 0
        self.poison = 0
        self.cmd_id = 1
        self.hinting_for: int | None = None
        self.hinted: set[int] = set()
        self.inflated: set[int] = set()
        self.stats: dict[int, int] = {}
        self.held: int | None = None  # token of the held stats buffer
        self.counters = dict(device.counters)
        #: Pages the device may have zeroed (given by an accepted request).
        self.released: set[int] = set()
        self.broken = False

    def in_ram(self, addr: int, length: int) -> bool:
        """[addr, addr+length) lies in RAM (contiguous regions may be crossed)."""
        end = addr + length
        for base, size in sorted(self.ram):
            if base <= addr < base + size:
                addr = base + size
                if addr >= end:
                    return True
        return length == 0 and any(b <= addr < b + s for b, s in self.ram)

    def reset(self) -> None:
        self.actual = self.poison = 0
        self.hinting_for = None
        self.inflated.clear()
        self.held = None
        self.broken = False

    def page_request(self, readable: list[bytes], writable: int, inflate: bool) -> None:
        c = self.counters
        c["inflate_requests" if inflate else "deflate_requests"] += 1
        lim = self.limits
        lengths = [len(b) for b in readable]
        if (
            writable
            or any(n % 4 or n > lim.pages_per_descriptor * 4 for n in lengths)
            or sum(lengths) > lim.pages_per_request * 4
        ):
            c["malformed_requests"] += 1
            return
        data = b"".join(readable)
        pfns = set(struct.unpack(f"<{len(data) // 4}I", data))
        valid = {p for p in pfns if self.in_ram(p * PAGE, PAGE)}
        c["pfns_out_of_range"] += len(pfns) - len(valid)
        if inflate:
            c["pages_inflated"] += len(valid - self.inflated)
            self.inflated |= valid
            self._release(valid)
        else:
            removed = valid & self.inflated
            self.inflated -= removed
            c["pages_deflated"] += len(removed)
            c["deflate_of_unknown_pages"] += len(valid) - len(removed)

    def _release(self, pages: set[int]) -> None:
        self.released |= pages
        # The device releases coalesced runs of whole host pages.
        if PAGE_SIZE == PAGE and pages:
            self.counters["bytes_released"] += PAGE * len(pages)

    def _ranges(self, writable: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
        good, rejected = [], 0
        for index, (addr, length) in enumerate(writable):
            if (
                index >= self.limits.ranges_per_report
                or addr % PAGE
                or length % PAGE
                or not self.in_ram(addr, length)
            ):
                rejected += 1
            else:
                good.append((addr, length))
        return good, rejected

    def report(self, readable: list[bytes], writable: list[tuple[int, int]], poison: bool) -> None:
        c = self.counters
        c["reports"] += 1
        good, rejected = self._ranges(writable)
        c["report_ranges_rejected"] += rejected + len(readable)
        if poison and self.poison:
            return
        for addr, length in good:
            self.released.update(range(addr // PAGE, (addr + length) // PAGE))
            self.counters["bytes_released"] += length

    def hint(self, readable: list[bytes], writable: list[tuple[int, int]]) -> None:
        c = self.counters
        c["hints"] += 1
        if readable:
            if sum(len(b) for b in readable) != 4 or writable:
                c["hints_ignored"] += 1
                return
            cmd = int.from_bytes(b"".join(readable), "little")
            current = self.cmd_id if self.cmd_id > 1 else None
            self.hinting_for = cmd if cmd == current else None
            return
        good, rejected = self._ranges(writable)
        budget, taken = self.limits.pages_per_hint, []
        for addr, length in good:
            if length // PAGE > budget:
                rejected += 1
            else:
                budget -= length // PAGE
                taken.append((addr, length))
        good = taken
        c["hints_ignored"] += rejected
        if self.hinting_for is None or self.hinting_for != self.cmd_id:
            c["hints_ignored"] += len(good)
            return
        before = len(self.hinted)
        for addr, length in good:
            self.hinted.update(range(addr // PAGE, (addr + length) // PAGE))
        c["hinted_pages"] += len(self.hinted) - before

    def stats_buffer(self, readable: list[bytes], token: int) -> int | None:
        """Take a stats buffer; returns the token of the buffer given back, if any."""
        c = self.counters
        returned = None
        if self.held is not None:
            c["stats_extra_buffers"] += 1
            returned = self.held
        self.held = token
        data = b"".join(readable)
        entries = len(data) // STAT.size
        wanted = min(entries, self.limits.stats_per_buffer)
        c["stats_entries_dropped"] += entries - wanted + (1 if len(data) % STAT.size else 0)
        known = range(10)
        unknown = sum(1 for t in self.stats if t not in known)
        for i in range(wanted):
            tag, value = STAT.unpack_from(data, i * STAT.size)
            if tag not in self.stats and tag not in known:
                if unknown >= self.limits.unknown_stat_tags:
                    c["stats_entries_dropped"] += 1
                    continue
                unknown += 1
            self.stats[tag] = value
        c["stats_updates"] += 1
        return returned


class Posted:
    """A chain the guest put on a queue and has not seen used yet."""

    def __init__(
        self, role: Any, readable: list[bytes], writable: list[tuple[int, int]], bad: bool
    ) -> None:
        self.role = role
        self.readable = readable
        self.writable = writable
        #: A range outside guest RAM: the device must break on it.
        self.bad = bad


class Guest:
    def __init__(self, src: Bytes) -> None:
        self.src = src
        opts = src.take(2)
        self.kwargs: dict[str, Any] = dict(
            stats=bool(opts & 1),
            deflate_on_oom=bool(opts & 2),
            free_page_reporting=bool(opts & 4),
            free_page_hinting=bool(opts & 8),
            page_poison=bool(opts & 16),
        )
        if opts & 32:
            self.kwargs["limits"] = BalloonLimits(
                pages_per_descriptor=1 + src.take(1) % 8,
                pages_per_request=1 + src.take(1) % 16,
                stats_per_buffer=src.take(1) % 6,
                unknown_stat_tags=src.take(1) % 4,
                ranges_per_report=1 + src.take(1) % 4,
                pages_per_hint=src.take(1) % 8,
            )
        self.packed = bool(opts & 64)
        self.event_idx = bool(opts & 128)
        self.indirect = bool(opts & 256)
        self.size = (4, 8, 16)[(opts >> 9) % 3]
        # Guest RAM: region 0, and maybe a second one.
        self.mem = CheckedMemory()
        self.mem.add_anonymous(0, REGION0_SIZE)
        ram = [(0, REGION0_SIZE)]
        if opts & 0x1800:
            base = REGION1_BASES[src.take(1) % len(REGION1_BASES)]
            size = REGION1_SIZES[src.take(1) % len(REGION1_SIZES)]
            if opts & 0x2000:
                self.mem.add_memfd(base, size)
            else:
                self.mem.add_anonymous(base, size)
            ram.append((base, size))
        self.ram = ram
        self.data_pages = [
            pfn
            for base, size in ram
            for pfn in range(max(base, DATA_BASE) // PAGE, (base + size) // PAGE)
            if base <= pfn * PAGE and (pfn + 1) * PAGE <= base + size
        ]
        for pfn in self.data_pages:
            self.mem.write(pfn * PAGE, _pattern(pfn))
        self.mem_end_pfn = max(b + s for b, s in ram) // PAGE
        self.mem_pages = self.mem.size // PAGE
        self.device = Balloon(memory_size=self.mem.size, **self.kwargs)
        self.model = Model(self.device, ram)
        self.interrupt = Interrupt()
        self.exact = True
        self.buf_next = BUF_BASE
        self.token = 0
        self.devices = 1
        offered = self.device.offered_features
        ring_bits = Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        acked = offered & ~ring_bits & ~(src.take(1) << BalloonFeature.MUST_TELL_HOST)
        for flag, feature in (
            (self.packed, Feature.RING_PACKED),
            (self.event_idx, Feature.EVENT_IDX),
            (self.indirect, Feature.INDIRECT_DESC),
        ):
            if flag:
                acked |= feature.mask
        self.acked = acked
        self.activate()

    # -- rings ------------------------------------------------------------------------

    def activate(self) -> None:
        device = self.device
        device.ack_features(self.acked)
        self.layout = queue_layout(device.acked_features)
        self.roles = {index: role for role, index in self.layout.items()}
        module = packed if self.packed else split
        self.driver_queues: list[Any] = []
        device_queues: list[Any] = []
        drv_cls, dev_cls = (
            (packed.PackedDriverQueue, packed.PackedDeviceQueue)
            if self.packed
            else (split.SplitDriverQueue, split.SplitDeviceQueue)
        )
        for index in range(device.num_queues):
            base = RING_BASE + index * RING_STRIDE
            self.mem.fill(base, RING_STRIDE)
            desc_len, driver_len, _ = module.area_sizes(self.size)
            driver = (base + desc_len + 63) & ~63
            dev = (driver + driver_len + 63) & ~63
            ring = (self.mem, self.size, base, driver, dev)
            flags = {"event_idx": self.event_idx, "indirect": self.indirect}
            indirect_addr = INDIRECT_BASE + index * INDIRECT_STRIDE if self.indirect else None
            max_indirect = MAX_INDIRECT if self.indirect else 0
            self.driver_queues.append(
                drv_cls(*ring, **flags, indirect_addr=indirect_addr, max_indirect=max_indirect)
            )
            device_queues.append(dev_cls(*ring, **flags))
        #: Per queue index: chains posted, by token, in order.
        self.outstanding: list[dict[int, Posted]] = [{} for _ in range(device.num_queues)]
        #: Per queue index: chains posted but not yet notified (the model's backlog).
        self.pending: list[list[int]] = [[] for _ in range(device.num_queues)]
        device.activate(self.mem, self.interrupt, device_queues)
        # Nothing is posted yet, so activation served nothing.

    def alloc(self, data: bytes) -> tuple[int, int] | None:
        """A request buffer in the buffer area holding ``data`` (None when full)."""
        n = len(data)
        if self.buf_next + n > DATA_BASE:
            return None
        addr = self.buf_next
        self.buf_next = (addr + max(n, 1) + 7) & ~7
        self.mem.write(addr, data)
        return addr, n

    def post(self, role: Any, readable: list[bytes], writable: list[tuple[int, int]]) -> int | None:
        """Put a chain on ``role``'s queue (None: no such queue, no room, no buffer)."""
        index = self.layout.get(role)
        if index is None or not (readable or writable):
            return None
        ranges = []
        for blob in readable:
            where = self.alloc(blob)
            if where is None:
                return None
            ranges.append(where)
        bad = any(n and not self.model.in_ram(a, n) for a, n in writable)
        self.token += 1
        try:
            self.driver_queues[index].add(ranges, writable, self.token)
        except (QueueFullError, ValueError):
            return None
        self.outstanding[index][self.token] = Posted(role, readable, writable, bad)
        self.pending[index].append(self.token)
        return index

    def notify(self, index: int) -> None:
        """The guest kicks queue ``index``; the model follows, then the used ring is checked."""
        device = self.device
        active = device.state is DeviceState.ACTIVE
        device.queue_notify(index)
        if not 0 <= index < device.num_queues:
            return
        expected_back = self.serve(index) if active else set()
        self.drain(index, expected_back)

    def serve(self, index: int) -> set[int]:
        """The model's side of the device processing ``index``: tokens it gives back."""
        model = self.model
        back: set[int] = set()
        backlog, self.pending[index] = self.pending[index], []
        if model.broken or not self.exact:
            return back
        role = self.roles.get(index)
        for token in backlog:
            posted = self.outstanding[index][token]
            if posted.bad:
                model.broken = True
                return back
            readable, writable = posted.readable, posted.writable
            if role is BalloonQueue.STATS:
                returned = model.stats_buffer(readable, token)
                if returned is not None:
                    back.add(returned)
                continue
            if role in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE):
                model.page_request(readable, len(writable), role is BalloonQueue.INFLATE)
            elif role is BalloonQueue.REPORTING:
                poison = self.device.has_feature(BalloonFeature.PAGE_POISON)
                model.report(readable, writable, poison)
            elif role is BalloonQueue.FREE_PAGE:
                model.hint(readable, writable)
            else:
                model.counters["malformed_requests"] += 1
            back.add(token)
        return back

    def drain(self, index: int, expected: set[int]) -> None:
        try:
            used = list(self.driver_queues[index].used())
        except VirtqueueError:
            assert not self.exact, "the device corrupted a used ring the guest kept intact"
            return
        got = set()
        for token, written in used:
            assert written == 0, f"balloon wrote {written} bytes into a buffer"
            assert token in self.outstanding[index], f"used token {token} never posted"
            del self.outstanding[index][token]
            got.add(token)
        if self.exact:
            assert got == expected, (index, sorted(got), sorted(expected))

    def serve_all(self) -> None:
        """activate/wake serve every queue with a role (``_serve_posted``)."""
        for index in sorted(self.roles):
            back = self.serve(index)
            self.drain(index, back)

    # -- what a guest sends ---------------------------------------------------------------

    def pfn(self, prev: int) -> int:
        src = self.src
        sel = src.take(1) % 16
        if sel < 8:
            return DATA_PFN + src.take(1) % (self.mem_end_pfn - DATA_PFN + 1)
        if sel < 11:
            return self.data_pages[src.take(2) % len(self.data_pages)] if self.data_pages else 0
        if sel == 11:
            return prev
        if sel == 12:
            return src.pick(
                (self.mem_end_pfn, self.mem_end_pfn - 1, 0xFFFF_FFFF, 0x10_0000, 0x180, 0x1C0)
            )
        return _off_rings(src.take(4))

    def pfn_array(self) -> bytes:
        src = self.src
        shape = src.take(1)
        if shape & 0xC0 == 0xC0:
            # A run up to and past the limits.
            lim = self.device.limits
            count = (
                src.pick(
                    (lim.pages_per_descriptor, lim.pages_per_descriptor + 1, lim.pages_per_request)
                )
                + src.take(1) % 3
            )
            first = self.pfn(0)
            pfns = [_off_rings((first + i) & 0xFFFF_FFFF) for i in range(min(count, 2048))]
        else:
            pfns = []
            prev = DATA_PFN
            for _ in range(shape % 12):
                prev = self.pfn(prev)
                pfns.append(prev)
        return struct.pack(f"<{len(pfns)}I", *pfns)

    def split(self, data: bytes, unit: int) -> list[bytes]:
        """``data`` over 1..4 descriptors, cut on ``unit`` boundaries or anywhere."""
        src = self.src
        pieces = 1 + src.take(1) % 4
        anywhere = src.flag()
        cuts = sorted(
            src.take(2) % (len(data) + 1)
            if anywhere
            else unit * (src.take(2) % (len(data) // unit + 1))
            for _ in range(pieces - 1)
        )
        out, last = [], 0
        for cut in [*cuts, len(data)]:
            out.append(data[last:cut])
            last = cut
        return out

    def page_chain(self, role: Any) -> None:
        src = self.src
        readable = self.split(self.pfn_array(), 4)
        shape = src.take(1)
        if shape & 0x3 == 3:
            readable[src.take(1) % len(readable)] += src.raw(1 + src.take(1) % 3)
        writable = [(BUF_BASE, 1 + src.take(1))] if shape & 0x1C == 0x1C else []
        if not readable[0] and len(readable) == 1 and not writable and shape & 0x20:
            readable = []  # an empty chain, refused by the driver queue
        index = self.post(role, readable, writable)
        if index is not None and not shape & 0x80:
            self.notify(index)

    def stats_chain(self) -> None:
        src = self.src
        entries = []
        for _ in range(src.take(1) % 12):
            sel = src.take(1)
            tag = sel % 10 if sel & 0x80 else src.take(2) if sel & 0x40 else sel % 40
            entries.append(STAT.pack(tag, src.take(8)))
        data = b"".join(entries) + src.raw(src.take(1) % 10 if src.flag() else 0)
        readable = self.split(data, STAT.size)
        writable = [(BUF_BASE, 1 + src.take(1))] if src.take(1) % 8 == 0 else []
        index = self.post(BalloonQueue.STATS, readable, writable)
        if index is not None and src.take(1) % 8 != 0:
            self.notify(index)

    def page_ranges(self) -> list[tuple[int, int]]:
        src = self.src
        out = []
        for _ in range(src.take(1) % 6):
            sel = src.take(1) % 8
            if sel < 4:
                pfn = self.pfn(DATA_PFN)
                addr, length = pfn * PAGE, PAGE * (1 + src.take(1) % 4)
            elif sel < 6:
                addr = DATA_BASE + src.take(3) % (self.mem_end_pfn * PAGE - DATA_BASE + 1)
                length = src.take(2)
            elif sel == 6:
                addr, length = DATA_BASE + PAGE * (src.take(1) % 128), 0
            else:
                addr, length = src.take(8), src.take(4)
            if addr < DATA_BASE or addr + length > 1 << 64:
                addr = (addr % (1 << 63)) + DATA_BASE
            if not length and not self.model.in_ram(addr, 1):
                length = 1  # a zero-length buffer outside RAM: no rule to check
            out.append((addr, length))
        return out

    def report_chain(self, role: Any) -> None:
        src = self.src
        if role not in self.layout:
            return
        writable = self.page_ranges()
        readable: list[bytes] = []
        kind = src.take(1) % 8
        if role is BalloonQueue.FREE_PAGE and kind < 4:
            current = self.device.free_page_hint_cmd_id
            cmd = src.pick((current, 0, 1, current - 1, src.take(4)))
            raw = struct.pack("<I", cmd & 0xFFFF_FFFF)
            odd = (raw + src.raw(1),) if kind == 0 else (raw[:2], raw[2:]) if kind == 1 else (raw,)
            readable = list(odd)
            if kind != 3:
                writable = []
        elif role is BalloonQueue.FREE_PAGE and kind == 6:
            # A whole round: the host asks, the driver answers with the ID, then pages.
            if self.device.free_page_hint_cmd_id <= 1:
                self.model.cmd_id = self.device.start_hinting()
                self.model.hinted.clear()
            cmd = struct.pack("<I", self.device.free_page_hint_cmd_id)
            index = self.post(role, [cmd], [])
            if index is not None:
                self.notify(index)
        elif kind == 7:
            readable = [src.raw(1 + src.take(1) % 8)]
        index = self.post(role, readable, writable)
        if index is not None and src.take(1) % 8 != 0:
            self.notify(index)

    def config_write(self) -> None:
        src = self.src
        offset = src.take(1) % 24
        data = src.raw(src.pick((1, 2, 4, 4, 4, 8, 3)))
        self.device.write_config(offset, data)
        if offset + len(data) <= 16:
            config = bytearray(self._config())
            config[offset : offset + len(data)] = data
            _, self.model.actual, _, self.model.poison = struct.unpack("<IIII", config)

    def _config(self) -> bytes:
        m = self.model
        return struct.pack("<IIII", m.target, m.actual, m.cmd_id, m.poison)

    def host(self) -> None:
        src = self.src
        device, model = self.device, self.model
        op = src.take(1) % 8
        before = self.interrupt.config_changes
        if op < 3:
            pages = src.take(4) if op == 0 else src.take(2) % (self.mem_pages + 2)
            try:
                device.set_target_pages(pages)
            except BalloonError:
                assert pages > self.mem_pages, f"target {pages} refused"
                return
            assert pages <= self.mem_pages, f"target {pages} above RAM accepted"
            changed = pages != model.target
            model.target = pages
            assert self.interrupt.config_changes == before + changed
        elif op < 5:
            if op == 3:
                given = device.request_stats()
            elif device.offered_features & BalloonFeature.STATS_VQ.mask:
                # The host's timer: the first poll starts the interval, one
                # past its end returns the held buffer.
                device.set_stats_interval(1.0)
                due = device.poll_stats(0.0)
                assert due == 1.0, due
                device.poll_stats(1.0 + src.take(1) / 64)
                given = model.held is not None and not model.broken
            else:
                return
            if not self.exact:
                return
            assert given == (model.held is not None and not model.broken), given
            if given:
                held, model.held = model.held, None
                self.drain(self.layout[BalloonQueue.STATS], {held})
        elif device.offered_features & BalloonFeature.FREE_PAGE_HINT.mask:
            if op == 5:
                model.cmd_id = device.start_hinting()
                assert model.cmd_id > 1
                model.hinted.clear()
            else:
                device.stop_hinting(done=op == 7)
                model.cmd_id = 1 if op == 7 else 0
        else:
            try:
                device.start_hinting()
            except BalloonError:
                return
            raise AssertionError("hinting started without the feature")

    def snapshot_cycle(self) -> None:
        """Sleep, snapshot, and carry on in a fresh device restored from it."""
        old = self.device
        resources = old.sleep()
        snap = old.snapshot()
        # A kick, or the host's stats timer, while asleep changes nothing.
        old.queue_notify(self.src.take(1) % 4)
        assert not old.request_stats(), "an asleep device returned its stats buffer"
        old.poll_stats(1e9)
        assert old.snapshot() == snap, "a notify while asleep changed the snapshot"
        fresh = Balloon(memory_size=self.mem.size, **self.kwargs)
        fresh.sleep()
        fresh.restore(snap)
        assert fresh.snapshot() == snap, "a restored device snapshots differently"
        doc = json.loads(snap)
        assert doc["model"]["inflated"] == [list(r) for r in _runs(sorted(old._inflated))], (
            "snapshot lost inflated pages"
        )
        for name in ("target_pages", "actual_pages", "inflated_pages", "free_page_hint_cmd_id"):
            assert getattr(fresh, name) == getattr(old, name), name
        assert fresh.counters == old.counters
        assert fresh.stats() == old.stats()
        assert fresh.hinted_runs() == old.hinted_runs()
        assert fresh.config_bytes() == old.config_bytes()
        # Waking serves what was posted meanwhile, as activation does.
        fresh.wake(resources)
        self.devices += 1
        self.device = fresh
        self.serve_all()

    def reset(self) -> None:
        self.device.reset()
        self.model.reset()
        self.activate()

    def garbage(self) -> None:
        src = self.src
        index = src.take(1) % self.device.num_queues
        addr = RING_BASE + index * RING_STRIDE + src.take(2) % RING_STRIDE
        self.mem.write(addr, src.raw(1 + src.take(1) % 16))
        self.exact = False
        self.device.queue_notify(index)
        self.drain(index, set())

    def step(self) -> None:
        src = self.src
        op = src.take(1) % 24
        if op < 6:
            self.page_chain(BalloonQueue.INFLATE)
        elif op < 9:
            self.page_chain(BalloonQueue.DEFLATE)
        elif op < 11:
            self.stats_chain()
        elif op < 13:
            self.report_chain(BalloonQueue.REPORTING)
        elif op < 15:
            self.report_chain(BalloonQueue.FREE_PAGE)
        elif op < 17:
            self.config_write()
        elif op < 19:
            self.host()
        elif op == 19:
            self.snapshot_cycle()
        elif op == 20:
            self.notify(src.take(1) % (self.device.num_queues + 2))
        elif op == 21:
            self.reset()
        elif op == 22 and src.take(1) % 4 == 0:
            self.garbage()
        else:
            for index in range(self.device.num_queues):
                if self.pending[index]:
                    self.notify(index)

    # -- checks ---------------------------------------------------------------------------

    def check(self, counters_before: dict[str, int]) -> None:
        device, model = self.device, self.model
        for name, value in device.counters.items():
            assert value >= counters_before[name], f"counter {name} went down"
        inflated = device._inflated
        assert len(inflated) <= self.mem_pages, "balloon larger than RAM"
        for pfn in inflated:
            assert model.in_ram(pfn * PAGE, PAGE), f"inflated PFN {pfn:#x} outside RAM"
        for pfn in device._hinted:
            assert model.in_ram(pfn * PAGE, PAGE), f"hinted PFN {pfn:#x} outside RAM"
        assert len(device._latest_stats) <= 10 + device.limits.unknown_stat_tags
        if not self.exact:
            return
        assert device.needs_reset == model.broken, (device.needs_reset, model.broken)
        assert set(inflated) == model.inflated, "inflated pages differ from the model"
        assert set(device._hinted) == model.hinted, "hinted pages differ from the model"
        assert device._hinting_for == model.hinting_for
        assert device._latest_stats == model.stats, "statistics differ from the model"
        assert device.config_bytes() == self._config(), "config space differs from the model"
        want = dict(model.counters)
        got = dict(device.counters)
        if got["release_failures"]:
            # A release that failed is not counted in bytes_released.
            want["bytes_released"] = got["bytes_released"]
            want["release_failures"] = got["release_failures"]
        assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}

    def check_memory(self) -> None:
        """Only pages the guest gave read as zeros; all others keep their pattern."""
        failures = self.device.counters["release_failures"]
        for pfn in self.data_pages:
            page = self.mem.read(pfn * PAGE, PAGE)
            if page == bytes(PAGE):
                assert pfn in self.model.released, f"page {pfn:#x} zeroed, never given"
            else:
                assert page == _pattern(pfn), f"page {pfn:#x} written"
                assert pfn not in self.model.released or failures, f"page {pfn:#x} kept"

    def still_works(self) -> None:
        """A well-formed inflate and deflate of one page are served."""
        if self.device.needs_reset or not self.exact:
            return
        pfn = self.data_pages[0]
        for role in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE):
            index = self.post(role, [struct.pack("<I", pfn)], [])
            if index is None:
                return
            self.notify(index)
            assert (pfn in self.device._inflated) == (role is BalloonQueue.INFLATE)


def _off_rings(pfn: int) -> int:
    """``pfn`` moved off the ring and request-buffer pages (see the module docstring)."""
    return pfn + DATA_PFN if pfn < DATA_PFN else pfn


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def _check_log(devices: int) -> None:
    records = LOG.take()
    for record in records:
        if record.exc_info:
            import traceback

            trace = "".join(traceback.format_exception(*record.exc_info))
            raise AssertionError(f"traceback logged: {record.getMessage()}\n{trace}")
    # The base class's lines (a notify while asleep or of a queue that does
    # not exist) are the transport's to limit; the balloon's are counted.
    mine = [r.getMessage() for r in records if r.name == BALLOON_LOGGER]
    assert len(mine) <= LOG_BUDGET * devices, mine


def run_one(data: bytes) -> None:
    LOG.take()
    src = Bytes(data)
    guest = Guest(src)
    try:
        for _ in range(MAX_STEPS):
            if src.exhausted:
                break
            before = dict(guest.device.counters)
            guest.step()
            guest.check(before)
        before = dict(guest.device.counters)
        guest.still_works()
        guest.check(before)
        if guest.exact:
            guest.check_memory()
        for pfn in guest.device._hinted:
            # Hinted pages are never modified (Free Page Hinting, device requirements).
            page = guest.mem.read(pfn * PAGE, PAGE)
            assert page == _pattern(pfn) or pfn in guest.model.released or not guest.exact
    finally:
        guest.mem.close()
    _check_log(guest.devices)


if __name__ == "__main__":
    main(
        "fuzz_balloon",
        "Fuzz the virtio-balloon device model.",
        run_one,
        _load,
        max_len=4096,
    )
