"""Mutable parameters: the ones a VolumeAttributesClass may set at creation and change later
(ControllerModifyVolume). The same closed set for every backend, checked here once. The
names live in model.py, because they also decide which parameters tell volumes apart.

``wipeOnDelete``  ``"true"``: overwrite the volume's data before its storage is released on
                  DeleteVolume (see each backend for how); ``"false"`` (the default): do not.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver.errors import InvalidArgument
from csi_driver.model import MUTABLE_PARAMETERS as MUTABLE_PARAMETERS
from csi_driver.model import WIPE_ON_DELETE as WIPE_ON_DELETE
from csi_driver.model import frozen_map


def wipe_value(value: str) -> str:
    """``"true"`` or ``"false"``, whatever the case; anything else is INVALID_ARGUMENT."""
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise InvalidArgument(f'{WIPE_ON_DELETE} must be "true" or "false", not {value!r}')
    return lowered


def validate_mutable(parameters: Mapping[str, str], backend: str) -> Mapping[str, str]:
    unknown = sorted(set(parameters) - set(MUTABLE_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown mutable parameters {unknown} for the {backend} backend; it accepts"
            f" {list(MUTABLE_PARAMETERS)}"
        )
    return frozen_map({k: wipe_value(v) for k, v in parameters.items()})


def apply(parameters: Mapping[str, str], mutable: Mapping[str, str]) -> dict[str, str]:
    """A volume's normalised parameters after ``mutable`` (validated) changed them: a false
    flag is stored as its absence, as the normalised StorageClass parameters have it."""
    out = dict(parameters)
    for key, value in mutable.items():
        if value == "true":
            out[key] = value
        else:
            out.pop(key, None)
    return out
