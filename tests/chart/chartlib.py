"""Renders the chart with the real helm and reads the objects back, for the chart tests.

The tools come from scripts/install-chart-tools.sh (helm and kubeconform built from the Go module
proxy, kubeconform schemas generated from the Kubernetes OpenAPI document); nothing here reaches
any other network.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nodelocal-csi"
RELEASE = "nodelocal-csi"
NAMESPACE = "kube-system"

Obj = dict[str, Any]


def cache_dir() -> Path:
    return Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))


@dataclass(frozen=True)
class ChartTools:
    helm: Path
    kubeconform: Path
    schema_dir: Path
    kubernetes_versions: tuple[str, ...]


def install_chart_tools() -> ChartTools:
    """Runs the idempotent installer; a failure is a test failure, never a skip."""
    script = REPO / "scripts" / "install-chart-tools.sh"
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=3000, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    schema_dir = cache_dir() / "kubeconform-schemas"
    versions = tuple(
        sorted(
            p.name.removeprefix("v").removesuffix("-standalone-strict")
            for p in schema_dir.glob("v*-standalone-strict")
        )
    )
    return ChartTools(bin_dir / "helm", bin_dir / "kubeconform", schema_dir, versions)


def run(argv: Sequence[str | Path], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def set_args(values: dict[str, Any]) -> list[str]:
    """helm --set-json arguments, one per top-level key (nested values are merged by helm)."""
    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render_text(tools: ChartTools, values: dict[str, Any], *extra: str) -> str:
    proc = run(
        [
            tools.helm,
            "template",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            "1.34.4",
            *set_args(values),
            *extra,
        ]
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed with values {values}:\n{proc.stderr}")
    return proc.stdout


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@dataclass
class Rendered:
    """The objects of one render, with the look-ups the invariant tests need."""

    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> Obj:
        found = [o for o in self.all(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {len(found)}"
        return found[0]

    @property
    def daemonset(self) -> Obj:
        return self.one("DaemonSet")

    @property
    def deployment(self) -> Obj:
        return self.one("Deployment")


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has {len(found)} containers {name!r}"
    return found[0]


def container_names(workload: Obj) -> list[str]:
    return [c["name"] for c in pod_spec(workload)["containers"]]


def flags(c: Obj) -> dict[str, str]:
    """--name=value (or bare --name -> "") arguments of a container, by name."""
    out: dict[str, str] = {}
    for arg in c.get("args", []):
        assert arg.startswith("--"), f"{c['name']}: argument {arg!r} is not a --flag"
        name, _, value = arg[2:].partition("=")
        assert name not in out, f"{c['name']}: --{name} given twice"
        out[name] = value
    return out


def env_field_ref(c: Obj, name: str) -> str | None:
    for env in c.get("env", []):
        if env["name"] == name:
            ref = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            return ref if isinstance(ref, str) else None
    return None


def resolve(workload: Obj, c: Obj, path: str) -> tuple[str, str]:
    """Maps a path inside a container to (volume name, path inside that volume).

    Two containers see the same file exactly when their paths resolve to the same pair, which is
    what "every sidecar dials the driver's socket" means across container boundaries.
    """
    best: tuple[int, str, str] | None = None
    for mount in c.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            rest = path[len(root) :].lstrip("/")
            sub = mount.get("subPath", "")
            inner = "/".join(p for p in (sub, rest) if p)
            if best is None or len(root) > best[0]:
                best = (len(root), mount["name"], inner)
    assert best is not None, (
        f"{workload['metadata']['name']}/{c['name']}: {path} is on no volume mount, so no other "
        "container can share it"
    )
    return best[1], best[2]


def volume(workload: Obj, name: str) -> Obj:
    found: list[Obj] = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has {len(found)} volumes {name!r}"
    return found[0]


@dataclass(frozen=True)
class KubeconformResult:
    returncode: int
    valid: int
    invalid: int
    errors: int
    skipped: int
    output: str


def kubeconform(
    tools: ChartTools, manifest_text: str, kubernetes_version: str, *, skip: Sequence[str] = ()
) -> KubeconformResult:
    """kubeconform -strict; ``skip`` names kinds it has no schema for (they count as skipped)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(manifest_text)
        path = handle.name
    try:
        proc = run(
            [
                tools.kubeconform,
                "-strict",
                "-summary",
                "-output",
                "json",
                "-kubernetes-version",
                kubernetes_version,
                "-schema-location",
                tools.schema_dir,
                *(["-skip", ",".join(skip)] if skip else []),
                path,
            ]
        )
    finally:
        os.unlink(path)
    try:
        report = json.loads(proc.stdout)
        summary = report["summary"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise AssertionError(
            f"kubeconform printed no report: {proc.stdout}\n{proc.stderr}"
        ) from exc
    return KubeconformResult(
        proc.returncode,
        int(summary["valid"]),
        int(summary["invalid"]),
        int(summary["errors"]),
        int(summary["skipped"]),
        proc.stdout + proc.stderr,
    )


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)
