"""Fixtures of the e2e lane: one real cluster per session, the chart installed by helm.

The lane is meant to run where it can (root, the packages and builds of
scripts/install-cluster.sh); anywhere else its tests fail loudly rather than skip.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from . import images
from .cluster import NODE_NAME, Cluster, cache_dir
from .kube import DRIVER_NAME, Kube, namespace, raw, wait_until

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "e2e"
DRIVER_NAMESPACE = "nodelocal-csi"
HOSTPATH_CAPACITY = 4 * 1024**3
# How long every driver container must stay ready, unrestarted, after helm install.
SETTLE_SECONDS = 15.0
# The chart's sidecars (values key: binary), built by scripts/install-sidecars.sh at the releases
# the chart's image tags name, each imported as a one-binary image under our registry name.
SIDECARS = {
    "registrar": "csi-node-driver-registrar",
    "provisioner": "csi-provisioner",
    "attacher": "csi-attacher",
    "resizer": "csi-resizer",
    "snapshotter": "csi-snapshotter",
    "livenessProbe": "livenessprobe",
}
SNAPSHOT_CRDS = (
    "snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
    "snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
    "snapshot.storage.k8s.io_volumesnapshots.yaml",
)


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: {hint}", pytrace=False)
    return path


def sidecar_image(key: str) -> str:
    """The image of the chart's sidecars.<key> (image names are lower case)."""
    return f"{images.E2E_REGISTRY}/{key.lower()}:e2e"


@functools.cache
def driver_archive() -> images.OciArchive:
    """The driver image built from the repository's Dockerfile: the archive scripts/test-e2e.sh
    had scripts/build-image.sh build (``CSI_E2E_DRIVER_ARCHIVE``), else built now (cached by
    the script). CSI_E2E_DRIVER_SRC names another source tree to build it from."""
    path = os.environ.get("CSI_E2E_DRIVER_ARCHIVE")
    if not path:
        context = os.environ.get("CSI_E2E_DRIVER_SRC") or str(ROOT)
        res = subprocess.run(
            [str(ROOT / "scripts" / "build-image.sh"), "--context", context],
            stdout=subprocess.PIPE,
            text=True,
            timeout=1800,
        )
        if res.returncode != 0:
            pytest.fail("scripts/build-image.sh failed (its output is above)", pytrace=False)
        path = res.stdout.strip().splitlines()[-1]
    return images.OciArchive.read(Path(path))


def _image_list() -> list[images.Image]:
    result = [
        images.pause_image(),
        images.busybox_image(),
        driver_archive().image(),
    ]
    for key, name in SIDECARS.items():
        binary = _require(bin_dir() / name, "run scripts/install-sidecars.sh")
        result.append(images.binary_image(sidecar_image(key), binary))
    return result


# ----------------------------------------------------------------------------- timings


@dataclass
class Timings:
    """Wall times of the lane, written next to the logs and printed at the end."""

    values: dict[str, float] = field(default_factory=dict)

    def record(self, key: str, seconds: float) -> None:
        self.values[key] = round(seconds, 2)


_TIMINGS = Timings()


@pytest.fixture(scope="session")
def timings() -> Timings:
    return _TIMINGS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _TIMINGS.values:
        terminalreporter.write_sep("-", "e2e timings (seconds)")
        for key, value in _TIMINGS.values.items():
            terminalreporter.write_line(f"{key:40s} {value:8.2f}")


def artifacts_dir() -> Path:
    return Path(os.environ.get("CSI_E2E_ARTIFACTS", cache_dir() / "e2e-artifacts" / "last"))


# ----------------------------------------------------------------------------- cluster


def _apply_snapshot_crds(cluster: Cluster) -> None:
    crd_dir = cache_dir() / "e2e-crds"
    ext = client.ApiextensionsV1Api(cluster.api_client())
    names = []
    for name in SNAPSHOT_CRDS:
        path = _require(crd_dir / name, "run scripts/install-cluster.sh")
        body = yaml.safe_load(path.read_text())
        raw(ext.create_custom_resource_definition, body)
        names.append(body["metadata"]["name"])

    def all_established() -> bool:
        for crd in names:
            status = raw(ext.read_custom_resource_definition, crd).get("status") or {}
            # A CRD read right after its creation may have no conditions yet.
            conditions = status.get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    wait_until("snapshot CRDs Established", all_established, 60)


