"""The storage report of the hostpath backend (the metrics): its root as one class, and the
directory volumes whose size is enforced.

The root is the class ``hostpath``; its numbers follow GetCapacity's rule (root.py): the
budget is the configured capacity or the filesystem's size, ``allocated`` is the one-row total
the database keeps, and what is available is the budget not promised yet, never more than the
filesystem has free. Reading them costs a ``statvfs`` and two small queries.

A directory volume's usage can be told apart from its neighbours' by a ``statvfs`` only where
XFS or ext4 project quotas enforce its size: ``statvfs`` of its directory then answers with
the project's limit and use. Elsewhere every volume would show the whole root's filesystem,
so none is reported (NodeGetVolumeStats walks such a volume instead, limits.py: too dear for
every scrape); block volumes are images, whose usage inside is the node's business, not a
``statvfs``'s.
"""

from __future__ import annotations

from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.store import State
from csi_driver.model import AccessType, ClassCapacity, StorageReport, VolumeStat
from csi_driver.system import fsinfo
from csi_driver.system_errors import system_errors

#: the device_class label of the hostpath root
DEVICE_CLASS = "hostpath"


def storage_report(root: Root, enforced: bool, max_volumes: int) -> StorageReport:
    with system_errors(f"read the free space of {root.path}"):
        room = fsinfo.usage(root.path)
    allocated = root.store.allocated_bytes()
    # every row only when there are per-volume usages to read (enforced quotas)
    rows = root.store.volumes(State.READY) if enforced else []
    capacity = ClassCapacity(
        device_class=DEVICE_CLASS,
        size_bytes=root.budget(room),
        free_bytes=room.available_bytes,
        allocated_bytes=allocated,
        available_bytes=root.available_in(room, allocated),
        volumes=root.store.count_volumes(State.READY),
        snapshots=root.store.count_snapshots(State.READY),
    )
    stats: list[VolumeStat] = []
    skipped = 0
    for row in rows:
        if row.access_type is not AccessType.MOUNT:
            continue
        if len(stats) >= max_volumes:
            skipped += 1
            continue
        try:
            usage = fsinfo.usage(root.layout.volume(row.local_id))
        except fsinfo.FsInfoError:
            skipped += 1  # removed meanwhile, or unreadable: its condition says which
            continue
        stats.append(VolumeStat(root.id_of(row.local_id), usage))
    return StorageReport((capacity,), tuple(stats), skipped)
