"""The per-volume gauges of the hostpath backend where XFS project quotas enforce sizes: a
volume's series show its own limit and use, as NodeGetVolumeStats (``statvfs`` of the volume's
directory) does. Runs only inside the real-kernel VM lane, on the quota-enabled XFS root of
test_hostpath_quota.py, with the backend in this process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.metrics import Metrics
from csi_driver.model import AccessType, VolumeSpec
from csi_driver.storage_metrics import StorageCollector
from csi_driver.system import fsinfo
from csi_driver.units import MiB

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

from tests.vm.test_hostpath_quota import Backends, backends, fill, xfs_mount  # noqa: F401

pytestmark = pytest.mark.vm


def page(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render())
        for s in family.samples
    }


def test_hostpath_quota_volume_metrics(backends: Backends) -> None:  # noqa: F811
    backend = backends.open()
    volume = backend.create_volume(VolumeSpec("metrics-vol", 64 * MiB, AccessType.MOUNT, "xfs"))
    path = Path(backend.attach(volume.id).path)
    fill(path / "data", 8 * MiB)

    metrics = Metrics()
    metrics.add_collector(StorageCollector(backend.storage_report, backend.health, ttl=0.0))
    seen = page(metrics)
    label = (("volume_id", volume.id),)
    usage = fsinfo.usage(path)  # what NodeGetVolumeStats reads through the volume's mount
    assert seen[("csi_driver_volume_capacity_bytes", label)] == 64 * MiB == usage.total_bytes
    assert seen[("csi_driver_volume_used_bytes", label)] == usage.used_bytes >= 8 * MiB
    assert seen[("csi_driver_volume_inodes", label)] == usage.total_inodes
    assert seen[("csi_driver_volume_inodes_used", label)] == usage.used_inodes >= 1
    hostpath = (("device_class", "hostpath"),)
    assert seen[("csi_driver_capacity_allocated_bytes", hostpath)] == 64 * MiB
    assert seen[("csi_driver_volumes", hostpath)] == 1
    assert seen[("csi_driver_ready", ())] == 1
