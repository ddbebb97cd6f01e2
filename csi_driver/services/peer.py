"""The peer channel: ControllerModifyVolume from the controller Deployment to the node plugin
that holds the volume.

csi-resizer, which turns a PVC's new VolumeAttributesClass into ControllerModifyVolume, runs
beside the controller-mode driver, which sees no storage. That driver finds the node plugin
Pod on the node the volume id names (the API, :class:`NodePlugins`) and makes the same call to
it over TCP (:class:`Forwarder`); the node plugin serves that one method there
(:class:`PeerControllerServicer`) and answers it as it would on its socket, so the resizer sees
the node's own verdict: OK once the change is stored, INVALID_ARGUMENT or NOT_FOUND as final,
UNAVAILABLE while the node plugin cannot be reached (it retries).

Both ends authenticate with TLS: the node plugin presents a certificate for
:data:`SERVER_NAME` from the node CA and accepts only clients with a certificate from the
controller CA; the controller trusts only the node CA. Two CAs, so a node plugin's certificate
never opens another node plugin's door. Both sides read the files again when they change (a
renewed Secret needs no restart). The port faces the Pod network, so its server gets limits of
its own (:data:`PEER_LIMITS`), far below the unix socket's. docs/deploy.md has the design and
its failure modes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from csi_driver import bounded
from csi_driver.bounded import cap_message
from csi_driver.errors import CsiError, InvalidArgument, Unavailable
from csi_driver.kubeapi import ApiError, KubeApi
from csi_driver.proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

#: the name every node plugin's peer certificate carries, and the only one the controller accepts
SERVER_NAME = "nodelocal-csi-node"
#: how long a forwarded call may take when the caller set no deadline
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 300.0
#: the metadata key naming the node a forwarded call is meant for
TARGET_NODE = "x-nodelocal-target-node"


@dataclass(frozen=True)
class Limits:
    """What clients of the peer port may hold: one controller makes a few calls at a time;
    anything more is somebody else."""

    max_connections: int = 64
    max_waiting_calls: int = 16
    max_workers: int = 4
    handshake_timeout_ms: int = 3_000


PEER_LIMITS = Limits()


def _read(tls_dir: Path, name: str) -> bytes:
    try:
        return (tls_dir / name).read_bytes()
    except OSError as exc:
        raise ValueError(f"peer TLS: cannot read {tls_dir / name}: {exc.strerror}") from exc


def _server_configuration(tls_dir: Path) -> tuple[str, Any]:
    key, cert, ca = (_read(tls_dir, n) for n in ("tls.key", "tls.crt", "ca.crt"))
    digest = hashlib.sha256(key + b"\0" + cert + b"\0" + ca).hexdigest()
    return digest, grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """The node plugin's side: its certificate, and client certificates required from the
    controller CA (``ca.crt``). Looked at again at each new connection: a renewed Secret (the
    kubelet swaps the files) is used from the next handshake on; unreadable files keep the
    last good ones."""
    digest, initial = _server_configuration(tls_dir)
    current = [digest]
    lock = threading.Lock()

    def fetch() -> Any:
        try:
            digest, configuration = _server_configuration(tls_dir)
        except ValueError as exc:
            log.warning(
                "peer TLS files unreadable; keeping the last good ones", extra={"error": str(exc)}
            )
            return None
        with lock:
            if digest == current[0]:
                return None
            current[0] = digest
        log.info("peer TLS certificates changed; new connections use them")
        return configuration

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def channel_credentials(tls_dir: Path) -> grpc.ChannelCredentials:
    """The controller's side: its client certificate; servers trusted only from the node CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_dir, "ca.crt"),
        private_key=_read(tls_dir, "tls.key"),
        certificate_chain=_read(tls_dir, "tls.crt"),
    )


class NodePlugins:
    """Where the node plugin of a node listens: the address of its ready Pod, from the API."""

    def __init__(self, api: KubeApi, namespace: str, selector: str, port: int) -> None:
        self._api = api
        self._namespace = namespace
        self._selector = selector
        self._port = port

    def address(self, node: str, timeout: float) -> str:
        try:
            pods = self._api.get(
                f"/api/v1/namespaces/{urllib.parse.quote(self._namespace, safe='')}/pods",
                {"labelSelector": self._selector, "fieldSelector": f"spec.nodeName={node}"},
                timeout,
            )
        except ApiError as exc:
            raise Unavailable(f"cannot look up the node plugin of node {node!r}: {exc}") from exc
        ip = pick_pod_ip(pods.get("items") or [])
        if ip is None:
            raise Unavailable(f"no ready node plugin Pod runs on node {node!r}")
        return f"[{ip}]:{self._port}" if ":" in ip else f"{ip}:{self._port}"


