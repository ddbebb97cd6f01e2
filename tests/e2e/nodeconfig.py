"""The configuration of a Kubernetes node's runtime parts (containerd, the CNI bridge, the
kubelet), in one place for both nodes the e2e lane runs: the host's (cluster.Cluster) and the
lvm node in a VM (vmnode.VmNode, started inside the guest by vmguest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import images

#: the ``kubernetes`` Service's address, which pods reach the API server at (a DNAT rule on
#: every node does what kube-proxy would)
KUBERNETES_SERVICE_IP = "10.0.0.1"
#: everything the VM node's harness keeps under /run, on the host (the image import's mount)
#: and in the guest (its state, its containerd root)
VM_RUN_DIR = Path("/run/nodelocal-e2e-vm")
#: the host as qemu's user network shows it to a guest (the VM node reaches the API server there)
QEMU_HOST = "10.0.2.2"
#: the guest's own address on that network (where qemu forwards the kubelet's port)
QEMU_GUEST = "10.0.2.15"
#: the cgroup, in every hierarchy, under which the kubelet puts its pods
CGROUP_ROOT = "nodelocal-e2e"


@dataclass(frozen=True)
class ContainerdPaths:
    """Where one containerd keeps everything (all below the node's own directories)."""

    base: Path  # config.toml, runc's state and opt live here
    root: Path  # content store and snapshots (the images)
    state: Path

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.base / "config.toml"


def containerd_config(
    paths: ContainerdPaths, *, snapshotter: str, runc: Path, cni_bin: Path, cni_conf: Path
) -> str:
    return f"""version = 2
root = "{paths.root}"
state = "{paths.state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.btrfs"]
[grpc]
  address = "{paths.socket}"
[ttrpc]
  address = "{paths.socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{paths.base / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  enable_selinux = false
  # This host withholds CAP_SYS_RESOURCE even from root, so no process may lower its
  # oom_score_adj; clamp the kubelet's negative values to containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
        Root = "{paths.base / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"""


def cni_conflist(*, name: str, bridge: str, subnet: str, ipam_dir: Path) -> str:
    """A bridge network with host-local addresses: enough for pods on one node."""
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(ipam_dir),
                    },
                }
            ],
        },
        indent=2,
    )


@dataclass(frozen=True)
class KubeletSettings:
    """What differs between the lane's nodes; kubelet_config() fills in the rest."""

    ca: Path
    serving_cert: Path
    serving_key: Path
    containerd_socket: Path
    address: str
    port: int
    healthz_port: int
    pod_logs: Path
    volume_plugins: Path
    cgroup_root: str = CGROUP_ROOT


def kubelet_config(s: KubeletSettings) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(s.ca)},
        },
        "authorization": {"mode": "Webhook"},
        "address": s.address,
        "port": s.port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": s.healthz_port,
        "tlsCertFile": str(s.serving_cert),
        "tlsPrivateKeyFile": str(s.serving_key),
        "containerRuntimeEndpoint": f"unix://{s.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{s.cgroup_root}",
        "failSwapOn": False,
        "failCgroupV1": False,
        "podLogsDir": str(s.pod_logs),
        "volumePluginDir": str(s.volume_plugins),
        "resolvConf": "/etc/resolv.conf",
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        # The kubelet asks the driver for every mounted volume's stats and, with this gate,
        # its condition (test_07_health.py); every 10 s instead of every minute.
        "featureGates": {"CSIVolumeHealth": True},
        "volumeStatsAggPeriod": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "registerNode": True,
    }
    return json.dumps(config, indent=2)
