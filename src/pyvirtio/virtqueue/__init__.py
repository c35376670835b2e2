"""Virtqueues: one module per ring format, each holding the device and driver side.

The package re-exports :mod:`.common`, what both formats share.
"""

from __future__ import annotations

from pyvirtio.virtqueue.common import *  # noqa: F403
from pyvirtio.virtqueue.common import __all__ as __all__