@pytest.fixture(scope="session")
def cluster(timings: Timings) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the e2e lane needs root (mounts, cgroups, iptables)", pytrace=False)
    from .cluster import Binaries

    started = time.monotonic()
    c = Cluster(Binaries.discover(), artifacts=artifacts_dir())
    # CI stops a run that overstays with SIGTERM: make it unwind through the teardown below.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        c.start(_image_list)
        _apply_snapshot_crds(c)
        snap = c.start_daemon(
            "snapshot-controller",
            [
                str(_require(bin_dir() / "snapshot-controller", "run scripts/install-sidecars.sh")),
                f"--kubeconfig={c.admin_kubeconfig}",
                "--leader-election=false",
                "--enable-distributed-snapshotting",
                "--v=2",
            ],
        )
        time.sleep(1)
        snap.require_alive()
        timings.record("cluster_start", time.monotonic() - started)
        for key, value in c.timings.items():
            timings.record(f"cluster_start.{key}", value)
        yield c
    finally:
        t0 = time.monotonic()
        problems = c.stop()
        signal.signal(signal.SIGTERM, previous)
        timings.record("cluster_stop", time.monotonic() - t0)
        _write_timings(timings)
        if problems:
            pytest.fail(
                "cluster teardown left things behind: " + "; ".join(problems), pytrace=False
            )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_timings(timings: Timings) -> None:
    out = artifacts_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps(timings.values, indent=2))


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Any:
    return cluster.api_client()


# ----------------------------------------------------------------------------- helm


def chart_default(*keys: str) -> Any:
    """A value of the chart's own values.yaml, e.g. chart_default("sidecars", "registrar")."""
    value: Any = yaml.safe_load((ROOT / "charts" / "nodelocal-csi" / "values.yaml").read_text())
    for key in keys:
        value = value[key]
    return value


