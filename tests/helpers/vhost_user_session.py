"""A front end played by the test, for the tests of VhostUserSession without a socket.

:class:`FrontEnd` owns the front end's memory (a memfd the session maps too,
its fd travelling in SET_MEM_TABLE as over a socket) and sends messages
straight to the session's ``receive``; its ring is a SplitDriverQueue at the
fixed addresses below.
"""

from __future__ import annotations

import os

from pyvirtio.constants import Feature
from pyvirtio.memory import GuestMemory
from pyvirtio.transport.vhost_user.actions import Action, CloseFds, Reply
from pyvirtio.transport.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Message,
    MessageParser,
    Payload,
    VringAddr,
    VringState,
    vring_fd_payload,
)
from pyvirtio.transport.vhost_user.session import VhostUserSession
from pyvirtio.virtqueue.packed import PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDriverQueue

R = FrontendRequest
MEM_SIZE = 1 << 20
#: The front end's own address of guest address 0 (what SET_VRING_ADDR uses).
USER_BASE = 0x7F00_0000_0000
QUEUE_SIZE = 16
DESC, AVAIL, USED, BUFFER = 0x1000, 0x2000, 0x3000, 0x10000
#: SET_VRING_BASE of a packed ring at its start: avail and used halves at 0, wrap counters 1.
PACKED_START = 0x8000_8000


def close_session(session: VhostUserSession) -> None:
    """Close ``session`` and, as its host would, the fds it hands back to close."""
    for action in session.close():
        assert isinstance(action, CloseFds)
        for fd in action.fds:
            os.close(fd)


class FrontEnd:
    """The test's front end: its memory, and helpers to talk to ``session``."""

    def __init__(self, session: VhostUserSession) -> None:
        self.session = session
        self.mem = GuestMemory.memfd(MEM_SIZE)
        self.replies = MessageParser(FrontendRequest, replies=True)

    def send(
        self, request: R, payload: Payload = None, *, fds: tuple[int, ...] = (), ack: bool = False
    ) -> list[Action]:
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        return self.session.receive(Message(request, payload, flags, fds))

    def reply(self, actions: list[Action]) -> Payload:
        (reply,) = [a for a in actions if isinstance(a, Reply)]
        (message,) = self.replies.feed(reply.data, [])
        return message.payload

    def memfd(self) -> int:
        fd = self.mem.regions[0].fd
        assert fd is not None
        return os.dup(fd)

    def set_up_ring(self, *, kick_fd: int, call_fd: int, packed: bool = False) -> list[Action]:
        """Features, memory and ring 0, as QEMU sends them; the actions of the last steps.

        ``packed``: the ring is packed (RING_PACKED negotiated), positioned
        at the start (both wrap counters 1, as QEMU sends them).
        """
        self.send(R.SET_OWNER)
        # Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; the
        # plain driver queues below use neither event index nor indirect.
        unused = Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask
        if not packed:
            unused |= Feature.RING_PACKED.mask
        self.send(R.SET_FEATURES, self.session.device.offered_features & ~unused)
        self.send(
            R.SET_MEM_TABLE,
            MemoryTable((MemoryRegionDesc(0, MEM_SIZE, USER_BASE, 0),)),
            fds=(self.memfd(),),
        )
        self.send(R.SET_VRING_NUM, VringState(0, QUEUE_SIZE))
        addr = VringAddr(0, 0, USER_BASE + DESC, USER_BASE + USED, USER_BASE + AVAIL)
        self.send(R.SET_VRING_ADDR, addr)
        self.send(R.SET_VRING_BASE, VringState(0, PACKED_START if packed else 0))
        actions = self.send(R.SET_VRING_CALL, vring_fd_payload(0, call_fd), fds=(call_fd,))
        actions += self.send(R.SET_VRING_KICK, vring_fd_payload(0, kick_fd), fds=(kick_fd,))
        return actions

    def driver_queue(self) -> SplitDriverQueue:
        return SplitDriverQueue(self.mem, QUEUE_SIZE, DESC, AVAIL, USED)

    def packed_driver_queue(self) -> PackedDriverQueue:
        """The packed ring of ``set_up_ring(packed=True)``: driver area AVAIL, device area USED."""
        return PackedDriverQueue(self.mem, QUEUE_SIZE, DESC, AVAIL, USED)
