import dataclasses
from pathlib import Path

import pytest

from csi_driver import DEFAULT_DRIVER_NAME
from csi_driver.cli import parse_config
from csi_driver.config import BackendKind, LogFormat, Mode, topology_key


def test_defaults_use_node_name_and_hostpath() -> None:
    cfg = parse_config([], env={"NODE_NAME": "worker-1"})
    assert cfg.node_id == "worker-1"
    assert cfg.driver_name == DEFAULT_DRIVER_NAME
    assert cfg.mode is Mode.STANDALONE
    assert cfg.backend is BackendKind.HOSTPATH
    assert cfg.hostpath is not None and cfg.hostpath.capacity_bytes is None
    assert cfg.topology_key == f"topology.{DEFAULT_DRIVER_NAME}/node"


def test_environment_twins_are_typed_and_flags_win() -> None:
    env = {
        "CSI_DRIVER_NODE_ID": "from-env",
        "CSI_DRIVER_HOSTPATH_CAPACITY": "2Gi",
        "CSI_DRIVER_LOG_FORMAT": "json",
        "CSI_DRIVER_MODE": "node",
    }
    cfg = parse_config(["--node-id", "from-flag"], env=env)
    assert cfg.node_id == "from-flag"
    assert cfg.hostpath is not None and cfg.hostpath.capacity_bytes == 2 * 2**30
    assert cfg.log_format is LogFormat.JSON
    assert cfg.mode is Mode.NODE


