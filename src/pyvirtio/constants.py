"""Numbers from the VIRTIO specification shared by every layer.

Feature bits (content.tex "Reserved Feature Bits"), device status bits
(content.tex "Device Status Field") and device IDs ("Device Types").
"""

from __future__ import annotations

import enum

__all__ = [
    "COMMON_FEATURES",
    "DeviceId",
    "DeviceStatus",
    "Feature",
    "FeatureBit",
    "feature_mask",
    "feature_names",
]


class FeatureBit(enum.IntEnum):
    """Base of every feature-bit enum: members are bit numbers, ``mask`` is the bit itself.

    Device types number their own bits from 0 (content.tex "Feature Bits"),
    vhost-user numbers its protocol features the same way; each derives its
    enum from this one.
    """

    @property
    def mask(self) -> int:
        return 1 << self.value


class Feature(FeatureBit):
    """Device-independent feature bit numbers (content.tex, "Reserved Feature Bits")."""

    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41


def feature_mask(*features: FeatureBit) -> int:
    """The feature bits of ``features`` together (of any one feature-bit enum)."""
    mask = 0
    for feature in features:
        mask |= feature.mask
    return mask


#: Features every pyvirtio device offers and every pyvirtio driver accepts
#: unless it says otherwise: VERSION_1 (pyvirtio implements no legacy
#: interface) and the ring features handled entirely by pyvirtio.virtqueue.
COMMON_FEATURES = feature_mask(
    Feature.VERSION_1, Feature.RING_PACKED, Feature.EVENT_IDX, Feature.INDIRECT_DESC
)


def feature_names(features: int) -> list[str]:
    """Names of the device-independent bits in ``features`` and numbers of the rest."""
    names: list[str] = []
    for bit in range(64):
        if features >> bit & 1:
            try:
                names.append(Feature(bit).name)
            except ValueError:
                names.append(str(bit))
    return names


class DeviceStatus(enum.IntFlag):
    """Device status field bits (content.tex, "Device Status Field")."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(enum.IntEnum):
    """Virtio device IDs (content.tex, "Device Types")."""

    INVALID = 0
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    FS = 26
    # Not assigned by the specification: pyvirtio's boot-timer latency device
    # uses an ID from the range the spec leaves unused, as its origin did.
    BOOT_TIMER = 0xFFFF
