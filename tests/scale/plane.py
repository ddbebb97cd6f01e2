"""Many simulated nodes on one machine, for the scale lane (docs/scale.md).

The e2e lane's control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler;
``tests/e2e/cluster.py``) runs without a kubelet. kwok makes the Node objects Ready and marks
the Pods bound to them Running. Behind each simulated node run two real host processes: the
driver in node mode on its own hostpath root with its own capacity, and a csi-provisioner in
node deployment with capacity tracking, each with the flags the chart's DaemonSet gives them
(read from the chart rendered by helm) and the provisioner with its own credentials (a token of
the chart's node ServiceAccount bound to that node's DaemonSet Pod, which kwok keeps "Running",
so the CSIStorageCapacity objects are owned as in a real cluster). What the kubelet would do for
a driver, this module does: it asks NodeGetInfo and writes the node's CSINode.

Everything lives in one work directory (``/tmp/nlscale-*``). ``Plane.stop`` ends every process
group and removes the directory, also after a failed start; ``reap_stale`` removes what a run
killed without its teardown left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from kubernetes import client, utils

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from testkit.ports import free_port
from tests.e2e import hoststate
from tests.e2e.cluster import Binaries, Cluster, cache_dir, wait_for
from tests.e2e.hoststate import Daemon
from tests.e2e.kube import raw

ROOT = Path(__file__).resolve().parents[2]
DRIVER_NAME = "nodelocal.csi.dev"
TOPOLOGY_KEY = f"topology.{DRIVER_NAME}/node"
RELEASE = "nodelocal-csi"
NAMESPACE = "nodelocal-csi"
NODE_SERVICE_ACCOUNT = f"{RELEASE}-node"
PREFIX = "nlscale-"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
#: the FlowSchema that gives the provisioners' requests their own series in the apiserver's
#: metrics (apiserver_flowcontrol_dispatched_requests_total{flow_schema=...})
PROVISIONER_FLOW = "nodelocal-scale-provisioners"
#: the PV controller's client (kube-controller-manager runs each controller with its own
#: ServiceAccount), measured the same way
BINDER_FLOW = "nodelocal-scale-pv-binder"
FLOWS = {
    PROVISIONER_FLOW: (NAMESPACE, NODE_SERVICE_ACCOUNT),
    BINDER_FLOW: ("kube-system", "persistent-volume-binder"),
}
OWNER_FILE = "owner.pid"
#: kube-apiserver 1.34 turns a watch from resource version "0" into a streamed list
#: (sendInitialEvents, the WatchList feature), which it then refuses over Debian's etcd 3.4 (no
#: RequestWatchProgress). kwok watches Pods from "0": each of its watches failed, and it saw new
#: Pods only at its next relist, tens of seconds late. The control plane's own clients watch
#: from a listed version and are not affected.
APISERVER_ARGS = ("--feature-gates=WatchList=false",)
#: pod addresses kwok hands out (nothing routes them: there is no pod network)
KWOK_CIDR = "10.128.0.1/14"
# Processes a run starts, by the name of their executable; all name the work directory.
PROCESS_NAMES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "csi-provisioner",
    Path(sys.executable).name,
    "python",
    "python3",
)


def bin_dir() -> Path:
    return cache_dir() / "bin"


def kwok_stages() -> Path:
    """The stages scripts/install-kwok.sh copied from the kwok release it built."""
    script = (ROOT / "scripts" / "install-kwok.sh").read_text()
    m = re.search(r"^KWOK_VERSION=\$\{KWOK_VERSION:-(v[^}]+)\}$", script, re.MULTILINE)
    if m is None:
        raise RuntimeError("scripts/install-kwok.sh names no KWOK_VERSION")
    return cache_dir() / "kwok" / f"stages-{m.group(1)}.yaml"


def flow_schema(name: str, namespace: str, account: str) -> dict[str, Any]:
    """A FlowSchema giving one ServiceAccount's requests their own series in the apiserver's
    metrics, at the priority level the default "service-accounts" and
    "kube-system-service-accounts" schemas give them (only the series' name changes)."""
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": name},
        "spec": {
            "priorityLevelConfiguration": {
                "name": "workload-high" if namespace == "kube-system" else "workload-low"
            },
            "matchingPrecedence": 800,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": account, "namespace": namespace},
                        }
                    ],
                    "resourceRules": [
                        {
                            "verbs": ["*"],
                            "apiGroups": ["*"],
                            "resources": ["*"],
                            "clusterScope": True,
                            "namespaces": ["*"],
                        }
                    ],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }
            ],
        },
    }


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: {hint}")
    return path


