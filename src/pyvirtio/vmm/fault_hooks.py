"""Fault-injection hooks for tests of back-end restarts (not for production use).

``pyvirtio serve blk`` reads ``PYVIRTIO_TEST_HOLD_WRITE=SECTOR:MARKER`` from
its environment: the first write to ``SECTOR`` is carried out (its data
reaches the image) but its completion is withheld for the life of the
process, and the file ``MARKER`` is created once it is held.  Later requests
complete as usual, so completions are out of order at a moment a test picks:
killed then, the back end leaves one request unfinished below requests it
has finished.  That is the case a restarted back end can only serve right
with inflight tracking (vhost-user.rst "Inflight I/O tracking").

``PYVIRTIO_TEST_DELAY_TRANSFERS=MS``: every read and write waits a random
0..MS milliseconds before it is carried out, on whichever thread serves it.
Requests then stay in flight long enough, and finish out of order across
``--io-threads`` helpers, for a kill at a random moment to find some
unfinished below finished ones (without it the guest, not the back end, is
the bottleneck, and a random kill mostly finds the back end idle).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvirtio.devices.block import Block
from pyvirtio.devices.block.request import TRANSFERS, Request, Served
from pyvirtio.devices.block.wire import HEADER, HEADER_SIZE, RequestType

__all__ = ["DELAY_TRANSFERS_ENV", "HOLD_WRITE_ENV", "delay_transfers", "hold_write"]

#: The environment variables ``pyvirtio serve blk`` reads.
HOLD_WRITE_ENV = "PYVIRTIO_TEST_HOLD_WRITE"
DELAY_TRANSFERS_ENV = "PYVIRTIO_TEST_DELAY_TRANSFERS"

log = logging.getLogger(__name__)


def hold_write(device: Block, spec: str) -> None:
    """Withhold the completion of the first write to a sector (``spec`` is ``SECTOR:MARKER``)."""
    sector_text, _, marker = spec.partition(":")
    sector = int(sector_text)
    if not marker:
        raise ValueError(f"{HOLD_WRITE_ENV}={spec!r}: expected SECTOR:MARKER")
    # The hook wraps the model's one completion step, which every serving
    # path (ring thread and I/O helpers) goes through.
    publish: Callable[..., None] = device._publish
    held = False

    def holding_publish(queue: Any, served: list[Served], sync_failed: bool) -> None:
        nonlocal held
        if not held:
            kept = []
            for item in served:
                if not held:
                    try:
                        req_type, _reserved, req_sector = HEADER.unpack(
                            item.chain.read(0, HEADER_SIZE)
                        )
                    except Exception:  # a malformed request: not the one held
                        req_type, req_sector = -1, -1
                    if req_type == RequestType.OUT and req_sector == sector:
                        held = True
                        log.warning("test hook: holding the completion of the write to %d", sector)
                        Path(marker).touch()
                        continue
                kept.append(item)
            served = kept
        publish(queue, served, sync_failed)

    setattr(device, "_publish", holding_publish)  # noqa: B010 - instance override on purpose


def delay_transfers(device: Block, spec: str) -> None:
    """Delay every read and write by a random 0..``spec`` milliseconds before it is carried out."""
    limit = float(spec) / 1000
    if not 0 < limit <= 10:
        raise ValueError(f"{DELAY_TRANSFERS_ENV}={spec!r}: expected 0 < MS <= 10000")
    carry_out: Callable[..., Any] = device._carry_out
    rng = random.Random()

    def delayed_carry_out(chain: Any, request: Request) -> Any:
        # Reads and writes are carried out outside the ring lock
        # (pipeline.py): other requests are taken and finish meanwhile.
        if request.type in TRANSFERS:
            time.sleep(rng.uniform(0, limit))
        return carry_out(chain, request)

    setattr(device, "_carry_out", delayed_carry_out)  # noqa: B010 - instance override on purpose
