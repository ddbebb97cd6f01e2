"""The reconcilers' flags: each runs only in the mode it belongs to, grace periods and intervals
are bounded, and a controller asked for node loss outside a Pod refuses to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.app import StartError, build
from csi_driver.cli import parse_config
from csi_driver.config import Reconcile


def _controller(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *("--mode", "controller", "--endpoint", f"unix://{tmp_path}/csi.sock"),
        *("--node-id", "n1", *extra),
    ]


def test_off_unless_asked(tmp_path: Path) -> None:
    rc = parse_config(_controller(tmp_path), env={}).reconcile
    assert rc.node_loss is Reconcile.OFF and rc.orphans is Reconcile.OFF


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "node", "--node-loss", "report"], "controller"),
        (["--mode", "controller", "--orphans", "delete"], "where the volumes are"),
        (["--mode", "controller", "--node-loss", "report"], "--reconcile-namespace"),
        (["--orphans", "report", "--orphans-grace-period", "0"], "--orphans-grace-period"),
        (["--orphans", "maybe"], "choose from"),
        (  # deleting on a grace period of seconds
            ["--orphans", "delete", "--orphans-grace-period", "5", "--orphans-interval", "1"],
            "at least 30s",
        ),
        (  # a grace period shorter than two rounds
            ["--orphans", "delete", "--orphans-grace-period", "100", "--orphans-interval", "60"],
            "twice the interval",
        ),
        (  # one round alone would decide, even in report mode
            ["--orphans", "report", "--orphans-grace-period", "10", "--orphans-interval", "60"],
            "at least the interval",
        ),
        (
            [
                *("--mode", "controller", "--node-loss", "delete"),
                *("--reconcile-namespace", "ns", "--node-loss-grace-period", "10"),
                *("--node-loss-interval", "2"),
            ],
            "--node-loss=delete",
        ),
        (
            [
                *("--mode", "controller", "--node-loss", "report"),
                *("--reconcile-namespace", "ns", "--node-loss-max-percent", "0"),
            ],
            "--node-loss-max-percent",
        ),
    ],
)
def test_misplaced_or_bad_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([*argv, "--node-id", "n1", "--endpoint", f"unix://{tmp_path}/s"], env={})
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_node_loss_limits_reach_the_config(tmp_path: Path) -> None:
    argv = _controller(
        tmp_path,
        *("--node-loss", "delete", "--reconcile-namespace", "ns"),
        *("--node-loss-max-nodes", "7", "--node-loss-max-percent", "20"),
    )
    rc = parse_config(argv, env={}).reconcile
    assert (rc.node_loss_max_nodes, rc.node_loss_max_percent) == (7, 20.0)
    defaults = parse_config(_controller(tmp_path), env={}).reconcile
    assert (defaults.node_loss_max_nodes, defaults.node_loss_max_percent) == (3, 50.0)


def test_node_loss_outside_a_pod_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = parse_config(
        _controller(tmp_path, "--node-loss", "delete", "--reconcile-namespace", "ns"), env={}
    )
    assert config.reconcile.node_loss is Reconcile.DELETE
    with pytest.raises(StartError, match="KUBERNETES_SERVICE_HOST"):
        build(config)
