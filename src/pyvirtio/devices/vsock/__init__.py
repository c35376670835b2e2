"""virtio-vsock: the wire format shared with the driver (:mod:`.wire`), the
sans-IO connection state machine (:mod:`.connection`), the device model
(:mod:`.device`) and its Unix-socket host side (:mod:`.unix`).

This package's import is light on purpose: the driver library imports
:mod:`.wire` and :mod:`.connection` without pulling in the model or the host
side.  Import those from their modules.
"""
