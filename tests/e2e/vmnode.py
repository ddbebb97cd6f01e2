"""The e2e cluster's lvm node: a second node whose kubelet, containerd and pods run in a VM on
Debian's kernel, which has the device-mapper this host's kernel lacks.

The control plane stays on the host (cluster.Cluster); the VM (virtme-ng, qemu in software
emulation, as in the VM lane) joins it as node ``vm-node``:

- qemu's user network shows the host to the guest as 10.0.2.2, where the guest's kubelet and
  pods (through a DNAT rule for the ``kubernetes`` Service) reach the API server. The node's
  address is the guest's, 10.0.2.15; on the host a DNAT rule turns it into the port qemu forwards
  into the guest, so the API server reaches this kubelet for ``exec`` and logs as any node's;
- the images the pods run are imported on the host, where it is fast, into a containerd root on
  an ext4 disk image that the guest's containerd mounts at the same path (cached under
  ``$CSI_CACHE_DIR/e2e-vm``, keyed by the images; software emulation would take minutes);
- a second blank disk becomes the volume group the lvm backend allocates from.

The guest side is tests/e2e/vmguest.py; the files they share (certificates, kubeconfig, the
guest's logs, its ready and stop markers and its final ``lvs``) are in one shared directory.
``stop()`` always leaves the host as it was: the VM's process session is killed and its disks
deleted, also after a failed start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.ports import free_port
from testkit.vm import kill_session, newest_kernel
from tests.pki import KeyPair, write_kubeconfig

from . import hoststate, images
from .cluster import Binaries, Cluster, cache_dir, wait_for
from .hoststate import Daemon
from .kube import raw
from .nodeconfig import QEMU_GUEST, QEMU_HOST, VM_RUN_DIR, ContainerdPaths, containerd_config

ROOT = Path(__file__).resolve().parents[2]
VM_NODE = "vm-node"
VM_POD_SUBNET = "10.244.78.0/24"
VG = "nlvm"
THINPOOL = "pool"
THINPOOL_SIZE = "1G"
VG_DISK_BYTES = 3 * 1024**3
CONTAINERD_DISK_BYTES = 6 * 1024**3
#: where the guest's containerd root is mounted; the images are imported on the host with the
#: disk mounted at the same path, so every path containerd recorded holds in the guest
CONTAINERD_MOUNT = VM_RUN_DIR / "containerd"
#: the guest's own directories (its tmpfs)
GUEST_STATE = VM_RUN_DIR / "state"
GUEST_KUBELET_DIR = GUEST_STATE / "kubelet"


def find_vng() -> Path:
    explicit = os.environ.get("CSI_VNG")
    if explicit:
        return Path(explicit)
    found = sorted(cache_dir().glob("virtme-ng-*/bin/vng"))
    if not found:
        raise RuntimeError("vng not found: run scripts/install-vm.sh")
    return found[-1]


def _images_key(image_list: list[images.Image], binaries: Binaries) -> str:
    digest = hashlib.sha256()
    version = subprocess.run(
        [str(binaries.containerd), "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    for part in (str(CONTAINERD_MOUNT), str(CONTAINERD_DISK_BYTES), version):
        digest.update(part.encode() + b"\0")
    for image in image_list:
        digest.update(image.name.encode() + b"\0")
        if image.archive is not None:
            with image.archive.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        for layer in image.layers:  # their names are keyed by their content
            digest.update(layer.name.encode() + b"\0")
        digest.update(repr(image.config).encode())
    return digest.hexdigest()[:20]


def containerd_disk(image_list: list[images.Image], binaries: Binaries, work: Path) -> Path:
    """An ext4 image whose containerd root holds every image, imported on the host (cached)."""
    cache = cache_dir() / "e2e-vm"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"containerd-{_images_key(image_list, binaries)}.img"
    if target.exists():
        return target
    partial = target.with_suffix(".partial")
    # What a build killed half-way left: its loop mount (autoclear: the unmount detaches the
    # loop device) and its partial images.
    if hoststate.unmount_under([str(VM_RUN_DIR)]):
        raise RuntimeError(f"cannot unmount what is mounted below {VM_RUN_DIR}")
    for stale in cache.glob("*.partial"):
        stale.unlink()
    base = work / "containerd-import"
    paths = ContainerdPaths(base=base, root=CONTAINERD_MOUNT / "root", state=base / "state")
    daemon: Daemon | None = None
    try:
        with partial.open("wb") as f:
            f.truncate(CONTAINERD_DISK_BYTES)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(partial)], check=True, timeout=120)
        CONTAINERD_MOUNT.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-o", "loop", str(partial), str(CONTAINERD_MOUNT)], check=True, timeout=60
        )
        base.mkdir(parents=True)
        paths.config.write_text(
            containerd_config(
                paths,
                snapshotter="overlayfs",  # the guest's containerd root is this ext4 disk
                runc=binaries.runc,
                cni_bin=binaries.cni_dir,
                cni_conf=base / "net.d",
            )
        )
        env = dict(os.environ)
        env["PATH"] = f"{binaries.containerd_shim_dir}:{env.get('PATH', '')}"
        daemon = Daemon(
            "containerd-import",
            [str(binaries.containerd), "--config", str(paths.config)],
            work / "containerd-import.log",
            env,
        )
        daemon.start()
        ctr = [str(binaries.ctr), "--address", str(paths.socket), "-n", "k8s.io"]

        def up() -> bool:
            return subprocess.run([*ctr, "version"], capture_output=True).returncode == 0

        wait_for("containerd (image import)", up, 60, alive=daemon.require_alive)
        images.import_images([*ctr, "images", "import", "--snapshotter", "overlayfs"],
                             image_list, base)  # fmt: skip
        daemon.stop()
        daemon = None
        if hoststate.unmount_under([str(VM_RUN_DIR)]):
            raise RuntimeError(f"cannot unmount {CONTAINERD_MOUNT} after the image import")
        for old in cache.glob("containerd-*.img"):
            old.unlink()
        partial.rename(target)
    finally:
        if daemon is not None:
            daemon.stop()
        left = hoststate.unmount_under([str(VM_RUN_DIR)])
        if not left:
            shutil.rmtree(VM_RUN_DIR, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return target


@dataclass
class VmNode:
    """``start()`` boots the VM (it returns at once), ``wait_ready()`` waits for the node,
    ``stop()`` (idempotent, also after a failed start) powers it off and returns the guest's
    last ``lvs`` of the volume group."""

    cluster: Cluster
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = self.cluster.workdir / "vm"
        self.share = self.work / "share"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.final_lvs: list[dict[str, str]] | None = None

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def start(self, image_list: list[images.Image]) -> None:
        t0 = time.monotonic()
        self.share.mkdir(parents=True)
        binaries = self.cluster.binaries
        disk = containerd_disk(image_list, binaries, self.work)
        self.timings["containerd_disk"] = round(time.monotonic() - t0, 2)
        ctrd_disk, vg_disk = self.work / "containerd.img", self.work / "vg.img"
        subprocess.run(["cp", "--sparse=always", str(disk), str(ctrd_disk)], check=True)
        with vg_disk.open("wb") as f:
            f.truncate(VG_DISK_BYTES)
        pki, c = self.cluster.pki, self.cluster
        client = pki.issue("vm-kubelet", f"system:node:{VM_NODE}", "system:nodes")
        serving = pki.issue(
            "vm-kubelet-serving",
            VM_NODE,
            dns=(VM_NODE,),
            ips=(c.host_ip, QEMU_GUEST, "127.0.0.1"),
            server=True,
        )
        shutil.copy(pki.ca.cert, self.share / "ca.crt")
        for name, pair in (("kubelet-client", client), ("kubelet-serving", serving)):
            shutil.copy(pair.cert, self.share / f"{name}.crt")
            shutil.copy(pair.key, self.share / f"{name}.key")
        shared_client = KeyPair(
            self.share / "kubelet-client.crt", self.share / "kubelet-client.key"
        )
        write_kubeconfig(
            self.share / "kubelet.kubeconfig",
            f"https://{QEMU_HOST}:{c.api_port}",
            self.share / "ca.crt",
            shared_client,
            "kubelet",
        )
        kubelet_port = free_port()
        # The API server reaches the kubelet at the node's address, the guest's own, which this
        # host has not: a DNAT rule sends it to the port qemu forwards into the guest. (qemu
        # passes the host's source address on, which the guest does not have either.)
        forward = f"tcp:{c.host_ip}:{kubelet_port}-{QEMU_GUEST}:{kubelet_port}"
        c.forward_tcp(QEMU_GUEST, kubelet_port, c.host_ip, kubelet_port)
        config = {
            "node": VM_NODE,
            "api_port": c.api_port,
            "kubelet_port": kubelet_port,
            "pod_subnet": VM_POD_SUBNET,
            "vg": VG,
            "thinpool": THINPOOL,
            "thinpool_size": THINPOOL_SIZE,
            "vg_disk_bytes": VG_DISK_BYTES,
            "containerd_disk_bytes": CONTAINERD_DISK_BYTES,
            "containerd_mount": str(CONTAINERD_MOUNT),
            "containerd": {
                "base": str(GUEST_STATE / "containerd"),
                "root": str(CONTAINERD_MOUNT / "root"),
                "state": str(GUEST_STATE / "containerd" / "state"),
            },
            "state_dir": str(GUEST_STATE),
            "kubelet_dir": str(GUEST_KUBELET_DIR),
            "kubelet_bin": str(binaries.kube_dir / "kubelet"),
            "containerd_bin": str(binaries.containerd),
            "shim_dir": str(binaries.containerd_shim_dir),
            "ctr": str(binaries.ctr),
            "runc": str(binaries.runc),
            "cni_bin": str(binaries.cni_dir),
        }
        (self.share / "config.json").write_text(json.dumps(config, indent=2))
        guest = (
            f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(str(ROOT / '.venv/bin/python'))}"
            f" -m tests.e2e.vmguest {shlex.quote(str(self.share / 'config.json'))}"
        )
        vng = find_vng()
        argv = [
            str(vng),
            "--run",
            str(newest_kernel()),
            "--disable-kvm",
            "--name",
            VM_NODE,
            "--memory",
            os.environ.get("CSI_E2E_VM_MEMORY", "3G"),
            "--cpus",
            "2",
            "--overlay-rwdir",
            "/var/lib",
            "--rwdir",
            f"{self.share}={self.share}",
            "--disk",
            str(ctrd_disk),
            "--disk",
            str(vg_disk),
            f"--qemu-opts=-netdev user,id=k8s,hostfwd={forward} -device virtio-net-pci,netdev=k8s",
            "--exec",
            guest,
        ]
        env = dict(os.environ)
        env["TMPDIR"] = str(self.work)
        virtiofsd = cache_dir() / "bin"
        env["PATH"] = f"{virtiofsd}:{vng.parent}:{env.get('PATH', '/usr/bin:/bin')}"
        with self.console.open("wb") as out:
            out.write(f"+ {shlex.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                cwd=self.work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._t_boot = time.monotonic()

    def check_alive(self) -> None:
        """Raises, with the guest's logs, when the VM failed or is gone before ``stop()``."""
        failed = self.share / "failed"
        if failed.exists():
            raise RuntimeError(f"the VM node failed: {failed.read_text()}\n{self.diagnose()}")
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"the VM exited with {self.proc.returncode} before it was stopped\n"
                + self.diagnose()
            )

    def wait_ready(self, timeout: float = 600) -> None:
        def node_ready() -> bool:
            if not (self.share / "ready.json").exists():
                return False
            node = raw(self.cluster.core().read_node, VM_NODE)
            conditions = node["status"].get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(f"node {VM_NODE} Ready", node_ready, timeout, every=2, alive=self.check_alive)
        self.timings["boot_to_node_ready"] = round(time.monotonic() - self._t_boot, 2)
        self.ready = json.loads((self.share / "ready.json").read_text())

    def diagnose(self) -> str:
        parts = [f"--- VM console:\n{hoststate.tail(self.console, 60)}"]
        for log in sorted((self.share / "logs").glob("*.log")):
            parts.append(f"--- {log.name}:\n{hoststate.tail(log, 30)}")
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """Power the VM off (the guest stops its kubelet first); return the problems found.
        However this is interrupted, the VM's whole process session is killed."""
        problems: list[str] = []
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        (self.share / "stop").write_text("")
                    try:
                        proc.wait(timeout=240)
                    except subprocess.TimeoutExpired:
                        problems.append("the VM did not power off within 240 s of 'stop'")
            finally:
                left = kill_session(proc.pid)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if left:
                problems.append(f"processes of the VM survived SIGKILL: {left}")
            failed = self.share / "failed"
            if failed.exists():
                problems.append(f"the guest failed: {failed.read_text()}")
            lvs = self.share / "lvs.json"
            if lvs.exists():
                self.final_lvs = json.loads(lvs.read_text())
            else:
                problems.append("the guest reported no lvs at power-off")
            self._forget_node()
        self._save_logs()
        for disk in ("containerd.img", "vg.img"):
            with contextlib.suppress(FileNotFoundError):
                (self.work / disk).unlink()
        return problems

    def _forget_node(self) -> None:
        """The node is gone for good: its pods and Node object go too, so the cluster's own
        teardown does not wait for a kubelet that will never answer."""
        from kubernetes import client

        core = self.cluster.core()
        with contextlib.suppress(client.ApiException):
            pods = raw(core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={VM_NODE}")[
                "items"
            ]
            for pod in pods:
                meta = pod["metadata"]
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(
                        meta["name"], meta["namespace"], grace_period_seconds=0
                    )
            core.delete_node(VM_NODE)

    def _save_logs(self) -> None:
        if self.cluster.artifacts is None:
            return
        dest = self.cluster.artifacts / "vm-node"
        dest.mkdir(parents=True, exist_ok=True)
        if self.console.exists():
            shutil.copy2(self.console, dest / "console.log")
        for log in (self.share / "logs").glob("*.log"):
            shutil.copy2(log, dest / log.name)
        pod_logs = self.share / "pod-logs"
        if pod_logs.exists():
            shutil.copytree(
                pod_logs, dest / "pods", ignore_dangling_symlinks=True, dirs_exist_ok=True
            )
