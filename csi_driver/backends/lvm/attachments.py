"""The node side: a volume's block device, activating its LV when it is not active.

LVs stay active between stages (activation is cheap to keep, slow to repeat), and lvextend
resizes the device-mapper device itself, so detaching and refreshing do nothing.
"""

from __future__ import annotations

import os

from csi_driver.backends.lvm.inventory import Inventory, device_node
from csi_driver.errors import Internal
from csi_driver.model import Attachment, AttachmentKind


class Attachments:
    """The block devices of this node's volumes."""

    def __init__(self, inventory: Inventory) -> None:
        self._inv = inventory

    def attach(self, volume_id: str) -> Attachment:
        inv = self._inv
        with inv.keys.hold(inv.volume_local(volume_id)):
            lv, _ = inv.found_volume(inv.report(), volume_id)
            if not lv.active or not os.path.exists(device_node(lv)):
                inv.lvm.activate(lv.vg, lv.name)
                lv, _ = inv.found_volume(inv.report(), volume_id)
            device = device_node(lv)
            if not os.path.exists(device):
                raise Internal(
                    f"logical volume {lv.vg}/{lv.name} is active but {device} does not exist"
                    " (with udev synchronisation off, lvm2 must be allowed to create device"
                    " nodes: activation/udev_rules = 0 in lvm.conf)"
                )
            return Attachment(AttachmentKind.BLOCK_DEVICE, device)

    def locate(self, volume_id: str) -> Attachment | None:
        inv = self._inv
        with inv.keys.hold(inv.volume_local(volume_id)):
            lv, _ = inv.found_volume(inv.report(), volume_id)
        return Attachment(AttachmentKind.BLOCK_DEVICE, device_node(lv)) if lv.active else None
