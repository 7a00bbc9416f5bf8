#!/usr/bin/env bash
# One H100 verification call: environment, the GPU test suite, and a benchmark slice.
# Usage on the device (repo root): source .devbundle/env.sh && bash scripts/gpu_check.sh [tests|bench|all]
set -u
what=${1:-all}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export TRITON_INTERPRET=0 TRITON_F32_DEFAULT=ieee
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  python -c "import tilelang; print('tilelang', tilelang.__version__)" 2>&1 | tail -1
  echo "git ${DSV4_GIT_SHA:-unknown}"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${T_TRITON:-260} python -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
    tests/test_attend_triton.py tests/test_index_topk_triton.py tests/test_compress_triton.py \
    tests/test_norm_rope_triton.py tests/test_formats_triton.py tests/test_gpu_integration.py \
    tests/test_robustness_gpu.py -k "not tilelang" > "$out/gpu_tests_triton.txt" 2>&1
  echo "triton gpu tests rc=$?"; tail -25 "$out/gpu_tests_triton.txt"
  # the hypothesis properties are not `gpu`-marked (they run on CPU in CI): on CUDA they run compiled
  timeout ${T_PROPS:-200} python -m pytest -q -p no:cacheprovider tests/test_properties.py \
    > "$out/gpu_tests_properties.txt" 2>&1
  echo "properties on GPU rc=$?"; tail -8 "$out/gpu_tests_properties.txt"
  timeout ${T_TL:-150} python -m pytest -q -m gpu -p no:cacheprovider tests/test_tilelang_gpu.py \
    > "$out/gpu_tests_tilelang.txt" 2>&1
  echo "tilelang gpu tests rc=$?"; tail -15 "$out/gpu_tests_tilelang.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${T_BENCH:-170} python -m bench.run --op ${OPS:-attend,index_logits,topk} --config flash --mode decode \
    --batch 1,32,64,128,256 --context ${CTX:-64k} --backend ${BACKENDS:-triton} --rep-ms 15 --out "$out/res" \
    > "$out/bench.txt" 2>&1
  echo "bench rc=$?"; tail -c 6000 "$out/bench.txt"
fi
