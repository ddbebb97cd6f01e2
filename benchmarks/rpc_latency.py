"""RPC latency of a real driver process (hostpath backend) over its real unix socket.

What it answers:

* Does the cost of CreateVolume and DeleteVolume grow with the number of volumes? They are
  measured with 10 and with 1,000 existing volumes. The hostpath backend keeps its state in
  SQLite with indexes, so it should not; the reference hostpath driver rewrites one JSON file
  holding every volume on each change, so it does.
* How long does a full ListVolumes paging through 1,000 volumes take?
* How long does a node cycle (NodeStage, NodePublish, NodeUnpublish, NodeUnstage) take with real
  bind mounts (and, for block volumes, a real loop device)? Needs root.
* How many external commands does each operation run? Read from the driver's own Prometheus
  counter ``csi_driver_command_total`` before and after each operation.

Requests are sequential (one in flight), so ops/s is 1 / mean latency. Every loop is bounded.
Run: ``.venv/bin/python -m benchmarks.rpc_latency`` (see ``--help``); ``scripts/bench.sh`` does.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness import (
    CommandCounts,
    DriverProcess,
    Stubs,
    clean_up_host,
    diff_counts,
    render_table,
    write_results,
)
from csi_driver import __version__
from csi_driver.proto import csi_pb2

MiB = 1 << 20
VOLUME_SIZE = 1 * MiB
RPC_TIMEOUT = 60.0
WARM_UP_PAIRS = 20
MODE = csi_pb2.VolumeCapability.AccessMode


def mount_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER),
        mount=csi_pb2.VolumeCapability.MountVolume(),
    )


def block_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER),
        block=csi_pb2.VolumeCapability.BlockVolume(),
    )


def create_request(
    name: str, cap: csi_pb2.VolumeCapability | None = None, size: int = VOLUME_SIZE
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap or mount_cap()],
    )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was really observed."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Series:
    """Latencies of one kind of operation, and the external commands they ran."""

    name: str
    seconds: list[float] = field(default_factory=list)
    commands: CommandCounts = field(default_factory=dict)

    def add_commands(self, delta: CommandCounts) -> None:
        for key, value in delta.items():
            self.commands[key] = self.commands.get(key, 0.0) + value

    def summary(self) -> dict[str, Any]:
        n = len(self.seconds)
        if n == 0:
            return {"name": self.name, "count": 0}
        mean = statistics.fmean(self.seconds)
        per_op = {
            f"{program}/{result}": round(total / n, 3)
            for (program, result), total in sorted(self.commands.items())
        }
        return {
            "name": self.name,
            "count": n,
            "median_ms": round(statistics.median(self.seconds) * 1000, 3),
            "p95_ms": round(percentile(self.seconds, 95) * 1000, 3),
            "min_ms": round(min(self.seconds) * 1000, 3),
            "max_ms": round(max(self.seconds) * 1000, 3),
            "ops_per_s": round(1 / mean, 1) if mean > 0 else None,
            "commands_per_op": round(sum(self.commands.values()) / n, 3),
            "commands_by_program_per_op": per_op,
        }


class Bench:
    def __init__(self, driver: DriverProcess, stubs: Stubs, count_commands: bool) -> None:
        self.driver = driver
        self.csi = stubs
        self.count_commands = count_commands

    def timed(self, series: Series, call: Callable[[], object]) -> object:
        """Run one RPC, adding its latency (and the commands it ran) to ``series``."""
        before = self.driver.command_counts() if self.count_commands else {}
        t0 = time.perf_counter()
        result = call()
        series.seconds.append(time.perf_counter() - t0)
        if self.count_commands:
            series.add_commands(diff_counts(self.driver.command_counts(), before))
        return result

    def create(self, name: str, cap: csi_pb2.VolumeCapability | None = None) -> str:
        reply = self.csi.controller.CreateVolume(create_request(name, cap), timeout=RPC_TIMEOUT)
        return str(reply.volume.volume_id)

    def delete(self, volume_id: str) -> None:
        self.csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
        )

    def fill_to(self, total: int, existing: list[str], prefix: str) -> float:
        """Create volumes until ``total`` exist; return the seconds it took."""
        t0 = time.perf_counter()
        while len(existing) < total:
            existing.append(self.create(f"{prefix}-{len(existing):05d}"))
        return time.perf_counter() - t0

    def create_delete(self, label: str, pairs: int) -> tuple[Series, Series]:
        """``pairs`` times: create one volume, delete it. The number of volumes stays put."""
        creates = Series(f"CreateVolume ({label})")
        deletes = Series(f"DeleteVolume ({label})")
        for i in range(pairs):
            name = f"pair-{label}-{i:04d}".replace(" ", "-")
            req = create_request(name)
            reply = self.timed(
                creates, partial(self.csi.controller.CreateVolume, req, timeout=RPC_TIMEOUT)
            )
            assert isinstance(reply, csi_pb2.CreateVolumeResponse)
            dreq = csi_pb2.DeleteVolumeRequest(volume_id=reply.volume.volume_id)
            self.timed(
                deletes, partial(self.csi.controller.DeleteVolume, dreq, timeout=RPC_TIMEOUT)
            )
        return creates, deletes

    def list_all(self, page_size: int, expected: int, rounds: int) -> tuple[Series, int]:
        """Page through every volume ``rounds`` times; check each pass saw ``expected``."""
        series = Series(
            f"ListVolumes, all {expected} in pages of {page_size}"
            if page_size
            else f"ListVolumes, all {expected} in one reply"
        )
        pages = 0
        for _ in range(rounds):
            seen: list[str] = []
            token = ""
            before = self.driver.command_counts() if self.count_commands else {}
            t0 = time.perf_counter()
            pages = 0
            for _page in range(expected + 2):  # bounded: one more page than could exist
                reply = self.csi.controller.ListVolumes(
                    csi_pb2.ListVolumesRequest(max_entries=page_size, starting_token=token),
                    timeout=RPC_TIMEOUT,
                )
                pages += 1
                seen.extend(e.volume.volume_id for e in reply.entries)
                token = reply.next_token
                if not token:
                    break
            series.seconds.append(time.perf_counter() - t0)
            if self.count_commands:
                series.add_commands(diff_counts(self.driver.command_counts(), before))
            if len(seen) != expected or len(set(seen)) != expected:
                raise RuntimeError(
                    f"ListVolumes paging returned {len(seen)} entries ({len(set(seen))} distinct),"
                    f" expected {expected}"
                )
        return series, pages

    def node_cycle(self, cycles: int, block: bool, workdir: Path) -> list[Series]:
        """Stage, publish, unpublish, unstage one volume ``cycles`` times."""
        kind = "block" if block else "mount"
        cap = block_cap() if block else mount_cap()
        volume_id = self.create(f"node-cycle-{kind}", cap)
        stage = Series(f"NodeStageVolume ({kind})")
        publish = Series(f"NodePublishVolume ({kind})")
        unpublish = Series(f"NodeUnpublishVolume ({kind})")
        unstage = Series(f"NodeUnstageVolume ({kind})")
        whole = Series(f"node cycle, 4 RPCs ({kind})")
        staging = workdir / "kubelet" / "staging" / kind
        staging.mkdir(parents=True, exist_ok=True)
        pod = workdir / "kubelet" / "pods" / kind
        pod.mkdir(parents=True, exist_ok=True)
        target = pod / "volume"
        node = self.csi.node
        try:
            for _ in range(cycles):
                self.timed(
                    stage,
                    lambda: node.NodeStageVolume(
                        csi_pb2.NodeStageVolumeRequest(
                            volume_id=volume_id,
                            staging_target_path=str(staging),
                            volume_capability=cap,
                        ),
                        timeout=RPC_TIMEOUT,
                    ),
                )
                self.timed(
                    publish,
                    lambda: node.NodePublishVolume(
                        csi_pb2.NodePublishVolumeRequest(
                            volume_id=volume_id,
                            staging_target_path=str(staging),
                            target_path=str(target),
                            volume_capability=cap,
                        ),
                        timeout=RPC_TIMEOUT,
                    ),
                )
                self.timed(
                    unpublish,
                    lambda: node.NodeUnpublishVolume(
                        csi_pb2.NodeUnpublishVolumeRequest(
                            volume_id=volume_id, target_path=str(target)
                        ),
                        timeout=RPC_TIMEOUT,
                    ),
                )
                self.timed(
                    unstage,
                    lambda: node.NodeUnstageVolume(
                        csi_pb2.NodeUnstageVolumeRequest(
                            volume_id=volume_id, staging_target_path=str(staging)
                        ),
                        timeout=RPC_TIMEOUT,
                    ),
                )
                # The loop's wall time includes the metric scrapes; the cycle is the sum of
                # the four RPCs, which is what a pod start and stop costs the node plugin.
                whole.seconds.append(
                    stage.seconds[-1]
                    + publish.seconds[-1]
                    + unpublish.seconds[-1]
                    + unstage.seconds[-1]
                )
            for s in (stage, publish, unpublish, unstage):
                whole.add_commands(s.commands)
        finally:
            # Best effort: leave nothing mounted even when a cycle failed half-way.
            for call in (
                lambda: node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(
                        volume_id=volume_id, target_path=str(target)
                    ),
                    timeout=RPC_TIMEOUT,
                ),
                lambda: node.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=volume_id, staging_target_path=str(staging)
                    ),
                    timeout=RPC_TIMEOUT,
                ),
                lambda: self.delete(volume_id),
            ):
                try:
                    call()
                except grpc.RpcError as exc:
                    print(f"cleanup: {exc.code().name} {exc.details()}", file=sys.stderr)
        return [stage, publish, unpublish, unstage, whole]


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("operation", "n", "median ms", "p95 ms", "ops/s", "cmds/op")
    lines: list[Sequence[str]] = [head]
    for r in rows:
        if not r.get("count"):
            continue
        lines.append(
            (
                r["name"],
                str(r["count"]),
                f"{r['median_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                f"{r['ops_per_s']:.1f}",
                f"{r['commands_per_op']:g}",
            )
        )
    return render_table(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rpc_latency",
        description="CSI RPC latency of a real hostpath driver process over its unix socket.",
    )
    p.add_argument("--pairs", type=int, default=200, help="create+delete pairs per volume count")
    p.add_argument("--large", type=int, default=1000, help="the large number of existing volumes")
    p.add_argument("--small", type=int, default=10, help="the small number of existing volumes")
    p.add_argument("--list-rounds", type=int, default=5, help="full ListVolumes pagings")
    p.add_argument("--page-size", type=int, default=100, help="ListVolumes max_entries")
    p.add_argument("--node-cycles", type=int, default=50, help="node cycles (needs root)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results file (default benchmarks/results/<date>.json; '-' for none)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    for name in ("pairs", "large", "small", "list_rounds", "page_size", "node_cycles"):
        if getattr(args, name) < 0 or getattr(args, name) > 100_000:
            p.error(f"--{name.replace('_', '-')} must be between 0 and 100000")
    if args.small > args.large:
        p.error("--small must not exceed --large")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="csi-bench-", dir="/tmp"))
    driver = DriverProcess(workdir)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "driver_version": __version__,
        "backend": "hostpath",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "kernel": platform.release(),
            "python": platform.python_version(),
            "root_filesystem_of_tmp": _fs_type("/tmp"),
        },
        "parameters": {
            "pairs": args.pairs,
            "small": args.small,
            "large": args.large,
            "list_rounds": args.list_rounds,
            "page_size": args.page_size,
            "node_cycles": args.node_cycles,
            "volume_size_bytes": VOLUME_SIZE,
        },
        "series": [],
    }
    series: list[Series] = []
    t_all = time.perf_counter()
    leaks: list[str] = []
    try:
        driver.start()
        with driver.stubs() as stubs:
            bench = Bench(driver, stubs, count_commands=True)
            existing: list[str] = []
            # Unmeasured: the first calls of a fresh process pay for imports and caches.
            bench.create_delete("warm-up", WARM_UP_PAIRS)
            bench.fill_to(args.small, existing, "fill")
            print(
                f"[bench] {args.small} volumes exist; {args.pairs} create+delete pairs", flush=True
            )
            series += bench.create_delete(f"{args.small} existing", args.pairs)

            print(f"[bench] filling to {args.large} volumes", flush=True)
            fill_seconds = bench.fill_to(args.large, existing, "fill")
            filled = args.large - args.small
            results["fill"] = {
                "volumes": filled,
                "seconds": round(fill_seconds, 3),
                "ops_per_s": round(filled / fill_seconds, 1) if fill_seconds > 0 else None,
            }
            print(
                f"[bench] {args.large} volumes exist; {args.pairs} create+delete pairs", flush=True
            )
            series += bench.create_delete(f"{args.large} existing", args.pairs)

            if args.list_rounds:
                print(f"[bench] ListVolumes over {args.large} volumes", flush=True)
                paged, pages = bench.list_all(args.page_size, args.large, args.list_rounds)
                results["list_pages"] = pages
                whole, _ = bench.list_all(0, args.large, args.list_rounds)
                series += [paged, whole]

            if args.node_cycles:
                if os.geteuid() != 0:
                    results["node_cycle"] = "not measured: needs root (real bind mounts)"
                    print("[bench] node cycle NOT measured: needs root", file=sys.stderr)
                else:
                    print(f"[bench] {args.node_cycles} node cycles (mount, block)", flush=True)
                    series += bench.node_cycle(args.node_cycles, block=False, workdir=workdir)
                    series += bench.node_cycle(args.node_cycles, block=True, workdir=workdir)

            print(f"[bench] deleting {len(existing)} volumes", flush=True)
            for volume_id in existing:
                bench.delete(volume_id)
        driver.stop()
        if driver.process is not None and driver.process.returncode != 0:
            raise RuntimeError(
                f"driver exited with {driver.process.returncode} on SIGTERM:\n" + driver.log_tail()
            )
    except Exception:
        print("driver log tail:\n" + driver.log_tail(), file=sys.stderr)
        raise
    finally:
        driver.stop()
        leaks = clean_up_host(str(workdir))
        if not args.keep and not leaks:
            shutil.rmtree(workdir, ignore_errors=True)
    if leaks:
        raise RuntimeError(f"left behind under {workdir}: {leaks}")
    results["series"] = [s.summary() for s in series]
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["claims"] = _claims(results["series"], args)
    return results


def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


def _claims(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Median latency with many volumes over the median with few: about 1 if cost is flat."""
    by_name = {r["name"]: r for r in rows}
    out: dict[str, Any] = {}
    for op in ("CreateVolume", "DeleteVolume"):
        small = by_name.get(f"{op} ({args.small} existing)")
        large = by_name.get(f"{op} ({args.large} existing)")
        if small and large and small.get("median_ms"):
            out[f"{op}_median_ratio_{args.large}_vs_{args.small}"] = round(
                large["median_ms"] / small["median_ms"], 2
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print()
    print(table(results["series"]))
    if "fill" in results:
        f = results["fill"]
        print(f"\nfilling {f['volumes']} volumes: {f['seconds']} s ({f['ops_per_s']} creates/s)")
    for key, value in results["claims"].items():
        print(f"{key}: {value}")
    print(f"total {results['total_seconds']} s")
    write_results(results, None if args.out is None else str(args.out), "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
