"""Finding a node's plugin Pod for the peer channel (services/peer.py): which Pod is chosen, and
that a failed lookup is a reason to retry (UNAVAILABLE), never a verdict on the volume."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from csi_driver.errors import CsiError
from csi_driver.kubeapi import ApiError, KubeApi
from csi_driver.services.peer import NodePlugins, pick_pod_ip


def pod(
    ip: str,
    created: str = "2026-01-01T00:00:00Z",
    phase: str = "Running",
    ready: bool = True,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "creationTimestamp": created,
        "ownerReferences": [{"kind": "DaemonSet", "name": "r-node", "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_the_newest_ready_running_pod_wins() -> None:
    pods = [
        pod("10.0.0.1", "2026-01-01T00:00:00Z"),
        pod("10.0.0.2", "2026-01-03T00:00:00Z", deleting=True),
        pod("10.0.0.3", "2026-01-04T00:00:00Z", ready=False),
        pod("10.0.0.4", "2026-01-05T00:00:00Z", phase="Pending"),
        pod("10.0.0.5", "2026-01-02T00:00:00Z"),
        "garbage",
        {"metadata": None, "status": {"phase": "Running", "podIP": 7}},
    ]
    assert pick_pod_ip(pods) == "10.0.0.5"
    # the newest of all, but nobody's DaemonSet Pod: a stray with the right labels
    stray = pod("10.0.0.66", "2026-01-09T00:00:00Z")
    stray["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "controller": True}]
    orphan = pod("10.0.0.67", "2026-01-09T00:00:00Z")
    del orphan["metadata"]["ownerReferences"]
    assert pick_pod_ip([*pods, stray, orphan]) == "10.0.0.5"
    assert pick_pod_ip([pod("", "x")]) is None
    assert pick_pod_ip([]) is None


class FakeApi:
    def __init__(self, reply: dict[str, Any] | ApiError) -> None:
        self.reply = reply
        self.asked: list[tuple[str, dict[str, str], float]] = []

    def get(self, path: str, query: dict[str, str], timeout: float) -> dict[str, Any]:
        self.asked.append((path, query, timeout))
        if isinstance(self.reply, ApiError):
            raise self.reply
        return self.reply


def plugins(api: FakeApi) -> NodePlugins:
    return NodePlugins(api, "kube-system", "app=node", 9810)  # type: ignore[arg-type]


def test_the_lookup_asks_for_the_nodes_pods_only() -> None:
    api = FakeApi({"items": [pod("fd00::5")]})
    assert plugins(api).address("node-1", 7.0) == "[fd00::5]:9810"
    assert api.asked == [
        (
            "/api/v1/namespaces/kube-system/pods",
            {"labelSelector": "app=node", "fieldSelector": "spec.nodeName=node-1"},
            7.0,
        )
    ]
    assert plugins(FakeApi({"items": [pod("10.1.2.3")]})).address("n", 1) == "10.1.2.3:9810"


@pytest.mark.parametrize(
    "reply",
    [{"items": []}, {"items": [pod("10.0.0.1", ready=False)]}, {}, ApiError("refused", 403)],
)
def test_no_plugin_found_is_unavailable(reply: dict[str, Any] | ApiError) -> None:
    with pytest.raises(CsiError) as exc:
        plugins(FakeApi(reply)).address("node-1", 5)
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert "node-1" in exc.value.message


def test_the_api_is_reached_over_https_only(tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        KubeApi("http://10.0.0.1:443", tmp_path / "token", None)
    with pytest.raises(ApiError):
        KubeApi.in_cluster({})
    api = KubeApi.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    with pytest.raises(ApiError):  # no service account files outside a Pod
        api.get("/api/v1/pods")
