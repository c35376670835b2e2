"""virtio-balloon: the device model (device-types/balloon).

The host sets a target (``num_pages``) and the guest's driver inflates the
balloon toward it by handing over pages, or deflates it by taking pages back;
it reports the balloon's size in ``actual``.  Inflated pages and pages the
driver reports free are given back to the host through
:meth:`GuestMemory.discard <pyvirtio.memory.GuestMemory.discard>` (a hole
punched in memfd/file-backed RAM, MADV_DONTNEED on anonymous RAM), so the
host really gets the memory back.

Queues (wire.queue_layout): inflateq, deflateq, then statsq, free_page_vq
and reporting_vq when their features are negotiated, numbered consecutively.

Host API (called by the VMM, never by the guest):

* :meth:`Balloon.set_target_pages` / :meth:`Balloon.set_target_mib` raise a
  configuration change interrupt; a target above guest memory is refused.
* :meth:`Balloon.stats` gives target, actual and the latest guest statistics
  as a dict with Firecracker's names (unknown tags by number);
  :meth:`Balloon.request_stats` returns the held stats buffer so the driver
  sends fresh figures.  The polling interval is the host's choice
  (:meth:`Balloon.set_stats_interval`); the host's timer calls
  :meth:`Balloon.poll_stats` with the time, which requests stats when the
  interval has passed and says when to call again (the model starts no
  timer and reads no clock, see :mod:`pyvirtio.device`).
* counters in :attr:`Balloon.counters`.

Hardening (after Firecracker's balloon): every PFN is validated against guest
memory and out-of-range ones ignored and counted; PFNs per descriptor and per
request and stats entries per buffer are bounded (:mod:`.request`); a second
outstanding stats buffer is returned with a log line.  Malformed requests are
used with 0 bytes written, counted and logged at a limited rate; the device
keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pyvirtio.constants import DeviceId
from pyvirtio.device import (
    COMMON_FEATURES,
    ActivationError,
    DeviceState,
    QueueResources,
    VirtioDevice,
    expect_object,
    expect_uint,
)
from pyvirtio.devices.balloon.pages import PageSet
from pyvirtio.devices.balloon.request import (
    BalloonLimits,
    PageRequest,
    parse_hint,
    parse_page_request,
    parse_report,
    parse_stats,
)
from pyvirtio.devices.balloon.wire import (
    BALLOON_PAGE_SIZE,
    CMD_ID_DONE,
    CMD_ID_STOP,
    CONFIG_SIZE,
    PAGES_PER_MIB,
    PFN_SHIFT,
    STAT_NAMES,
    BalloonConfig,
    BalloonFeature,
    BalloonQueue,
    ConfigField,
    queue_layout,
)
from pyvirtio.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from pyvirtio.ratelimit import RateLimitedLog
from pyvirtio.virtqueue.common import DescriptorChain, DeviceQueue

__all__ = ["COUNTER_NAMES", "DEFAULT_QUEUE_SIZE", "Balloon", "BalloonError"]

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256
#: A kind of guest error is logged at most once per this many seconds.
LOG_INTERVAL = 10.0

#: What :attr:`Balloon.counters` counts.
COUNTER_NAMES = (
    "inflate_requests",
    "deflate_requests",
    "pages_inflated",
    "pages_deflated",
    "pfns_out_of_range",
    "deflate_of_unknown_pages",
    "malformed_requests",
    "stats_updates",
    "stats_entries_dropped",
    "stats_extra_buffers",
    "reports",
    "report_ranges_rejected",
    "hints",
    "hinted_pages",
    "hints_ignored",
    "bytes_released",
    "release_failures",
)

_U32_MAX = 0xFFFF_FFFF


class BalloonError(ValueError):
    """A host API call the balloon refuses (a target above guest memory, ...)."""


class Balloon(VirtioDevice):
    """The balloon device.

    * ``target_pages``: the initial target, in 4 KiB pages.
    * ``memory_size``: bytes of guest RAM, for checking targets before the
      device is activated (afterwards the activated memory's size is used).
    * ``stats``: offer STATS_VQ; ``stats_interval``: seconds between stats
      requests (see :meth:`poll_stats`; 0: only on :meth:`request_stats`);
      ``deflate_on_oom``, ``free_page_reporting``,
      ``free_page_hinting``, ``page_poison``: offer those features.
    * ``limits``: bounds on requests (:class:`.request.BalloonLimits`).
    """

    device_id = DeviceId.BALLOON

    def __init__(
        self,
        target_pages: int = 0,
        *,
        memory_size: int | None = None,
        stats: bool = True,
        stats_interval: float = 0.0,
        deflate_on_oom: bool = False,
        free_page_reporting: bool = False,
        free_page_hinting: bool = False,
        page_poison: bool = False,
        limits: BalloonLimits | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        features = COMMON_FEATURES
        for wanted, feature in (
            (stats, BalloonFeature.STATS_VQ),
            (deflate_on_oom, BalloonFeature.DEFLATE_ON_OOM),
            (free_page_reporting, BalloonFeature.PAGE_REPORTING),
            (free_page_hinting, BalloonFeature.FREE_PAGE_HINT),
            (page_poison, BalloonFeature.PAGE_POISON),
        ):
            if wanted:
                features |= feature.mask
        super().__init__(features, (queue_size,) * len(queue_layout(features)))
        self.limits = limits if limits is not None else BalloonLimits()
        self.memory_size = memory_size
        self._num_pages = 0
        self._actual = 0
        self._poison_val = 0
        #: free_page_hint_cmd_id, the last non-reserved ID issued, and the ID
        #: the driver is hinting for (None: it has not started, or stopped).
        self._cmd_id = CMD_ID_DONE
        self._last_cmd_id = CMD_ID_DONE
        self._hinting_for: int | None = None
        #: PFNs hinted free under the current command ID.
        self._hinted = PageSet()
        self._layout: dict[BalloonQueue, int] = {}
        self._roles: dict[int, BalloonQueue] = {}
        #: PFNs in the balloon (inflated and not deflated since).
        self._inflated = PageSet()
        self._latest_stats: dict[int, int] = {}
        self._stats_chain: DescriptorChain | None = None
        #: A held stats buffer from a snapshot, rebuilt at wake.
        self._restored_stats_chain: dict[str, Any] | None = None
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._log = RateLimitedLog(log, self.name, interval=LOG_INTERVAL)
        self._stats_interval = 0.0
        self._stats_due: float | None = None
        self.set_stats_interval(stats_interval)
        self.set_target_pages(target_pages)

    # -- host API ------------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        return self._num_pages

    @property
    def actual_pages(self) -> int:
        """The balloon's size as the driver last reported it (config ``actual``)."""
        return self._actual

    @property
    def inflated_pages(self) -> int:
        """Pages the device holds in the balloon by its own accounting."""
        return len(self._inflated)

    def guest_memory_pages(self) -> int | None:
        """4 KiB pages of guest RAM (None while unknown)."""
        mem = self.mem
        size = mem.size if mem is not None else self.memory_size
        return None if size is None else size // BALLOON_PAGE_SIZE

    def set_target_pages(self, pages: int) -> None:
        """Ask the driver for a balloon of ``pages`` 4 KiB pages (a config change)."""
        if not isinstance(pages, int) or pages < 0 or pages > _U32_MAX:
            raise BalloonError(f"target of {pages!r} pages is not a 32-bit page count")
        limit = self.guest_memory_pages()
        if pages and limit is None:
            raise BalloonError("guest memory size unknown: pass memory_size or activate first")
        if limit is not None and pages > limit:
            raise BalloonError(f"target of {pages} pages is above guest memory ({limit} pages)")
        self._check_awake("set_target_pages")
        if pages != self._num_pages:
            self._num_pages = pages
            self.config_changed()

    def set_target_mib(self, mib: int) -> None:
        """:meth:`set_target_pages` in MiB."""
        if not isinstance(mib, int) or mib < 0:
            raise BalloonError(f"target of {mib!r} MiB is not a size")
        self.set_target_pages(mib * PAGES_PER_MIB)

    def stats(self) -> dict[str | int, int]:
        """Target, actual and the latest guest statistics, by Firecracker's names.

        Tags the spec does not define are kept under their number.
        """
        out: dict[str | int, int] = {
            "target_pages": self._num_pages,
            "actual_pages": self._actual,
            "target_mib": self._num_pages // PAGES_PER_MIB,
            "actual_mib": self._actual // PAGES_PER_MIB,
        }
        for tag, value in self._latest_stats.items():
            out[STAT_NAMES.get(tag, tag)] = value
        return out

    def request_stats(self) -> bool:
        """Return the held stats buffer, asking the driver for new figures.

        False when there is none to return (stats not negotiated, or the
        driver has not answered the previous request yet), or when the
        device is not active: asleep, its rings are not its to write, and
        the buffer stays held (a host timer may fire during a snapshot).
        """
        chain = self._stats_chain
        if (
            chain is None
            or BalloonQueue.STATS not in self._layout
            or self.needs_reset
            or self.state is not DeviceState.ACTIVE
        ):
            return False
        index = self._layout[BalloonQueue.STATS]
        self._stats_chain = None
        self.queues[index].add_used(chain, 0)
        self.signal_used(index)
        return True

    @property
    def stats_interval(self) -> float:
        """Seconds between stats requests the host's timer makes (0: none)."""
        return self._stats_interval

    def set_stats_interval(self, seconds: float) -> None:
        """Choose the polling interval; the next :meth:`poll_stats` starts counting anew."""
        if seconds < 0:
            raise BalloonError(f"stats interval of {seconds} s is negative")
        if seconds and not self.offered_features & BalloonFeature.STATS_VQ.mask:
            raise BalloonError("statistics were not offered (STATS_VQ)")
        self._stats_interval = float(seconds)
        self._stats_due = None

    def poll_stats(self, now: float) -> float | None:
        """The host timer's entry point: request stats if the interval passed at ``now``.

        Returns when to call again (None: no interval set).  The model keeps
        no clock of its own; ``now`` is any monotonic time in seconds.
        """
        interval = self._stats_interval
        if not interval:
            return None
        due = self._stats_due
        if due is None or now >= due:
            if due is not None:
                self.request_stats()
            due = now + interval
            self._stats_due = due
        return due

    # -- free page hinting (host side) ---------------------------------------------------

    @property
    def free_page_hint_cmd_id(self) -> int:
        return self._cmd_id

    def start_hinting(self) -> int:
        """Ask the driver for free page hints under a new command ID (returned).

        IDs are never reused (Free Page Hinting: not before the driver's
        STOP for it), so each call takes the next one; earlier hints are
        forgotten.
        """
        if not self.offered_features & BalloonFeature.FREE_PAGE_HINT.mask:
            raise BalloonError("free page hinting was not offered")
        self._check_awake("start_hinting")
        cmd_id = self._last_cmd_id + 1 if self._last_cmd_id < _U32_MAX else CMD_ID_DONE + 1
        self._last_cmd_id = cmd_id
        self._hinted.clear()
        self._set_cmd_id(cmd_id)
        return cmd_id

    def stop_hinting(self, *, done: bool = False) -> None:
        """Stop the round: STOP (hints kept), or DONE (the driver may reuse the pages)."""
        self._check_awake("stop_hinting")
        self._set_cmd_id(CMD_ID_DONE if done else CMD_ID_STOP)

    def hinted_runs(self) -> list[tuple[int, int]]:
        """``(first PFN, count)`` runs hinted free under the current round's ID.

        The device never discards hinted pages: the driver may reuse one
        before the device sees the hint, and only the host's dirty tracking
        (e.g. for a migration that skips hinted pages) can tell a page
        written since; that is the host's to combine.
        """
        return self._hinted.runs()

    def _set_cmd_id(self, cmd_id: int) -> None:
        if cmd_id != self._cmd_id:
            self._cmd_id = cmd_id
            self.config_changed()

    # -- configuration space ---------------------------------------------------------

    def config_bytes(self) -> bytes:
        return BalloonConfig(self._num_pages, self._actual, self._cmd_id, self._poison_val).pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``actual`` and ``poison_val``; other fields are read-only."""
        # A driver may write as often as it likes: each kind of ignored write
        # is logged at a limited rate.
        if offset < 0 or offset + len(data) > CONFIG_SIZE:
            self._log.log(
                logging.INFO, "config_write", None, "config write outside the config space ignored"
            )
            return
        config = bytearray(self.config_bytes())
        config[offset : offset + len(data)] = data
        new = BalloonConfig.unpack(bytes(config))
        writable = (ConfigField.ACTUAL, ConfigField.POISON_VAL)
        for field in ConfigField:
            if field not in writable and offset < field + 4 and field < offset + len(data):
                self._log.log(
                    logging.INFO,
                    "config_write",
                    field,
                    "driver write to read-only %s ignored",
                    field.name,
                )
        self._actual = new.actual
        self._poison_val = new.poison_val

    # -- lifecycle -----------------------------------------------------------------

    def _on_activate(self, resources: QueueResources) -> None:
        layout = queue_layout(self.acked_features)
        if len(resources.queues) < len(layout):
            raise ActivationError(f"{self.name}: {len(layout)} queues needed")
        self._layout = layout
        self._roles = {index: role for role, index in layout.items()}

    def _serve_posted(self) -> None:
        # Only the queues the negotiated features give a role (the first
        # stats buffer is posted before DRIVER_OK).
        for index in sorted(self._roles):
            self.queue_notify(index)

    def reset(self) -> None:
        super().reset()
        # A reset driver starts with an empty balloon; the host's target stays.
        self._actual = 0
        self._poison_val = 0
        self._hinting_for = None
        self._inflated.clear()
        self._stats_chain = None
        self._restored_stats_chain = None
        self._layout = {}
        self._roles = {}

    def _on_wake(self, resources: QueueResources) -> None:
        self._layout = queue_layout(self.acked_features)
        self._roles = {index: role for role, index in self._layout.items()}
        saved = self._restored_stats_chain
        self._restored_stats_chain = None
        if saved is not None:
            self._stats_chain = _chain_from_state(resources.mem, saved)

    # -- queues --------------------------------------------------------------------

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        role = self._roles.get(index)
        if role is BalloonQueue.STATS:
            self._process_stats(queue)
            return
        completions: list[tuple[DescriptorChain, int]] = []
        try:
            while (chain := queue.pop()) is not None:
                if role is BalloonQueue.INFLATE:
                    self._page_request(chain, inflate=True)
                elif role is BalloonQueue.DEFLATE:
                    self._page_request(chain, inflate=False)
                elif role is BalloonQueue.REPORTING:
                    self._report(chain)
                elif role is BalloonQueue.FREE_PAGE:
                    self._hint(chain)
                else:
                    self._malformed(f"buffer on queue {index}, which has no use")
                # Nothing is written to any of these buffers.
                completions.append((chain, 0))
        finally:
            self._return_used(index, queue, completions)

    def _page_request(self, chain: DescriptorChain, *, inflate: bool) -> None:
        """Parse an inflate or deflate request and carry it out (one refused whole does nothing)."""
        kind = "inflate" if inflate else "deflate"
        self.counters[f"{kind}_requests"] += 1
        request = parse_page_request(chain, self._active_mem(), self.limits)
        if request.error is not None:
            self._malformed(f"{kind} request refused: {request.error}")
            return
        if request.out_of_range:
            self.counters["pfns_out_of_range"] += request.out_of_range
            self._rate_limited(
                "pfns_out_of_range", f"{request.out_of_range} PFNs outside guest memory ignored"
            )
        if inflate:
            self._inflate(request)
        else:
            self._deflate(request)

    def _inflate(self, request: PageRequest) -> None:
        inflated = self._inflated
        self.counters["pages_inflated"] += sum(inflated.add_run(*run) for run in request.runs)
        # The device may change a page's contents once it sees its PFN in an
        # inflate request (Device Operation, device requirements).
        self._release(self._active_mem(), request.runs)

    def _deflate(self, request: PageRequest) -> None:
        inflated = self._inflated
        removed = sum(inflated.discard_run(*run) for run in request.runs)
        self.counters["pages_deflated"] += removed
        unknown = len(request.pfns) - removed
        if unknown:
            self.counters["deflate_of_unknown_pages"] += unknown
            self._rate_limited("deflate_of_unknown_pages", f"{unknown} deflated pages not inflated")
        # Released pages are backed again on first touch: nothing to do.

    def _report(self, chain: DescriptorChain) -> None:
        mem = self._active_mem()
        self.counters["reports"] += 1
        request = parse_report(chain, mem, self.limits)
        if request.rejected:
            self.counters["report_ranges_rejected"] += request.rejected
            self._rate_limited(
                "report_ranges_rejected", f"{request.rejected} reported ranges rejected"
            )
        # With PAGE_POISON the device must keep reported pages at poison_val
        # (Free Page Reporting, device requirements); released pages read 0.
        if self.has_feature(BalloonFeature.PAGE_POISON) and self._poison_val:
            return
        self._release(
            mem, ((addr >> PFN_SHIFT, length >> PFN_SHIFT) for addr, length in request.ranges)
        )

    def _hint(self, chain: DescriptorChain) -> None:
        request = parse_hint(chain, self._active_mem(), self.limits)
        self.counters["hints"] += 1
        if request.cmd_id is not None:
            # An ID buffer starts hinting for that ID, or STOP ends it.
            current = self._cmd_id if self._cmd_id > CMD_ID_DONE else None
            self._hinting_for = request.cmd_id if request.cmd_id == current else None
            return
        if request.rejected:
            self.counters["hints_ignored"] += request.rejected
            self._rate_limited(
                "hints_ignored", f"{request.rejected} hint buffers or ranges rejected"
            )
        if self._hinting_for is None or self._hinting_for != self._cmd_id:
            # Pages sent with an ID that is not the current one MUST be ignored.
            if request.ranges:
                self.counters["hints_ignored"] += len(request.ranges)
            return
        hinted = self._hinted
        for addr, length in request.ranges:
            added = hinted.add_run(addr >> PFN_SHIFT, length >> PFN_SHIFT)
            self.counters["hinted_pages"] += added

    def _process_stats(self, queue: DeviceQueue) -> None:
        returned = False
        while (chain := queue.pop()) is not None:
            previous = self._stats_chain
            if previous is not None:
                # The driver MUST keep at most one buffer there (Memory Statistics).
                self.counters["stats_extra_buffers"] += 1
                self._rate_limited("stats_extra_buffers", "second stats buffer returned")
                queue.add_used(previous, 0)
                returned = True
            self._stats_chain = chain
            request = parse_stats(chain, self.limits)
            if request.dropped:
                self.counters["stats_entries_dropped"] += request.dropped
                self._rate_limited(
                    "stats_entries_dropped", f"{request.dropped} stats entries not read"
                )
            self._take_stats(request.stats)
            self.counters["stats_updates"] += 1
        if returned:
            self.signal_used(self._layout[BalloonQueue.STATS])

    def _take_stats(self, stats: list[tuple[int, int]]) -> None:
        """Keep the figures; a driver cannot grow the table past the known tags
        plus ``limits.unknown_stat_tags`` others."""
        latest = self._latest_stats
        unknown = sum(1 for tag in latest if tag not in STAT_NAMES)
        dropped = 0
        # Entries may come in any order; a later one of a tag wins.
        for tag, value in stats:
            if tag not in latest and tag not in STAT_NAMES:
                if unknown >= self.limits.unknown_stat_tags:
                    dropped += 1
                    continue
                unknown += 1
            latest[tag] = value
        if dropped:
            self.counters["stats_entries_dropped"] += dropped
            self._rate_limited("stats_entries_dropped", f"{dropped} unknown stats tags not kept")

    def _release(self, mem: GuestMemory, runs: Iterable[tuple[int, int]]) -> None:
        """Give the pages of ``(first PFN, count)`` runs back to the host.

        Only whole host pages go (a host page larger than 4 KiB is released
        when all of it is in one run).
        """
        for first, count in runs:
            start = -(-(first << PFN_SHIFT) // PAGE_SIZE) * PAGE_SIZE
            end = ((first + count) << PFN_SHIFT) // PAGE_SIZE * PAGE_SIZE
            if end <= start:
                continue
            try:
                mem.discard(start, end - start)
            except GuestMemoryError as exc:
                self.counters["release_failures"] += 1
                self._rate_limited("release_failures", f"cannot release memory: {exc}")
                continue
            self.counters["bytes_released"] += end - start

    # -- errors ----------------------------------------------------------------------

    def _active_mem(self) -> GuestMemory:
        mem = self.mem
        assert mem is not None, "queues are processed only while active"
        return mem

    def _malformed(self, what: str) -> None:
        self.counters["malformed_requests"] += 1
        self._rate_limited("malformed_requests", what)

    def _rate_limited(self, counter: str, what: str) -> None:
        """Log a kind of guest error at most once per LOG_INTERVAL, with its count."""
        self._log.warn(counter, None, "%s (%s: %d)", what, counter, self.counters[counter])

    # -- snapshot ------------------------------------------------------------------

    def _snapshot_model(self) -> Any:
        chain = self._stats_chain
        held = _chain_state(chain) if chain is not None else self._restored_stats_chain
        return {
            "num_pages": self._num_pages,
            "actual": self._actual,
            "poison_val": self._poison_val,
            "stats_interval": self._stats_interval,
            "cmd_id": self._cmd_id,
            "last_cmd_id": self._last_cmd_id,
            "hinting_for": self._hinting_for,
            "hinted": [list(run) for run in self._hinted.runs()],
            "inflated": [list(run) for run in self._inflated.runs()],
            "latest_stats": [[tag, value] for tag, value in sorted(self._latest_stats.items())],
            "stats_buffer": held,
            "counters": dict(self.counters),
        }

    def _restore_model(self, state: Any) -> None:
        state = expect_object(state, "balloon state")
        num_pages = expect_uint(state["num_pages"])
        actual = expect_uint(state["actual"])
        poison = expect_uint(state["poison_val"])
        interval = state["stats_interval"]
        if not isinstance(interval, int | float) or isinstance(interval, bool):
            raise ValueError(f"bad stats interval {interval!r}")
        cmd_id = expect_uint(state["cmd_id"])
        last_cmd_id = expect_uint(state["last_cmd_id"])
        hinting_for = state["hinting_for"]
        if hinting_for is not None:
            expect_uint(hinting_for)
        if max(num_pages, actual, poison, cmd_id, last_cmd_id) > _U32_MAX:
            raise ValueError("config field above 32 bits")
        inflated = _page_set(state["inflated"])
        hinted = _page_set(state["hinted"])
        latest = {}
        for entry in state["latest_stats"]:
            tag, value = (expect_uint(v) for v in entry)
            latest[tag] = value
        held = state["stats_buffer"]
        if held is not None:
            _check_chain_state(held)
        counters = state["counters"]
        if not isinstance(counters, dict) or set(counters) != set(COUNTER_NAMES):
            raise ValueError("balloon counters do not match")
        # First, as it may refuse (a negative interval, or one without
        # STATS_VQ) and nothing must have changed then.
        self.set_stats_interval(interval)
        self._num_pages = num_pages
        self._actual = actual
        self._poison_val = poison
        self._cmd_id = cmd_id
        self._last_cmd_id = last_cmd_id
        self._hinting_for = hinting_for
        self._hinted = hinted
        self._inflated = inflated
        self._latest_stats = latest
        self._stats_chain = None
        self._restored_stats_chain = held
        self.counters = {name: expect_uint(counters[name]) for name in COUNTER_NAMES}


def _page_set(runs: Any) -> PageSet:
    """The pages of snapshot ``[first, count]`` runs, checked."""
    pages = PageSet()
    for run in runs:
        first, count = (expect_uint(v) for v in run)
        if (first + count) << PFN_SHIFT > 1 << 64:
            raise ValueError(f"PFN run {first}+{count} outside the address space")
        pages.add_run(first, count)
    return pages


def _chain_state(chain: DescriptorChain) -> dict[str, Any]:
    """A held buffer as JSON data: the ring entry and its checked ranges."""
    return {
        "head": chain.head,
        "ring_slots": chain.ring_slots,
        "readable": [list(r) for r in chain.readable],
        "writable": [list(r) for r in chain.writable],
    }


def _check_chain_state(state: Any) -> None:
    state = expect_object(state, "held stats buffer")
    expect_uint(state["head"])
    expect_uint(state["ring_slots"])
    for key in ("readable", "writable"):
        for entry in state[key]:
            addr, length = entry
            expect_uint(addr)
            expect_uint(length)


def _chain_from_state(mem: GuestMemory, state: dict[str, Any]) -> DescriptorChain | None:
    """The held buffer again, if its ranges are still guest memory."""
    readable = [(int(a), int(n)) for a, n in state["readable"]]
    writable = [(int(a), int(n)) for a, n in state["writable"]]
    if not all(mem.is_valid(a, n) for a, n in readable + writable):
        log.warning("balloon: restored stats buffer is outside guest memory, dropped")
        return None
    return DescriptorChain(
        mem,
        int(state["head"]),
        readable,
        writable,
        sum(n for _, n in readable),
        sum(n for _, n in writable),
        int(state["ring_slots"]),
    )
