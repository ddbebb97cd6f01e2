"""Which filesystem a new mount volume gets, decided in one place for CreateVolume and inline
ephemeral volumes alike.

The capability's ``fs_type`` says it; else the ``fsType`` parameter (a StorageClass parameter,
or an inline volume's attribute, which kubelet hands over as the volume context); else the
backend's first filesystem. Whatever is asked must be one the backend can make. A backend
that reads ``fsType`` itself (lvm) also refuses a capability that contradicts it.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver.backends.base import Backend
from csi_driver.bounded import echo
from csi_driver.errors import InvalidArgument

#: the parameter (or volume attribute) naming the filesystem when the capability does not
PARAMETER = "fsType"


def choose(backend: Backend, asked: str, parameters: Mapping[str, str]) -> str:
    """The filesystem of a new mount volume whose capability asks for ``asked`` (empty: none)
    and whose validated parameters are ``parameters``; INVALID_ARGUMENT for one the backend
    cannot make."""
    supported = list(backend.supported_fs_types())
    fs_type = asked or parameters.get(PARAMETER, "")
    if not fs_type:
        return supported[0] if supported else ""
    if fs_type not in supported:
        raise InvalidArgument(
            f"fs_type {echo(fs_type)} is not supported; use one of {supported}"
            if supported
            else f"fs_type {echo(fs_type)} is not supported; leave it empty"
        )
    return fs_type
