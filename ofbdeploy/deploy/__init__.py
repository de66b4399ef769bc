"""Deployment: export to ONNX / TensorRT and measure latency on real backends, dense and pruned side by side."""
