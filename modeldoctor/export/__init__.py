"""ONNX export through optimum-onnx, onnxruntime quantization with exclusions, validation."""

# The export precisions (importing this does not load onnx: the CLI builds its options from it).
PRECISIONS = ("fp32", "int8", "int4", "int8-dynamic")
