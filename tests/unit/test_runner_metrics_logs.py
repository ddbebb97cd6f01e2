import json
import logging
import urllib.error
import urllib.request

import pytest

from csi_driver.config import LogFormat
from csi_driver.logs import JsonFormatter, setup
from csi_driver.metrics import Metrics, MetricsServer
from csi_driver.system.runner import CommandError, SubprocessRunner
from testkit.driver_process import parse_command_counts


def test_runner_returns_output_in_c_locale_and_counts() -> None:
    seen: list[tuple[str, bool]] = []
    runner = SubprocessRunner(observer=lambda prog, _s, ok: seen.append((prog, ok)))
    result = runner.run(["sh", "-c", 'printf "%s" "$LC_ALL"'])
    assert result.stdout == "C" and result.returncode == 0
    assert seen == [("sh", True)]


def test_runner_raises_structured_error_with_stderr() -> None:
    runner = SubprocessRunner()
    with pytest.raises(CommandError) as exc:
        runner.run(["sh", "-c", "echo bad thing >&2; exit 3"])
    assert exc.value.returncode == 3
    assert "bad thing" in exc.value.stderr
    assert "exited with status 3: bad thing" in str(exc.value)
    assert runner.run(["false"], check=False).returncode == 1


def test_runner_timeout_and_missing_program() -> None:
    runner = SubprocessRunner()
    with pytest.raises(CommandError) as exc:
        runner.run(["sleep", "5"], timeout=0.2)
    assert exc.value.timed_out and "timed out" in str(exc.value)
    with pytest.raises(CommandError) as exc2:
        runner.run(["/nonexistent/program"])
    assert exc2.value.not_found


def test_runner_refuses_a_shell_string() -> None:
    with pytest.raises(ValueError, match="argv"):
        # a str is a Sequence[str] to the type checker: only the runtime check catches it
        SubprocessRunner().run("echo hi")


def test_runner_prefix_is_prepended() -> None:
    runner = SubprocessRunner(prefix=("env", "FOO=bar"))
    assert runner.run(["sh", "-c", "echo $FOO"]).stdout.strip() == "bar"


def test_metrics_text_format() -> None:
    m = Metrics()
    m.observe_rpc("CreateVolume", "OK", 0.02)
    m.observe_rpc("CreateVolume", "OK", 0.2)
    m.observe_command("lvcreate", 0.1, False)
    text = m.render()
    # prometheus-client writes labels in name order and values as floats
    assert 'csi_driver_rpc_total{code="OK",method="CreateVolume"} 2.0' in text
    assert 'csi_driver_rpc_duration_seconds_bucket{le="0.025",method="CreateVolume"} 1.0' in text
    assert 'csi_driver_rpc_duration_seconds_bucket{le="+Inf",method="CreateVolume"} 2.0' in text
    assert 'csi_driver_command_total{program="lvcreate",result="error"} 1.0' in text
    assert parse_command_counts(text) == {("lvcreate", "error"): 1.0}
    assert m.value("csi_driver_rpc_total", method="CreateVolume", code="OK") == 2
    assert "# TYPE csi_driver_rpc_duration_seconds histogram" in text


def test_metrics_server_serves_metrics_and_health() -> None:
    m = Metrics()
    m.observe_rpc("Probe", "OK", 0.001)
    problem: list[str | None] = [None]
    server = MetricsServer("127.0.0.1:0", m, lambda: problem[0])
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'csi_driver_rpc_total{code="OK",method="Probe"} 1.0' in body
        assert "process_resident_memory_bytes" in body
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        problem[0] = "volume group vg0 is missing"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert exc.value.code == 503
        assert b"vg0" in exc.value.read()
    finally:
        server.stop()


def test_json_log_lines_carry_extras() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "rpc", None, None)
    record.method = "CreateVolume"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "rpc" and line["method"] == "CreateVolume" and line["level"] == "info"


def test_setup_sets_level_and_format() -> None:
    setup(LogFormat.JSON, "warning")
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    setup(LogFormat.TEXT, "INFO")
