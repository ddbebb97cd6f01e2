"""Scenario 9: the lvm backend under a real kubelet.

The chart is installed with ``backend=lvm`` on a second node of the cluster whose kubelet,
containerd and driver Pods run in a VM on Debian's kernel (vmnode.py: this host's kernel has no
device-mapper). The driver runs from the image the repository's Dockerfile builds, so the
image's own lvm2 (its configuration, locking, and the chart's udev setting) is what is tested.
The volume group has a thin pool (class ``thin``, the default) and room for thick volumes
(class ``thick``). Software emulation makes every step slow; the timings are recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from .cluster import Cluster
from .conftest import Release, Timings, _image_list, helm_values
from .kube import SNAPSHOT_GROUP, Kube, quantity, raw, unique, wait_until
from .nodeconfig import CGROUP_ROOT
from .vmnode import GUEST_KUBELET_DIR, THINPOOL, VG, VM_NODE, VmNode

DRIVER = "lvm.nodelocal.csi.dev"
NAMESPACE = "nodelocal-csi-lvm"
THIN, THICK = "nodelocal-lvm-thin", "nodelocal-lvm-thick"
SNAPSHOT_CLASS = "nodelocal-lvm-snapshot"
OVERPROVISION = 2
MiB = 1024 * 1024
# Everything is about 13 times slower in the VM than on this host.
SLOW = 420.0
WRITE = (
    "dd if=/dev/urandom of=/data/payload bs=64k count=16 2>/dev/null && sync && "
    "sha256sum /data/payload | cut -d' ' -f1"
)
READ = "sha256sum /data/payload | cut -d' ' -f1"


def lvm_values(cluster: Cluster) -> dict[str, Any]:
    on_vm = {"nodeSelector": {"kubernetes.io/hostname": VM_NODE}}
    return helm_values(
        cluster,
        driverName=DRIVER,
        backend="lvm",
        kubeletDir=str(GUEST_KUBELET_DIR),
        # the VM node's kubelet keeps its Pods' cgroups below its own root (IO limits)
        kubeletCgroupRoot=f"/{CGROUP_ROOT}",
        lvm={
            "deviceClasses": [
                {
                    "name": "thin",
                    "volumeGroup": VG,
                    "thinPool": THINPOOL,
                    "default": True,
                    "overprovisionRatio": OVERPROVISION,
                },
                {"name": "thick", "volumeGroup": VG, "lvType": "linear"},
            ]
        },
        node=on_vm,
        controller=on_vm,
        snapshots={"volumeSnapshotClass": {"name": SNAPSHOT_CLASS}},
        # Probes and calls paced for software emulation.
        livenessProbe={"periodSeconds": 20, "timeoutSeconds": 15, "failureThreshold": 6},
        provisioner={"capacityPollInterval": "5s", "timeout": "180s"},
        resizer={"timeout": "180s"},
    )


@pytest.fixture(scope="module")
def vm_node(cluster: Cluster, timings: Timings) -> Iterator[VmNode]:
    vm = VmNode(cluster)
    try:
        vm.start(_image_list())
        vm.wait_ready()
        yield vm
    finally:
        problems = vm.stop()
        for key, value in vm.timings.items():
            timings.record(f"lvm_node.{key}", value)
        if problems:
            pytest.fail("the VM node's teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _vm_alive(vm_node: VmNode) -> Iterator[None]:
    """A VM that died fails the test at once, with its logs, instead of a long wait."""
    if vm_node.proc is not None:
        vm_node.check_alive()
    yield
    if vm_node.proc is not None:
        vm_node.check_alive()


#: the logical volumes the scenarios made (their PVs' volume handles), for the last test
CREATED: list[str] = []


def _lv_of(ns: Kube, claim: str) -> str:
    """The logical volume behind a bound claim, remembered for the uninstall check."""
    handle: str = ns.read_pv(ns.wait_pvc_bound(claim)["spec"]["volumeName"])["spec"]["csi"][
        "volumeHandle"
    ]
    name = handle.partition("@")[0]
    CREATED.append(name)
    return name


def _in_node_plugin(ns: Kube, command: str) -> str:
    """A shell command's output in the node plugin's driver container (the node's own view:
    its lvm2, its /sys)."""
    drv = Kube(ns.api, NAMESPACE)
    pod = next(
        p["metadata"]["name"]
        for p in drv.items(drv.core.list_namespaced_pod, NAMESPACE)
        if "-node-" in p["metadata"]["name"]
    )
    return drv.exec(pod, command, container="driver")


def _lv_report(ns: Kube, lv: str) -> dict[str, str]:
    """lvs as the node plugin's own lvm2 sees the volume."""
    out = _in_node_plugin(
        ns,
        f"lvs --noheadings --separator , -o segtype,pool_lv,lv_size --units b {VG}/{lv}"
        " 2>/dev/null",
    )
    segtype, pool, size = out.strip().split(",")
    return {"segtype": segtype, "pool": pool, "size": size}


