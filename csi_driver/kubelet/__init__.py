"""kubelet plugin registration API v1, generated from proto/pluginregistration.proto by proto/generate.py."""

from csi_driver.kubelet import pluginregistration_pb2, pluginregistration_pb2_grpc

__all__ = ["pluginregistration_pb2", "pluginregistration_pb2_grpc"]
