#!/usr/bin/env bash
# The engine benchmarks on one GPU machine, in one visit (each stage time-boxed, logs and result
# files under $OUT/<stage>/, packed into $OUT/results.tgz at the end):
#     OUT=/path bash scripts/gpu_engine_bench.sh [init,generate,decode,serving]
#   init      scripts/bench_init.py: random 8B / 70B shapes ready (weights + first prefill)
#   generate  the README's GPU command: scripts/generate.py --random-model llama-3.1-8b
#   decode    scripts/bench_decode.py: decode step vs roofline, Generator, XLA attention, peer
#   serving   scripts/bench_serving.py: continuous engine vs static batching vs peer
#   dsf       bench_decode.py on two rows with XLA's dynamic-slice fusion on (the scan's per-layer
#             weight slices fed to the GEMMs in place instead of copied)
# NVLink multicast stays off (and the engine benchmarks run at TP = the GPUs here).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset JAX_TOKENWEAVE_ENABLE_MULTIMEM
[ -e jax_tokenweave/models ] || ln -sfn ../models jax_tokenweave/models   # no pip install offline
PY=${PYTHON:-python3}
R=${OUT:-/tmp/tw_out}
mkdir -p "$R"
STAGES=${1:-init,generate,decode,serving}
SUMMARY=()
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local d="$R/$name"; mkdir -p "$d"
  local t0=$SECONDS
  echo "=== $name (limit ${secs}s)"
  OUT="$d" timeout "$secs" "$@" > "$d/log.txt" 2>&1
  local rc=$?
  grep -v "^W0000\|^I0000\|^E0000" "$d/log.txt" | tail -25
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
}
for s in ${STAGES//,/ }; do
  case $s in
    init) stage init 150 $PY scripts/bench_init.py --models "${INIT_MODELS:-llama-3.1-8b,llama-3.3-70b}" --out "$R/init" ;;
    generate) stage generate 110 $PY scripts/generate.py --random-model llama-3.1-8b --prompt-ids 1,2,3,4,5 \
                --max-new-tokens 64 --ignore-eos ;;
    decode) stage decode 420 $PY scripts/bench_decode.py --out "$R/decode" ;;
    dsf) stage dsf 150 env XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true ${XLA_FLAGS:-}" \
           $PY scripts/bench_decode.py --rows 1:2048,8:2048 --no-xla --no-peer --generator-batches 1 --out "$R/dsf" ;;
    serving) stage serving 430 $PY scripts/bench_serving.py --out "$R/serving" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
tar czf "$R/results.tgz" -C "$R" --exclude results.tgz . 2>/dev/null
printf '%s\n' "--- summary" "${SUMMARY[@]}"
