"""The one place where external programs run: argument lists, a timeout, structured errors.

Every call is logged and counted, so the cost of an operation in external commands
(lvm2 calls are ~100 ms each on real nodes) can be measured.

Every command is bound to the work it serves. The caller of a unit of work (the RPC
interceptor, a background thread) opens :func:`bound_to` with a :class:`CancelToken`; a command
run inside it is killed as soon as the token is cancelled or its deadline passes, and raises
:class:`CommandError` with ``cancelled`` set. To whoever started the command that looks exactly
like a kill of the driver at that point, which every operation already survives. A child runs
in a session of its own, so killing it kills everything it started (a ``mount`` helper, an
``nsenter``-ed lvm2), and the same group kill ends a command that runs out of its timeout.
Because a child in its own session no longer dies with the driver's process group, it is also
started under ``setpriv --pdeathsig KILL``: the kernel kills it if the driver dies first.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from csi_driver.system.failure import Reason, SystemFailure

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
#: how often a running command looks at its token: the longest a cancelled command lives on
POLL_INTERVAL = 0.05
#: how long the output of a killed command is waited for (a child that left the process
#: group may still hold its pipes)
KILL_GRACE = 5.0
_DIE_WITH_DRIVER = ("--pdeathsig", "KILL", "--")

CANCELLED = "cancelled"
DEADLINE_EXCEEDED = "deadline exceeded"
_TIMED_OUT = "timed out"


class CancelToken:
    """Says when the work a command serves has been called off: :meth:`cancel` from any
    thread, or a deadline on the monotonic clock. Knows nothing of what the work is."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._event = threading.Event()

    @classmethod
    def within(cls, seconds: float | None) -> CancelToken:
        """A token whose deadline is ``seconds`` from now (None: no deadline)."""
        return cls(None if seconds is None else time.monotonic() + max(0.0, seconds))

    def cancel(self) -> None:
        self._event.set()

    def reason(self) -> str | None:
        """:data:`DEADLINE_EXCEEDED`, :data:`CANCELLED`, or None while the work may go on."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return DEADLINE_EXCEEDED
        return CANCELLED if self._event.is_set() else None


_token: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "csi_driver_cancel_token", default=None
)


@contextlib.contextmanager
def bound_to(token: CancelToken | None) -> Iterator[CancelToken | None]:
    """Commands run in this context (this thread, until the block ends) stop when ``token``
    fires. ``None`` shields a block from an outer token: work that must run to its end once
    begun, because redoing it from scratch on every retry might never finish."""
    reset = _token.set(token)
    try:
        yield token
    finally:
        _token.reset(reset)


def current_token() -> CancelToken | None:
    return _token.get()


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float


class CommandError(SystemFailure):
    """A command exited non-zero, timed out, was cancelled, or could not be started.

    ``cancelled`` holds :data:`CANCELLED` or :data:`DEADLINE_EXCEEDED` when the command was
    killed (or never started) because the work it served was called off; ``reason`` (see
    :class:`~csi_driver.system.failure.Reason`) says which of these it was."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str = "",
        stderr: str = "",
        *,
        timed_out: bool = False,
        not_found: bool = False,
        cancelled: str | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        self.not_found = not_found
        self.cancelled = cancelled
        if cancelled:
            what = f"was stopped: its request was {cancelled}"
            if cancelled == DEADLINE_EXCEEDED:
                what = "was stopped: the deadline of its request passed"
        elif timed_out:
            what = "timed out"
        elif not_found:
            what = "could not be started (program not found)"
        else:
            what = f"exited with status {returncode}"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() and not cancelled else ""
        super().__init__(
            f"{self.argv[0]} {what}" + (f": {detail}" if detail else ""),
            reason=_reason(stderr, timed_out=timed_out, not_found=not_found, cancelled=cancelled),
        )


#: what programs print for ENOSPC and EDQUOT (their strerror, in the C locale)
_NO_SPACE_SAYINGS = ("no space left", "quota exceeded")


