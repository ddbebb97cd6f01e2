"""Structured fuzzing of every RPC the proto defines, against a driver in its own namespace.

Each request is either one step of a valid life cycle (create, stage, publish, expand,
unpublish, unstage, delete, snapshot) on a few real volumes, or a valid request for one RPC
built from those volumes with one to three of its fields replaced by hostile values: missing
and empty fields, huge and odd strings, traversal and trailing newlines in ids, paths outside
the kubelet directory, below regular files, through symlinked parents (into a decoy
directory outside the work directory), over-long components, bad capacity ranges,
conflicting capabilities, unknown enum values, unknown and huge parameters and secrets.

What must hold, for every request: the driver keeps running; it answers within 5 s; it never
answers INTERNAL or UNKNOWN (nor DEADLINE_EXCEEDED or UNAVAILABLE); messages stay bounded;
nothing changes outside the hostpath root and the paths passed (the decoy, the work directory
around the paths, the namespace's other mounts, mounts of other "plugins" inside the kubelet
directory); and at the end, once the valid volumes are cleaned up through the API, no mount or
loop device is left, the root is empty and its capacity is back. The driver's memory must stay
flat after a warm-up, and its log bounded per request.

``CSI_ADVERSARIAL_SEED`` replays one seed; ``CSI_ADVERSARIAL_FUZZ_REQUESTS`` sets the number
of requests per seed (default 5,500: 11,000 for the two seeds of a normal run).
"""

from __future__ import annotations

import builtins
import collections
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2
from testkit.driver_process import loops_under
from tests.adversarial.conftest import (
    CAPACITY,
    EPHEMERAL_CONTEXT,
    NODE_ID,
    Driver,
    MiB,
    Sandbox,
    cap_for,
    cut,
    describe,
    make_driver,
    report,
    root_entries,
    running,
    seeds,
)
from tests.requests import block_cap, mount_cap

pytestmark = pytest.mark.root

REQUESTS = int(os.environ.get("CSI_ADVERSARIAL_FUZZ_REQUESTS", "5500"))
DEADLINE = 5.0
WARMUP = 1000
RSS_GROWTH_KIB = 20 * 1024
MAX_DETAILS = 4096  # an error message longer than this echoes input unbounded
LOG_BYTES_PER_REQUEST = 8192
NEVER = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
}
#: RPCs where RESOURCE_EXHAUSTED is a real answer (no capacity, the attach limit)
#: how much other work on the machine may move the root filesystem's free space meanwhile
FS_CHURN = 256 << 20


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


CAPACITY_RPCS = {
    "CreateVolume",
    "ControllerExpandVolume",
    "NodeExpandVolume",
    "CreateSnapshot",
    "ControllerPublishVolume",
    "NodePublishVolume",
}
TOPOLOGY_KEY = "topology.nodelocal.csi.dev/node"
MISSING = object()
T = TypeVar("T")
MB = 1 << 20

#: every RPC of the proto: (service, method, request class, server-streaming)
RPCS: list[tuple[str, str, Any, bool]] = [
    (service.name, m.name, getattr(csi_pb2, m.input_type.name), m.server_streaming)
    for service in csi_pb2.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]

#: how a field is fuzzed, by name; other fields by their protobuf type
KINDS = {
    "volume_id": "vid",
    "source_volume_id": "vid",
    "snapshot_id": "sid",
    "base_snapshot_id": "sid",
    "target_snapshot_id": "sid",
    "group_snapshot_id": "sid",
    "source_volume_ids": "vids",
    "snapshot_ids": "sids",
    "name": "name",
    "node_id": "node",
    "staging_target_path": "path",
    "target_path": "path",
    "volume_path": "path",
    "capacity_range": "range",
    "volume_capabilities": "caps",
    "volume_capability": "cap",
    "parameters": "map",
    "mutable_parameters": "map",
    "secrets": "map",
    "publish_context": "map",
    "volume_context": "ctx",
    "volume_content_source": "source",
    "accessibility_requirements": "topo_req",
    "accessible_topology": "topo",
    "max_entries": "int32",
    "max_results": "int32",
    "starting_offset": "int64",
    "starting_token": "token",
    "readonly": "bool",
}

