"""Layer 1 of dgemma: the model as torch code and its files. The native DiffusionGemma (both passes), the
static-shape passes over fixed-capacity KV buffers that export and the graph runtimes share, checkpoint I/O in the
real layout, the tokenizer and chat template, the reader of quantized checkpoints and the low-precision arithmetic
(FP8 / NVFP4). Imports only dgemma.core."""
