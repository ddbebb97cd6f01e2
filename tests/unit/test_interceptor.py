"""The interceptor over a real gRPC server on a unix socket: codes, logging, redaction, metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.config import Config, Endpoint, Mode
from csi_driver.errors import NotFound
from csi_driver.interceptor import REDACTED, ErrorAndLogInterceptor, redact
from csi_driver.metrics import Metrics
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.server import Server


class Misbehaving(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    """Each RPC fails in a different way."""

    def __init__(self) -> None:
        self.calls = 0

    def DeleteVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        raise NotFound(f"volume {request.volume_id} does not exist")

    def CreateVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        raise ValueError("unexpected bug")

    def ControllerGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        return csi_pb2.ControllerGetCapabilitiesResponse()


Served = tuple[csi_pb2_grpc.ControllerStub, Metrics, Misbehaving]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    metrics = Metrics()
    servicer = Misbehaving()
    endpoint = Endpoint("unix", str(tmp_path / "sock" / "csi.sock"))
    server = Server(
        endpoint,
        [lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(servicer, s)],
        [ErrorAndLogInterceptor(metrics)],
        grace_period=1,
    )
    server.start()
    channel = grpc.insecure_channel(endpoint.grpc_target)
    try:
        yield csi_pb2_grpc.ControllerStub(channel), metrics, servicer
    finally:
        channel.close()
        server.stop()
    assert not Path(endpoint.address).exists()


def test_csi_error_becomes_its_code(served: Served) -> None:
    stub, metrics, _ = served
    with pytest.raises(grpc.RpcError) as exc:
        stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), timeout=5)
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND
    assert exc.value.details() == "volume v1 does not exist"
    assert metrics.value("csi_driver_rpc_total", method="DeleteVolume", code="NOT_FOUND") == 1


def test_unexpected_exception_is_internal_and_server_survives(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    stub, _, servicer = served
    with (
        caplog.at_level(logging.ERROR, logger="csi_driver.rpc"),
        pytest.raises(grpc.RpcError) as exc,
    ):
        stub.CreateVolume(csi_pb2.CreateVolumeRequest(name="x"), timeout=5)
    assert exc.value.code() is grpc.StatusCode.INTERNAL
    assert "ValueError: unexpected bug" in (exc.value.details() or "")
    assert any(r.exc_info for r in caplog.records), "traceback must be logged"
    # still serving
    assert stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest(), timeout=5)
    assert servicer.calls == 1


def test_unimplemented_rpc(served: Served) -> None:
    stub, metrics, _ = served
    with pytest.raises(grpc.RpcError) as exc:
        stub.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=5)
    assert exc.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert metrics.value("csi_driver_rpc_total", method="ListVolumes", code="UNIMPLEMENTED") == 1


def test_secrets_never_reach_the_log(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    stub, _, _ = served
    with caplog.at_level(logging.INFO, logger="csi_driver.rpc"), pytest.raises(grpc.RpcError):
        stub.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id="v1", secrets={"password": "hunter2"}),
            timeout=5,
        )
    records = [r for r in caplog.records if getattr(r, "method", "") == "DeleteVolume"]
    assert records, "every RPC is logged"
    rendered = repr(vars(records[0]))
    assert "hunter2" not in rendered
    # the interceptor's fields come in through ``extra=``: attributes no LogRecord declares
    assert vars(records[0])["request"]["secrets"] == {"password": REDACTED}
    assert vars(records[0])["code"] == "NOT_FOUND"


def test_redact_walks_nested_messages() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="n",
        secrets={"k": "s3cret"},
        parameters={"a": "b"},
        volume_capabilities=[
            csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"))
        ],
    )
    out = redact(req)
    assert out["secrets"] == {"k": REDACTED}
    assert out["parameters"] == {"a": "b"}
    assert out["volume_capabilities"][0]["mount"]["fs_type"] == "xfs"
    assert "s3cret" not in repr(out)


def test_config_mode_is_plain() -> None:
    cfg = Config(endpoint=Endpoint("unix", "/x"), node_id="n", mode=Mode.CONTROLLER)
    assert not cfg.mode.serves_node and not cfg.mode.owns_volumes
