"""The one translation of host failures into CSI codes (csi_driver/system_errors.py): every
reason, every errno it reads, whose path it was, and the bound on what a message quotes."""

from __future__ import annotations

import errno

import grpc
import pytest

from csi_driver import system_errors
from csi_driver.backends.hostpath.store import StoreError
from csi_driver.errors import CsiError, NotFound
from csi_driver.system.confined import BaseUnusable, PathMissing, PathRefused
from csi_driver.system.failure import Reason, SystemFailure, reason_of_errno
from csi_driver.system.filesystem import FilesystemError
from csi_driver.system.fsinfo import FsInfoError
from csi_driver.system.loop import LoopError
from csi_driver.system.mounter import MountError
from csi_driver.system.quota import QuotaError
from csi_driver.system.runner import CANCELLED, DEADLINE_EXCEEDED, CommandError

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.FAILED, Code.INTERNAL),
        (Reason.NO_SPACE, Code.RESOURCE_EXHAUSTED),
        (Reason.BAD_PATH, Code.INVALID_ARGUMENT),
        (Reason.ABSENT, Code.NOT_FOUND),
        (Reason.IN_USE, Code.FAILED_PRECONDITION),
        (Reason.WRONG_STATE, Code.FAILED_PRECONDITION),
        (Reason.EXISTS, Code.ALREADY_EXISTS),
        (Reason.UNUSABLE, Code.UNAVAILABLE),
        (Reason.TIMED_OUT, Code.DEADLINE_EXCEEDED),
        (Reason.CANCELLED, Code.CANCELLED),
        (Reason.DEADLINE, Code.DEADLINE_EXCEEDED),
    ],
)
def test_every_reason_has_its_code(reason: Reason, code: grpc.StatusCode) -> None:
    error = system_errors.to_csi(SystemFailure("it broke", reason=reason), "do a thing")
    assert error.code == code
    assert error.message.startswith("cannot do a thing: it broke")
    # named reasons are the failure's own word: they hold whoever's paths were involved
    assert system_errors.to_csi(SystemFailure("x", reason=reason), request_paths=True).code == code


def test_the_table_covers_every_reason() -> None:
    assert set(system_errors.ERRORS) == set(Reason)


def test_only_time_is_transient_and_says_retry() -> None:
    assert {r for r in Reason if r.transient} == {
        Reason.TIMED_OUT,
        Reason.CANCELLED,
        Reason.DEADLINE,
    }
    assert system_errors.to_csi(
        SystemFailure("stopped", reason=Reason.CANCELLED), "grow x"
    ).message.endswith("; retry it")
    assert "retry" not in system_errors.to_csi(SystemFailure("broke"), "grow x").message
    assert SystemFailure("t", reason=Reason.TIMED_OUT).transient
    assert not SystemFailure("f").transient


@pytest.mark.parametrize(
    ("err", "on_request_path", "on_own_path"),
    [
        (errno.ENOSPC, Code.RESOURCE_EXHAUSTED, Code.RESOURCE_EXHAUSTED),
        (errno.EDQUOT, Code.RESOURCE_EXHAUSTED, Code.RESOURCE_EXHAUSTED),
        (errno.ENOENT, Code.NOT_FOUND, Code.INTERNAL),
        (errno.ENOTDIR, Code.INVALID_ARGUMENT, Code.INTERNAL),
        (errno.ELOOP, Code.INVALID_ARGUMENT, Code.INTERNAL),
        (errno.ENAMETOOLONG, Code.INVALID_ARGUMENT, Code.INTERNAL),
        (errno.EISDIR, Code.INVALID_ARGUMENT, Code.INTERNAL),
        (errno.EBUSY, Code.FAILED_PRECONDITION, Code.INTERNAL),
        (errno.ESTALE, Code.FAILED_PRECONDITION, Code.INTERNAL),
        (errno.EIO, Code.INTERNAL, Code.INTERNAL),
        (errno.EACCES, Code.INTERNAL, Code.INTERNAL),
    ],
)
def test_an_errno_counts_against_the_request_only_on_its_paths(
    err: int, on_request_path: grpc.StatusCode, on_own_path: grpc.StatusCode
) -> None:
    """A node works on paths the CO named; a backend on storage it made: the same errno is
    the request's business there and the driver's own fault here, but for a full disk."""
    exc = OSError(err, errno.errorcode[err], "/some/path")
    assert system_errors.to_csi(exc, request_paths=True).code == on_request_path
    assert system_errors.to_csi(exc, "make it").code == on_own_path
    mount = MountError("mount /some/path: said the kernel", err)
    # ENOENT from mount(2) is a device or directory gone from under the driver (its own
    # failure), never "the request named nothing"
    expected = Code.INTERNAL if err == errno.ENOENT else on_request_path
    assert system_errors.to_csi(mount, request_paths=True).code == expected
    assert system_errors.to_csi(mount).code == on_own_path