HUGE = "x" * MB
HUGE_UNICODE = "é" * (MB // 2)
ODD_STRINGS = [
    "",
    " ",
    "\n",
    "\x00",
    "a\x00b",
    "..",
    "../..",
    "/",
    "//",
    "/etc/passwd",
    "x" * 255,
    "x" * 256,
    "x" * 4097,
    "\u202eevil",
    "日本語",
    "\U0001f600",
    "\x01\x02\x1b[31m\x7f",
    "a\nb",
    "a\rb",
    "\t",
    "%s%n%x",
    "'; DROP TABLE volumes; --",
    "\\",
    "a b",
    " lead",
    "trail ",
    "-rf",
    "--help",
    "~root",
    "\ufeff",
    "\u0000\u0085\u2028",
]


#: RPCs that must answer NOT_FOUND (or INVALID_ARGUMENT) for an id that is not the canonical
#: id of an existing volume or snapshot: an alias ("<id>\\n", upper case...) answering OK
#: would sidestep the per-volume lock and the stored ids
ALIAS_RPCS = {
    "ControllerGetVolume",
    "ControllerPublishVolume",
    "ValidateVolumeCapabilities",
    "ControllerExpandVolume",
    "ControllerModifyVolume",
    "CreateSnapshot",
    "NodeStageVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodePublishVolume",
}
ID_FIELDS = ("volume_id", "source_volume_id", "snapshot_id")


def alias_of(value: str, canonical: set[str]) -> bool:
    """True when ``value`` is not a canonical id but one normalises to it."""
    if value in canonical:
        return False
    squeezed = value.strip().strip("\x00").lower().replace("@@", "@")
    return squeezed in {c.lower() for c in canonical}


def hostile_string(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.01:
        return HUGE
    if r < 0.02:
        return HUGE_UNICODE
    if r < 0.05:
        return "y" * rng.choice([17 * 1024, 64 * 1024, 200 * 1024])
    return rng.choice(ODD_STRINGS)


# --- the work directory ---------------------------------------------------------------------------


@dataclass
class Layout:
    """The kubelet directory's contents: where valid paths go, the traps, the protected things."""

    w: Path  # the work directory, the driver's --kubelet-dir
    decoy: Path

    @property
    def k(self) -> Path:
        return self.w / "k"

    #: the subtrees of k/ where the fuzzer passes paths the driver may use
    USABLE = ("pods", "plugins", "scratch", "odd")

    def staging(self, local: str) -> str:
        return str(self.k / "plugins" / "staging" / local / "globalmount")

    def target(self, local: str, pod: int, block: bool) -> str:
        kind = "volumeDevices" if block else "volumes"
        return str(self.k / "pods" / f"pod{pod}" / kind / local / ("dev" if block else "mount"))

    def build(self, box: Sandbox) -> None:
        k = self.k
        for sub in (*self.USABLE, "protected/emptydir", "protected/fulldir", "protected/tmpfs"):
            (k / sub).mkdir(parents=True, exist_ok=True)
        (k / "protected" / "bind").mkdir()
        (k / "protected" / "emptyfile").write_bytes(b"")
        (k / "protected" / "datafile").write_bytes(b"data")
        (k / "protected" / "fulldir" / "x").write_bytes(b"x")
        (k / "file").write_bytes(b"a regular file")
        (k / "emptyfile").write_bytes(b"")
        sentinel = self.w / "sentinel"
        (sentinel / "src").mkdir(parents=True)
        (sentinel / "src" / "marker").write_bytes(b"bind source")
        # the decoy, outside the kubelet directory: symlinks inside lead there
        (self.decoy / "emptydir").mkdir()
        (self.decoy / "sub").mkdir()
        (self.decoy / "sub" / "file").write_bytes(b"decoy")
        (self.decoy / "emptyfile").write_bytes(b"")
        (self.decoy / "datafile").write_bytes(b"decoy data")
        os.symlink(self.decoy, k / "lnk")
        os.symlink(self.decoy / "sub", k / "lnkdeep")
        os.symlink(self.decoy / "emptyfile", k / "lnkfile")
        os.symlink(self.decoy / "emptydir", k / "lnkempty")
        os.symlink(os.path.relpath(self.decoy, k), k / "lnkrel")
        os.symlink("/", k / "lnkroot")
        os.symlink(self.decoy, k / "pods" / "lnkpod")
        os.symlink(self.decoy / "emptydir", k / "plugins" / "lnkstage")
        # another plugin's mounts inside the kubelet directory, in the driver's namespace
        box.ns_run(
            "mount", "-t", "tmpfs", "-o", "size=1m", "adv-foreign", str(k / "protected/tmpfs")
        )
        box.ns_run("touch", str(k / "protected/tmpfs/marker"))
        box.ns_run("mount", "--bind", str(sentinel / "src"), str(k / "protected/bind"))

    def protected(self) -> list[str]:
        p = self.k / "protected"
        return [
            str(p / n) for n in ("emptydir", "emptyfile", "datafile", "fulldir", "tmpfs", "bind")
        ] + [str(p), str(self.k)]

    def hostile_paths(self) -> list[str]:
        w, k = str(self.w), str(self.k)
        return [
            "",
            "relative",
            "rel/a",
            "./x",
            ".",
            "..",
            "/",
            "/etc",
            "/proc",
            "/proc/self/root",
            "/root",
            "/root/.csi-adv-never",
            "/etc/csi-adv-never",
            "/sys/kernel",
            "/dev/null",
            "/tmp",
            "/var/lib/kubelet/pods/x",
            w,
            w + "/",
            w + "/..",
            w + "/../etc",
            k + "/../../etc",
            k + "/./x",
            w + "//k/x",
            "/" + w,
            k + "/pods/x/",
            k + "/pods/x/.",
            k + "/pods/x/..",
            k + "/file/x",
            k + "/emptyfile/x/y",
            k + "/file",
            k + "/lnk/x",
            k + "/lnk/emptydir",
            k + "/lnk/emptyfile",
            k + "/lnk/sub/file",
            k + "/lnk",
            k + "/lnkempty",
            k + "/lnkfile",
            k + "/lnkdeep/new",
            k + "/lnkrel/x",
            k + "/lnkroot/etc",
            k + "/lnkroot/etc/csi-adv-never",
            k + "/pods/lnkpod/mount",
            k + "/pods/lnkpod/emptydir",
            k + "/plugins/lnkstage",
            k + "/plugins/lnkstage/globalmount",
            k + "/scratch/" + "a" * 256,
            k + "/scratch/" + "é" * 128,
            k + "/scratch/" + ("b" * 200 + "/") * 25 + "c",
            k + "/scratch/a\x00b",
        ]

    def odd_paths(self) -> list[str]:
        """Valid paths whose names challenge the mount table's escaping."""
        o = str(self.k / "odd")
        return [
            o + "/a b",
            o + "/a\tb",
            o + "/a\nb",
            o + "/a\\040b",
            o + "/ünï😀",
            o + "/x\x01y",
            o + "/-rf",
            o + "/ ",
            o + "/" + "a" * 255,
        ]

    def usable(self, path: str) -> bool:
        """A path the driver may create, mount or remove: lexically clean, below one of the
        usable subtrees, through no symlink."""
        if "\x00" in path or os.path.normpath(path) != path or path.startswith("//"):
            return False
        prefix = str(self.k) + "/"
        if not path.startswith(prefix):
            return False
        parts = path[len(prefix) :].split("/")
        if parts[0] not in self.USABLE or len(parts) < 2:
            return False
        return not any(p.startswith("lnk") or len(p.encode()) > 255 for p in parts)


# --- the world: a few real volumes with a valid life cycle -------------------------------------


@dataclass
class Vol:
    name: str
    block: bool
    vid: str = ""
    exists: bool = False
    staged: bool = False
    targets: dict[str, bool] = field(default_factory=dict)  # path -> read-only

    @property
    def local(self) -> str:
        return ids.volume_id_for(self.name, NODE_ID).partition("@")[0]


@dataclass
class World:
    layout: Layout
    rng: random.Random
    vols: list[Vol] = field(default_factory=list)
    snapshots: dict[str, str] = field(default_factory=dict)  # name -> id
    #: what succeeded, for the cleanup: (volume or kubelet id, path)
    staged_ok: list[tuple[str, str, str]] = field(default_factory=list)
    published_ok: list[tuple[str, str, str]] = field(default_factory=list)
    #: paths the driver may legitimately create, change or remove
    passed: set[str] = field(default_factory=set)
    live_ephemeral: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.vols = [Vol(f"w-mount-{i}", False) for i in range(3)] + [
            Vol(f"w-block-{i}", True) for i in range(2)
        ]
        for v in self.vols:
            v.vid = ids.volume_id_for(v.name, NODE_ID)

    def vol(self) -> Vol:
        return self.rng.choice(self.vols)

    def vid(self) -> str:
        return self.vol().vid

    def live_ids(self) -> set[str]:
        """Ids that may name an existing volume (the world's, whatever the model says)."""
        return {v.vid for v in self.vols} | self.created | self.live_ephemeral

    def sid(self) -> str:
        if self.snapshots and self.rng.random() < 0.8:
            return self.rng.choice(list(self.snapshots.values()))
        return ids.snapshot_id_for("never-made", NODE_ID)

    def target_for(self, v: Vol) -> str:
        return self.layout.target(v.local, self.rng.randrange(3), v.block)


# --- hostile values, by kind ----------------------------------------------------------------------


class Values:
    """Hostile (and some valid) values for each kind of field."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world, self.rng, self.layout = world, rng, world.layout
        self.hostile_paths = self.layout.hostile_paths()
        self.odd_paths = self.layout.odd_paths()
        self.protected = self.layout.protected()

    def choice(self, items: Sequence[T]) -> T:
        return self.rng.choice(items)

    def vid(self) -> str:
        rng, v = self.rng, self.world.vid()
        local = v.partition("@")[0]
        options: list[Callable[[], str]] = [
            lambda: v + "\n",
            lambda: "\n" + v,
            lambda: v + "\x00",
            lambda: v + " ",
            lambda: v.upper(),
            lambda: v.replace("@", "@@"),
            lambda: v + "/..",
            lambda: "../" + v,
            lambda: local,
            lambda: local + "@",
            lambda: local + "@other-node",
            lambda: local + "@" + NODE_ID + "\n",
            lambda: local + "@" + NODE_ID + "/../x",
            lambda: ids.volume_id_for(f"unknown-{rng.randrange(4)}", NODE_ID),
            lambda: "s" + local[1:] + "@" + NODE_ID,
            lambda: "v" + "g" * 32 + "@" + NODE_ID,
            lambda: "v" + "0" * 31 + "@" + NODE_ID,
            lambda: "v" + "0" * 33 + "@" + NODE_ID,
            lambda: v + "@x",
            lambda: "csi-" + "ab" * 16,
            lambda: "pvc-" + local,
            lambda: hostile_string(rng),
            lambda: self.world.sid(),
        ]
        return rng.choice(options)()

    def sid(self) -> str:
        rng = self.rng
        s = self.world.sid()
        local = s.partition("@")[0]
        options: list[Callable[[], str]] = [
            lambda: s + "\n",
            lambda: s + "\x00",
            lambda: s.upper(),
            lambda: local,
            lambda: local + "@other-node",
            lambda: "../" + s,
            lambda: self.world.vid(),
            lambda: ids.snapshot_id_for(f"unknown-{rng.randrange(4)}", NODE_ID),
            lambda: hostile_string(rng),
        ]
        return rng.choice(options)()

    def vids(self) -> list[str]:
        return [self.vid() for _ in range(self.rng.choice([0, 1, 2, 50]))]

    def sids(self) -> list[str]:
        return [self.sid() for _ in range(self.rng.choice([0, 1, 3]))]

    def name(self) -> str:
        return self.choice(
            [
                "fz-a",
                "fz-b",
                "fz-c",
                "w-mount-0",
                "w-block-0",
                "",
                "\x00",
                "a/b",
                "../../etc",
                "x" * 300,
                "x" * (128 * 1024 + 1),
                "名前",
                "emoji😀",
                "a\nb",
                "trailing\n",
                " ",
                HUGE,
            ]
        )

    def node(self) -> str:
        return self.choice(
            [NODE_ID, NODE_ID + "\n", "other-node", "", "../" + NODE_ID, hostile_string(self.rng)]
        )

    def path(self) -> str:
        r = self.rng.random()
        w = self.world
        if r < 0.45:
            return self.choice(self.hostile_paths)
        if r < 0.55:
            return self.choice(self.protected)
        if r < 0.65:
            return self.choice(self.odd_paths)
        if r < 0.8:
            v = w.vol()
            return self.choice([w.layout.staging(v.local), w.target_for(v)])
        return str(w.layout.k / "scratch" / str(self.rng.randrange(40)) / "mount")

    def int32(self) -> int:
        return int(self.choice([0, 1, -1, 3, 2**31 - 1, -(2**31)]))

    def int64(self) -> int:
        return int(self.choice([0, -1, 1, 2**63 - 1, -(2**63)]))

    def bool(self) -> bool:
        return self.rng.random() < 0.5

    def token(self) -> str:
        return self.choice(
            ["", "0", "-1", "abc", "99999999999999999999", self.world.vid(), "v", "s", self.str()]
        )

    # the kind ``str`` (``for_kind`` looks kinds up by name): in the signatures below this
    # method shadows the builtin, hence ``builtins.str`` there
    def str(self) -> str:
        return hostile_string(self.rng)

    def range(self) -> Any:
        sizes = [0, 1, -1, 4096, MiB, 16 * MiB, 1 << 30, 1 << 40, 1 << 62, 2**63 - 1, -(2**63)]
        if self.rng.random() < 0.1:
            return MISSING
        return csi_pb2.CapacityRange(
            required_bytes=self.choice(sizes), limit_bytes=self.choice(sizes)
        )

    def cap(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            return MISSING
        if r < 0.1:
            return csi_pb2.VolumeCapability()
        modes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 99, -1, 2**31 - 1]
        cap = csi_pb2.VolumeCapability()
        if rng.random() < 0.9:
            # numbers the enum does not name too: proto3 enums are open, any int32 is sent
            cap.access_mode.mode = cast(csi_pb2.VolumeCapability.AccessMode.Mode, rng.choice(modes))
        kind = rng.random()
        if kind < 0.6:
            cap.mount.fs_type = rng.choice(
                [
                    "",
                    "",
                    "ext4",
                    "xfs",
                    "btrfs",
                    "nfs",
                    "tmpfs",
                    "proc",
                    "../x",
                    "ext4,ro",
                    "ext4\x00",
                    hostile_string(rng),
                ]
            )
            cap.mount.mount_flags.extend(
                rng.choice(
                    [
                        [],
                        ["ro"],
                        ["noexec", "nosuid"],
                        ["bind"],
                        ["remount"],
                        ["rbind"],
                        ["move"],
                        ["shared"],
                        ["size=1"],
                        ["uid=0"],
                        [""],
                        ["x" * 5000],
                        ["nodev", "ro"],
                        ["a,b"],
                        ["\n"],
                        ["loop"],
                        ["dirsync", "noatime"],
                        ["nosuid"] * 100,
                        [hostile_string(rng)],
                    ]
                )
            )
            if rng.random() < 0.1:
                cap.mount.volume_mount_group = rng.choice(["0", "root", hostile_string(rng)])
        elif kind < 0.9:
            cap.block.SetInParent()
        return cap

    def caps(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            return []
        if r < 0.3:
            return [mount_cap(), block_cap()]  # conflicting
        if r < 0.35:
            return [mount_cap()] * 200
        cap = self.cap() if rng.random() < 0.7 else cap_for(rng.random() < 0.5)
        return [] if cap is MISSING else [cap]

    def map(self) -> dict[builtins.str, builtins.str]:
        rng = self.rng
        options: list[Callable[[], dict[str, str]]] = [
            lambda: {},
            lambda: {"wipeOnDelete": rng.choice(["true", "false", "TRUE", "yes", "", "1"])},
            lambda: {"unknown": "x"},
            lambda: {"csi.storage.k8s.io/pvc/name": "x", "csi.storage.k8s.io/pv/name": "y"},
            lambda: {"x" * 70000: "v"},
            lambda: {"k": rng.choice([HUGE, "v" * 17 * 1024, "v" * 9000])},
            lambda: {f"k{i}": "v" for i in range(1000)},
            lambda: {"fsType": "ext4", "deviceClass": "x", "lvType": "thin"},
            lambda: {"": ""},
            lambda: {"\x00": "\x00", "a\nb": "c\nd"},
            lambda: {hostile_string(rng): hostile_string(rng)},
        ]
        return rng.choice(options)()

    def ctx(self) -> dict[builtins.str, builtins.str]:
        rng = self.rng
        if rng.random() < 0.6:
            return self.map()
        out = {"csi.storage.k8s.io/ephemeral": rng.choice(["true", "TRUE", "false", "", "yes"])}
        if rng.random() < 0.7:
            out["size"] = rng.choice(
                [
                    "8Mi",
                    "1",
                    "0",
                    "-1",
                    "1e99",
                    "abc",
                    "99999999999999Ei",
                    "16Mi",
                    hostile_string(rng),
                ]
            )
        if rng.random() < 0.3:
            out.update(self.map())
        return out

    def source(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return MISSING
        if r < 0.3:
            return csi_pb2.VolumeContentSource()
        if r < 0.65:
            src = csi_pb2.VolumeContentSource()
            src.snapshot.snapshot_id = self.sid() if rng.random() < 0.6 else self.world.sid()
            return src
        src = csi_pb2.VolumeContentSource()
        src.volume.volume_id = self.vid() if rng.random() < 0.6 else self.world.vid()
        return src

    def topology(self) -> csi_pb2.Topology:
        key = self.choice([TOPOLOGY_KEY, "other/key", "", hostile_string(self.rng)])
        return csi_pb2.Topology(segments={key: self.node()})

    def topo(self) -> Any:
        return MISSING if self.rng.random() < 0.2 else self.topology()

    def topo_req(self) -> Any:
        rng = self.rng
        n = rng.choice([0, 1, 2, 100])
        return csi_pb2.TopologyRequirement(
            requisite=[self.topology() for _ in range(n)],
            preferred=[self.topology() for _ in range(rng.choice([0, 1]))],
        )

    def for_kind(self, kind: builtins.str) -> Any:
        return getattr(self, kind)()


def kind_of(desc: Any) -> str:
    if desc.name in KINDS:
        return KINDS[desc.name]
    if desc.type == desc.TYPE_STRING:
        return "str"
    if desc.type == desc.TYPE_BOOL:
        return "bool"
    if desc.type in (desc.TYPE_INT64, desc.TYPE_UINT64):
        return "int64"
    return "int32"


# --- valid requests -------------------------------------------------------------------------------


class Builder:
    """A valid request for each RPC, built from the world (the base the mutations start from)."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world, self.rng = world, rng

    def fields(self, method: str) -> dict[str, Any]:
        w, rng = self.world, self.rng
        v = w.vol()
        cap = cap_for(v.block)
        staging = w.layout.staging(v.local)
        target = next(iter(v.targets), None) or w.target_for(v)
        size = rng.choice([16, 32, 64]) * MiB
        base: dict[str, dict[str, Any]] = {
            "CreateVolume": {
                "name": v.name,
                "capacity_range": csi_pb2.CapacityRange(required_bytes=16 * MiB),
                "volume_capabilities": [cap],
            },
            "DeleteVolume": {"volume_id": v.vid},
            "ControllerPublishVolume": {
                "volume_id": v.vid,
                "node_id": NODE_ID,
                "volume_capability": cap,
            },
            "ControllerUnpublishVolume": {"volume_id": v.vid, "node_id": NODE_ID},
            "ValidateVolumeCapabilities": {"volume_id": v.vid, "volume_capabilities": [cap]},
            "ListVolumes": {"max_entries": rng.choice([0, 2])},
            "GetCapacity": {"volume_capabilities": [cap]},
            "CreateSnapshot": {"name": f"sn-{rng.randrange(3)}", "source_volume_id": v.vid},
            "DeleteSnapshot": {"snapshot_id": w.sid()},
            "ListSnapshots": {"max_entries": rng.choice([0, 1])},
            "GetSnapshot": {"snapshot_id": w.sid()},
            "ControllerExpandVolume": {
                "volume_id": v.vid,
                "capacity_range": csi_pb2.CapacityRange(required_bytes=size),
            },
            "ControllerGetVolume": {"volume_id": v.vid},
            "ControllerModifyVolume": {
                "volume_id": v.vid,
                "mutable_parameters": {"wipeOnDelete": rng.choice(["true", "false"])},
            },
            "NodeStageVolume": {
                "volume_id": v.vid,
                "staging_target_path": staging,
                "volume_capability": cap,
            },
            "NodeUnstageVolume": {"volume_id": v.vid, "staging_target_path": staging},
            "NodePublishVolume": {
                "volume_id": v.vid,
                "staging_target_path": staging,
                "target_path": target,
                "volume_capability": cap,
                "readonly": rng.random() < 0.3,
            },
            "NodeUnpublishVolume": {"volume_id": v.vid, "target_path": target},
            "NodeGetVolumeStats": {"volume_id": v.vid, "volume_path": target},
            "NodeExpandVolume": {
                "volume_id": v.vid,
                "volume_path": target,
                "staging_target_path": staging,
                "capacity_range": csi_pb2.CapacityRange(required_bytes=size),
            },
            "CreateVolumeGroupSnapshot": {"name": "group", "source_volume_ids": [v.vid]},
            "DeleteVolumeGroupSnapshot": {"group_snapshot_id": w.sid()},
            "GetVolumeGroupSnapshot": {"group_snapshot_id": w.sid()},
            "GetMetadataAllocated": {"snapshot_id": w.sid(), "max_results": 10},
            "GetMetadataDelta": {
                "base_snapshot_id": w.sid(),
                "target_snapshot_id": w.sid(),
                "max_results": 10,
            },
        }
        out = dict(base.get(method, {}))
        if method == "NodePublishVolume" and rng.random() < 0.15:
            # an inline ephemeral volume, named by the "kubelet"
            out = {
                "volume_id": f"csi-eph-{rng.randrange(3)}",
                "target_path": w.layout.target(f"eph{rng.randrange(3)}", 9, False),
                "volume_capability": mount_cap(),
                "volume_context": dict(EPHEMERAL_CONTEXT),
            }
        return out


def build(cls: Any, fields: dict[str, Any]) -> Any:
    req = cls()
    for name, value in fields.items():
        if value is MISSING:
            continue
        desc = cls.DESCRIPTOR.fields_by_name[name]
        if desc.message_type is not None and desc.message_type.GetOptions().map_entry:
            getattr(req, name).update(value)
        elif desc.is_repeated:
            getattr(req, name).extend(value)
        elif desc.message_type is not None:
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    return req


def is_ephemeral(request: Any) -> bool:
    flag = request.volume_context.get("csi.storage.k8s.io/ephemeral", "")
    return bool(flag.lower() == "true")


#: the field naming the path a successful node call mounts onto
MOUNTED_FIELD = {"NodePublishVolume": "target_path", "NodeStageVolume": "staging_target_path"}


def paths_in(fields: dict[str, Any]) -> list[str]:
    return [
        fields[f]
        for f in ("staging_target_path", "target_path", "volume_path")
        if isinstance(fields.get(f), str)
    ]


# --- the state outside the paths ------------------------------------------------------------------

Entry = tuple[str, int, int, int, str]  # kind, mode, size, mtime_ns, link target


def tree(top: Path, skip: Iterable[str] = ()) -> dict[str, Entry]:
    """Every entry below ``top`` (symlinks not followed), keyed by path relative to it."""
    out: dict[str, Entry] = {}
    skipped = set(skip)

    def visit(rel: str) -> None:
        path = top / rel if rel else top
        try:
            st = os.lstat(path)
        except OSError:
            return
        kind = (
            "dir"
            if stat.S_ISDIR(st.st_mode)
            else "link"
            if stat.S_ISLNK(st.st_mode)
            else "file"
            if stat.S_ISREG(st.st_mode)
            else "other"
        )
        link = os.readlink(path) if kind == "link" else ""
        size = st.st_size if kind != "dir" else 0
        out[rel] = (kind, stat.S_IMODE(st.st_mode), size, st.st_mtime_ns, link)
        if kind == "dir":
            try:
                names = os.listdir(path)
            except OSError:
                return
            for name in names:
                child = f"{rel}/{name}" if rel else name
                if child not in skipped:
                    visit(child)

    visit("")
    return out


def ancestors(path: str) -> set[str]:
    out: set[str] = set()
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.add(parent)
        path = parent


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Sent:
    n: int
    method: str
    note: str
    request: Any

    def __str__(self) -> str:
        return f"#{self.n} {self.method} [{self.note}] {describe(self.request)}"


@dataclass
class Fuzzer:
    seed: int
    box: Sandbox
    driver: Driver
    layout: Layout
    rng: random.Random = field(init=False)
    world: World = field(init=False)
    values: Values = field(init=False)
    builder: Builder = field(init=False)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: list[str] = field(default_factory=list)
    n: int = 0
    outside_mounts: list[tuple[str, str]] = field(default_factory=list)
    decoy_before: dict[str, Entry] = field(default_factory=dict)
    rss_warm: int = 0
    rss: list[int] = field(default_factory=list)  # KiB, every WARMUP requests
    cleanup_answers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.world = World(self.layout, random.Random(self.seed + 1))
        self.values = Values(self.world, self.rng)
        self.builder = Builder(self.world, self.rng)
        self.stubs = {s: self.driver.stub(s) for s, _, _, _ in RPCS}
        self.protected = set(self.layout.protected())
        self.empties = {str(self.layout.k / "protected" / n) for n in ("emptydir", "emptyfile")}
        #: directories with other mounts below them: a mount over one hides them all
        self.holders = {str(self.layout.k), str(self.layout.k / "protected")}
        self.reply: Any = None

    # --- sending ---

    def fail(self, what: str, sent: Sent | None) -> None:
        where = f" on {sent}" if sent else ""
        self.failures.append(f"seed {self.seed}: {what}{where}")

    def call(self, method: str, fields: dict[str, Any], note: str) -> tuple[str, str]:
        """Send one request; (code name, details). Every check of a single answer is here."""
        service, _, cls, streaming = next(r for r in RPCS if r[1] == method)
        req = build(cls, fields)
        self.n += 1
        sent = Sent(self.n, method, note, req)
        self.sent[method] += 1
        t0 = time.monotonic()
        code, details = "OK", ""
        try:
            rpc = getattr(self.stubs[service], method)
            reply = self.reply = rpc(req, timeout=DEADLINE)
            if streaming:
                for _ in reply:
                    pass
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        took = time.monotonic() - t0
        self.codes[method][code] += 1
        if getattr(grpc.StatusCode, code) in NEVER:
            self.fail(f"{code} ({cut(details, 300)}) after {took:.2f} s", sent)
        elif (
            code == "RESOURCE_EXHAUSTED"
            and method not in CAPACITY_RPCS
            and req.ByteSize() < (4 << 20)
        ):
            self.fail(f"RESOURCE_EXHAUSTED ({cut(details, 300)})", sent)
        if len(details.encode()) > MAX_DETAILS:
            self.fail(f"{code} with a {len(details)}-character message (unbounded echo)", sent)
        if not self.driver.alive:
            self.fail(f"the driver died (exit {self.driver.process.returncode})", sent)  # type: ignore[union-attr]
            raise Crashed(str(sent))
        inline = method == "NodePublishVolume" and is_ephemeral(req)
        if code == "OK" and method in ALIAS_RPCS and not inline:
            canonical = self.world.live_ids() | set(self.world.snapshots.values())
            for f in ID_FIELDS:
                value = fields.get(f)
                if (
                    isinstance(value, str)
                    and value not in self.world.live_ephemeral
                    and alias_of(value, canonical)
                ):
                    self.fail(f"OK for {f}={value!r}, an alias of an existing id", sent)
        self.after(sent, fields, code)
        return code, details

    def after(self, sent: Sent, fields: dict[str, Any], code: str) -> None:
        """Checks that need the state around a node request, and what the cleanup must undo."""
        method = sent.method
        paths = paths_in(fields)
        vid = fields.get("volume_id")
        ephemeral = method == "NodePublishVolume" and is_ephemeral(sent.request)
        live = vid in self.world.live_ids()
        for p in paths:
            if ephemeral and p != fields.get("target_path"):
                continue  # an inline volume is staged in the driver's own directory
            if self.layout.usable(p):
                self.world.passed.add(p)
            elif (
                p in self.protected
                and p not in self.holders
                and (live or ephemeral)
                and (method in ("NodePublishVolume", "NodeStageVolume") or p in self.empties)
            ):
                # A live volume's id with a path the kubelet could have made: the driver may
                # mount onto it, or remove it when it is an empty file or directory.
                self.world.passed.add(p)
        # the one path a node call mounts onto: a publish's source (its staging path, or
        # nothing for an inline volume) is only read
        onto = MOUNTED_FIELD.get(method)
        if code == "OK" and onto and fields.get(onto) in self.holders:
            self.fail(f"mounted over {fields[onto]}, a directory with other mounts below it", sent)
            self.undo(sent, fields)
        if code == "OK" and method == "CreateVolume":
            self.world.created.add(self.reply.volume.volume_id)
        if code == "OK" and method == "NodeStageVolume":
            self.world.staged_ok.append(
                (fields["volume_id"], fields["staging_target_path"], str(sent))
            )
        if code == "OK" and method == "NodePublishVolume":
            self.world.published_ok.append((fields["volume_id"], fields["target_path"], str(sent)))
            if ephemeral:
                self.world.live_ephemeral.add(fields["volume_id"])
        if method.startswith("Node") and paths and sent.note != "undo":
            outside = self.mounts_outside()
            # a path passed since the last look is the driver's business now
            self.outside_mounts = [m for m in self.outside_mounts if m[0] not in self.world.passed]
            if outside != self.outside_mounts:
                gone = sorted(set(self.outside_mounts) - set(outside))
                new = sorted(set(outside) - set(self.outside_mounts))
                # The kernel detaches a mount in every namespace when its mount point is
                # removed in another one: other software on the host removing its own
                # directories outside the sandbox is not the driver's doing.
                gone = [
                    g
                    for g in gone
                    if g[0].startswith(str(self.box.workdir)) or os.path.lexists(g[0])
                ]
                if gone or new:
                    self.fail(f"mounts outside the paths changed: gone {gone}, new {new}", sent)
                self.outside_mounts = outside
            if any(
                "lnk" in p or (p.startswith("/") and not p.startswith(str(self.layout.w)))
                for p in paths
            ):
                now = tree(self.box.ns.path(self.box.decoy))
                if now != self.decoy_before:
                    self.fail("the decoy directory outside the kubelet directory changed", sent)
                    self.decoy_before = now

    def undo(self, sent: Sent, fields: dict[str, Any]) -> None:
        """Take down a mount that should not have been made, so that the run goes on with
        a sane kubelet directory (what follows would otherwise only repeat the failure)."""
        if sent.method == "NodeStageVolume":
            self.call(
                "NodeUnstageVolume",
                {
                    "volume_id": fields["volume_id"],
                    "staging_target_path": fields["staging_target_path"],
                },
                "undo",
            )
        else:
            self.call(
                "NodeUnpublishVolume",
                {"volume_id": fields["volume_id"], "target_path": fields["target_path"]},
                "undo",
            )
        for path in paths_in(fields):
            for _ in range(5):  # the API could not take it down: the test does
                if path in {m for m, _, _ in self.box.ns.mounts()}:
                    self.box.ns.run(["umount", "-l", path])
        self.outside_mounts = self.mounts_outside()

    def mounts_outside(self) -> list[tuple[str, str]]:
        """The namespace's mounts, but those at or below the usable paths and the driver's
        own ephemeral directory (the driver's business)."""
        out = []
        eph = str(self.layout.w / "ephemeral")
        for m, root, _ in self.box.ns.mounts():
            if (
                self.layout.usable(m)
                or m in self.world.passed
                or m == eph
                or m.startswith(eph + "/")
            ):
                continue
            out.append((m, root))
        return sorted(out)

    # --- the life cycle ---

    def lifecycle(self) -> None:
        """One valid step for one of the world's volumes, chosen by what the model says."""
        w, rng = self.world, self.rng
        v = w.vol()
        cap = cap_for(v.block)
        staging = w.layout.staging(v.local)
        if not v.exists:
            code, _ = self.call(
                "CreateVolume",
                {
                    "name": v.name,
                    "capacity_range": csi_pb2.CapacityRange(required_bytes=16 * MiB),
                    "volume_capabilities": [cap],
                },
                "valid",
            )
            v.exists = v.exists or code in ("OK", "ALREADY_EXISTS")
        elif not v.staged:
            if rng.random() < 0.15:
                code, _ = self.call("DeleteVolume", {"volume_id": v.vid}, "valid")
                v.exists = code != "OK"
            else:
                code, _ = self.call(
                    "NodeStageVolume",
                    {"volume_id": v.vid, "staging_target_path": staging, "volume_capability": cap},
                    "valid",
                )
                v.staged = code == "OK"
        elif not v.targets or (len(v.targets) < 3 and rng.random() < 0.4):
            target = w.target_for(v)
            ro = rng.random() < 0.3 and not v.targets
            code, _ = self.call(
                "NodePublishVolume",
                {
                    "volume_id": v.vid,
                    "staging_target_path": staging,
                    "target_path": target,
                    "volume_capability": cap,
                    "readonly": ro,
                },
                "valid",
            )
            if code == "OK":
                v.targets[target] = ro
            elif not v.targets and code == "FAILED_PRECONDITION":
                v.staged = False  # the model was behind (a hostile request unstaged it)
        else:
            r = rng.random()
            target = rng.choice(list(v.targets))
            if r < 0.2:
                self.call(
                    "NodeExpandVolume",
                    {
                        "volume_id": v.vid,
                        "volume_path": target,
                        "staging_target_path": staging,
                        "capacity_range": csi_pb2.CapacityRange(
                            required_bytes=rng.choice([16, 32, 48]) * MiB
                        ),
                    },
                    "valid",
                )
            elif r < 0.35:
                self.call(
                    "ControllerExpandVolume",
                    {
                        "volume_id": v.vid,
                        "capacity_range": csi_pb2.CapacityRange(
                            required_bytes=rng.choice([16, 32, 48]) * MiB
                        ),
                    },
                    "valid",
                )
            elif r < 0.5:
                self.call(
                    "NodeGetVolumeStats", {"volume_id": v.vid, "volume_path": target}, "valid"
                )
            elif r < 0.6 and not v.block:
                name = f"sn-{rng.randrange(3)}"
                code, _ = self.call(
                    "CreateSnapshot", {"name": name, "source_volume_id": v.vid}, "valid"
                )
                if code == "OK":
                    w.snapshots[name] = ids.snapshot_id_for(name, NODE_ID)
            elif r < 0.8 or len(v.targets) > 1:
                code, _ = self.call(
                    "NodeUnpublishVolume", {"volume_id": v.vid, "target_path": target}, "valid"
                )
                if code == "OK":
                    del v.targets[target]
            else:
                for t in list(v.targets):
                    code, _ = self.call(
                        "NodeUnpublishVolume", {"volume_id": v.vid, "target_path": t}, "valid"
                    )
                    if code == "OK":
                        del v.targets[t]
                code, _ = self.call(
                    "NodeUnstageVolume",
                    {"volume_id": v.vid, "staging_target_path": staging},
                    "valid",
                )
                v.staged = code != "OK"

    def hostile(self) -> None:
        """A valid request for a random RPC with one to three fields made hostile."""
        _, method, cls, _ = self.rng.choice(RPCS)
        fields = self.builder.fields(method)
        descs = list(cls.DESCRIPTOR.fields)
        notes = []
        if descs and self.rng.random() < 0.92:
            for desc in self.rng.sample(descs, min(len(descs), self.rng.choice([1, 1, 2, 3]))):
                kind = kind_of(desc)
                if self.rng.random() < 0.1:
                    fields[desc.name] = MISSING
                    notes.append(f"{desc.name}:missing")
                else:
                    fields[desc.name] = self.values.for_kind(kind)
                    notes.append(f"{desc.name}:{kind}")
        self.call(method, fields, ", ".join(notes) or "unmutated")

    # --- the whole run ---

    def run(self, total: int) -> None:
        self.outside_mounts = self.mounts_outside()
        self.decoy_before = tree(self.box.ns.path(self.box.decoy))
        while self.n < total:
            if self.rng.random() < 0.2:
                self.lifecycle()
            else:
                self.hostile()
            if self.n >= WARMUP * (len(self.rss) + 1):
                self.rss.append(self.driver.rss_kib())
                self.rss_warm = self.rss_warm or self.rss[0]

    def clean_up(self) -> None:
        """Undo every publish and stage that succeeded, then unpublish (controller side) and
        delete every volume and snapshot the driver lists. What does not go shows in the
        leak checks that follow, with the requests that made it."""
        w = self.world
        for vid, path, _ in reversed(w.published_ok):
            answer = self.call(
                "NodeUnpublishVolume", {"volume_id": vid, "target_path": path}, "cleanup"
            )
            self.cleanup_answers[path] = f"NodeUnpublishVolume: {answer[0]} {cut(answer[1], 300)}"
        for vid, path, _ in reversed(w.staged_ok):
            answer = self.call(
                "NodeUnstageVolume", {"volume_id": vid, "staging_target_path": path}, "cleanup"
            )
            self.cleanup_answers[path] = f"NodeUnstageVolume: {answer[0]} {cut(answer[1], 300)}"
        ctl = self.driver.stub("Controller")
        for s in ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30).entries:
            self.call("DeleteSnapshot", {"snapshot_id": s.snapshot.snapshot_id}, "cleanup")
        for e in ctl.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries:
            vid = e.volume.volume_id
            self.call(
                "ControllerUnpublishVolume", {"volume_id": vid, "node_id": NODE_ID}, "cleanup"
            )
            code, details = self.call("DeleteVolume", {"volume_id": vid}, "cleanup")
            if code != "OK":
                self.fail(f"cleanup: DeleteVolume({vid}) {code} {cut(details, 300)}", None)

    def made(self, path: str) -> list[str]:
        """The successful requests that mounted something at ``path``."""
        w = self.world
        return [sent for _, p, sent in w.published_ok + w.staged_ok if p == path]


class Crashed(Exception):
    pass


def check_outside(fuzz: Fuzzer, before: dict[str, Entry], after: dict[str, Entry]) -> None:
    """Nothing in the work directory changed but the paths passed and what leads to them."""
    w = str(fuzz.layout.w)
    passed = {os.path.relpath(p, w) for p in fuzz.world.passed}
    leading = set()
    for p in passed:
        leading |= {a for a in ancestors(p) if a not in ("", ".")}
    leading.add("")
    problems = []
    for rel in sorted(set(before) | set(after)):
        b, a = before.get(rel), after.get(rel)
        if a == b:
            continue
        if any(rel == p or rel.startswith(p + "/") for p in passed):
            continue
        if rel in leading:
            if b is None and a is not None and a[0] == "dir":
                continue  # a missing parent made on the way to a path passed
            if a is not None and b is not None and a[:2] == b[:2] and a[4] == b[4]:
                continue  # an entry added or removed inside
        problems.append(f"{rel or '.'}: {b} -> {a}")
    if problems:
        fuzz.fail(
            f"changed outside the paths passed: {problems[:10]} ({len(problems)} in all)", None
        )


def table(fuzz: Fuzzer) -> list[str]:
    lines = [f"{'RPC':34} {'sent':>6}  codes"]
    for _, method, _, _ in RPCS:
        codes = ", ".join(f"{c} {n}" for c, n in fuzz.codes[method].most_common())
        lines.append(f"{method:34} {fuzz.sent[method]:>6}  {codes}")
    return lines


@pytest.fixture
def layout(sandbox: Sandbox) -> Iterator[Layout]:
    """The kubelet directory's traps; the foreign mounts are taken down after the test."""
    out = Layout(sandbox.workdir, sandbox.decoy)
    try:
        out.build(sandbox)
        yield out
    finally:
        for m in sorted(sandbox.ns_mounts_under(out.k / "protected"), key=len, reverse=True):
            sandbox.ns.run(["umount", "-l", m])


@pytest.mark.parametrize("seed", seeds())
def test_fuzz_every_rpc(sandbox: Sandbox, layout: Layout, seed: int) -> None:
    skip = ["root", "ephemeral", "driver.log", "csi.sock"]
    driver = make_driver(sandbox)
    t0 = time.monotonic()
    with running(driver):
        fuzz = Fuzzer(seed, sandbox, driver, layout)
        before = tree(sandbox.ns.path(sandbox.workdir), skip)
        log_start = driver.log.stat().st_size
        crashed = False
        try:
            fuzz.run(REQUESTS)
        except Crashed:
            crashed = True
        rss_end = driver.rss_kib() if driver.alive else 0
        log_bytes = driver.log.stat().st_size - log_start
        requests = fuzz.n
        if not crashed:
            fuzz.clean_up()
        after = tree(sandbox.ns.path(sandbox.workdir), skip)
        check_outside(fuzz, before, after)
        for never in ("/etc/csi-adv-never", "/root/.csi-adv-never", "/var/lib/kubelet/pods/x"):
            if os.path.lexists(sandbox.ns.path(never)):
                fuzz.fail(f"{never}, a path outside the kubelet directory, was created", None)
        if tree(sandbox.ns.path(sandbox.decoy)) != fuzz.decoy_before:
            fuzz.fail("the decoy directory changed", None)
        protected = str(layout.k / "protected")
        leaks = [m for m in sandbox.ns_mounts_under(sandbox.workdir) if not m.startswith(protected)]
        for m in leaks[:10]:
            fuzz.fail(
                f"mount {m!r} left after the cleanup ({fuzz.cleanup_answers.get(m)});"
                f" made by {fuzz.made(m)[-2:]}",
                None,
            )
        foreign = sorted(sandbox.ns_mounts_under(protected))
        if foreign != sorted([protected + "/tmpfs", protected + "/bind"]):
            fuzz.fail(f"another plugin's mounts were touched: now {foreign}", None)
        if not crashed:
            entries = root_entries(driver.root)
            if any(entries.values()):
                fuzz.fail(f"the root still holds {entries}", None)
            free_before = _free_bytes(driver.root)
            capacity = (
                driver.stub("Controller")
                .GetCapacity(csi_pb2.GetCapacityRequest(), timeout=10)
                .available_capacity
            )
            free_after = _free_bytes(driver.root)
            if min(free_before, free_after) > CAPACITY:
                if capacity != CAPACITY:
                    fuzz.fail(f"GetCapacity is {capacity}, not {CAPACITY}", None)
            elif (
                not min(free_before, free_after) - FS_CHURN
                <= capacity
                <= max(free_before, free_after) + FS_CHURN
            ):
                # the machine's disk has less free than the budget: GetCapacity is what it has
                fuzz.fail(
                    f"GetCapacity is {capacity}, not the {free_before}..{free_after} free", None
                )
    took = time.monotonic() - t0
    loops = loops_under(str(sandbox.workdir))
    if loops:
        fuzz.fail(f"loop devices left: {loops}", None)
    internal = sum(c["INTERNAL"] for c in fuzz.codes.values())
    unknown = sum(c["UNKNOWN"] for c in fuzz.codes.values())
    report(
        f"fuzz seed {seed}: {requests} requests (+{fuzz.n - requests} cleanup) in {took:.0f} s;"
        f" INTERNAL {internal}, UNKNOWN {unknown}; RSS every {WARMUP} requests {fuzz.rss} KiB,"
        f" at the end {rss_end} KiB; log {log_bytes / max(requests, 1):.0f} bytes/request;"
        f" failures {len(fuzz.failures)}"
    )
    for line in table(fuzz):
        report("  " + line)
    if fuzz.rss_warm and rss_end and rss_end - fuzz.rss_warm > RSS_GROWTH_KIB:
        fuzz.fail(f"RSS grew from {fuzz.rss_warm} KiB to {rss_end} KiB after the warm-up", None)
    if log_bytes > LOG_BYTES_PER_REQUEST * requests:
        fuzz.fail(f"the driver logged {log_bytes} bytes for {requests} requests", None)
    for method in ("CreateVolume", "NodeStageVolume", "NodePublishVolume", "NodeUnpublishVolume"):
        if not fuzz.codes[method]["OK"]:
            fuzz.fail(f"no {method} succeeded: the valid paths were never reached", None)
    assert not fuzz.failures, (
        f"{len(fuzz.failures)} failures (seed {seed}; replay with CSI_ADVERSARIAL_SEED={seed}):\n"
        + "\n".join(fuzz.failures[:25])
        + "\n--- driver log tail ---\n"
        + driver.log_tail(30)
    )
