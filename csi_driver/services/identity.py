"""The CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from csi_driver import __version__
from csi_driver.config import Config
from csi_driver.proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityServicer(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, config: Config, health: Callable[[], str | None]) -> None:
        self._config = config
        self._health = health

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=self._config.driver_name,
            vendor_version=__version__,
            manifest={"mode": self._config.mode.value, "backend": self._config.backend.value},
        )

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # Every mode runs a Controller service (the controller Deployment only for publish),
        # and volumes are reachable from one node only, hence the topology constraint.
        return csi_pb2.GetPluginCapabilitiesResponse(
            capabilities=[
                csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
                csi_pb2.PluginCapability(
                    service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
                ),
                csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
            ]
        )

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        reason = self._health()
        response = csi_pb2.ProbeResponse()
        response.ready.value = reason is None
        if reason is not None:
            # ProbeResponse has no message field: the log is where the reason can be seen.
            log.warning("not ready", extra={"reason": reason})
        return response