def test_errno_reasons() -> None:
    assert reason_of_errno(None) is Reason.FAILED
    assert reason_of_errno(errno.EIO) is Reason.FAILED
    assert reason_of_errno(errno.ENOSPC) is Reason.NO_SPACE
    assert MountError("m", errno.EBUSY).reason is Reason.IN_USE
    assert MountError("m").reason is Reason.FAILED


def test_os_error_messages_name_the_path_and_the_kernel_reason() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/root/volumes/v1")
    message = system_errors.to_csi(exc, "create volume 'a'").message
    assert message == "cannot create volume 'a': /root/volumes/v1: No space left on device"
    assert system_errors.to_csi(OSError(errno.EIO, "I/O error")).message == "I/O error"
    assert system_errors.to_csi(OSError("no errno at all")).message == "no errno at all"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CommandError(["cp"], None, cancelled=CANCELLED), Code.CANCELLED),
        (CommandError(["cp"], None, cancelled=DEADLINE_EXCEEDED), Code.DEADLINE_EXCEEDED),
        (CommandError(["cp"], None, timed_out=True), Code.DEADLINE_EXCEEDED),
        (CommandError(["cp"], None, not_found=True), Code.UNAVAILABLE),
        (
            CommandError(["cp"], 1, stderr="cp: error writing 'x': No space left on device"),
            Code.RESOURCE_EXHAUSTED,
        ),
        (CommandError(["cp"], 1, stderr="cp: 'x': Disk quota exceeded"), Code.RESOURCE_EXHAUSTED),
        (CommandError(["cp"], 1, stderr="cp: cannot stat 'x': Input/output error"), Code.INTERNAL),
    ],
    ids=["cancelled", "deadline", "timeout", "no-program", "enospc", "edquot", "other"],
)
def test_command_failures(error: CommandError, code: grpc.StatusCode) -> None:
    for request_paths in (False, True):
        mapped = system_errors.to_csi(error, "copy x", request_paths=request_paths)
        assert mapped.code == code
        assert mapped.message.startswith(f"cannot copy x: {error}")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PathRefused("/k/x is a symbolic link"), Code.INVALID_ARGUMENT),
        (PathMissing("/k/x does not exist"), Code.NOT_FOUND),
        (BaseUnusable("the kubelet directory /k: gone"), Code.UNAVAILABLE),
        (LoopError("cannot attach"), Code.INTERNAL),
        (QuotaError("cannot set"), Code.INTERNAL),
        (FsInfoError("statvfs: gone"), Code.INTERNAL),
        (FilesystemError("probing failed"), Code.INTERNAL),
        (StoreError("cannot open"), Code.INTERNAL),
    ],
)
def test_each_system_module_failure_is_a_system_failure(
    error: SystemFailure, code: grpc.StatusCode
) -> None:
    assert isinstance(error, SystemFailure)
    with pytest.raises(CsiError) as raised, system_errors.system_errors(request_paths=True):
        raise error
    assert raised.value.code == code
    assert raised.value.message == str(error)
    assert raised.value.__cause__ is error


def test_messages_are_bounded() -> None:
    stderr = "x" * 100_000
    mapped = system_errors.to_csi(CommandError(["mkfs"], 1, stderr=stderr), "format /dev/x")
    assert len(mapped.message) < system_errors.MESSAGE_CHARS + 40
    assert mapped.message.startswith("cannot format /dev/x: mkfs exited with status 1: xxx")
    assert "bytes)" in mapped.message


def test_csi_errors_and_other_exceptions_pass_through() -> None:
    original = NotFound("volume 'v' does not exist")
    with pytest.raises(NotFound) as raised, system_errors.system_errors("look"):
        raise original
    assert raised.value is original
    with pytest.raises(ValueError), system_errors.system_errors("look"):
        raise ValueError("a bug, not the host")


def test_a_reason_given_is_kept_whoever_owns_the_path() -> None:
    """Only a reason read from an errno depends on whose path it was; one the system layer
    stated (it knows what failed) stands on the driver's own storage too."""
    given = SystemFailure("lvremove: in use", reason=Reason.IN_USE, errno=errno.EBUSY)
    assert system_errors.to_csi(given).code == Code.FAILED_PRECONDITION
    read = SystemFailure("rmdir: busy", errno=errno.EBUSY)
    assert system_errors.to_csi(read).code == Code.INTERNAL
    assert system_errors.to_csi(read, request_paths=True).code == Code.FAILED_PRECONDITION
