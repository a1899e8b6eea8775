"""Domain errors → gRPC status codes, and per-object operation locks, shared by the CSI services."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import grpc

from csi_driver.storage import errors as storage

log = logging.getLogger("berth.services")

STORAGE_ERROR_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (storage.NotFound, grpc.StatusCode.NOT_FOUND),
    (storage.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (storage.CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (storage.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (storage.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (storage.InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (storage.HostNotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (storage.NotSupported, grpc.StatusCode.FAILED_PRECONDITION),
    (storage.Busy, grpc.StatusCode.ABORTED),
    (storage.HostUnreachable, grpc.StatusCode.UNAVAILABLE),
    (storage.CommandTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (storage.StorageError, grpc.StatusCode.INTERNAL),
]


class RpcError(Exception):
    """Raised inside a service method to answer with a status; the decorator turns it into an abort."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


F = TypeVar("F", bound=Callable[..., Any])
ErrorCodes = list[tuple[type[Exception], grpc.StatusCode]]


def rpc_mapping(codes: ErrorCodes) -> Callable[[F], F]:
    """Decorator for servicer methods: RpcError and the domain errors in `codes` (first match wins) become
    gRPC statuses with their message. Anything else is a bug; the interceptor logs it and answers INTERNAL.
    A server-streaming method (a generator) gets the same mapping for errors raised while it streams."""

    def decorate(method: F) -> F:
        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    yield from method(self, request, context)
                except Exception as err:
                    _abort(err, codes, method.__name__, context)

            return streaming  # type: ignore[return-value]

        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except Exception as err:
                _abort(err, codes, method.__name__, context)

        return wrapper  # type: ignore[return-value]

    return decorate


def _abort(err: Exception, codes: ErrorCodes, method: str, context: grpc.ServicerContext) -> NoReturn:
    """Answer `err` with its status (context.abort raises), or raise it again when it is not a known error."""
    if isinstance(err, RpcError):
        context.abort(err.code, str(err))
    code = next((code for kind, code in codes if isinstance(err, kind)), None)
    if code is None:
        raise err
    level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
    log.log(level, "%s failed", method, extra={"code": code.name, "reason": str(err)})
    context.abort(code, str(err))


rpc = rpc_mapping(STORAGE_ERROR_CODES)


class OperationLocks:
    """One operation at a time per key (volume ID, request name); a second caller gets ABORTED at once.

    The CO retries ABORTED with backoff, which is what the spec asks for when an operation is pending.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {key for key in keys if key}
        with self._mutex:
            busy = wanted & self._held
            if busy:
                raise RpcError(
                    grpc.StatusCode.ABORTED,
                    f"an operation on {', '.join(sorted(busy))} is already in progress; retry later",
                )
            self._held |= wanted
        try:
            yield
        finally:
            with self._mutex:
                self._held -= wanted