@pytest.fixture(scope="module")
def lvm(cluster: Cluster, vm_node: VmNode, timings: Timings) -> Iterator[Release]:
    release = Release(
        cluster, name="e2e-lvm", namespace=NAMESPACE, node=VM_NODE, driver_name=DRIVER,
        timeout="10m",
    )  # fmt: skip
    seconds = release.install(lvm_values(cluster))
    timings.record("lvm_helm_install", seconds)
    try:
        yield release
    finally:
        if release.values is not None:
            release.uninstall()


def _capacities(kube: Kube) -> dict[str, int]:
    items = kube.items(kube.storage.list_namespaced_csi_storage_capacity, NAMESPACE)
    return {c["storageClassName"]: quantity(c["capacity"]) for c in items}


def test_driver_pods_ready_and_capacity_matches_the_volume_group(
    lvm: Release, vm_node: VmNode, ns: Kube
) -> None:
    drv = Kube(ns.api, NAMESPACE)
    pods = drv.items(drv.core.list_namespaced_pod, NAMESPACE)
    assert pods and all(p["spec"]["nodeName"] == VM_NODE for p in pods)
    for pod in pods:
        assert all(c["ready"] for c in pod["status"]["containerStatuses"]), pod["metadata"]["name"]
    vg_free = int(vm_node.ready["vg"]["vg_free"].rstrip("B"))
    pool = next(lv for lv in vm_node.ready["lvs"] if lv["lv_name"] == THINPOOL)
    pool_bytes = int(pool["lv_size"].rstrip("B"))
    expected = {THIN: pool_bytes * OVERPROVISION, THICK: vg_free}

    # One CSIStorageCapacity per device class, as the VG reports it.
    def both() -> dict[str, int] | None:
        found = _capacities(drv)
        return found if set(found) == set(expected) else None

    seen = wait_until("CSIStorageCapacity for both classes", both, SLOW)
    assert seen == expected


@pytest.mark.parametrize("storage_class", [THIN, THICK])
def test_wffc_pvc_data_survives_the_pod(
    lvm: Release, ns: Kube, timings: Timings, storage_class: str
) -> None:
    claim = unique("data")
    writer = unique("writer")
    t0 = time.monotonic()
    ns.pvc(claim, "64Mi", storage_class=storage_class)
    ns.pod_with_claim(writer, claim)
    ns.wait_running(writer, SLOW)
    timings.record(f"lvm_pvc_created_to_pod_running.{storage_class}", time.monotonic() - t0)
    pvc = ns.wait_pvc_bound(claim)
    pv = ns.read_pv(pvc["spec"]["volumeName"])
    assert pv["spec"]["csi"]["driver"] == DRIVER
    assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == VM_NODE
    # The class decides what kind of logical volume the claim gets.
    report = _lv_report(ns, _lv_of(ns, claim))
    if storage_class == THIN:
        assert (report["segtype"], report["pool"]) == ("thin", THINPOOL)
    else:
        assert (report["segtype"], report["pool"]) == ("linear", "")
    assert report["size"] == f"{64 * MiB}B"
    assert ns.exec(writer, "grep ' /data ' /proc/mounts | cut -d' ' -f3").strip() == "ext4"
    digest = ns.exec(writer, WRITE).strip()
    assert len(digest) == 64
    ns.delete_pod(writer, SLOW)
    reader = unique("reader")
    ns.pod_with_claim(reader, claim)
    ns.wait_running(reader, SLOW)
    assert ns.exec(reader, READ).strip() == digest


