"""The files a `docker build` (or `buildah bud`) of a directory sends as its context, and a digest
of them.

scripts/build-image.sh keys its cached image archive by this digest, so that an unchanged tree is
never rebuilt and a change to any file the Dockerfile could COPY is. The digest covers the
Dockerfile, the .dockerignore and every file the .dockerignore lets through (path, executable
bit, content; a symbolic link by its target), read with Docker's rules:

- one pattern a line, ``#`` starts a comment, ``!`` makes an exception, the last matching line
  wins;
- ``*`` and ``?`` do not cross ``/``, ``**`` matches any number of directories;
- a pattern that matches a directory matches everything below it.

Usage: ``build_context.py DIR`` prints the digest; ``--list`` prints the files instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pattern:
    text: str
    exception: bool
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        """Whether the pattern matches path or one of its parent directories."""
        if self.regex.match(path):
            return True
        parts = path.split("/")
        return any(self.regex.match("/".join(parts[:i])) for i in range(1, len(parts)))


def _translate(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/": zero or more leading directories
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[^" + body[1:] + "]" if body.startswith("^") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def parse_ignore(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = line[1:].strip() if exception else line
        line = posixpath.normpath(line).lstrip("/")
        if not line or line == ".":
            continue
        patterns.append(Pattern(line, exception, _translate(line)))
    return patterns


def excluded(patterns: list[Pattern], path: str) -> bool:
    verdict = False
    for pattern in patterns:
        if pattern.matches(path):
            verdict = not pattern.exception
    return verdict


def _may_reinclude(patterns: list[Pattern], directory: str) -> bool:
    """Whether an exception could bring back something below an excluded directory (Docker's
    own test, which is what lets it skip .git or .venv without walking them)."""
    prefix = directory + "/"
    return any(p.exception and (p.text + "/").startswith(prefix) for p in patterns)


def context_files(root: Path) -> Iterator[str]:
    """Relative paths (with ``/``) of the files and links the build sees, sorted."""
    ignore = root / ".dockerignore"
    patterns = parse_ignore(ignore.read_text()) if ignore.is_file() else []

    def walk(directory: Path, rel: str) -> Iterator[str]:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                if excluded(patterns, path) and not _may_reinclude(patterns, path):
                    continue
                yield from walk(Path(entry.path), path)
            elif not excluded(patterns, path):
                yield path

    yield from walk(root, "")


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def context_digest(root: Path, dockerfile: Path) -> str:
    digest = hashlib.sha256()
    inputs = [("Dockerfile", dockerfile), (".dockerignore", root / ".dockerignore")]
    for name, path in inputs:
        content = path.read_bytes() if path.is_file() else b""
        digest.update(f"{name}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    for rel in context_files(root):
        path = root / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            line = f"{rel}\0l\0{os.readlink(path)}"
        else:
            mode = "x" if st.st_mode & 0o111 else "-"
            line = f"{rel}\0{mode}\0{_file_digest(path)}"
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("context", type=Path)
    parser.add_argument("--file", type=Path, help="the Dockerfile (default: CONTEXT/Dockerfile)")
    parser.add_argument("--list", action="store_true", help="print the files, not the digest")
    args = parser.parse_args(argv)
    if args.list:
        for rel in context_files(args.context):
            print(rel)
    else:
        print(context_digest(args.context, args.file or args.context / "Dockerfile"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
