"""The per-RPC rules the CSI services share: domain errors → gRPC status codes, and per-object operation locks."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NoReturn, TypeVar, overload

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
# (scope, value): an object ID (volume, snapshot, group snapshot) names one object in every RPC, so its scope is "";
# a name asked for is only unique within its RPC (a volume and a snapshot may share one), so its scope is the RPC.
LockKey = tuple[str, str]


class OperationLocks:
    """One operation at a time per key; a second caller gets ABORTED at once and is never queued: the CO retries
    ABORTED with backoff, as the spec asks when an operation is pending, and a queue would pile retries up behind a
    stuck storage host or iSCSI login."""

    def __init__(self) -> None:
        self._held: dict[LockKey, str] = {}
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, operation: str, keys: Iterable[LockKey]) -> Iterator[None]:
        wanted = {key for key in keys if key[1]}
        with self._mutex:
            busy = sorted(wanted & self._held.keys())
            if busy:
                running = "; ".join(f"{self._held[key]} is still in progress on {_describe(key)}" for key in busy)
                raise RpcError(grpc.StatusCode.ABORTED, f"{running}; retry later")
            self._held.update(dict.fromkeys(wanted, operation))
        try:
            yield
        finally:
            with self._mutex:
                for key in wanted:
                    del self._held[key]


def _describe(key: LockKey) -> str:
    scope, value = key
    return f"name {value!r}" if scope else value


def lock_keys(operation: str, request: Any, attributes: Sequence[str]) -> list[LockKey]:
    """The keys of `request` named by `attributes`: `name`, or object IDs (one field, or a repeated one)."""
    keys: list[LockKey] = []
    for attribute in attributes:
        value = getattr(request, attribute)
        scope = operation if attribute == "name" else ""
        keys += [(scope, item) for item in ([value] if isinstance(value, str) else value)]
    return keys


class RpcRules:
    """The per-RPC rules of a servicer method, as its decorator: `@rpc`, or `@rpc(lock=("volume_id",))`.

    - Errors: RpcError and the domain errors in `codes` (first match wins) become gRPC statuses with their message.
      Anything else is a bug; the interceptor logs it and answers INTERNAL. A server-streaming method (a generator)
      gets the same mapping for errors raised while it streams.
    - Locks: `lock` names the request attributes whose values the whole call holds in the servicer's `locks`
      (an OperationLocks), so that two calls on one object never overlap."""

    def __init__(self, codes: ErrorCodes) -> None:
        self.codes = codes

    @overload
    def __call__(self, method: F) -> F: ...
    @overload
    def __call__(self, *, lock: Sequence[str]) -> Callable[[F], F]: ...

    def __call__(self, method: F | None = None, *, lock: Sequence[str] = ()) -> Any:
        if method is None:
            return lambda method: self._decorate(method, tuple(lock))
        return self._decorate(method, ())

    def _decorate(self, method: F, lock: tuple[str, ...]) -> F:
        codes, name = self.codes, method.__name__

        def held(servicer: Any, request: Any) -> AbstractContextManager[None]:
            return servicer.locks.hold(name, lock_keys(name, request, lock)) if lock else nullcontext()

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    with held(self, request):
                        yield from method(self, request, context)
                except Exception as err:
                    _abort(err, codes, name, context)

            return streaming  # type: ignore[return-value]

        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                with held(self, request):
                    return method(self, request, context)
            except Exception as err:
                _abort(err, codes, name, context)

        return wrapper  # type: ignore[return-value]


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


rpc = RpcRules(STORAGE_ERROR_CODES)
