"""Kubernetes CSI driver for node-local volumes (lvm and hostpath backends)."""

#: the release; pyproject.toml reads it from here (one place), and reading it at start costs
#: nothing (importlib.metadata would cost every start about 20 ms)
__version__ = "0.1.0"

DEFAULT_DRIVER_NAME = "nodelocal.csi.dev"
