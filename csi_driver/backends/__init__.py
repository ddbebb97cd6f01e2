"""Backend selection: the only place that knows which backend classes exist."""

from __future__ import annotations

from csi_driver.backends.base import Backend
from csi_driver.config import BackendKind, Config
from csi_driver.system.runner import Runner, SubprocessRunner

NSENTER_PREFIX = ("nsenter", "--mount=/proc/1/ns/mnt", "--")


def build_backend(config: Config, runner: Runner) -> Backend:
    """Construct the configured backend. Imports are local so one backend's tools are not
    needed to run the other."""
    if config.backend is BackendKind.HOSTPATH:
        from csi_driver.backends.hostpath.backend import HostPathBackend

        assert config.hostpath is not None
        hostpath: Backend = HostPathBackend(
            config.hostpath.root, config.hostpath.capacity_bytes, config.node_id, runner
        )
        return hostpath
    from csi_driver.backends.lvm.backend import LvmBackend
    from csi_driver.backends.lvm.classes import load_device_classes

    assert config.lvm is not None
    lvm_runner = runner
    if config.lvm.use_nsenter and isinstance(runner, SubprocessRunner):
        lvm_runner = SubprocessRunner(
            prefix=NSENTER_PREFIX, observer=runner.observer, extra_env=runner.extra_env
        )
    lvm: Backend = LvmBackend(
        load_device_classes(config.lvm),
        config.node_id,
        lvm_runner,
        udev_sync=config.lvm.udev_sync,
    )
    return lvm
