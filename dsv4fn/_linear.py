"""Batch-invariant reference projection.

`x @ w.T` accumulated in fp64 and rounded once to fp32: the result of a row does not depend on how
many other rows share the call, which makes chunked prefill bit-identical to one-shot prefill.
"""

import torch
from torch import Tensor


def linear(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[..., out]` = x `[..., in]` · w `[out, in]`ᵀ, fp64 accumulation."""
    return (x.double() @ w.double().T).float()


def grouped_linear_fp32(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[t, g, out]` = per group `x[:, g] · w[g]ᵀ` (x `[t, g, in]`, w `[g, out, in]`), fp32 accumulation;
    on CUDA with bf16/fp16 operands one batched tensor-core GEMM with fp32 output, as `linear_fp32`."""
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out_dtype=torch.float32).transpose(0, 1)
        except (RuntimeError, TypeError, NotImplementedError):  # torch without bmm(out_dtype=)
            pass
    return torch.einsum("tgk,gok->tgo", x.float(), w.float())


def linear_fp32(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[..., out]` with fp32 accumulation: the projection of the kernel paths, where the fp64
    reference GEMM would dominate a decode step. bf16/fp16 operands on CUDA run one GEMM on the tensor
    cores with an fp32 output (`torch.mm(..., out_dtype=float32)`: exact products, fp32 sums, no fp32 copy
    of the weights); otherwise an fp32 GEMM of the upcast operands (same precision, slower)."""
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16):
        try:
            out = torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32)
            return out.view(*x.shape[:-1], w.shape[0])
        except (RuntimeError, TypeError, NotImplementedError):  # torch without mm(out_dtype=)
            pass
    return torch.nn.functional.linear(x.float(), w.float())
