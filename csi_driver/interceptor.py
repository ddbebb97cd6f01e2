"""The one place where errors become gRPC statuses, and where every RPC is logged and counted."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from csi_driver import bounded
from csi_driver.errors import CsiError
from csi_driver.metrics import Metrics
from csi_driver.system.runner import DEADLINE_EXCEEDED, CancelToken, bound_to

log = logging.getLogger("csi_driver.rpc")

REDACTED = "<redacted>"


def _is_secret(field: Any) -> bool:
    """A field the CSI spec marks ``csi_secret`` (or, defensively, any map named *secrets)."""
    try:
        for option, value in field.GetOptions().ListFields():
            if option.name == "csi_secret" and value:
                return True
    except Exception:
        return False
    return bool(field.name.endswith("secrets"))


_SECRET, _MAP, _MESSAGE, _PLAIN = range(4)
#: what each field is, for :func:`redact`, by its full name: options are read once per field
_KINDS: dict[str, int] = {}


def _kind(field: Any) -> int:
    kind = _KINDS.get(field.full_name)
    if kind is None:
        if _is_secret(field):
            kind = _SECRET
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            kind = _MAP
        else:
            kind = _PLAIN if field.message_type is None else _MESSAGE
        _KINDS[field.full_name] = kind  # a race only computes the same answer twice
    return kind


def redact(message: Message) -> dict[str, Any]:
    """A loggable view of a request: every secret value replaced, nested messages included."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        kind = _kind(field)
        if kind == _SECRET:
            out[field.name] = dict.fromkeys(value, REDACTED) if hasattr(value, "keys") else REDACTED
        elif kind == _MAP:
            out[field.name] = dict(value)
        elif kind == _MESSAGE:
            if field.is_repeated:
                out[field.name] = [redact(v) for v in value]
            else:
                out[field.name] = redact(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


@contextlib.contextmanager
def _bound_to_rpc(context: grpc.ServicerContext) -> Iterator[None]:
    """The external commands of an RPC die with it: the runner kills them when the client
    cancels or the deadline passes, and what the handler then raises answers CANCELLED or
    DEADLINE_EXCEEDED (the per-volume lock is released on the way out)."""
    token = CancelToken.within(context.time_remaining())
    if not context.add_callback(token.cancel):
        token.cancel()
    with bound_to(token):
        try:
            yield
        except Exception as exc:
            reason = token.reason()
            if reason is None:
                raise
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if reason == DEADLINE_EXCEEDED
                else grpc.StatusCode.CANCELLED
            )
            raise CsiError(f"{reason}: {exc}", code) from exc


class ErrorAndLogInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Logs method, duration and code of every RPC; maps exceptions to statuses.

    CsiError -> its code and message. NotImplementedError (the generated base servicers raise it)
    -> UNIMPLEMENTED. Anything else -> INTERNAL with a message, logged with its traceback; the
    server keeps running. The status message is capped (``bounded.cap_message``) and the
    request is logged bounded (``bounded.loggable``): neither grows with the client's input.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        #: method -> (the handler it wraps, the wrapping): made once per method, not per call
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        full = handler_call_details.method
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapping = self._wrap(handler, full.rsplit("/", 1)[-1])
        self._wrapped[full] = (handler, wrapping)
        return wrapping

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        quiet = method in ("Probe", "NodeGetCapabilities", "GetPluginInfo")
        observe = self._metrics.observe_rpc
        inner = handler.unary_unary
        assert inner is not None

        def wrapped(request: Message, context: grpc.ServicerContext) -> Message:
            start = time.monotonic()
            code = grpc.StatusCode.OK
            message = ""
            try:
                with _bound_to_rpc(context):
                    response: Message = inner(request, context)
                return response
            except CsiError as exc:
                code, message = exc.code, exc.message
            except NotImplementedError:
                code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method}: {type(exc).__name__}: {exc}"
                log.exception("unexpected error", extra={"method": method})
            finally:
                message = bounded.cap_message(message)
                seconds = time.monotonic() - start
                observe(method, code.name, seconds)
                level = logging.INFO if code is grpc.StatusCode.OK else logging.WARNING
                if quiet:
                    level = logging.DEBUG if code is grpc.StatusCode.OK else level
                if log.isEnabledFor(level):
                    log.log(
                        level,
                        "rpc",
                        extra={
                            "method": method,
                            "code": code.name,
                            "seconds": round(seconds, 4),
                            "request": bounded.loggable(redact(request)),
                            **({"error": message} if message else {}),
                        },
                    )
            context.abort(code, message)
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
