"""virtio-net snapshots: what a net device saves and what it accepts back.

Transmit work is finished before a snapshot (the model's sleep), and the
back end (a TAP, a socket) is the host's, so the state is what the driver
set and sees: address, link, receive filter, offloads, pairs in use; the
counters; and a received frame that waits for receive buffers, which would
be lost otherwise.  The configuration (base address, MTU, pairs, ring size)
must match the device it is restored into.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, NamedTuple

from pyvirtio.device import expect_bool, expect_object, expect_str, expect_uint
from pyvirtio.devices.net.control import RxFilter
from pyvirtio.devices.net.stats import STAT_KEYS
from pyvirtio.devices.net.wire import (
    ETH_HLEN,
    GUEST_OFFLOADS,
    HDR_SIZE,
    MAX_FRAME,
    format_mac,
    parse_mac,
)

__all__ = ["NetState", "load", "save"]


class NetState(NamedTuple):
    """The model's state in a snapshot."""

    mac: bytes
    link_up: bool
    #: A configuration change the driver was not told of yet (the device slept).
    config_change_pending: bool
    pairs: int
    guest_offloads: int
    rx_filter: RxFilter
    stats: dict[str, int]
    #: A received frame (header included) waiting for receive buffers, or b"".
    rx_pending: bytes
    rx_pending_pair: int


def save(options: dict[str, Any], state: NetState) -> dict[str, Any]:
    """The JSON document of ``state`` of a device configured with ``options``."""
    return {
        "options": options,
        "mac": format_mac(state.mac),
        "link_up": state.link_up,
        "config_change_pending": state.config_change_pending,
        "pairs": state.pairs,
        "guest_offloads": state.guest_offloads,
        "filter": state.rx_filter.to_json(),
        "stats": dict(state.stats),
        "rx_pending": base64.b64encode(state.rx_pending).decode("ascii"),
        "rx_pending_pair": state.rx_pending_pair,
    }


def load(doc: Any, options: dict[str, Any], max_pairs: int) -> NetState:
    """Check ``doc`` against a device configured with ``options``; ValueError if it does not fit."""
    try:
        doc = expect_object(doc, "net state")
        saved_options = doc["options"]
        if saved_options != options:
            raise ValueError(f"snapshot of a differently configured device: {saved_options!r}")
        pairs = expect_uint(doc["pairs"])
        if not 1 <= pairs <= max_pairs:
            raise ValueError(f"{pairs} queue pairs")
        offloads = expect_uint(doc["guest_offloads"])
        if offloads & ~GUEST_OFFLOADS:
            raise ValueError(f"offloads {offloads:#x}")
        stats = doc["stats"]
        # A snapshot taken before a counter existed restores with it at 0;
        # a counter this version does not know is refused.
        if not isinstance(stats, dict) or not set(stats) <= set(STAT_KEYS):
            raise ValueError("stats do not match")
        pending = base64.b64decode(expect_str(doc["rx_pending"]), validate=True)
        if pending and not HDR_SIZE + ETH_HLEN <= len(pending) <= HDR_SIZE + MAX_FRAME:
            raise ValueError(f"pending frame of {len(pending)} bytes")
        pending_pair = expect_uint(doc["rx_pending_pair"])
        if pending_pair >= pairs:
            raise ValueError(f"pending frame for pair {pending_pair}")
        return NetState(
            mac=parse_mac(expect_str(doc["mac"])),
            link_up=expect_bool(doc["link_up"]),
            config_change_pending=expect_bool(doc["config_change_pending"]),
            pairs=pairs,
            guest_offloads=offloads,
            rx_filter=RxFilter.from_json(doc["filter"]),
            stats={key: expect_uint(stats.get(key, 0)) for key in STAT_KEYS},
            rx_pending=pending,
            rx_pending_pair=pending_pair,
        )
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"malformed net state: {exc!r}") from exc
