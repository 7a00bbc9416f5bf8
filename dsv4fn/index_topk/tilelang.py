# pyright: reportInvalidTypeForm=false, reportGeneralTypeIssues=false, reportOperatorIssue=false
# (TileLang kernels are a DSL: `T.Tensor[(M, N), dtype]` annotations are not Python types.)
"""TileLang FP8 paged MQA logits and a fused indexer + top-k (spec §4).

Cache: DeepGEMM's paged layout, a page of `P` keys = `P × di` e4m3 bytes then `P` fp32 scales. The
kernels view a page as `[P + 4P/di, di]` e4m3 rows (the last rows are the scales, read through an
fp32 view). Per page: S[key, head] = K8 · Q8ᵀ (fp8 wgmma m64n64k32, fp32 accumulate),
logit[key] = s_k · Σ_h w_h · relu(S).

Both kernels share one page loop: a CTA of 128 threads owns one query token and a run of that
token's pages; the page-table entries of the run are read once into shared memory, then one thread
streams the pages with TMA (values 8 KB + scales 256 B per page, `STAGES` pages in flight on
mbarriers) while the warpgroup computes the page before. Pages past the token's visible length are
never read. Several CTAs share an SM (`annotate_min_blocks_per_sm`), so 10+ pages are in flight per SM.

`index_logits` (`paged_logits`): `PAGES_PER_CTA` pages per CTA; writes the logits, -inf at
`j >= visible`.

`index_topk_fused`: never writes the logits. Two launches, no host sync:
  1. `chunk_topk`: a CTA computes the logits of one chunk of a token's pages (2048 or 4096 keys, see
     `chunk_tiling`) into shared memory and selects its exact local top-k there (block radix select on
     the order-preserving 32-bit key of each fp32 logit in digits of 11, 11 and 10 bits, stopping at the
     first digit whose bin holds exactly the keys still needed, then a deterministic compaction); the first
     digit's histogram is counted page by page as the logits land, inside the page loop. It writes k
     (logit, position) candidates. Tokens with `visible <= topk` and chunks past `visible` do nothing.
  2. `topk_merge`: per token (one CTA of MERGE_THREADS threads) the same radix select over its
     ceil(visible / chunk) * k candidates (the union of the local top-k sets holds the global top-k set;
     staged in shared memory up to MERGE_STAGE), then cache slots, -1 padding and lengths; rows with
     `visible <= topk` take every entry in order. It is a programmatic dependent launch (PDL) of step 1:
     its launch overlaps the chunk kernel's last CTAs, and it waits for their candidates in
     `griddepcontrol.wait`.
The keys are read once; the only other traffic is k candidates per chunk (8 bytes each).
Ties at the k-th logit are broken deterministically (by chunk, then by thread-interleaved position).
"""

import torch
from torch import Tensor

from .. import _backend
from .._tilelang_compat import DEVICE_SRC, T, jit, launch
from ..state import IndexerKeyCache

PAGES_PER_CTA = 16  # index_logits: pages (of 64 keys) per CTA
STAGES = 4  # pages in flight per CTA (TMA + mbarrier ring)
MIN_CTAS_PER_SM = 4  # register cap 128/thread; shared memory allows ~5 CTAs of the logits kernel
CHUNK_PAGES = 64  # fused top-k: the largest chunk (4096 keys; it bounds topk)
CHUNK_CTAS_PER_SM = 4
THREADS = 128
# threads per token of the fused top-k's merge (read per call). H100, top-512: 1024 take the merge from 19.8 to
# 16.7 us at t=32 x 16k keys and from 31.6 to 22.9 at t=32 x 64k (512: 17.1, 24.8); the tie order changes with it
MERGE_THREADS = 1024
MERGE_PDL = True  # the merge is a programmatic dependent launch of the chunk kernel (read per call; bench knob)
MERGE_PT_STAGE = 1024  # page-table entries per row the merge stages in shared memory (64k keys of page 64)
MERGE_STAGE = 8192  # candidates staged in shared memory by the merge (64 KB); more are read from global/L2
_LOGITS_TILING = (PAGES_PER_CTA, STAGES)  # (pages per CTA, stages) of index_logits (bench knob)
# (pages per chunk, stages, CTAs per SM) of the fused top-k's chunk kernel: `chunk_tiling` picks one per call
# (and pages per step: one wgmma of G x 64 keys per ring slot)
CHUNK_LARGE = (CHUNK_PAGES, 3, CHUNK_CTAS_PER_SM, 1)  # 4096 keys a chunk, 4 CTAs an SM, 2 pages in flight
CHUNK_DEEP = (CHUNK_PAGES, 2, 2, 4)  # 4096 keys a chunk, 2 CTAs an SM, 4 pages a step: few CTAs, more bytes each
FUSED_MIN_DEEP_CTAS = 32  # fused_is_fast: below this many deep-chunk CTAs "auto" keeps logits + top-k
LARGE_MIN_WAVES = 3  # chunk_tiling: 4096-key chunks from ~3 waves of one CTA per SM (3 x 132 on the H100)
CHUNK_SMALL = (32, 4, 4, 1)  # 2048 keys a chunk, 4 CTAs an SM
FORCE_CHUNK_TILING: tuple[int, int, int, int] | None = None  # bench knob: override `chunk_tiling`
# The TMA ring below is written by hand: TileLang's own warp specialisation stays off, and so do its
# automatic shared-memory syncs (it put a 32-thread named barrier *inside* the elected lane's TMA branch,
# a deadlock; see _tilelang_compat). The kernels place every __syncthreads themselves.
PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_thread_storage_sync": True}
# the merge reads rows through raw pointers (T.address_of): no bounds guard that would skip a row silently
MERGE_PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}

