"""Scenario: a PVC switched to another VolumeAttributesClass, through the chart as users run it.

csi-resizer (controller Deployment) sees the PVC's new class and calls ControllerModifyVolume on
the controller's driver, which hands it over the peer channel (TLS both ways) to the node
plugin that holds the volume (docs/deploy.md). The observable behaviour is ``wipeOnDelete``:
two volumes start in a class that keeps data on deletion; one is switched to a class that
wipes. A hard link taken on the node to a file each Pod wrote keeps that file's blocks
reachable after the volume is deleted: the switched volume's file must read back as zeros, its
twin's as the bytes written.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from .conftest import DRIVER_NAMESPACE, Release, Timings
from .hostvol import files_named
from .kube import DRIVER_NAME, Kube, unique, wait_until

WRITE = "yes nodelocal-modify-marker | head -c 1048576 > /data/{name} && sync && sleep 3600"
MARKER = (b"nodelocal-modify-marker\n" * (1048576 // 24 + 1))[:1048576]


def _attributes_class(storage: Any, name: str, wipe: str) -> None:
    storage.create_volume_attributes_class(
        client.V1VolumeAttributesClass(
            metadata=client.V1ObjectMeta(name=name),
            driver_name=DRIVER_NAME,
            parameters={"wipeOnDelete": wipe},
        )
    )


def _written(root: Path, name: str) -> Path:
    """The file a Pod wrote through its volume, as the node sees it, once complete."""

    def complete() -> list[Path]:
        return [p for p in files_named(root, name) if p.stat().st_size == len(MARKER)]

    found: list[Path] = wait_until(f"{name} written on the node", complete, 60)
    return found[0]


def _driver_log(ns: Kube, component: str, containing: str) -> str:
    """The lines of the driver container of the release's ``component`` Pods with a text."""
    kube = Kube(ns.api, DRIVER_NAMESPACE)
    pods = kube.items(
        kube.core.list_namespaced_pod,
        DRIVER_NAMESPACE,
        label_selector=f"app.kubernetes.io/component={component}",
    )
    lines = [
        line
        for pod in pods
        for line in kube.logs(pod["metadata"]["name"], "driver").splitlines()
        if containing in line
    ]
    return "\n".join(lines)


def test_switching_the_attributes_class_changes_what_delete_does(
    driver: Release, ns: Kube, timings: Timings
) -> None:
    keep, wipe = unique("keep"), unique("wipe")
    _attributes_class(ns.storage, keep, "false")
    _attributes_class(ns.storage, wipe, "true")
    links = driver.cluster.workdir / "modify-links"
    links.mkdir(exist_ok=True)
    try:
        claims = {"switched": unique("switched"), "twin": unique("twin")}
        pods, files = {}, {}
        for role, claim in claims.items():
            ns.pvc(claim, "16Mi", attributes_class=keep)
            pods[role] = unique(f"{role}-pod")
            files[role] = unique("marker")
            ns.pod_with_claim(pods[role], claim, WRITE.format(name=files[role]))
        for role, claim in claims.items():
            ns.wait_running(pods[role])
            assert ns.read_pvc(claim)["status"].get("currentVolumeAttributesClassName") == keep
        root = driver.cluster.hostpath_root
        linked: dict[str, Path] = {}
        for role in claims:
            found = _written(root, files[role])
            linked[role] = links / role
            os.link(found, linked[role])
            assert linked[role].read_bytes() == MARKER

        t0 = time.monotonic()
        ns.core.patch_namespaced_persistent_volume_claim(
            claims["switched"], ns.namespace, {"spec": {"volumeAttributesClassName": wipe}}
        )
        pvc = ns.wait_pvc_modified(claims["switched"], wipe)
        timings.record("pvc_attributes_class_switched", time.monotonic() - t0)
        pv = ns.read_pv(pvc["spec"]["volumeName"])
        assert pv["spec"].get("volumeAttributesClassName") == wipe
        twin = ns.read_pvc(claims["twin"])
        assert twin["status"].get("currentVolumeAttributesClassName") == keep
        # the path taken: the controller's driver handed the call on, the node plugin applied it
        volume_id = pv["spec"]["csi"]["volumeHandle"]
        assert volume_id in _driver_log(ns, "controller", "forwarded")
        assert volume_id in _driver_log(ns, "node", "modified volume")

        pv_names = [ns.read_pvc(c)["spec"]["volumeName"] for c in claims.values()]
        for role, claim in claims.items():
            ns.delete_pod(pods[role])
            ns.delete_pvc(claim)
        for name in pv_names:
            ns.wait_pv_gone(name)
        wait_until(
            "the volumes' directories removed from the node",
            lambda: not any(files_named(root, f) for f in files.values()),
            60,
        )
        assert linked["switched"].read_bytes() == bytes(len(MARKER)), (
            "the volume switched to a wiping class kept its data after deletion"
        )
        assert linked["twin"].read_bytes() == MARKER, "the untouched volume was wiped"
    finally:
        for path in links.glob("*"):
            path.unlink()
        with contextlib.suppress(OSError):
            links.rmdir()
        for name in (keep, wipe):
            with contextlib.suppress(client.ApiException):
                ns.storage.delete_volume_attributes_class(name)
