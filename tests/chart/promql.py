"""Reads the names a PromQL expression uses: the series it selects, the labels it matches and
groups by, and the functions it calls.

Not a PromQL parser: a tokenizer that is strict where a typo hides. Every bare identifier that is
not a keyword and not followed by ``(`` must be a series name, and every identifier followed by
``(`` must be a known function or aggregation, so a misspelt metric can never pass as something
else. Grafana's template variables (``$node``, ``${node}``, ``$__rate_interval``) are read as the
values they stand for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FUNCTIONS = frozenset(
    {
        # aggregations
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
        # functions used on counters, gauges and histograms
        "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max",
        "clamp_min", "delta", "deriv", "exp", "floor", "histogram_quantile", "histogram_count",
        "histogram_sum", "histogram_fraction", "idelta", "increase", "irate", "label_replace",
        "label_join", "ln", "log2", "log10", "predict_linear", "rate", "resets", "round",
        "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
        "time", "timestamp", "vector", "avg_over_time", "min_over_time", "max_over_time",
        "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
        "last_over_time", "present_over_time",
    }
)  # fmt: skip

KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
)  # grouping keywords are removed with their label lists

_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_BARE_GROUP = re.compile(r"\b(group_left|group_right)\b(?!\s*\()", re.IGNORECASE)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*$")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_DURATION = re.compile(r"\b\d+(?:ms|s|m|h|d|w|y)(?:\d+(?:ms|s|m|h|d|w|y))*\b")
_NUMBER = re.compile(r"(?<![A-Za-z_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass(frozen=True)
class Names:
    series: frozenset[str]
    functions: frozenset[str]
    # (series or "" for a group clause, label) pairs
    labels: frozenset[tuple[str, str]]
    unknown_functions: frozenset[str]


def names(expr: str) -> Names:
    text = _GRAFANA_VAR.sub("1m", expr)
    text = _STRING.sub('""', text)
    labels: set[tuple[str, str]] = set()
    for match in _GROUPING.finditer(text):
        for label in match.group(2).split(","):
            if label.strip():
                labels.add(("", label.strip()))
    text = _GROUPING.sub(" ", text)
    text = _BARE_GROUP.sub(" ", text)
    # Each matcher block belongs to the identifier right before it (or stands alone).
    series: set[str] = set()
    pieces: list[str] = []
    last = 0
    for match in _MATCHERS.finditer(text):
        before = text[last : match.start()]
        owner = re.search(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*$", before)
        owner_name = owner.group(1) if owner else ""
        for part in match.group(1).split(","):
            if not part.strip():
                continue
            left = part.split('""')[0]
            found = _MATCHER.match(left)
            if not found:
                raise ValueError(f"cannot read the matcher {part!r} in {expr!r}")
            if found.group(1) == "__name__":
                raise ValueError(f"{expr!r} selects by __name__; name the series instead")
            labels.add((owner_name, found.group(1)))
        pieces.append(before)
        pieces.append(" ")
        last = match.end()
    pieces.append(text[last:])
    text = "".join(pieces)
    text = _RANGE.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    functions: set[str] = set()
    unknown: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        follows = text[match.end() :].lstrip()
        if follows.startswith("("):
            (functions if word in FUNCTIONS else unknown).add(word)
        elif word.lower() in KEYWORDS:
            continue
        else:
            series.add(word)
    if "{" in text or "}" in text:
        raise ValueError(f"unbalanced or nested braces in {expr!r}")
    return Names(frozenset(series), frozenset(functions), frozenset(labels), frozenset(unknown))
