"""The image recipe's invariants (no Docker engine here, so the Dockerfile is read, not built)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import pytest

from tests.chart.chartlib import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions() -> list[Instruction]:
    """Joins continuation lines and drops comments, as the Dockerfile parser does."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions():
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_base_image_is_a_pinned_build_arg() -> None:
    ins = instructions()
    assert ins[0] == Instruction("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [i.args for i in ins if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]
    assert "latest" not in DOCKERFILE.read_text()


def test_builder_builds_wheels_and_runtime_installs_them_offline() -> None:
    builder, runtime = stages()
    assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in builder)
    installs = [i.args for i in runtime if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1
    assert "--no-index" in installs[0] and "from=builder" in installs[0]
    assert not any(i.keyword == "COPY" and "csi_driver" in i.args for i in runtime)


def test_runtime_has_only_runtime_tools() -> None:
    _, runtime = stages()
    apt = [i.args for i in runtime if i.keyword == "RUN" and "apt-get install" in i.args]
    assert len(apt) == 1
    command = apt[0]
    assert "--no-install-recommends" in command
    assert "rm -rf /var/lib/apt/lists/*" in command
    packages = set(
        re.findall(r"(?<=\s)([a-z0-9][a-z0-9.+-]+)(?=\s|$)", command.split("install", 1)[1])
    )
    for needed in (
        "lvm2",
        "e2fsprogs",
        "xfsprogs",
        "util-linux",
        "mount",
        "thin-provisioning-tools",
    ):
        assert needed in packages
    for build_tool in ("gcc", "build-essential", "git", "curl", "wget", "python3-dev"):
        assert build_tool not in packages


def test_no_remote_scripts_or_downloads() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"\b(curl|wget)\b", text)
    assert not re.search(r"\|\s*(ba)?sh\b", text)
    assert not any(i.keyword == "ADD" for i in instructions())


def test_runs_as_non_root_with_the_console_script() -> None:
    ins = instructions()
    users = [i.args for i in ins if i.keyword == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1])
    assert ins[-1] == Instruction("ENTRYPOINT", '["csi-driver"]')
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "csi-driver" in scripts


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: a pattern also covers everything under a directory it matches;
    the last matching pattern decides, and "!" re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("csi_driver/__init__.py", True),
        ("csi_driver/proto/csi_pb2.py", True),
        ("csi_driver/__pycache__/config.cpython-311.pyc", False),
        (".git/config", False),
        (".venv/bin/python", False),
        ("tests/unit/test_ids.py", False),
        ("charts/nodelocal-csi/values.yaml", False),
    ],
)
def test_dockerignore_sends_only_the_sources(path: str, sent: bool) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored(path, patterns) is (not sent)


def test_everything_the_build_copies_exists() -> None:
    for ins in instructions():
        if ins.keyword == "COPY" and "--from" not in ins.args:
            *sources, _dest = ins.args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
