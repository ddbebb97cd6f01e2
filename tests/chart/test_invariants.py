"""What the rendered objects must agree on for the driver to work in a cluster.

Each test reads the objects helm renders and checks one agreement the kubelet, the sidecars or
the scheduler rely on: the socket every container dials, the path the kubelet is told, the node
id, the topology key, the driver name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from csi_driver.config import topology_key
from tests.chart.chartlib import (
    REPO,
    ChartTools,
    Rendered,
    container,
    container_names,
    env_field_ref,
    flags,
    parse,
    pod_spec,
    render_text,
    resolve,
    volume,
)
from tests.chart.scenarios import LVM_CLASSES, SCENARIOS

SIDECAR_NAMES = {
    "node-driver-registrar",
    "csi-provisioner",
    "csi-snapshotter",
    "csi-attacher",
    "csi-resizer",
    "liveness-probe",
    "csi-health-monitor",
}


def _deep_get(values: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(
    request: pytest.FixtureRequest, chart_tools: ChartTools
) -> tuple[dict[str, Any], Rendered]:
    values: dict[str, Any] = SCENARIOS[request.param]
    return values, Rendered(parse(render_text(chart_tools, values)))


def _driver_name(values: dict[str, Any]) -> str:
    name: str = values.get("driverName", "nodelocal.csi.dev")
    return name


def _kubelet_dir(values: dict[str, Any]) -> str:
    kubelet_dir: str = values.get("kubeletDir", "/var/lib/kubelet")
    return kubelet_dir


def test_every_sidecar_dials_the_driver_socket(scenario: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = scenario
    for workload in (rendered.daemonset, rendered.deployment):
        driver = container(workload, "driver")
        endpoint = flags(driver)["endpoint"]
        assert endpoint.startswith("unix:///"), endpoint
        socket = resolve(workload, driver, endpoint.removeprefix("unix://"))
        sidecars = [c for c in pod_spec(workload)["containers"] if c["name"] != "driver"]
        assert sidecars
        for sidecar in sidecars:
            assert sidecar["name"] in SIDECAR_NAMES
            address = flags(sidecar)["csi-address"]
            assert resolve(workload, sidecar, address) == socket, sidecar["name"]


def test_registrar_tells_the_kubelet_where_the_socket_is_on_the_host(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    values, rendered = scenario
    ds = rendered.daemonset
    driver = container(ds, "driver")
    registrar = container(ds, "node-driver-registrar")
    reg = flags(registrar)

    volume_name, inner = resolve(ds, driver, flags(driver)["endpoint"].removeprefix("unix://"))
    host_dir = volume(ds, volume_name)["hostPath"]["path"]
    on_host = f"{host_dir.rstrip('/')}/{inner}"
    assert reg["kubelet-registration-path"] == on_host
    assert on_host == f"{_kubelet_dir(values)}/plugins/{_driver_name(values)}/csi.sock"

    reg_volume, reg_inner = resolve(ds, registrar, reg["plugin-registration-path"])
    assert reg_inner == ""
    assert volume(ds, reg_volume)["hostPath"]["path"] == f"{_kubelet_dir(values)}/plugins_registry"


def test_node_id_comes_from_the_node_name(scenario: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = scenario
    ds = rendered.daemonset
    driver = container(ds, "driver")
    node_id = flags(driver)["node-id"]
    match = re.fullmatch(r"\$\((\w+)\)", node_id)
    assert match, f"--node-id={node_id} is not taken from an environment variable"
    assert env_field_ref(driver, match.group(1)) == "spec.nodeName"
    # --node-deployment sidecars act only for their own node, named by NODE_NAME.
    for name in ("csi-provisioner", "csi-snapshotter"):
        if name in container_names(ds):
            assert env_field_ref(container(ds, name), "NODE_NAME") == "spec.nodeName"


def test_driver_name_agrees_everywhere(scenario: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = scenario
    name = _driver_name(values)
    assert rendered.one("CSIDriver")["metadata"]["name"] == name
    for workload in (rendered.daemonset, rendered.deployment):
        assert flags(container(workload, "driver"))["driver-name"] == name
    classes = rendered.all("StorageClass")
    assert classes
    for sc in classes:
        assert sc["provisioner"] == name
    for vsc in rendered.all("VolumeSnapshotClass"):
        assert vsc["driver"] == name
    registration = flags(container(rendered.daemonset, "node-driver-registrar"))
    assert f"/plugins/{name}/" in registration["kubelet-registration-path"]


def test_topology_key_agrees_with_the_driver(scenario: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = scenario
    key = topology_key(_driver_name(values))
    keys = [
        expression["key"]
        for sc in rendered.all("StorageClass")
        for term in sc.get("allowedTopologies", [])
        for expression in term["matchLabelExpressions"]
    ]
    for found in keys:
        assert found == key


def test_restricted_storage_classes_carry_allowed_topologies(chart_tools: ChartTools) -> None:
    """Guards the test above against passing on an empty list."""
    rendered = Rendered(parse(render_text(chart_tools, SCENARIOS["lvm-classes-nsenter-udev"])))
    fast = rendered.one("StorageClass", "nodelocal-lvm-fast")
    (term,) = fast["allowedTopologies"]
    (expression,) = term["matchLabelExpressions"]
    assert expression == {"key": topology_key("nodelocal.csi.dev"), "values": ["node-a", "node-b"]}
    assert "allowedTopologies" not in rendered.one("StorageClass", "bulk-mirrored")


def test_node_plugin_privileges_and_mount_propagation(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    values, rendered = scenario
    ds = rendered.daemonset
    driver = container(ds, "driver")
    assert driver["securityContext"]["privileged"] is True
    kubelet_dir = _kubelet_dir(values)
    propagation = {m["mountPath"]: m.get("mountPropagation") for m in driver["volumeMounts"]}
    assert propagation[f"{kubelet_dir}/pods"] == "Bidirectional"
    assert propagation[f"{kubelet_dir}/plugins"] == "Bidirectional"
    for mount in driver["volumeMounts"]:
        source = volume(ds, mount["name"])
        if "hostPath" in source and mount["mountPath"].startswith(kubelet_dir):
            assert source["hostPath"]["path"] == mount["mountPath"], "kubelet paths must match"
    for name in container_names(ds):
        if name != "driver":
            sc = container(ds, name)["securityContext"]
            assert sc.get("privileged") is not True
            assert sc["allowPrivilegeEscalation"] is False
            for mount in container(ds, name).get("volumeMounts", []):
                assert "mountPropagation" not in mount


def test_controller_runs_without_root_or_privileges(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    _, rendered = scenario
    deploy = rendered.deployment
    spec = pod_spec(deploy)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert "hostPID" not in spec and "hostNetwork" not in spec
    assert all("hostPath" not in v for v in spec["volumes"])
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc.get("privileged") is not True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "runAsUser" not in sc or sc["runAsUser"] > 0
    driver = flags(container(deploy, "driver"))
    assert driver["mode"] == "controller"
    assert "backend" not in driver
    for name in ("csi-resizer", "csi-attacher"):
        if name in container_names(deploy):
            args = flags(container(deploy, name))
            assert "leader-election" in args
            assert args["leader-election-namespace"] == "$(NAMESPACE)"


def test_backend_selection(scenario: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = scenario
    ds = rendered.daemonset
    driver = container(ds, "driver")
    args = flags(driver)
    mounts = {m["mountPath"] for m in driver["volumeMounts"]}
    backend = values.get("backend", "hostpath")
    assert args["backend"] == backend
    assert args["mode"] == "node"
    spec = pod_spec(ds)
    if backend == "lvm":
        assert {"/dev", "/run/lvm", "/run/udev", "/sys", "/lib/modules"} <= mounts
        assert "hostpath-root" not in args
        config_path = Path(args["lvm-config"])
        vol, inner = resolve(ds, driver, str(config_path))
        config_map = rendered.one("ConfigMap")
        assert volume(ds, vol)["configMap"]["name"] == config_map["metadata"]["name"]
        classes = json.loads(config_map["data"][inner])["deviceClasses"]
        expected = _deep_get(
            values, "lvm.deviceClasses", [{"name": "default", "volumeGroup": "nodelocal"}]
        )
        assert [(c["name"], c["volumeGroup"]) for c in classes] == [
            (c["name"], c["volumeGroup"]) for c in expected
        ]
        for cls in classes:
            assert set(cls) <= {
                "name",
                "volumeGroup",
                "thinPool",
                "default",
                "overprovisionRatio",
                "reservedBytes",
                "lvType",
            }
        nsenter = _deep_get(values, "lvm.nsenter", False)
        assert ("lvm-nsenter" in args) is nsenter
        assert spec.get("hostPID", False) is nsenter
        udev = _deep_get(values, "lvm.udevSync", False)
        assert args["lvm-udev-sync"] == str(udev).lower()
        assert spec.get("hostIPC", False) is udev
        for sc in rendered.all("StorageClass"):
            assert sc["parameters"]["deviceClass"] in {c["name"] for c in classes}
            assert sc["parameters"]["csi.storage.k8s.io/fstype"] in {"ext4", "xfs"}
            assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
            assert sc["allowVolumeExpansion"] is True
    else:
        root = args["hostpath-root"]
        vol, inner = resolve(ds, driver, root)
        assert inner == ""
        assert volume(ds, vol)["hostPath"]["path"] == root
        assert not rendered.all("ConfigMap")
        assert not ({"/run/lvm", "/run/udev", "/lib/modules"} & mounts)
        assert "hostPID" not in spec and "hostIPC" not in spec
        (sc,) = rendered.all("StorageClass")
        assert sc["metadata"]["name"] == "nodelocal-hostpath"
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        capacity = _deep_get(values, "hostpath.capacityBytes", None)
        if capacity is None:
            assert "hostpath-capacity" not in args
        else:
            assert args["hostpath-capacity"] == str(capacity)


def test_attach_required_switch(scenario: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = scenario
    attach = _deep_get(values, "csiDriver.attachRequired", False)
    assert rendered.one("CSIDriver")["spec"]["attachRequired"] is attach
    assert ("csi-attacher" in container_names(rendered.deployment)) is attach
    attacher_roles = [
        r for r in rendered.all("ClusterRole") if r["metadata"]["name"].endswith("-attacher")
    ]
    assert len(attacher_roles) == (1 if attach else 0)
    # The resizer always runs: it hands expansion to the kubelet's NodeExpandVolume.
    assert "csi-resizer" in container_names(rendered.deployment)


def test_snapshot_switch(scenario: tuple[dict[str, Any], Rendered]) -> None:
    values, rendered = scenario
    enabled = _deep_get(values, "snapshots.enabled", True)
    names = container_names(rendered.daemonset)
    assert ("csi-snapshotter" in names) is enabled
    assert len(rendered.all("VolumeSnapshotClass")) == (1 if enabled else 0)
    snap_roles = [
        r for r in rendered.all("ClusterRole") if r["metadata"]["name"].endswith("-snapshotter")
    ]
    assert len(snap_roles) == (1 if enabled else 0)
    if enabled:
        args = flags(container(rendered.daemonset, "csi-snapshotter"))
        assert "node-deployment" in args
        assert "leader-election" not in args


def test_csidriver_object(scenario: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = scenario
    spec = rendered.one("CSIDriver")["spec"]
    assert spec["podInfoOnMount"] is True
    assert spec["storageCapacity"] is True
    assert spec["fsGroupPolicy"] == "File"
    assert spec["requiresRepublish"] is False
    assert spec["volumeLifecycleModes"] == ["Persistent", "Ephemeral"]


def test_provisioner_is_distributed_and_publishes_capacity(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    _, rendered = scenario
    ds = rendered.daemonset
    prov = container(ds, "csi-provisioner")
    args = flags(prov)
    for flag in ("node-deployment", "enable-capacity", "extra-create-metadata", "strict-topology"):
        assert flag in args
    assert args["capacity-ownerref-level"] == "1"  # the DaemonSet owns the capacity objects
    assert "leader-election" not in args
    assert env_field_ref(prov, "NAMESPACE") == "metadata.namespace"
    assert env_field_ref(prov, "POD_NAME") == "metadata.name"


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _granted(rendered: Rendered, service_account: str) -> set[tuple[str, str, str]]:
    """Everything a service account may do, following the chart's own bindings."""
    granted: set[tuple[str, str, str]] = set()
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        for binding in rendered.all(kind):
            if any(s["name"] == service_account for s in binding["subjects"]):
                assert binding["roleRef"]["kind"] == role_kind
                role = rendered.one(role_kind, binding["roleRef"]["name"])
                assert role["metadata"]["name"] == binding["roleRef"]["name"]
                granted |= _rules(role)
    return granted


