"""Stage `make engines`: TensorRT engines from build/onnx/<precision>/ -> engines/<gpu>/<precision>/ (build)."""
