"""A real single-node Kubernetes cluster made of its components, for the e2e lane.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (+ runc, CNI bridge)
and the kubelet run as background processes of the test session, with every file they write in
one work directory (``/tmp/nle2e-*``); ``Cluster.stop`` undoes everything, also after a failed
start. See docs/testing-e2e.md for the choices made to fit this host (cgroup v1, no kube-proxy,
no registry).

No kube-proxy: the only Service pods use is ``kubernetes`` (the API). Its ClusterIP is turned
into the apiserver's host address by one DNAT rule in our own nat chain, which is what
kube-proxy would program for it; the driver pods then use the ordinary in-cluster config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.ports import free_port
from tests.pki import KeyPair, Pki, write_kubeconfig

from . import hoststate, images
from .hoststate import Daemon
from .kube import raw
from .nodeconfig import (
    CGROUP_ROOT,
    KUBERNETES_SERVICE_IP,
    QEMU_HOST,
    VM_RUN_DIR,
    ContainerdPaths,
    KubeletSettings,
    cni_conflist,
    containerd_config,
    kubelet_config,
)

ROOT = Path(__file__).resolve().parents[2]

NODE_NAME = "e2e-node"
SERVICE_CIDR = "10.0.0.0/24"
POD_SUBNET = "10.244.77.0/24"
BRIDGE = "nle2e0"
NAT_CHAIN = "NODELOCAL-E2E"
# The sysctls the kubelet sets on start (protectKernelDefaults=false) and the bridge plugin's
# ip_forward: restored at teardown so the host is left as it was.
# Host paths the components write whatever their configured directories: the kubelet's
# device-plugin socket (a constant in the kubelet), libcni's result cache (containerd does not
# expose it), the kubelet's /var/log/containers links, network namespaces. What appears in them
# during the run is removed at teardown, and each that did not exist before goes entirely.
HOST_PATHS = (
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/containers",
    "/run/netns",
    "/usr/libexec/kubernetes",
)
TOUCHED_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
)


def cache_dir() -> Path:
    return Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))


def kubernetes_version() -> str:
    go_mod = (ROOT / "tools" / "kubernetes" / "go.mod").read_text()
    m = re.search(r"^require k8s\.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    if m is None:
        m = re.search(r"^\s+k8s\.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    if m is None:
        raise RuntimeError("tools/kubernetes/go.mod does not require k8s.io/kubernetes")
    return m.group(1)


def _find(name: str, *dirs: Path) -> Path:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (run scripts/install-cluster.sh)")
    return Path(found)


@dataclass(frozen=True)
class Binaries:
    """Where every program of the cluster lives."""

    kube_dir: Path
    etcd: Path
    containerd: Path
    containerd_shim_dir: Path
    ctr: Path
    runc: Path
    cni_dir: Path

    @classmethod
    def discover(cls) -> Binaries:
        kube_dir = cache_dir() / "kubernetes" / kubernetes_version() / "bin"
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
            if not (kube_dir / name).is_file():
                raise RuntimeError(f"{kube_dir / name} missing: run scripts/install-cluster.sh")
        containerd = _find("containerd", Path("/usr/bin"))
        cni_dir = next(
            (d for d in (Path("/usr/lib/cni"), Path("/opt/cni/bin")) if (d / "bridge").is_file()),
            None,
        )
        if cni_dir is None:
            raise RuntimeError("CNI plugins missing: apt-get install containernetworking-plugins")
        return cls(
            kube_dir=kube_dir,
            etcd=_find("etcd", Path("/usr/bin")),
            containerd=containerd,
            containerd_shim_dir=containerd.parent,
            ctr=_find("ctr", Path("/usr/bin")),
            runc=_find("runc", Path("/usr/sbin"), Path("/usr/bin")),
            cni_dir=cni_dir,
        )


def host_ip() -> str:
    """The first global IPv4 address: pods reach the apiserver there (DNAT target)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            if addr.get("scope") == "global" and link.get("ifname") != BRIDGE:
                return str(addr["local"])
    raise RuntimeError("no global IPv4 address on this host for the apiserver to advertise")


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    every: float = 0.5,
    alive: Callable[[], None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


OWNER_FILE = "owner.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(current: Path) -> None:
    """Remove what an earlier run killed without its teardown (SIGKILL, a lost machine) left:
    its processes, mounts, loop devices, cgroups, bridge and nat chain. A run whose owner is
    still alive is another cluster on this host, which the fixed names here cannot share."""
    for workdir in sorted(Path("/tmp").glob("nle2e-*")):
        if workdir == current or not workdir.is_dir():
            continue
        try:
            owner = int((workdir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and _pid_alive(owner):
            raise RuntimeError(f"another e2e cluster runs from {workdir} (pid {owner})")
        text = str(workdir)
        hoststate.kill_pids(
            pid
            for name in (
                "containerd-shim-runc-v2",
                "containerd",
                "kubelet",
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "snapshot-controller",
                "qemu-system-x86_64",
                "virtiofsd",
            )
            for pid in hoststate.pids_matching([text], name)
        )
        hoststate.detach_loops_under(text)
        if hoststate.unmount_under([text]):
            raise RuntimeError(f"cannot unmount everything below the stale {workdir}")
        shutil.rmtree(workdir, ignore_errors=True)
    # The lvm node's image import (vmnode.containerd_disk) killed half-way: its loop mount
    # (autoclear: unmounting detaches the loop device).
    if hoststate.unmount_under([str(VM_RUN_DIR)]):
        raise RuntimeError(f"cannot unmount everything below the stale {VM_RUN_DIR}")
    shutil.rmtree(VM_RUN_DIR, ignore_errors=True)
    hoststate.remove_cgroup(CGROUP_ROOT)
    hoststate.delete_link(BRIDGE)
    for hook in ("PREROUTING", "OUTPUT"):
        subprocess.run(
            ["iptables", "-w", "-t", "nat", "-D", hook, "-j", NAT_CHAIN],
            capture_output=True,
            timeout=30,
        )
    for op in ("-F", "-X"):
        subprocess.run(
            ["iptables", "-w", "-t", "nat", op, NAT_CHAIN], capture_output=True, timeout=30
        )


@dataclass
class _HostSnapshot:
    iptables: hoststate.IptablesSnapshot
    netns: set[str]
    host_paths: dict[str, set[str] | None]
    run_containerd: dict[str, set[str]] | None
    sysctls: dict[str, str]


@dataclass
class Cluster:
    """Start with ``start()``, always ``stop()`` (idempotent, also after a failed start)."""

    binaries: Binaries
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="nle2e-", dir="/tmp"))
    )
    artifacts: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.daemons: list[Daemon] = []
        self._snapshot: _HostSnapshot | None = None
        self._mounted_self = False
        self.host_ip = ""
        self.api_port = 0
        self.snapshotter = "overlayfs"
        self.apiserver_args: tuple[str, ...] = ()
        self.controller_manager_args: tuple[str, ...] = ()

    # ------------------------------------------------------------------ paths

    @property
    def kubelet_dir(self) -> Path:
        return self.workdir / "kubelet"

    @property
    def hostpath_root(self) -> Path:
        return self.workdir / "hostpath"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "pki" / "admin.kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(self.binaries.ctr),
                "--address",
                str(self.containerd_socket),
                "-n",
                "k8s.io",
                *args,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ctr_argv(self) -> list[str]:
        return [str(self.binaries.ctr), "--address", str(self.containerd_socket), "-n", "k8s.io"]

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - t0, 2)

    # ------------------------------------------------------------------ start

    def start(self, image_list: Callable[[], list[images.Image]]) -> None:
        """Bring the whole cluster up; image_list builds the images to import (cached)."""
        t0 = time.monotonic()
        reap_stale(self.workdir)
        if self.artifacts is not None and self.artifacts.exists():
            shutil.rmtree(self.artifacts)  # the last run's
        (self.workdir / OWNER_FILE).write_text(str(os.getpid()))
        self._snapshot = _HostSnapshot(
            iptables=hoststate.iptables_snapshot(),
            netns=hoststate.list_dir("/run/netns"),
            host_paths={p: hoststate.tree(p) for p in HOST_PATHS},
            run_containerd=(
                {sub: hoststate.list_dir(f"/run/containerd/{sub}") for sub in ("s", "fifo")}
                if Path("/run/containerd").exists()
                else None
            ),
            sysctls={
                k: Path("/proc/sys", k).read_text()
                for k in TOUCHED_SYSCTLS
                if Path("/proc/sys", k).exists()
            },
        )
        # Bidirectional mount propagation (the driver's mounts reaching the kubelet) needs the
        # kubelet's directories on a shared mount; / is private on this host.
        subprocess.run(
            ["mount", "--bind", str(self.workdir), str(self.workdir)], check=True, timeout=30
        )
        self._mounted_self = True
        subprocess.run(["mount", "--make-rshared", str(self.workdir)], check=True, timeout=30)
        for d in ("logs", "etcd", "kubelet", "hostpath", "cni/net.d", "cni/ipam", "pod-logs"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        self.host_ip = host_ip()
        with self._timed("certificates"):
            self._pki()
        with self._timed("etcd+apiserver"):
            self._start_etcd()
            self._start_apiserver()
        with self._timed("controllers"):
            self._start_controllers()
        with self._timed("containerd"):
            self._start_containerd()
        with self._timed("images"):
            images_dir = self.workdir / "images"
            images_dir.mkdir()
            images.import_images(
                [*self.ctr_argv(), "images", "import", "--snapshotter", self.snapshotter],
                image_list(),
                images_dir,
            )
        with self._timed("network"):
            self._network()
        with self._timed("kubelet"):
            self._start_kubelet()
        self.timings["start_total"] = round(time.monotonic() - t0, 2)

    def start_control_plane(
        self, apiserver_args: tuple[str, ...] = (), controller_manager_args: tuple[str, ...] = ()
    ) -> None:
        """etcd, kube-apiserver, kube-controller-manager (each with extra flags) and
        kube-scheduler only: no runtime, network or kubelet, for nodes simulated elsewhere
        (the scale lane, tests/scale)."""
        self.apiserver_args = apiserver_args
        self.controller_manager_args = controller_manager_args
        (self.workdir / OWNER_FILE).write_text(str(os.getpid()))
        for d in ("logs", "etcd"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        self.host_ip = host_ip()
        self._pki()
        self._start_etcd()
        self._start_apiserver()
        self._start_controllers()

    def _pki(self) -> None:
        pki = Pki(self.workdir / "pki")
        self.pki = pki
        self.apiserver_cert = pki.issue(
            "apiserver",
            "kube-apiserver",
            dns=(
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "localhost",
                NODE_NAME,
            ),
            ips=(KUBERNETES_SERVICE_IP, "127.0.0.1", self.host_ip, QEMU_HOST),
            server=True,
        )
        self.apiserver_kubelet_client = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )
        self.kubelet_serving = pki.issue(
            "kubelet-serving",
            NODE_NAME,
            dns=(NODE_NAME,),
            ips=(self.host_ip, "127.0.0.1"),
            server=True,
        )
        self.sa = pki.service_account_keys()
        self.clients: dict[str, KeyPair] = {
            "admin": pki.issue("admin", "nodelocal-e2e-admin", "system:masters"),
            "kubelet": pki.issue("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
            "controller-manager": pki.issue("controller-manager", "system:kube-controller-manager"),
            "scheduler": pki.issue("scheduler", "system:kube-scheduler"),
        }

    def _kubeconfig(self, who: str) -> Path:
        return write_kubeconfig(
            self.workdir / "pki" / f"{who}.kubeconfig",
            f"https://127.0.0.1:{self.api_port}",
            self.pki.ca.cert,
            self.clients[who],
            who,
        )

    def _daemon(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(name, argv, self.logs / f"{name}.log", env)
        self.daemons.append(d)
        d.start()
        return d

    def _https_ok(self, url: str) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        admin = self.clients["admin"]
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return False

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = self._daemon(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=e2e",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=e2e=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",
                "--logger=zap",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=5) as r:
                return bool(json.load(r).get("health") == "true")

        wait_for("etcd", healthy, 60, alive=etcd.require_alive)

    def _start_apiserver(self) -> None:
        self.api_port = free_port()
        pki, k = self.workdir / "pki", self.apiserver_kubelet_client
        api = self._daemon(
            "kube-apiserver",
            [
                str(self.binaries.kube_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=0.0.0.0",
                f"--secure-port={self.api_port}",
                f"--advertise-address={self.host_ip}",
                f"--tls-cert-file={self.apiserver_cert.cert}",
                f"--tls-private-key-file={self.apiserver_cert.key}",
                f"--client-ca-file={self.pki.ca.cert}",
                f"--kubelet-client-certificate={k.cert}",
                f"--kubelet-client-key={k.key}",
                f"--kubelet-certificate-authority={self.pki.ca.cert}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={pki}",
                "--v=1",
                *self.apiserver_args,
            ],
        )
        wait_for(
            "kube-apiserver /readyz",
            lambda: self._https_ok(f"https://127.0.0.1:{self.api_port}/readyz"),
            120,
            alive=api.require_alive,
        )
        self._kubeconfig("admin")

    def _start_controllers(self) -> None:
        kcm = self._kubeconfig("controller-manager")
        self._daemon(
            "kube-controller-manager",
            [
                str(self.binaries.kube_dir / "kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.pki.ca.cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cert-dir={self.workdir / 'pki' / 'kcm'}",
                f"--flex-volume-plugin-dir={self.workdir / 'volume-plugins'}",
                "--v=1",
                *self.controller_manager_args,
            ],
        )
        sched = self._kubeconfig("scheduler")
        self._daemon(
            "kube-scheduler",
            [
                str(self.binaries.kube_dir / "kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _overlay_works(self) -> bool:
        """Whether overlayfs can be mounted in the work directory's filesystem."""
        probe = self.workdir / "overlay-probe"
        for d in ("lower", "upper", "work", "merged"):
            (probe / d).mkdir(parents=True)
        res = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}",
                str(probe / "merged"),
            ],
            capture_output=True,
            timeout=30,
        )
        if res.returncode == 0:
            subprocess.run(["umount", str(probe / "merged")], check=True, timeout=30)
        shutil.rmtree(probe)
        return res.returncode == 0

    def _start_containerd(self) -> None:
        c = self.workdir / "containerd"
        c.mkdir()
        self.snapshotter = "overlayfs" if self._overlay_works() else "native"
        paths = ContainerdPaths(base=c, root=c / "root", state=c / "state")
        paths.config.write_text(
            containerd_config(
                paths,
                snapshotter=self.snapshotter,
                runc=self.binaries.runc,
                cni_bin=self.binaries.cni_dir,
                cni_conf=self.workdir / "cni" / "net.d",
            )
        )
        env = dict(os.environ)
        env["PATH"] = f"{self.binaries.containerd_shim_dir}:{env.get('PATH', '')}"
        ctrd = self._daemon(
            "containerd",
            [str(self.binaries.containerd), "--config", str(paths.config), "--log-level", "info"],
            env,
        )

        def up() -> bool:
            self.ctr("version", timeout=10)
            return True

        wait_for("containerd", up, 60, alive=ctrd.require_alive)

    def _network(self) -> None:
        (self.workdir / "cni" / "net.d" / "10-nodelocal-e2e.conflist").write_text(
            cni_conflist(
                name="nodelocal-e2e",
                bridge=BRIDGE,
                subnet=POD_SUBNET,
                ipam_dir=self.workdir / "cni" / "ipam",
            )
        )
        for argv in (
            ["-N", NAT_CHAIN],
            ["-I", "PREROUTING", "-j", NAT_CHAIN],
            ["-I", "OUTPUT", "-j", NAT_CHAIN],
        ):
            subprocess.run(
                ["iptables", "-w", "-t", "nat", *argv], check=True, capture_output=True, timeout=30
            )
        # What kube-proxy would do for the one Service the pods need.
        self.forward_tcp(KUBERNETES_SERVICE_IP, 443, self.host_ip, self.api_port)

    def forward_tcp(self, ip: str, port: int, to_ip: str, to_port: int) -> None:
        """Connections from this host (and its pods) to ip:port go to to_ip:to_port instead
        (a DNAT rule in the cluster's own nat chain, removed with it)."""
        rule = ["-d", f"{ip}/32", "-p", "tcp", "--dport", str(port),
                "-j", "DNAT", "--to-destination", f"{to_ip}:{to_port}"]  # fmt: skip
        subprocess.run(
            ["iptables", "-w", "-t", "nat", "-A", NAT_CHAIN, *rule],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def _start_kubelet(self) -> None:
        hoststate.create_cgroup(CGROUP_ROOT)
        kubelet_port, healthz_port = free_port(), free_port()
        config = self.workdir / "kubelet-config.yaml"
        config.write_text(
            kubelet_config(
                KubeletSettings(
                    ca=self.pki.ca.cert,
                    serving_cert=self.kubelet_serving.cert,
                    serving_key=self.kubelet_serving.key,
                    containerd_socket=self.containerd_socket,
                    address=self.host_ip,
                    port=kubelet_port,
                    healthz_port=healthz_port,
                    pod_logs=self.workdir / "pod-logs",
                    volume_plugins=self.workdir / "volume-plugins",
                )
            )
        )
        self.kubelet = self._daemon(
            "kubelet",
            [
                str(self.binaries.kube_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={self._kubeconfig('kubelet')}",
                f"--root-dir={self.kubelet_dir}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.host_ip}",
                "--v=2",
            ],
        )
        wait_for(
            f"node {NODE_NAME} Ready",
            self._node_ready,
            180,
            every=1,
            alive=self.kubelet.require_alive,
        )

    def _node_ready(self) -> bool:
        node = raw(self.core().read_node, NODE_NAME)
        conditions = node["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # ------------------------------------------------------------------ clients

    def api_client(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = f"https://127.0.0.1:{self.api_port}"
        cfg.ssl_ca_cert = str(self.pki.ca.cert)
        cfg.cert_file = str(self.clients["admin"].cert)
        cfg.key_file = str(self.clients["admin"].key)
        return client.ApiClient(cfg)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def start_daemon(self, name: str, argv: list[str]) -> Daemon:
        """Run an extra cluster component (e.g. snapshot-controller) owned by this cluster."""
        return self._daemon(name, argv)

    # ------------------------------------------------------------------ stop

    def _drain(self) -> None:
        """Delete every pod through the API so the kubelet unmounts volumes and the runtime
        tears down sandboxes and network namespaces the normal way; workload pods first, while
        the CSI driver still runs to unpublish their volumes."""
        from kubernetes import client

        core = self.core()
        for d in self.daemons:
            if d.name == "kube-controller-manager":
                d.stop()
        for selector in ("!app.kubernetes.io/part-of", ""):
            for pod in raw(core.list_pod_for_all_namespaces, label_selector=selector)["items"]:
                meta = pod["metadata"]
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(
                        meta["name"], meta["namespace"], grace_period_seconds=2
                    )

            def none_left(s: str = selector) -> bool:
                return not raw(core.list_pod_for_all_namespaces, label_selector=s)["items"]

            with contextlib.suppress(TimeoutError):
                wait_for("pods to be gone", none_left, 90, every=1)

    def stop(self) -> list[str]:
        """Tear everything down; return the problems found (also raised by the caller)."""
        problems: list[str] = []

        def step(name: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                problems.append(f"{name}: {exc}")

        # Pod logs first: the kubelet deletes them with the pods during the drain.
        step("pod logs", self._save_pod_logs)
        kubelet = next((d for d in self.daemons if d.name == "kubelet"), None)
        api = next((d for d in self.daemons if d.name == "kube-apiserver"), None)
        if kubelet is not None and kubelet.alive() and api is not None and api.alive():
            step("drain", self._drain)
        # Stop in reverse start order; containerd's tasks are killed before containerd.
        for d in reversed(self.daemons):
            if d.name == "containerd" and d.alive():
                step("kill tasks", self._kill_tasks)
            step(f"stop {d.name}", d.stop)
        step("VM processes", self._kill_vm_processes)
        sock = str(self.containerd_socket)
        step(
            "kill shims",
            lambda: hoststate.kill_pids(hoststate.pids_matching([sock], "containerd-shim-runc-v2")),
        )
        step("cgroups", lambda: self._check(hoststate.remove_cgroup(CGROUP_ROOT), "cgroups left"))
        step("loop devices", lambda: hoststate.detach_loops_under(str(self.workdir)))
        snap = self._snapshot
        if snap is not None:
            new_netns = hoststate.list_dir("/run/netns") - snap.netns
            step("netns", lambda: self._remove_netns(new_netns))
        if self._mounted_self or hoststate.unmount_under([str(self.workdir)]):
            step(
                "unmount",
                lambda: self._check(hoststate.unmount_under([str(self.workdir)]), "mounts left"),
            )
        step("bridge", lambda: hoststate.delete_link(BRIDGE))
        if snap is not None:
            step(
                "iptables",
                lambda: self._check(
                    hoststate.iptables_restore(snap.iptables), "iptables rules left"
                ),
            )
            step("host paths", lambda: self._remove_host_paths(snap.host_paths))
            step("shim sockets", lambda: self._remove_run_containerd(snap.run_containerd))
            step("sysctls", lambda: self._restore_sysctls(snap.sysctls))
        step("artifacts", self._save_artifacts)
        if not any(p.startswith("unmount") for p in problems):
            # Only with nothing mounted below it: rmtree would follow into a bind mount.
            step("workdir", lambda: shutil.rmtree(self.workdir) if self.workdir.exists() else None)
        self.daemons.clear()
        self._snapshot = None
        return problems

    def _kill_vm_processes(self) -> None:
        """A VM node (vmnode.py) whose own stop was cut short: its qemu and virtiofsd name
        files below the work directory on their command lines."""
        names = ("qemu-system-x86_64", "virtiofsd")
        hoststate.kill_pids(
            pid for name in names for pid in hoststate.pids_matching([str(self.workdir)], name)
        )
        deadline = time.monotonic() + 10
        while True:
            left = [
                pid for name in names for pid in hoststate.pids_matching([str(self.workdir)], name)
            ]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self._check([str(pid) for pid in left], "VM processes survived SIGKILL")

    @staticmethod
    def _check(left: list[str], what: str) -> None:
        if left:
            raise RuntimeError(f"{what}: {left}")

    def _kill_tasks(self) -> None:
        out = self.ctr("tasks", "ls", "-q", timeout=30).stdout.split()
        for task in out:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, timeout=30)

    @staticmethod
    def _remove_netns(names: set[str]) -> None:
        for name in names:
            path = f"/run/netns/{name}"
            subprocess.run(["umount", path], capture_output=True, timeout=30)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @staticmethod
    def _remove_host_paths(before: dict[str, set[str] | None]) -> None:
        for path, entries in before.items():
            if entries is None:
                if Path(path).exists() and not hoststate.unmount_under([path]):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            for new in sorted(hoststate.tree(path) or set(), key=len, reverse=True):
                if new in entries:
                    continue
                if os.path.isdir(new) and not os.path.islink(new):
                    with contextlib.suppress(OSError):
                        os.rmdir(new)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(new)

    def _remove_run_containerd(self, before: dict[str, set[str]] | None) -> None:
        """containerd keeps shim sockets and fifos under /run/containerd whatever its state
        dir; remove what this run added."""
        if before is None:
            if not hoststate.unmount_under(["/run/containerd"]):
                shutil.rmtree("/run/containerd", ignore_errors=True)
            return
        for sub, names in before.items():
            directory = f"/run/containerd/{sub}"
            for name in hoststate.list_dir(directory) - names:
                path = os.path.join(directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    @staticmethod
    def _restore_sysctls(values: dict[str, str]) -> None:
        for key, value in values.items():
            path = Path("/proc/sys", key)
            if path.read_text() != value:
                path.write_text(value)

    def _save_pod_logs(self) -> None:
        if self.artifacts is None:
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        pod_logs = self.workdir / "pod-logs"
        if pod_logs.exists():
            shutil.copytree(
                pod_logs, self.artifacts / "pods", ignore_dangling_symlinks=True, dirs_exist_ok=True
            )

    def _save_artifacts(self) -> None:
        if self.artifacts is None or not self.logs.exists():
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for log in self.logs.iterdir():
            shutil.copy2(log, self.artifacts / log.name)
