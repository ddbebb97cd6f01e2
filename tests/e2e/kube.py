"""Small helpers over the kubernetes client for the e2e scenarios: manifests, waits, exec.

Objects are read as the API server's JSON (plain dicts, camelCase keys, exactly the manifests'
shape) rather than as the client's models: the models reject some valid objects (a CSINode
whose ``spec.drivers`` is still null fails their validation), and dicts keep the assertions
next to the YAML a reader knows.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.stream import stream
from kubernetes.utils import parse_quantity

from . import images

POLL = 1.0
DRIVER_NAME = "nodelocal.csi.dev"
TOPOLOGY_KEY = f"topology.{DRIVER_NAME}/node"
STORAGE_CLASS = "nodelocal-hostpath"
SNAPSHOT_CLASS = "nodelocal-snapshot"
SNAPSHOT_GROUP, SNAPSHOT_VERSION = "snapshot.storage.k8s.io", "v1"


class Timeout(AssertionError):
    """A wait that failed: an assertion, so the test fails with what was seen last."""


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a client API method and return the server's decoded JSON."""
    response = call(*args, _preload_content=False, **kwargs)
    return json.loads(response.data)


def gone(call: Callable[..., Any], *args: Any) -> bool:
    """Whether reading the object answers 404."""
    try:
        call(*args, _preload_content=False)
    except client.ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def quantity(value: str) -> int:
    """Bytes of a resource quantity ("64Mi", "4294967296")."""
    return int(parse_quantity(value))  # type: ignore[no-untyped-call]


