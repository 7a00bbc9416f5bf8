# pyright: reportInvalidTypeForm=false, reportGeneralTypeIssues=false, reportOperatorIssue=false
# (TileLang kernels are a DSL: `T.Tensor[(M, N), dtype]` annotations are not Python types.)
"""TileLang sparse attention decode over MODEL1 FP8 caches (matches `reference.sparse_attention`).

Two kernels compute the same thing; `ATTN_IMPL` (env `DSV4FN_TL_ATTENTION`, read at import, settable
at run time before a call or a CUDA-graph capture) picks one:

``"ws"`` (default; V4 geometry d = 448 + 64, tile 64, page stride a multiple of the 576-byte record):
a warp-specialised kernel in the style of FlashMLA's sm90 sparse decode. One CTA of 384 threads owns
(request b, query s, 64 heads, one KV split) and walks its 64-key blocks of the concatenated
main (window) + extra (compressed) index lists, each cut at its length:
  * producer warpgroup (threads 256..383, 120 registers): per block each thread takes 2 keys x one
    16-byte column of every 64-wide tile (4 lanes read 64 contiguous bytes of a record: full
    sectors). Its 9 16-byte loads per key (+ the 8-byte scale record) are `ld.global.nc` into
    registers, issued one block ahead: as soon as key r of block i is dequantized, key r of block
    i+1 is requested into the same registers (indices prefetched one block further), so loads stay
    in flight while the warpgroup waits for a free K buffer and while it dequantizes. Dequantization
    is exact (below), straight from registers into the bf16 K tile in shared memory (2 buffers,
    128B-swizzled for wgmma, conflict-free 16-byte stores), then an mbarrier is signalled.
    Invalid keys (-1 or past the list length) are never loaded, so NaN bytes in slots that are not
    selected cannot leak, and are masked (score -inf, weight 0); their registers are zeroed here, while
    pair mode leaves them as they were (the last loaded key's values - finite, unless that selected key
    made the row non-finite anyway - or the zeros they start with): ~20 of the producer's ~340
    instructions a key fewer, faster paired, slower here (session 12).
  * consumer warpgroup 0 (threads 0..127, 224 registers): S = Q K^T (wgmma m64n64k16, Q in shared),
    online softmax in the log2 domain, P (bf16) and the row rescale to shared for warpgroup 1, then
    O[:, 0:256] += P V[:, 0:256] (wgmma m64n256k16). Lazy rescale (WS_LAZY): a row's running
    max moves only when a block's is more than 2^8 larger (P <= 2^8 otherwise), and a warp of either consumer
    warpgroup rescales its accumulator rows only when one of them moved (one vote) - after a row's first blocks
    the 2 x 128 multiplies a thread and block are mostly skipped.
  * consumer warpgroup 1 (threads 128..255, 160 registers): O[:, 256:512] += P V[:, 256:512].
  Exact dequantization (`dsv4fn_dq16`): `cvt.rn.f16x2.e4m3x2` (exact: every e4m3 value is a normal
  f16), then the f16 bits shifted right by 3 *are* the bf16 bits of the value times 2^-112 (e4m3
  has 3 mantissa bits, so no bit is lost and no intermediate is subnormal), then one bf16x2 multiply
  by 2^(s-15) (two when the UE8M0 byte s > 142) - exact, 4 integer/half ops per 2 values instead of
  the 3 float conversions of the e4m3 -> fp32 -> bf16 route.
  Pair mode (V4-Pro's direct path: two head blocks, one KV split; WS_PAIR): a row's two CTAs run as a 2-CTA
  cluster. Each producer dequantizes only its half of every block's keys (keys 32 rank .. 32 rank + 31) into its
  own K tile, then one thread copies that half (8 x 4 KB: the half's rows of each 64-column chunk of the
  128B-swizzled tile, and its 32 valid flags) into the peer's tile with `cp.async.bulk` shared::cta ->
  shared::cluster, the bytes counted on the peer's `k_remote` mbarrier (one expect_tx arrival a block). A K tile
  is free once both CTAs' consumers have released it (`k_free`: one remote arrival per consumer warpgroup and
  CTA). Loads run two blocks ahead (one key a thread and block, two register sets). The per-thread `st.async`
  of FlashMLA's protocol cost the producer as much as the halved conversion saved (session 7); one bulk copy
  a half-chunk does not. Split paths stay unpaired (slower paired: fewer blocks a CTA to amortise the cluster).
  In pair mode warpgroup 0 takes P for its P V from registers (RS wgmma, as FlashMLA's does): it does not wait for
  its own S stores (V4-Pro b=128 / 256 1-2% faster on the H100; the unpaired kernel is not faster so), and the
  producer fetches the indices of its block after next only after signalling a K tile (4-5% at V4-Pro b=64-256;
  the unpaired kernel is 4% slower so); warpgroup 0 issues its P V before it hands S to warpgroup 1 and waits for
  it after (the S stores and their fence overlap the P V: 3-5%).
  Cluster merge (the split path with 2, 4 or 8 splits: `cluster_merge`): a row's splits run as one cluster, one CTA
  a split. Each CTA writes its split's log2 LSE per head to shared memory; after a cluster barrier every CTA reads
  all of them (distributed shared memory), scales its partial by 2^(m sl2 - L) times the sink factor and stages it
  as fp32 in the memory of its K tiles (free by then); after a second barrier each CTA sums its 64 / splits rows of
  the output over the cluster's staged partials (in rank order: deterministic) and writes them as bf16; a third
  keeps every CTA alive while its peers read it. No fp32 partials in global memory, no combine launch.
  Next-wave prefetch (direct path, WS_PREFETCH): once its producer is done, a CTA prefetches into L2 what the CTA
  one wave later reads first (its Q rows, index rows and first PF_KEYS keys' records), so later waves start from
  L2 instead of DRAM (3-5% where there is a second wave).
``"legacy"``: the first kernel (one 256-thread program per row and head block, gathers and
dequantizes synchronously); kept for comparison and for other geometries.

With one split the kernel finishes the row (sink, natural-log LSE, o = 0 / lse = +inf for an empty
row; the ws kernel stages the bf16 rows in Q_s and writes them whole); with several the ws kernel's cluster
merges them (2-8 splits), or the kernel writes fp32 partials (normalised o, log2 LSE) and `attend_combine`
merges those. The split count comes from the
batch shape only (no host sync): CUDA-graph capturable.
Compiled kernels are cached per (impl, heads, page sizes, scale, split mode); batch, query count,
index widths, cache sizes and split count are symbolic (one compile serves every batch size).

Launches go through `_tilelang_compat.launch` (torch's current stream). d must be a multiple of 64
with a 64-wide rope part; the tiny test geometry (32 + 32) is rejected with a ValueError.
"""

import functools
import math
import os

import torch
from torch import Tensor

from .. import _backend
from .._tilelang_compat import DEVICE_SRC, T, barrier_wait, jit, launch, named_sync
from ..state import PagedKVCache

BLOCK_I = 64  # keys per block
HEAD_BLOCK = 64  # heads per program (at most)
THREADS = 256  # legacy kernel
NUM_SMS_TARGET = _backend.PLAN_SMS  # the split plans' SM count without a GPU (calls use the device's)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

ATTN_IMPL: str = os.environ.get("DSV4FN_TL_ATTENTION", "ws")  # "ws" | "legacy"
FORCE_SPLITS: int | None = None  # bench knob: override the split heuristic (None = heuristic)
# ws kernel with two head blocks (V4-Pro): where a row's two CTAs share its keys as a 2-CTA cluster (pair mode):
# "direct" (the one-split path, b >= 64: faster there), "all" (split paths too: slower there), "off" (bench knob)
WS_PAIR = "direct"
# ws kernel's online softmax: a row's running max moves only when a block's is more than 2^LAZY_TAU larger, and a
# warp rescales its accumulator rows only when one of them moved (FlashAttention-4's lazy rescale; P <= 2^LAZY_TAU):
# 2-4% faster at V4-Flash b=64..256 on the H100, 1-2% at V4-Pro (pair mode, with REG_PAIR). False: every block
# rescales (bench knob; read per call)
WS_LAZY = True
LAZY_TAU = 8.0
# ws direct path over more rows than one wave holds: once its producer is done, a CTA prefetches into L2 what the CTA
# of the next wave with its head block reads first (its Q rows, index rows and the records and scales of its first
# PF_KEYS keys), so that wave's prologue reads L2 instead of DRAM (bench knob, read per call: no recompile)
WS_PREFETCH = True
PF_KEYS = 128  # keys (two 64-key blocks) of the next wave's row prefetched, shared by the row's head-block CTAs
COMBINE_PDL = True  # the combine is a programmatic dependent launch of the split kernel (bench knob, read per call)
# ws split path: a row's splits as one cluster that merges the partials in distributed shared memory where the split
# count fits a cluster (`cluster_merge`); False: always partials + the combine kernel (bench knob, read per call)
CLUSTER_MERGE = True
MERGE_SIZES: tuple[int, ...] = (2, 3)  # cluster sizes `cluster_merge` may pick (bench knob: 2..8)
# CTAs of one wave of clusters of that size on a 132-SM GH100 (one CTA an SM; measured on the H100 in session 9: 66
# clusters of 2 and 36 of 3 run at once, 32 of 4 and 16 of 8 do not). Clusters live inside a GPC and how many SMs
# each GPC has varies from chip to chip: 3 keeps a margin (32 clusters); a size not listed never merges. Other SM
# counts (unmeasured): clusters of 2 up to the SMs (pairs of SMs), no others.
CLUSTER_WAVE_CTAS = {2: NUM_SMS_TARGET, 3: 96}

# warp-specialised kernel: 3 warpgroups with setmaxnreg budgets (multiples of 8). The CTA is launched with
# 168 registers per thread (65536 / 384, rounded down to 8) and `setmaxnreg.inc` blocks until the other
# warpgroups have released enough: the budgets must sum to <= 3 * 168 = 504, or warpgroup 0 waits forever.
# (224, 160, 120): no spills in any variant (ptxas 13.0, checked on CPU with nvcc -arch=sm_90a).
WS_THREADS = 384
REG_WG0, REG_WG1, REG_PRODUCER = 224, 160, 120
# pair mode: its producer (two register sets, the bulk copies) spills one register at 120 with the lazy rescale
REG_PAIR = (216, 160, 128)
WS_NOPE, WS_ROPE, WS_TILE = 448, 64, 64
WS_D = WS_NOPE + WS_ROPE
WS_REC = WS_NOPE + 2 * WS_ROPE  # 576-byte data record
WS_NT = WS_NOPE // WS_TILE  # 7 scale bytes (+ 1 pad) per key


def _ld_src(name: str, words: int, hint: str = "") -> str:
    """Device source of the ws kernel's predicated streaming loads of `words` 32-bit words (4: a 16-byte record piece,
    2: the 8-byte scales; `hint`: a cache hint, probe l2_256's `.L2::256B`), as two functions: `name`, whose registers
    keep what they held when `ok` is 0 (pair mode), and `name`z, which zeroes them (the unpaired kernel)."""
    regs = ", ".join(f"%{i}" for i in range(words))
    zeros = "".join(f" mov.b32 %{i}, 0;\\n" for i in range(words))
    fns = []
    for suffix, mode, init in (("", "+r", ""), ("z", "=r", zeros)):
        outs = ", ".join(f'"{mode}"(d[{i}])' for i in range(words))
        fns.append(
            f"__device__ __forceinline__ void {name}{suffix}(void* dst, const void* src, int ok) {{\n"
            "  unsigned* d = reinterpret_cast<unsigned*>(dst);\n"
            "  asm volatile(\n"
            f'      "{{\\n .reg .pred p;\\n setp.ne.b32 p, %{words}, 0;\\n{init}"\n'
            f'      " @p ld.global.nc.L1::no_allocate{hint}.v{words}.u32 {{{regs}}}, [%{words + 1}];\\n}}\\n"\n'
            f"      : {outs}\n"
            '      : "r"(ok), "l"(src));\n'
            "}\n"
        )
    return "".join(fns)


