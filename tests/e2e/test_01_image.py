"""Scenario 1a: the driver Pods run the image built from the repository's Dockerfile.

scripts/build-image.sh builds the Dockerfile with buildah into an OCI archive, the one `make
image` hands to users; the cluster imported that archive as it is. Here the chain is checked end
to end: the archive is the Dockerfile's image (its entrypoint, user and labels), containerd's
image of that name is the archive's manifest, and every driver container of the chart (node
DaemonSet and controller Deployment) runs the archive's image id.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

from .cluster import Cluster
from .conftest import DRIVER_NAMESPACE, Release, driver_archive
from .kube import Kube

CONTAINER = "driver"


def _archive_config() -> dict[str, Any]:
    archive = driver_archive()
    algo, _, hexdigest = archive.config_digest.partition(":")
    with tarfile.open(archive.path) as tar:
        f = tar.extractfile(f"blobs/{algo}/{hexdigest}")
        assert f is not None
        config: dict[str, Any] = json.load(f)
    return config


def test_archive_is_the_dockerfile_image() -> None:
    config = _archive_config()["config"]
    assert config["Entrypoint"] == ["csi-driver"]
    assert config["User"] == "65532:65532"
    assert config["Labels"]["org.opencontainers.image.title"] == "nodelocal-csi"


def test_containerd_holds_the_archive(driver: Release, cluster: Cluster) -> None:
    archive = driver_archive()
    rows = [line.split() for line in cluster.ctr("images", "ls").stdout.splitlines()[1:]]
    digests = {row[0]: row[2] for row in rows if len(row) > 2}
    assert digests.get(archive.name) == archive.manifest_digest, digests


def test_driver_pods_run_the_archive(driver: Release) -> None:
    archive = driver_archive()
    kube = Kube(driver.cluster.api_client(), DRIVER_NAMESPACE)
    seen = []
    for pod in kube.items(kube.core.list_namespaced_pod, DRIVER_NAMESPACE):
        name = pod["metadata"]["name"]
        (spec,) = [c for c in pod["spec"]["containers"] if c["name"] == CONTAINER]
        (status,) = [c for c in pod["status"]["containerStatuses"] if c["name"] == CONTAINER]
        assert spec["image"] == archive.name, name
        # containerd reports the image id (the config's digest), or a repo digest
        # (name@manifest digest) for an image it pulled itself.
        assert status["imageID"] in (
            archive.config_digest,
            f"{archive.repository}@{archive.manifest_digest}",
        ), (name, status["imageID"], archive)
        seen.append(pod["metadata"]["labels"].get("app.kubernetes.io/component"))
    assert sorted(seen) == ["controller", "node"]
