"""virtio-net receive steering with several queue pairs (device-types/net: Control
Virtqueue, Automatic receive steering in multiqueue mode).

"The device SHOULD place packets of a flow on the receiveq of the transmitq
the flow was last seen on": a :class:`FlowTable` remembers, per IP flow, the
pair whose transmitq last sent it, and answers for received frames; a flow
it never saw goes to a pair by hash.  A flow is keyed by :func:`flow_key`,
the same in both directions.  Pure bookkeeping: the model decides which
pairs are in use and enabled.
"""

from __future__ import annotations

from pyvirtio.devices.net.wire import ETH_HLEN, VLAN_HLEN

__all__ = ["FLOW_KEY_BYTES", "FLOW_TABLE_SIZE", "FlowTable", "flow_key"]

#: Flows remembered; a full table starts again empty.
FLOW_TABLE_SIZE = 4096
#: Frame bytes a key is read from: Ethernet, a VLAN tag, IPv6, ports.
FLOW_KEY_BYTES = 128

_ETHERTYPE_VLAN = b"\x81\x00"
_ETHERTYPE_IPV4 = b"\x08\x00"
_ETHERTYPE_IPV6 = b"\x86\xdd"
_PROTO_TCP = 6
_PROTO_UDP = 17


class FlowTable:
    """Flow key -> the pair whose transmitq the flow last used."""

    __slots__ = ("_flows",)

    def __init__(self) -> None:
        self._flows: dict[bytes, int] = {}

    def remember(self, frame: bytes | bytearray | memoryview, pair: int) -> None:
        """The frame's flow was sent from ``pair``."""
        key = flow_key(frame)
        if key is None:
            return
        if len(self._flows) >= FLOW_TABLE_SIZE:
            self._flows.clear()
        self._flows[key] = pair

    def steer(self, frame: bytes | bytearray | memoryview, pairs: int) -> int:
        """The pair (below ``pairs``) a received frame goes to."""
        key = flow_key(frame)
        if key is None:
            return 0
        pair = self._flows.get(key, -1)
        return pair if 0 <= pair < pairs else hash(key) % pairs

    def clear(self) -> None:
        self._flows.clear()


def flow_key(frame: bytes | bytearray | memoryview) -> bytes | None:
    """A direction-independent key of an IP flow (addresses, protocol, TCP/UDP ports)."""
    data = bytes(frame)
    if len(data) < ETH_HLEN:
        return None
    ethertype = data[12:14]
    off = ETH_HLEN
    if ethertype == _ETHERTYPE_VLAN and len(data) >= off + VLAN_HLEN:
        ethertype = data[16:18]
        off += VLAN_HLEN
    if ethertype == _ETHERTYPE_IPV4 and len(data) >= off + 20:
        ihl = (data[off] & 0x0F) * 4
        proto = data[off + 9]
        src, dst = data[off + 12 : off + 16], data[off + 16 : off + 20]
        fragment = int.from_bytes(data[off + 6 : off + 8], "big") & 0x3FFF
        ports_at = off + ihl if proto in (_PROTO_TCP, _PROTO_UDP) and not fragment else -1
    elif ethertype == _ETHERTYPE_IPV6 and len(data) >= off + 40:
        proto = data[off + 6]
        src, dst = data[off + 8 : off + 24], data[off + 24 : off + 40]
        ports_at = off + 40 if proto in (_PROTO_TCP, _PROTO_UDP) else -1
    else:
        return None
    sport = dport = b""
    if ports_at >= 0 and len(data) >= ports_at + 4:
        sport, dport = data[ports_at : ports_at + 2], data[ports_at + 2 : ports_at + 4]
    a, b = src + sport, dst + dport
    return bytes([proto]) + min(a, b) + max(a, b)