def wait_until(what: str, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll fn until it returns something truthy; return it. API errors count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except client.ApiException as exc:
            last = f"{exc.status} {exc.reason}"
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}")
        time.sleep(POLL)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class Kube:
    """The clients a scenario needs, bound to one namespace."""

    api: client.ApiClient
    namespace: str

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def storage(self) -> Any:
        return client.StorageV1Api(self.api)

    @property
    def apps(self) -> Any:
        return client.AppsV1Api(self.api)

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    # ------------------------------------------------------------------ reads (JSON)

    def read_pod(self, name: str) -> Any:
        return raw(self.core.read_namespaced_pod, name, self.namespace)

    def read_pvc(self, name: str) -> Any:
        return raw(self.core.read_namespaced_persistent_volume_claim, name, self.namespace)

    def read_pv(self, name: str) -> Any:
        return raw(self.core.read_persistent_volume, name)

    def items(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        return list(raw(call, *args, **kwargs)["items"])

    # ------------------------------------------------------------------ objects

    def pvc(
        self,
        name: str,
        size: str,
        *,
        block: bool = False,
        storage_class: str = STORAGE_CLASS,
        data_source: dict[str, str] | None = None,
        attributes_class: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage_class,
                "volumeMode": "Block" if block else "Filesystem",
                "resources": {"requests": {"storage": size}},
            },
        }
        if data_source is not None:
            body["spec"]["dataSource"] = data_source
        if attributes_class is not None:
            body["spec"]["volumeAttributesClassName"] = attributes_class
        raw(self.core.create_namespaced_persistent_volume_claim, self.namespace, body)

    def pod(
        self,
        name: str,
        command: str,
        *,
        volumes: list[dict[str, Any]] | None = None,
        mounts: list[dict[str, Any]] | None = None,
        devices: list[dict[str, Any]] | None = None,
    ) -> None:
        container: dict[str, Any] = {
            "name": "main",
            "image": images.BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", command],
            "volumeMounts": mounts or [],
            "securityContext": {"allowPrivilegeEscalation": False},
        }
        if devices:
            container["volumeDevices"] = devices
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "containers": [container],
                "volumes": volumes or [],
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "automountServiceAccountToken": False,
            },
        }
        raw(self.core.create_namespaced_pod, self.namespace, body)

    def pod_with_claim(
        self, name: str, claim: str, command: str = "sleep 3600", *, block: bool = False
    ) -> None:
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        if block:
            self.pod(
                name,
                command,
                volumes=volumes,
                devices=[{"name": "data", "devicePath": "/dev/xvda"}],
            )
        else:
            self.pod(
                name, command, volumes=volumes, mounts=[{"name": "data", "mountPath": "/data"}]
            )

    # ------------------------------------------------------------------ waits

    def wait_running(self, name: str, timeout: float = 180) -> Any:
        """Wait until the pod runs and is Ready; return it."""

        def running() -> Any:
            pod = self.read_pod(name)
            phase = pod["status"].get("phase")
            if phase in ("Failed", "Succeeded"):
                raise AssertionError(f"pod {name} ended in {phase}: {self.describe(name)}")
            conditions = pod["status"].get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            return pod if phase == "Running" and ready else None

        try:
            return wait_until(f"pod {name} Running", running, timeout)
        except Timeout as exc:
            raise Timeout(f"{exc}\n{self.describe(name)}") from None

    def wait_pvc_bound(self, name: str, timeout: float = 180) -> Any:
        return wait_until(
            f"PVC {name} Bound",
            lambda: (p := self.read_pvc(name))["status"].get("phase") == "Bound" and p,
            timeout,
        )

    def wait_pvc_modified(self, name: str, attributes_class: str, timeout: float = 180) -> Any:
        """Wait until the PVC's volume has its new VolumeAttributesClass and no modification is
        pending; return the PVC."""

        def done() -> Any:
            pvc = self.read_pvc(name)
            status = pvc.get("status", {})
            if status.get("currentVolumeAttributesClassName") != attributes_class:
                return None
            return pvc if not status.get("modifyVolumeStatus") else None

        return wait_until(f"PVC {name} modified to class {attributes_class}", done, timeout)

    def delete_pod(self, name: str, timeout: float = 120) -> None:
        with contextlib.suppress(client.ApiException):
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=1)
        wait_until(
            f"pod {name} gone",
            lambda: gone(self.core.read_namespaced_pod, name, self.namespace),
            timeout,
        )

    def delete_pvc(self, name: str, timeout: float = 120) -> None:
        with contextlib.suppress(client.ApiException):
            self.core.delete_namespaced_persistent_volume_claim(name, self.namespace)
        wait_until(
            f"PVC {name} gone",
            lambda: gone(self.core.read_namespaced_persistent_volume_claim, name, self.namespace),
            timeout,
        )

    def wait_pv_gone(self, name: str, timeout: float = 120) -> None:
        wait_until(f"PV {name} gone", lambda: gone(self.core.read_persistent_volume, name), timeout)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, name: str, source_claim: str, snapshot_class: str = SNAPSHOT_CLASS) -> None:
        """A VolumeSnapshot of a claim in this namespace."""
        self.custom.create_namespaced_custom_object(
            SNAPSHOT_GROUP,
            SNAPSHOT_VERSION,
            self.namespace,
            "volumesnapshots",
            {
                "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}",
                "kind": "VolumeSnapshot",
                "metadata": {"name": name},
                "spec": {
                    "volumeSnapshotClassName": snapshot_class,
                    "source": {"persistentVolumeClaimName": source_claim},
                },
            },
        )

    def wait_snapshot_ready(self, name: str, timeout: float = 180) -> Any:
        """The snapshot's status once it is readyToUse; an error it reports fails at once."""

        def ready() -> Any:
            obj = self.custom.get_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name
            )
            status = obj.get("status") or {}
            if status.get("error"):
                raise AssertionError(f"snapshot {name} failed: {status['error']}")
            return status if status.get("readyToUse") else None

        return wait_until(f"VolumeSnapshot {name} readyToUse", ready, timeout)

    def delete_snapshot(self, name: str, content: str, timeout: float = 120) -> None:
        """Delete the snapshot and wait until its VolumeSnapshotContent is gone too."""
        self.custom.delete_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name
        )
        wait_until(
            f"VolumeSnapshotContent {content} deleted",
            lambda: gone(
                self.custom.get_cluster_custom_object,
                SNAPSHOT_GROUP,
                SNAPSHOT_VERSION,
                "volumesnapshotcontents",
                content,
            ),
            timeout,
        )

    # ------------------------------------------------------------------ inspection

    def exec(self, pod: str, command: str, container: str | None = None) -> str:
        """Run command in the pod's container (its only one, or ``container``); return its
        output; fail on a non-zero exit."""
        marker = "__E2E_EXIT__"
        extra = {"container": container} if container else {}
        out = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod,
            self.namespace,
            **extra,
            command=["/bin/sh", "-c", f"{command}; echo {marker}$?"],
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
        )
        text, _, code = str(out).rpartition(marker)
        if code.strip() != "0":
            raise AssertionError(f"`{command}` in {pod} exited {code.strip()}: {text}")
        return text

    def logs(self, pod: str, container: str | None = None) -> str:
        try:
            resp = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, _preload_content=False
            )
            return str(resp.data.decode(errors="replace"))
        except client.ApiException as exc:
            return f"(no logs: {exc.status} {exc.reason})"

    def events(self, name: str | None = None) -> str:
        selector = f"involvedObject.name={name}" if name else None
        items = self.items(self.core.list_namespaced_event, self.namespace, field_selector=selector)
        return "\n".join(
            f"  {e.get('type')} {e.get('reason')} {e['involvedObject'].get('kind')}/"
            f"{e['involvedObject'].get('name')}: {e.get('message')}"
            for e in items
        )

    def events_about(self, name: str, reason: str, namespace: str | None = None) -> list[Any]:
        """Events of ``reason`` about the object ``name``, in ``namespace`` (default: this
        one; "default" for cluster-scoped objects such as PVs and Nodes)."""
        return self.items(
            self.core.list_namespaced_event,
            namespace or self.namespace,
            field_selector=f"involvedObject.name={name},reason={reason}",
        )

    def describe(self, pod: str) -> str:
        try:
            p = self.read_pod(pod)
        except client.ApiException as exc:
            return f"pod {pod}: {exc.status} {exc.reason}\nevents:\n{self.events()}"
        statuses = [(c["name"], c.get("state")) for c in p["status"].get("containerStatuses", [])]
        return (
            f"pod {pod}: phase={p['status'].get('phase')} node={p['spec'].get('nodeName')} "
            f"containers={statuses}\nevents:\n{self.events()}"
        )


@contextlib.contextmanager
def namespace(api: client.ApiClient, prefix: str) -> Iterator[Kube]:
    """A fresh namespace (with its default ServiceAccount), removed afterwards with everything
    in it, waiting until its PVs are gone so the next test starts from a clean node."""
    kube = Kube(api, unique(prefix))
    name = kube.namespace
    raw(kube.core.create_namespace, {"metadata": {"name": name}})
    try:
        wait_until(
            f"ServiceAccount default in {name}",
            lambda: raw(kube.core.read_namespaced_service_account, "default", name),
            60,
        )
        yield kube
    finally:
        pvs = [
            pv["metadata"]["name"]
            for pv in kube.items(kube.core.list_persistent_volume)
            if (pv["spec"].get("claimRef") or {}).get("namespace") == name
        ]
        for pod in kube.items(kube.core.list_namespaced_pod, name):
            with contextlib.suppress(client.ApiException):
                kube.core.delete_namespaced_pod(
                    pod["metadata"]["name"], name, grace_period_seconds=1
                )
        kube.core.delete_namespace(name)
        wait_until(f"namespace {name} gone", lambda: gone(kube.core.read_namespace, name), 180)
        for pv in pvs:
            kube.wait_pv_gone(pv, 120)
