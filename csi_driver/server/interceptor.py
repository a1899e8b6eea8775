"""Logs every RPC once: method, duration, status code, request ID; bodies only with secrets stripped."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from csi_driver.server.logs import request_id
from csi_driver.server.redaction import redact

log = logging.getLogger("berth.rpc")

# A caller (or a sidecar) may send its own ID so one operation can be followed across components.
REQUEST_ID_METADATA_KEY = "x-request-id"


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown methods get gRPC's own UNIMPLEMENTED; streams are not used by CSI here
        incoming = dict(details.invocation_metadata or ())
        call_id = str(incoming.get(REQUEST_ID_METADATA_KEY) or uuid.uuid4().hex[:12])[:64]
        return grpc.unary_unary_rpc_method_handler(
            _logged(handler.unary_unary, details.method, call_id),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _logged(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str, call_id: str) -> Callable:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        token = request_id.set(call_id)
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"method": method, "request": redact(request)})
            response = behavior(request, context)
            code = context.code() or grpc.StatusCode.OK
            if log.isEnabledFor(logging.DEBUG) and response is not None:
                log.debug("response", extra={"method": method, "response": redact(response)})
            return response
        except Exception as err:
            code = context.code() or grpc.StatusCode.UNKNOWN
            if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
                # A bug, not a deliberate abort: say so once with the traceback and answer INTERNAL.
                log.exception("unhandled error", extra={"method": method})
                code = grpc.StatusCode.INTERNAL
                context.abort(code, f"internal error in {method}: {type(err).__name__}: {err}")
            raise
        finally:
            duration_ms = round((time.monotonic() - started) * 1000, 1)
            level = logging.INFO if code == grpc.StatusCode.OK else logging.WARNING
            log.log(
                level,
                "rpc",
                extra={
                    "method": method,
                    "code": code.name,
                    "duration_ms": duration_ms,
                    "details": _text(context.details()),
                },
            )
            request_id.reset(token)

    return wrapper


def _text(details: str | bytes | None) -> str:
    # grpc hands back whatever was set, and aborts store it as bytes.
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""