def _reason(stderr: str, *, timed_out: bool, not_found: bool, cancelled: str | None) -> Reason:
    """Why a command failed, as far as it says without knowing the program: stopped, out of
    time, missing, or out of space; a program's own words mean more to its caller (lvm2.py)."""
    if cancelled:
        return Reason.DEADLINE if cancelled == DEADLINE_EXCEEDED else Reason.CANCELLED
    if timed_out:
        return Reason.TIMED_OUT
    if not_found:
        return Reason.UNUSABLE
    lower = stderr.lower()
    return Reason.NO_SPACE if any(s in lower for s in _NO_SPACE_SAYINGS) else Reason.FAILED


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


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child's process group (its pid is the group id: it leads its session).
    Only while the child is unreaped, so the id cannot belong to anyone else yet."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Output of a killed child; gives up on pipes held open by something outside its group."""
    try:
        out, err = proc.communicate(timeout=KILL_GRACE)
        return out or "", err or ""
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return "", ""


@contextlib.contextmanager
def _stdin(data: str | None) -> Iterator[int | IO[bytes]]:
    """What the child reads: nothing, or ``data`` from an unlinked file. A file, unlike a pipe,
    is never full, so the wait for the child can be sliced without feeding it on the way."""
    if not data:
        yield subprocess.DEVNULL
        return
    import tempfile  # here, not at the top: few commands read stdin (start-up time)

    with tempfile.TemporaryFile() as f:
        f.write(data.encode())
        f.seek(0)
        yield f


@dataclass
class SubprocessRunner:
    """Runs programs with subprocess, in the C locale, never through a shell.

    ``prefix`` is prepended to every argv (for example ``nsenter --mount=/proc/1/ns/mnt --``
    to run in the host's mount namespace). ``observer`` receives (program, seconds, ok) for metrics.
    """

    prefix: Sequence[str] = ()
    observer: Callable[[str, float, bool], None] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        setpriv = shutil.which("setpriv")
        self._wrapper: tuple[str, ...] = (setpriv, *_DIE_WITH_DRIVER) if setpriv else ()
        if not setpriv:
            log.warning("setpriv not found: a command may outlive a killed driver")

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
        token = _token.get()
        start = time.monotonic()
        reason = token.reason() if token is not None else None
        if reason is not None:
            self._observe(program, 0.0, False)
            raise CommandError(full, None, cancelled=reason)
        if shutil.which(full[0], path=run_env.get("PATH", os.defpath)) is None:
            self._observe(program, time.monotonic() - start, False)
            raise CommandError(full, None, "", f"{full[0]}: not found", not_found=True)
        with _stdin(input) as stdin:
            try:
                proc = subprocess.Popen(
                    (*self._wrapper, *full),
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=run_env,
                    close_fds=True,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                self._observe(program, time.monotonic() - start, False)
                raise CommandError(full, None, "", str(exc), not_found=True) from exc
        try:
            out, err, reason = self._wait(proc, start + timeout, token)
        except BaseException:
            _kill_group(proc)
            _reap(proc)
            raise
        duration = time.monotonic() - start
        if reason is not None:
            self._observe(program, duration, False)
            if reason == _TIMED_OUT:
                log.warning("command timed out", extra={"argv": full, "timeout": timeout})
                raise CommandError(full, None, out, err, timed_out=True)
            log.warning(
                "command stopped", extra={"argv": full, "reason": reason, "seconds": duration}
            )
            raise CommandError(full, None, out, err, cancelled=reason)
        returncode = proc.returncode
        ok = returncode == 0
        self._observe(program, duration, ok)
        log.debug(
            "command finished",
            extra={"argv": full, "returncode": returncode, "seconds": round(duration, 4)},
        )
        result = CommandResult(full, returncode, out, err, duration)
        if check and not ok:
            raise CommandError(full, returncode, out, err)
        return result

    @staticmethod
    def _wait(
        proc: subprocess.Popen[str], limit: float, token: CancelToken | None
    ) -> tuple[str, str, str | None]:
        """(stdout, stderr, why it was killed: None, _TIMED_OUT or the token's reason). Waits in
        short slices so that a cancelled token or a passed deadline kills the child's group."""
        while True:
            stop = limit
            if token is not None and token.deadline is not None:
                stop = min(stop, token.deadline)
            slice_ = max(0.0, min(POLL_INTERVAL, stop - time.monotonic()))
            try:
                out, err = proc.communicate(timeout=slice_)
                return out or "", err or "", None
            except subprocess.TimeoutExpired:
                pass
            reason = token.reason() if token is not None else None
            if reason is None and time.monotonic() >= limit:
                reason = _TIMED_OUT
            if reason is not None:
                _kill_group(proc)
                out, err = _reap(proc)
                return out, err, reason

    def _observe(self, program: str, seconds: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer(program, seconds, ok)
