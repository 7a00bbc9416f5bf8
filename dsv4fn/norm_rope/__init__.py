"""Fused helpers: RMS-normalize, RoPE (and its inverse), norm + RoPE, Hadamard."""

from .. import _backend
from .reference import (
    apply_rope,
    hadamard,
    hadamard_matrix,
    norm_rope,
    rms_normalize,
    rope_cos_sin,
    rope_frequencies,
)

_backend.register("rms_normalize", "torch")(rms_normalize)
_backend.register("norm_rope", "torch")(norm_rope)
_backend.register("apply_rope", "torch")(apply_rope)

__all__ = [
    "apply_rope",
    "hadamard",
    "hadamard_matrix",
    "norm_rope",
    "rms_normalize",
    "rope_cos_sin",
    "rope_frequencies",
]
