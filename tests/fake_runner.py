"""A stand-in for the command runner, for unit tests of error paths only: it records every
argv and answers from a handler instead of running anything."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from csi_driver.system.runner import DEFAULT_TIMEOUT, CommandError, CommandResult, Runner

#: given the argv, returns the result to answer (None: success with no output) or raises
Handler = Callable[[tuple[str, ...]], CommandResult | None]


def result(argv: tuple[str, ...], rc: int = 0, out: str = "", err: str = "") -> CommandResult:
    return CommandResult(argv, rc, out, err, 0.0)


class FakeRunner:
    """Records argv (and timeouts); ``handler`` may return a result, raise, or return None for
    success. A non-zero result raises CommandError when ``check`` is set, as the real one does.
    With ``passthrough`` (a real runner), a call the handler answers None for really runs."""

    def __init__(self, handler: Handler | None = None, passthrough: Runner | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.timeouts: list[float] = []
        self.handler = handler
        self.passthrough = passthrough

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        self.timeouts.append(timeout)
        answer = self.handler(args) if self.handler else None
        if answer is None and self.passthrough is not None:
            return self.passthrough.run(args, timeout=timeout, check=check, input=input, env=env)
        if answer is None:
            answer = result(args)
        if check and answer.returncode != 0:
            raise CommandError(args, answer.returncode, answer.stdout, answer.stderr)
        return answer
