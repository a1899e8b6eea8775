"""Logs every RPC once: method, duration, status code, request ID; bodies only with secrets stripped."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from csi_driver.server.logs import request_id
from csi_driver.server.redaction import redact

log = logging.getLogger("berth.rpc")

# A caller (or a sidecar) may send its own ID so one operation can be followed across components.
REQUEST_ID_METADATA_KEY = "x-request-id"
# Health checks: the livenessprobe sidecar calls Probe every few seconds, and those lines would drown every other
# one. A failing one is still a warning.
ROUTINE_METHODS = frozenset({"/csi.v1.Identity/Probe"})

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return handler  # unknown methods get gRPC's own UNIMPLEMENTED
        incoming = dict(details.invocation_metadata or ())
        call_id = str(incoming.get(REQUEST_ID_METADATA_KEY) or uuid.uuid4().hex[:12])[:64]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _logged(handler.unary_unary, details.method, call_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # SnapshotMetadata's calls
            return grpc.unary_stream_rpc_method_handler(
                _logged_stream(handler.unary_stream, details.method, call_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # CSI has no client-streaming calls


class _Call:
    """One RPC's log: its request at debug level, then one line when it ends."""

    def __init__(self, method: str, call_id: str, context: grpc.ServicerContext, request: Any) -> None:
        self.method = method
        self.call_id = call_id
        self.context = context
        self.started = time.monotonic()
        self.messages: int | None = None  # a stream's responses so far
        self._ended = False
        self._lock = threading.Lock()
        with self.serving():
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"method": method, "request": redact(request)})

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Run part of the call (all of a unary call, one response of a stream) with its request ID set. An error the
        servicer did not turn into a status is a bug: logged with its traceback, answered INTERNAL; both end the
        call."""
        token = request_id.set(self.call_id)
        try:
            yield
        except Exception as err:
            # ServicerContext.code() and .details() exist since grpcio 1.38; types-grpcio leaves them out.
            code = self.context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
                log.exception("unhandled error", extra={"method": self.method})
                code = grpc.StatusCode.INTERNAL
                try:
                    self.context.abort(code, f"internal error in {self.method}: {type(err).__name__}: {err}")
                finally:
                    self.end(code)
            self.end(code)
            raise
        finally:
            request_id.reset(token)

    def end(self, code: grpc.StatusCode | None = None) -> None:
        """The call's one line (only the first end() writes it); code None: the status the servicer set, else OK."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        code = code or self.context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
        extra: dict[str, Any] = {
            "method": self.method,
            "code": code.name,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "details": _text(self.context.details()),  # type: ignore[attr-defined]
        }
        if self.messages is not None:
            extra["messages"] = self.messages
        token = request_id.set(self.call_id)
        try:
            log.log(self._level(code), "rpc", extra=extra)
        finally:
            request_id.reset(token)

    def _level(self, code: grpc.StatusCode) -> int:
        if code != grpc.StatusCode.OK:
            return logging.WARNING
        return logging.DEBUG if self.method in ROUTINE_METHODS else logging.INFO

    def cancelled(self) -> None:
        """gRPC's callback when the call terminates: a stream its caller left before the end is logged here."""
        self.end(grpc.StatusCode.CANCELLED)


def _logged(behavior: Behavior, method: str, call_id: str) -> Behavior:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        call = _Call(method, call_id, context, request)
        with call.serving():
            response = behavior(request, context)
            if log.isEnabledFor(logging.DEBUG) and response is not None:
                log.debug("response", extra={"method": method, "response": redact(response)})
        call.end()
        return response

    return wrapper


def _logged_stream(behavior: Behavior, method: str, call_id: str) -> Behavior:
    """A server-streaming call: the request ID is set while each response is made, never across a yield (a stream
    its caller left is resumed, or collected, in another context)."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(method, call_id, context, request)
        call.messages = 0
        context.add_callback(call.cancelled)
        with call.serving():
            responses = iter(behavior(request, context))
        while True:
            with call.serving():
                response = next(responses, None)
            if response is None:
                call.end()
                return
            call.messages += 1
            yield response

    return wrapper


def _text(details: str | bytes | None) -> str:
    # grpc hands back whatever was set, and aborts store it as bytes.
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""
