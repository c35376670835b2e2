"""virtio-balloon: the wire format shared with the driver (:mod:`.wire`), request
parsing and validation (:mod:`.request`) and the device model (:mod:`.device`).

This package's ``__init__`` imports nothing, so the driver library can use
:mod:`.wire` without loading the model.
"""
