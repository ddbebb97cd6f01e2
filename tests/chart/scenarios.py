"""The value sets every chart test runs against."""

from __future__ import annotations

from typing import Any

LVM_CLASSES: list[dict[str, Any]] = [
    {
        "name": "fast",
        "volumeGroup": "vg-nvme",
        "thinPool": "pool0",
        "default": True,
        "overprovisionRatio": 4.0,
        "reservedBytes": 1073741824,
        "storageClass": {
            "create": True,
            "name": "",
            "isDefault": True,
            "fsType": "xfs",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowedNodes": ["node-a", "node-b"],
            "parameters": {"wipeOnDelete": "true"},
        },
    },
    {
        "name": "bulk",
        "volumeGroup": "vg-hdd",
        "lvType": "raid1",
        "storageClass": {
            "create": True,
            "name": "bulk-mirrored",
            "isDefault": False,
            "fsType": "ext4",
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowedNodes": [],
            "parameters": {"mirrors": "1"},
        },
    },
]

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "hostpath-only": {
        "backend": "hostpath",
        "hostpath": {"capacityBytes": 107374182400, "storageClass": {"allowedNodes": ["node-a"]}},
    },
    "lvm-only": {"backend": "lvm"},
    "lvm-classes-nsenter-udev": {
        "backend": "lvm",
        "lvm": {"nsenter": True, "udevSync": True, "deviceClasses": LVM_CLASSES},
    },
    "attach-on": {"csiDriver": {"attachRequired": True}},
    "attach-off": {"csiDriver": {"attachRequired": False}},
    "snapshots-on": {"snapshots": {"enabled": True}},
    "snapshots-off": {"snapshots": {"enabled": False}},
    "modify-policed": {"modify": {"networkPolicy": True, "port": 9900}},
    "modify-off": {"modify": {"enabled": False}},
    "health-monitor-on": {"healthMonitor": {"enabled": True}},
    "renamed-driver": {
        "driverName": "edge.storage.example.org",
        "kubeletDir": "/var/lib/k0s/kubelet",
        "kubeletCgroupRoot": "/edge.slice",
        "backend": "lvm",
        "csiDriver": {"attachRequired": True},
    },
}