def test_online_expansion_seen_inside_the_pod(lvm: Release, ns: Kube) -> None:
    claim = unique("grow")
    ns.pvc(claim, "64Mi", storage_class=THIN)
    pod = unique("grow-pod")
    ns.pod_with_claim(pod, claim, "echo before > /data/f && sleep 3600")
    before = ns.wait_running(pod, SLOW)

    def size() -> int:
        """The size of the filesystem as the container sees it: blocks times block size."""
        blocks, block_size = ns.exec(pod, "stat -f -c '%b %S' /data").split()
        return int(blocks) * int(block_size)

    _lv_of(ns, claim)
    assert 32 * MiB < size() <= 64 * MiB
    ns.core.patch_namespaced_persistent_volume_claim(
        claim, ns.namespace, {"spec": {"resources": {"requests": {"storage": "192Mi"}}}}
    )
    # The filesystem the running container sees grows (resize2fs on the live mount).
    wait_until("the filesystem grown inside the pod", lambda: size() > 128 * MiB, SLOW)

    def resized() -> Any:
        pvc = ns.read_pvc(claim)
        return pvc if quantity(pvc["status"]["capacity"]["storage"]) == 192 * MiB else None

    pvc = wait_until("the PVC's status at the new size", resized, SLOW)
    assert not pvc["status"].get("conditions")
    after = ns.read_pod(pod)
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert ns.exec(pod, "cat /data/f").strip() == "before"


def test_block_volume_written_and_read_back(lvm: Release, ns: Kube) -> None:
    claim = unique("raw")
    ns.pvc(claim, "32Mi", block=True, storage_class=THICK)
    writer = unique("blk-writer")
    ns.pod_with_claim(writer, claim, block=True)
    ns.wait_running(writer, SLOW)
    assert _lv_report(ns, _lv_of(ns, claim))["segtype"] == "linear"
    assert ns.exec(writer, "test -b /dev/xvda && blockdev --getsize64 /dev/xvda").strip() == str(
        32 * MiB
    )
    digest = ns.exec(
        writer,
        "dd if=/dev/urandom of=/tmp/blob bs=64k count=16 2>/dev/null && "
        "dd if=/tmp/blob of=/dev/xvda bs=64k seek=64 conv=fsync 2>/dev/null && "
        "sha256sum /tmp/blob | cut -d' ' -f1",
    ).strip()
    ns.delete_pod(writer, SLOW)
    reader = unique("blk-reader")
    ns.pod_with_claim(reader, claim, block=True)
    ns.wait_running(reader, SLOW)
    again = ns.exec(
        reader, "dd if=/dev/xvda bs=64k skip=64 count=16 2>/dev/null | sha256sum | cut -d' ' -f1"
    ).strip()
    assert again == digest


def test_thin_snapshot_restored_with_the_same_bytes(lvm: Release, ns: Kube) -> None:
    source = unique("src")
    ns.pvc(source, "64Mi", storage_class=THIN)
    writer = unique("snap-writer")
    ns.pod_with_claim(writer, source)
    ns.wait_running(writer, SLOW)
    digest = ns.exec(writer, WRITE).strip()
    snap = unique("snap")
    ns.snapshot(snap, source, SNAPSHOT_CLASS)
    status = ns.wait_snapshot_ready(snap, SLOW)
    content = status["boundVolumeSnapshotContentName"]
    ns.exec(writer, "echo after-snapshot > /data/payload && sync")
    restored = unique("restored")
    ns.pvc(
        restored,
        "64Mi",
        storage_class=THIN,
        data_source={"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": snap},
    )
    reader = unique("snap-reader")
    ns.pod_with_claim(reader, restored)
    ns.wait_running(reader, SLOW)
    assert ns.exec(reader, READ).strip() == digest
    _lv_of(ns, source)
    # A thin snapshot restored: a thin volume of its own in the same pool.
    assert _lv_report(ns, _lv_of(ns, restored))["pool"] == THINPOOL
    ns.delete_snapshot(snap, content, SLOW)


def _io_max(ns: Kube, pod_uid: str) -> str:
    """The Pod's cgroup v2 io.max as the node has it (the kubelet's cgroupfs driver below its
    --cgroup-root; a Pod of any QoS class)."""
    base = f"/sys/fs/cgroup/{CGROUP_ROOT}/kubepods"
    out = _in_node_plugin(
        ns,
        f"for f in {base}/pod{pod_uid}/io.max {base}/*/pod{pod_uid}/io.max; do"
        ' [ -f "$f" ] && echo "found $f" && cat "$f"; done; true',
    )
    assert out.startswith("found "), f"no io.max of Pod {pod_uid} below {base}: " + _in_node_plugin(
        ns, f"find {base} -maxdepth 2 -type d | head -40"
    )
    return out.partition("\n")[2]


def _device_in_pod(ns: Kube, pod: str) -> str:
    """MAJ:MIN of the Pod's block device, as io.max names it."""
    major, minor = ns.exec(pod, "stat -L -c '%t %T' /dev/xvda").split()
    return f"{int(major, 16)}:{int(minor, 16)}"


