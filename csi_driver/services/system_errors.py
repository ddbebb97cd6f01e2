"""System failures as CSI codes, in one place for the node side.

The system layer (mounts, paths, filesystems) knows nothing of gRPC: its errors say what failed
and, where the kernel said why, its errno. Here they get the code the spec asks for: a path
that cannot be walked safely or a name the kernel refuses is the request's fault
(INVALID_ARGUMENT); a directory on the way that does not exist means nothing is there
(NOT_FOUND); an unusable kubelet directory means the node cannot serve now (UNAVAILABLE); a
mount still in use, or one that something was mounted over, is a precondition
(FAILED_PRECONDITION); the rest is the driver's own fault (INTERNAL).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from csi_driver.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from csi_driver.system.confined import BaseUnusable, PathMissing, PathRefused
from csi_driver.system.filesystem import FilesystemError
from csi_driver.system.mounter import MountError

#: kernel reasons that mean "the request named something unusable", not a fault of ours
BAD_PATH_ERRNOS = frozenset({errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EISDIR})


@contextlib.contextmanager
def system_errors() -> Iterator[None]:
    """The system layer knows nothing of gRPC codes: its errors get theirs here, in one place
    for the node. Bad paths are the request's fault; a busy mount is a precondition; the
    rest is ours."""
    try:
        yield
    except PathRefused as exc:
        raise InvalidArgument(str(exc)) from exc
    except PathMissing as exc:
        raise NotFound(str(exc)) from exc
    except BaseUnusable as exc:
        raise Unavailable(str(exc)) from exc
    except MountError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"{exc}: still in use") from exc
        if exc.errno == errno.ESTALE:
            raise FailedPrecondition(str(exc)) from exc
        if exc.errno in BAD_PATH_ERRNOS:
            raise InvalidArgument(str(exc)) from exc
        raise Internal(str(exc)) from exc
    except FilesystemError as exc:
        raise Internal(str(exc)) from exc
    except OSError as exc:
        if exc.errno in BAD_PATH_ERRNOS:
            raise InvalidArgument(f"{exc.filename or 'a path'}: {exc.strerror}") from exc
        if exc.errno == errno.ENOENT:
            raise NotFound(f"{exc.filename or 'a path'}: {exc.strerror}") from exc
        raise
