"""A driver process for measurements: started on a temporary root, talked to over its unix socket,
its Prometheus metrics scraped over 127.0.0.1.

Kept apart from the measurements so each benchmark script stays about what it measures. The
process handling is shared with the tests (testkit/driver_process.py), so the benchmarks start
the driver exactly as the tests do.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.driver_process import CommandCounts, Csi, clean_up_host
from testkit.driver_process import DriverProcess as _DriverProcess
from testkit.ports import free_port

Stubs = Csi
RESULTS = Path(__file__).resolve().parent / "results"

__all__ = [
    "CommandCounts",
    "DriverProcess",
    "Stubs",
    "clean_up_host",
    "diff_counts",
    "render_table",
    "write_results",
]


def render_table(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned text: the first column to the left, the others to the right,
    a rule under the first row (the head)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for j, line in enumerate(lines):
        cells = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        out.append("  ".join([line[0].ljust(widths[0]), *cells]).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_results(results: dict[str, Any], out: str | None, prefix: str) -> None:
    """``results`` as JSON to ``out``: "-" for nowhere, None for
    benchmarks/results/<prefix><date>.json (never overwriting an earlier run of the day)."""
    if out == "-":
        return
    path = Path(out) if out else unused_path(RESULTS / f"{prefix}{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {path}")


def unused_path(path: Path) -> Path:
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"too many result files like {path}")


def diff_counts(after: CommandCounts, before: CommandCounts) -> CommandCounts:
    out: CommandCounts = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta:
            out[key] = delta
    return out


@dataclass
class DriverProcess(_DriverProcess):
    """The hostpath driver with metrics on a free port and quiet logs (logging every RPC at
    debug level would be part of what is measured)."""

    node_id: str = "bench-node"
    log_level: str = "warning"
    metrics_port: int = field(default_factory=free_port)
