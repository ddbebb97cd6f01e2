"""One scale run: start the simulated nodes, place Pods with WaitForFirstConsumer PVCs of mixed
sizes on them, measure, delete everything, check the roots, stop (docs/scale.md).

``python -m tests.scale.run --nodes 100 --pods 2000`` (``make scale``) prints a table and
writes the JSON result; ``tests/scale/test_scale.py`` runs a reduced one and asserts the
correctness goals. The run's verdicts are in ``result["correctness"]``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.e2e.cluster import cache_dir
from tests.e2e.kube import raw

from . import measure
from .plane import (
    BINDER_FLOW,
    NAMESPACE,
    PROVISIONER_FLOW,
    TOPOLOGY_KEY,
    NodeSpec,
    Plane,
    SimNode,
    capacity_node,
    quantity_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
Mi, Gi = 2**20, 2**30
WORKLOAD_NAMESPACE = "scale-load"
#: node capacities, cycled over the nodes: a quarter small enough to fill up
CAPACITIES = (2 * Gi, 6 * Gi, 12 * Gi, 24 * Gi)
#: PVC sizes, cycled over the Pods (mean about 403 MiB)
SIZES = tuple(
    s * Mi for s in (64, 128, 256, 64, 512, 128, 1024, 64, 256, 1536)
)  # fmt: skip
PROBE_SIZE = 256 * Mi


@dataclass(frozen=True)
class Config:
    nodes: int = 20
    pods: int = 200
    capacities: tuple[int, ...] = CAPACITIES
    sizes: tuple[int, ...] = SIZES
    #: seconds of idle measurement before the workload
    idle_seconds: float = 15.0
    #: seconds the workload may take to be Running and Bound
    timeout: float = 900.0
    #: harness threads creating the objects
    threads: int = 8
    #: Pods (each with its PVC) created per second; 0: all at once, as fast as the threads go.
    #: All at once measures how fast a backlog drains; a steady rate, whether the cluster keeps
    #: up with Pods arriving at that rate
    create_rate: float = 0.0
    #: capacity-change probes after the workload
    probes: int = 3
    #: kube-controller-manager's client rate. Its defaults (20 requests per second, burst 30)
    #: cap the PV controller, which makes about five requests per claim it binds, at about
    #: 4 claims per second whatever the number of nodes (docs/scale.md); large clusters raise it
    kcm_qps: int = 100
    kcm_burst: int = 200
    chart_values: dict[str, Any] = field(
        default_factory=lambda: {
            "backend": "hostpath",
            # the peer channel (ControllerModifyVolume) and snapshots are not exercised here
            "modify": {"enabled": False},
            "snapshots": {"enabled": False},
        }
    )

    def node_specs(self) -> list[NodeSpec]:
        return [
            NodeSpec(f"scale-node-{i:03d}", self.capacities[i % len(self.capacities)])
            for i in range(self.nodes)
        ]


def log(msg: str) -> None:
    print(f"{datetime.now(UTC).strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _groups(plane: Plane) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for n in plane.sim:
        for name, d in (("driver", n.driver), ("provisioner", n.provisioner)):
            if d is not None and d.proc is not None:
                groups[name].append(d.proc.pid)
    if plane.cluster is not None:
        for d in plane.cluster.daemons:
            if d.proc is not None:
                groups[d.name].append(d.proc.pid)
    if plane.kwok is not None and plane.kwok.proc is not None:
        groups["kwok"].append(plane.kwok.proc.pid)
    return dict(groups)


@dataclass(frozen=True)
class NodeReport:
    node: str
    capacity: int
    allocated_root: int
    volumes_root: int
    volume_dirs: int
    allocated_pvs: int
    pods: int


@dataclass
class ApiMetrics:
    plane: Plane

    def scrape(self) -> str:
        c = self.plane.cluster
        assert c is not None
        admin = c.clients["admin"]
        return measure.scrape(
            f"https://127.0.0.1:{c.api_port}/metrics", c.pki.ca.cert, admin.cert, admin.key
        )

    def pv_controller_queues(self) -> dict[str, dict[str, float]]:
        """The PV controller's work queues (kube-controller-manager's own metrics): how many
        claims and volumes wait, how long each waited and how long each sync took."""
        c = self.plane.cluster
        assert c is not None
        kcm = next(d for d in c.daemons if d.name == "kube-controller-manager")
        port = next(a.split("=", 1)[1] for a in kcm.argv if a.startswith("--secure-port="))
        admin = c.clients["admin"]
        text = measure.scrape(f"https://127.0.0.1:{port}/metrics", None, admin.cert, admin.key)
        out: dict[str, dict[str, float]] = {}
        for queue in ("claims", "volumes"):

            def total(metric: str, q: str = queue) -> float:
                return measure.counter_sums(text, metric, "name").get(q, 0.0)

            syncs = max(1.0, total("workqueue_work_duration_seconds_count"))
            waits = max(1.0, total("workqueue_queue_duration_seconds_count"))
            out[queue] = {
                "depth": total("workqueue_depth"),
                "syncs": total("workqueue_work_duration_seconds_count"),
                "mean_sync_seconds": round(total("workqueue_work_duration_seconds_sum") / syncs, 3),
                "mean_wait_seconds": round(
                    total("workqueue_queue_duration_seconds_sum") / waits, 1
                ),
            }
        return out

    @staticmethod
    def flows(text: str) -> dict[str, float]:
        return measure.counter_sums(
            text, "apiserver_flowcontrol_dispatched_requests_total", "flow_schema"
        )

    @staticmethod
    def total(text: str) -> dict[str, float]:
        return measure.counter_sums(text, "apiserver_request_total", "verb")


class Run:
    def __init__(self, cfg: Config, artifacts: Path | None) -> None:
        self.cfg = cfg
        self.plane = Plane(
            cfg.node_specs(),
            cfg.chart_values,
            artifacts=artifacts,
            log=log,
            controller_manager_args=(
                f"--kube-api-qps={cfg.kcm_qps}",
                f"--kube-api-burst={cfg.kcm_burst}",
            ),
        )
        self.result: dict[str, Any] = {
            "config": {
                "nodes": cfg.nodes,
                "pods": cfg.pods,
                "capacities_bytes": list(cfg.capacities),
                "pvc_sizes_bytes": list(cfg.sizes),
                "kube_controller_manager_qps": cfg.kcm_qps,
                "kube_controller_manager_burst": cfg.kcm_burst,
                "create_rate": cfg.create_rate,
            },
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.metrics = ApiMetrics(self.plane)
        self.storage_class = ""
        self._created_from = 0.0

    @property
    def core(self) -> Any:
        return self.plane.core

    # ------------------------------------------------------------------ phases

    def execute(self) -> dict[str, Any]:
        try:
            t0 = time.monotonic()
            self.plane.start()
            classes = [
                o
                for o in self.plane.objects
                if o["kind"] == "StorageClass"
                and o.get("volumeBindingMode") == "WaitForFirstConsumer"
            ]
            self.storage_class = classes[0]["metadata"]["name"]
            t1 = time.monotonic()
            self.plane.wait_capacities(len(classes), timeout=300)
            self.plane.timings["capacities published"] = round(time.monotonic() - t1, 2)
            self.result["startup_seconds"] = dict(self.plane.timings)
            self.result["startup_seconds"]["total"] = round(time.monotonic() - t0, 2)
            self._idle()
            failure: TimeoutError | None = None
            try:
                self._workload()
            except TimeoutError as exc:
                # still delete everything and check every root
                failure = exc
            else:
                self._verify()
                self._probes()
            self._delete()
            if failure is not None:
                raise failure
        finally:
            problems = self.plane.stop()
            self.result["teardown_problems"] = problems
        self.result["correctness"] = self._verdicts()
        return self.result

    def _idle(self) -> None:
        log(f"scale: idle for {self.cfg.idle_seconds:.0f}s")
        groups = _groups(self.plane)
        before = self.metrics.scrape()
        window = measure.CpuWindow(lambda: groups)
        window.begin()
        time.sleep(self.cfg.idle_seconds)
        after = self.metrics.scrape()
        cpu = window.end()
        rss = {
            g: measure.summary(measure.rss_bytes(p) / Mi for p in pids)
            for g, pids in groups.items()
        }
        self.result["idle"] = {
            "rss_mib": rss,
            "cpu": cpu,
            "apiserver_requests_per_second_by_flow": measure.rates(
                ApiMetrics.flows(before), ApiMetrics.flows(after), cpu["seconds"]
            ),
            "capacity_objects": len(self.plane.capacities()),
        }

    def _namespace(self) -> None:
        self.core.create_namespace({"metadata": {"name": WORKLOAD_NAMESPACE}})

        def has_sa() -> bool:
            items = raw(self.core.list_namespaced_service_account, WORKLOAD_NAMESPACE)["items"]
            return any(sa["metadata"]["name"] == "default" for sa in items)

        deadline = time.monotonic() + 60
        while not has_sa():
            if time.monotonic() > deadline:
                raise TimeoutError("no default ServiceAccount in the workload namespace")
            time.sleep(0.5)

    def _create(self, i: int) -> None:
        if self.cfg.create_rate > 0:
            time.sleep(max(0.0, self._created_from + i / self.cfg.create_rate - time.monotonic()))
        size = self.cfg.sizes[i % len(self.cfg.sizes)]
        self.core.create_namespaced_persistent_volume_claim(
            WORKLOAD_NAMESPACE, pvc_body(f"vol-{i:05d}", self.storage_class, size)
        )
        self.core.create_namespaced_pod(
            WORKLOAD_NAMESPACE, pod_body(f"pod-{i:05d}", f"vol-{i:05d}")
        )

    def _workload(self) -> None:
        self._namespace()
        groups = _groups(self.plane)
        log(f"scale: creating {self.cfg.pods} Pods with PVCs")
        before = self.metrics.scrape()
        window = measure.CpuWindow(lambda: groups)
        timeline: list[tuple[float, int, int]] = []
        with measure.Sampler(lambda: groups) as sampler:
            window.begin()
            t0 = self._created_from = time.monotonic()
            with ThreadPoolExecutor(self.cfg.threads) as pool:
                list(pool.map(self._create, range(self.cfg.pods)))
            created = time.monotonic() - t0
            log(f"scale: created in {created:.1f}s; waiting for Running and Bound")
            last_progress, last = time.monotonic(), (-1, -1)
            failure = ""
            while True:
                running, bound = self._progress()
                now = time.monotonic()
                timeline.append((round(now - t0, 1), running, bound))
                if (running, bound) != last:
                    last, last_progress = (running, bound), now
                    log(f"scale: {now - t0:6.1f}s running={running} bound={bound}")
                if running == bound == self.cfg.pods:
                    break
                if now - t0 > self.cfg.timeout or now - last_progress > 180:
                    self.result["stuck"] = self._diagnose()
                    failure = (
                        f"{running}/{self.cfg.pods} Running, {bound} Bound after {now - t0:.0f}s"
                    )
                    break
                time.sleep(2)
            elapsed = time.monotonic() - t0
            cpu = window.end()
        after = self.metrics.scrape()
        self.result["workload"] = {
            "completed": not failure,
            "pods_running": running,
            "pvcs_bound": bound,
            "create_seconds": round(created, 1),
            "created_per_second": round(self.cfg.pods / created, 2) if created else None,
            "seconds_to_all_running_and_bound": round(elapsed, 1),
            "pods_per_second": round(min(running, bound) / elapsed, 2),
            "timeline": timeline,
            "cpu": cpu,
            "peak_load1": sampler.peak_load,
            "peak_rss_mib": {
                g: measure.summary(v / Mi for v in peaks.values())
                for g, peaks in sampler.peak_rss.items()
            },
            "apiserver_requests_per_second_by_flow": measure.rates(
                ApiMetrics.flows(before), ApiMetrics.flows(after), cpu["seconds"]
            ),
            "apiserver_requests_per_second_by_verb": measure.rates(
                ApiMetrics.total(before), ApiMetrics.total(after), cpu["seconds"]
            ),
            "apf_rejected": measure.counter_sums(
                after, "apiserver_flowcontrol_rejected_requests_total", "flow_schema"
            ),
        }
        prov = self.result["workload"]["apiserver_requests_per_second_by_flow"]
        self.result["workload"]["provisioner_requests_per_second"] = prov.get(PROVISIONER_FLOW, 0.0)
        self.result["workload"]["pv_binder_requests_per_second"] = prov.get(BINDER_FLOW, 0.0)
        self.result["workload"]["pv_controller_queues"] = self.metrics.pv_controller_queues()
        self.result["workload"]["apiserver_write_latency_seconds"] = write_latency(after)
        if failure:
            raise TimeoutError(failure)

    def _progress(self) -> tuple[int, int]:
        pods = raw(self.core.list_namespaced_pod, WORKLOAD_NAMESPACE, resource_version="0")
        pvcs = raw(
            self.core.list_namespaced_persistent_volume_claim,
            WORKLOAD_NAMESPACE,
            resource_version="0",
        )
        running = sum(p["status"].get("phase") == "Running" for p in pods["items"])
        bound = sum(p["status"].get("phase") == "Bound" for p in pvcs["items"])
        return running, bound

    def _diagnose(self) -> dict[str, Any]:
        pods = raw(self.core.list_namespaced_pod, WORKLOAD_NAMESPACE)["items"]
        reasons: Counter[str] = Counter()
        for p in pods:
            if p["status"].get("phase") == "Running":
                continue
            for c in p["status"].get("conditions") or []:
                if c.get("status") == "False":
                    reasons[f"{c['type']}: {c.get('message', '')[:160]}"] += 1
        return {"not_running": dict(reasons.most_common(10))}

    # ------------------------------------------------------------------ checks

    def _pv_nodes(self) -> dict[str, tuple[str, int]]:
        out = {}
        for pv in raw(self.core.list_persistent_volume)["items"]:
            node = ""
            affinity = pv["spec"].get("nodeAffinity") or {}
            terms = (affinity.get("required") or {}).get("nodeSelectorTerms") or []
            for term in terms:
                for expr in term.get("matchExpressions") or []:
                    if expr["key"] == TOPOLOGY_KEY:
                        node = expr["values"][0]
            size = quantity_bytes(pv["spec"]["capacity"]["storage"])
            out[pv["metadata"]["name"]] = (node, size)
        return out

    def _pv_created(self) -> dict[str, str]:
        return {
            pv["metadata"]["name"]: pv["metadata"]["creationTimestamp"]
            for pv in raw(self.core.list_persistent_volume)["items"]
        }

    def _verify(self) -> None:
        log("scale: checking placement and every root")
        pods = {
            p["metadata"]["name"]: p
            for p in raw(self.core.list_namespaced_pod, WORKLOAD_NAMESPACE)["items"]
        }
        pvcs = {
            c["metadata"]["name"]: c
            for c in raw(self.core.list_namespaced_persistent_volume_claim, WORKLOAD_NAMESPACE)[
                "items"
            ]
        }
        pvs = self._pv_nodes()
        misplaced = []
        per_node_pv: dict[str, int] = defaultdict(int)
        pods_per_node: Counter[str] = Counter()
        for name, pod in pods.items():
            claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
            pv_name = pvcs[claim]["spec"].get("volumeName", "")
            node, _ = pvs.get(pv_name, ("", 0))
            pods_per_node[pod["spec"].get("nodeName", "")] += 1
            if not node or node != pod["spec"].get("nodeName"):
                misplaced.append(name)
        for node, size in pvs.values():
            per_node_pv[node] += size
        self.result["stages_seconds"] = stage_latencies(pods, pvcs, self._pv_created())
        nodes = []
        for n in self.plane.sim:
            state = measure.root_state(n.root)
            nodes.append(
                NodeReport(
                    node=n.name,
                    capacity=n.spec.capacity,
                    allocated_root=state.allocated,
                    volumes_root=state.volumes,
                    volume_dirs=state.entries,
                    allocated_pvs=per_node_pv.get(n.name, 0),
                    pods=pods_per_node.get(n.name, 0),
                )
            )
        over = [
            n.node for n in nodes if n.allocated_root > n.capacity or n.allocated_pvs > n.capacity
        ]
        mismatch = [n.node for n in nodes if n.allocated_root != n.allocated_pvs]
        full = [n.node for n in nodes if n.capacity - n.allocated_root < min(self.cfg.sizes)]
        exhausted, rescheduled = self._provisioner_log_counts()
        events = self._exhausted_events()
        fill = [n.allocated_root / n.capacity for n in nodes]
        self.result["placement"] = {
            "pods": len(pods),
            "pvs": len(pvs),
            "misplaced_pods": misplaced[:20],
            "misplaced_count": len(misplaced),
            "overcommitted_nodes": over,
            "root_vs_pv_mismatch_nodes": mismatch,
            "nodes_full": len(full),
            "fill_share": measure.summary(100 * f for f in fill),
            "fill_by_capacity": {
                str(cap // Gi) + "Gi": measure.summary(
                    100 * n.allocated_root / cap for n in nodes if n.capacity == cap
                )
                for cap in sorted(set(self.cfg.capacities))
            },
            "pods_by_capacity": {
                str(cap // Gi) + "Gi": measure.summary(
                    float(n.pods) for n in nodes if n.capacity == cap
                )
                for cap in sorted(set(self.cfg.capacities))
            },
            "provisioning_resource_exhausted_log_lines": exhausted,
            "provisioning_rescheduled": rescheduled,
            "provisioning_failed_events_resource_exhausted": events,
            "nodes": [asdict(n) for n in nodes],
        }
        caps = self.plane.capacities()
        stale = 0
        by_node = {n.name: n for n in self.plane.sim}
        alloc = {n.node: n.allocated_root for n in nodes}
        for cap in caps:
            node = capacity_node(cap)
            if node in by_node:
                want = by_node[node].spec.capacity - alloc[node]
                stale += quantity_bytes(cap.get("capacity", "0")) != want
        self.result["capacity_objects"] = {
            "count": len(caps),
            "not_reflecting_root_after_workload": stale,
        }

    def _provisioner_log_counts(self) -> tuple[int, int]:
        exhausted = rescheduled = 0
        for n in self.plane.sim:
            if n.provisioner is None:
                continue
            with n.provisioner.log.open(errors="replace") as f:
                for line in f:
                    if "ResourceExhausted" in line:
                        exhausted += 1
                        rescheduled += "Volume rescheduled" in line
        return exhausted, rescheduled

    def _exhausted_events(self) -> int:
        events = raw(self.core.list_namespaced_event, WORKLOAD_NAMESPACE)["items"]
        return sum(
            int(e.get("count") or 1)
            for e in events
            if e.get("reason") == "ProvisioningFailed"
            and "ResourceExhausted" in (e.get("message") or "")
        )

    # ------------------------------------------------------------------ capacity lag

    def _capacity_of(self, node: str) -> tuple[str, int]:
        for cap in self.plane.capacities():
            if capacity_node(cap) == node:
                return cap["metadata"]["name"], quantity_bytes(cap.get("capacity", "0"))
        raise RuntimeError(f"no CSIStorageCapacity for {node}")

    def _probes(self) -> None:
        """Time from a change of a root's allocation (its state.db) to the node's
        CSIStorageCapacity showing it: one volume made and deleted on each of a few nodes."""
        room = {
            n.name: n.spec.capacity - measure.root_state(n.root).allocated for n in self.plane.sim
        }
        free = sorted(
            (n for n in self.plane.sim if room[n.name] >= 2 * PROBE_SIZE),
            key=lambda n: room[n.name],
            reverse=True,
        )
        lags: list[dict[str, Any]] = []
        for i, node in enumerate(free[: self.cfg.probes]):
            lags.append(self._probe(i, node))
        self.result["capacity_lag"] = {
            "probes": lags,
            "create_seconds": measure.summary(p["create_lag"] for p in lags),
            "delete_seconds": measure.summary(p["delete_lag"] for p in lags),
        }

    def _probe(self, i: int, node: SimNode) -> dict[str, Any]:
        cap_name, cap0 = self._capacity_of(node.name)
        alloc0 = measure.root_state(node.root).allocated
        pvc, pod = f"probe-vol-{i}", f"probe-pod-{i}"
        self.core.create_namespaced_persistent_volume_claim(
            WORKLOAD_NAMESPACE, pvc_body(pvc, self.storage_class, PROBE_SIZE)
        )
        self.core.create_namespaced_pod(
            WORKLOAD_NAMESPACE, pod_body(pod, pvc, {"kubernetes.io/hostname": node.name})
        )
        create_lag = self._watch_change(
            node, cap_name, lambda a: a >= alloc0 + PROBE_SIZE, lambda c: c <= cap0 - PROBE_SIZE
        )
        self.core.delete_namespaced_pod(pod, WORKLOAD_NAMESPACE)
        self.core.delete_namespaced_persistent_volume_claim(pvc, WORKLOAD_NAMESPACE)
        delete_lag = self._watch_change(node, cap_name, lambda a: a <= alloc0, lambda c: c >= cap0)
        return {"node": node.name, "create_lag": create_lag, "delete_lag": delete_lag}

    def _watch_change(self, node: SimNode, cap_name: str, alloc_done: Any, cap_done: Any) -> float:
        t_alloc = t_cap = None
        deadline = time.monotonic() + 180
        while t_alloc is None or t_cap is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"capacity probe on {node.name}: alloc={t_alloc} cap={t_cap}")
            now = time.monotonic()
            if t_alloc is None and alloc_done(measure.root_state(node.root).allocated):
                t_alloc = now
            obj = raw(self.plane.storage.read_namespaced_csi_storage_capacity, cap_name, NAMESPACE)
            if t_cap is None and cap_done(quantity_bytes(obj.get("capacity", "0"))):
                t_cap = now
            time.sleep(0.1)
        return round(t_cap - t_alloc, 2)

    # ------------------------------------------------------------------ delete

    def _delete(self) -> None:
        log("scale: deleting every Pod and PVC")
        t0 = time.monotonic()
        for call in (
            self.core.delete_collection_namespaced_pod,
            self.core.delete_collection_namespaced_persistent_volume_claim,
        ):
            _delete_collection(call)
        deadline = time.monotonic() + max(300.0, self.cfg.pods * 0.3)
        while True:
            pods = len(raw(self.core.list_namespaced_pod, WORKLOAD_NAMESPACE)["items"])
            pvcs = len(
                raw(self.core.list_namespaced_persistent_volume_claim, WORKLOAD_NAMESPACE)["items"]
            )
            pvs = len(raw(self.core.list_persistent_volume)["items"])
            if pods == pvcs == pvs == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"left after delete: pods={pods} pvcs={pvcs} pvs={pvs}")
            time.sleep(2)
        seconds = time.monotonic() - t0
        roots = {n.name: measure.root_state(n.root) for n in self.plane.sim}
        leaked = {
            name: asdict(s) for name, s in roots.items() if s.allocated or s.volumes or s.entries
        }
        t1 = time.monotonic()
        restored = True
        try:
            self.plane.wait_capacities(1, timeout=120)
        except TimeoutError:
            restored = False
        self.result["delete"] = {
            "seconds_to_no_pod_pvc_pv": round(seconds, 1),
            "nodes_with_leftovers": leaked,
            "roots_checked": len(roots),
            "capacity_restored_everywhere": restored,
            "capacity_restored_seconds": round(time.monotonic() - t1, 1),
        }

    # ------------------------------------------------------------------ verdicts

    def _verdicts(self) -> dict[str, Any]:
        r = self.result
        placement = r.get("placement", {})
        delete = r.get("delete", {})
        return {
            "all_running_and_bound": bool(r.get("workload", {}).get("completed")),
            "overcommitted_nodes": len(placement.get("overcommitted_nodes", ["?"])),
            "misplaced_pods": placement.get("misplaced_count", -1),
            "leaked_volume_nodes": len(delete.get("nodes_with_leftovers", {"?": 0}))
            if "delete" in r
            else -1,
            "clean_teardown": not r.get("teardown_problems"),
        }


def _delete_collection(call: Any, attempts: int = 20) -> None:
    """DeleteCollection of the workload namespace. With thousands of objects it can outlast
    the apiserver's request timeout (504, measured with 2,000 Pods), having deleted only part:
    it is repeated, after a pause that lets the cut-off call's deletions land, until one call
    completes or ``attempts`` did not (objects already deleting are left as they are)."""
    for attempt in range(attempts):
        try:
            call(WORKLOAD_NAMESPACE)
            return
        except ApiException as exc:
            if exc.status != 504 or attempt == attempts - 1:
                raise
            log(f"scale: delete collection timed out (504); again ({attempt + 1})")
            time.sleep(10)


def write_latency(text: str) -> dict[str, float]:
    """Mean apiserver latency of the writes on the objects of the workload, by resource."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("apiserver_request_duration_seconds_"):
            continue
        for verb in ("POST", "PUT", "PATCH"):
            if f'verb="{verb}"' not in line:
                continue
            for res in ("persistentvolumeclaims", "persistentvolumes", "pods", "events"):
                if f'resource="{res}"' in line:
                    key = f"{verb} {res}"
                    value = float(line.rsplit(" ", 1)[1])
                    if line.startswith("apiserver_request_duration_seconds_sum"):
                        sums[key] += value
                    elif line.startswith("apiserver_request_duration_seconds_count"):
                        counts[key] += value
    return {k: round(sums[k] / counts[k], 3) for k in sorted(counts) if counts[k]}


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def stage_latencies(
    pods: dict[str, Any], pvcs: dict[str, Any], pv_created: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Where each Pod's time went, from the objects' own timestamps (whole seconds): creation
    to its PV (scheduling and provisioning), PV to the Pod's binding to its node (PV controller
    binding, the scheduler's PreBind), binding to Running (kwok)."""
    stages: dict[str, list[float]] = defaultdict(list)
    for pod in pods.values():
        created = _ts(pod["metadata"]["creationTimestamp"])
        scheduled = next(
            (
                _ts(c.get("lastTransitionTime"))
                for c in pod["status"].get("conditions") or []
                if c["type"] == "PodScheduled" and c["status"] == "True"
            ),
            None,
        )
        running = _ts(pod["status"].get("startTime"))
        claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        pv = _ts(pv_created.get(pvcs.get(claim, {}).get("spec", {}).get("volumeName", "")))
        for name, a, b in (
            ("create_to_pv", created, pv),
            ("pv_to_node_binding", pv, scheduled),
            ("node_binding_to_running", scheduled, running),
            ("create_to_running", created, running),
        ):
            if a is not None and b is not None:
                stages[name].append(b - a)
    return {k: measure.summary(v) for k, v in stages.items()}


def pvc_body(name: str, storage_class: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": str(size)}},
        },
    }


def pod_body(name: str, claim: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
    }
    if selector:
        spec["nodeSelector"] = selector
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


# ----------------------------------------------------------------------------- report


def report(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    c = r["config"]
    rows.append(("nodes / pods", f"{c['nodes']} / {c['pods']}"))
    rate = c.get("create_rate", 0)
    rows.append(("created", f"{rate} Pods/s" if rate else "all at once"))
    if "startup_seconds" in r:
        rows.append(("start (s)", str(r["startup_seconds"]["total"])))
    w = r.get("workload")
    if w:
        rows += [
            ("all Running+Bound (s)", str(w["seconds_to_all_running_and_bound"])),
            ("rate (Pods/s)", str(w["pods_per_second"])),
            ("objects created in (s)", str(w["create_seconds"])),
            ("creation rate reached (Pods/s)", str(w["created_per_second"])),
            ("machine busy (share of 2 cores)", str(w["cpu"]["machine_busy_share"])),
            ("peak load1", str(w["peak_load1"])),
            ("cores used by", json.dumps(w["cpu"]["cores_used"])),
            ("provisioners' API req/s (workload)", str(w["provisioner_requests_per_second"])),
            ("PV binder's API req/s (workload)", str(w["pv_binder_requests_per_second"])),
            ("PV controller queues", json.dumps(w["pv_controller_queues"])),
            ("apiserver write latency (s)", json.dumps(w["apiserver_write_latency_seconds"])),
        ]
    i = r.get("idle")
    if i:
        rows += [
            (
                "provisioners' API req/s (idle)",
                str(i["apiserver_requests_per_second_by_flow"].get(PROVISIONER_FLOW, 0.0)),
            ),
            ("idle driver RSS MiB", json.dumps(i["rss_mib"].get("driver", {}))),
            ("idle provisioner RSS MiB", json.dumps(i["rss_mib"].get("provisioner", {}))),
        ]
    if w:
        peaks = w["peak_rss_mib"]
        rows += [
            ("peak driver RSS MiB", json.dumps(peaks.get("driver", {}))),
            ("peak provisioner RSS MiB", json.dumps(peaks.get("provisioner", {}))),
        ]
    p = r.get("placement")
    if p:
        rows += [
            ("ResourceExhausted, rescheduled", str(p["provisioning_rescheduled"])),
            ("  (events counted)", str(p["provisioning_failed_events_resource_exhausted"])),
            ("overcommitted nodes", str(len(p["overcommitted_nodes"]))),
            ("misplaced pods", str(p["misplaced_count"])),
            ("full nodes", str(p["nodes_full"])),
            ("fill % by node capacity", json.dumps(p["fill_by_capacity"])),
        ]
    for stage, st in r.get("stages_seconds", {}).items():
        rows.append((f"  {stage} (s)", json.dumps({k: st.get(k) for k in ("median", "max")})))
    if "capacity_objects" in r:
        rows.append(("CSIStorageCapacity objects", str(r["capacity_objects"]["count"])))
    lag = r.get("capacity_lag")
    if lag:
        rows.append(("capacity lag after create (s)", json.dumps(lag["create_seconds"])))
        rows.append(("capacity lag after delete (s)", json.dumps(lag["delete_seconds"])))
    d = r.get("delete")
    if d:
        rows.append(("delete all (s)", str(d["seconds_to_no_pod_pvc_pv"])))
        rows.append(("nodes with leftovers", str(len(d["nodes_with_leftovers"]))))
    rows.append(("correctness", json.dumps(r.get("correctness", {}))))
    return measure.table(rows)


def run(cfg: Config, artifacts: Path | None = None) -> dict[str, Any]:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Run(cfg, artifacts).execute()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--create-rate",
        type=float,
        default=Config.create_rate,
        help="Pods (with their PVCs) created per second; 0 (default): all at once",
    )
    parser.add_argument("--kcm-qps", type=int, default=Config.kcm_qps)
    parser.add_argument("--kcm-burst", type=int, default=Config.kcm_burst)
    parser.add_argument("--out", type=Path, help="where to write the JSON result")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=cache_dir() / "scale-artifacts" / "last",
        help="where the logs of every process are kept",
    )
    args = parser.parse_args(argv)
    if not math.isfinite(args.create_rate) or args.create_rate < 0:
        parser.error("--create-rate must be 0 (all at once) or a positive rate")
    if args.pods < 1 or args.nodes < 1 or not args.timeout > 0:
        parser.error("--nodes, --pods and --timeout must be positive")
    if args.create_rate and args.pods / args.create_rate >= args.timeout:
        parser.error("--timeout (counted from the first create) must exceed --pods / --create-rate")
    cfg = Config(
        nodes=args.nodes,
        pods=args.pods,
        idle_seconds=args.idle_seconds,
        timeout=args.timeout,
        create_rate=args.create_rate,
        kcm_qps=args.kcm_qps,
        kcm_burst=args.kcm_burst,
    )
    run_obj = Run(cfg, args.artifacts)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    failed: BaseException | None = None
    try:
        result = run_obj.execute()
    except BaseException as exc:
        failed = exc
        result = run_obj.result
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"scale-{datetime.now(UTC).strftime('%Y-%m-%d')}-{args.nodes}n-{args.pods}p.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"result: {out}")
    if failed is not None:
        print(f"run failed: {result['error']}", file=sys.stderr)
        return 1
    verdicts = result["correctness"]
    ok = (
        verdicts["all_running_and_bound"]
        and verdicts["overcommitted_nodes"] == 0
        and verdicts["misplaced_pods"] == 0
        and verdicts["leaked_volume_nodes"] == 0
        and verdicts["clean_teardown"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