@dataclass(frozen=True)
class NodeSpec:
    name: str
    capacity: int


@dataclass
class SimNode:
    """One simulated node: its directory, its driver and its provisioner."""

    spec: NodeSpec
    dir: Path
    driver: Daemon | None = None
    provisioner: Daemon | None = None
    metrics_port: int = 0
    daemonset_pod: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def socket(self) -> Path:
        return self.dir / "csi.sock"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def kubelet_dir(self) -> Path:
        return self.dir / "kubelet"


def render_chart(values: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The chart's objects as helm renders them for these values."""
    path = out / "values.json"
    path.write_text(json.dumps(values, indent=2))
    res = subprocess.run(
        [
            str(_require(bin_dir() / "helm", "run scripts/install-chart-tools.sh")),
            "template",
            RELEASE,
            str(ROOT / "charts" / "nodelocal-csi"),
            "--namespace",
            NAMESPACE,
            "--values",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (out / "chart.yaml").write_text(res.stdout)
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def container_args(objects: list[dict[str, Any]], container: str) -> list[str]:
    """The args of one container of the chart's node DaemonSet."""
    for obj in objects:
        if obj["kind"] == "DaemonSet":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                if c["name"] == container:
                    return [str(a) for a in c["args"]]
    raise RuntimeError(f"the chart's DaemonSet has no container {container}")


def override_flags(args: list[str], values: dict[str, str]) -> list[str]:
    """args with the ``--flag=value`` of each flag named in values replaced (or added): the
    chart's flags, pointed at this node's socket, root and credentials."""
    out, seen = [], set()
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in values:
            out.append(f"{name}={values[name]}")
            seen.add(name)
        else:
            out.append(arg)
    out += [f"{k}={v}" for k, v in values.items() if k not in seen]
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes_of(workdir: Path) -> list[int]:
    return [
        pid for name in set(PROCESS_NAMES) for pid in hoststate.pids_matching([str(workdir)], name)
    ]


def stray_processes() -> list[int]:
    """Processes of any scale run, current or past."""
    return processes_of(Path("/tmp") / PREFIX)


def reap_stale(current: Path | None = None) -> None:
    """Remove what an earlier run killed without its teardown left: its processes and its work
    directory. A run whose owner still lives is refused (the e2e lock should prevent it)."""
    for workdir in sorted(Path("/tmp").glob(f"{PREFIX}*")):
        if workdir == current or not workdir.is_dir():
            continue
        try:
            owner = int((workdir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and _pid_alive(owner):
            raise RuntimeError(f"another scale run works in {workdir} (pid {owner})")
        hoststate.kill_pids(processes_of(workdir))
        shutil.rmtree(workdir, ignore_errors=True)


def stop_daemons(daemons: Iterable[Daemon], grace: float = 15.0) -> None:
    """SIGTERM to every process group at once, SIGKILL to what is left after grace."""
    running = [d for d in daemons if d.proc is not None and d.proc.poll() is None]
    for d in running:
        assert d.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(d.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for d in running:
        assert d.proc is not None
        try:
            d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(timeout=30)


@dataclass
class Plane:
    """Start with ``start()``, always ``stop()`` (also after a failed start)."""

    nodes: list[NodeSpec]
    chart_values: dict[str, Any]
    artifacts: Path | None = None
    log: Callable[[str], None] = print
    #: e.g. the client QPS of kube-controller-manager, whose PV controller binds every claim
    controller_manager_args: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        (self.workdir / OWNER_FILE).write_text(str(os.getpid()))
        self.cluster: Cluster | None = None
        self.kwok: Daemon | None = None
        self.sim: list[SimNode] = [
            SimNode(spec, self.workdir / "nodes" / spec.name) for spec in self.nodes
        ]
        self.objects: list[dict[str, Any]] = []
        self._api: client.ApiClient | None = None

    # ------------------------------------------------------------------ clients

    @property
    def api(self) -> client.ApiClient:
        """An admin client with a connection pool for the harness's worker threads."""
        if self._api is None:
            assert self.cluster is not None
            c = self.cluster
            cfg = client.Configuration()
            cfg.host = f"https://127.0.0.1:{c.api_port}"
            cfg.ssl_ca_cert = str(c.pki.ca.cert)
            cfg.cert_file = str(c.clients["admin"].cert)
            cfg.key_file = str(c.clients["admin"].key)
            cfg.connection_pool_maxsize = 32
            self._api = client.ApiClient(cfg)
        return self._api

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def storage(self) -> Any:
        return client.StorageV1Api(self.api)

    def _timed(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        self.log(f"scale: {name}")
        fn()
        self.timings[name] = round(time.monotonic() - t0, 2)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        reap_stale(self.workdir)
        binaries = Binaries.discover()
        self.cluster = cluster = Cluster(binaries, workdir=self.workdir, artifacts=self.artifacts)
        if self.artifacts is not None and self.artifacts.exists():
            shutil.rmtree(self.artifacts)
        self._timed(
            "control plane",
            lambda: cluster.start_control_plane(APISERVER_ARGS, self.controller_manager_args),
        )
        self._timed("kwok", self._start_kwok)
        self._timed("nodes", self._create_nodes)
        self._timed("chart objects", self._apply_chart)
        self._timed("daemonset pods", self._wait_daemonset_pods)
        self._timed("drivers", self._start_drivers)
        self._timed("csinodes", self._write_csinodes)
        self._timed("provisioners", self._start_provisioners)

    def _start_kwok(self) -> None:
        assert self.cluster is not None
        kwok = _require(bin_dir() / "kwok", "run scripts/install-kwok.sh")
        config = _require(kwok_stages(), "run scripts/install-kwok.sh")
        self.kwok = Daemon(
            "kwok",
            [
                str(kwok),
                f"--config={config}",
                f"--kubeconfig={self.cluster.admin_kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--cidr={KWOK_CIDR}",
                # the kubelet's default: the node lifecycle controller sees live nodes
                "--node-lease-duration-seconds=40",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
            self.cluster.logs / "kwok.log",
        )
        self.kwok.start()
        time.sleep(1)
        self.kwok.require_alive()

    def _create_nodes(self) -> None:
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        for node in self.sim:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "annotations": {KWOK_ANNOTATION: "fake"},
                    "labels": {
                        "kubernetes.io/hostname": node.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        # What the kubelet copies from NodeGetInfo's topology (checked against
                        # the driver's answer before its CSINode is written).
                        TOPOLOGY_KEY: node.name,
                    },
                },
                "status": {"allocatable": resources, "capacity": resources},
            }
            self.core.create_node(body)

        def all_ready() -> bool:
            items = raw(self.core.list_node, label_selector="type=kwok")["items"]
            ready = sum(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n["status"].get("conditions") or []
                )
                for n in items
            )
            return ready == len(self.sim)

        wait_for("kwok nodes Ready", all_ready, 120, every=1, alive=self._alive)

    def _alive(self) -> None:
        if self.kwok is not None:
            self.kwok.require_alive()
        if self.cluster is not None:
            for d in self.cluster.daemons:
                d.require_alive()

    def _apply_chart(self) -> None:
        """The chart's objects but the controller Deployment (ControllerPublish only, which
        the hostpath class does not use: attachRequired is false); the DaemonSet's Pods are
        kwok's, the processes behind them ours. Plus a FlowSchema for the measurement."""
        self.objects = render_chart(self.chart_values, self.workdir)
        self.core.create_namespace({"metadata": {"name": NAMESPACE}})
        for obj in self.objects:
            if obj["kind"] == "Deployment":
                continue
            utils.create_from_dict(  # type: ignore[no-untyped-call]
                self.api, obj, namespace=NAMESPACE
            )
        custom = client.CustomObjectsApi(self.api)
        for name, (namespace, account) in FLOWS.items():
            custom.create_cluster_custom_object(
                "flowcontrol.apiserver.k8s.io",
                "v1",
                "flowschemas",
                flow_schema(name, namespace, account),
            )

    def _wait_daemonset_pods(self) -> None:
        by_name = {n.name: n for n in self.sim}

        def all_running() -> bool:
            pods = raw(
                self.core.list_namespaced_pod,
                NAMESPACE,
                label_selector="app.kubernetes.io/component=node",
            )["items"]
            running = 0
            for pod in pods:
                node = by_name.get(pod["spec"].get("nodeName", ""))
                if node is not None and pod["status"].get("phase") == "Running":
                    node.daemonset_pod = pod["metadata"]["name"]
                    running += 1
            return running == len(self.sim)

        wait_for("the DaemonSet's Pods Running", all_running, 180, every=1, alive=self._alive)

    def _start_drivers(self) -> None:
        chart_args = container_args(self.objects, "driver")
        for node in self.sim:
            for d in (node.root, node.kubelet_dir):
                d.mkdir(parents=True)
            node.metrics_port = free_port()
            argv = [
                sys.executable,
                "-m",
                "csi_driver",
                *override_flags(
                    chart_args,
                    {
                        "--endpoint": f"unix://{node.socket}",
                        "--node-id": node.name,
                        "--kubelet-dir": str(node.kubelet_dir),
                        "--hostpath-root": str(node.root),
                        "--hostpath-capacity": str(node.spec.capacity),
                        "--metrics-address": f"127.0.0.1:{node.metrics_port}",
                    },
                ),
            ]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            node.driver = Daemon(
                "driver", argv, self.workdir / "node-logs" / f"{node.name}.driver.log", env
            )
            node.driver.start()

        def drivers_alive() -> None:
            self._alive()
            for node in self.sim:
                assert node.driver is not None
                node.driver.require_alive()

        wait_for(
            "every driver's socket",
            lambda: all(n.socket.exists() for n in self.sim),
            300,
            every=1,
            alive=drivers_alive,
        )

    def node_info(self, node: SimNode) -> Any:
        with grpc.insecure_channel(f"unix://{node.socket}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            return csi_pb2_grpc.NodeStub(channel).NodeGetInfo(
                csi_pb2.NodeGetInfoRequest(), timeout=30
            )

    def _write_csinodes(self) -> None:
        """What the kubelet's CSI plugin registration writes: the driver's node id and
        topology keys, from NodeGetInfo; the Node's label must carry the same topology."""
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(self._write_csinode, self.sim))

    def _write_csinode(self, node: SimNode) -> None:
        info = self.node_info(node)
        segments = dict(info.accessible_topology.segments)
        if info.node_id != node.name or segments != {TOPOLOGY_KEY: node.name}:
            raise RuntimeError(
                f"{node.name}: NodeGetInfo answered node_id={info.node_id} "
                f"topology={segments}, not what the Node's labels say"
            )
        node_obj = raw(self.core.read_node, node.name)
        driver: dict[str, Any] = {
            "name": DRIVER_NAME,
            "nodeID": info.node_id,
            "topologyKeys": sorted(segments),
        }
        if info.max_volumes_per_node:
            driver["allocatable"] = {"count": info.max_volumes_per_node}
        self.storage.create_csi_node(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "CSINode",
                "metadata": {
                    "name": node.name,
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": node.name,
                            "uid": node_obj["metadata"]["uid"],
                        }
                    ],
                },
                "spec": {"drivers": [driver]},
            }
        )

    def _token(self, node: SimNode) -> str:
        """A token of the chart's node ServiceAccount bound to the node's DaemonSet Pod, as the
        kubelet projects into that Pod."""
        pod = raw(self.core.read_namespaced_pod, node.daemonset_pod, NAMESPACE)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 6 * 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": node.daemonset_pod,
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        res = raw(
            self.core.create_namespaced_service_account_token,
            NODE_SERVICE_ACCOUNT,
            NAMESPACE,
            body,
        )
        return str(res["status"]["token"])

    def _kubeconfig(self, node: SimNode) -> Path:
        assert self.cluster is not None
        path = node.dir / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "scale",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.cluster.api_port}",
                        "certificate-authority": str(self.cluster.pki.ca.cert),
                    },
                }
            ],
            "users": [{"name": node.name, "user": {"token": self._token(node)}}],
            "contexts": [{"name": "scale", "context": {"cluster": "scale", "user": node.name}}],
            "current-context": "scale",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _start_provisioners(self) -> None:
        provisioner = _require(bin_dir() / "csi-provisioner", "run scripts/install-sidecars.sh")
        chart_args = container_args(self.objects, "csi-provisioner")
        for node in self.sim:
            argv = [
                str(provisioner),
                *override_flags(
                    chart_args,
                    {
                        "--csi-address": str(node.socket),
                        "--kubeconfig": str(self._kubeconfig(node)),
                    },
                ),
            ]
            env = dict(
                os.environ,
                NODE_NAME=node.name,
                NAMESPACE=NAMESPACE,
                POD_NAME=node.daemonset_pod,
            )
            node.provisioner = Daemon(
                "csi-provisioner",
                argv,
                self.workdir / "node-logs" / f"{node.name}.provisioner.log",
                env,
            )
            node.provisioner.start()

    def capacities(self) -> list[dict[str, Any]]:
        return list(raw(self.storage.list_csi_storage_capacity_for_all_namespaces)["items"])

    def wait_capacities(self, classes: int, timeout: float) -> None:
        """Until every node publishes one CSIStorageCapacity per class with its full size."""
        want = {n.name: n.spec.capacity for n in self.sim}

        def published() -> bool:
            for node in self.sim:
                assert node.provisioner is not None
                node.provisioner.require_alive()
            seen = 0
            for cap in self.capacities():
                name = capacity_node(cap)
                if name in want and quantity_bytes(cap.get("capacity", "0")) == want[name]:
                    seen += 1
            return seen == classes * len(self.sim)

        wait_for("every node's CSIStorageCapacity", published, timeout, every=2)

    # ------------------------------------------------------------------ stop

    def stop(self) -> list[str]:
        """End everything; return the problems found (processes or files left)."""
        problems: list[str] = []
        self._save_node_logs(problems)
        stop_daemons(
            [d for n in self.sim for d in (n.provisioner, n.driver) if d is not None]
            + ([self.kwok] if self.kwok is not None else [])
        )
        if self.cluster is not None:
            problems += self.cluster.stop()
        left = processes_of(self.workdir)
        if left:
            hoststate.kill_pids(left)
            problems.append(f"processes left after stop (killed): {left}")
        if self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._api is not None:
            self._api.close()  # type: ignore[no-untyped-call]
        return problems

    def _save_node_logs(self, problems: list[str]) -> None:
        if self.artifacts is None:
            return
        src = self.workdir / "node-logs"
        try:
            if src.exists():
                shutil.copytree(src, self.artifacts / "nodes", dirs_exist_ok=True)
        except OSError as exc:
            problems.append(f"saving node logs: {exc}")


def capacity_node(cap: dict[str, Any]) -> str:
    labels = (cap.get("nodeTopology") or {}).get("matchLabels") or {}
    return str(labels.get(TOPOLOGY_KEY, ""))


def quantity_bytes(value: str) -> int:
    from kubernetes.utils import parse_quantity

    return int(parse_quantity(value))  # type: ignore[no-untyped-call]
