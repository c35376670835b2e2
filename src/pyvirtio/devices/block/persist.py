"""virtio-blk snapshots: what a block device saves and what it accepts back.

Requests complete inside ``queue_notify``, so there is never a request in
flight to record, and the disk contents are the backend's business: a
snapshot holds the configuration (everything the driver can see, which must
match on restore) and the cache mode the driver chose.
"""

from __future__ import annotations

import logging
from typing import Any

from pyvirtio.device import expect_object

__all__ = ["load", "save"]

log = logging.getLogger(__name__)


def save(path: str | None, options: dict[str, Any], writeback: bool) -> dict[str, Any]:
    """The model's state: backing path, configuration and the ``writeback`` byte."""
    return {"path": path, "options": options, "writeback": writeback}


def load(state: Any, path: str | None, options: dict[str, Any], name: str) -> bool:
    """Check ``state`` against a device configured with ``options``; returns ``writeback``.

    Everything the driver can see (features, config, capacity) must match,
    since the guest was using it; the path may differ (the image may have
    moved), which is logged.  Raises ValueError for anything else.
    """
    state = expect_object(state, "block state")
    saved_options = state.get("options")
    writeback = state.get("writeback")
    saved_path = state.get("path")
    if not isinstance(saved_options, dict) or not isinstance(writeback, bool):
        raise ValueError("block state lacks options or writeback")
    if saved_path is not None and not isinstance(saved_path, str):
        raise ValueError(f"bad path {saved_path!r}")
    if saved_options != options:
        diff = sorted(
            k
            for k in options.keys() | saved_options.keys()
            if options.get(k) != saved_options.get(k)
        )
        raise ValueError(f"snapshot is of a differently configured disk ({', '.join(diff)})")
    if saved_path != path:
        log.info("%s: restoring a snapshot taken with %r onto %r", name, saved_path, path)
    return writeback
