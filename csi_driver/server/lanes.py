"""Worker lanes: Identity, Controller and Node calls each run on threads of their own.

gRPC Python serves every method from one thread pool. A burst of long calls (20 CreateVolume at once, NodeStage
calls waiting for os-brick's host-wide lock after a node reboot) then kept Probe queued until its deadline passed,
and kubelet restarted the node plugin in the middle of attaching; in all-in-one mode node calls waited behind
controller calls. Each lane is a pool of its own, chosen per method through gRPC's per-method thread pool
(`experimental_thread_pool` on the method's behaviour): the quick calls (Identity, the GetCapabilities calls,
NodeGetInfo) never touch storage and get a small lane nobody else uses.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

QUICK_WORKERS = 4
# Calls that only describe the plugin: they answer from memory, so they may never wait behind storage work.
QUICK_METHODS = frozenset(
    {
        "/csi.v1.Controller/ControllerGetCapabilities",
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
        "/csi.v1.Node/NodeGetCapabilities",
        "/csi.v1.Node/NodeGetInfo",
    }
)
# SnapshotMetadata streams as fast as its caller reads (a backup application, through the sidecar): a lane of its
# own, so slow readers never take the Controller lane's threads.
SERVICE_LANES = {
    "/csi.v1.Controller/": "controller",
    "/csi.v1.GroupController/": "controller",  # controller work: it shares the Controller lane
    "/csi.v1.Node/": "node",
    "/csi.v1.SnapshotMetadata/": "snapshot_metadata",
}


class Lanes:
    """The quick lane (QUICK_WORKERS threads) and one lane of `workers` threads each for Controller, Node and
    SnapshotMetadata."""

    def __init__(self, workers: int) -> None:
        self.quick = futures.ThreadPoolExecutor(max_workers=QUICK_WORKERS, thread_name_prefix="rpc-quick")
        self.services = {
            lane: futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"rpc-{lane}")
            for lane in SERVICE_LANES.values()
        }

    def lane_for(self, method: str) -> futures.ThreadPoolExecutor:
        if method in QUICK_METHODS:
            return self.quick
        for prefix, lane in SERVICE_LANES.items():
            if method.startswith(prefix):
                return self.services[lane]
        return self.quick  # Identity (and anything else that is neither Controller nor Node)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Put it first in the server's interceptors: it must see the handler the others have wrapped."""
        return _LaneInterceptor(self)

    def shutdown(self) -> None:
        for pool in (self.quick, *self.services.values()):
            pool.shutdown(wait=False, cancel_futures=True)


class _LaneInterceptor(grpc.ServerInterceptor):
    def __init__(self, lanes: Lanes) -> None:
        self.lanes = lanes

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return handler
        pool = self.lanes.lane_for(details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _in_pool(handler.unary_unary, pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # SnapshotMetadata's calls
            return grpc.unary_stream_rpc_method_handler(
                _in_pool(handler.unary_stream, pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # CSI has no client-streaming calls


def _in_pool(
    behavior: Callable[[Any, grpc.ServicerContext], Any], pool: futures.ThreadPoolExecutor
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, context)

    run.experimental_thread_pool = pool  # type: ignore[attr-defined]  # read by grpc._server
    return run
