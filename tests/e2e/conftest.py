"""Shared fixtures for tests that boot real Linux guests under QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyvirtio.vmm.guest import GuestArtifacts, GuestBuildError, build_guest
from pyvirtio.vmm.qemu import kvm_runs_linux


@pytest.fixture(scope="session")
def guest() -> GuestArtifacts:
    """The Debian cloud kernel and base initramfs (built once, cached)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: `make test` installs qemu-system-x86")
    try:
        return build_guest(progress=None)
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the guest artifacts: {exc}")


@pytest.fixture(scope="session")
def accel(guest: GuestArtifacts) -> str:
    """KVM when it can boot Linux here, TCG otherwise."""
    ok, _reason = kvm_runs_linux(guest)
    return "kvm" if ok else "tcg"


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path
