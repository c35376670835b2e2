"""virtio-net counters: what :attr:`~.device.Net.stats` counts.

Frames and bytes each way, and every kind of drop, so that no frame a
driver or a peer sends disappears without a count.  The names are shared by
the checks that name a drop (:mod:`.frames`, :mod:`.receive`), the model
that counts and the snapshot that keeps them (:mod:`.persist`).
"""

from __future__ import annotations

__all__ = ["STAT_KEYS"]

#: Counters in :attr:`~.device.Net.stats`.
STAT_KEYS = (
    "tx_frames",
    "tx_bytes",
    "rx_frames",
    "rx_bytes",
    "tx_dropped_bad_chain",
    "tx_dropped_runt",
    "tx_dropped_oversize",
    "tx_dropped_bad_header",
    "tx_dropped_link_down",
    "tx_dropped_sleep",
    "tx_dropped_ring_disabled",
    "tx_backend_errors",
    "rx_dropped_filter",
    "rx_dropped_runt",
    "rx_dropped_oversize",
    "rx_dropped_offload",
    "rx_dropped_bad_header",
    "rx_dropped_no_room",
    "rx_dropped_reset",
    "rx_bad_chain",
    "rx_buffers_returned",
    "rx_backend_errors",
    "rx_checksums_completed",
    "ctrl_commands",
    "ctrl_errors",
    "ctrl_bad_chain",
    "backend_gone",
)
