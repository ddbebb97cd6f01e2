"""Named points between the steps of an operation where a test can have the driver killed.

Every step of every RPC must survive a kill: the retry finishes it or undoes it. Random kills
find most windows; these points hit each window between two steps deterministically, so a
test can prove each one. ``CSI_DRIVER_FAILPOINTS=name[,name...]`` in the driver's environment
at start makes the process SIGKILL itself on reaching one of them; without it (always, in
production) a point is one lookup in an empty set.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "CSI_DRIVER_FAILPOINTS"
_ACTIVE = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def reach(name: str) -> None:
    """Die here, by SIGKILL as a power cut or an OOM kill would, when ``name`` is armed."""
    if name in _ACTIVE:
        log.warning("failpoint reached: killing the driver", extra={"failpoint": name})
        os.kill(os.getpid(), signal.SIGKILL)
