"""Logging setup: human text or one JSON object per line, with structured extras.

Every line is bounded, whatever a caller passes: the message, each extra (through
``bounded.loggable``) and a traceback are cut, saying how long they were, so that no client
input can turn into megabyte log lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from csi_driver import bounded
from csi_driver.config import LogFormat

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is data.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


MESSAGE_CHARS = 2048
# All extras of one line, and each string among them: room for what the interceptor logs per
# RPC (a bounded request and a capped error message) to pass unchanged.
EXTRAS_BUDGET = 7168
EXTRA_STRING_CHARS = 2304
TRACEBACK_CHARS = 8192


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    out: dict[str, Any] = bounded.loggable(extras, EXTRAS_BUDGET, EXTRA_STRING_CHARS)
    return out


def _message(record: logging.LogRecord) -> str:
    return bounded.cut(record.getMessage(), MESSAGE_CHARS)


def _traceback(text: str) -> str:
    """The start and the end of a long traceback: where it began and what was raised."""
    if len(text) <= TRACEBACK_CHARS:
        return text
    head, tail = TRACEBACK_CHARS // 4, TRACEBACK_CHARS // 2
    return f"{text[:head]}\n… ({len(text) - head - tail} characters cut) …\n{text[-tail:]}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = _traceback(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + _traceback(self.formatException(record.exc_info))
        if record.stack_info:
            text += "\n" + _traceback(self.formatStack(record.stack_info))
        return text


def setup(log_format: LogFormat, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