# device helpers of the ws kernel (inline PTX only: see _tilelang_compat.DEVICE_SRC)
WS_DEVICE_SRC = (
    DEVICE_SRC
    + r"""
// dsv4fn/attend/tilelang.py: predicated 16/8-byte streaming loads (no L1 allocation: each key is
// read once per CTA) into registers; when `ok` is 0 the address is never touched and the registers keep
// their last loaded key's values (finite unless that key made the row non-finite anyway) or the zeros they
// start with - a key that is not valid is masked (score -inf, weight 0) - or, the `z` loads, are zeroed. No L2
// prefetch hint: a 576-byte record spans three 256-byte blocks, so `.L2::256B` would pull ~33% extra
// DRAM traffic for scattered (top-k selected) keys.
"""
    + _ld_src("dsv4fn_ld128", 4)
    + _ld_src("dsv4fn_ld64", 2)
    + r"""// 2^x as one MUFU.EX2 (flushes results under 2^-126 to 0; exp2f adds a range test and two multiplies)
__device__ __forceinline__ float dsv4fn_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned dsv4fn_bf16x2_mul(unsigned x, unsigned y) {
  unsigned d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(y));
  return d;
}
// 16 e4m3 values of one tile (4 words) times 2^(s-127), s = byte k (0..3, a constant once unrolled) of `sword`,
// -> 16 bf16 (8 words). e4m3 -> f16 is exact and always normal (or zero); (f16 bits & 0x7fff) >> 3 are the bf16
// bits of the value * 2^-112 (the 7 dropped f16 mantissa bits are zero); sign copied; then * 2^(s-15) in bf16, a
// power of two in range while s <= 142. BIG (s up to 255) splits it into 2^(min(s,142)-15) * 2^(s-142).
// The fast path's multiplier, the bf16 pair (s + 112) << 7 | same << 16: one PRMT puts byte k in bytes 0 and 2 and
// one shift-add (LEA) finishes it (s <= 142: no carry out of the low half) - 2 ops a tile instead of 4.
template <bool BIG>
__device__ __forceinline__ void dsv4fn_dq16_impl(const void* raw_, int sword, int k, void* out_) {
  const unsigned* raw = reinterpret_cast<const unsigned*>(raw_);
  unsigned* out = reinterpret_cast<unsigned*>(out_);
  unsigned fa, fb = 0u;
  if (BIG) {
    const unsigned s = (static_cast<unsigned>(sword) >> (8 * k)) & 255u;
    fa = ((s > 142u ? 142u : s) + 112u) << 7;
    fa |= fa << 16;
    fb = ((s > 142u ? s : 142u) - 15u) << 7;
    fb |= fb << 16;
  } else {
    fa = (__byte_perm(static_cast<unsigned>(sword), 0u, 0x4040u | (k << 8) | k) << 7) + 0x38003800u;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned h0, h1;
    asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n"
        " cvt.rn.f16x2.e4m3x2 %0, lo;\n cvt.rn.f16x2.e4m3x2 %1, hi;\n}\n"
        : "=r"(h0), "=r"(h1) : "r"(raw[i]));
    unsigned v0 = dsv4fn_bf16x2_mul(((h0 & 0x7FFF7FFFu) >> 3) | (h0 & 0x80008000u), fa);
    unsigned v1 = dsv4fn_bf16x2_mul(((h1 & 0x7FFF7FFFu) >> 3) | (h1 & 0x80008000u), fa);
    if (BIG) {
      v0 = dsv4fn_bf16x2_mul(v0, fb);
      v1 = dsv4fn_bf16x2_mul(v1, fb);
    }
    out[2 * i] = v0;
    out[2 * i + 1] = v1;
  }
}
__device__ __forceinline__ void dsv4fn_dq16(const void* raw, int sword, int k, void* out) {
  dsv4fn_dq16_impl<false>(raw, sword, k, out);  // every scale byte of the warp's keys is <= 142
}
__device__ __forceinline__ void dsv4fn_dq16_big(const void* raw, int sword, int k, void* out) {
  dsv4fn_dq16_impl<true>(raw, sword, k, out);
}
// development probes (build_attend_ws probe="no_cvt" / "no_sts"; wrong results by design)
__device__ __forceinline__ void dsv4fn_dq16_nocvt(const void* raw_, int sword, int k, void* out_) {
  const int sbyte = sword >> (8 * k);
  const unsigned* raw = reinterpret_cast<const unsigned*>(raw_);
  unsigned* out = reinterpret_cast<unsigned*>(out_);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = raw[i];
    out[2 * i + 1] = raw[i] ^ static_cast<unsigned>(sbyte);
  }
}
__device__ __forceinline__ int dsv4fn_fold8(const void* v_) {
  const unsigned* v = reinterpret_cast<const unsigned*>(v_);
  unsigned x = 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) x ^= v[i];
  return static_cast<int>(x);
}
// pair mode (V4-Pro's direct path: a row's two head-block CTAs form a 2-CTA cluster; each producer dequantizes
// half of every block's keys and copies that half into the peer's K tile): shared::cluster addresses
__device__ __forceinline__ unsigned dsv4fn_cluster_addr(const void* p, int rank) {
  unsigned r;
  asm("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(r) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))), "r"(rank));
  return r;
}
// one arrival on the mbarrier at `bar`'s offset in cluster CTA `rank` (default release.cta, as CUTLASS)
__device__ __forceinline__ void dsv4fn_arrive_rank(void* bar, int rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];"
               : : "r"(dsv4fn_cluster_addr(bar, rank)) : "memory");
}
// one arrival on this CTA's mbarrier that also expects `bytes` more transaction bytes
__device__ __forceinline__ void dsv4fn_arrive_expect_tx(void* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               : : "r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), "r"(bytes) : "memory");
}
// `bytes` of this CTA's shared memory at `src` copied by the bulk-copy engine to the same offset in the peer
// CTA's, completing as transaction bytes on the peer mbarrier `peer_bar` (a shared::cluster address)
__device__ __forceinline__ void dsv4fn_bulk_to_peer(const void* src, int bytes, unsigned peer_bar, int peer) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(src));
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               : : "r"(dsv4fn_cluster_addr(src, peer)), "r"(s), "r"(bytes), "r"(peer_bar) : "memory");
}
// cluster merge (split path, one CTA a split of a row's keys, the row's splits one cluster): a barrier over every
// thread of the cluster; release / acquire order each CTA's shared-memory stores before the peers' reads
__device__ __forceinline__ void dsv4fn_cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n barrier.cluster.wait.acquire.aligned;" : : : "memory");
}
// the fp32 at `p`'s offset in cluster CTA `rank`'s shared memory
__device__ __forceinline__ float dsv4fn_ld_rank_f32(const void* p, int rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(dsv4fn_cluster_addr(p, rank)) : "memory");
  return v;
}
// a CTA's scaled partial, staged as fp32 [64][512] at `base`: 16-byte units XOR-swizzled by row % 8 (a warp's
// fragment stores - 8 rows x 4 columns - hit 32 different banks)
__device__ __forceinline__ void dsv4fn_stage_f32(void* base, int row, int col, float v) {
  reinterpret_cast<float*>(base)[row * 512 + (col ^ ((row & 7) << 2))] = v;
}
// columns 4 c4 .. 4 c4 + 3 of `row`: the sum over the cluster's NS staged partials (rank order: deterministic),
// rounded to 4 bf16 (8 bytes) at the global address `out`
template <int NS>
__device__ __forceinline__ void dsv4fn_merge4(const void* base, int row, int c4, void* out) {
  const float* p = reinterpret_cast<const float*>(base) + row * 512 + ((c4 ^ (row & 7)) << 2);
  float v[NS][4];
#pragma unroll
  for (int r = 0; r < NS; ++r)
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v[r][0]), "=f"(v[r][1]), "=f"(v[r][2]), "=f"(v[r][3]) : "r"(dsv4fn_cluster_addr(p, r))
                 : "memory");
#pragma unroll
  for (int r = 1; r < NS; ++r)
#pragma unroll
    for (int k = 0; k < 4; ++k) v[0][k] += v[r][k];
  unsigned lo, hi;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(v[0][1]), "f"(v[0][0]));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(v[0][3]), "f"(v[0][2]));
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" : : "l"(out), "r"(lo), "r"(hi) : "memory");
}
// development probe "trace": SM clock and global timer stamps, written out as raw 32-bit words
__device__ __forceinline__ int dsv4fn_clock() {
  int c;
  asm volatile("mov.u32 %0, %%clock;" : "=r"(c));
  return c;
}
__device__ __forceinline__ int dsv4fn_gtimer() {
  int c;
  asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(c));
  return c;
}
__device__ __forceinline__ unsigned short dsv4fn_half_word(int v, int hi) {
  return static_cast<unsigned short>(static_cast<unsigned>(v) >> (16 * hi));
}
// 1 when any lane of the warp holds a scale byte > 142 (bytes 0..6 of its 8-byte scale record a|b; b's top byte is
// padding), bytewise in 32-bit words: s > 142 <=> bit 7 of s and of (s & 0x7F) + 113 (no carry between bytes:
// 0x7F + 0x71 < 0x100); 7 integer ops instead of 7 byte compares (session 12: 0.5-1% at V4-Flash b=128)
__device__ __forceinline__ int dsv4fn_warp_any_big(int a, int b) {
  const unsigned x = static_cast<unsigned>(a), y = static_cast<unsigned>(b);
  const unsigned bx = x & ((x & 0x7F7F7F7Fu) + 0x71717171u) & 0x80808080u;
  const unsigned by = y & ((y & 0x007F7F7Fu) + 0x00717171u) & 0x00808080u;
  return __any_sync(0xffffffffu, (bx | by) != 0u);
}
// next-wave prefetch (WS_PREFETCH): `bytes` (a multiple of 16, 16-byte aligned) from global memory into L2, and
// the L2 line holding one address; neither waits nor faults the CTA that issues it
__device__ __forceinline__ void dsv4fn_prefetch_bulk(const void* p, int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" : : "l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ void dsv4fn_prefetch_line(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(p) : "memory");
}
// 1 when any lane of the warp passes v != 0 (lazy rescale: some row of the warp moved its max)
__device__ __forceinline__ int dsv4fn_warp_any(int v) { return __any_sync(0xffffffffu, v); }
// development probe "l2_256": dsv4fn_ld128 with FlashMLA's L2 prefetch hint (a whole 256-byte block a miss)
"""
    + _ld_src("dsv4fn_ld128_l2", 4, ".L2::256B")
)


def _head_block(h: int) -> int:
    # Always 64 rows (masked past h): the 16/32-row blocks took TileLang's mma path, whose result for
    # 8 heads disagreed with the reference on the H100; the 64-row wgmma path is the verified one.
    del h
    return HEAD_BLOCK


# indices are trusted to address the cache (DSV4FN_VALIDATE=1 checks them in the step): no per-load guards
PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}
# the ws kernel is warp-specialised by hand: TileLang's own producer/consumer split and its automatic
# shared-memory syncs stay off (see _tilelang_compat); every sync is explicit (mbarriers, named_sync)
WS_PASS_CONFIGS = {
    "tl.disable_safe_memory_legalize": True,
    "tl.disable_warp_specialized": True,
    "tl.disable_thread_storage_sync": True,
}
# trace probe: one row of stamps per event, a column per block (up to 32): the producer after its k_free wait and
# before k_ready; WG0 after k_ready, after Q K^T, before its P V, after it; WG1 after s_ready, after its P V; then
# one row of single stamps (TRACE_MISC columns)
TRACE_BLOCK = ("P free", "P done", "K rdy", "QK done", "S done", "PV0 done", "S rdy", "PV1 done")
# columns of the single-stamp row ("ns": %globaltimer, the rest %clock)
TRACE_MISC = ("producer start", "WG0 start", "Q loaded", "CTA end", "WG1 end")
TRACE_MISC += ("WG0 start ns", "CTA end ns", "producer end")
TRACE_ROWS = len(TRACE_BLOCK) + 1
WG0_BARRIER = 1  # named barrier of consumer warpgroup 0 (128 threads)
WG1_BARRIER = 2  # named barrier of consumer warpgroup 1 (its output staging)
PRODUCER_BARRIER = 3  # named barrier of the producer warpgroup (pair mode: its half of a K tile written)


