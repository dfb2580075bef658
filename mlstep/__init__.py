"""mlstep: fuse transformer ONNX models for ONNX Runtime, prove parity, gate latency, register in MLflow."""
__version__ = "0.1.0"
