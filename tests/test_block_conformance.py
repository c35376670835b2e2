"""The device conformance kit (pyvirtio.testing) applied to virtio-blk."""

from __future__ import annotations

import tempfile

from pyvirtio.devices.block import CONFIG_WRITEBACK_OFFSET, Block
from pyvirtio.testing import device_conformance
from pyvirtio.workers import IoWorkers

# One image for every device the kit makes: a restored snapshot must describe
# the same disk (same path and capacity) as the device it is restored into.
# It lives as long as the module: the kit's factory takes no fixtures.
_IMAGE = tempfile.NamedTemporaryFile(prefix="pyvirtio-blk-conformance-", suffix=".img")  # noqa: SIM115
_IMAGE.truncate(1 << 20)

TestBlockConformance = device_conformance(
    lambda: Block(_IMAGE.name, serial="conformance"),
    modify=lambda device: device.write_config(CONFIG_WRITEBACK_OFFSET, b"\0"),
)

# The same kit with worker threads lent: the multi-consumer path must leave
# the lifecycle (sleep, wake, snapshot, restore, reset) exactly as it was.
_WORKERS = IoWorkers(2, name="conformance-io")

TestBlockWithWorkersConformance = device_conformance(
    lambda: Block(_IMAGE.name, serial="conformance", io_workers=_WORKERS, io_parallel_min=512),
    modify=lambda device: device.write_config(CONFIG_WRITEBACK_OFFSET, b"\0"),
)