def _daemonset_pod(meta: dict[str, Any]) -> bool:
    return any(
        isinstance(o, dict) and o.get("kind") == "DaemonSet" and o.get("controller") is True
        for o in meta.get("ownerReferences") or []
    )


def pick_pod_ip(pods: list[Any]) -> str | None:
    """The IP of the newest ready, running, not terminating Pod that a DaemonSet made (a
    rolling update briefly has two on a node: the old one is terminating; a stray Pod with the
    same labels is not a node plugin)."""
    best: tuple[str, str] | None = None
    for pod in pods:
        if not isinstance(pod, dict):
            continue
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        if not _daemonset_pod(meta):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
            if isinstance(c, dict)
        )
        ip = status.get("podIP")
        if not ready or not isinstance(ip, str) or not ip:
            continue
        created = str(meta.get("creationTimestamp") or "")
        if best is None or created > best[0]:
            best = (created, ip)
    return best[1] if best else None


class Forwarder:
    """Makes a Controller call on the node plugin of the node a volume lives on."""

    def __init__(
        self, plugins: NodePlugins, credentials: Callable[[], grpc.ChannelCredentials]
    ) -> None:
        self._plugins = plugins
        #: read for every call, so a renewed Secret is used as soon as the kubelet shows it
        self._credentials = credentials

    def modify_volume(
        self,
        node: str,
        request: csi_pb2.ControllerModifyVolumeRequest,
        time_remaining: float | None,
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        timeout = DEFAULT_TIMEOUT if time_remaining is None else time_remaining - 0.5
        timeout = min(max(timeout, 0.1), MAX_TIMEOUT)
        started = time.monotonic()
        address = self._plugins.address(node, timeout)
        timeout = max(timeout - (time.monotonic() - started), 0.1)
        try:
            credentials = self._credentials()
        except ValueError as exc:
            raise Unavailable(f"peer TLS: {exc}") from exc
        options = [("grpc.ssl_target_name_override", SERVER_NAME)]
        with grpc.secure_channel(address, credentials, options=options) as channel:
            stub = csi_pb2_grpc.ControllerStub(channel)
            try:
                stub.ControllerModifyVolume(
                    request, timeout=timeout, metadata=((TARGET_NODE, node),)
                )
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                details = cap_message(str(exc.details() or ""))
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise CsiError(
                        f"the node plugin of node {node!r} at {address} did not answer: {details}",
                        code,
                    ) from None
                raise CsiError(f"node {node!r}: {details}", code) from None
        log.info(
            "forwarded",
            extra={"rpc": "ControllerModifyVolume", "node": node, "volume_id": request.volume_id},
        )
        # an empty reply of our own: nothing the other side put in it reaches the caller
        return csi_pb2.ControllerModifyVolumeResponse()


class PeerControllerServicer(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    """What the node plugin serves on the peer channel: ControllerModifyVolume, answered by
    its own Controller service. Every other method is the generated UNIMPLEMENTED.

    The caller names the node it meant: a Pod address that now belongs to another node's
    plugin (the lookup raced a restart) must be a reason to retry, not the final NOT_FOUND
    that "this volume lives elsewhere" would be."""

    def __init__(self, controller: csi_pb2_grpc.ControllerServicer, node_id: str) -> None:
        self._controller = controller
        self._node = node_id

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        meant = [v for k, v in context.invocation_metadata() or () if k == TARGET_NODE]
        if not meant:
            raise InvalidArgument(f"a call on the peer channel must name its node ({TARGET_NODE})")
        if meant[-1] != self._node:
            raise Unavailable(
                f"this is the node plugin of {self._node!r}, not of {bounded.echo(meant[-1])}:"
                " the address changed hands; look it up again"
            )
        reply: csi_pb2.ControllerModifyVolumeResponse = self._controller.ControllerModifyVolume(
            request, context
        )
        return reply


__all__ = [
    "PEER_LIMITS",
    "SERVER_NAME",
    "TARGET_NODE",
    "Forwarder",
    "NodePlugins",
    "PeerControllerServicer",
    "channel_credentials",
    "pick_pod_ip",
    "server_credentials",
]
