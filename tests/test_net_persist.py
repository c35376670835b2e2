"""What a virtio-net snapshot holds, and what a restore refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers.net import DEV_MAC, frame_of
from pyvirtio.devices.net import persist
from pyvirtio.devices.net.control import RxFilter
from pyvirtio.devices.net.stats import STAT_KEYS
from pyvirtio.devices.net.wire import HDR_SIZE, NetHeader

OPTIONS = {"base_mac": "02:00:00:00:00:01", "mtu": 1500, "queue_pairs": 2, "queue_size": 256}


def state(**changes: Any) -> persist.NetState:
    base = persist.NetState(
        mac=DEV_MAC,
        link_up=True,
        config_change_pending=False,
        pairs=2,
        guest_offloads=2,
        rx_filter=RxFilter(promisc=False, unicast=[bytes.fromhex("0200000000aa")]),
        stats={key: i for i, key in enumerate(STAT_KEYS)},
        rx_pending=NetHeader().pack() + frame_of(60),
        rx_pending_pair=1,
    )
    return base._replace(**changes)


def test_a_state_comes_back_whole_through_json() -> None:
    doc = json.loads(json.dumps(persist.save(OPTIONS, state())))
    assert persist.load(doc, OPTIONS, 2) == state()


def test_a_counter_newer_than_the_snapshot_restores_at_zero() -> None:
    doc = persist.save(OPTIONS, state())
    del doc["stats"]["backend_gone"]
    assert persist.load(doc, OPTIONS, 2).stats["backend_gone"] == 0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(options={**OPTIONS, "mtu": 9000}), "differently configured"),
        (lambda d: d.update(pairs=3), "3 queue pairs"),
        (lambda d: d.update(guest_offloads=1), "offloads 0x1"),
        (lambda d: d["stats"].update(unknown=1), "stats do not match"),
        (lambda d: d.update(rx_pending="AAAA"), "pending frame of 3 bytes"),
        (lambda d: d.update(rx_pending_pair=2), "pending frame for pair 2"),
        (lambda d: d.update(rx_pending="!"), "malformed"),
        (lambda d: d.pop("mac"), "malformed"),
        (lambda d: d.update(link_up="yes"), "yes"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(change: Any, why: str) -> None:
    doc = persist.save(OPTIONS, state())
    change(doc)
    with pytest.raises(ValueError, match=why):
        persist.load(doc, OPTIONS, 2)


def test_no_pending_frame_is_allowed() -> None:
    doc = persist.save(OPTIONS, state(rx_pending=b""))
    assert persist.load(doc, OPTIONS, 2).rx_pending == b""
    assert len(state().rx_pending) == HDR_SIZE + 60
