"""Drop-in entry points with FlashMLA's and DeepGEMM's signatures, backed by dsv4fn.

from dsv4fn.compat import flash_mla      # instead of: import flash_mla
from dsv4fn.compat import deep_gemm      # instead of: import deep_gemm
"""

from . import deep_gemm, flash_mla

__all__ = ["deep_gemm", "flash_mla"]
