#!/usr/bin/env bash
# compute-sanitizer over the GPU test suite, in chunks with per-chunk time limits, so that one mode fits in
# one device call (~8 minutes).
#
# Usage on the device (repo root):
#   source .devbundle/env.sh && bash scripts/memcheck.sh [triton|tilelang|extra|list]
#     triton    (default) a canary, then memcheck over the Triton kernels' GPU tests, the GPU integration
#               tests, the robustness file (batch shrunk) and, with the time left, the hypothesis properties
#     tilelang  memcheck over the TileLang GPU tests (one pytest process, shared compiles: its own device
#               call, the TileLang kernels take minutes to compile; the 128-head and 8/96-head cases are
#               left out, each head count is another compile)
#     extra     racecheck (shared-memory hazards) and initcheck (reads of uninitialised global memory) over
#               small-shape selections of the Triton tests
#     list      print the chunks and exit
# Environment: OUT (logs; default /tmp/out), BUDGET (seconds for the whole mode; default 470),
#   SAN (path of compute-sanitizer), CANARY=0 (skip the canary), ONLY=chunk1,chunk2 (run only these chunks).
# Output: $OUT/memcheck_<mode>_<chunk>.txt per chunk (pytest + sanitizer output) and
#   $OUT/memcheck_<mode>_summary.txt: the environment, then one line per chunk:
#   "<chunk> <tool> rc=.. <seconds>s | ERROR SUMMARY: N errors | <pytest's last line> | access/API reports".
# A chunk cut by its time limit gets SIGINT (pytest prints its partial counts); its line then says INCOMPLETE,
# as it does when the sanitizer printed no summary. rc 86 = the sanitizer found errors (--error-exitcode).
#
# Why the settings:
# * PYTORCH_NO_CUDA_MEMORY_CACHING=1: with PyTorch's caching allocator a tensor lives inside a large
#   cudaMalloc segment, so a kernel reading or writing just past a tensor stays inside valid memory and memcheck
#   sees nothing. Without caching, every tensor is its own allocation (plus --padding where supported). CUDA-graph
#   capture needs the caching allocator, so the graph tests are deselected here (gpu_check.sh runs them).
# * compute-sanitizer slows kernels 10-100x and every torch op of the references too: the chunks deselect the
#   largest shapes (-k filters below) and the robustness file runs at DSV4FN_TEST_BATCH=64,
#   DSV4FN_TEST_KEYS=1024 (its default is 1024 rows and 2048 keys). The other test files need no variable.
# * torch.compile and opcheck tests are deselected: they test tracing, not memory, and are slow under the tool.
set -u
mode=${1:-triton}
out=${OUT:-/tmp/out}
budget=${BUDGET:-470}
mkdir -p "$out"
export TRITON_INTERPRET=0 TRITON_F32_DEFAULT=ieee PYTHONUNBUFFERED=1
py=${PYTHON:-python}
command -v "$py" >/dev/null 2>&1 || py=python3
t_start=$(date +%s)
deadline=$((t_start + budget))
summary="$out/memcheck_${mode}_summary.txt"

# ---- chunks: name | tool | time limit (s) | extra environment | pytest arguments ----------------------------
# (limits from the H100 host, slower than the H200 one: the sanitizer needs ~5-10 s after pytest for its summary)
ROBUST_ENV="DSV4FN_TEST_BATCH=64 DSV4FN_TEST_KEYS=1024"
chunks_triton=(
  "attend|memcheck|90||tests/test_attend_triton.py -k 'not graph and not opcheck and not pro-128'"
  "indexer|memcheck|200||tests/test_index_topk_triton.py -k 'not opcheck and not 65536'"
  "formats_norm_rope|memcheck|80||tests/test_formats_triton.py tests/test_norm_rope_triton.py -k 'not graph and not opcheck'"
  "compress|memcheck|80||tests/test_compress_triton.py -m gpu -k 'not graph and not opcheck'"
  "robustness|memcheck|200|$ROBUST_ENV|tests/test_robustness_gpu.py -k 'not tilelang'"
  "integration|memcheck|90||tests/test_gpu_integration.py -k 'not graph and not compile'"
  "properties|memcheck|600||tests/test_properties.py"
)
chunks_tilelang=(
  "tilelang|memcheck|600|$ROBUST_ENV|tests/test_tilelang_gpu.py tests/test_robustness_gpu.py -k 'tilelang and not graph and not opcheck and not workaround and not pro and not head_tails'"
)
chunks_extra=(
  "attend_small|racecheck|110||tests/test_attend_triton.py -k 'tiny or empty_rows or v4_geometry'"
  "indexer_small|racecheck|80||tests/test_index_topk_triton.py -k 'test_paged_logits or test_select_topk'"
  "norm_rope_small|racecheck|40||tests/test_norm_rope_triton.py -k 'random and not gpu'"
  "compress_decode|racecheck|60||tests/test_compress_triton.py -m gpu -k 'decode_batch128 and r4-overlap-dc512'"
  "small_kernels|initcheck|120||tests/test_attend_triton.py tests/test_index_topk_triton.py tests/test_formats_triton.py tests/test_norm_rope_triton.py -k 'not gpu and not opcheck and not schema'"
)

case "$mode" in
  triton) chunks=("${chunks_triton[@]}") ;;
  tilelang) chunks=("${chunks_tilelang[@]}") ;;
  extra) chunks=("${chunks_extra[@]}") ;;
  list)
    for m in triton tilelang extra; do
      eval "cs=(\"\${chunks_${m}[@]}\")"
      for c in "${cs[@]}"; do echo "$m: $c"; done
    done
    exit 0 ;;
  *) echo "usage: $0 [triton|tilelang|extra|list]" >&2; exit 2 ;;
