"""ONNX export through optimum-onnx, onnxruntime quantization with exclusions, validation."""
