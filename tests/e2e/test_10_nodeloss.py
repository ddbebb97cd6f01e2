"""Scenario 10: the opt-in reconcilers (docs/operations.md) on a real cluster.

Node loss: a second Node object (a stand-in: no kubelet behind it) with a PV of this driver
pinned to it, bound to a PVC; the Node is deleted. With node loss in report mode the
controller's reconciler records NodeLost Events on the PV and the PVC and changes nothing;
after a helm upgrade to ``nodeLoss.deletePVCs: true`` the PVC is deleted, then the PV (reclaim
policy Delete, nobody left to delete its storage).

Orphans: a volume provisioned through a StorageClass with reclaim policy Retain, written by a
Pod, then its PVC and PV deleted: the storage stays on the node with no PV. In report mode the
node plugin records an OrphanedVolume Event on the Node and keeps the data; with
``orphans.delete: true`` the volume's directory goes from the hostpath root.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

from kubernetes import client

from .cluster import NODE_NAME, Cluster
from .conftest import ROOT, Release, Timings, helm_values
from .hostvol import files_named
from .kube import DRIVER_NAME, TOPOLOGY_KEY, Kube, Timeout, gone, raw, unique, wait_until

GRACE = 3
INTERVAL = 2
#: the shortest grace period a deleting reconciler accepts (config.MIN_DELETE_GRACE)
DELETE_GRACE = 30
METRICS_PORT = 9810
_SCRAPE = (
    'python3 -c \'import os, urllib.request; ip = os.environ["POD_IP"];'
    ' ip = "[%s]" % ip if ":" in ip else ip;'
    f' print(urllib.request.urlopen("http://%s:{METRICS_PORT}/metrics" % ip, timeout=5)'
    ".read().decode())'"
)


def _values(cluster: Cluster, delete: bool) -> dict[str, Any]:
    grace = DELETE_GRACE if delete else GRACE
    return helm_values(
        cluster,
        nodeLoss={
            "enabled": True,
            "deletePVCs": delete,
            "gracePeriodSeconds": grace,
            "intervalSeconds": INTERVAL,
        },
        orphans={
            "enabled": True,
            "delete": delete,
            "gracePeriodSeconds": grace,
            "intervalSeconds": INTERVAL,
        },
    )


def _counter(release: Release, component: str, series: str) -> float:
    """The sum of one counter sample over the driver containers of ``component``'s Pods,
    read from each driver's own /metrics."""
    kube = Kube(release.cluster.api_client(), release.namespace)
    pods = kube.items(
        kube.core.list_namespaced_pod,
        release.namespace,
        label_selector=f"app.kubernetes.io/component={component}",
    )
    total = 0.0
    for pod in pods:
        if pod["status"].get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        for line in kube.exec(pod["metadata"]["name"], _SCRAPE, "driver").splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                total += float(value)
    return total


def _driver_log(release: Release, component: str, lines: int = 60) -> str:
    """The last lines of the driver container of ``component``'s Pods, for a failure message."""
    kube = Kube(release.cluster.api_client(), release.namespace)
    pods = kube.items(
        kube.core.list_namespaced_pod,
        release.namespace,
        label_selector=f"app.kubernetes.io/component={component}",
    )
    return "\n".join(
        f"{pod['metadata']['name']}: {line}"
        for pod in pods
        for line in kube.logs(pod["metadata"]["name"], "driver").splitlines()[-lines:]
    )


def _runs(reconciler: str, result: str) -> str:
    return f'csi_driver_reconcile_runs_total{{reconciler="{reconciler}",result="{result}"}}'


def _actions(reconciler: str, action: str) -> str:
    return f'csi_driver_reconcile_actions_total{{reconciler="{reconciler}",action="{action}"}}'


def _upgrade(release: Release, values: dict[str, Any]) -> None:
    """helm upgrade in place (the workloads roll; no uninstall), then the same steadiness
    check an install gets."""
    path = release.cluster.workdir / f"values-{release.name}-upgrade.json"
    path.write_text(json.dumps(values, indent=2))
    release.helm(
        "upgrade",
        release.name,
        str(ROOT / "charts" / "nodelocal-csi"),
        "--namespace",
        release.namespace,
        "--values",
        str(path),
        "--wait",
        "--timeout",
        release.timeout,
    )
    release.values = values
    kube = Kube(release.cluster.api_client(), release.namespace)
    wait_until(
        "driver pods of the upgrade only",
        lambda: all(
            "--orphans=delete" in json.dumps(p["spec"])
            or "--node-loss=delete" in json.dumps(p["spec"])
            for p in kube.items(kube.core.list_namespaced_pod, release.namespace)
        ),
        120,
    )
    release._settled(5)


def _fake_node(kube: Kube, name: str) -> None:
    """A Node object nothing runs on: unschedulable and tainted, so no Pod lands there."""
    raw(
        kube.core.create_node,
        {
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {
                "unschedulable": True,
                "taints": [{"key": "nodelocal-e2e/stand-in", "effect": "NoSchedule"}],
            },
        },
    )


def _pinned_pv_and_claim(kube: Kube, node: str, pv: str, claim: str) -> None:
    """A PV of this driver on ``node``, as the provisioner would have made it, pre-bound to
    ``claim``."""
    raw(
        kube.core.create_persistent_volume,
        {
            "metadata": {
                "name": pv,
                "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER_NAME},
                "finalizers": ["external-provisioner.volume.kubernetes.io/finalizer"],
            },
            "spec": {
                "capacity": {"storage": "16Mi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "csi": {"driver": DRIVER_NAME, "volumeHandle": f"v{uuid.uuid4().hex}@{node}"},
                "claimRef": {"namespace": kube.namespace, "name": claim},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": TOPOLOGY_KEY, "operator": "In", "values": [node]}
                                ]
                            }
                        ]
                    }
                },
            },
        },
    )
    raw(
        kube.core.create_namespaced_persistent_volume_claim,
        kube.namespace,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "16Mi"}},
            },
        },
    )


