"""Batch-invariant reference projection.

`x @ w.T` accumulated in fp64 and rounded once to fp32: the result of a row does not depend on how
many other rows share the call, which makes chunked prefill bit-identical to one-shot prefill.
"""

import torch
from torch import Tensor


def linear(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[..., out]` = x `[..., in]` · w `[out, in]`ᵀ, fp64 accumulation."""
    return (x.double() @ w.double().T).float()


def linear_fp32(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[..., out]` from an fp32 GEMM (cuBLAS on GPU): the projection of the kernel paths, where
    the fp64 reference GEMM would dominate a decode step."""
    return torch.nn.functional.linear(x.float(), w.float())
