"""Small test-only device models for the MMIO transport, driver and conformance-kit tests."""

from __future__ import annotations

from typing import Any

from pyvirtio.constants import DeviceId, Feature
from pyvirtio.device import COMMON_FEATURES, ActivationError, QueueResources, VirtioDevice
from pyvirtio.virtqueue.common import DeviceQueue, VirtqueueError
from pyvirtio.virtqueue.disabled import DisabledQueue


class EchoDevice(VirtioDevice):
    """Copies each request's readable bytes into its writable part.

    Two queues (max sizes ``sizes``), an 8-byte config space ``config``
    (writable), an optional shared memory region, and switches tests use to
    make it misbehave.
    """

    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        features: int = COMMON_FEATURES,
        sizes: tuple[int, ...] = (16, 8),
        *,
        shm: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(features, sizes)
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.shm = shm or []
        self.echoed = 0
        self.refuse_activation = False
        self.require_all_queues = False
        self.acceptable: bool | None = None
        self.raise_in_notify: Exception | None = None
        self.swallow_errors = False
        self.activated_with: list[DeviceQueue] = []

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data
        del self.config[8:]

    def features_acceptable(self, features: int) -> bool:
        if self.acceptable is not None:
            return self.acceptable
        return super().features_acceptable(features)

    def shared_memory_regions(self) -> list[tuple[int, int]]:
        return list(self.shm)

    def _on_activate(self, resources: QueueResources) -> None:
        if self.refuse_activation:
            raise ActivationError("refused by test")
        if self.require_all_queues and any(isinstance(q, DisabledQueue) for q in resources.queues):
            raise ActivationError("all queues needed")
        self.activated_with = list(resources.queues)

    def _process_queue(self, index: int, queue: DeviceQueue) -> None:
        if self.raise_in_notify is not None:
            raise self.raise_in_notify
        try:
            while (chain := queue.pop()) is not None:
                written = chain.write(chain.read_all())
                queue.add_used(chain, written)
                self.echoed += 1
        except VirtqueueError:
            if not self.swallow_errors:
                raise
            return
        self.signal_used(index)

    def _snapshot_model(self) -> Any:
        return {"echoed": self.echoed, "config": self.config.hex()}

    def _restore_model(self, state: Any) -> None:
        self.echoed = int(state["echoed"])
        self.config = bytearray.fromhex(state["config"])


class CounterDevice(VirtioDevice):
    """No queues, a 4-byte config counter; ``bump`` changes config (and generation)."""

    device_id = DeviceId.ENTROPY

    def __init__(self) -> None:
        super().__init__(Feature.VERSION_1.mask, ())
        self.counter = 0

    def config_bytes(self) -> bytes:
        return self.counter.to_bytes(4, "little")

    def bump(self) -> None:
        self.counter += 1
        self.config_changed()

    def _snapshot_model(self) -> Any:
        return self.counter

    def _restore_model(self, state: Any) -> None:
        self.counter = int(state)
