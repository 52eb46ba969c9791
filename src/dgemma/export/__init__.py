"""Stage `make onnx`: the encoder and denoiser ONNX graphs from the native model (onnx), and the quantized Q/DQ
graphs from a `make quantize` output (quantized, with the ops in qdq_ops). Writes build/onnx/<precision>/."""
