"""What the tests share: rigs, builders, test devices and scripted peers.

- :mod:`helpers.queues`: a device model activated directly on ring pairs (``DirectRig``).
- :mod:`helpers.split`, :mod:`helpers.packed`: ring layouts and descriptor builders.
- :mod:`helpers.mmio_devices`: small device models for the MMIO transport and driver tests.
- :mod:`helpers.mmio`: an MMIO transport driven register by register (``Harness``).
- :mod:`helpers.block`, :mod:`helpers.net`, :mod:`helpers.vsock`: per-device rigs and
  request or frame builders.
- :mod:`helpers.vhost_user`: a back end served in a thread and a scripted front end.
- :mod:`helpers.vhost_user_session`: a front end played against a socket-less session.

Fixtures used by several test files are in ``tests/conftest.py``.
"""
