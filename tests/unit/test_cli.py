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
    assert cfg.lvm.volume_group == "vg0" and cfg.lvm.use_nsenter and cfg.lvm.udev_sync
    assert cfg.hostpath is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--endpoint", "http://x"],
        ["--endpoint", "unix://relative/path"],
        ["--node-id", "bad/node"],
        ["--node-id", "../x"],
        ["--backend", "lvm"],
        ["--hostpath-capacity", "lots"],
        ["--mode", "everything"],
        ["--driver-name", "NoDots"],
    ],
)
def test_bad_flags_exit_with_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([*argv] if "--node-id" in argv else [*argv, "--node-id", "n"], env={})
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_environment_value_is_reported() -> None:
    with pytest.raises(SystemExit):
        parse_config(["--node-id", "n"], env={"CSI_DRIVER_MODE": "sideways"})


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
