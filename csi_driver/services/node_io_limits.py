"""IO limits of published volumes: the ``io.max`` line of the volume's device in the cgroup of
each Pod it is published to.

Which Pod. NodePublishVolume names it (``csi.storage.k8s.io/pod.uid`` in the volume context,
sent when the CSIDriver has ``podInfoOnMount: true``). NodeUnpublishVolume and a modification
do not, so the Pod is read from the target path, which the kubelet builds from the Pod's uid:
``<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`` (mount access) and
``<kubelet-dir>/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<uid>`` (block access).
A publication of a volume with IO limits must therefore carry the uid, and its target path
must name the same Pod; otherwise it is refused, since a limit that could never be found
again would outlive its publication.

When. At NodePublishVolume, after the mount or bind (also when the retry finds it done); at
ControllerModifyVolume, which the node plugin serves for its own volumes, for every
publication of the volume in the mount table (:meth:`NodeIoLimits.reapply`, under the
volume's lock); at NodeUnpublishVolume, after the unmount, from the target path alone, so that
a retry after a kill between the two steps still finds the line and removes it. Each step
writes one line and is idempotent.

Scope. The line is written on the Pod's own cgroup, so the limit is shared by every container
of the Pod, for IO to this volume's device only. Nothing else in ``io.max`` is touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from csi_driver import bounded, model
from csi_driver.backends import mutable
from csi_driver.backends.base import Backend
from csi_driver.errors import FailedPrecondition, InvalidArgument
from csi_driver.services.node_volumes import NodeVolumes
from csi_driver.system.cgroup_io import CgroupError, CgroupIo, IoLimits, block_device, is_pod_uid

log = logging.getLogger(__name__)

#: the volume-context key the kubelet fills in with podInfoOnMount
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
_POD_VOLUMES = ("volumes", "kubernetes.io~csi")
_BLOCK_PUBLISH = ("plugins", "kubernetes.io", "csi", "volumeDevices", "publish")


def pod_of_target(kubelet_dir: Path, path: str) -> str | None:
    """The uid of the Pod whose kubelet target path ``path`` is, or None for another path."""
    for base in dict.fromkeys((str(kubelet_dir), os.path.realpath(kubelet_dir))):
        relative = os.path.relpath(os.path.normpath(path), base)
        if relative.startswith(".."):
            continue
        parts = tuple(relative.split(os.sep))
        if (
            len(parts) == 6
            and parts[0] == "pods"
            and parts[2:] == (*_POD_VOLUMES, parts[4], "mount")
        ):
            uid = parts[1]
        elif len(parts) == 7 and parts[:5] == _BLOCK_PUBLISH:
            uid = parts[6]
        else:
            continue
        return uid if is_pod_uid(uid) else None
    return None


class NodeIoLimits:
    def __init__(
        self, volumes: NodeVolumes, backend: Backend, kubelet_dir: Path, cgroup: CgroupIo
    ) -> None:
        self._volumes = volumes
        self._backend = backend
        self._kubelet_dir = kubelet_dir
        self.cgroup = cgroup

    def check(
        self,
        volume: model.Volume,
        attachment: model.Attachment,
        target_path: str,
        volume_context: dict[str, str],
    ) -> str | None:
        """Before a publication is made: the cgroup of the Pod its limits go to (None when
        the volume has no limits). Everything that can refuse the publication is checked
        here, so that a refusal leaves no mount behind that the kubelet would never
        unpublish."""
        limits = mutable.io_limits(volume.parameters)
        if not limits.any:
            return None
        uid = volume_context.get(POD_UID_KEY, "")
        if not uid:
            raise FailedPrecondition(
                f"volume {volume.id!r} has IO limits, but volume_context carries no {POD_UID_KEY}"
                " to find the Pod's cgroup; the CSIDriver object needs podInfoOnMount: true"
            )
        if not is_pod_uid(uid):
            raise InvalidArgument(f"volume_context {POD_UID_KEY} {bounded.echo(uid)} is not a UUID")
        if pod_of_target(self._kubelet_dir, target_path) != uid:
            raise InvalidArgument(
                f"volume {volume.id!r} has IO limits, and target_path {bounded.echo(target_path)}"
                f" is not the kubelet's path for pod {uid} (pods/<uid>/volumes/... or"
                " .../volumeDevices/publish/<pv>/<uid>), where unpublishing would find it again"
            )
        return self._pod_cgroup(volume, attachment, uid)

    def publish(self, volume: model.Volume, attachment: model.Attachment, cgroup: str) -> None:
        """Once the publication is made: set the volume's limits in the Pod's ``cgroup``
        (from :meth:`check`)."""
        self._write(volume, attachment, cgroup, mutable.io_limits(volume.parameters))

    def unpublish(
        self, volume: model.Volume, attachment: model.Attachment | None, target_path: str
    ) -> None:
        """Remove the line of the volume's device from the Pod of ``target_path``; only for a
        volume with limits (a line on a device of a volume without them is not this
        driver's: a modification to no limit removed its own)."""
        if not mutable.io_limits(volume.parameters).any:
            return
        uid = pod_of_target(self._kubelet_dir, target_path)
        if uid is None or attachment is None or self.cgroup.problem() is not None:
            return
        if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            return
        try:
            cgroup = self.cgroup.pod_cgroup(uid)
            if cgroup is not None and self.cgroup.clear(cgroup, block_device(attachment.path)):
                log.info("removed IO limits", extra={"pod_uid": uid, "cgroup": cgroup})
        except (CgroupError, OSError) as exc:
            log.warning(f"IO limits of pod {uid} left in place: {exc}")

    def reapply(self, volume: model.Volume) -> None:
        """After a modification: the volume's limits, now, for every Pod it is published to.
        A publication whose Pod has no cgroup any more (it ended; the kubelet has not
        unpublished yet) is skipped: the stored change holds for the next publication."""
        attachment = self._backend.locate(volume.id)
        if attachment is None or attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            return
        limits = mutable.io_limits(volume.parameters)
        problem = self.cgroup.problem()
        if problem is not None:
            if limits.any:
                raise FailedPrecondition(f"volume {volume.id!r} has IO limits, but {problem}")
            return
        if volume.access_type is model.AccessType.BLOCK:
            key = self._volumes.device_node_key(os.path.realpath(attachment.path))
        else:
            key = self._volumes.source_key(attachment)
        device = block_device(attachment.path)
        for path in self._volumes.publications(key, []):
            uid = pod_of_target(self._kubelet_dir, path)
            if uid is None:
                continue
            try:
                cgroup = self.cgroup.pod_cgroup(uid)
                if cgroup is None:
                    log.info(f"pod {uid} of {path} has no cgroup any more: its IO limits skipped")
                elif limits.any:
                    self._write(volume, attachment, cgroup, limits)
                else:
                    self.cgroup.clear(cgroup, device)
            except (CgroupError, OSError) as exc:
                raise FailedPrecondition(
                    f"the IO limits of volume {volume.id!r} cannot be set for pod {uid}: {exc}"
                ) from exc

    def _pod_cgroup(self, volume: model.Volume, attachment: model.Attachment, uid: str) -> str:
        problem = self.cgroup.problem()
        if problem is not None:
            raise FailedPrecondition(f"volume {volume.id!r} has IO limits, but {problem}")
        if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            raise FailedPrecondition(
                f"volume {volume.id!r} has IO limits but no block device of its own"
            )
        try:
            block_device(attachment.path)
            cgroup = self.cgroup.pod_cgroup(uid)
        except (CgroupError, OSError) as exc:
            raise FailedPrecondition(
                f"the IO limits of volume {volume.id!r} cannot be set for pod {uid}: {exc}"
            ) from exc
        if cgroup is None:
            raise FailedPrecondition(
                f"no cgroup of pod {uid} below {self.cgroup.root} (kubepods.slice/... or"
                f" kubepods/...) to set the IO limits of volume {volume.id!r} in; is it running"
                " on this node?"
            )
        return cgroup

    def _write(
        self, volume: model.Volume, attachment: model.Attachment, cgroup: str, limits: IoLimits
    ) -> None:
        try:
            device = block_device(attachment.path)
            self.cgroup.set_limits(cgroup, device, limits)
        except (CgroupError, OSError) as exc:
            raise FailedPrecondition(
                f"the IO limits of volume {volume.id!r} cannot be set in {cgroup}: {exc}"
            ) from exc
        log.info(
            "set IO limits",
            extra={"volume_id": volume.id, "cgroup": str(cgroup), "io_max": limits.line(device)},
        )


__all__ = ["POD_UID_KEY", "NodeIoLimits", "pod_of_target"]