def test_lvm_flags() -> None:
    cfg = parse_config(
        ["--backend", "lvm", "--lvm-volume-group", "vg0", "--lvm-nsenter", "--node-id", "n"],
        env={},
    )
    assert cfg.lvm is not None
    (only,) = cfg.lvm.device_classes
    assert (only.name, only.volume_group, only.default) == ("default", "vg0", True)
    assert cfg.lvm.use_nsenter and cfg.lvm.udev_sync
    assert cfg.hostpath is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--endpoint", "http://x"],
        ["--endpoint", "unix://relative/path"],
        ["--node-id", "bad/node"],
        ["--node-id", "../x"],
        ["--backend", "lvm"],
        ["--backend", "lvm", "--lvm-volume-group", "bad/vg"],
        ["--backend", "lvm", "--lvm-config", "/nonexistent/lvm.json"],
        ["--hostpath-capacity", "lots"],
        ["--mode", "everything"],
        ["--driver-name", "NoDots"],
        ["--kubelet-cgroup-root", "/a/../b"],
    ],
)
def test_bad_flags_exit_with_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([*argv] if "--node-id" in argv else [*argv, "--node-id", "n"], env={})
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"CSI_DRIVER_MODE": "sideways"}, "CSI_DRIVER_MODE"),
        ({"CSI_DRIVER_LOG_FORMAT": "xml"}, "CSI_DRIVER_LOG_FORMAT"),
        ({"CSI_DRIVER_GRACE_PERIOD": "soon"}, "--grace-period"),
        ({"CSI_DRIVER_LVM_NSENTER": "perhaps"}, "--lvm-nsenter"),
        ({"CSI_DRIVER_HOSTPATH_CAPACITY": "lots"}, "--hostpath-capacity"),
    ],
)
def test_bad_environment_value_is_reported(
    env: dict[str, str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(["--node-id", "n"], env=env)
    assert exc.value.code == 2
    assert said in capsys.readouterr().err


def test_good_environment_values_are_typed() -> None:
    cfg = parse_config(
        ["--node-id", "n"],
        env={
            "CSI_DRIVER_GRACE_PERIOD": "2.5",
            "CSI_DRIVER_LVM_UDEV_SYNC": "off",
            "CSI_DRIVER_HOSTPATH_CAPACITY": "1Gi",
            "CSI_DRIVER_MAX_VOLUMES_PER_NODE": "7",
        },
    )
    assert cfg.grace_period == 2.5
    assert cfg.hostpath is not None and cfg.hostpath.capacity_bytes == 1 << 30
    assert cfg.max_volumes_per_node == 7


def test_relative_hostpath_root_is_made_absolute() -> None:
    cfg = parse_config(["--hostpath-root", "data", "--node-id", "n"], env={})
    assert cfg.hostpath is not None
    assert cfg.hostpath.root == Path.cwd() / "data"


def test_topology_key_is_derived_from_the_driver_name() -> None:
    assert topology_key("x.example.com") == "topology.x.example.com/node"


def test_help_documents_every_flag_with_its_environment_twin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--help"], env={})
    out = capsys.readouterr().out
    for flag in (
        "endpoint",
        "node-id",
        "driver-name",
        "mode",
        "backend",
        "hostpath-root",
        "hostpath-capacity",
        "metrics-address",
        "log-format",
        "log-level",
    ):
        assert f"--{flag}" in out
        assert "CSI_DRIVER_" + flag.replace("-", "_").upper() in out.replace("\n", "").replace(
            " ", ""
        )


def test_peer_channel_flags() -> None:
    node = parse_config(
        ["--mode", "node", "--peer-tls-dir", "/tls", "--peer-listen", "10.0.0.5:9810"], env={}
    )
    assert node.peer is not None and node.peer.listen == "10.0.0.5:9810"
    assert node.peer.tls_dir == Path("/tls")
    ctl = parse_config(
        ["--mode", "controller", "--peer-tls-dir", "/tls", "--peer-port", "9810"],
        env={"CSI_DRIVER_PEER_SELECTOR": "app=x", "POD_NAMESPACE": "kube-system"},
    )
    assert ctl.peer is not None
    assert (ctl.peer.port, ctl.peer.namespace, ctl.peer.selector) == (9810, "kube-system", "app=x")
    assert parse_config(["--mode", "node"], env={}).peer is None
    # $(POD_IP):PORT on an IPv6 cluster
    v6 = parse_config(
        ["--mode", "node", "--peer-tls-dir", "/tls", "--peer-listen", "fd00:10::5:9820"], env={}
    )
    assert v6.peer is not None and v6.peer.listen == "[fd00:10::5]:9820"


@pytest.mark.parametrize(
    "argv",
    [
        ["--peer-tls-dir", "/tls"],  # standalone answers ControllerModifyVolume itself
        ["--mode", "node", "--peer-tls-dir", "/tls"],
        ["--mode", "node", "--peer-tls-dir", "/tls", "--peer-listen", "10.0.0.5"],
        ["--mode", "node", "--peer-tls-dir", "/tls", "--peer-listen", "h:70000"],
        ["--mode", "controller", "--peer-tls-dir", "/tls", "--peer-port", "9810"],
        [
            "--mode",
            "controller",
            "--peer-tls-dir",
            "/t",
            "--peer-port",
            "0",
            "--peer-selector",
            "a",
        ],
        # the controller only calls out; flags of a channel without its TLS do nothing
        [
            *[
                "--mode",
                "controller",
                "--peer-tls-dir",
                "/t",
                "--peer-port",
                "1",
                "--peer-selector",
                "a",
            ],
            "--peer-listen",
            "10.0.0.1:9820",
        ],
        ["--mode", "node", "--peer-listen", "10.0.0.5:9820"],
        ["--mode", "controller", "--peer-port", "9820", "--peer-selector", "a"],
    ],
)
def test_incomplete_peer_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env={"POD_NAMESPACE": "ns"} if "0" in argv else {})


def test_the_kubelets_cgroup_root_is_kept_as_names() -> None:
    assert parse_config(["--node-id", "n"], env={}).kubelet_cgroup_root == ()
    cfg = parse_config(["--node-id", "n", "--kubelet-cgroup-root", "/edge.slice/"], env={})
    assert cfg.kubelet_cgroup_root == ("edge.slice",)
    for names in (("/etc",), ("..",), ("a/b",)):
        with pytest.raises(ValueError, match="cgroup"):
            dataclasses.replace(cfg, kubelet_cgroup_root=names)