def helm_values(cluster: Cluster, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "kubeletDir": str(cluster.kubelet_dir),
        "image": {
            "repository": driver_archive().repository,
            "tag": driver_archive().tag,
            "pullPolicy": "Never",
        },
        "logging": {"format": "text", "level": "DEBUG", "sidecarVerbosity": 4},
        # A fixed capacity makes the driver's accounting observable (CSIStorageCapacity).
        "hostpath": {"root": str(cluster.hostpath_root), "capacityBytes": HOSTPATH_CAPACITY},
        "provisioner": {"capacityPollInterval": "5s"},
        # The lvm node (test_09_lvm.py) joins the cluster for a while: this release stays here.
        "node": {"nodeSelector": {"kubernetes.io/hostname": NODE_NAME}},
        "controller": {"nodeSelector": {"kubernetes.io/hostname": NODE_NAME}},
        # Quick enough for test_01_liveness to see a restart within a minute, slack enough
        # for a busy machine (three failed probes in a row, each allowed 5 s).
        "livenessProbe": {"periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        "sidecars": {key: {"image": sidecar_image(key)} for key in SIDECARS}
        | {"pullPolicy": "Never"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = values[key] | value
        else:
            values[key] = value
    return values


@dataclass
class Release:
    """The chart installed in the cluster, at most one at a time (one CSIDriver name)."""

    cluster: Cluster
    values: dict[str, Any] | None = None
    name: str = RELEASE
    namespace: str = DRIVER_NAMESPACE
    #: the node whose CSINode must list driver_name once the release is up
    node: str = NODE_NAME
    driver_name: str = DRIVER_NAME
    #: helm's --timeout of install and uninstall
    timeout: str = "3m"
    # An install that failed fails every later request for the same values at once, instead
    # of waiting out helm's timeout again in each test module.
    failures: dict[str, str] = field(default_factory=dict)

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        helm = _require(bin_dir() / "helm", "run scripts/install-chart-tools.sh")
        res = subprocess.run(
            [str(helm), "--kubeconfig", str(self.cluster.admin_kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res

    def install(self, values: dict[str, Any]) -> float:
        """Install (replacing a release with other values); return the seconds it took."""
        if self.values == values:
            return 0.0
        key = json.dumps(values, sort_keys=True)
        if key in self.failures:
            pytest.fail(f"an earlier install with these values failed:\n{self.failures[key]}")
        self.uninstall()
        path = self.cluster.workdir / f"values-{self.name}.json"
        path.write_text(json.dumps(values, indent=2))
        t0 = time.monotonic()
        try:
            self.helm(
                "install",
                self.name,
                str(ROOT / "charts" / "nodelocal-csi"),
                "--namespace",
                self.namespace,
                "--create-namespace",
                "--values",
                str(path),
                "--wait",
                "--timeout",
                self.timeout,
            )
        except AssertionError as exc:
            self.failures[key] = f"{exc}\n{self.diagnose()}"
            self._uninstall_failed()
            raise AssertionError(self.failures[key]) from None
        self.values = values
        self._wait_registered()
        seconds = time.monotonic() - t0
        try:
            self._settled()
        except AssertionError as exc:
            self.failures[key] = f"{exc}\n{self.diagnose()}"
            self.uninstall()
            raise AssertionError(self.failures[key]) from None
        return seconds

    def _settled(self, seconds: float = SETTLE_SECONDS) -> None:
        """helm --wait accepts a DaemonSet whose one pod is not ready yet (maxUnavailable 1),
        and a pod the moment its containers run; a sidecar that exits a second later (a crash
        loop) would slip through. Every container of the driver must become ready within the
        chart's startup allowance, never restart, and then stay ready for a while."""
        kube = Kube(self.cluster.api_client(), self.namespace)
        startup = float(
            (self.values or {}).get("livenessProbe", {}).get("startupSeconds")
            or chart_default("livenessProbe", "startupSeconds")
        )
        ready_by = time.monotonic() + startup + 30
        steady_from: float | None = None
        while True:
            unready = []
            for pod in kube.items(kube.core.list_namespaced_pod, self.namespace):
                if pod["metadata"].get("deletionTimestamp"):
                    continue  # an old Pod of an upgrade, on its way out
                statuses = pod["status"].get("containerStatuses", [])
                if pod["status"].get("phase") != "Running" or len(statuses) < len(
                    pod["spec"]["containers"]
                ):
                    unready.append(pod["metadata"]["name"])
                for c in statuses:
                    name = f"{pod['metadata']['name']}/{c['name']}"
                    if c["restartCount"]:
                        raise AssertionError(
                            f"driver container {name} restarted: restarts={c['restartCount']}"
                            f" last state={c.get('lastState')}"
                        )
                    if not c["ready"]:
                        unready.append(name)
            now = time.monotonic()
            if unready:
                if steady_from is not None:
                    raise AssertionError(f"driver containers {unready} became unready")
                if now > ready_by:
                    raise AssertionError(f"driver containers {unready} not ready in time")
            elif steady_from is None:
                steady_from = now
            elif now - steady_from > seconds:
                return
            time.sleep(1)

    def _wait_registered(self) -> None:
        storage = client.StorageV1Api(self.cluster.api_client())
        try:
            wait_until(
                "CSINode lists the driver",
                lambda: driver_registered(storage, self.node, self.driver_name),
                120,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def _uninstall_failed(self) -> None:
        """Remove what a failed install left, so other values can still be installed."""
        with contextlib.suppress(AssertionError):
            self.helm("uninstall", self.name, "--namespace", self.namespace, "--wait")
        self.values = None

    def uninstall(self) -> None:
        if self.values is None:
            return
        self.helm(
            "uninstall",
            self.name,
            "--namespace",
            self.namespace,
            "--wait",
            "--timeout",
            self.timeout,
        )
        self.values = None
        kube = Kube(self.cluster.api_client(), self.namespace)
        wait_until(
            "driver pods gone",
            lambda: not kube.items(kube.core.list_namespaced_pod, self.namespace),
            180,
        )

    def diagnose(self) -> str:
        """Pod states, events and container logs of the driver namespace."""
        kube = Kube(self.cluster.api_client(), self.namespace)
        parts = []
        with contextlib.suppress(Exception):
            for pod in kube.items(kube.core.list_namespaced_pod, self.namespace):
                name = pod["metadata"]["name"]
                parts.append(kube.describe(name))
                for c in pod["spec"]["containers"]:
                    log = kube.logs(name, c["name"])
                    parts.append(f"--- {name}/{c['name']}:\n" + "\n".join(log.splitlines()[-30:]))
        return "\n".join(parts)


def driver_registered(storage: Any, node: str = NODE_NAME, driver: str = DRIVER_NAME) -> bool:
    """Whether the node's CSINode object lists the driver (kubelet plugin registration)."""
    csinode = raw(storage.read_csi_node, node)
    return any(d["name"] == driver for d in csinode["spec"].get("drivers") or [])


@pytest.fixture(scope="session")
def release(cluster: Cluster) -> Iterator[Release]:
    r = Release(cluster)
    try:
        yield r
    finally:
        with contextlib.suppress(Exception):
            r.uninstall()


@pytest.fixture(scope="module")
def driver(release: Release, cluster: Cluster, timings: Timings) -> Release:
    """The chart with default values (hostpath backend, no attach), installed once."""
    seconds = release.install(helm_values(cluster))
    if seconds:
        timings.record("helm_install_default", seconds)
    return release


@pytest.fixture
def ns(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[Kube]:
    prefix = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    with namespace(api, prefix) as kube:
        yield kube
