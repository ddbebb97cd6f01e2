"""Byte quantities as users write them: plain bytes or Kubernetes-style suffixes."""

from __future__ import annotations

import re

_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}
_QUANTITY = re.compile(r"\A([0-9]+)(|k|K|M|G|T|P|Ki|Mi|Gi|Ti|Pi)\Z")

KiB = 2**10
MiB = 2**20
GiB = 2**30


def parse_bytes(value: str) -> int:
    """Parse ``"1073741824"``, ``"1Gi"``, ``"500M"``; raise ValueError with the accepted forms."""
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(
            f"{value!r} is not a byte quantity; use an integer number of bytes, optionally with"
            " one of the suffixes k, M, G, T, P, Ki, Mi, Gi, Ti, Pi"
        )
    return int(m.group(1)) * _SUFFIXES[m.group(2)]


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
