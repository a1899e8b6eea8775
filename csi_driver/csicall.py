"""Call one CSI RPC from the command line, JSON in and out: a debugging aid for operators and the lab.

    python -m csi_driver.csicall --endpoint unix:///csi/csi.sock Controller.CreateVolume '{"name": "pvc-1", ...}'

Field names are the proto's (snake_case or lowerCamelCase). A gRPC error prints `{"code": ..., "details": ...}`
and exits 1, so scripts can check both.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint

SERVICES = {"Identity": csi_pb2_grpc.IdentityStub, "Controller": csi_pb2_grpc.ControllerStub,
            "Node": csi_pb2_grpc.NodeStub}  # fmt: skip


def call(endpoint: str, rpc: str, request: dict, timeout: float = 300) -> dict:
    """Invoke `Service.Method` with a JSON-like request; returns the response as a dict (raises grpc.RpcError)."""
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
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csicall", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="unix:///csi/csi.sock")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("rpc", help="Service.Method, e.g. Node.NodeGetInfo")
    parser.add_argument("request", nargs="?", default="{}", help="request as JSON (default {})")
    args = parser.parse_args(argv)
    try:
        response = call(args.endpoint, args.rpc, json.loads(args.request), args.timeout)
    except grpc.RpcError as err:
        print(json.dumps({"code": err.code().name, "details": err.details()}))
        return 1
    except (ValueError, json_format.ParseError) as err:
        print(f"csicall: {err}", file=sys.stderr)
        return 2
    print(json.dumps(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
