"""The correctness goals of issue 13 at reduced scale (docs/scale.md): every Pod Running with
its PVC Bound, each on the node holding its volume, no node's root holding more than its
capacity, the CSIStorageCapacity objects published and following changes, nothing left in any
root after everything is deleted, nothing left running after the teardown."""

from __future__ import annotations

from typing import Any

from .plane import stray_processes


def test_every_pod_running_and_bound(scale_run: dict[str, Any]) -> None:
    workload = scale_run["workload"]
    assert workload["completed"]
    assert workload["pods_running"] == workload["pvcs_bound"] == scale_run["config"]["pods"]
    assert workload["seconds_to_all_running_and_bound"] > 0
    assert scale_run["placement"]["pods"] == scale_run["config"]["pods"]
    assert scale_run["placement"]["pvs"] == scale_run["config"]["pods"]


def test_every_pod_on_the_node_holding_its_volume(scale_run: dict[str, Any]) -> None:
    assert scale_run["placement"]["misplaced_count"] == 0, scale_run["placement"]["misplaced_pods"]


def test_no_node_overcommitted(scale_run: dict[str, Any]) -> None:
    nodes = scale_run["placement"]["nodes"]
    assert len(nodes) == scale_run["config"]["nodes"]
    over = [n for n in nodes if n["allocated_root"] > n["capacity"]]
    assert not over, over
    assert not scale_run["placement"]["overcommitted_nodes"]
    # The root's own record and the API agree: every allocation is a PV, every PV allocated.
    assert not scale_run["placement"]["root_vs_pv_mismatch_nodes"]
    assert sum(n["volumes_root"] for n in nodes) == scale_run["config"]["pods"]


def test_capacity_steered_the_scheduler(scale_run: dict[str, Any]) -> None:
    """The small nodes filled up and the rest went elsewhere: the workload exceeds the small
    nodes' capacity, so placing it at all needed the published capacity."""
    placement = scale_run["placement"]
    assert placement["nodes_full"] > 0
    small = min(scale_run["config"]["capacities_bytes"])
    demand_per_node = (
        sum(scale_run["config"]["pvc_sizes_bytes"])
        / len(scale_run["config"]["pvc_sizes_bytes"])
        * scale_run["config"]["pods"]
        / scale_run["config"]["nodes"]
    )
    assert demand_per_node > small


def test_capacity_objects_follow_changes(scale_run: dict[str, Any]) -> None:
    assert scale_run["capacity_objects"]["count"] == scale_run["config"]["nodes"]
    assert scale_run["capacity_objects"]["not_reflecting_root_after_workload"] == 0
    lag = scale_run["capacity_lag"]
    assert lag["create_seconds"]["n"] >= 1
    # The provisioner refreshes a node's object after each CreateVolume and DeleteVolume;
    # the poll interval (1m) is the bound for changes made behind its back.
    assert lag["create_seconds"]["max"] < 30, lag
    assert lag["delete_seconds"]["max"] < 30, lag


def test_every_volume_gone_after_delete(scale_run: dict[str, Any]) -> None:
    delete = scale_run["delete"]
    assert delete["roots_checked"] == scale_run["config"]["nodes"]
    assert delete["nodes_with_leftovers"] == {}
    assert delete["capacity_restored_everywhere"]


def test_clean_teardown(scale_run: dict[str, Any]) -> None:
    assert scale_run["teardown_problems"] == []
    assert scale_run["correctness"]["clean_teardown"]
    assert not stray_processes()