esac

# ---- find compute-sanitizer --------------------------------------------------------------------------------
find_san() {
  if [ -n "${SAN:-}" ] && [ -x "$SAN" ]; then echo "$SAN"; return; fi
  command -v compute-sanitizer 2>/dev/null && return
  local c
  for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
    $(ls -d /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -rV) \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [ -x "$c" ]; then echo "$c"; return; fi
  done
}
san=$(find_san)
{
  echo "# compute-sanitizer, mode '$mode', $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -1
  echo "git ${DSV4_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} > "$summary"
if [ -z "$san" ]; then
  msg="compute-sanitizer NOT FOUND (looked at \$SAN, PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin): nothing was checked"
  echo "$msg" | tee -a "$summary"
  exit 3
fi
echo "sanitizer: $san ($("$san" --version 2>&1 | grep -iE 'version' | head -1))" | tee -a "$summary" >/dev/null
help=$("$san" --help 2>&1)
san_opts=(--print-limit 100 --error-exitcode 86)
if grep -q -- '--target-processes' <<<"$help"; then san_opts+=(--target-processes application-only); fi
memcheck_opts=()
if grep -q -- '--padding' <<<"$help"; then memcheck_opts+=(--padding 256); fi
cat "$summary"

# ---- one chunk ---------------------------------------------------------------------------------------------
pad() { printf '%-22s %-9s' "$1" "$2"; }

run_chunk() {  # name tool limit env args
  local name=$1 tool=$2 limit=$3 envs=$4 args=$5
  local now left log rc t0 secs sumline tests acc api status
  now=$(date +%s)
  left=$((deadline - now))
  if [ "$left" -lt 40 ]; then
    echo "$(pad "$name" "$tool") SKIPPED (budget: ${left}s left of ${budget}s)" | tee -a "$summary"
    return
  fi
  [ "$limit" -gt $((left - 10)) ] && limit=$((left - 10))
  log="$out/memcheck_${mode}_${name}.txt"
  local topts=()
  [ "$tool" = memcheck ] && topts=(${memcheck_opts[@]+"${memcheck_opts[@]}"})
  {
    echo "# $tool: $envs $py -m pytest $args   (limit ${limit}s)"
    echo "# $san --tool $tool ${san_opts[*]} ${topts[*]}"
  } > "$log"
  local pyargs envarr
  eval "pyargs=($args)"  # the pytest arguments carry quoted -k expressions
  read -ra envarr <<<"$envs"
  t0=$(date +%s)
  env ${envarr[@]+"${envarr[@]}"} PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 20 "$limit" \
    "$san" --tool "$tool" "${san_opts[@]}" ${topts[@]+"${topts[@]}"} \
    "$py" -m pytest -q -p no:cacheprovider -rfE "${pyargs[@]}" >> "$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  sumline=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -1 | sed 's/^=* *//')
  tests=$(grep -E '([0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran).* in [0-9.]+s' "$log" | tail -1 \
    | sed 's/=//g; s/^ *//; s/ *$//')
  acc=$(grep -cE '^========= (Invalid|Misaligned|Out-of-range|Uninitialized|Error: |Warning: )' "$log")
  api=$(grep -cE '^========= Program hit' "$log")
  status=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ] || grep -q KeyboardInterrupt "$log"; then
    status="INCOMPLETE: cut at the ${limit}s limit, partial counts |"
  fi
  if [ -z "$sumline" ]; then
    status="INCOMPLETE: no sanitizer summary (rc=$rc) |"
    sumline="ERROR SUMMARY: none printed"
  fi
  echo "$(pad "$name" "$tool") rc=$rc ${secs}s | $status $sumline | tests: ${tests:-none reported} | access reports $acc, API reports $api" \
    | tee -a "$summary"
}

# ---- canary: does the tool see a Triton kernel's out-of-bounds store with these settings? -------------------
canary() {
  local log="$out/memcheck_${mode}_canary.txt" rc src
  src=$(mktemp --suffix=_canary.py)  # @triton.jit needs its source in a file (not stdin)
  cat > "$src" <<'EOF'
import torch
import triton
import triton.language as tl


@triton.jit
def _store_past_end(p, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(p + n + i, tl.zeros([BLOCK], dtype=tl.float32), mask=i < 1)  # one float past the end


x = torch.zeros(128, device="cuda")  # 512 bytes: its own allocation without the caching allocator
_store_past_end[(1,)](x, x.numel(), BLOCK=32)
torch.cuda.synchronize()
print("canary kernel ran")
EOF
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 10 60 "$san" --tool memcheck "${san_opts[@]}" \
    ${memcheck_opts[@]+"${memcheck_opts[@]}"} "$py" "$src" > "$log" 2>&1
  rc=$?
  rm -f "$src"
  if grep -qE '^========= Invalid __global__ write' "$log"; then
    echo "$(pad canary memcheck) rc=$rc | the planted out-of-bounds Triton store WAS reported (the tool sees Triton kernels)" \
      | tee -a "$summary"
  else
    echo "$(pad canary memcheck) rc=$rc | the planted out-of-bounds Triton store was NOT reported: zero counts below prove little (see $log)" \
      | tee -a "$summary"
  fi
}

if [ "${CANARY:-1}" != 0 ] && [ "$mode" != extra ]; then canary; fi
for c in "${chunks[@]}"; do
  IFS='|' read -r name tool limit envs args <<<"$c"
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  run_chunk "$name" "$tool" "$limit" "$envs" "$args"
done
echo "total $(($(date +%s) - t_start))s; summary in $summary"
