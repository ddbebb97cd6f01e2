"""System failures as CSI errors: the one translation, for the backends and the node service.

The system layer knows nothing of gRPC: its failures (:class:`SystemFailure`, and the bare
``OSError`` of a direct call) say what failed and why in the host's terms
(:class:`~csi_driver.system.failure.Reason`). Here, and nowhere else, a reason gets the code
the spec asks for: a full disk is RESOURCE_EXHAUSTED; a path that cannot be used safely is the
request's fault (INVALID_ARGUMENT) and one that does not exist means nothing is there
(NOT_FOUND); something in use or in the wrong state is a precondition (FAILED_PRECONDITION);
what exists already is ALREADY_EXISTS; a host that cannot serve now is UNAVAILABLE; a command
out of time is DEADLINE_EXCEEDED, one whose request was called off CANCELLED or
DEADLINE_EXCEEDED; the rest is the driver's own fault (INTERNAL).

Whose path it was matters for the kernel's word on it. A node operation works on paths the
CO named, so "no such file" or "not a directory" is about the request; a backend works on
storage it made itself, so the same errno is its own fault (INTERNAL), and only a full disk
is not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from csi_driver import bounded
from csi_driver.errors import (
    AlreadyExists,
    Cancelled,
    CsiError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi_driver.system.failure import Reason, SystemFailure, reason_of_errno

log = logging.getLogger(__name__)

#: the longest message a failure becomes (paths and a program's stderr are quoted in it)
MESSAGE_CHARS = 1024

ERRORS: Mapping[Reason, type[CsiError]] = MappingProxyType(
    {
        Reason.FAILED: Internal,
        Reason.NO_SPACE: ResourceExhausted,
        Reason.BAD_PATH: InvalidArgument,
        Reason.ABSENT: NotFound,
        Reason.IN_USE: FailedPrecondition,
        Reason.WRONG_STATE: FailedPrecondition,
        Reason.EXISTS: AlreadyExists,
        Reason.UNUSABLE: Unavailable,
        Reason.TIMED_OUT: DeadlineExceeded,
        Reason.CANCELLED: Cancelled,
        Reason.DEADLINE: DeadlineExceeded,
    }
)


def _reason(exc: SystemFailure | OSError, request_paths: bool) -> Reason:
    if isinstance(exc, SystemFailure):
        reason, from_errno = exc.reason, exc.from_errno
    else:
        reason, from_errno = reason_of_errno(exc.errno), True
    if from_errno and not request_paths and reason is not Reason.NO_SPACE:
        return Reason.FAILED
    return reason


def _detail(exc: SystemFailure | OSError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def to_csi(
    exc: SystemFailure | OSError, what: str = "", *, request_paths: bool = False
) -> CsiError:
    """The CSI error for a failure of the host while doing ``what`` ("create volume x"; empty
    when the failure says it itself). ``request_paths``: the paths involved were named by the
    request, so an errno about them is the request's business (see the module docstring)."""
    reason = _reason(exc, request_paths)
    text = f"cannot {what}: {_detail(exc)}" if what else _detail(exc)
    if reason.transient:
        text += "; retry it"
    return ERRORS[reason](bounded.cut(text, MESSAGE_CHARS))


@contextlib.contextmanager
def system_errors(what: str = "", *, request_paths: bool = False) -> Iterator[None]:
    """Failures of the host inside the block raised as their CSI errors (:func:`to_csi`)."""
    try:
        yield
    except CsiError:
        raise
    except (SystemFailure, OSError) as exc:
        error = to_csi(exc, what, request_paths=request_paths)
        if not isinstance(exc, SystemFailure) and error.code is Internal.code:
            # a bare OSError the system layer did not expect: keep where it came from
            log.error("unexpected failure of the host", exc_info=exc)
        raise error from exc