def _pair_mode(split: bool) -> bool:
    """Whether the ws kernel runs two head blocks as a pair (WS_PAIR) on this path."""
    if WS_PAIR not in ("direct", "all", "off"):
        raise ValueError(f"dsv4fn.attend.tilelang.WS_PAIR must be 'direct', 'all' or 'off', got {WS_PAIR!r}")
    return WS_PAIR == "all" or (WS_PAIR == "direct" and not split)


def _bool_knob(name: str) -> bool:
    """A module knob that must be True or False (read per call), or a clear error."""
    value = globals()[name]
    if not isinstance(value, bool):
        raise ValueError(f"dsv4fn.attend.tilelang.{name} must be True or False, got {value!r}")
    return value


def _lazy_mode() -> bool:
    """The ws kernel's `lazy` argument as WS_LAZY has it."""
    return _bool_knob("WS_LAZY")


def _kernels(
    impl: str, h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool, pdl: bool = True,
    merge: int = 0,
):  # fmt: skip
    """Compiled (main, combine-or-None) kernels for one geometry (`pdl`: the combine as a PDL launch), the ws
    kernel's pair mode and lazy rescale as WS_PAIR and WS_LAZY have them now; `merge` (ws split path): the
    cluster-merge kernel of that many splits (no combine)."""
    return _kernels_for(impl, h, nope, rope, tile, p1, p2, scale, split, pdl, _pair_mode(split), merge, _lazy_mode())


@functools.cache
def _kernels_for(
    impl: str, h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool, pdl: bool,
    pair: bool, merge: int = 0, lazy: bool = True,
):  # fmt: skip
    if impl == "ws" and split and merge:
        return _attend_ws_kernel(h, p1, p2, scale, True, "", BLOCK_I, 2, False, merge, lazy), None
    if impl == "ws":
        main = _attend_ws_kernel(h, p1, p2, scale, split, "", BLOCK_I, 2, pair, 0, lazy)
    else:
        main = _attend_legacy_kernel(h, nope, rope, tile, p1, p2, scale, split)
    comb = _combine_kernel(h, nope + rope, pdl) if split else None
    return main, comb


@jit(pass_configs=WS_PASS_CONFIGS)
def _attend_ws_kernel(
    h: int, p1: int, p2: int, scale: float, split: bool, probe: str = "", bi: int = BLOCK_I, stages: int = 2,
    pair: bool | None = None, merge: int = 0, lazy: bool = True,
):  # fmt: skip
    return build_attend_ws(h, p1, p2, scale, split, probe, bi, stages, pair, merge, lazy)


