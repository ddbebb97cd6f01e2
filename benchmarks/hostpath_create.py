"""How fast the hostpath backend creates volumes, and whether that depends on how many exist.

Creates N volumes through HostPathBackend on a fresh temporary root, for each N given
(default 10 and 1000), and prints the overall rate and the median wall-clock and CPU time of
the last creates, which are the ones that see the most existing volumes. If those match the
small run's, the cost of a create does not grow with the volume count.

Wall-clock time is mostly fsync (the database commits with synchronous=FULL, and the new
directory and its parent are synced), so on a shared disk it is noisy; the CPU time, and the
first-versus-last comparison inside one run (same disk, same minute), are the steadier
signals. Medians, because one create that waits for a busy disk says nothing about the code.

    .venv/bin/python benchmarks/hostpath_create.py [N ...] [--dir DIR] [--block]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.model import AccessType, VolumeSpec
from csi_driver.system.runner import SubprocessRunner
from csi_driver.units import MiB

TAIL = 50


@dataclass(frozen=True)
class Run:
    count: int
    rate: float  # creates per second over the whole run
    first_wall: float  # median seconds of the first TAIL creates
    last_wall: float  # ... of the last TAIL creates
    last_cpu: float  # median CPU seconds of the last TAIL creates


def run(count: int, base: str | None, access: AccessType) -> Run:
    root = Path(tempfile.mkdtemp(prefix="hostpath-bench-", dir=base))
    backend = HostPathBackend(root, None, "bench-node", SubprocessRunner())
    try:
        wall, cpu = [], []
        for i in range(count):
            w, c = time.perf_counter(), time.process_time()
            backend.create_volume(VolumeSpec(f"pvc-{i:06d}", 64 * MiB, access, ""))
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        return Run(
            count,
            count / sum(wall),
            statistics.median(wall[:TAIL]),
            statistics.median(wall[-TAIL:]),
            statistics.median(cpu[-TAIL:]),
        )
    finally:
        for volume in backend.list_volumes():
            backend.delete_volume(volume.id)
        backend.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[10, 1000])
    parser.add_argument("--dir", help="where to make the temporary roots (default: $TMPDIR)")
    parser.add_argument("--block", action="store_true", help="block volumes instead of dirs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    access = AccessType.BLOCK if args.block else AccessType.MOUNT
    runs = [run(count, args.dir, access) for count in args.counts]
    for r in runs:
        print(
            f"{r.count:>6} {access.value} volumes: {r.rate:6.1f} creates/s overall; last"
            f" {min(TAIL, r.count)} creates: median {r.last_wall * 1000:6.2f} ms wall,"
            f" {r.last_cpu * 1000:5.2f} ms CPU"
        )
    if len(runs) > 1:
        small = min(runs, key=lambda r: r.count)
        big = max(runs, key=lambda r: r.count)
        print(
            f"with {big.count} volumes vs {small.count}: a create takes"
            f" {big.last_cpu / small.last_cpu:.2f}x the CPU time and"
            f" {big.last_wall / small.last_wall:.2f}x the wall time"
        )
        print(
            f"within the {big.count}-volume run, the last {TAIL} creates take"
            f" {big.last_wall / big.first_wall:.2f}x the wall time of the first {TAIL}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
