"""dsv4fn: DeepSeek V4 attention as a functional library.

Config -> plan -> state -> step -> kernel. The public API:
  `DSV4Config`; state types `KVAndScore`, `PagedKVCache`, `IndexerKeyCache`, `DSV4AttnMetadata`;
  `plan`; steps `compress`, `index_topk`, `attend`; helpers `rms_normalize`, `norm_rope`,
  `apply_rope`, `store_kv`, `store_index_keys`; the layer `attention_layer`.
Every step takes `backend=` ("torch", "triton", "tilelang", "auto", "compare"); `DSV4FN_BACKEND`
sets the default for a whole run.
"""

from .attend import attend
from .compress import CompressorParams, compress
from .config import DSV4Config
from .formats import store_index_keys, store_kv
from .index_topk import index_logits, index_topk, prepare_query
from .layer import (
    IndexerParams,
    LayerAux,
    LayerParams,
    LayerState,
    attention_layer,
    init_layer_params,
    init_layer_state,
)
from .norm_rope import apply_rope, hadamard, norm_rope, rms_normalize, rope_cos_sin, rope_frequencies
from .plan import plan
from .state import CompressedStreamMeta, DSV4AttnMetadata, IndexerKeyCache, KVAndScore, PagedKVCache

__version__ = "0.1.0"

__all__ = [
    "CompressedStreamMeta",
    "CompressorParams",
    "DSV4AttnMetadata",
    "DSV4Config",
    "IndexerKeyCache",
    "IndexerParams",
    "KVAndScore",
    "LayerAux",
    "LayerParams",
    "LayerState",
    "PagedKVCache",
    "apply_rope",
    "attend",
    "attention_layer",
    "compress",
    "hadamard",
    "index_logits",
    "index_topk",
    "init_layer_params",
    "init_layer_state",
    "norm_rope",
    "plan",
    "prepare_query",
    "rms_normalize",
    "rope_cos_sin",
    "rope_frequencies",
    "store_index_keys",
    "store_kv",
]