@jit(pass_configs=PASS_CONFIGS)
def _attend_legacy_kernel(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    return build_attend_legacy(h, nope, rope, tile, p1, p2, scale, split)


@jit
def _combine_kernel(h: int, d: int, pdl: bool = True):
    return build_combine(h, d, pdl)


def build_attend(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    """The attention PrimFunc of the current `ATTN_IMPL` (exposed for the CPU lowering tests)."""
    if ATTN_IMPL == "ws" and (nope, rope, tile) == (WS_NOPE, WS_ROPE, WS_TILE):
        return build_attend_ws(h, p1, p2, scale, split)
    return build_attend_legacy(h, nope, rope, tile, p1, p2, scale, split)


def _online_softmax(HB: int, BI: int, sl2: float, ftz_exp2: bool = False, lazy_tau: float = 0.0):
    """Macro, both attention kernels: one block's online-softmax update in the log2 domain (sl2 = scale / ln 2)
    over the scores acc_s [HB, BI]: m_i <- max(m_i, row max), alpha = 2^((m_prev - m_i) sl2), acc_s <- P =
    2^((acc_s - m_i) sl2), sumexp <- sumexp alpha + row sum of P (sum_i: scratch). `ftz_exp2` (ws kernel, whose
    device source has `dsv4fn_ex2`): 2^x as one MUFU.EX2 (ex2.approx.ftz) instead of exp2f's five instructions
    (ex2.approx without ftz: a range test and two rescaling multiplies); the same value down to 2^-126, 0 below
    (a weight under 2^-126 of the row's largest). `lazy_tau` > 0: the running max moves only when the block's is
    more than 2^lazy_tau larger (P <= 2^lazy_tau; alpha = 1 exactly otherwise, so the caller may skip the rescale)."""

    def exp2(x):
        return T.call_extern("float32", "dsv4fn_ex2", x) if ftz_exp2 else T.exp2(x)

    @T.macro
    def update(acc_s, m_i, m_prev, alpha, sumexp, sum_i):
        T.copy(m_i, m_prev)
        T.reduce_max(acc_s, m_i, dim=1, clear=False)
        for i in T.Parallel(HB):
            if lazy_tau > 0:
                m_i[i] = T.if_then_else((m_i[i] - m_prev[i]) * sl2 > lazy_tau, m_i[i], m_prev[i])
                alpha[i] = T.if_then_else(m_i[i] == m_prev[i], 1.0, exp2((m_prev[i] - m_i[i]) * sl2))
            else:
                m_i[i] = T.max(m_i[i], m_prev[i])
                alpha[i] = exp2((m_prev[i] - m_i[i]) * sl2)
        for i, j in T.Parallel(HB, BI):
            acc_s[i, j] = exp2(acc_s[i, j] * sl2 - m_i[i] * sl2)
        T.reduce_sum(acc_s, sum_i, dim=1)
        for i in T.Parallel(HB):
            sumexp[i] = sumexp[i] * alpha[i] + sum_i[i]

    return update


def build_attend_ws(
    h: int, p1: int, p2: int, scale: float, split: bool, probe: str = "", bi: int = BLOCK_I, stages: int = 2,
    pair: bool | None = None, merge: int = 0, lazy: bool = True,
):  # fmt: skip
    """The warp-specialised attention PrimFunc (V4 geometry: 448 e4m3 + 64 bf16 rope, tile 64): blocks of `bi`
    keys (32 or 64) on a ring of `stages` bf16 K tiles; `pair`: pair mode for two head blocks (module docstring;
    None: where WS_PAIR puts it); `merge` (split only: 2, 4 or 8): the row's `merge` splits run as one cluster and
    merge their partials through distributed shared memory (cluster merge, module docstring) instead of writing
    them for the combine kernel. `lazy`: the lazy rescale (WS_LAZY; probes `lazy` / `no_lazy` override it).
    `probe` (development only, wrong results): comma list of stages left out, to time the rest (bench/
    tilelang_profile_dev.py attn-probe): no_qk, no_pv, no_dq, no_softmax, no_cvt (tiles stored unconverted),
    no_sts (converted, not stored); pair mode: no_remote (no half copied to the peer); trace (SM clock stamps of
    every role and block, written over the output: TRACE_ROWS). Two probes keep the results exact, to time what
    FlashMLA does differently: pv_rs (warpgroup 0's P V with P from registers, RS wgmma, without waiting for its own
    S stores; pair mode always does so), l2_256 (the producer's record loads with an L2::256B prefetch hint),
    lazy / no_lazy (the lazy rescale on / off), regs=A/B/C (register budgets of warpgroup 0, 1, the producer), pf=N
    (N keys of the next wave's rows prefetched, WS_PREFETCH; PF_KEYS by default), ix_late / ix_early (the producer
    fetches the indices of its block after next after / before signalling a K tile; pair mode: after), pv0_async /
    pv0_sync (warpgroup 0's P V issued before S is handed to warpgroup 1 and waited for after; pair mode: on),
    ld_zero / ld_keep (a masked key's registers zeroed by its record loads / left as they were; pair mode: left)."""
    probes = set(filter(None, probe.split(",")))
    TRACE = "trace" in probes
    LD128 = "dsv4fn_ld128_l2" if "l2_256" in probes else "dsv4fn_ld128"
    MISC = len(TRACE_BLOCK)  # the trace's row of single stamps
    D, NOPE, NT, DH = WS_D, WS_NOPE, WS_NT, WS_D // 2
    RECW = WS_REC // 4  # record in 32-bit words (144)
    RECH = WS_REC // 2  # record in bf16 halves (288)
    HB, BI, KS = HEAD_BLOCK, bi, stages
    if BI not in (32, 64) or not 2 <= KS <= 4:
        raise ValueError(f"ws attention: blocks of 32 or 64 keys on 2-4 stages, got {BI} x {KS}")
    NHB = (h + HB - 1) // HB
    MERGE = merge
    if MERGE and (not 2 <= MERGE <= 8 or not split or BI != 64 or KS != 2 or TRACE):
        raise ValueError(f"ws attention: cluster merge of 2-8 splits (64-key blocks, 2 stages), got {MERGE}")
    # pair mode (two head blocks, 64-key blocks): the row's two CTAs form a 2-CTA cluster; CTA `rank` dequantizes
    # keys 32 rank .. 32 rank + 31 of every block into its own K tile, then one thread copies that half (rows
    # 32 rank .. 32 rank + 31 of each 64-column chunk of the 128B-swizzled tile: 8 x 4 KB) and its 32 valid flags
    # into the peer's tile (cp.async.bulk shared::cta -> shared::cluster), the bytes counted on the peer's k_remote
    PAIR = (_pair_mode(split) if pair is None else pair) and NHB == 2 and BI == 64 and not MERGE
    # A producer thread's register sets (raw words, rope, scales): one per key of its block (keys tok0 + 32 r),
    # or in pair mode (one key a block) one per block of a two-block ring (loads in flight two blocks ahead).
    # `ixn` holds the indices of the next block to be loaded (this thread's keys).
    R = 2 if PAIR else BI // 32
    BULK = "no_remote" not in probes and "no_sts" not in probes
    HALF_CHUNK = BI // 2 * 128  # bytes of one 64-column chunk's half (32 rows of 128 bytes)
    HALF_FLAGS = BI // 2 * 4  # bytes of the half's valid flags
    PEER_TX = (D // 64 * HALF_CHUNK + HALF_FLAGS) if BULK else 0  # bytes the peer copies into a K tile a block
    NIX = 1 if PAIR else R  # indices held for the next block to load (this thread's keys of it)
    CLUSTER = (2, 1, 1) if PAIR else (MERGE, 1, 1) if MERGE else None
    PV_RS = PAIR or "pv_rs" in probes  # warpgroup 0's P V with P from registers (pair mode; probe elsewhere)
    # warpgroup 0 issues its P V (P from registers) before handing S to warpgroup 1 and waits for it after: pair mode
    # (3-5% at V4-Pro b=64-256 on the H100; nothing unpaired); probes pv0_async (with pv_rs) / pv0_sync
    PV_ASYNC = PV_RS and (PAIR or "pv0_async" in probes) and "pv0_sync" not in probes
    LAZY = lazy if not {"lazy", "no_lazy"} & probes else "lazy" in probes
    # register budgets of warpgroup 0, warpgroup 1, the producer (probe regs=A/B/C: other budgets, same results)
    REGS = next(
        (tuple(int(x) for x in p[5:].split("/")) for p in probes if p.startswith("regs=")),
        REG_PAIR if PAIR else (REG_WG0, REG_WG1, REG_PRODUCER),
    )
    # where the producer fetches the indices of the block after the one it loads next: after signalling k_ready (pair
    # mode: 4-5% faster at V4-Pro b=64-256 on the H100) or before (unpaired: 4% faster so); probes ix_late / ix_early
    IX_LATE = "ix_late" in probes or (PAIR and "ix_early" not in probes)
    # keys of the next wave's row prefetched (WS_PREFETCH; probe pf=N: another count, same results)
    PFK = next((int(p[3:]) for p in probes if p.startswith("pf=")), PF_KEYS)
    # a masked key's record loads (the key is never read): pair mode leaves its registers as they were (~20 of the
    # producer's ~340 instructions a key fewer: 1-2% at V4-Pro b=128/256 on the H100), the unpaired kernel zeroes
    # them (2-3% faster so at V4-Flash b=128/256: keeping them ties each load to the registers' last reads);
    # probes ld_keep / ld_zero
    LD_KEEP = "ld_keep" in probes or (PAIR and "ld_zero" not in probes)
    LDZ = "" if LD_KEEP else "z"
    LD128 += LDZ
    PAD_HEADS = h % HB != 0
    sl2 = scale * LOG2E
    softmax_update = _online_softmax(HB, BI, sl2, ftz_exp2=True, lazy_tau=LAZY_TAU if LAZY else 0.0)
    bf16, f32, i32, i64 = T.bfloat16, T.float32, T.int32, T.int64

    B = T.dynamic("batch")
    SQ = T.dynamic("s_q")
    K1 = T.dynamic("k1")
    K2 = T.dynamic("k2")
    W1 = T.dynamic("words1")
    W2 = T.dynamic("words2")
    H1 = T.dynamic("halves1")
    H2 = T.dynamic("halves2")
    NS = T.dynamic("splits")

    @T.macro
    def stamp(trace_s, event, it, lead):  # (`it`: named as the loop variables it gets)
        # trace probe: the SM clock at TRACE_BLOCK `event` of block it, by the thread where `lead` holds
        if TRACE:
            if lead:
                trace_s[TRACE_BLOCK.index(event), it] = T.call_extern("int32", "dsv4fn_clock")

    @T.macro
    def stamp_once(trace_s, name, lead):
        # trace probe: the single stamp TRACE_MISC `name` (the global timer for names ending in " ns")
        if TRACE:
            if lead:
                trace_s[MISC, TRACE_MISC.index(name)] = T.call_extern(
                    "int32", "dsv4fn_gtimer" if name.endswith(" ns") else "dsv4fn_clock"
                )

    @T.macro
    def load_q(Q, Q_s, b, sq, h0):
        if PAD_HEADS:
            for i, dd in T.Parallel(HB, D):
                Q_s[i, dd] = T.if_then_else(h0 + i < h, Q[b, sq, T.min(h0 + i, h - 1), dd], T.cast(0, bf16))
        else:
            T.copy(Q[b, sq, h0 : h0 + HB, :], Q_s)
        T.fence_proxy_async()  # Q_s is read by wgmma (async proxy) ...
        named_sync(WG0_BARRIER, 128)  # ... of all 128 threads

    AHEAD = R if PAIR else 1  # blocks loaded ahead of the one being dequantized

    def ixv(ixn, r):  # the index of register set r's key (an expression: no let binding in the unpaired kernel)
        return ixn[0] if PAIR else ixn[r]

    def kofs(r):  # the key (tok0 + kofs) of register set r
        return 0 if PAIR else 32 * r

    @T.macro
    def fetch_indices(Idx1, Idx2, b, sq, nb1, blk, tok0, ixn):
        # indices of this thread's keys of block `blk` (main list first, then extra)
        for r in T.unroll(NIX):
            if blk < nb1:
                ixn[r] = Idx1[b, sq, T.min(blk * BI + (tok0 + 32 * r) % BI, K1 - 1)]
            else:
                ixn[r] = Idx2[b, sq, T.min((blk - nb1) * BI + (tok0 + 32 * r) % BI, K2 - 1)]

    @T.macro
    def issue_loads(Cw, Ch, P, rpp, n, col0, tok0, c, r, ixn, ok, raw, rp, sc):
        # all loads of this thread's key (tok0 + kofs(r)) of a block into register set r, predicated on validity
        # (zeros otherwise)
        ok[r] = T.if_then_else((col0 + tok0 + kofs(r) < n) & (ixv(ixn, r) >= 0), 1, 0)
        slot = T.max(ixv(ixn, r), 0)
        prow = T.cast(slot // P, i64) * rpp
        row = prow + slot % P
        for t in T.unroll(NT):
            T.call_extern(
                "handle", LD128, T.address_of(raw[r, t, 0]), T.address_of(Cw[row * RECW + t * 16 + c * 4]), ok[r]
            )
        for t in T.unroll(2):
            T.call_extern(
                "handle", LD128, T.address_of(rp[r, t, 0]),
                T.address_of(Ch[row * RECH + NOPE // 2 + t * 32 + c * 8]), ok[r],
            )  # fmt: skip
        T.call_extern(
            "handle", "dsv4fn_ld64" + LDZ, T.address_of(sc[r, 0]), T.address_of(Cw[(prow + P) * RECW + (slot % P) * 2]),
            ok[r],
        )  # fmt: skip

    @T.macro
    def issue_block_loads(
        C1w, C1h, C2w, C2h, rpp1, rpp2, n1, n2, nb1, blk, tok0, c, r, ixn, ok, raw, rp, sc,
    ):  # fmt: skip
        if blk < nb1:
            issue_loads(C1w, C1h, p1, rpp1, n1, blk * BI, tok0, c, r, ixn, ok, raw, rp, sc)
        else:
            issue_loads(C2w, C2h, p2, rpp2, n2, (blk - nb1) * BI, tok0, c, r, ixn, ok, raw, rp, sc)

    def make_dequant_store(fn: str):
        """Macro: dequantize register set r (key tok0 + kofs(r)) into K_s[st] with the extern `fn`."""
        if "no_cvt" in probes:
            fn = "dsv4fn_dq16_nocvt"

        @T.macro
        def dequant_store(st, tok0, c, r, ok, raw, rp, sc, outb, K_s, valid_s):
            for t in T.unroll(NT):
                T.call_extern("handle", fn, T.address_of(raw[r, t, 0]), sc[r, t // 4], t % 4,
                              T.address_of(outb[0]))  # fmt: skip
                if "no_sts" in probes:  # the values stay live (folded into one word), the K tile is not written
                    if c == 0:
                        valid_s[st, tok0 + kofs(r)] = T.call_extern("int32", "dsv4fn_fold8", T.address_of(outb[0]))
                else:
                    for v in T.vectorized(16):
                        K_s[st, tok0 + kofs(r), t * 64 + c * 16 + v] = outb[v]
            for t in T.unroll(2):
                for v in T.vectorized(8):
                    K_s[st, tok0 + kofs(r), NOPE + t * 32 + c * 8 + v] = rp[r, t, v]
            if c == 0:
                valid_s[st, tok0 + kofs(r)] = ok[r]

        return dequant_store

    dequant_fast = make_dequant_store("dsv4fn_dq16")
    dequant_big = make_dequant_store("dsv4fn_dq16_big")

    @T.macro
    def produce(
        it, sets, Idx1, Idx2, C1w, C1h, C2w, C2h, rpp1, rpp2, b, sq, n1, n2, nb1, blk0, cnt, K_s, valid_s, k_ready,
        k_free, k_remote, p, trace_s, tok0, c, rank, ixn, ok, raw, rp, sc, outb, peer_bar,
    ):  # fmt: skip
        # block it: wait for its K tile, dequantize register sets `sets` (None: all R, T.unroll) into it, reload
        # each set with the block AHEAD later as soon as it is dequantized, fetch the indices after that, signal
        # the tile
        blk = blk0 + it
        st = it % KS
        # pair mode: both CTAs' consumers are done with tile st (this producer writes into both; remote arrivals,
        # waited at CTA scope as CUTLASS's cluster barriers are)
        barrier_wait(k_free, st, ((it // KS) % 2) ^ 1)
        if PAIR:
            if p == 0:  # the peer's half of this CTA's tile arrives as bulk-copy bytes
                T.call_extern("handle", "dsv4fn_arrive_expect_tx", T.address_of(k_remote[st]), PEER_TX)
            peer_bar[0] = T.call_extern("uint32", "dsv4fn_cluster_addr", T.address_of(k_remote[st]), 1 - rank)
        stamp(trace_s, "P free", it, p == 0)
        for r in T.unroll(R) if sets is None else sets:
            # the second bf16 multiply (UE8M0 byte > 142, |values| > 2^7) only when some lane needs it
            if "no_dq" in probes:  # (the loaded words are still consumed, so the loads stay)
                if c == 0:
                    valid_s[st, tok0 + kofs(r)] = ok[r] + raw[r, 0, 0] + raw[r, 6, 3] + sc[r, 1]
            elif T.call_extern("int32", "dsv4fn_warp_any_big", sc[r, 0], sc[r, 1]) != 0:
                dequant_big(st, tok0, c, r, ok, raw, rp, sc, outb, K_s, valid_s)
            else:
                dequant_fast(st, tok0, c, r, ok, raw, rp, sc, outb, K_s, valid_s)
            if it + AHEAD < cnt:
                issue_block_loads(
                    C1w, C1h, C2w, C2h, rpp1, rpp2, n1, n2, nb1, blk + AHEAD, tok0, c, r, ixn, ok, raw, rp, sc
                )  # fmt: skip
        if not IX_LATE and it + AHEAD + 1 < cnt:
            fetch_indices(Idx1, Idx2, b, sq, nb1, blk + AHEAD + 1, tok0, ixn)
        stamp(trace_s, "P done", it, p == 0)
        T.fence_proxy_async()  # K_s is read by wgmma and (pair mode) by the bulk copy (async proxy)
        if PAIR:
            if BULK:
                named_sync(PRODUCER_BARRIER, 128)  # this CTA's half of tile st is written
                if p == 0:
                    for t in T.unroll(D // 64):
                        T.call_extern(
                            "handle", "dsv4fn_bulk_to_peer", T.address_of(K_s[st, 32 * rank, t * 64]),
                            HALF_CHUNK, peer_bar[0], 1 - rank,
                        )  # fmt: skip
                    T.call_extern(
                        "handle", "dsv4fn_bulk_to_peer", T.address_of(valid_s[st, 32 * rank]), HALF_FLAGS,
                        peer_bar[0], 1 - rank,
                    )  # fmt: skip
        T.barrier_arrive(k_ready[st])
        if IX_LATE and it + AHEAD + 1 < cnt:
            fetch_indices(Idx1, Idx2, b, sq, nb1, blk + AHEAD + 1, tok0, ixn)

    @T.macro
    def producer(
        Idx1, Len1, C1w, C1h, Idx2, Len2, C2w, C2h, rpp1, rpp2, b, sq, n1, n2, nb1, blk0, cnt,
        K_s, valid_s, k_ready, k_free, k_remote, p, trace_s, rank,
    ):  # fmt: skip
        stamp_once(trace_s, "producer start", p == 0)
        lane = p % 32
        c = lane // 8  # 16-byte column of each 64-wide tile
        # keys tok0 and tok0 + 32 of every block (pair mode: key tok0 only, in the upper half for rank 1)
        tok0 = (p // 32) * 8 + lane % 8 + (32 * rank if PAIR else 0)
        raw = T.alloc_local([R, NT, 4], i32)
        rp = T.alloc_local([R, 2, 8], bf16)
        sc = T.alloc_local([R, 2], i32)
        ixn = T.alloc_local([NIX], i32)
        ok = T.alloc_local([R], i32)
        outb = T.alloc_local([16], bf16)
        peer_bar = T.alloc_local([1], T.uint32)
        if LD_KEEP:  # the record loads of a masked key leave its registers as they were: zeros until the first load
            for r in T.unroll(R):
                for t in T.unroll(NT):
                    for k in T.unroll(4):
                        raw[r, t, k] = 0
                for t in T.unroll(2):
                    for k in T.unroll(8):
                        rp[r, t, k] = T.cast(0, bf16)
                for k in T.unroll(2):
                    sc[r, k] = 0

        # Software pipeline: a register set is reloaded (the same key AHEAD blocks later) as soon as it is
        # dequantized, so loads stay in flight while this warpgroup waits for a free K tile and dequantizes.
        if PAIR:  # sets = blocks it % 2 (unrolled here: the sets are registers, indexed by constants only)
            for r in T.unroll(R, explicit=True):
                if r < cnt:
                    fetch_indices(Idx1, Idx2, b, sq, nb1, blk0 + r, tok0, ixn)
                    issue_block_loads(
                        C1w, C1h, C2w, C2h, rpp1, rpp2, n1, n2, nb1, blk0 + r, tok0, c, r, ixn, ok, raw, rp, sc
                    )  # fmt: skip
            if R < cnt:
                fetch_indices(Idx1, Idx2, b, sq, nb1, blk0 + R, tok0, ixn)
            for it2 in T.serial(T.ceildiv(cnt, R)):
                for r in T.unroll(R, explicit=True):
                    if it2 * R + r < cnt:
                        produce(
                            it2 * R + r, (r,), Idx1, Idx2, C1w, C1h, C2w, C2h, rpp1, rpp2, b, sq, n1, n2, nb1, blk0,
                            cnt, K_s, valid_s, k_ready, k_free, k_remote, p, trace_s, tok0, c, rank, ixn, ok,
                            raw, rp, sc, outb, peer_bar,
                        )  # fmt: skip
        else:  # sets = the block's keys
            if cnt > 0:
                fetch_indices(Idx1, Idx2, b, sq, nb1, blk0, tok0, ixn)
                for r in T.unroll(R):
                    issue_block_loads(
                        C1w, C1h, C2w, C2h, rpp1, rpp2, n1, n2, nb1, blk0, tok0, c, r, ixn, ok, raw, rp, sc
                    )  # fmt: skip
                if cnt > 1:
                    fetch_indices(Idx1, Idx2, b, sq, nb1, blk0 + 1, tok0, ixn)
            for it in T.serial(cnt):
                produce(
                    it, None, Idx1, Idx2, C1w, C1h, C2w, C2h, rpp1, rpp2, b, sq, n1, n2, nb1, blk0, cnt,
                    K_s, valid_s, k_ready, k_free, k_remote, p, trace_s, tok0, c, rank, ixn, ok, raw, rp, sc,
                    outb, peer_bar,
                )  # fmt: skip
        stamp_once(trace_s, "producer end", p == 0)

    @T.macro
    def prefetch_record(Cw, P, rpp, slot):
        # one key's 576-byte record and the L2 line of its scales
        prow = T.cast(slot // P, i64) * rpp
        T.call_extern("handle", "dsv4fn_prefetch_bulk", T.address_of(Cw[(prow + slot % P) * RECW]), WS_REC)
        T.call_extern("handle", "dsv4fn_prefetch_line", T.address_of(Cw[(prow + P) * RECW + (slot % P) * 2]))

    @T.macro
    def prefetch_next(Q, Idx1, Len1, C1w, Idx2, Len2, C2w, rpp1, rpp2, b, sq, h0, ahead, p):
        # WS_PREFETCH (producer threads p, after their last block): into L2, what the CTA `ahead` rows later with this
        # head block reads first - the next wave's, when a wave holds `ahead` rows (0: off)
        nxt = b * SQ + sq + ahead
        if ahead > 0 and nxt < B * SQ:
            b2 = nxt // SQ
            sq2 = nxt % SQ
            if p < HB:  # its Q rows, one head (1 KB) a thread
                if h0 + p < h:
                    T.call_extern("handle", "dsv4fn_prefetch_bulk", T.address_of(Q[b2, sq2, h0 + p, 0]), D * 2)
            if p * 32 < K1:  # its index rows, one 128-byte line a thread
                T.call_extern("handle", "dsv4fn_prefetch_line", T.address_of(Idx1[b2, sq2, p * 32]))
            if p * 32 < K2:
                T.call_extern("handle", "dsv4fn_prefetch_line", T.address_of(Idx2[b2, sq2, p * 32]))
            for j in T.unroll((PFK // NHB + 127) // 128):  # key k of its first PFK (main list, then extra), its share
                k = (h0 // HB) * (PFK // NHB) + j * 128 + p
                n1b = T.max(T.min(Len1[b2], K1), 0)
                if j * 128 + p < PFK // NHB:
                    if k < n1b:
                        if Idx1[b2, sq2, k] >= 0:
                            prefetch_record(C1w, p1, rpp1, Idx1[b2, sq2, k])
                    elif k - n1b < T.max(T.min(Len2[b2], K2), 0):
                        if Idx2[b2, sq2, k - n1b] >= 0:
                            prefetch_record(C2w, p2, rpp2, Idx2[b2, sq2, k - n1b])

    @T.macro
    def release_k(k_free, st, tx, w0):
        # a consumer warpgroup (threads w0..w0+127) is done with K tile st (its wgmma has completed)
        if PAIR:  # one arrival on each CTA's barrier, from two warps of the warpgroup (the peer's tile too)
            if tx == w0 + 32:
                T.call_extern("handle", "dsv4fn_arrive_rank", T.address_of(k_free[st]), 0)
            if tx == w0 + 64:
                T.call_extern("handle", "dsv4fn_arrive_rank", T.address_of(k_free[st]), 1)
        else:
            T.barrier_arrive(k_free[st])

    @T.macro
    def rescale(acc_o, alpha, resc):
        # a consumer warpgroup's accumulator rows times the block's alpha; lazy rescale: a warp rescales its 16 rows
        # only when one of them moved its max this block (alpha != 1)
        if LAZY:
            resc[0] = 0
            for i in T.Parallel(HB):
                resc[0] = resc[0] | T.if_then_else(alpha[i] != 1.0, 1, 0)
            if T.call_extern("int32", "dsv4fn_warp_any", resc[0]) != 0:
                for i, d in T.Parallel(HB, DH):
                    acc_o[i, d] = acc_o[i, d] * alpha[i]
        else:
            for i, d in T.Parallel(HB, DH):
                acc_o[i, d] = acc_o[i, d] * alpha[i]

    @T.macro
    def consumer0(
        Q, Q_s, K_s, S_s, valid_s, alpha_s, resc, k_ready, k_free, k_remote, s_ready, s_free, b, sq, h0, cnt,
        acc_o, acc_s, acc_p, m_i, m_prev, sumexp, sum_i, alpha, trace_s,
    ):  # fmt: skip
        tx = T.get_thread_binding()
        stamp_once(trace_s, "WG0 start", tx == 0)
        stamp_once(trace_s, "WG0 start ns", tx == 0)
        load_q(Q, Q_s, b, sq, h0)
        stamp_once(trace_s, "Q loaded", tx == 0)
        T.fill(acc_o, 0)
        T.fill(sumexp, 0)
        T.fill(m_i, -(2.0**30))
        for it in T.serial(cnt):
            st = it % KS
            barrier_wait(k_ready, st, (it // KS) % 2)
            if PAIR:  # the peer's half of the tile (bulk-copy bytes: async proxy, read by wgmma's async proxy)
                barrier_wait(k_remote, st, (it // KS) % 2)
            stamp(trace_s, "K rdy", it, tx == 0)
            for i, j in T.Parallel(HB, BI):
                acc_s[i, j] = T.if_then_else(valid_s[st, j] != 0, 0, -T.infinity(f32))
            if "no_qk" not in probes:
                T.gemm(Q_s, K_s[st, :, :], acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            stamp(trace_s, "QK done", it, tx == 0)
            if "no_softmax" not in probes:
                softmax_update(acc_s, m_i, m_prev, alpha, sumexp, sum_i)
            else:
                for i in T.Parallel(HB):
                    alpha[i] = 1.0
            rescale(acc_o, alpha, resc)
            if PV_ASYNC:  # this warpgroup's P V (P from registers) issued first, waited for after the hand-off
                T.copy(acc_s, acc_p)
                if "no_pv" not in probes:
                    T.wgmma_gemm(acc_p, K_s[st, :, 0:DH], acc_o, policy=T.GemmWarpPolicy.FullRow)
            if it > 0:
                barrier_wait(s_free, 0, (it - 1) % 2)  # warpgroup 1 is done with S_s / alpha_s of block it-1
            T.copy(alpha, alpha_s)
            if PV_ASYNC:
                T.copy(acc_p, S_s)
            elif PV_RS:  # P from registers for this warpgroup's P V, S_s for warpgroup 1's only
                T.copy(acc_s, acc_p)
                T.copy(acc_p, S_s)
            else:
                T.copy(acc_s, S_s)
            T.fence_proxy_async()  # S_s is read by wgmma (async proxy), in warpgroup 1 (and here unless pv_rs)
            T.barrier_arrive(s_ready)
            if not PV_RS:
                named_sync(WG0_BARRIER, 128)  # every row of S_s written before this warpgroup's wgmma
            stamp(trace_s, "S done", it, tx == 0)
            if PV_ASYNC:
                T.wait_wgmma(0)
            elif "no_pv" not in probes:
                T.gemm(acc_p if PV_RS else S_s, K_s[st, :, 0:DH], acc_o, policy=T.GemmWarpPolicy.FullRow)
            stamp(trace_s, "PV0 done", it, tx == 0)
            release_k(k_free, st, tx, 0)

    @T.macro
    def consumer1(K_s, S_s, alpha_s, resc, k_free, s_ready, s_free, cnt, acc_o, alpha, trace_s):
        tx = T.get_thread_binding()
        T.fill(acc_o, 0)
        for it in T.serial(cnt):
            st = it % KS
            barrier_wait(s_ready, 0, it % 2)
            stamp(trace_s, "S rdy", it, tx == 128)
            T.copy(alpha_s, alpha)
            rescale(acc_o, alpha, resc)
            if "no_pv" not in probes:
                T.gemm(S_s, K_s[st, :, DH:D], acc_o, policy=T.GemmWarpPolicy.FullRow)
            stamp(trace_s, "PV1 done", it, tx == 128)
            T.barrier_arrive(s_free)
            release_k(k_free, st, tx, 128)

    @T.macro
    def store_half(Out, Q_s, acc_o, fac, b, sq, h0, d0, bar):
        # one warpgroup's half of the bf16 output (columns d0..d0+255): staged in Q_s (free once the last
        # Q K^T is done), then written as whole rows (16-byte stores; straight from the wgmma fragment each
        # thread would store 4 bytes into each of 8 rows, half of every 32-byte sector)
        if PAD_HEADS:
            for i, d in T.Parallel(HB, DH):
                if h0 + i < h:
                    Out[b, sq, h0 + i, d0 + d] = T.cast(acc_o[i, d] * fac[i], bf16)
        else:
            for i, d in T.Parallel(HB, DH):
                Q_s[i, d0 + d] = T.cast(acc_o[i, d] * fac[i], bf16)
            named_sync(bar, 128)
            for i, d in T.Parallel(HB, DH):
                Out[b, sq, h0 + i, d0 + d] = Q_s[i, d0 + d]

    @T.macro
    def cluster_sync_all():
        # cluster merge: every thread of every CTA of the cluster (release / acquire: shared-memory stores before
        # it are seen by the peers' reads after it)
        T.call_extern("handle", "dsv4fn_cluster_sync_all")

    @T.macro
    def stage_half(K_s, acc_o, fac, d0):
        # cluster merge: one warpgroup's columns d0..d0+255 of this CTA's scaled partial into its K tiles' memory
        # (fp32 [64][512], swizzled: dsv4fn_stage_f32), read by the whole cluster
        for i, d in T.Parallel(HB, DH):
            T.call_extern("handle", "dsv4fn_stage_f32", T.address_of(K_s[0, 0, 0]), i, d0 + d, acc_o[i, d] * fac[i])

    @T.macro
    def merge_rows(K_s, Out, b, sq, h0, sp, tx):
        # cluster merge: this CTA's 1 / MERGE of the output's 4-column units (whole rows when MERGE divides HB),
        # each the sum of the cluster's staged partials
        UNITS = D // 4  # a row's units
        PER = (HB * UNITS + MERGE - 1) // MERGE  # units a CTA
        for k in T.serial((PER + WS_THREADS - 1) // WS_THREADS):
            u = sp * PER + k * WS_THREADS + tx
            if k * WS_THREADS + tx < PER and u < HB * UNITS:
                row = u // UNITS
                c4 = u % UNITS
                if h0 + row < h:
                    T.call_extern(
                        "handle", f"dsv4fn_merge4<{MERGE}>", T.address_of(K_s[0, 0, 0]), row, c4,
                        T.address_of(Out[b, sq, h0 + row, c4 * 4]),
                    )  # fmt: skip

    def kernel_body(mode: str):
        """The shared prologue / role split as a macro taking the epilogue outputs. `mode`: "direct" (bf16 output
        and LSE), "partial" (fp32 partials and log2 LSEs for the combine) or "merge" (cluster merge: the output and
        LSE of the row, merged in the cluster)."""
        split_mode = mode == "partial"

        @T.macro
        def body(
            Q, Idx1, Len1, C1w, C1h, Idx2, Len2, C2w, C2h, rpp1, rpp2, b, sq, h0, sp, nsplit, Sink, Out, L, ahead,
        ):  # fmt: skip
            T.import_source(WS_DEVICE_SRC)
            Q_s = T.alloc_shared([HB, D], bf16)
            K_s = T.alloc_shared([KS, BI, D], bf16)
            S_s = T.alloc_shared([HB, BI], bf16)
            valid_s = T.alloc_shared([KS, BI], i32)
            alpha_s = T.alloc_shared([HB], f32)
            fac_s = T.alloc_shared([HB], f32)
            lse_s = T.alloc_shared([HB], f32)  # cluster merge: this split's log2 LSE per head, read by the cluster
            k_ready = T.alloc_barrier([128] * KS)  # this CTA's producer threads
            # consumer threads; pair mode: one arrival per consumer warpgroup of both CTAs
            k_free = T.alloc_barrier([4 if PAIR else 256] * KS)
            k_remote = T.alloc_barrier([1] * KS) if PAIR else None  # pair: expect_tx + the peer's copied bytes
            s_ready = T.alloc_barrier(128)
            s_free = T.alloc_barrier(128)
            epi = T.alloc_barrier(128)
            trace_s = T.alloc_shared([TRACE_ROWS if TRACE else 1, 32], i32)  # (unused, dropped, without the probe)
            tx = T.get_thread_binding()
            n1 = T.max(T.min(Len1[b], K1), 0)
            n2 = T.max(T.min(Len2[b], K2), 0)
            nb1 = T.ceildiv(n1, BI)
            nb = nb1 + T.ceildiv(n2, BI)
            per = T.ceildiv(nb, nsplit)
            blk0 = sp * per
            cnt = T.max(T.min(nb - blk0, per), 0)
            rank = (h0 // HB) % 2  # pair mode: this CTA's rank in the cluster (its head block)
            if PAIR:
                T.cluster_sync()  # both CTAs' barriers initialised before the first remote arrival or store
            if tx < 128:
                T.set_max_nreg(REGS[0], 1)
                acc_o = T.alloc_fragment([HB, DH], f32)
                acc_s = T.alloc_fragment([HB, BI], f32)
                acc_p = T.alloc_fragment([HB, BI], bf16) if PV_RS else None  # P in registers (pv_rs)
                m_i = T.alloc_fragment([HB], f32)
                m_prev = T.alloc_fragment([HB], f32)
                sumexp = T.alloc_fragment([HB], f32)
                sum_i = T.alloc_fragment([HB], f32)
                alpha = T.alloc_fragment([HB], f32)
                fac = T.alloc_fragment([HB], f32)
                resc = T.alloc_local([1], i32)  # lazy rescale: some row of this thread's moved its max
                consumer0(Q, Q_s, K_s, S_s, valid_s, alpha_s, resc, k_ready, k_free, k_remote, s_ready, s_free, b, sq,
                          h0, cnt, acc_o, acc_s, acc_p, m_i, m_prev, sumexp, sum_i, alpha, trace_s)  # fmt: skip
                if split_mode:
                    for i in T.Parallel(HB):
                        fac[i] = T.if_then_else(sumexp[i] != 0, 1.0 / sumexp[i], 0.0)
                elif mode == "merge":  # the row's log2 LSE from the cluster's: m_prev = max, sum_i = sum, alpha = LSE
                    for i in T.Parallel(HB):
                        lse_s[i] = T.if_then_else(sumexp[i] != 0, T.log2(sumexp[i]) + m_i[i] * sl2, -T.infinity(f32))
                        m_prev[i] = -T.infinity(f32)
                        sum_i[i] = 0.0
                    cluster_sync_all()  # (1 of 3) every split's LSEs written, every K tile read for the last time
                    for r in T.unroll(MERGE):
                        for i in T.Parallel(HB):
                            m_prev[i] = T.max(
                                m_prev[i], T.call_extern(f32, "dsv4fn_ld_rank_f32", T.address_of(lse_s[i]), r)
                            )
                    for r in T.unroll(MERGE):
                        for i in T.Parallel(HB):
                            alpha[i] = T.call_extern(f32, "dsv4fn_ld_rank_f32", T.address_of(lse_s[i]), r)
                            sum_i[i] += T.if_then_else(alpha[i] == -T.infinity(f32), 0.0, T.exp2(alpha[i] - m_prev[i]))
                    for i in T.Parallel(HB):
                        alpha[i] = T.log2(sum_i[i]) + m_prev[i]
                        sink_fac = 1.0 / (1.0 + T.exp(Sink[T.min(h0 + i, h - 1)] - alpha[i] * LN2))
                        fac[i] = T.if_then_else(sumexp[i] != 0, T.exp2(m_i[i] * sl2 - alpha[i]) * sink_fac, 0.0)
                else:
                    for i in T.Parallel(HB):
                        alpha[i] = (T.log2(sumexp[i]) + m_i[i] * sl2) * LN2  # natural-log LSE
                        fac[i] = T.if_then_else(
                            sumexp[i] != 0,
                            1.0 / (sumexp[i] * (1.0 + T.exp(Sink[T.min(h0 + i, h - 1)] - alpha[i]))),
                            0.0,
                        )
                T.copy(fac, fac_s)
                T.barrier_arrive(epi)
                if split_mode:
                    for i, d in T.Parallel(HB, DH):
                        if h0 + i < h:
                            Out[b, sq, sp, h0 + i, d] = acc_o[i, d] * fac[i]
                    for i in T.Parallel(HB):
                        if h0 + i < h:
                            L[b, sq, sp, h0 + i] = T.if_then_else(
                                sumexp[i] != 0, T.log2(sumexp[i]) + m_i[i] * sl2, -T.infinity(f32)
                            )
                elif mode == "merge":
                    stage_half(K_s, acc_o, fac, 0)
                    for i in T.Parallel(HB):
                        if sp == 0 and h0 + i < h:
                            L[b, h0 + i, sq] = T.if_then_else(sum_i[i] != 0, alpha[i] * LN2, T.infinity(f32))
                else:
                    store_half(Out, Q_s, acc_o, fac, b, sq, h0, 0, WG0_BARRIER)
                    for i in T.Parallel(HB):
                        if h0 + i < h:
                            L[b, h0 + i, sq] = T.if_then_else(sumexp[i] != 0, alpha[i], T.infinity(f32))
            elif tx < 256:
                T.set_max_nreg(REGS[1], 0)
                acc_o = T.alloc_fragment([HB, DH], f32)
                alpha = T.alloc_fragment([HB], f32)
                resc = T.alloc_local([1], i32)
                consumer1(K_s, S_s, alpha_s, resc, k_free, s_ready, s_free, cnt, acc_o, alpha, trace_s)
                if mode == "merge":
                    cluster_sync_all()  # (1 of 3)
                barrier_wait(epi, 0, 0)
                T.copy(fac_s, alpha)
                if split_mode:
                    for i, d in T.Parallel(HB, DH):
                        if h0 + i < h:
                            Out[b, sq, sp, h0 + i, DH + d] = acc_o[i, d] * alpha[i]
                elif mode == "merge":
                    stage_half(K_s, acc_o, alpha, DH)
                else:
                    store_half(Out, Q_s, acc_o, alpha, b, sq, h0, DH, WG1_BARRIER)
                stamp_once(trace_s, "WG1 end", tx == 128)
            else:
                T.set_max_nreg(REGS[2], 0)
                producer(Idx1, Len1, C1w, C1h, Idx2, Len2, C2w, C2h, rpp1, rpp2, b, sq, n1, n2, nb1, blk0, cnt,
                         K_s, valid_s, k_ready, k_free, k_remote, tx - 256, trace_s, rank)  # fmt: skip
                if mode == "direct":
                    prefetch_next(Q, Idx1, Len1, C1w, Idx2, Len2, C2w, rpp1, rpp2, b, sq, h0, ahead, tx - 256)
                if mode == "merge":
                    cluster_sync_all()  # (1 of 3)
            if mode == "merge":
                cluster_sync_all()  # (2 of 3) every split's partial staged
                merge_rows(K_s, Out, b, sq, h0, sp, tx)
                cluster_sync_all()  # (3 of 3) no CTA exits while the cluster may still read its shared memory
            if PAIR:
                T.cluster_sync()  # no CTA exits while the peer may still store into it or arrive on its barriers
            if TRACE:  # every role's stamps over this CTA's output (rows of int32 words), after all its stores
                T.sync_threads()
                stamp_once(trace_s, "CTA end", tx == 0)
                stamp_once(trace_s, "CTA end ns", tx == 0)
                T.sync_threads()
                if tx < 32:
                    for i in T.serial(TRACE_ROWS):
                        for w in T.unroll(2):
                            Out[b, sq, h0 + i, 2 * tx + w] = T.reinterpret(
                                T.call_extern("uint16", "dsv4fn_half_word", trace_s[i, tx], w), bf16
                            )

        return body

    if split and not MERGE:
        body = kernel_body("partial")

        @T.prim_func
        def attend_ws_partial(
            Q: T.Tensor[(B, SQ, h, D), bf16],
            Idx1: T.Tensor[(B, SQ, K1), i32],
            Len1: T.Tensor[(B,), i32],
            C1w: T.Tensor[(W1,), i32],
            C1h: T.Tensor[(H1,), bf16],
            Idx2: T.Tensor[(B, SQ, K2), i32],
            Len2: T.Tensor[(B,), i32],
            C2w: T.Tensor[(W2,), i32],
            C2h: T.Tensor[(H2,), bf16],
            Opart: T.Tensor[(B, SQ, NS, h, D), f32],
            Lpart: T.Tensor[(B, SQ, NS, h), f32],
            rpp1: T.int32,
            rpp2: T.int32,
        ):
            with T.Kernel(NS * NHB, SQ, B, threads=WS_THREADS, cluster_dims=CLUSTER) as (bx, sq, b):
                body(Q, Idx1, Len1, C1w, C1h, Idx2, Len2, C2w, C2h, rpp1, rpp2, b, sq, (bx % NHB) * HB, bx // NHB, NS,
                     None, Opart, Lpart, 0)  # fmt: skip

        return attend_ws_partial

    # the row's output written here: by one CTA a head block, or (cluster merge) by the MERGE CTAs of its splits
    SPL = MERGE or 1
    body = kernel_body("merge" if MERGE else "direct")

    @T.prim_func
    def attend_ws_direct(
        Q: T.Tensor[(B, SQ, h, D), bf16],
        Idx1: T.Tensor[(B, SQ, K1), i32],
        Len1: T.Tensor[(B,), i32],
        C1w: T.Tensor[(W1,), i32],
        C1h: T.Tensor[(H1,), bf16],
        Idx2: T.Tensor[(B, SQ, K2), i32],
        Len2: T.Tensor[(B,), i32],
        C2w: T.Tensor[(W2,), i32],
        C2h: T.Tensor[(H2,), bf16],
        Sink: T.Tensor[(h,), f32],
        O: T.Tensor[(B, SQ, h, D), bf16],
        Lse: T.Tensor[(B, h, SQ), f32],
        rpp1: T.int32,
        rpp2: T.int32,
        ahead: T.int32,
    ):
        with T.Kernel(NHB * SPL, SQ, B, threads=WS_THREADS, cluster_dims=CLUSTER) as (bx, sq, b):
            body(Q, Idx1, Len1, C1w, C1h, Idx2, Len2, C2w, C2h, rpp1, rpp2, b, sq, (bx // SPL) * HB, bx % SPL, SPL,
                 Sink, O, Lse, ahead)  # fmt: skip

    return attend_ws_direct


def build_attend_legacy(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    """The legacy attention PrimFunc (see module docstring)."""
    D = nope + rope
    NT = nope // tile  # scale bytes per token
    REC = nope + 2 * rope  # data record bytes
    SB = ((NT + 1 + 7) // 8) * 8  # scale record bytes
    HB = _head_block(h)
    NHB = (h + HB - 1) // HB
    BI = BLOCK_I
    sl2 = scale * LOG2E
    softmax_update = _online_softmax(HB, BI, sl2)
    bf16, f32, i32, i64 = T.bfloat16, T.float32, T.int32, T.int64
    fp8 = T.float8_e4m3fn

    B = T.dynamic("batch")
    SQ = T.dynamic("s_q")
    K1 = T.dynamic("k1")
    K2 = T.dynamic("k2")
    N1 = T.dynamic("bytes1")
    N2 = T.dynamic("bytes2")
    N1h = T.dynamic("halves1")
    N2h = T.dynamic("halves2")
    NS = T.dynamic("splits")
    PAD_HEADS = h % HB != 0

    @T.macro
    def load_one(Idx, Len, KW, Cu8, Cf8, Cbf, P, stride, b, sq, col0, valid_s, base_s, sbase_s, scale_s, KV_s):
        # 64 slots of one list (columns col0..col0+63) -> dequantized bf16 rows of KV_s (0 when invalid)
        n = T.min(Len[b], KW)
        for bi in T.Parallel(BI):
            col = col0 + bi
            ix = Idx[b, sq, T.min(col, KW - 1)]
            slot = T.max(ix, 0)
            pbase = T.cast(slot // P, i64) * T.cast(stride, i64)
            valid_s[bi] = T.if_then_else((col < n) & (ix >= 0), 1, 0)
            base_s[bi] = pbase + T.cast((slot % P) * REC, i64)
            sbase_s[bi] = pbase + T.cast(P * REC + (slot % P) * SB, i64)
        for bi, t in T.Parallel(BI, NT):
            byte = T.if_then_else(valid_s[bi] != 0, T.cast(Cu8[sbase_s[bi] + t], T.uint32), T.uint32(127))
            scale_s[bi, t] = T.reinterpret(byte << T.uint32(23), f32)
        for bi, dd in T.Parallel(BI, D):
            if dd < nope:
                KV_s[bi, dd] = T.if_then_else(
                    valid_s[bi] != 0,
                    T.cast(T.cast(Cf8[base_s[bi] + dd], f32) * scale_s[bi, dd // tile], bf16),
                    T.cast(0, bf16),
                )
            else:
                KV_s[bi, dd] = T.if_then_else(
                    valid_s[bi] != 0, Cbf[T.shift_right(base_s[bi] + nope, 1) + (dd - nope)], T.cast(0, bf16)
                )

    @T.macro
    def attend_rows(
        Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
        b, sq, h0, sp, nsplit, acc_o, sumexp, m_i,
    ):  # fmt: skip
        Q_s = T.alloc_shared([HB, D], bf16)
        KV_s = T.alloc_shared([BI, D], bf16)
        S_s = T.alloc_shared([HB, BI], bf16)
        valid_s = T.alloc_shared([BI], i32)
        base_s = T.alloc_shared([BI], i64)
        sbase_s = T.alloc_shared([BI], i64)
        scale_s = T.alloc_shared([BI, NT], f32)
        acc_s = T.alloc_fragment([HB, BI], f32)
        sumexp_i = T.alloc_fragment([HB], f32)
        alpha = T.alloc_fragment([HB], f32)
        m_prev = T.alloc_fragment([HB], f32)

        T.fill(acc_o, 0)
        T.fill(sumexp, 0)
        T.fill(m_i, -(2.0**30))
        if PAD_HEADS:
            for i, dd in T.Parallel(HB, D):
                Q_s[i, dd] = T.if_then_else(h0 + i < h, Q[b, sq, T.min(h0 + i, h - 1), dd], T.cast(0, bf16))
        else:
            T.copy(Q[b, sq, h0 : h0 + HB, :], Q_s)

        n1 = T.max(T.min(Len1[b], K1), 0)
        n2 = T.max(T.min(Len2[b], K2), 0)
        nb1 = T.ceildiv(n1, BI)
        nb = nb1 + T.ceildiv(n2, BI)
        per = T.ceildiv(nb, nsplit)
        blk0 = sp * per
        cnt = T.max(T.min(nb - blk0, per), 0)
        for it in T.serial(cnt):
            blk = blk0 + it
            if blk < nb1:
                load_one(Idx1, Len1, K1, C1u8, C1f8, C1bf, p1, stride1, b, sq, blk * BI,
                         valid_s, base_s, sbase_s, scale_s, KV_s)  # fmt: skip
            else:
                load_one(Idx2, Len2, K2, C2u8, C2f8, C2bf, p2, stride2, b, sq, (blk - nb1) * BI,
                         valid_s, base_s, sbase_s, scale_s, KV_s)  # fmt: skip
            for i, bi in T.Parallel(HB, BI):
                acc_s[i, bi] = T.if_then_else(valid_s[bi] != 0, 0, -T.infinity(f32))
            T.gemm(Q_s, KV_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            softmax_update(acc_s, m_i, m_prev, alpha, sumexp, sumexp_i)
            for i, dd in T.Parallel(HB, D):
                acc_o[i, dd] = acc_o[i, dd] * alpha[i]
            T.copy(acc_s, S_s)
            T.gemm(S_s, KV_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

    if split:

        @T.prim_func
        def attend_partial(
            Q: T.Tensor[(B, SQ, h, D), bf16],
            Idx1: T.Tensor[(B, SQ, K1), i32],
            Len1: T.Tensor[(B,), i32],
            C1u8: T.Tensor[(N1,), T.uint8],
            C1f8: T.Tensor[(N1,), fp8],
            C1bf: T.Tensor[(N1h,), bf16],
            Idx2: T.Tensor[(B, SQ, K2), i32],
            Len2: T.Tensor[(B,), i32],
            C2u8: T.Tensor[(N2,), T.uint8],
            C2f8: T.Tensor[(N2,), fp8],
            C2bf: T.Tensor[(N2h,), bf16],
            Opart: T.Tensor[(B, SQ, NS, h, D), f32],
            Lpart: T.Tensor[(B, SQ, NS, h), f32],
            stride1: T.int32,
            stride2: T.int32,
        ):
            with T.Kernel(NS * NHB, SQ, B, threads=THREADS) as (bx, sq, b):
                acc_o = T.alloc_fragment([HB, D], f32)
                sumexp = T.alloc_fragment([HB], f32)
                m_i = T.alloc_fragment([HB], f32)
                h0 = (bx % NHB) * HB
                sp = bx // NHB
                attend_rows(Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
                            b, sq, h0, sp, NS, acc_o, sumexp, m_i)  # fmt: skip
                for i, dd in T.Parallel(HB, D):
                    if h0 + i < h:
                        Opart[b, sq, sp, h0 + i, dd] = T.if_then_else(sumexp[i] != 0, acc_o[i, dd] / sumexp[i], 0.0)
                for i in T.Parallel(HB):
                    if h0 + i < h:
                        Lpart[b, sq, sp, h0 + i] = T.if_then_else(
                            sumexp[i] != 0, T.log2(sumexp[i]) + m_i[i] * sl2, -T.infinity(f32)
                        )

        return attend_partial

    @T.prim_func
    def attend_direct(
        Q: T.Tensor[(B, SQ, h, D), bf16],
        Idx1: T.Tensor[(B, SQ, K1), i32],
        Len1: T.Tensor[(B,), i32],
        C1u8: T.Tensor[(N1,), T.uint8],
        C1f8: T.Tensor[(N1,), fp8],
        C1bf: T.Tensor[(N1h,), bf16],
        Idx2: T.Tensor[(B, SQ, K2), i32],
        Len2: T.Tensor[(B,), i32],
        C2u8: T.Tensor[(N2,), T.uint8],
        C2f8: T.Tensor[(N2,), fp8],
        C2bf: T.Tensor[(N2h,), bf16],
        Sink: T.Tensor[(h,), f32],
        O: T.Tensor[(B, SQ, h, D), bf16],
        Lse: T.Tensor[(B, h, SQ), f32],
        stride1: T.int32,
        stride2: T.int32,
    ):
        with T.Kernel(NHB, SQ, B, threads=THREADS) as (bx, sq, b):
            acc_o = T.alloc_fragment([HB, D], f32)
            sumexp = T.alloc_fragment([HB], f32)
            m_i = T.alloc_fragment([HB], f32)
            factor = T.alloc_fragment([HB], f32)
            lse = T.alloc_fragment([HB], f32)
            h0 = bx * HB
            attend_rows(Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
                        b, sq, h0, 0, 1, acc_o, sumexp, m_i)  # fmt: skip
            for i in T.Parallel(HB):
                lse[i] = (T.log2(sumexp[i]) + m_i[i] * sl2) * LN2
                factor[i] = T.if_then_else(
                    sumexp[i] != 0,
                    1.0 / (sumexp[i] * (1.0 + T.exp(Sink[T.min(h0 + i, h - 1)] - lse[i]))),
                    0.0,
                )
            for i, dd in T.Parallel(HB, D):
                if h0 + i < h:
                    O[b, sq, h0 + i, dd] = T.cast(acc_o[i, dd] * factor[i], bf16)
            for i in T.Parallel(HB):
                if h0 + i < h:
                    Lse[b, h0 + i, sq] = T.if_then_else(sumexp[i] != 0, lse[i], T.infinity(f32))

    return attend_direct


def build_combine(h: int, d: int, pdl: bool = True):
    """Merge split partials: o = sum_s 2^(L_s - L) o_s, L = log2 sum_s 2^L_s; sink; empty -> 0 / +inf.

    `pdl`: launched as a programmatic dependent of the split kernel (it waits for the partials in
    `griddepcontrol.wait`, its launch overlapping the split kernel's last CTAs)."""
    B = T.dynamic("batch")
    SQ = T.dynamic("s_q")
    NS = T.dynamic("splits")
    f32, bf16 = T.float32, T.bfloat16

    @T.prim_func
    def attend_combine(
        Opart: T.Tensor[(B, SQ, NS, h, d), f32],
        Lpart: T.Tensor[(B, SQ, NS, h), f32],
        Sink: T.Tensor[(h,), f32],
        O: T.Tensor[(B, SQ, h, d), bf16],
        Lse: T.Tensor[(B, h, SQ), f32],
    ):
        with T.Kernel(h, SQ, B, threads=128) as (hh, sq, b):
            acc = T.alloc_fragment([d], f32)
            lmax = T.alloc_var(f32)
            tot = T.alloc_var(f32)
            lse2 = T.alloc_var(f32)
            fac = T.alloc_var(f32)
            if pdl:
                T.pdl_sync()
            lmax = -T.infinity(f32)
            for s in T.serial(NS):
                lmax = T.max(lmax, Lpart[b, sq, s, hh])
            tot = 0.0
            for s in T.serial(NS):
                tot = tot + T.if_then_else(
                    Lpart[b, sq, s, hh] == -T.infinity(f32), 0.0, T.exp2(Lpart[b, sq, s, hh] - lmax)
                )
            lse2 = T.log2(tot) + lmax
            T.fill(acc, 0)
            for s in T.serial(NS):
                for dd in T.Parallel(d):
                    acc[dd] += T.if_then_else(
                        Lpart[b, sq, s, hh] == -T.infinity(f32),
                        0.0,
                        T.exp2(Lpart[b, sq, s, hh] - lse2) * Opart[b, sq, s, hh, dd],
                    )
            fac = T.if_then_else(tot != 0, 1.0 / (1.0 + T.exp(Sink[hh] - lse2 * LN2)), 0.0)
            for dd in T.Parallel(d):
                O[b, sq, hh, dd] = T.cast(acc[dd] * fac, bf16)
            Lse[b, hh, sq] = T.if_then_else(tot != 0, lse2 * LN2, T.infinity(f32))

    return attend_combine


def _row_blocks(k1: int, k2: int) -> int:
    """64-key blocks of a row whose index lists are k1 and k2 wide (the split plans' unit of work)."""
    return math.ceil(k1 / BLOCK_I) + math.ceil(k2 / BLOCK_I)


def _programs(b: int, s_q: int, h: int) -> int:
    """CTAs of an unsplit call: rows x head blocks."""
    return b * s_q * ((h + _head_block(h) - 1) // _head_block(h))


def choose_splits(b: int, s_q: int, h: int, k1: int, k2: int, impl: str = "legacy", sms: int = NUM_SMS_TARGET) -> int:
    """KV splits per row (host-only arithmetic, from shapes and the GPU's `sms`): fill the SMs when the batch
    alone cannot.

    legacy: one wave of ~sms programs when fewer than sms / 2 rows. ws (one 384-thread CTA per SM): split
    only while the rows fill under ~3/4 of the SMs, into at most sms // rows parts (and 32), so every CTA
    runs in the first wave; then as few parts as give the same blocks per part (an empty part still costs
    a CTA and a partial). 132 SMs, V4-Flash (10 blocks): b=1 10 splits of 1 block, b=32 4, b=64 2, b>=100 1;
    V4-Pro (2 head blocks, 18 blocks): b=1 18 of 1 block, b=4 9 of 2, b=32 2."""
    if FORCE_SPLITS is not None:
        return max(1, int(FORCE_SPLITS))
    programs = _programs(b, s_q, h)
    blocks = _row_blocks(k1, k2)
    if impl == "ws":
        if programs >= (3 * sms) // 4 or blocks <= 1:
            return 1
        per = math.ceil(blocks / max(1, min(blocks, sms // programs, 32)))
        return math.ceil(blocks / per)
    if programs >= sms // 2 or blocks <= 1:
        return 1
    return max(1, min(blocks, math.ceil(sms / programs), 16))


def cluster_merge(splits: int, k1: int, k2: int, programs: int, sms: int = NUM_SMS_TARGET) -> int:
    """The cluster size whose CTAs split a ws row and merge it in distributed shared memory (no partials, no
    combine kernel) instead of `splits` splits + combine, or 0. The largest size in MERGE_SIZES that is at most
    `splits`, whose clusters for `programs` (rows x head blocks) fit in one wave (CLUSTER_WAVE_CTAS), and that gives
    a split at most one more 64-key block than `splits` do: the partials and the combine cost 3-9 us, one more block
    ~3 and the merge ~1-2, so one more block pays from ~15 MB of partials on and two or more do not (bench/results/
    h100/tilelang_profile_2026-11-25_session9.txt). H100: V4-Flash merges b=27..32 in 3s, 34..66 in 2s; V4-Pro
    b=14..16 in 3s, 23..33 in 2s."""
    blocks = _row_blocks(k1, k2)
    if not CLUSTER_MERGE or splits <= 1 or blocks < 2:
        return 0
    per = math.ceil(blocks / splits)
    waves = CLUSTER_WAVE_CTAS if sms == NUM_SMS_TARGET else {2: sms - sms % 2}
    fits = [c for c in MERGE_SIZES if c <= splits and c * programs <= waves.get(c, 0)]
    return max((c for c in fits if math.ceil(blocks / c) <= per + 1), default=0)


def _prefetch_rows(h: int, sms: int) -> int:
    """The ws direct kernel's `ahead` (WS_PREFETCH): rows (b, s_q) a wave of one CTA an SM holds, or 0 (off)."""
    return sms // _programs(1, 1, h) if _bool_knob("WS_PREFETCH") else 0


def _check_geometry(cache: PagedKVCache) -> None:
    if cache.rope_dim != 64 or cache.nope_dim % 64 != 0 or cache.tile != 64 or cache.nope_dim < 64:
        raise ValueError(
            f"cache: the TileLang attention kernel needs nope_dim a multiple of 64, rope_dim 64 and tile 64 "
            f"(got nope {cache.nope_dim}, rope {cache.rope_dim}, tile {cache.tile}); use backend 'torch' or 'triton'"
        )
    if cache.data.stride(0) % 2 != 0 or cache.data.stride(0) >= 2**31:
        raise ValueError(f"cache.data: page stride {cache.data.stride(0)} must be even and < 2^31 bytes")


def _ws_usable(data: Tensor, nope: int, rope: int, tile: int) -> bool:
    """The ws kernel's layout needs: V4 geometry, pages made of whole 576-byte records, 16-byte alignment."""
    return (
        (nope, rope, tile) == (WS_NOPE, WS_ROPE, WS_TILE) and data.stride(0) % WS_REC == 0 and data.data_ptr() % 16 == 0
    )


def _impl_for(data1: Tensor, data2: Tensor, nope: int, rope: int, tile: int) -> str:
    if ATTN_IMPL == "ws" and _ws_usable(data1, nope, rope, tile) and _ws_usable(data2, nope, rope, tile):
        return "ws"
    return "legacy"


@torch.library.custom_op("dsv4fn::tl_sparse_attention", mutates_args=())
def tl_sparse_attention(
    q: Tensor,
    data1: Tensor,
    indices1: Tensor,
    lens1: Tensor,
    data2: Tensor,
    indices2: Tensor,
    lens2: Tensor,
    sink: Tensor,
    page_size1: int,
    page_size2: int,
    nope_dim: int,
    rope_dim: int,
    tile: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Flat op: q bf16 [b, s_q, h, d]; caches as raw uint8 pages; lens int32 [b] (always given);
    sink fp32 [h] (-inf = no sink). Returns (o bf16 [b, s_q, h, d], lse fp32 [b, h, s_q])."""
    b, s_q, h, d = q.shape
    impl = _impl_for(data1, data2, nope_dim, rope_dim, tile)
    sms = _backend.sm_count(q.device) or NUM_SMS_TARGET
    splits = choose_splits(b, s_q, h, indices1.shape[-1], indices2.shape[-1], impl, sms)
    programs = _programs(b, s_q, h)
    merge = cluster_merge(splits, indices1.shape[-1], indices2.shape[-1], programs, sms) if impl == "ws" else 0
    main, comb = _kernels(
        impl, h, nope_dim, rope_dim, tile, page_size1, page_size2, float(scale), splits > 1, COMBINE_PDL, merge
    )  # fmt: skip
    if impl == "ws":
        w1, h1, st1 = _cache_views_ws(data1)
        w2, h2, st2 = _cache_views_ws(data2)
        cache_args = (w1, h1, indices2, lens2, w2, h2)
    else:
        u1, f1, h1, st1 = _cache_views_raw(data1)
        u2, f2, h2, st2 = _cache_views_raw(data2)
        cache_args = (u1, f1, h1, indices2, lens2, u2, f2, h2)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if comb is None:  # (the direct and cluster-merge ws kernels take the prefetch distance; only direct uses it)
        ahead = (_prefetch_rows(h, sms) if splits == 1 else 0,) if impl == "ws" else ()
        launch(main, q, indices1, lens1, *cache_args, sink, o, lse, st1, st2, *ahead)
    else:
        opart = torch.empty((b, s_q, splits, h, d), dtype=torch.float32, device=q.device)
        lpart = torch.empty((b, s_q, splits, h), dtype=torch.float32, device=q.device)
        launch(main, q, indices1, lens1, *cache_args, opart, lpart, st1, st2)
        launch(comb, opart, lpart, sink, o, lse)
    return o, lse


@tl_sparse_attention.register_fake
def _(q, data1, indices1, lens1, data2, indices2, lens2, sink, page_size1, page_size2, nope_dim, rope_dim, tile, scale):
    b, s_q, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s_q), dtype=torch.float32)


def _flat_bytes(data: Tensor) -> Tensor:
    stride = data.stride(0)
    nbytes = (data.shape[0] - 1) * stride + data.shape[1] if data.shape[0] else 0
    return data.as_strided((nbytes,), (1,))


def _cache_views_raw(data: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    stride = data.stride(0)
    flat = _flat_bytes(data)
    flat = flat[: flat.numel() - flat.numel() % 2]
    return flat, flat.view(torch.float8_e4m3fn), flat.view(torch.bfloat16), stride


def _cache_views_ws(data: Tensor) -> tuple[Tensor, Tensor, int]:
    """(int32 words, bf16 halves) views of the whole cache, and the page stride in 576-byte records."""
    flat = _flat_bytes(data)
    flat = flat[: flat.numel() - flat.numel() % 4]
    return flat.view(torch.int32), flat.view(torch.bfloat16), data.stride(0) // WS_REC


def _full_lens(indices: Tensor, lens: Tensor | None) -> Tensor:
    if lens is not None:
        return lens
    return torch.full((indices.shape[0],), indices.shape[-1], dtype=torch.int32, device=indices.device)


@_backend.register("attend", "tilelang")
def sparse_attention(
    q: Tensor,
    cache: PagedKVCache,
    indices: Tensor,
    lens: Tensor | None = None,
    *,
    extra_cache: PagedKVCache | None = None,
    extra_indices: Tensor | None = None,
    extra_lens: Tensor | None = None,
    sink: Tensor | None = None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.sparse_attention` (CUDA tensors, d = 64·k + 64)."""
    _check_geometry(cache)
    if q.shape[-1] != cache.head_dim:
        raise ValueError(f"q: head dim {q.shape[-1]} != cache head dim {cache.head_dim}")
    if not q.is_contiguous():
        q = q.contiguous()
    if extra_cache is not None and extra_indices is not None:
        _check_geometry(extra_cache)
        if extra_cache.head_dim != cache.head_dim:
            raise ValueError(f"extra_cache: head dim {extra_cache.head_dim} != {cache.head_dim}")
        data2, idx2, p2 = extra_cache.data, extra_indices.contiguous(), extra_cache.page_size
        lens2 = _full_lens(idx2, extra_lens)
    else:  # no extra list: point it at the main cache with length 0
        data2, idx2, p2 = cache.data, indices, cache.page_size
        lens2 = torch.zeros((q.shape[0],), dtype=torch.int32, device=q.device)
    if sink is None:
        sink = torch.full((q.shape[2],), float("-inf"), dtype=torch.float32, device=q.device)
    return tl_sparse_attention(
        q,
        cache.data,
        indices.contiguous(),
        _full_lens(indices, lens),
        data2,
        idx2,
        lens2,
        sink.contiguous(),
        cache.page_size,
        p2,
        cache.nope_dim,
        cache.rope_dim,
        cache.tile,
        float(scale),
    )
