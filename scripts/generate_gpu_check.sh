#!/bin/bash
# Generation on GPUs: the fused CUDA op (p2p) against xla, one process and jax.distributed
# (one GPU per process), with random weights. Run from the repository root on a machine with
# 2+ NVLink-connected GPUs:   bash scripts/generate_gpu_check.sh [PRESET]
# Exit status 0 only if every run succeeded and all runs produced the same greedy tokens.
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUDA_MODULE_LOADING=EAGER PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
unset JAX_TOKENWEAVE_ENABLE_MULTIMEM
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PRESET=${1:-tiny-llama}
OUTDIR=${OUT:-/tmp}/gen_gpu_check
mkdir -p "$OUTDIR"
if ! $PY -c "import jax_tokenweave.collective._C" 2>/dev/null; then
  echo "== building the extension"; $PY setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1 || { tail -30 "$OUTDIR/build.log"; exit 1; }
fi
NGPU=$($PY -c "import jax; print(jax.local_device_count())" 2>/dev/null)
N=$(( NGPU < 4 ? NGPU : 4 ))
echo "== $NGPU GPUs, using $N; preset $PRESET"
ARGS=(--random-model "$PRESET" --prompt-ids 5,17,99,3,250,8,1 --prompt-ids 42,7 --max-new-tokens 24 --tp "$N" --ignore-eos)
status=0
filt() { grep -v "^W0000\|^I0000\|^E0000\|^WARNING: All log" ; }
for impl in xla p2p; do
  echo "== one process, impl=$impl"
  timeout 300 $PY scripts/generate.py "${ARGS[@]}" --impl $impl --json "$OUTDIR/single_$impl.json" > "$OUTDIR/single_$impl.log" 2>&1 || status=1
  filt < "$OUTDIR/single_$impl.log" | tail -8
done
echo "== jax.distributed, $N processes x 1 GPU, impl=p2p"
PORT=$(( 12000 + RANDOM % 2000 ))
pids=()
for i in $(seq 0 $((N-1))); do
  timeout 300 $PY scripts/generate.py "${ARGS[@]}" --impl p2p --coordinator 127.0.0.1:$PORT \
    --num-processes $N --process-id $i --json "$OUTDIR/multi_p2p.json" > "$OUTDIR/multi_$i.log" 2>&1 & pids+=($!)
done
for i in $(seq 0 $((N-1))); do wait ${pids[$i]} || status=1; done
filt < "$OUTDIR/multi_0.log" | tail -8
$PY - "$OUTDIR" <<'EOF' || status=1
import json, sys, os
d = sys.argv[1]
runs = {n: json.load(open(os.path.join(d, n + ".json"))) for n in ("single_xla", "single_p2p", "multi_p2p")
        if os.path.exists(os.path.join(d, n + ".json"))}
toks = {n: [r["tokens"] for r in v["results"]] for n, v in runs.items()}
for n, t in toks.items():
    print(f"{n:11s} impl={runs[n]['impl']:4s} processes={runs[n]['processes']} tokens[0][:12]={t[0][:12]}")
ok = len(toks) == 3 and all(t == toks["single_xla"] for t in toks.values())
print("OK: all runs agree" if ok else "FAIL: runs disagree or are missing")
sys.exit(0 if ok else 1)
EOF
[ $status -eq 0 ] && echo "GENERATE GPU CHECK PASSED" || echo "GENERATE GPU CHECK FAILED"
exit $status
