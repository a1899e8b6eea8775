"""Call one CSI RPC from the command line, JSON in and out: a debugging aid for operators and the lab.

    python -m csi_driver.csicall --endpoint unix:///csi/csi.sock Controller.CreateVolume '{"name": "pvc-1", ...}'

Field names are the proto's (snake_case or lowerCamelCase). A gRPC error prints `{"code": ..., "details": ...}`
and exits 1, so scripts can check both. A server-streaming RPC (SnapshotMetadata's) prints every message it
received as `{"responses": [...]}` on one line, also before an error broke the stream (`"code"` and `"details"`
added). `--stdio` serves many calls from one process (JSON lines; see serve_stdio).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint

SERVICES: dict[str, Callable[[grpc.Channel], Any]] = {
    "Identity": csi_pb2_grpc.IdentityStub,
    "Controller": csi_pb2_grpc.ControllerStub,
    "GroupController": csi_pb2_grpc.GroupControllerStub,
    "Node": csi_pb2_grpc.NodeStub,
    "SnapshotMetadata": csi_pb2_grpc.SnapshotMetadataStub,
}


class StreamBroken(Exception):
    """A server stream ended with an error after `responses` arrived."""

    def __init__(self, responses: list[dict[str, Any]], error: grpc.RpcError) -> None:
        super().__init__(str(error))
        self.responses = responses
        self.error = error


def call(endpoint: str, rpc: str, request: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Invoke `Service.Method` with a JSON-like request; returns the response as a dict, for a server-streaming
    method {"responses": [every message]} (raises grpc.RpcError, or StreamBroken once messages arrived)."""
    service_name, _, method_name = rpc.partition(".")
    if service_name not in SERVICES:
        raise ValueError(f"unknown service {service_name!r}: one of {', '.join(SERVICES)}")
    method = csi_pb2.DESCRIPTOR.services_by_name[service_name].methods_by_name.get(method_name)
    if method is None:
        raise ValueError(f"{service_name} has no method {method_name!r}")
    request_message = json_format.ParseDict(request, getattr(csi_pb2, method.input_type.name)())
    with grpc.insecure_channel(parse_endpoint(endpoint).grpc_address) as channel:
        stub = SERVICES[service_name](channel)
        response = getattr(stub, method_name)(request_message, timeout=timeout)
        if not method.server_streaming:
            return _as_dict(response)
        responses: list[dict[str, Any]] = []
        try:
            for message in response:
                responses.append(_as_dict(message))
        except grpc.RpcError as err:
            if not responses:
                raise
            raise StreamBroken(responses, err) from err
        return {"responses": responses}


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def answer(endpoint: str, rpc: str, request: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    """(exit status, what to print): 0 and the response, 1 and the gRPC error (with a broken stream's messages)."""
    try:
        return 0, call(endpoint, rpc, request, timeout)
    except grpc.RpcError as err:
        return 1, {"code": err.code().name, "details": err.details()}
    except StreamBroken as broken:
        error = broken.error
        return 1, {"responses": broken.responses, "code": error.code().name, "details": error.details()}


def serve_stdio(endpoint: str, timeout: float) -> int:
    """--stdio: one request per line on stdin, {"rpc": ..., "request": {...}}; one line back for each,
    {"exit": status, "body": what the one-shot mode prints} (a bad request: exit 2, body {"error": ...}).
    Python and grpc start once: a caller making many calls (the lab tests) saves seconds per call under TCG."""
    for line in sys.stdin:
        try:
            message = json.loads(line)
            status, body = answer(endpoint, message["rpc"], message.get("request", {}), timeout)
        except (ValueError, KeyError, TypeError, json_format.ParseError) as err:
            status, body = 2, {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps({"exit": status, "body": body}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csicall", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="unix:///csi/csi.sock")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--stdio", action="store_true", help="serve calls as JSON lines on stdin/stdout")
    parser.add_argument("rpc", nargs="?", help="Service.Method, e.g. Node.NodeGetInfo")
    parser.add_argument("request", nargs="?", default="{}", help="request as JSON (default {})")
    args = parser.parse_args(argv)
    if args.stdio:
        return serve_stdio(args.endpoint, args.timeout)
    if args.rpc is None:
        parser.error("an RPC is required (or --stdio)")
    try:
        status, body = answer(args.endpoint, args.rpc, json.loads(args.request), args.timeout)
    except (ValueError, json_format.ParseError) as err:
        print(f"csicall: {err}", file=sys.stderr)
        return 2
    print(json.dumps(body))
    return status


if __name__ == "__main__":
    sys.exit(main())
