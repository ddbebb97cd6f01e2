"""Huge request values over a real gRPC channel: the code the driver means reaches the client,
its message stays small, and the log does not grow with the input."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.bounded import STATUS_MESSAGE_BYTES
from testkit.driver_process import Csi, DriverProcess, csi_stubs
from tests.requests import create_request

pytestmark = pytest.mark.root

LOG_PER_REQUEST = 8192


@pytest.fixture
def served(workdir: Path) -> Iterator[tuple[DriverProcess, Csi]]:
    d = DriverProcess(workdir)  # log level debug: every RPC is logged with its request
    try:
        d.start()
        with csi_stubs(d.target) as csi:
            yield d, csi
    finally:
        d.stop()


def log_growth(driver: DriverProcess, call: Callable[[], object]) -> int:
    before = driver.log.stat().st_size
    call()
    time.sleep(0.2)  # the driver's stderr is line-buffered; let the line land
    return driver.log.stat().st_size - before


@pytest.mark.parametrize(
    "parameters",
    [
        {"wipeOnDelete": "a" * 17_000},
        {"wipeOnDelete": "b" * 1_000_000},
        {"c" * 17_000: "true"},
        {f"k{i}": "d" * 10_000 for i in range(300)},
    ],
    ids=["17KB-value", "1MB-value", "17KB-key", "300x10KB"],
)
def test_huge_parameters_get_invalid_argument_with_a_bounded_message_and_log(
    served: tuple[DriverProcess, Csi], parameters: dict[str, str]
) -> None:
    driver, csi = served
    errors: list[grpc.RpcError] = []

    def call() -> None:
        try:
            csi.controller.CreateVolume(create_request("huge", parameters), timeout=10)
        except grpc.RpcError as exc:
            errors.append(exc)

    grown = log_growth(driver, call)
    assert errors, "a bad parameter must be refused"
    assert errors[0].code() is grpc.StatusCode.INVALID_ARGUMENT, errors[0]
    details = errors[0].details() or ""
    assert 0 < len(details.encode()) <= STATUS_MESSAGE_BYTES, len(details)
    assert "bytes" in details, details  # a cut value says how long it was
    assert grown < LOG_PER_REQUEST, f"{grown} bytes logged for one request"
    volumes = driver.root / "volumes"
    assert not volumes.exists() or not any(volumes.iterdir())
