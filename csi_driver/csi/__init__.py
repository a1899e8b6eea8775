"""CSI v1.12.0 messages and gRPC stubs, generated from proto/csi.proto by proto/generate.py."""

from csi_driver.csi import csi_pb2, csi_pb2_grpc

__all__ = ["csi_pb2", "csi_pb2_grpc"]
