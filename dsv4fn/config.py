"""`DSV4Config`: every size of DeepSeek V4 attention, with presets (spec §1).

Presets: `DSV4Config.flash()`, `DSV4Config.pro()` (values from the released config.json files) and
`DSV4Config.tiny()` for tests and the CPU demo. All sizes are fields, so tests can vary ratios, heads,
dims, window and top-k freely; `__post_init__` rejects combinations the formats cannot hold.
"""

import dataclasses
import math


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DSV4Config:
    name: str
    hidden_size: int
    num_heads: int  # query heads h (one shared KV head: MQA)
    head_dim: int  # d, shared by K and V
    rope_dim: int  # the last `rope_dim` dims of a head are rotated
    window: int  # sliding window in tokens, including the current token
    compress_ratios: tuple[int, ...]  # one per layer, each in {0, csa_ratio, hca_ratio}
    csa_ratio: int = 4  # compressed stream searched by the indexer (overlapping windows)
    hca_ratio: int = 128  # compressed stream read whole
    index_topk: int
    index_heads: int
    index_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    # paging
    block_size: int = 256  # raw-token address space of one page of the shared page table
    swa_page_size: int = 128  # tokens per page of the window (raw KV) cache
    index_pad: int = 64  # index arrays are padded with -1 to a multiple of this
    # FP8 attention-cache tiles (MODEL1: 64-value tiles, UE8M0 scales)
    quant_tile: int = 64
    norm_eps: float = 1e-6
    # RoPE: ratio-0 layers use `rope_theta` without YaRN, compressed layers `compress_rope_theta`+YaRN
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_max_position: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position: int = 1 << 20

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"DSV4Config({self.name}): {msg}")

        need(self.rope_dim % 2 == 0 and 0 < self.rope_dim < self.head_dim, "rope_dim must be even, < head_dim")
        need(self.nope_dim % self.quant_tile == 0, "nope_dim must be a multiple of quant_tile")
        need(self.rope_dim <= self.index_head_dim, "indexer head dim must hold the rope dims")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim must be a power of 2 (Hadamard)")
        need(self.num_heads % self.o_groups == 0, "num_heads must be a multiple of o_groups")
        need(self.csa_ratio > 0 and self.hca_ratio > 0 and self.csa_ratio != self.hca_ratio, "bad ratios")
        for r in self.compress_ratios:
            need(r in (0, self.csa_ratio, self.hca_ratio), f"layer ratio {r} not in (0, csa, hca)")
        for r in (self.csa_ratio, self.hca_ratio):
            need(self.block_size % r == 0, f"block_size must be a multiple of ratio {r}")
        need(self.window >= 1 and self.index_topk >= 1, "window and index_topk must be >= 1")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def num_layers(self) -> int:
        return len(self.compress_ratios)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def index_weight_scale(self) -> float:
        return self.index_head_dim**-0.5 * self.index_heads**-0.5

    @property
    def num_quant_tiles(self) -> int:
        return self.nope_dim // self.quant_tile

    def compressed_page_size(self, ratio: int) -> int:
        """Entries per page of a ratio-`ratio` cache: one page per block of the page table."""
        return self.block_size // ratio

    def overlap(self, ratio: int) -> bool:
        """The CSA stream pools overlapping windows (coff = 2)."""
        return ratio == self.csa_ratio

    def window_width(self) -> int:
        return _round_up(self.window, self.index_pad)

    def topk_width(self) -> int:
        return _round_up(self.index_topk, self.index_pad)

    def hca_width(self, max_seq_len: int) -> int:
        return max(self.index_pad, _round_up(max_seq_len // self.hca_ratio, self.index_pad))

    def layer_rope_theta(self, ratio: int) -> tuple[float, bool]:
        """(theta, use_yarn) of a layer with compression ratio `ratio`."""
        return (self.rope_theta, False) if ratio == 0 else (self.compress_rope_theta, True)

    # ---- presets -------------------------------------------------------------------------------
    @staticmethod
    def flash() -> "DSV4Config":
        return DSV4Config(
            name="v4-flash",
            hidden_size=4096,
            num_heads=64,
            head_dim=512,
            rope_dim=64,
            window=128,
            compress_ratios=(0, 0) + (4, 128) * 20 + (4,),
            index_topk=512,
            index_heads=64,
            index_head_dim=128,
            q_lora_rank=1024,
            o_groups=8,
            o_lora_rank=1024,
        )

    @staticmethod
    def pro() -> "DSV4Config":
        return DSV4Config(
            name="v4-pro",
            hidden_size=7168,
            num_heads=128,
            head_dim=512,
            rope_dim=64,
            window=128,
            compress_ratios=(128, 128) + (4, 128) * 29 + (4,),
            index_topk=1024,
            index_heads=64,
            index_head_dim=128,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
        )

    @staticmethod
    def tiny() -> "DSV4Config":
        """Small enough for CPU tests; the same structure (window, CSA with indexer, HCA)."""
        return DSV4Config(
            name="tiny",
            hidden_size=256,
            num_heads=8,
            head_dim=64,
            rope_dim=32,
            window=16,
            compress_ratios=(0, 4, 16, 4),
            csa_ratio=4,
            hca_ratio=16,
            index_topk=16,
            index_heads=4,
            index_head_dim=64,
            q_lora_rank=64,
            o_groups=2,
            o_lora_rank=64,
            block_size=32,
            swa_page_size=16,
            index_pad=16,
            quant_tile=32,
            original_max_position=256,
            max_position=4096,
        )

    def with_(self, **changes: object) -> "DSV4Config":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def yarn_correction_range(config: DSV4Config, theta: float) -> tuple[float, float]:
    """The (low, high) pair range of the YaRN blend (spec §1.3)."""
    dim = config.rope_dim

    def corr(n: float) -> float:
        return dim * math.log(config.original_max_position / (n * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(config.beta_fast)), 0)
    high = min(math.ceil(corr(config.beta_slow)), dim - 1)
    return float(low), float(high) + (0.001 if low == high else 0.0)
