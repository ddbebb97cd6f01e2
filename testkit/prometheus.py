"""A real Prometheus that scrapes running drivers and evaluates the chart's alert rules.

The rules are the chart's own PrometheusRule, rendered by the real helm with the thresholds of
the values given and every ``for`` set to 0s, so an alert fires at the first evaluation whose
scraped samples meet its expression. Each target carries the labels the chart's PodMonitor
gives a node plugin's series (``job``, ``namespace``, ``pod``, ``node``), so the rules see what
they would see in a cluster. The binaries come from Debian's ``prometheus`` package, which
``scripts/install-chart-tools.sh`` unpacks into the cache's ``bin`` directory.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from testkit.driver_process import REPO
from testkit.ports import free_port

RELEASE = "nodelocal-csi"
NAMESPACE = "kube-system"
#: the scrape job the chart's PodMonitor names (the "nodelocal-csi.metricsJob" helper)
JOB = f"{RELEASE}-node"
START_TIMEOUT = 120.0
#: every ``for`` of the chart's alerts, so that one evaluation decides
FOR_KEYS = ("thinPool", "lowFree", "rpcErrors", "notReady", "targetDown")


def bin_dir() -> Path:
    """Where helm, prometheus and promtool are: ``CSI_TOOLS_BIN`` (the VM lane's guest sets
    it), else the cache's ``bin``."""
    if os.environ.get("CSI_TOOLS_BIN"):
        return Path(os.environ["CSI_TOOLS_BIN"])
    cache = Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))
    return cache / "bin"


def render_rules(out: Path, *, backend: str = "lvm", values: Mapping[str, Any] = {}) -> Path:
    """The chart's alert rule groups, as a Prometheus rule file at ``out``."""
    rule_values: dict[str, Any] = {
        "enabled": True,
        "force": True,
        "for": dict.fromkeys(FOR_KEYS, "0s"),
        **values,
    }
    proc = subprocess.run(
        [
            str(bin_dir() / "helm"),
            "template",
            RELEASE,
            str(REPO / "charts" / RELEASE),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            "1.34.4",
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set-json",
            f"backend={json.dumps(backend)}",
            "--set-json",
            f"metrics.prometheusRule={json.dumps(rule_values)}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    rule = yaml.safe_load(proc.stdout)
    out.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return out


@dataclass(frozen=True)
class Alert:
    name: str
    state: str  # "pending" or "firing"
    labels: Mapping[str, str]
    value: float


@dataclass
class Prometheus:
    """``prometheus`` scraping ``targets`` (address -> the node plugin's node name) and
    evaluating ``rules`` every ``interval`` (a scrape may take as long); a context manager."""

    workdir: Path
    rules: Path
    targets: Mapping[str, str]
    interval: str = "1s"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(self.rules)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scrape_timeout": self.interval,
                    "static_configs": [
                        {
                            "targets": [address],
                            "labels": {
                                "namespace": NAMESPACE,
                                "pod": f"{JOB}-{node}",
                                "node": node,
                            },
                        }
                        for address, node in self.targets.items()
                    ],
                }
            ],
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = self.port or free_port()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(bin_dir() / "prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self._url("/-/ready"), timeout=2) as reply:  # noqa: S310
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"prometheus not ready in {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _url(self, path: str, **query: str) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"http://127.0.0.1:{self.port}{path}{suffix}"

    def _get(self, path: str, **query: str) -> Any:
        with urllib.request.urlopen(self._url(path, **query), timeout=10) as reply:  # noqa: S310
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query", query=expr)["result"]
        return result

    def alerts(self) -> list[Alert]:
        return [
            Alert(a["labels"]["alertname"], a["state"], a["labels"], float(a["value"]))
            for a in self._get("/api/v1/alerts")["alerts"]
        ]

    def rule_health(self) -> dict[str, str]:
        """Every rule's health after its last evaluation ("ok", "err", "unknown"), by name."""
        return {
            rule["name"]: rule["health"]
            + (f": {rule['lastError']}" if rule.get("lastError") else "")
            for group in self._get("/api/v1/rules")["groups"]
            for rule in group["rules"]
        }

    def last_evaluation(self) -> float:
        """The wall-clock time at which every rule group had last been evaluated (the
        earliest of the groups' last evaluations)."""
        groups = self._get("/api/v1/rules")["groups"]
        return min((_timestamp(g["lastEvaluation"]) for g in groups), default=0.0)

    def firing_after_scrapes(
        self, until: str = "", scrapes: int = 2, timeout: float = 60.0
    ) -> dict[str, list[Alert]]:
        """The alerts firing, by name, once every target was scraped ``scrapes`` more times,
        the PromQL expression ``until`` (if given) returns a sample, and every rule group was
        evaluated after that: the state the rules see is the one the caller waited for."""
        deadline = time.monotonic() + timeout
        start = self._scrape_count()
        while time.monotonic() < deadline:
            scraped = self._scrape_count() >= start + scrapes * len(self.targets)
            if scraped and (not until or self.query(until)):
                seen = time.time()
                while self.last_evaluation() <= seen:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"rules not evaluated in {timeout} s")
                    time.sleep(0.2)
                return by_name(a for a in self.alerts() if a.state == "firing")
            time.sleep(0.2)
        raise AssertionError(
            f"after {timeout} s: {scrapes} scrapes of each target, or {until!r}, not seen:\n"
            f"{self.log_tail()}"
        )

    def _scrape_count(self) -> int:
        """Scrapes tried so far, of all targets, whether they worked or not (a stopped
        target's count goes on): what a caller waits for is in ``until``."""
        samples = self.query(f'count_over_time(up{{job="{JOB}"}}[1h])')
        return sum(int(float(s["value"][1])) for s in samples)


def _timestamp(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times carry nanoseconds, which datetime does not take."""
    head, _, rest = rfc3339.partition(".")
    if not rest:
        return datetime.fromisoformat(rfc3339).timestamp()
    digits = "".join(itertools.takewhile(str.isdigit, rest))
    zone = rest[len(digits) :]
    return datetime.fromisoformat(f"{head}.{digits[:6]:0<6}{zone}").timestamp()


def by_name(alerts: Iterable[Alert]) -> dict[str, list[Alert]]:
    out: dict[str, list[Alert]] = {}
    for alert in alerts:
        out.setdefault(alert.name, []).append(alert)
    return out
