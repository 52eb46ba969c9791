"""Fast GPU backend (static shapes, CUDA graphs, FP8 / NVFP4 weights, fused Triton kernels).

fp8: FP8 weight modules and their conversion; backend: FastState / FastBackend. The public names below are the
package's interface (the factory, benchmarks, probe and tests import them from here).
"""

from .backend import FastBackend, FastState
from .fp8 import Fp8Experts, Fp8Linear, enable_fusion, quantize_fp8_
from .policy import Kernels, note

__all__ = ["FastBackend", "FastState", "Fp8Experts", "Fp8Linear", "Kernels", "enable_fusion", "note", "quantize_fp8_"]