def test_rbac_grants_what_each_pod_needs_and_no_wildcards(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    values, rendered = scenario
    for role in rendered.all("ClusterRole") + rendered.all("Role"):
        for group, resource, verb in _rules(role):
            assert "*" not in (group, resource, verb), role["metadata"]["name"]
            assert resource != "secrets", "no sidecar here needs secrets"
    accounts = {sa["metadata"]["name"] for sa in rendered.all("ServiceAccount")}
    node_sa = pod_spec(rendered.daemonset)["serviceAccountName"]
    ctrl_sa = pod_spec(rendered.deployment)["serviceAccountName"]
    assert {node_sa, ctrl_sa} <= accounts
    node = _granted(rendered, node_sa)
    ctrl = _granted(rendered, ctrl_sa)
    for need in [
        ("", "persistentvolumes", "create"),
        ("", "persistentvolumes", "delete"),
        ("", "persistentvolumeclaims", "update"),
        ("storage.k8s.io", "storageclasses", "watch"),
        ("storage.k8s.io", "csinodes", "get"),
        ("", "nodes", "get"),
        ("", "events", "create"),
        ("storage.k8s.io", "csistoragecapacities", "create"),
        ("storage.k8s.io", "csistoragecapacities", "delete"),
        ("", "pods", "get"),
        ("apps", "daemonsets", "get"),
    ]:
        assert need in node, need
    assert not any(r == "leases" for _, r, _ in node), "the node plugin runs no leader election"
    assert ("", "persistentvolumeclaims/status", "patch") in ctrl
    assert ("", "persistentvolumes", "patch") in ctrl
    assert ("coordination.k8s.io", "leases", "update") in ctrl
    assert not any(v in {"create", "delete"} and r == "persistentvolumes" for _, r, v in ctrl)
    snapshots = _deep_get(values, "snapshots.enabled", True)
    assert (
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch") in node
    ) is snapshots
    attach = _deep_get(values, "csiDriver.attachRequired", False)
    assert (("storage.k8s.io", "volumeattachments/status", "patch") in ctrl) is attach
    # Namespaced grants stay in the release namespace.
    for role in rendered.all("Role") + rendered.all("RoleBinding"):
        assert role["metadata"]["namespace"] == "kube-system"


def _tools_module_versions() -> dict[str, str]:
    go_mod = (REPO / "tools" / "sidecars" / "go.mod").read_text()
    found = re.findall(r"github\.com/kubernetes-csi/(external-[a-z]+)/v\d+ (v[0-9.]+)", go_mod)
    return dict(found)


def test_sidecar_images_match_the_sidecars_we_build(chart_tools: ChartTools) -> None:
    """scripts/install-sidecars.sh builds what the chart deploys: tests run the deployed code."""
    rendered = Rendered(parse(render_text(chart_tools, {"csiDriver": {"attachRequired": True}})))
    images = {
        c["name"]: c["image"]
        for workload in (rendered.daemonset, rendered.deployment)
        for c in pod_spec(workload)["containers"]
    }
    built = _tools_module_versions()
    expected = {
        "csi-provisioner": ("csi-provisioner", built["external-provisioner"]),
        "csi-attacher": ("csi-attacher", built["external-attacher"]),
        "csi-resizer": ("csi-resizer", built["external-resizer"]),
        "csi-snapshotter": ("csi-snapshotter", built["external-snapshotter"]),
    }
    for name, (image, version) in expected.items():
        assert images[name] == f"registry.k8s.io/sig-storage/{image}:{version}"
    for name, image in images.items():
        if name != "driver":
            assert re.fullmatch(r"registry\.k8s\.io/sig-storage/[a-z-]+:v\d+\.\d+\.\d+", image), (
                image
            )
    script = (REPO / "scripts" / "install-sidecars.sh").read_text()
    for image, version in expected.values():
        assert f"cmd/{image} {version}" in script


def test_driver_arguments_are_flags_the_cli_accepts(chart_tools: ChartTools) -> None:
    """Every --flag the chart passes to the driver exists in `python -m csi_driver --help`."""
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))
    for values in SCENARIOS.values():
        rendered = Rendered(parse(render_text(chart_tools, values)))
        for workload in (rendered.daemonset, rendered.deployment):
            for flag in flags(container(workload, "driver")):
                assert f"--{flag}" in accepted, f"the driver has no --{flag}"


