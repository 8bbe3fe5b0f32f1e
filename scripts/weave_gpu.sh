#!/usr/bin/env bash
# The split schedule on the GPU machine, in one short call (~5 min on 4xH200): GPU correctness
# (p2p + split vs unsplit xla), the five-variant layer benchmark with a TokenWeave profile PNG,
# and the quick model benchmark. Results land in ${OUT:-bench/results}.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUDA_MODULE_LOADING=EAGER
cd "$(dirname "$0")/.."
R=${OUT:-bench/results}
mkdir -p "$R"
timeout 90 python tests/gpu/weave_check.py 2>&1 | tail -8
timeout 200 python scripts/bench_layer.py --tokens 1024,2048,4096,8192,16384 --iters 5 --warmup 2 \
    --layers 4 --profile --out "$R" 2>&1 | grep -v "^W0000\|^I0000" | tail -30
timeout 200 python scripts/bench_model.py --quick --tokens 4096,8192 --sections prefill,attention \
    --out "$R" 2>&1 | grep -v "^W0000\|^I0000" | tail -30
rm -rf "$R/trace_tokenweave"/plugins/profile/*/*.xplane.pb 2>/dev/null || true
