"""What the driver echoes of its input stays small, whatever the input."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from csi_driver import bounded, ids
from csi_driver.errors import CsiError, InvalidArgument
from csi_driver.interceptor import REDACTED, redact
from csi_driver.logs import JsonFormatter, TextFormatter
from csi_driver.proto import csi_pb2
from csi_driver.services import convert


def test_echo_is_repr_when_short_and_cut_with_the_length_when_long() -> None:
    assert bounded.echo("abc") == "'abc'"
    long = "a" * 17000
    assert bounded.echo(long) == f"'{'a' * bounded.ECHO_CHARS}…' (17000 bytes)"
    assert len(bounded.echo("\x00" * 100_000)) < 500
    assert bounded.echo("é" * 200).endswith("(400 bytes)")


def test_cap_message_keeps_utf8_whole_and_says_the_length() -> None:
    assert bounded.cap_message("short") == "short"
    capped = bounded.cap_message("é" * 5000)
    assert len(capped.encode()) <= bounded.STATUS_MESSAGE_BYTES
    assert capped.endswith("(message cut, 10000 bytes in all)")
    capped.encode("utf-8")  # no half character


def test_loggable_bounds_strings_entries_and_the_total() -> None:
    huge = {
        "name": "n" * 1_000_000,
        "parameters": {f"k{i}": "v" * 10_000 for i in range(1000)},
        "flags": ["" for _ in range(100_000)],
        "nested": [{"x" * 5000: ["y" * 5000] * 100}] * 100,
    }
    out = bounded.loggable(huge)
    text = json.dumps(out)
    assert len(text) < 2 * bounded.LOG_BUDGET, len(text)
    assert out["name"].endswith("… (1000000 bytes)")
    assert "more entries" in json.dumps(out["parameters"]) or "…" in out
    # a small structure comes back as it was
    small = {"a": "b", "c": [1, 2, True, None], "d": {"e": "f"}}
    assert bounded.loggable(small) == small


def test_redacted_request_log_is_bounded_and_keeps_secrets_out() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="x" * 1_000_000,
        parameters={f"p{i}": "v" * 17000 for i in range(100)},
        secrets={"password": "hunter2" * 1000},
    )
    out = bounded.loggable(redact(req))
    text = json.dumps(out)
    assert len(text) < 8192, len(text)
    assert "hunter2" not in text
    assert "more entries" in text, "what did not fit is said to be left out"
    small = bounded.loggable(redact(csi_pb2.CreateVolumeRequest(name="n", secrets={"k": "v"})))
    assert small == {"name": "n", "secrets": {"k": REDACTED}}


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_every_log_line_is_bounded(formatter: logging.Formatter) -> None:
    try:
        raise ValueError("z" * 1_000_000)
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, "f", 1, "m" * 1_000_000, None, sys.exc_info()
        )
    record.request = {"name": "n" * 1_000_000}
    record.argv = ["a" * 100_000] * 100
    line = formatter.format(record)
    assert len(line) < 20_000, len(line)
    assert "(1000000 bytes)" in line


def test_messages_that_quote_request_values_are_bounded() -> None:
    with pytest.raises(InvalidArgument) as exc:
        convert.require_abs_path("x" * 4000, "target_path")
    assert len(exc.value.message) < 600
    assert "(4000 bytes)" in exc.value.message
    with pytest.raises(InvalidArgument) as exc:
        convert.require_abs_path("/a/../" + "b" * 4000, "target_path")
    assert len(exc.value.message) < 600
    cap = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="f" * 100_000),
    )
    with pytest.raises(InvalidArgument) as exc:
        convert.capability_from_pb(cap)
    assert len(exc.value.message) < 600
    long_id = "v" + "0" * 32 + "@" + "n" * 150
    with pytest.raises(CsiError) as exc2:
        ids.require_volume_id(long_id)
    assert len(str(exc2.value)) < 600


def test_log_output_of_a_handler_is_bounded() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.bounded")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("created %s", "n" * 1_000_000, extra={"path": "/p" * 100_000})
    finally:
        logger.removeHandler(handler)
    assert len(stream.getvalue()) < 8192
