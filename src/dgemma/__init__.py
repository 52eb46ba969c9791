"""dgemma: DiffusionGemma from checkpoint to a measured Triton service on NVIDIA GPUs.

Heavy optional dependencies (transformers, modelopt, tensorrt, tritonclient) are imported lazily
inside the functions that need them, so `import dgemma` stays cheap.
"""

__version__ = "0.1.0"
