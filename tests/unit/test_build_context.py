"""scripts/build_context.py: the files an image build sees, which key the cached image archive."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_context", ROOT / "scripts" / "build_context.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bc = _load()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def context(tmp_path: Path) -> Path:
    return _tree(
        tmp_path,
        {
            ".dockerignore": (ROOT / ".dockerignore").read_text(),
            "Dockerfile": "FROM scratch\n",
            "pyproject.toml": "[project]\n",
            "README.md": "readme\n",
            "csi_driver/__init__.py": "",
            "csi_driver/sub/mod.py": "x = 1\n",
            "csi_driver/__pycache__/mod.cpython-311.pyc": "bytecode",
            "csi_driver/sub/old.pyc": "bytecode",
            "csi_driver.egg-info/PKG-INFO": "meta",
            ".venv/lib/site.py": "",
            ".git/HEAD": "ref",
            "tests/test_x.py": "",
            "docs/x.md": "",
        },
    )


def test_the_repository_dockerignore_lets_through_what_the_dockerfile_copies(
    context: Path,
) -> None:
    assert list(bc.context_files(context)) == [
        "README.md",
        "csi_driver/__init__.py",
        "csi_driver/sub/mod.py",
        "pyproject.toml",
    ]


def test_digest_follows_the_context_and_nothing_else(context: Path) -> None:
    dockerfile = context / "Dockerfile"
    first = bc.context_digest(context, dockerfile)
    (context / "tests" / "test_x.py").write_text("changed")
    (context / "csi_driver" / "__pycache__" / "mod.cpython-311.pyc").write_text("changed")
    assert bc.context_digest(context, dockerfile) == first
    (context / "csi_driver" / "sub" / "mod.py").write_text("x = 2\n")
    second = bc.context_digest(context, dockerfile)
    assert second != first
    (context / "csi_driver" / "sub" / "mod.py").chmod(0o755)
    assert bc.context_digest(context, dockerfile) != second
    dockerfile.write_text("FROM scratch\nUSER 1\n")
    assert bc.context_digest(context, dockerfile) not in (first, second)


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("*\n", "a/b/c.py", True),  # a directory's pattern covers what is below it
        ("*\n!a\n", "a/b/c.py", False),
        ("*\n!a\n**/c.py\n", "a/b/c.py", True),
        ("*.py\n", "a/c.py", False),  # * does not cross /
        ("**/*.py\n", "c.py", True),  # **/ matches no directory too
        ("a/?.py\n", "a/c.py", True),
        ("/a/b\n", "a/b/c", True),  # a leading / means the context's root
        ("# a comment\n\n", "a", False),
        ("[ab]\n", "b/x", True),
        ("[^ab]\n", "b/x", False),  # Go's negated class
    ],
)
def test_dockerignore_rules(patterns: str, path: str, excluded: bool) -> None:
    assert bc.excluded(bc.parse_ignore(patterns), path) is excluded