def _write_rate(ns: Kube, pod: str, mib: int) -> float:
    """Bytes per second of ``mib`` MiB written with O_DIRECT by the Pod to its block device,
    timed by the Pod's own clock (/proc/uptime, 10 ms steps). 256 KiB writes: few enough that
    an emulated node keeps up with the limit, small enough that the throttle's allowance for
    the first one is a few percent of the whole."""
    out = ns.exec(
        pod,
        "s=$(cut -d' ' -f1 /proc/uptime) &&"
        f" dd if=/dev/zero of=/dev/xvda bs=256k count={mib * 4} oflag=direct 2>/dev/null &&"
        " e=$(cut -d' ' -f1 /proc/uptime) && echo $s $e",
    )
    start, end = (float(x) for x in out.split())
    return mib * MiB / (end - start)


def test_io_limit_holds_in_a_running_pod_and_follows_its_attributes_class(
    lvm: Release, ns: Kube, timings: Timings
) -> None:
    """writeBytesPerSecond from the StorageClass lands in the Pod's cgroup (io.max of the LV)
    at publication and holds the Pod's direct writes within 20%; switching the PVC to a
    VolumeAttributesClass with another limit changes it in the running Pod, unrestarted."""
    limited, faster = unique("io-limited"), unique("io-faster")
    raw(
        ns.storage.create_storage_class,
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": limited},
            "provisioner": DRIVER,
            "parameters": {"deviceClass": "thick", "writeBytesPerSecond": "2Mi"},
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    )
    try:
        raw(
            ns.storage.create_volume_attributes_class,
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttributesClass",
                "metadata": {"name": faster},
                "driverName": DRIVER,
                "parameters": {"writeBytesPerSecond": "4Mi"},
            },
        )
        claim, writer = unique("io"), unique("io-writer")
        ns.pvc(claim, "64Mi", block=True, storage_class=limited)
        ns.pod_with_claim(writer, claim, block=True)
        ns.wait_running(writer, SLOW)
        _lv_of(ns, claim)
        uid = ns.read_pod(writer)["metadata"]["uid"]
        (started,) = ns.read_pod(writer)["status"]["containerStatuses"]
        device = _device_in_pod(ns, writer)

        def line() -> str:
            lines = [x for x in _io_max(ns, uid).splitlines() if x.split()[:1] == [device]]
            return lines[0] if lines else ""

        assert line() == f"{device} rbps=max wbps={2 * MiB} riops=max wiops=max"
        first = _write_rate(ns, writer, 12)

        t0 = time.monotonic()
        ns.core.patch_namespaced_persistent_volume_claim(
            claim, ns.namespace, {"spec": {"volumeAttributesClassName": faster}}
        )
        ns.wait_pvc_modified(claim, faster, SLOW)
        timings.record("lvm_io_limit_modified", time.monotonic() - t0)
        assert line() == f"{device} rbps=max wbps={4 * MiB} riops=max wiops=max"
        (now,) = ns.read_pod(writer)["status"]["containerStatuses"]
        assert now["containerID"] == started["containerID"], "the container was replaced"
        assert now["state"]["running"]["startedAt"] == started["state"]["running"]["startedAt"]
        second = _write_rate(ns, writer, 24)
        timings.record("lvm_io_rate_limit_2MiB_in_MiB_per_s", first / MiB)
        timings.record("lvm_io_rate_limit_4MiB_in_MiB_per_s", second / MiB)
        for rate, limit in ((first, 2 * MiB), (second, 4 * MiB)):
            assert abs(rate - limit) <= 0.2 * limit, (
                f"{rate / MiB:.2f} MiB/s under a {limit / MiB:.0f} MiB/s limit"
            )
    finally:
        for call, name in (
            (ns.storage.delete_volume_attributes_class, faster),
            (ns.storage.delete_storage_class, limited),
        ):
            with contextlib.suppress(client.ApiException):
                call(name)


def test_uninstall_after_deleting_the_pvcs_leaves_no_logical_volume(
    lvm: Release, vm_node: VmNode, api: client.ApiClient
) -> None:
    # Every earlier test's namespace, PVCs included, is gone, and so are their PVs (the ns
    # fixture waits for that); what DeleteVolume missed would still be in the VG.
    assert len(CREATED) >= 5, f"the scenarios before this one made too few volumes: {CREATED}"
    lvm.uninstall()
    problems = vm_node.stop()
    assert not problems
    assert vm_node.final_lvs is not None, "the guest reported no lvs at power-off"
    left = [lv["lv_name"] for lv in vm_node.final_lvs]
    assert not set(CREATED) & set(left)
    assert left == [THINPOOL]
