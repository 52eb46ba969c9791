"""Fast GPU backend (static shapes, CUDA graphs, FP8 / NVFP4 weights, fused Triton kernels).

policy: which kernels run; fp8 / nvfp4: the low-precision weight modules and their conversion / loading; fused:
the layer pass on the kernels; backend: FastState / FastBackend. The public names below are the
package's interface (the factory, benchmarks, probe and tests import them from here).
"""

from .backend import FastBackend, FastState
from .fp8 import Fp8Experts, Fp8Linear, enable_fusion, quantize_fp8_
from .nvfp4 import Nvfp4Experts, describe_footprint, footprint, load_nvfp4, quantize_nvfp4_
from .policy import Kernels, note

__all__ = ["FastBackend", "FastState", "Fp8Experts", "Fp8Linear", "Kernels", "Nvfp4Experts", "describe_footprint",
           "enable_fusion", "footprint", "load_nvfp4", "note", "quantize_fp8_", "quantize_nvfp4_"]
