"""The one place where external programs run: argument lists, a timeout, structured errors.

Every call is logged and counted, so the cost of an operation in external commands
(lvm2 calls are ~100 ms each on real nodes) can be measured.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float


class CommandError(Exception):
    """A command exited non-zero, timed out, or could not be started."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str = "",
        stderr: str = "",
        *,
        timed_out: bool = False,
        not_found: bool = False,
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        self.not_found = not_found
        if timed_out:
            what = "timed out"
        elif not_found:
            what = "could not be started (program not found)"
        else:
            what = f"exited with status {returncode}"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"{self.argv[0]} {what}" + (f": {detail}" if detail else ""))


class Runner(Protocol):
    """Runs one external program. Tests swap it for a recording fake to reach error paths."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult: ...


@dataclass
class SubprocessRunner:
    """Runs programs with subprocess, in the C locale, never through a shell.

    ``prefix`` is prepended to every argv (for example ``nsenter --mount=/proc/1/ns/mnt --``
    to run in the host's mount namespace). ``observer`` receives (program, seconds, ok) for metrics.
    """

    prefix: Sequence[str] = ()
    observer: Callable[[str, float, bool], None] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        full = (*self.prefix, *argv)
        run_env = dict(os.environ)
        run_env.update({"LC_ALL": "C", "LANG": "C"})
        run_env.update(self.extra_env)
        if env:
            run_env.update(env)
        program = os.path.basename(argv[0])
        start = time.monotonic()
        try:
            proc = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=run_env,
                check=False,
                close_fds=True,
            )
        except subprocess.TimeoutExpired as exc:
            duration = time.monotonic() - start
            self._observe(program, duration, False)
            log.warning("command timed out", extra={"argv": full, "timeout": timeout})
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise CommandError(full, None, out, err, timed_out=True) from exc
        except FileNotFoundError as exc:
            self._observe(program, time.monotonic() - start, False)
            raise CommandError(full, None, "", str(exc), not_found=True) from exc
        duration = time.monotonic() - start
        ok = proc.returncode == 0
        self._observe(program, duration, ok)
        log.debug(
            "command finished",
            extra={"argv": full, "returncode": proc.returncode, "seconds": round(duration, 4)},
        )
        result = CommandResult(full, proc.returncode, proc.stdout, proc.stderr, duration)
        if check and not ok:
            raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
        return result

    def _observe(self, program: str, seconds: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer(program, seconds, ok)