def _retain_class(kube: Kube, name: str) -> None:
    raw(
        kube.storage.create_storage_class,
        {
            "metadata": {"name": name},
            "provisioner": DRIVER_NAME,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
    )


def _force_delete_pv(kube: Kube, name: str) -> None:
    with contextlib.suppress(client.ApiException):
        kube.core.patch_persistent_volume(name, {"metadata": {"finalizers": None}})
    with contextlib.suppress(client.ApiException):
        kube.core.delete_persistent_volume(name)


def test_lost_node_and_orphan_reported_then_released(
    release: Release, cluster: Cluster, ns: Kube, timings: Timings
) -> None:
    t0 = time.monotonic()
    release.install(_values(cluster, delete=False))
    lost_node, lost_pv, lost_claim = unique("nle2e-lost"), unique("pv-lost"), unique("lost")
    retain_class, claim, pod, marker = (
        unique("nodelocal-retain"),
        unique("orphan"),
        unique("orphan-pod"),
        unique("marker"),
    )
    orphan_pv = ""
    root = cluster.hostpath_root
    try:
        # --- an orphan: a Retain volume with data, whose PVC and PV are then deleted
        _retain_class(ns, retain_class)
        ns.pvc(claim, "16Mi", storage_class=retain_class)
        ns.pod_with_claim(pod, claim, f"echo x > /data/{marker} && sleep 3600")
        ns.wait_running(pod)
        orphan_pv = ns.wait_pvc_bound(claim)["spec"]["volumeName"]
        handle = ns.read_pv(orphan_pv)["spec"]["csi"]["volumeHandle"]
        ns.delete_pod(pod)
        ns.delete_pvc(claim)
        wait_until(
            "retained PV Released",
            lambda: ns.read_pv(orphan_pv)["status"]["phase"] == "Released",
            60,
        )
        raw(ns.core.delete_persistent_volume, orphan_pv)
        ns.wait_pv_gone(orphan_pv)

        # --- a lost node: a PV pinned to a Node that is then deleted
        _fake_node(ns, lost_node)
        _pinned_pv_and_claim(ns, lost_node, lost_pv, lost_claim)
        ns.wait_pvc_bound(lost_claim, 60)
        raw(ns.core.delete_node, lost_node)

        # report mode: Events, nothing changed
        wait_until("NodeLost Event on the PVC", lambda: ns.events_about(lost_claim, "NodeLost"), 60)
        assert ns.events_about(lost_pv, "NodeLost", "default")
        event = wait_until(
            "OrphanedVolume Event on the Node",
            lambda: [
                e
                for e in ns.events_about(NODE_NAME, "OrphanedVolume", "default")
                if handle in e["message"]
            ],
            60,
        )[0]
        assert event["involvedObject"]["kind"] == "Node" and event["type"] == "Warning"
        # rounds after the report change nothing: two more complete rounds of each, counted
        # by the drivers themselves, and no deletion among their actions
        rounds = {
            ("controller", "node_loss"): 0.0,
            ("node", "orphans"): 0.0,
        }
        for component, reconciler in rounds:
            rounds[component, reconciler] = _counter(release, component, _runs(reconciler, "ok"))
        for (component, reconciler), before in rounds.items():
            series = _runs(reconciler, "ok")

            def ran_twice(c: str = component, r: str = series, b: float = before) -> bool:
                return _counter(release, c, r) >= b + 2

            wait_until(f"two more {reconciler} rounds", ran_twice, 60)
        for component, reconciler, action in [
            ("controller", "node_loss", "delete_pvc"),
            ("controller", "node_loss", "delete_pv"),
            ("node", "orphans", "delete_volume"),
        ]:
            assert _counter(release, component, _actions(reconciler, action)) == 0, action
        assert ns.read_pvc(lost_claim)["status"]["phase"] == "Bound"
        assert ns.read_pv(lost_pv)
        assert files_named(root, marker), "report mode deleted the orphan's data"
        timings.record("reconcile_report_mode", time.monotonic() - t0)

        # delete mode: the claim and PV of the lost node go, the orphan's storage goes
        t1 = time.monotonic()
        _upgrade(release, _values(cluster, delete=True))
        try:
            wait_until(
                "lost node's PVC deleted",
                lambda: gone(
                    ns.core.read_namespaced_persistent_volume_claim, lost_claim, ns.namespace
                ),
                DELETE_GRACE + 90,
            )
        except Timeout as exc:
            raise AssertionError(f"{exc}\n{_driver_log(release, 'controller')}") from exc
        ns.wait_pv_gone(lost_pv, 60)
        assert ns.events_about(lost_pv, "ClaimDeleted", "default")
        wait_until(
            "the orphan's data gone from the node",
            lambda: not files_named(root, marker),
            DELETE_GRACE + 90,
        )
        assert [
            e
            for e in ns.events_about(NODE_NAME, "OrphanedVolumeDeleted", "default")
            if handle in e["message"]
        ]
        timings.record("reconcile_delete_mode", time.monotonic() - t1)
    finally:
        with contextlib.suppress(client.ApiException):
            ns.core.delete_node(lost_node)
        with contextlib.suppress(client.ApiException):
            ns.core.delete_namespaced_persistent_volume_claim(lost_claim, ns.namespace)
        _force_delete_pv(ns, lost_pv)
        if orphan_pv:
            _force_delete_pv(ns, orphan_pv)
        with contextlib.suppress(client.ApiException):
            ns.storage.delete_storage_class(retain_class)
        # the next module installs its own values; leave none of these behind
        release.uninstall()
