"""Inside the VM: the e2e cluster's lvm node (see vmnode.py, which boots the VM).

Run as root by virtme-ng's init, from the checkout: ``python -m tests.e2e.vmguest CONFIG``. It
brings up the guest's network (qemu's user network: the host is 10.0.2.2, the guest 10.0.2.15,
which is also the node's address), makes the volume
group on the blank disk, mounts the disk whose containerd root the host filled with the
lane's images, starts containerd and the kubelet, which joins the host's API server as node
``vm-node``, and says so in ``ready.json`` in the shared directory. It then waits for the host
to create ``stop`` there, stops the kubelet and containerd, and reports what logical volumes the
volume group still holds (``lvs.json``) before the VM powers off.

Everything it writes outside the shared directory is in the guest's own tmpfs or on the VM's
throw-away disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testkit.lvmconf import LVM_CONF_WITHOUT_UDEV

from . import hoststate
from .hoststate import Daemon
from .nodeconfig import (
    CGROUP_ROOT,
    KUBERNETES_SERVICE_IP,
    QEMU_GUEST,
    QEMU_HOST,
    ContainerdPaths,
    KubeletSettings,
    cni_conflist,
    containerd_config,
    kubelet_config,
)

BRIDGE = "nlvm0"
MODULES = (
    "dm_mod",
    "dm_thin_pool",
    "dm_snapshot",
    "overlay",
    "loop",  # the kubelet holds a raw block volume open through a loop device
    "bridge",
    "br_netfilter",
    "veth",
    "nf_conntrack",
    "nf_nat",
    "iptable_nat",
    "iptable_filter",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "nft_chain_nat",
    "nft_compat",
)
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message: str) -> None:
    print(f"vm-node: {message}", flush=True)


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def disk_of_size(size: int) -> str:
    for block in sorted(Path("/sys/block").iterdir()):
        if block.name.startswith(("vd", "sd")) and int((block / "size").read_text()) * 512 == size:
            return f"/dev/{block.name}"
    raise RuntimeError(f"no disk of {size} bytes in {sorted(os.listdir('/sys/block'))}")


def network(cfg: dict[str, Any]) -> None:
    links = json.loads(sh(["ip", "-j", "link", "show"]))
    nic = next(link["ifname"] for link in links if link.get("link_type") == "ether")
    sh(["ip", "link", "set", "lo", "up"])
    sh(["ip", "link", "set", nic, "up"])
    sh(["ip", "addr", "add", f"{QEMU_GUEST}/24", "dev", nic])
    sh(["ip", "route", "add", "default", "via", QEMU_HOST])
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1")
    # What kube-proxy would do for the API's Service, and the pods' way out through qemu.
    nat = [
        ["-A", "OUTPUT", "-d", f"{KUBERNETES_SERVICE_IP}/32", "-p", "tcp", "--dport", "443"],
        ["-A", "PREROUTING", "-d", f"{KUBERNETES_SERVICE_IP}/32", "-p", "tcp", "--dport", "443"],
    ]
    target = ["-j", "DNAT", "--to-destination", f"{QEMU_HOST}:{cfg['api_port']}"]
    for rule in nat:
        sh(["iptables", "-w", "-t", "nat", *rule, *target])
    subnet = cfg["pod_subnet"]
    sh(["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", subnet, "!", "-d", subnet,
        "-j", "MASQUERADE"])  # fmt: skip


def volume_group(cfg: dict[str, Any]) -> None:
    disk = disk_of_size(cfg["vg_disk_bytes"])
    sh(["pvcreate", "-y", disk])
    sh(["vgcreate", cfg["vg"], disk])
    sh(["lvcreate", "-y", "--type", "thin-pool", "-L", cfg["thinpool_size"], "-n",
        cfg["thinpool"], cfg["vg"]])  # fmt: skip


def lvs(vg: str) -> list[dict[str, str]]:
    out = sh(["lvs", "--reportformat", "json", "-o", "lv_name,lv_attr,lv_size,pool_lv",
              "--units", "b", vg])  # fmt: skip
    report: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
    return report


def vgs(vg: str) -> dict[str, str]:
    out = sh(["vgs", "--reportformat", "json", "-o", "vg_name,vg_size,vg_free", "--units", "b",
              vg])  # fmt: skip
    report: dict[str, str] = json.loads(out)["report"][0]["vg"][0]
    return report


def cgroups() -> None:
    """cgroup v2 in the guest: the controllers the kubelet needs, delegated to its root."""
    fs = Path("/sys/fs/cgroup")
    if not (fs / "cgroup.controllers").exists():
        sh(["mount", "-t", "cgroup2", "none", str(fs)])
    wanted = set((fs / "cgroup.controllers").read_text().split()) & {
        "cpuset", "cpu", "io", "memory", "pids", "hugetlb"
    }  # fmt: skip
    enable = " ".join(f"+{c}" for c in sorted(wanted))
    (fs / "cgroup.subtree_control").write_text(enable)
    (fs / CGROUP_ROOT).mkdir(exist_ok=True)
    (fs / CGROUP_ROOT / "cgroup.subtree_control").write_text(enable)


def main(argv: Sequence[str]) -> int:
    os.dup2(1, 2)
    share = Path(argv[0]).parent
    cfg: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    log(f"up after {Path('/proc/uptime').read_text().split()[0]} s of guest uptime")
    state = Path(cfg["state_dir"])  # in the guest's tmpfs
    conf = state / "lvm"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "lvm.conf").write_text(LVM_CONF_WITHOUT_UDEV)
    os.environ.update(PATH=SEARCH_PATH, LVM_SYSTEM_DIR=str(conf), LVM_SUPPRESS_FD_WARNINGS="1")
    logs = share / "logs"
    logs.mkdir(exist_ok=True)
    daemons: list[Daemon] = []
    t0 = time.monotonic()
    try:
        for module in MODULES:
            sh(["modprobe", module])
        network(cfg)
        volume_group(cfg)
        cgroups()
        ctrd = ContainerdPaths(**{k: Path(v) for k, v in cfg["containerd"].items()})
        Path(cfg["containerd_mount"]).mkdir(parents=True, exist_ok=True)
        sh(["mount", disk_of_size(cfg["containerd_disk_bytes"]), cfg["containerd_mount"]])
        kubelet_dir = Path(cfg["kubelet_dir"])
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        # Bidirectional propagation (the driver's mounts reaching the kubelet) needs a shared
        # mount; the guest's / is not one.
        sh(["mount", "--bind", str(kubelet_dir), str(kubelet_dir)])
        sh(["mount", "--make-rshared", str(kubelet_dir)])
        cni_conf = state / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-nodelocal-vm.conflist").write_text(
            cni_conflist(
                name="nodelocal-vm",
                bridge=BRIDGE,
                subnet=cfg["pod_subnet"],
                ipam_dir=state / "cni" / "ipam",
            )
        )
        ctrd.base.mkdir(parents=True, exist_ok=True)
        ctrd.config.write_text(
            containerd_config(
                ctrd,
                snapshotter="overlayfs",
                runc=Path(cfg["runc"]),
                cni_bin=Path(cfg["cni_bin"]),
                cni_conf=cni_conf,
            )
        )
        containerd = Daemon(
            "containerd",
            [cfg["containerd_bin"], "--config", str(ctrd.config), "--log-level", "info"],
            logs / "containerd.log",
            {**os.environ, "PATH": f"{cfg['shim_dir']}:{SEARCH_PATH}"},
        )
        daemons.append(containerd)
        containerd.start()
        ctr = [cfg["ctr"], "--address", str(ctrd.socket), "-n", "k8s.io"]
        deadline = time.monotonic() + 120
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            containerd.require_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("containerd did not answer within 120 s")
            time.sleep(0.5)
        images = sh([*ctr, "images", "ls", "-q"]).split()
        log(f"containerd up with {len(images)} images in {time.monotonic() - t0:.0f} s")
        kubelet_config_path = state / "kubelet-config.json"
        kubelet_config_path.write_text(
            kubelet_config(
                KubeletSettings(
                    ca=share / "ca.crt",
                    serving_cert=share / "kubelet-serving.crt",
                    serving_key=share / "kubelet-serving.key",
                    containerd_socket=ctrd.socket,
                    address="0.0.0.0",
                    port=cfg["kubelet_port"],
                    healthz_port=10248,
                    pod_logs=share / "pod-logs",  # kept after power-off
                    volume_plugins=state / "volume-plugins",
                )
            )
        )
        # What the host compares the published capacity with: the VG before any volume.
        ready = {"vg": vgs(cfg["vg"]), "lvs": lvs(cfg["vg"]), "seconds": time.monotonic() - t0}
        (share / "ready.json.tmp").write_text(json.dumps(ready))
        (share / "ready.json.tmp").rename(share / "ready.json")
        kubelet = Daemon(
            "kubelet",
            [
                cfg["kubelet_bin"],
                f"--config={kubelet_config_path}",
                f"--kubeconfig={share / 'kubelet.kubeconfig'}",
                f"--root-dir={kubelet_dir}",
                f"--hostname-override={cfg['node']}",
                f"--node-ip={QEMU_GUEST}",
                "--v=2",
            ],
            logs / "kubelet.log",
        )
        daemons.append(kubelet)
        kubelet.start()
        log(f"kubelet started {time.monotonic() - t0:.0f} s after boot; waiting for 'stop'")
        while not (share / "stop").exists():
            kubelet.require_alive()
            containerd.require_alive()
            time.sleep(1)
        log("stopping")
        kubelet.stop()
        with contextlib.suppress(Exception):
            for task in sh([*ctr, "tasks", "ls", "-q"], timeout=60).split():
                sh([*ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False, timeout=60)
        containerd.stop()
        hoststate.unmount_under([str(kubelet_dir)])
        (share / "lvs.json").write_text(json.dumps(lvs(cfg["vg"])))
        log("stopped")
        return 0
    except Exception as exc:
        log(f"FAILED: {exc}")
        (share / "failed").write_text(str(exc))
        return 1
    finally:
        for d in reversed(daemons):
            d.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