TOPK_DEVICE_SRC = (
    DEVICE_SRC
    + r"""
// dsv4fn/index_topk/tilelang.py: exact block-wide top-k by radix select (all NT threads call these).
// The k-th largest key is found digit by digit over the order-preserving 32-bit key of each fp32 value:
// bits [31:21] (2048 bins), [20:10] (2048), [9:0] (1024); a digit whose bin holds exactly the keys still
// needed ends the search early. Histograms are int counts, or (PACKED) two 16-bit counts per int (n < 65536).
__device__ __forceinline__ unsigned dsv4fn_okey(float x) {  // order-preserving: larger float, larger key
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float dsv4fn_okey_inv(unsigned key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// Where a block top-k reads its n keys: element i belongs to thread i % NT (its (i / NT)-th), in both sources.
template <int NT>
struct dsv4fn_keys_mem {  // values in memory, read (and keyed) again by every pass
  const float* vals;
  int n;
  template <class F>
  __device__ __forceinline__ void each(F f) const {
    for (int i = threadIdx.x; i < n; i += NT) f(dsv4fn_okey(vals[i]), i);
  }
};
template <int NT, int PER>
struct dsv4fn_keys_reg {  // n <= NT * PER values keyed once into registers: the passes make no loads
  unsigned key[PER];
  int n;
  __device__ __forceinline__ dsv4fn_keys_reg(const float* vals, int n_) : n(n_) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + NT * j;
      key[j] = i < n ? dsv4fn_okey(vals[i]) : 0u;
    }
  }
  template <class F>
  __device__ __forceinline__ void each(F f) const {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + NT * j;
      if (i < n) f(key[j], i);
    }
  }
};
template <bool PACKED>
__device__ __forceinline__ int dsv4fn_hget(const int* h, int b) {
  if (PACKED) return (reinterpret_cast<const unsigned*>(h)[b >> 1] >> ((b & 1) << 4)) & 0xffffu;
  return h[b];
}
template <bool PACKED>
__device__ __forceinline__ void dsv4fn_hadd(int* h, int b, int c) {
  if (PACKED) {
    atomicAdd(reinterpret_cast<unsigned*>(h) + (b >> 1), static_cast<unsigned>(c) << ((b & 1) << 4));
  } else {
    atomicAdd(h + b, c);
  }
}
template <int NT, int BINS, bool PACKED>
__device__ __forceinline__ void dsv4fn_hzero(int* h) {
  for (int i = threadIdx.x; i < (PACKED ? BINS / 2 : BINS); i += NT) h[i] = 0;
}
// The first digit of the chunk's logits, built page by page while the next pages load: `cnt` values.
__device__ __forceinline__ void dsv4fn_hist_page(const float* vals, int cnt, int* h) {
  for (int i = threadIdx.x; i < cnt; i += 128) dsv4fn_hadd<true>(h, dsv4fn_okey(vals[i]) >> 21, 1);
}
// Sum of tot[0..warp) (one int per warp in shared memory), in every lane: one load and a shuffle tree, not a
// loop of `warp` dependent loads (up to 31 with 1024 threads).
__device__ __forceinline__ int dsv4fn_warps_before(const int* tot, int warp, int lane) {
  int v = lane < warp ? tot[lane] : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Histogram of digit (key >> shift) & (BINS - 1) over the keys with (key & mask) == prefix. AGG: warp-aggregated
// atomics (__match_any_sync), for the first digit, where close logits share a few bins and plain shared atomics
// would serialise lanes on one bin; the later digits see only the keys of one bin, spread over their bins.
template <int NT, int BINS, bool PACKED, bool AGG, class Keys>
__device__ __forceinline__ void dsv4fn_hist_digit(const Keys& keys, unsigned prefix, unsigned mask, int shift, int* h) {
  keys.each([&](unsigned key, int) {
    if ((key & mask) == prefix) {
      const int bin = static_cast<int>((key >> shift) & (BINS - 1));
      if (AGG) {
        const unsigned peers = __match_any_sync(__activemask(), bin);
        if ((threadIdx.x & 31) == __ffs(peers) - 1) dsv4fn_hadd<PACKED>(h, bin, __popc(peers));
      } else {
        dsv4fn_hadd<PACKED>(h, bin, 1);
      }
    }
  });
}
// The bin holding the need-th largest key (bins scanned from the top): misc[0] = bin, misc[1] = keys in higher
// bins, misc[2] = keys in the bin. Thread t owns bins BINS-1-t*BPT down to BINS-(t+1)*BPT; it sums them in an
// order rotated by its lane (no shared-memory bank conflicts). scratch: NT / 32 ints.
template <int NT, int BINS, bool PACKED>
__device__ __forceinline__ void dsv4fn_find_bin(const int* h, int need, int* scratch, int* misc) {
  static_assert(BINS % NT == 0 && (!PACKED || (BINS / NT) % 2 == 0), "bins per thread");
  constexpr int BPT = BINS / NT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int top = BINS - 1 - tid * BPT, low = top - (BPT - 1);
  int s = 0;
  if (PACKED) {
    const unsigned* w = reinterpret_cast<const unsigned*>(h) + (low >> 1);
#pragma unroll
    for (int j = 0; j < BPT / 2; ++j) {
      const unsigned v = w[(j + lane) % (BPT / 2)];
      s += static_cast<int>((v & 0xffffu) + (v >> 16));
    }
  } else {
#pragma unroll
    for (int j = 0; j < BPT; ++j) s += h[low + (j + lane) % BPT];
  }
  int incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  incl += dsv4fn_warps_before(scratch, warp, lane);
  const int excl = incl - s;
  if (excl < need && need <= incl) {
    int acc = excl;
#pragma unroll 1
    for (int j = 0; j < BPT; ++j) {
      const int c = dsv4fn_hget<PACKED>(h, top - j);
      if (acc + c >= need) {
        misc[0] = top - j;
        misc[1] = acc;
        misc[2] = c;
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
}
// Key `thr` and `above` such that the k largest of vals[0..n) (1 <= k <= n) are every key > thr, then the
// first (k - above) keys == thr. hist: 2048 bins; `top_done`: it already holds the first digit of all n keys.
// misc: 4 + NT / 32 ints.
template <int NT, bool PACKED, class Keys>
__device__ __forceinline__ void dsv4fn_radix_kth(const Keys& keys, int k, int* hist, int* misc, bool top_done,
                                                 unsigned& thr, int& above) {
  if (!top_done) {
    dsv4fn_hzero<NT, 2048, PACKED>(hist);
    __syncthreads();
    dsv4fn_hist_digit<NT, 2048, PACKED, true>(keys, 0u, 0u, 21, hist);
    __syncthreads();
  }
  unsigned prefix = 0u, mask = 0u;
  int need = k;  // rank still to find among the keys matching `prefix`
#pragma unroll 1
  for (int r = 0; r < 3; ++r) {
    const int shift = r == 0 ? 21 : (r == 1 ? 10 : 0);
    const unsigned bins = r == 2 ? 1024u : 2048u;
    if (r > 0) {
      if (r == 1) {
        dsv4fn_hzero<NT, 2048, PACKED>(hist);
      } else {
        dsv4fn_hzero<NT, 1024, PACKED>(hist);
      }
      __syncthreads();
      if (r == 1) {
        dsv4fn_hist_digit<NT, 2048, PACKED, false>(keys, prefix, mask, shift, hist);
      } else {
        dsv4fn_hist_digit<NT, 1024, PACKED, false>(keys, prefix, mask, shift, hist);
      }
      __syncthreads();
    }
    if (r == 2) {
      dsv4fn_find_bin<NT, 1024, PACKED>(hist, need, misc + 4, misc);
    } else {
      dsv4fn_find_bin<NT, 2048, PACKED>(hist, need, misc + 4, misc);
    }
    const int bin = misc[0], higher = misc[1], cnt = misc[2];
    need -= higher;
    prefix |= static_cast<unsigned>(bin) << shift;
    mask |= (bins - 1u) << shift;
    __syncthreads();  // misc is read by every thread before it is written again
    if (r < 2 && cnt == need && prefix != 0u) {  // the whole bin is in: every key >= prefix, no ties
      thr = prefix - 1u;
      above = k;
      return;
    }
  }
  thr = prefix;
  above = k - need;
}
// Exclusive block scan of two counters; scratch: 2 * (NT / 32) ints of shared memory.
template <int NT>
__device__ __forceinline__ void dsv4fn_scan2(int a, int b, int* scratch, int& ea, int& eb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int ia = a, ib = b;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int va = __shfl_up_sync(0xffffffffu, ia, o), vb = __shfl_up_sync(0xffffffffu, ib, o);
    if (lane >= o) {
      ia += va;
      ib += vb;
    }
  }
  if (lane == 31) {
    scratch[warp] = ia;
    scratch[NT / 32 + warp] = ib;
  }
  __syncthreads();
  ea = dsv4fn_warps_before(scratch, warp, lane) + ia - a;
  eb = dsv4fn_warps_before(scratch + NT / 32, warp, lane) + ib - b;
  __syncthreads();
}
// The k largest of the n keys: every key above the k-th, then the first (k - above) equal to it in the order
// (thread, then i / NT). Writes out_v[r] = value, out_i[r] = pos[i] (or base + i) for r < k.
template <int NT, bool PACKED, class Keys>
__device__ __forceinline__ void dsv4fn_block_topk(const Keys& keys, const int* pos, int base, int k, int* hist,
                                                  int* misc, bool top_done, float* out_v, int* out_i) {
  unsigned thr;
  int above;
  dsv4fn_radix_kth<NT, PACKED>(keys, k, hist, misc, top_done, thr, above);
  int cg = 0, ce = 0;
  keys.each([&](unsigned key, int) {
    cg += key > thr;
    ce += key == thr;
  });
  int og, oe;
  dsv4fn_scan2<NT>(cg, ce, hist, og, oe);
  keys.each([&](unsigned key, int i) {
    int r = -1;
    if (key > thr) {
      r = og++;
    } else if (key == thr) {
      r = above + oe++;
    }
    if (r >= 0 && r < k) {
      out_v[r] = dsv4fn_okey_inv(key);
      out_i[r] = pos ? pos[i] : base + i;
    }
  });
  __syncthreads();
}
// fused top-k, step 1: local top-k of one chunk (logits in shared memory, their first digit histogrammed in
// `hist` by dsv4fn_hist_page) -> candidates
template <int CH>
__device__ __forceinline__ void dsv4fn_chunk_topk(const float* lg, int n, int k, int base, int* hist, int* misc,
                                                  float* cand_v, int* cand_i) {
  if (n <= k) {  // (uniform) a short chunk: every entry is a candidate, the rest is padding
    for (int r = threadIdx.x; r < k; r += 128) {
      cand_v[r] = r < n ? lg[r] : __int_as_float(0xff800000);  // -inf
      cand_i[r] = r < n ? base + r : -1;
    }
    return;
  }
  const dsv4fn_keys_reg<128, CH / 128> keys(lg, n);  // the chunk's keys in registers (n <= CH)
  dsv4fn_block_topk<128, true>(keys, nullptr, base, k, hist, misc, true, cand_v, cand_i);
}
// fused top-k, step 2: per token, the top-k of its candidates -> cache slots (-1 padded) and length
template <int NT>
__device__ __forceinline__ void dsv4fn_topk_merge(const float* cand_v, const int* cand_i, int ncand, int k,
                                                  int vis, int width, int page, const int* pt_row, int max_blocks,
                                                  int* hist, int* misc, float* sel_v, int* sel_i, int* out_row,
                                                  int* len, float* stage_v, int* stage_i, int stage_cap,
                                                  const int* pt_s, int pt_cap) {
  // pt_s: the first pt_cap page-table entries of the row, staged in shared memory before the PDL wait
  const int tid = threadIdx.x;
  if (vis > k && ncand <= stage_cap) {  // stage the candidates in shared memory: 5 passes read them
    for (int i = tid; i < ncand; i += NT) {
      stage_v[i] = cand_v[i];
      stage_i[i] = cand_i[i];
    }
    __syncthreads();
    cand_v = stage_v;
    cand_i = stage_i;
  }
  if (vis <= k) {  // every visible entry, in order
    for (int j = tid; j < width; j += NT) {
      int s = -1;
      if (j < vis) {
        const int pg = min(j / page, max_blocks - 1);
        s = (pg < pt_cap ? pt_s[pg] : pt_row[pg]) * page + j % page;
      }
      out_row[j] = s;
    }
  } else {
    const dsv4fn_keys_mem<NT> keys{cand_v, ncand};
    dsv4fn_block_topk<NT, false>(keys, cand_i, 0, k, hist, misc, false, sel_v, sel_i);
    for (int r = tid; r < width; r += NT) {
      int s = -1;
      const int j = r < k ? sel_i[r] : -1;
      if (j >= 0) {
        const int pg = min(j / page, max_blocks - 1);
        s = (pg < pt_cap ? pt_s[pg] : pt_row[pg]) * page + j % page;
      }
      out_row[r] = s;
    }
  }
  if (tid == 0) *len = min(vis, k);
}
"""
)
HIST_WORDS = 1024  # the chunk kernel's first-digit histogram: 2048 bins, two 16-bit counts per int
MISC_WORDS = 4 + 32  # radix-select results + one int per warp (<= 1024 threads)


