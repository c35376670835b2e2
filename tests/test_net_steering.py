"""Multiqueue receive steering: flow keys and the table of where each flow was last sent."""

from __future__ import annotations

import pytest

from helpers.net import DEV_MAC, IP_A, IP_B, PEER_MAC, arp_request, udp_frame
from pyvirtio.devices.net import steering
from pyvirtio.devices.net.steering import FlowTable, flow_key


def test_a_flow_has_one_key_both_ways_and_ports_tell_flows_apart() -> None:
    out = udp_frame(b"x", src=IP_A, dst=IP_B, sport=1000, dport=2000)
    back = udp_frame(b"y", src_mac=DEV_MAC, dst_mac=PEER_MAC, src=IP_B, dst=IP_A,
                     sport=2000, dport=1000)  # fmt: skip
    other = udp_frame(b"x", src=IP_A, dst=IP_B, sport=1001, dport=2000)
    assert flow_key(out) is not None
    assert flow_key(out) == flow_key(back)
    assert flow_key(out) != flow_key(other)
    assert flow_key(arp_request(PEER_MAC, IP_A, IP_B)) is None  # not IP
    assert flow_key(out[:10]) is None


def test_a_fragment_is_keyed_by_addresses_only() -> None:
    first = bytearray(udp_frame(b"x", sport=1000))
    later = bytearray(udp_frame(b"x", sport=1001))
    for frame in (first, later):
        frame[14 + 6] = 0x20  # more fragments
    assert flow_key(first) == flow_key(later)


def test_replies_follow_the_pair_a_flow_was_sent_from(monkeypatch: pytest.MonkeyPatch) -> None:
    table = FlowTable()
    sent = udp_frame(b"request", src=IP_B, dst=IP_A, sport=2000, dport=1000)
    reply = udp_frame(b"reply", src=IP_A, dst=IP_B, sport=1000, dport=2000)
    table.remember(sent, 3)
    assert table.steer(reply, 4) == 3
    assert table.steer(reply, 2) in (0, 1)  # fewer pairs now: by hash
    assert table.steer(arp_request(PEER_MAC, IP_A, IP_B), 4) == 0
    monkeypatch.setattr(steering, "FLOW_TABLE_SIZE", 1)
    table.remember(udp_frame(b"other", sport=5), 2)  # full: starts again empty
    assert table.steer(reply, 4) == hash(flow_key(reply)) % 4  # forgotten: by hash
