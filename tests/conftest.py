"""Fixtures several test files share; helpers importable by tests are in ``helpers``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.block import DISK_SIZE, pattern
from helpers.queues import RecordingInterrupt
from pyvirtio.devices.entropy import Entropy

# -- block: a backing file ------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A DISK_SIZE image filled with ``pattern`` (the block device tests' disk)."""
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SIZE))
    return path


# -- vhost-user: socket paths, and a session's device, interrupt and eventfds ---------------


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A path for a vhost-user socket in a fresh temporary folder."""
    # AF_UNIX paths are limited to 108 bytes: keep them short.
    with tempfile.TemporaryDirectory(prefix="vu") as d:
        yield Path(d) / "s"


@pytest.fixture
def device() -> Entropy:
    """The model behind the vhost-user session tests: every byte it serves is 0xAB."""
    return Entropy(lambda n: b"\xab" * n)


@pytest.fixture
def interrupt() -> RecordingInterrupt:
    """What the device asked to signal, in order (the session tests' DeviceInterrupt)."""
    return RecordingInterrupt()


@pytest.fixture
def eventfds() -> Iterator[tuple[int, int]]:
    """A kick and a call eventfd for ring 0 of a session."""
    # The session only hands them over in actions: the host (here, the test) closes them.
    kick, call = os.eventfd(0), os.eventfd(0)
    yield kick, call
    os.close(kick)
    os.close(call)