def _geometry(cache: IndexerKeyCache, hi: int) -> tuple[int, int]:
    p, di = cache.page_size, cache.dim
    if p != 64 or di != 128:
        raise ValueError(
            f"cache: the TileLang indexer needs page_size 64 and dim 128 (got page_size {p}, dim {di}); "
            "use backend 'torch' or 'triton'"
        )
    if hi % 16 != 0 or not 16 <= hi <= 256:
        raise ValueError(f"q8: the TileLang indexer needs a multiple of 16 heads (16..256), got {hi}")
    return p, di


def _page_loop(hi: int, di: int, p: int, npp: int, stages: int, to_shared: bool, G: int = 1, no_math: bool = False):
    """Macro: the TMA ring over pages `0..npg-1` of the run of `npp` pages of token `t` starting at page
    `cc * npp`, `G` pages a step (one ring slot, one wgmma of G*p rows); each page's logits go to `Dst[t,
    col]` (global, -inf past `vis`, nothing past `W`), or with `to_shared` to `Dst[it * G * p + j]` (a shared
    [npp * p] buffer). Rows of a last step's missing pages hold stale bytes and are masked (-inf). With `hist`
    (shared, to_shared only) the first radix digit of the `npg * p` logits is counted into it as they land."""
    f32 = T.float32
    SOFF = p * di // 4  # fp32 offset of the scales in a page
    GP = G * p

    @T.macro
    def fill(Kv, Ks, pt_s, K_s, sc_s, full, step, slot, npg):
        for g in T.unroll(G):
            if step * G + g < npg:
                T.tma_copy(Kv[pt_s[step * G + g], 0:p, :], K_s[slot, g * p : (g + 1) * p, :], barrier=full[slot])
                T.tma_copy(Ks[pt_s[step * G + g], SOFF : SOFF + p], sc_s[slot, g * p : (g + 1) * p], barrier=full[slot])
        T.barrier_arrive(full[slot])

    @T.macro
    def page_loop(Q, Wt, Kv, Ks, t, cc, vis, npg, W, pt_s, Q_s, K_s, sc_s, full, qbar, w_f, S, lg, tx, Dst, hist=None):
        T.copy(Wt[t, :], w_f)
        T.sync_threads()  # pt_s
        nst = T.ceildiv(npg, G)
        if tx < 32:  # warp 0 issues the TMA copies (one elected lane) and arrives (all 32 lanes)
            T.tma_copy(Q[t, :, :], Q_s, barrier=qbar[0])
            T.barrier_arrive(qbar[0])
            for i in T.serial(stages - 1):
                if i < nst:
                    fill(Kv, Ks, pt_s, K_s, sc_s, full, i, i, npg)
        T.barrier_wait(qbar[0], 0)
        for it in T.serial(nst):
            st = it % stages
            if tx < 32:
                nxt = it + stages - 1
                if nxt < nst:  # refill the slot freed at the end of iteration it-1
                    fill(Kv, Ks, pt_s, K_s, sc_s, full, nxt, nxt % stages, npg)
            T.barrier_wait(full[st], (it // stages) % 2)
            if no_math:  # development probe (build_chunk_topk): the ring alone
                for j in T.Parallel(GP):
                    lg[j] = w_f[0]
            else:
                T.gemm(K_s[st, :, :], Q_s, S, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullCol)
                for j, hh in T.Parallel(GP, hi):
                    S[j, hh] = T.max(S[j, hh], 0) * w_f[hh]
                T.reduce_sum(S, lg, dim=1, clear=True)
            if to_shared:
                for j in T.Parallel(GP):
                    col = (cc * npp + it * G) * p + j
                    Dst[it * GP + j] = T.if_then_else(col < vis, lg[j] * sc_s[st, j], -T.infinity(f32))
            else:
                for j in T.Parallel(GP):
                    col = (cc * npp + it * G) * p + j
                    if col < W:
                        Dst[t, col] = T.if_then_else(col < vis, lg[j] * sc_s[st, j], -T.infinity(f32))
            T.sync_threads()  # every thread is done with slot st before it is refilled
            if hist is not None:  # the first radix digit of this step's logits (the top-k's first pass, overlapped)
                T.call_extern(
                    "handle", "dsv4fn_hist_page", T.address_of(Dst[it * GP]), T.min(GP, npg * p - it * GP),
                    T.address_of(hist[0]),
                )  # fmt: skip

    return page_loop


def build_logits(hi: int, di: int, p: int, ppc: int = PAGES_PER_CTA, stages: int = STAGES):
    """PrimFunc: logits [t, width] (exposed for the CPU lowering tests)."""
    f32, i32, fp8 = T.float32, T.int32, T.float8_e4m3fn
    NT_ = T.dynamic("tokens")
    W = T.dynamic("width")
    NP = T.dynamic("n_pages")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    ROWS = p + 4 * p // di
    page_loop = _page_loop(hi, di, p, ppc, stages, False)

    @T.prim_func
    def index_logits(
        Q: T.Tensor[(NT_, hi, di), fp8],
        Wt: T.Tensor[(NT_, hi), f32],
        Kv: T.Tensor[(NP, ROWS, di), fp8],
        Ks: T.Tensor[(NP, ROWS * di // 4), f32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Out: T.Tensor[(NT_, W), f32],
    ):
        with T.Kernel(T.ceildiv(W, p * ppc), NT_, threads=THREADS) as (cc, t):
            T.annotate_min_blocks_per_sm(MIN_CTAS_PER_SM)
            Q_s = T.alloc_shared([hi, di], fp8)
            K_s = T.alloc_shared([stages, p, di], fp8)
            sc_s = T.alloc_shared([stages, p], f32)
            pt_s = T.alloc_shared([ppc], i32)
            full = T.alloc_barrier([32] * stages)
            qbar = T.alloc_barrier(32)
            w_f = T.alloc_fragment([hi], f32)
            S = T.alloc_fragment([p, hi], f32)
            lg = T.alloc_fragment([p], f32)
            tx = T.get_thread_binding()
            vis = Vis[t]
            req = Req[t]
            npg = T.max(T.min(ppc, T.ceildiv(vis, p) - cc * ppc), 0)

            for i in T.Parallel(ppc):
                pt_s[i] = T.min(T.max(PT[req, T.min(cc * ppc + i, MB - 1)], 0), NP - 1)
            page_loop(Q, Wt, Kv, Ks, t, cc, vis, npg, W, pt_s, Q_s, K_s, sc_s, full, qbar, w_f, S, lg, tx, Out)
            for it, j in T.Parallel(ppc, p):
                col = (cc * ppc + it) * p + j
                if it >= npg and col < W:
                    Out[t, col] = -T.infinity(f32)

    return index_logits


def build_chunk_topk(
    hi: int, di: int, p: int, topk: int, cpg: int = CHUNK_LARGE[0], stages: int = CHUNK_LARGE[1],
    ctas: int = CHUNK_LARGE[2], G: int = CHUNK_LARGE[3], probe: str = "",
):  # fmt: skip
    """PrimFunc, fused top-k step 1: per (chunk of `cpg` pages, token) the local top-k candidates.

    `probe` (development only, bench/tilelang_profile_dev.py; wrong results by design): "no_topk" leaves the
    local selection out, "no_math" also the logits (the page loop only waits for its pages)."""
    f32, i32, fp8 = T.float32, T.int32, T.float8_e4m3fn
    NT_ = T.dynamic("tokens")
    NC = T.dynamic("chunks")
    NP = T.dynamic("n_pages")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    ROWS = p + 4 * p // di
    CH = cpg * p
    if not 1 <= topk <= CH:
        raise ValueError(f"topk: the fused TileLang top-k supports 1..{CH}, got {topk}")
    page_loop = _page_loop(hi, di, p, cpg, stages, True, G, no_math="no_math" in probe)

    @T.prim_func
    def index_chunk_topk(
        Q: T.Tensor[(NT_, hi, di), fp8],
        Wt: T.Tensor[(NT_, hi), f32],
        Kv: T.Tensor[(NP, ROWS, di), fp8],
        Ks: T.Tensor[(NP, ROWS * di // 4), f32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        CandV: T.Tensor[(NT_, NC, topk), f32],
        CandI: T.Tensor[(NT_, NC, topk), i32],
    ):
        with T.Kernel(NC, NT_, threads=THREADS) as (cc, t):
            T.annotate_min_blocks_per_sm(ctas)
            T.import_source(TOPK_DEVICE_SRC)
            Q_s = T.alloc_shared([hi, di], fp8)
            K_s = T.alloc_shared([stages, G * p, di], fp8)
            sc_s = T.alloc_shared([stages, G * p], f32)
            pt_s = T.alloc_shared([cpg], i32)
            lg_s = T.alloc_shared([CH], f32)
            hist = T.alloc_shared([HIST_WORDS], i32)
            misc = T.alloc_shared([MISC_WORDS], i32)
            full = T.alloc_barrier([32] * stages)
            qbar = T.alloc_barrier(32)
            w_f = T.alloc_fragment([hi], f32)
            S = T.alloc_fragment([G * p, hi], f32)
            lg = T.alloc_fragment([G * p], f32)
            tx = T.get_thread_binding()
            vis = Vis[t]
            req = Req[t]
            npg = T.max(T.min(cpg, T.ceildiv(vis, p) - cc * cpg), 0)

            if vis > topk and npg > 0:  # (uniform) trivial rows and chunks past `visible` have nothing to do
                for i in T.Parallel(cpg):
                    pt_s[i] = T.min(T.max(PT[req, T.min(cc * cpg + i, MB - 1)], 0), NP - 1)
                for i in T.Parallel(CH):
                    lg_s[i] = -T.infinity(f32)
                for i in T.Parallel(HIST_WORDS):
                    hist[i] = 0
                page_loop(
                    Q, Wt, Kv, Ks, t, cc, vis, npg, 0, pt_s, Q_s, K_s, sc_s, full, qbar, w_f, S, lg, tx, lg_s, hist
                )  # fmt: skip
                # the merge (launched with programmatic dependent launch) may start its prologue now
                T.pdl_trigger()
                T.sync_threads()
                if "no_topk" in probe:
                    if tx == 0:
                        CandV[t, cc, 0] = lg_s[0]
                else:
                    T.call_extern(
                        "handle", f"dsv4fn_chunk_topk<{CH}>", T.address_of(lg_s[0]), npg * p, topk, cc * CH,
                        T.address_of(hist[0]), T.address_of(misc[0]), T.address_of(CandV[t, cc, 0]),
                        T.address_of(CandI[t, cc, 0]),
                    )  # fmt: skip

    return index_chunk_topk


def build_topk_merge(topk: int, p: int, cpg: int = CHUNK_PAGES, threads: int = MERGE_THREADS, pdl: bool = True):
    """PrimFunc, fused top-k step 2: per token the top-k of its candidates -> slots, -1 padding, lengths.

    `pdl`: launched as a programmatic dependent of the chunk kernel (it waits in `griddepcontrol.wait` for the
    chunk kernel's candidates instead of behind its launch)."""
    f32, i32 = T.float32, T.int32
    NT_ = T.dynamic("tokens")
    NC = T.dynamic("chunks")
    W = T.dynamic("width")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    CH = cpg * p

    @T.prim_func
    def index_topk_merge(
        CandV: T.Tensor[(NT_, NC, topk), f32],
        CandI: T.Tensor[(NT_, NC, topk), i32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Out: T.Tensor[(NT_, W), i32],
        Lens: T.Tensor[(NT_,), i32],
    ):
        with T.Kernel(NT_, threads=threads) as t:
            T.import_source(TOPK_DEVICE_SRC)
            hist = T.alloc_shared([2048], i32)
            misc = T.alloc_shared([MISC_WORDS], i32)
            sel_v = T.alloc_shared([topk], f32)
            sel_i = T.alloc_shared([topk], i32)
            stage_v = T.alloc_shared([MERGE_STAGE], f32)
            stage_i = T.alloc_shared([MERGE_STAGE], i32)
            vis = Vis[t]
            req = Req[t]
            ncand = T.min(T.ceildiv(vis, CH), NC) * topk
            pt_s = T.alloc_shared([MERGE_PT_STAGE], i32)
            for i in T.Parallel(MERGE_PT_STAGE):
                pt_s[i] = T.if_then_else(i < MB, PT[req, T.min(i, MB - 1)], 0)
            T.sync_threads()
            if pdl:  # everything above reads only inputs: it overlaps the chunk kernel's last CTAs
                T.pdl_sync()
            T.call_extern(
                "handle", f"dsv4fn_topk_merge<{threads}>", T.address_of(CandV[t, 0, 0]), T.address_of(CandI[t, 0, 0]),
                ncand, topk, vis, W, p, T.address_of(PT[req, 0]), MB, T.address_of(hist[0]), T.address_of(misc[0]),
                T.address_of(sel_v[0]), T.address_of(sel_i[0]), T.address_of(Out[t, 0]), T.address_of(Lens[t]),
                T.address_of(stage_v[0]), T.address_of(stage_i[0]), MERGE_STAGE, T.address_of(pt_s[0]),
                T.min(MB, MERGE_PT_STAGE),
            )  # fmt: skip

    return index_topk_merge


@jit(pass_configs=PASS_CONFIGS)
def _logits_kernel(hi: int, di: int, p: int, ppc: int = PAGES_PER_CTA, stages: int = STAGES):
    return build_logits(hi, di, p, ppc, stages)


@jit(pass_configs=PASS_CONFIGS)
def _chunk_topk_kernel(
    hi: int, di: int, p: int, topk: int, cpg: int = CHUNK_LARGE[0], stages: int = CHUNK_LARGE[1],
    ctas: int = CHUNK_LARGE[2], G: int = CHUNK_LARGE[3], probe: str = "",
):  # fmt: skip
    return build_chunk_topk(hi, di, p, topk, cpg, stages, ctas, G, probe)


@jit(pass_configs=MERGE_PASS_CONFIGS)
def _topk_merge_kernel(topk: int, p: int, cpg: int = CHUNK_PAGES, threads: int = MERGE_THREADS, pdl: bool = True):
    return build_topk_merge(topk, p, cpg, threads, pdl)


def _chunks(max_visible: int, page: int, pages_per_chunk: int) -> int:
    """Chunks a token's keys need (its candidates: chunks * topk); the grid's x extent, at least 1."""
    return max(1, -(-max_visible // (pages_per_chunk * page)))


def chunk_tiling(topk: int, max_visible: int, page: int, tokens: int, sms: int = 0) -> tuple[int, int, int, int]:
    """The chunk kernel's tiling (host arithmetic on shapes and the GPU's `sms`, 0: PLAN_SMS). With n = tokens *
    ceil(max_visible / 4096) CTAs of 4096-key chunks: CHUNK_LARGE (4 CTAs an SM) once n >= LARGE_MIN_WAVES x sms;
    else 2048-key chunks
    (CHUNK_SMALL, twice the CTAs) while the merge still stages every candidate in shared memory
    (ceil(visible / 2048) * topk <= MERGE_STAGE); else CHUNK_DEEP (4096-key chunks, 4 pages a step: with few
    CTAs each needs more bytes in flight). H100, top-512 (bench/results/h100/tilelang_profile_2026-11-25_
    session5.txt sections 9-10): t=32 x 16k keys (n=128) small 53.2 us vs large 66.5; t=128 x 16k (n=512)
    136.4 vs 128.4; t=32 x 64k (n=512; small chunks would be 16384 candidates) large 132.4 vs deep 141.4;
    t=1 x 64k (n=16) deep 52.3 vs large 66.9."""
    if FORCE_CHUNK_TILING is not None:
        return FORCE_CHUNK_TILING
    if tokens * _chunks(max_visible, page, CHUNK_LARGE[0]) >= LARGE_MIN_WAVES * (sms or _backend.PLAN_SMS):
        return CHUNK_LARGE
    if topk <= CHUNK_SMALL[0] * page and _chunks(max_visible, page, CHUNK_SMALL[0]) * topk <= MERGE_STAGE:
        return CHUNK_SMALL
    return CHUNK_DEEP


def fused_is_fast(t: int, hi: int, max_visible: int, topk: int, page: int, dim: int, sms: int = 0) -> bool:
    """Whether "auto" takes the fused kernel over logits + top-k: TileLang's geometry, a merge staged in shared
    memory, and not a deep-chunk grid of fewer than FUSED_MIN_DEEP_CTAS CTAs. H100, top-512, against Triton
    logits + Triton top-k (bench_2026-11-25_session5.txt, 8f0ecb4): the fused op wins at every batch 1-32 with
    2k and 16k keys (t=1 x 16k: 39.3 vs 42.7 us) and from 4 tokens with 64k keys (t=4: 52.2 vs 60.4); one
    token over 64k keys (16 deep-chunk CTAs) is slower (48.8 vs 45.4)."""
    if page != 64 or dim != 128 or hi % 16 or not 16 <= hi <= 256 or t < 1 or topk > CHUNK_PAGES * page:
        return False
    tiling = chunk_tiling(topk, max_visible, page, t, sms)
    chunks = _chunks(max_visible, page, tiling[0])
    if tiling == CHUNK_DEEP and t * chunks < FUSED_MIN_DEEP_CTAS:
        return False
    return chunks * topk <= MERGE_STAGE


def _cache_views(data: Tensor, p: int, di: int) -> tuple[Tensor, Tensor]:
    if not data.is_contiguous():
        raise ValueError("cache.data: the TileLang indexer needs a contiguous cache")
    n = data.shape[0]
    rows = p + 4 * p // di
    kv = data.view(torch.float8_e4m3fn).view(n, rows, di)
    ks = data.view(torch.float32).view(n, rows * di // 4) if data.numel() else data.view(torch.float32)
    return kv, ks


@torch.library.custom_op("dsv4fn::tl_index_logits", mutates_args=())
def tl_index_logits(
    q8: Tensor, weights: Tensor, data: Tensor, page_table: Tensor, token_request: Tensor, visible: Tensor,
    page_size: int, width: int,
) -> Tensor:  # fmt: skip
    t, hi, di = q8.shape
    kv, ks = _cache_views(data, page_size, di)
    out = torch.empty((t, width), dtype=torch.float32, device=q8.device)
    if t and width:
        launch(
            _logits_kernel(hi, di, page_size, *_LOGITS_TILING),
            q8,
            weights,
            kv,
            ks,
            page_table,
            token_request,
            visible,
            out,
        )
    return out


@tl_index_logits.register_fake
def _(q8, weights, data, page_table, token_request, visible, page_size, width):
    return q8.new_empty((q8.shape[0], width), dtype=torch.float32)


@torch.library.custom_op("dsv4fn::tl_index_topk_fused", mutates_args=())
def tl_index_topk_fused(
    q8: Tensor, weights: Tensor, data: Tensor, page_table: Tensor, token_request: Tensor, visible: Tensor,
    page_size: int, topk: int, width: int, max_visible: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`max_visible`: a host-known bound on `visible` (the logits width); it sizes the grid and the
    candidate scratch, so no value-dependent allocation happens."""
    t, hi, di = q8.shape
    dev = q8.device
    kv, ks = _cache_views(data, page_size, di)
    out = torch.empty((t, width), dtype=torch.int32, device=dev)
    lens = torch.empty((t,), dtype=torch.int32, device=dev)
    if t == 0:
        return out, lens
    cpg, stages, ctas, g = chunk_tiling(topk, max_visible, page_size, t, _backend.sm_count(dev))
    chunks = _chunks(max_visible, page_size, cpg)
    cand_v = torch.empty((t, chunks, topk), dtype=torch.float32, device=dev)
    cand_i = torch.empty((t, chunks, topk), dtype=torch.int32, device=dev)
    launch(
        _chunk_topk_kernel(hi, di, page_size, topk, cpg, stages, ctas, g),
        q8, weights, kv, ks, page_table, token_request, visible, cand_v, cand_i,
    )  # fmt: skip
    merge = _topk_merge_kernel(topk, page_size, cpg, MERGE_THREADS, MERGE_PDL)
    launch(merge, cand_v, cand_i, page_table, token_request, visible, out, lens)
    return out, lens


@tl_index_topk_fused.register_fake
def _(q8, weights, data, page_table, token_request, visible, page_size, topk, width, max_visible):
    t = q8.shape[0]
    return q8.new_empty((t, width), dtype=torch.int32), q8.new_empty((t,), dtype=torch.int32)


def _check(q8: Tensor, cache: IndexerKeyCache) -> None:
    _geometry(cache, q8.shape[1])
    if q8.shape[-1] != cache.dim:
        raise ValueError(f"q8: dim {q8.shape[-1]} != cache dim {cache.dim}")


@_backend.register("index_logits", "tilelang")
def paged_logits(
    q8: Tensor, weights: Tensor, cache: IndexerKeyCache, page_table: Tensor, token_request: Tensor, visible: Tensor,
    width: int,
) -> Tensor:  # fmt: skip
    """Same contract as `reference.paged_logits` (CUDA tensors)."""
    _check(q8, cache)
    return tl_index_logits(
        q8.contiguous(), weights.contiguous(), cache.data, page_table.contiguous(), token_request.contiguous(),
        visible.contiguous(), cache.page_size, int(width),
    )  # fmt: skip


@_backend.register("index_topk_fused", "tilelang")
def index_topk_fused(
    q8: Tensor, weights: Tensor, cache: IndexerKeyCache, page_table: Tensor, token_request: Tensor, visible: Tensor,
    topk: int, width: int, max_visible: int | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Top-`topk` cache slots per query token without materialising the logits.

    Returns (slots int32 `[t, width]`, -1 padded; lens int32 `[t]` = min(visible, topk)). Rows with
    `visible <= topk` select every entry in order; other rows are unordered sets. `max_visible`
    bounds `visible` (defaults to the page table's capacity `max_blocks * page_size`)."""
    _check(q8, cache)
    if not 1 <= topk <= width:
        raise ValueError(f"topk: expected 1..width={width}, got {topk}")
    if topk > CHUNK_PAGES * cache.page_size:
        raise ValueError(f"topk: the fused TileLang top-k supports at most {CHUNK_PAGES * cache.page_size}, got {topk}")
    if max_visible is None:
        max_visible = page_table.shape[1] * cache.page_size
    return tl_index_topk_fused(
        q8.contiguous(), weights.contiguous(), cache.data, page_table.contiguous(), token_request.contiguous(),
        visible.contiguous(), cache.page_size, int(topk), int(width), int(max_visible),
    )  # fmt: skip