def test_the_kubelets_cgroup_root_reaches_the_node_plugin(chart_tools: ChartTools) -> None:
    """IO limits find the Pods' cgroups below the kubelet's --cgroup-root when given it."""
    default = Rendered(parse(render_text(chart_tools, {}))).daemonset
    assert "kubelet-cgroup-root" not in flags(container(default, "driver"))
    given = Rendered(parse(render_text(chart_tools, {"kubeletCgroupRoot": "/edge.slice"})))
    assert flags(container(given.daemonset, "driver"))["kubelet-cgroup-root"] == "/edge.slice"
    for bad in ("/a/../b", "/.", "/" + "x" * 600, "a: b", "/a #b", "a\n", "/a" * 9):
        with pytest.raises(AssertionError, match="values don't meet the specifications"):
            render_text(chart_tools, {"kubeletCgroupRoot": bad})


def test_lvm_classes_scenario_is_rendered_as_given(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render_text(chart_tools, SCENARIOS["lvm-classes-nsenter-udev"])))
    classes = json.loads(rendered.one("ConfigMap")["data"]["lvm.json"])["deviceClasses"]
    assert classes == [
        {
            "name": "fast",
            "volumeGroup": "vg-nvme",
            "thinPool": "pool0",
            "default": True,
            "overprovisionRatio": 4,
            "reservedBytes": 1073741824,
        },
        {"name": "bulk", "volumeGroup": "vg-hdd", "default": False, "lvType": "raid1"},
    ]
    fast = rendered.one("StorageClass", "nodelocal-lvm-fast")
    assert fast["parameters"] == {
        "deviceClass": "fast",
        "csi.storage.k8s.io/fstype": "xfs",
        "wipeOnDelete": "true",
    }
    assert fast["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    bulk = rendered.one("StorageClass", "bulk-mirrored")
    assert bulk["reclaimPolicy"] == "Retain"
    assert bulk["parameters"]["mirrors"] == "1"
    assert LVM_CLASSES[1]["storageClass"]["name"] == "bulk-mirrored"


def test_device_class_without_storage_class(chart_tools: ChartTools) -> None:
    values = {
        "backend": "lvm",
        "lvm": {
            "deviceClasses": [
                {"name": "hidden", "volumeGroup": "vg1", "storageClass": {"create": False}},
                {"name": "plain", "volumeGroup": "vg2", "default": True},
            ]
        },
    }
    rendered = Rendered(parse(render_text(chart_tools, values)))
    assert [sc["metadata"]["name"] for sc in rendered.all("StorageClass")] == [
        "nodelocal-lvm-plain"
    ]
    classes = json.loads(rendered.one("ConfigMap")["data"]["lvm.json"])["deviceClasses"]
    assert [c["name"] for c in classes] == ["hidden", "plain"]


def test_provisioner_default_fstype_only_for_lvm(
    scenario: tuple[dict[str, Any], Rendered],
) -> None:
    """A hostpath directory volume has the root's filesystem; a provisioner default of ext4
    would make every PVC on an XFS root fail with INVALID_ARGUMENT."""
    values, rendered = scenario
    provisioner = flags(container(rendered.daemonset, "csi-provisioner"))
    if values.get("backend", "hostpath") == "lvm":
        assert provisioner.get("default-fstype") in ("ext4", "xfs")
    else:
        assert "default-fstype" not in provisioner
