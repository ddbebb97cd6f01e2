"""Kubernetes CSI driver for node-local volumes (lvm and hostpath backends)."""

from importlib.metadata import PackageNotFoundError, version

DEFAULT_DRIVER_NAME = "nodelocal.csi.dev"

try:
    __version__ = version("csi-driver")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
