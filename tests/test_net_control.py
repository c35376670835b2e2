"""virtio-net control commands parsed without a device, and the receive filter they set."""

from __future__ import annotations

import struct

import pytest

from helpers.net import BCAST, DEV_MAC, MCAST, OTHER_MAC
from pyvirtio.devices.net.control import (
    MAC_TABLE_ENTRIES,
    CtrlError,
    GuestOffloads,
    MacAddr,
    MacTable,
    QueuePairs,
    RxFilter,
    RxMode,
    parse_command,
)
from pyvirtio.devices.net.wire import (
    CTRL_GUEST_OFFLOADS_SET,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    NetFeature,
    mac_table,
)

F = NetFeature
#: Every feature a control command needs, and the offloads the tests set.
ALL = sum(
    f.mask
    for f in (F.CTRL_VQ, F.CTRL_RX, F.CTRL_RX_EXTRA, F.CTRL_MAC_ADDR, F.MQ, F.CTRL_GUEST_OFFLOADS)
) | (F.GUEST_CSUM.mask | F.GUEST_TSO4.mask)


def command(cls: int, cmd: int, data: bytes = b"") -> bytes:
    return bytes([cls, cmd]) + data


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (command(CtrlClass.RX, CtrlRx.PROMISC, b"\x00"), RxMode("promisc", False)),
        (command(CtrlClass.RX, CtrlRx.NOBCAST, b"\x05"), RxMode("nobcast", True)),
        (
            command(CtrlClass.MAC, CtrlMac.TABLE_SET, mac_table([OTHER_MAC], [MCAST, BCAST])),
            MacTable([OTHER_MAC], [MCAST, BCAST]),
        ),
        (command(CtrlClass.MAC, CtrlMac.ADDR_SET, OTHER_MAC), MacAddr(OTHER_MAC)),
        (command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 4)), QueuePairs(4)),
        (
            command(CtrlClass.GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, struct.pack("<Q", 2)),
            GuestOffloads(F.GUEST_CSUM.mask),
        ),
    ],
)
def test_commands_parse(raw: bytes, parsed: object) -> None:
    assert parse_command(raw, ALL, 4) == parsed


@pytest.mark.parametrize(
    ("raw", "features", "why"),
    [
        (b"\x00", ALL, "1-byte command"),
        (command(9, 0), ALL, "unsupported class 9"),
        (command(CtrlClass.RX, 17, b"\x01"), ALL, "unknown RX command"),
        (command(CtrlClass.RX, CtrlRx.PROMISC, b"\x01\x00"), ALL, "2 bytes of data, not 1"),
        (command(CtrlClass.RX, CtrlRx.ALLUNI, b"\x01"), F.CTRL_RX.mask, "CTRL_RX_EXTRA not"),
        (command(CtrlClass.MAC, CtrlMac.TABLE_SET, b"\x01\x00"), ALL, "MAC table truncated"),
        (command(CtrlClass.MAC, CtrlMac.TABLE_SET, struct.pack("<I", 2) + DEV_MAC), ALL,
         "MAC table of 2 entries truncated"),
        (command(CtrlClass.MAC, CtrlMac.TABLE_SET, mac_table([], []) + b"\0"), ALL,
         "1 bytes after the MAC tables"),
        (command(CtrlClass.MAC, CtrlMac.ADDR_SET, MCAST), ALL, "is a multicast address"),
        (command(CtrlClass.MAC, CtrlMac.ADDR_SET, DEV_MAC[:5]), ALL, "address of 5 bytes"),
        (command(CtrlClass.MAC, CtrlMac.ADDR_SET, DEV_MAC), F.CTRL_RX.mask,
         "CTRL_MAC_ADDR not negotiated"),
        (command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 5)), ALL,
         "5 pairs requested, the device has 4"),
        (command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 0)), ALL, "0 pairs"),
        (command(CtrlClass.GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, struct.pack("<Q", 1 << 8)),
         ALL, "not negotiated"),  # GUEST_TSO6 was not
        (command(CtrlClass.GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, struct.pack("<Q", 1 << 7)),
         ALL, "GUEST_TSO4 requires GUEST_CSUM"),
    ],
)  # fmt: skip
def test_bad_commands_are_refused_with_a_reason(raw: bytes, features: int, why: str) -> None:
    with pytest.raises(CtrlError, match=why):
        parse_command(raw, features, 4)


def test_the_filter_after_reset_is_promiscuous_then_follows_its_modes_and_tables() -> None:
    f = RxFilter()
    assert f.accepts(OTHER_MAC, DEV_MAC) and f.accepts(MCAST, DEV_MAC)
    f.promisc = False
    assert f.accepts(DEV_MAC, DEV_MAC) and f.accepts(BCAST, DEV_MAC)
    assert not f.accepts(OTHER_MAC, DEV_MAC) and not f.accepts(MCAST, DEV_MAC)
    f.set_tables([OTHER_MAC], [MCAST])
    assert f.accepts(OTHER_MAC, DEV_MAC) and f.accepts(MCAST, DEV_MAC)
    f.nobcast = f.nouni = f.nomulti = True
    assert not any(f.accepts(a, DEV_MAC) for a in (BCAST, DEV_MAC, OTHER_MAC, MCAST))


def test_a_table_too_long_accepts_its_whole_kind_and_survives_json() -> None:
    f = RxFilter(promisc=False)
    many = [bytes([0x02, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(MAC_TABLE_ENTRIES + 1)]
    f.set_tables(many, [MCAST])
    assert f.unicast_overflow and f.unicast == [] and not f.multicast_overflow
    assert f.accepts(bytes.fromhex("02ffffffffff"), DEV_MAC)
    assert RxFilter.from_json(f.to_json()) == f
    doc = f.to_json()
    assert doc["multicast"] == ["01:00:5e:00:00:01"]
    doc["multicast"] = ["01:00:5e:00:00:01"] * (MAC_TABLE_ENTRIES + 1)
    with pytest.raises(ValueError, match="bad multicast table"):
        RxFilter.from_json(doc)
    with pytest.raises(KeyError):
        RxFilter.from_json({"promisc": True})
