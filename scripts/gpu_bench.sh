#!/usr/bin/env bash
# Everything that needs the GPUs, in stages, from the repository root of the device machine:
#     OUT=/path bash scripts/gpu_bench.sh check,allreduce,tune,layer,model,moe
# Stages (each time-boxed; its log and result files go to $OUT/<stage>/):
#   asynccheck  the asynchronous fused op (start || matmuls || done) vs the synchronous op and xla
#   graphcheck  chains of the fused op that XLA captures into CUDA graphs vs the same calls one by one
#   check       scripts/gpu_check.sh: the fused op's full GPU correctness check, both process modes
#   checkdist   only its jax.distributed part (4 processes x 1 GPU, CUDA IPC)
#   weavecheck  tests/gpu/weave_check.py: split + overlap model logits vs the unsplit xla model
#   decodecheck tests/gpu/decode_check.py: decode kernels (append, layer_matmul) and the step vs XLA
#   allreduce   scripts/bench_allreduce.py at hidden 8192 (ALLREDUCE_HIDDEN, ALLREDUCE_TOKENS to change)
#   tune        scripts/tune_split.py: writes jax_tokenweave/weave/weave_table.json (copied to $OUT/tune)
#   layer       scripts/bench_layer.py, five variants + a TokenWeave profile PNG
#   kernel      scripts/bench_kernel_raw.py --phases (the kernel alone, CUDA events, no XLA)
#   model       scripts/bench_model.py (80-layer prefill 1K-16K, decode, attention)
#   attention   scripts/bench_model.py --sections attention (cuDNN vs XLA vs Pallas Mosaic GPU)
#   moe         scripts/bench_moe.py --quick (Mixtral-8x22B block, layer, 56-layer prefill)
# The engine (one GPU is enough; TP = the GPUs here):
#   init        scripts/bench_init.py: random 8B / 70B shapes ready (weights + first prefill)
#   generate    the README's GPU command: scripts/generate.py --random-model llama-3.1-8b
#   decode      scripts/bench_decode.py: decode step vs roofline, Generator, XLA attention, peer
#   serving     scripts/bench_serving.py: continuous engine vs static batching vs peer
#   profdecode  scripts/profile_decode.py: copy roofline, decode kernels by category, idle time, XLA flag variants
#   profdecode8k  the same at a cache capacity of 8192 (512 positions valid)
#   layermatmul scripts/bench_layer_matmul.py: decode's skinny matmuls, XLA on w[layer] vs the Pallas layer_matmul
# At the end everything under $OUT is packed into $OUT/results.tgz (the device tool returns at
# most 8 files), and a one-line-per-stage summary is printed. NVLink multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUDA_MODULE_LOADING=EAGER PYTHONUNBUFFERED=1
unset JAX_TOKENWEAVE_ENABLE_MULTIMEM
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e jax_tokenweave/models ] || ln -sfn ../models jax_tokenweave/models   # no pip install offline
PY=${PYTHON:-python3}
R=${OUT:-/tmp/tw_out}
mkdir -p "$R"
STAGES=${1:-asynccheck,weavecheck,allreduce,tune,layer,model,moe}
if ! $PY -c "import jax_tokenweave.collective._C" 2>/dev/null; then
  $PY setup.py build_ext --inplace > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
fi
filt() { grep -v "^W0000\|^I0000\|^E0000\|^WARNING: All log" ; }
SUMMARY=()
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local d="$R/$name"; mkdir -p "$d"
  local t0=$SECONDS
  echo "=== $name (limit ${secs}s)"
  OUT="$d" timeout "$secs" "$@" > "$d/log.txt" 2>&1
  local rc=$?
  filt < "$d/log.txt" | tail -"${TAIL:-25}"
  SUMMARY+=("$(printf '%-11s rc=%-3s %4ds' "$name" "$rc" $((SECONDS - t0)))")
}
for s in ${STAGES//,/ }; do
  case $s in
    asynccheck) stage asynccheck 240 $PY tests/gpu/fused_check.py async ;;
    graphcheck) stage graphcheck 240 $PY tests/gpu/fused_check.py graph ;;
    check)      TAIL=40 stage check 560 bash scripts/gpu_check.sh ;;
    checkdist)  TAIL=30 stage checkdist 150 bash scripts/gpu_check.sh dist ;;
    weavecheck) stage weavecheck 240 $PY tests/gpu/weave_check.py ;;
    decodecheck) stage decodecheck 200 $PY tests/gpu/decode_check.py ;;
    allreduce)  stage allreduce 420 $PY scripts/bench_allreduce.py --hidden "${ALLREDUCE_HIDDEN:-8192}" \
                  ${ALLREDUCE_TOKENS:+--tokens $ALLREDUCE_TOKENS} --reps 7 --out "$R/allreduce" ;;
    tune)       stage tune 120 $PY scripts/tune_split.py --tokens "${TUNE_TOKENS:-2048,4096,8192}" \
                  --comm-ctas "${TUNE_CTAS:-32,48,64,96}" --comm-ctas-mlp 16,24,32 --offsets=-128,128 --iters 5
                cp jax_tokenweave/weave/weave_table.json "$R/tune/" ;;
    layer)      stage layer 120 $PY scripts/bench_layer.py --tokens 1024,2048,4096,8192,16384 \
                  --iters 5 --warmup 2 --layers 4 --profile --out "$R/layer" ;;
    kernel)     stage kernel 120 $PY scripts/bench_kernel_raw.py --phases --out "$R/kernel" ;;
    model)      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 stage model 220 $PY scripts/bench_model.py \
                  --tokens 1024,2048,4096,8192,16384 --iters 3 --warmup 1 --decode-batch 8 \
                  --decode-steps 8 --out "$R/model" ;;
    attention)  stage attention 120 $PY scripts/bench_model.py --tokens 1024,2048,4096,8192,16384 --layers 1 \
                  --sections attention --out "$R/attention" ;;
    moe)        stage moe 400 $PY scripts/bench_moe.py --quick --sections layer,model --out "$R/moe" ;;
    init)       stage init 150 $PY scripts/bench_init.py --models "${INIT_MODELS:-llama-3.1-8b,llama-3.3-70b}" \
                  --out "$R/init" ;;
    generate)   stage generate 110 $PY scripts/generate.py --random-model llama-3.1-8b --prompt-ids 1,2,3,4,5 \
                  --max-new-tokens 64 --ignore-eos ;;
    decode)     stage decode 420 $PY scripts/bench_decode.py --out "$R/decode" ;;
    serving)    stage serving 430 $PY scripts/bench_serving.py --out "$R/serving" ;;
    layermatmul) stage layermatmul 400 $PY scripts/bench_layer_matmul.py --out "$R/layermatmul" ;;
    profdecode) stage profdecode 540 $PY scripts/profile_decode.py --out "$R/profdecode" ${PROFDECODE_ARGS:-} ;;
    profdecode8k) stage profdecode8k 540 $PY scripts/profile_decode.py --capacity 8192 \
                  --out "$R/profdecode8k" ${PROFDECODE_ARGS:-} ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
find "$R" -name "*.xplane.pb" -delete 2>/dev/null
(cd "$R" && tar czf results.tgz --exclude=results.tgz --exclude='*.trace.json.gz' . )
echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"
