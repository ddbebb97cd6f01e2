"""The one base of every failure of the host: a command, a mount, a loop device, a quota.

The system layer knows nothing of CSI. What it can say is *why* something failed, in the
host's terms (:class:`Reason`): no space, a path that cannot be used, something in use, a
program that is not there, a command that was stopped. Each module's own exception
(``CommandError``, ``MountError``, ``LoopError``...) is a :class:`SystemFailure` that says so;
:mod:`csi_driver.system_errors` turns the reason into a gRPC code, in one place for the whole
driver.
"""

from __future__ import annotations

import enum
import errno as errnos


class Reason(enum.Enum):
    """Why the host could not do something, as far as the one who asked can use it."""

    #: the host failed; nothing the caller could change would help
    FAILED = "failed"
    #: the filesystem or volume group is full, or a quota is reached
    NO_SPACE = "no space"
    #: a path that cannot be used safely (a symlink, not a directory, too long)
    BAD_PATH = "bad path"
    #: a path that does not exist
    ABSENT = "absent"
    #: a mount, device or volume is in use
    IN_USE = "in use"
    #: something the operation needs is missing or in the wrong state (a volume group
    #: gone, a stale mount)
    WRONG_STATE = "wrong state"
    #: what was to be made exists already
    EXISTS = "exists"
    #: the host cannot serve now (a program or the kubelet directory unusable)
    UNUSABLE = "unusable"
    #: a command ran out of its own timeout; what it did may still complete
    TIMED_OUT = "timed out"
    #: the work a command served was called off, and the command killed
    CANCELLED = "cancelled"
    #: the deadline of the work a command served passed, and the command was killed
    DEADLINE = "deadline"

    @property
    def transient(self) -> bool:
        """True when nothing failed but time: the identical retry may well succeed."""
        return self in (Reason.TIMED_OUT, Reason.CANCELLED, Reason.DEADLINE)


#: kernel reasons that say a path cannot be used, not that the host failed
BAD_PATH_ERRNOS = frozenset({errnos.ENOTDIR, errnos.ELOOP, errnos.ENAMETOOLONG, errnos.EISDIR})

_ERRNO_REASONS = {
    errnos.ENOSPC: Reason.NO_SPACE,
    errnos.EDQUOT: Reason.NO_SPACE,
    errnos.EBUSY: Reason.IN_USE,
    errnos.ESTALE: Reason.WRONG_STATE,
    errnos.ENOENT: Reason.ABSENT,
    **dict.fromkeys(BAD_PATH_ERRNOS, Reason.BAD_PATH),
}


def reason_of_errno(err: int | None) -> Reason:
    """The kernel's ``errno`` read as a :class:`Reason` (FAILED for any other, or none)."""
    return _ERRNO_REASONS.get(err, Reason.FAILED) if err is not None else Reason.FAILED


class SystemFailure(Exception):
    """Something on the host failed. The message says what and why in the host's terms;
    ``reason`` says why in terms a caller can act on (given, else read from ``errno``, the
    kernel's reason when there is one)."""

    #: the reason of a failure that names none and has no errno
    default_reason = Reason.FAILED

    def __init__(
        self, message: str, *, reason: Reason | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.errno = errno
        #: the reason was read from ``errno`` (the kernel's word about some path), not given
        self.from_errno = reason is None and errno is not None
        if reason is None:
            reason = reason_of_errno(errno) if errno is not None else self.default_reason
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.reason.transient
