"""What the guest hands back to the host: one JSON file in the shared output directory.

The guest's exit code also reaches the host, but a file with per-step counts survives a
garbled console and tells the host which step failed, so the lane trusts both together.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
GUEST_UP_MARKER = "csi-vm: guest up"


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)  # "name: first line of the message"

    def line(self, label: str) -> str:
        return f"{label}: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    counts: Counts | None = None


@dataclass
class Results:
    steps: list[Step] = field(default_factory=list)
    guest_uptime_at_start: float = 0.0
    finished: bool = False

    @property
    def ok(self) -> bool:
        return self.finished and bool(self.steps) and all(s.ok for s in self.steps)

    def write(self, directory: Path) -> None:
        data = asdict(self)
        data["ok"] = self.ok
        tmp = directory / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(directory / RESULTS_FILE)

    @classmethod
    def read(cls, directory: Path) -> Results | None:
        path = directory / RESULTS_FILE
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        steps = [
            Step(
                name=s["name"],
                ok=bool(s["ok"]),
                seconds=float(s["seconds"]),
                detail=s.get("detail", ""),
                counts=Counts(**s["counts"]) if s.get("counts") else None,
            )
            for s in data.get("steps", [])
        ]
        return cls(
            steps=steps,
            guest_uptime_at_start=float(data.get("guest_uptime_at_start", 0.0)),
            finished=bool(data.get("finished", False)),
        )


def junit_counts(report: Path) -> Counts | None:
    """Counts from a JUnit XML report (pytest's or Ginkgo's), case by case: the suite-level
    attributes of the two tools disagree on what a skip is. None when there is no report."""
    if not report.is_file():
        return None
    counts = Counts()
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 (our own reports)
        if case.find("failure") is not None or case.find("error") is not None:
            counts.failed += 1
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            assert problem is not None
            first = (problem.get("message") or problem.text or "").strip().splitlines()
            counts.failures.append(f"{case.get('name', '')}: {first[0] if first else ''}")
        elif case.find("skipped") is not None or case.get("status") in ("skipped", "pending"):
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts
