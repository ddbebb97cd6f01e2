"""NodeServicer error paths, with an in-memory backend and recording fakes for the commands.

Only what needs no root is here: request validation, the codes the CSI spec and csi-sanity
expect, refusals that must leave storage untouched, and rollbacks. The real staging, mounting
and formatting are in tests/integration/test_node.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from csi_driver import ids, model
from csi_driver.config import Config, parse_endpoint
from csi_driver.errors import CsiError, InvalidArgument, NotFound
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2
from csi_driver.services import sizing
from csi_driver.services.node import NodeServicer
from csi_driver.system.filesystem import Filesystems, Signature
from csi_driver.system.mountcalls import Attributes, MountCalls
from csi_driver.system.mounter import Mounter
from tests.fake_runner import FakeRunner
from tests.requests import block_cap, mount_cap

NODE = "node-1"
#: the servicer never uses its context; the interceptor owns statuses
CTX = cast(grpc.ServicerContext, None)
MODE = csi_pb2.VolumeCapability.AccessMode


class FakeBackend:
    """The Backend protocol in memory; ``attachments`` says what attach() hands out."""

    max_volumes_per_node = 7

    def __init__(self) -> None:
        self.volumes: dict[str, model.Volume] = {}
        self.attachments: dict[str, model.Attachment] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_attach: CsiError | None = None
        self.problem: str | None = None

    def add(self, name: str, access: model.AccessType, fs_type: str = "ext4") -> model.Volume:
        vid = ids.volume_id_for(name, NODE)
        vol = model.Volume(vid, name, 1 << 30, access, fs_type, NODE)
        self.volumes[vid] = vol
        return vol

    def health(self) -> str | None:
        return self.problem

    def validate_parameters(self, parameters: Mapping[str, str]) -> model.Parameters:
        unknown = sorted(set(parameters) - {"class"})
        if unknown:
            raise InvalidArgument(f"unknown parameters {unknown}")
        return model.Parameters(parameters)

    def supported_fs_types(self) -> Sequence[str]:
        return ("ext4", "xfs")

    def round_size(self, size_bytes: int, parameters: model.Parameters) -> int:
        return size_bytes

    def create_volume(self, spec: model.VolumeSpec) -> model.Volume:
        self.calls.append(("create", spec.name))
        vid = ids.volume_id_for(spec.name, NODE)
        vol = model.Volume(
            vid,
            spec.name,
            spec.capacity_bytes,
            spec.access_type,
            spec.fs_type,
            NODE,
            spec.parameters,
        )
        self.volumes.setdefault(vid, vol)
        return self.volumes[vid]

    def delete_volume(self, volume_id: str) -> None:
        self.calls.append(("delete", volume_id))
        self.volumes.pop(volume_id, CTX)

    def get_volume(self, volume_id: str) -> model.Volume | None:
        return self.volumes.get(volume_id)

    def volume_condition(self, volume_id: str) -> model.VolumeCondition:
        return model.VolumeCondition.healthy()

    def volume_usage(self, volume_id: str) -> model.Usage | None:
        return None

    def expand_volume(self, volume_id: str, size_bytes: int) -> model.Volume:
        self.calls.append(("expand", volume_id))
        raise AssertionError("not expected")

    def attach(self, volume_id: str) -> model.Attachment:
        self.calls.append(("attach", volume_id))
        if self.fail_attach is not None:
            raise self.fail_attach
        return self.attachments[volume_id]

    def locate(self, volume_id: str) -> model.Attachment | None:
        return self.attachments.get(volume_id)

    def detach(self, volume_id: str) -> None:
        self.calls.append(("detach", volume_id))

    def refresh_attachment(self, volume_id: str) -> None:
        self.calls.append(("refresh", volume_id))

    def __getattr__(self, name: str) -> Any:  # controller-side methods are not used here
        raise AssertionError(f"unexpected backend call {name}")


class FakeFilesystems(Filesystems):
    """Blkid answers from a table; formatting is recorded, never done."""

    def __init__(self, signatures: dict[str, Signature | None]) -> None:
        super().__init__(FakeRunner())
        self.signatures = signatures
        self.formatted: list[tuple[str, str]] = []

    def probe(self, device: str) -> Signature | None:
        return self.signatures[device]

    def format(self, device: str, fstype: str) -> None:
        self.formatted.append((device, fstype))

    def is_read_only(self, device: str) -> bool:
        return False

    def set_read_only(self, device: str, read_only: bool) -> None:
        raise AssertionError("not expected")


class FakeMountCalls(MountCalls):
    """Records the kernel mount calls in the runner's list, as ("mount"|"bind"|"umount", ...),
    and mounts nothing."""

    def __init__(self, calls: list[tuple[str, ...]]) -> None:
        self.calls = calls

    def bind(self, source_fd: int, target_fd: int, attributes: Attributes, what: str) -> None:
        self.calls.append(("bind", what))

    def mount(
        self,
        device: str,
        fs_type: str,
        fs_options: Sequence[str],
        attributes: Attributes,
        target_fd: int,
        what: str,
    ) -> None:
        self.calls.append(("mount", device, fs_type, ",".join(fs_options), what))

    def unmount(self, path: str, *, lazy: bool = False) -> None:
        self.calls.append(("umount", path))


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.mountinfo = tmp_path / "mountinfo"
        self.mountinfo.write_text("")
        self.runner = FakeRunner()
        self.backend = FakeBackend()
        self.fs = FakeFilesystems({})
        self.locks = KeyLocks()
        config = Config(
            endpoint=parse_endpoint(f"unix://{tmp_path}/csi.sock"),
            node_id=NODE,
            kubelet_dir=tmp_path,
        )
        self.node = NodeServicer(
            config,
            self.backend,
            self.locks,
            Mounter(FakeMountCalls(self.runner.calls), mountinfo=str(self.mountinfo)),
            self.fs,
        )
        self.staging = str(tmp_path / "staging")
        self.target = str(tmp_path / "target")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(CsiError) as exc:
        call()
    return exc.value.code


UNKNOWN = ids.volume_id_for("never-created", NODE)


# --- field validation, in the order csi-sanity probes it ----------------------------------


def test_stage_requires_id_path_and_capability(env: Env) -> None:
    n = env.node
    req = csi_pb2.NodeStageVolumeRequest
    assert (
        code_of(
            lambda: n.NodeStageVolume(
                req(staging_target_path=env.staging, volume_capability=mount_cap()), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeStageVolume(
                req(volume_id="sanity-fake-id", volume_capability=mount_cap()), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    vol = env.backend.add("v", model.AccessType.MOUNT)
    assert (
        code_of(
            lambda: n.NodeStageVolume(req(volume_id=vol.id, staging_target_path=env.staging), CTX)
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeStageVolume(
                req(
                    volume_id=UNKNOWN,
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            lambda: n.NodeStageVolume(
                req(
                    volume_id="a/../b",
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeStageVolume(
                req(
                    volume_id=vol.id, staging_target_path="rel/path", volume_capability=mount_cap()
                ),
                CTX,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert env.backend.calls == [] and env.runner.calls == []


def test_publish_checks_capability_before_the_id_and_wants_a_staging_path(env: Env) -> None:
    n = env.node
    req = csi_pb2.NodePublishVolumeRequest
    # csi-sanity: a fake id, a target, no capability -> INVALID_ARGUMENT (not NOT_FOUND)
    assert (
        code_of(lambda: n.NodePublishVolume(req(volume_id="fake", target_path=env.target), CTX))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: n.NodePublishVolume(req(volume_id="fake"), CTX)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodePublishVolume(
                req(volume_id=UNKNOWN, target_path=env.target, volume_capability=mount_cap()), CTX
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        code_of(
            lambda: n.NodePublishVolume(
                req(
                    volume_id=UNKNOWN,
                    target_path=env.target,
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert not Path(env.target).exists()


def test_unpublish_and_unstage_validation(env: Env) -> None:
    n = env.node
    assert (
        code_of(
            lambda: n.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(target_path=env.target), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="fake"), CTX)
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(staging_target_path=env.staging), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="fake"), CTX)
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    # unknown volume and nothing there: NOT_FOUND (csi-sanity's cleanup accepts it)
    assert (
        code_of(
            lambda: n.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=UNKNOWN, staging_target_path=env.staging
                ),
                CTX,
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            lambda: n.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=UNKNOWN, target_path=env.target), CTX
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            lambda: n.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id="x\x00y", target_path=env.target), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_unpublish_of_a_known_volume_is_idempotent(env: Env) -> None:
    vol = env.backend.add("v", model.AccessType.MOUNT)
    for _ in range(2):
        env.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=env.target), CTX
        )
    assert env.runner.calls == []


def test_unpublish_never_removes_a_symlink_or_data(env: Env) -> None:
    vol = env.backend.add("v", model.AccessType.MOUNT)
    victim = env.tmp / "victim"
    victim.mkdir()
    (victim / "data").write_text("keep")
    Path(env.target).symlink_to(victim)
    assert (
        code_of(
            lambda: env.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=env.target), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT  # a symlink is never a target
    )
    Path(env.target).unlink()
    Path(env.target).mkdir()
    (Path(env.target) / "left-by-someone").write_text("x")
    assert (
        code_of(
            lambda: env.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=env.target), CTX
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (victim / "data").read_text() == "keep"
    assert (Path(env.target) / "left-by-someone").exists()


def test_stats_codes(env: Env) -> None:
    n = env.node
    req = csi_pb2.NodeGetVolumeStatsRequest
    assert code_of(lambda: n.NodeGetVolumeStats(req(volume_path="some/path"), CTX)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: n.NodeGetVolumeStats(req(volume_id=UNKNOWN), CTX)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(lambda: n.NodeGetVolumeStats(req(volume_id=UNKNOWN, volume_path="some/path"), CTX))
        == grpc.StatusCode.NOT_FOUND
    )
    vol = env.backend.add("v", model.AccessType.MOUNT)
    # a known volume, but not at that path (relative, or simply not mounted): NOT_FOUND
    for path in ("some/path", str(env.tmp)):
        assert (
            code_of(lambda p=path: n.NodeGetVolumeStats(req(volume_id=vol.id, volume_path=p), CTX))
            == grpc.StatusCode.NOT_FOUND
        )


def test_expand_codes(env: Env) -> None:
    n = env.node
    req = csi_pb2.NodeExpandVolumeRequest
    assert code_of(lambda: n.NodeExpandVolume(req(volume_path=env.target), CTX)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    vol = env.backend.add("v", model.AccessType.MOUNT)
    assert code_of(lambda: n.NodeExpandVolume(req(volume_id=vol.id), CTX)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(lambda: n.NodeExpandVolume(req(volume_id=UNKNOWN, volume_path="some/path"), CTX))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            lambda: n.NodeExpandVolume(
                req(volume_id=vol.id, volume_path=env.target, volume_capability=block_cap()), CTX
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            lambda: n.NodeExpandVolume(
                req(
                    volume_id=vol.id,
                    volume_path=env.target,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=2, limit_bytes=1),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.OUT_OF_RANGE
    )
    assert (
        code_of(lambda: n.NodeExpandVolume(req(volume_id=vol.id, volume_path=env.target), CTX))
        == grpc.StatusCode.NOT_FOUND
    )  # not mounted there
    assert ("expand", vol.id) not in env.backend.calls


# --- capabilities that do not fit ---------------------------------------------------------


def test_capability_must_fit_the_volume(env: Env) -> None:
    n = env.node
    mount_vol = env.backend.add("m", model.AccessType.MOUNT, "ext4")
    block_vol = env.backend.add("b", model.AccessType.BLOCK, "")

    def stage(vid: str, cap: csi_pb2.VolumeCapability) -> None:
        n.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=env.staging, volume_capability=cap
            ),
            CTX,
        )

    assert code_of(lambda: stage(mount_vol.id, block_cap())) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stage(block_vol.id, mount_cap())) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stage(mount_vol.id, mount_cap(fs_type="xfs"))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: stage(mount_vol.id, mount_cap(MODE.MULTI_NODE_MULTI_WRITER))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: stage(mount_vol.id, mount_cap(MODE.UNKNOWN))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert env.backend.calls == [] and env.runner.calls == []


@pytest.mark.parametrize(
    "flags", [["bind"], ["remount"], ["loop=/dev/loop9"], ["noexec,,nosuid"], ["X-mount.mkdir"]]
)
def test_mount_operations_are_not_flags(env: Env, flags: list[str]) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT)
    assert (
        code_of(
            lambda: env.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=vol.id,
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(flags=flags),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert env.backend.calls == [] and env.runner.calls == []


def test_filesystem_flags_on_a_directory_volume_are_refused(env: Env) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT)
    env.backend.attachments[vol.id] = model.Attachment(model.AttachmentKind.DIRECTORY, "/srv/x")
    assert (
        code_of(
            lambda: env.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=vol.id,
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(flags=["discard"]),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert env.runner.calls == []


def test_restaging_compares_the_flags_a_bind_can_carry(env: Env) -> None:
    """A directory volume's staging bind never carries "ro" (publications do), so staging it
    again with "ro" is idempotent; a missing per-mount flag is a different capability."""
    vol = env.backend.add("m", model.AccessType.MOUNT)
    os.mkdir(env.staging)
    env.backend.attachments[vol.id] = model.Attachment(model.AttachmentKind.DIRECTORY, env.staging)
    env.mountinfo.write_text(f"40 1 8:1 /vols/m {env.staging} rw,nosuid - ext4 /dev/sda1 rw\n")

    def stage(flags: tuple[str, ...]) -> None:
        env.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.id,
                staging_target_path=env.staging,
                volume_capability=mount_cap(flags=flags),
            ),
            CTX,
        )

    stage(("ro", "nosuid"))
    stage(())
    assert code_of(lambda: stage(("noexec",))) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: stage(("suid",))) == grpc.StatusCode.ALREADY_EXISTS
    assert env.runner.calls == []  # nothing mounted again


# --- never format over data ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("signature", "asked"),
    [
        (Signature("LVM2_member", "raid"), ""),
        (Signature("gpt", "partition table"), "ext4"),
        (Signature("xfs", "filesystem"), "ext4"),
    ],
)
def test_a_device_holding_something_else_is_not_formatted(
    env: Env, signature: Signature, asked: str
) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT, fs_type="")
    env.backend.attachments[vol.id] = model.Attachment(
        model.AttachmentKind.BLOCK_DEVICE, "/dev/fake0"
    )
    env.fs.signatures["/dev/fake0"] = signature
    assert (
        code_of(
            lambda: env.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=vol.id,
                    staging_target_path=env.staging,
                    volume_capability=mount_cap(fs_type=asked),
                ),
                CTX,
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert env.fs.formatted == []
    assert [c for c in env.runner.calls if c[0] == "mount"] == []


def test_blank_device_is_formatted_with_the_asked_then_volume_then_default_type(env: Env) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT, fs_type="xfs")
    env.backend.attachments[vol.id] = model.Attachment(
        model.AttachmentKind.BLOCK_DEVICE, "/dev/fake0"
    )
    env.fs.signatures["/dev/fake0"] = None
    env.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.id,
            staging_target_path=env.staging,
            volume_capability=mount_cap(flags=["noatime"]),
        ),
        CTX,
    )
    assert env.fs.formatted == [("/dev/fake0", "xfs")]
    assert [c[:4] for c in env.runner.calls] == [("mount", "/dev/fake0", "xfs", "")]


# --- ephemeral inline volumes -------------------------------------------------------------


def ephemeral_publish(env: Env, context: dict[str, str], cap: Any = None) -> None:
    env.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id="csi-0123abcd",
            target_path=env.target,
            volume_capability=cap or mount_cap(),
            volume_context={
                "csi.storage.k8s.io/ephemeral": "true",
                "csi.storage.k8s.io/pod.name": "p",
                **context,
            },
        ),
        CTX,
    )


def test_unpublish_of_a_gone_inline_volume_passes_over_an_empty_target_only_when_sure(
    env: Env,
) -> None:
    """The retry of an inline volume's unpublish that finished, with the empty directory a
    kill left unmarked: OK (the kubelet removes it), but only when nothing else of the volume
    is left and the backend sees all its storage; NOT_FOUND otherwise, and nothing touched."""
    kubelet_id = "csi-0123456789abcdef"
    target = Path(env.target)
    target.mkdir()

    def unpublish() -> None:
        env.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=kubelet_id, target_path=env.target),
            CTX,
        )

    unpublish()
    assert target.is_dir()  # passed over, not removed: the driver never marked it
    env.backend.problem = "volume group vg0 not found"  # at boot: volumes may be hidden
    assert code_of(unpublish) == grpc.StatusCode.NOT_FOUND
    env.backend.problem = None
    local = ids.volume_id_for(kubelet_id, NODE).partition("@")[0]
    staging = env.tmp / "ephemeral" / local
    staging.mkdir(parents=True)  # something of the volume is still there
    assert code_of(unpublish) == grpc.StatusCode.NOT_FOUND
    staging.rmdir()
    (target / "data").write_text("not ours")
    assert code_of(unpublish) == grpc.StatusCode.NOT_FOUND
    assert (target / "data").read_text() == "not ours"
    (target / "data").unlink()
    target.rmdir()
    unpublish()  # absent: done, whatever the backend says
    env.backend.problem = "volume group vg0 not found"
    unpublish()


@pytest.mark.parametrize("context", [{"size": "lots"}, {"size": "0"}, {"colour": "blue"}])
def test_ephemeral_bad_context_is_invalid_and_creates_nothing(
    env: Env, context: dict[str, str]
) -> None:
    assert code_of(lambda: ephemeral_publish(env, context)) == grpc.StatusCode.INVALID_ARGUMENT
    assert env.backend.calls == [] and env.backend.volumes == {}


def test_ephemeral_block_is_invalid(env: Env) -> None:
    assert code_of(lambda: ephemeral_publish(env, {}, block_cap())) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert env.backend.calls == []


def test_ephemeral_failure_rolls_the_new_volume_back(env: Env) -> None:
    env.backend.fail_attach = CsiError("attach broke")
    assert code_of(lambda: ephemeral_publish(env, {"size": "64Mi", "class": "fast"})) == (
        grpc.StatusCode.INTERNAL
    )
    vid = ids.volume_id_for("csi-0123abcd", NODE)
    assert ("create", "csi-0123abcd") in env.backend.calls
    assert ("delete", vid) in env.backend.calls
    assert env.backend.volumes == {}


def test_ephemeral_failure_keeps_a_volume_that_existed_before(env: Env) -> None:
    env.backend.create_volume(
        model.VolumeSpec("csi-0123abcd", 1 << 30, model.AccessType.MOUNT, "ext4")
    )
    env.backend.fail_attach = CsiError("attach broke")
    assert code_of(lambda: ephemeral_publish(env, {})) == grpc.StatusCode.INTERNAL
    assert len(env.backend.volumes) == 1


def test_ephemeral_size_comes_from_the_context_or_the_one_default(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def create_volume(spec: model.VolumeSpec) -> model.Volume:
        sizes.append(spec.capacity_bytes)
        raise CsiError("seen enough")

    monkeypatch.setattr(env.backend, "create_volume", create_volume)
    for context in ({"size": "64Mi"}, {}):
        assert code_of(lambda c=context: ephemeral_publish(env, c)) == grpc.StatusCode.INTERNAL
    assert sizes == [64 << 20, sizing.DEFAULT_VOLUME_SIZE]


def test_ephemeral_retry_that_does_not_match_its_volume_is_already_exists(env: Env) -> None:
    env.backend.create_volume(
        model.VolumeSpec("csi-0123abcd", 1 << 20, model.AccessType.MOUNT, "ext4")
    )
    with pytest.raises(CsiError, match="capacity is 1048576 bytes") as exc:
        ephemeral_publish(env, {"size": "64Mi"})
    assert exc.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert ("attach", ids.volume_id_for("csi-0123abcd", NODE)) not in env.backend.calls


def test_unpublish_of_an_unknown_foreign_id_is_ok(env: Env) -> None:
    env.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-ffff", target_path=env.target), CTX
    )
    assert env.backend.calls == []


# --- locks, info, capabilities ------------------------------------------------------------


def test_a_busy_volume_is_aborted(env: Env) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT)
    with env.locks.hold(vol.id):
        assert (
            code_of(
                lambda: env.node.NodeStageVolume(
                    csi_pb2.NodeStageVolumeRequest(
                        volume_id=vol.id,
                        staging_target_path=env.staging,
                        volume_capability=mount_cap(),
                    ),
                    CTX,
                )
            )
            == grpc.StatusCode.ABORTED
        )
    assert env.backend.calls == []


def test_node_info_and_capabilities(env: Env) -> None:
    info = env.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), CTX)
    assert info.node_id == NODE
    assert info.max_volumes_per_node == 7
    assert dict(info.accessible_topology.segments) == {"topology.nodelocal.csi.dev/node": NODE}
    caps = env.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), CTX)
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.EXPAND_VOLUME,
        rpc.VOLUME_CONDITION,
        rpc.SINGLE_NODE_MULTI_WRITER,
    }


def test_attach_errors_reach_the_caller_with_their_code(env: Env) -> None:
    vol = env.backend.add("m", model.AccessType.MOUNT)
    env.backend.fail_attach = NotFound("backing directory vanished")
    with pytest.raises(NotFound, match="vanished"):
        env.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.id, staging_target_path=env.staging, volume_capability=mount_cap()
            ),
            CTX,
        )
