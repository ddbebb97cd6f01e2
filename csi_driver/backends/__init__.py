"""Backend selection: the only place that knows which backend classes exist."""

from __future__ import annotations

import dataclasses

from csi_driver.backends.base import Backend
from csi_driver.config import BackendKind, Config
from csi_driver.system.cgroup_io import CgroupIo
from csi_driver.system.runner import SubprocessRunner

NSENTER_PREFIX = ("nsenter", "--mount=/proc/1/ns/mnt", "--")


def build_backend(config: Config, runner: SubprocessRunner, cgroup: CgroupIo) -> Backend:
    """Construct the configured backend. Imports are local so one backend's tools are not
    needed to run the other."""
    if config.backend is BackendKind.HOSTPATH:
        from csi_driver.backends.hostpath.backend import HostPathBackend

        assert config.hostpath is not None
        hostpath: Backend = HostPathBackend(
            config.hostpath.root,
            config.hostpath.capacity_bytes,
            config.node_id,
            runner,
            cgroup=cgroup,
        )
        return hostpath
    from csi_driver.backends.lvm.backend import LvmBackend

    assert config.lvm is not None
    lvm: Backend = LvmBackend(
        config.lvm.device_classes,
        config.node_id,
        # lvm2 in the host's mount namespace: its lvm.conf, metadata archives and tools
        dataclasses.replace(runner, prefix=NSENTER_PREFIX) if config.lvm.use_nsenter else runner,
        udev_sync=config.lvm.udev_sync,
        thin_pool_threshold=config.lvm.thin_pool_threshold,
        cgroup=cgroup,
    )
    return lvm
