#!/bin/bash
# GPU correctness of the fused AllReduce + residual + RMSNorm (p2p transport), both process modes.
# Run on a machine with 2-8 NVLink-connected GPUs, from the repository root:
#     bash scripts/gpu_check.sh            # builds the extension if needed, then checks
#     bash scripts/gpu_check.sh dist       # only one part: single | hang | dist (default: all)
# Exit status 0 only if every check passed. NVLink multicast stays off; multimem is refused here.
set -u
PART=${1:-all}
case $PART in all|single|hang|dist) ;; *) echo "gpu_check.sh: unknown part '$PART' (single|hang|dist|all)"; exit 2 ;; esac
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUDA_MODULE_LOADING=EAGER PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${JAX_TOKENWEAVE_ENABLE_MULTIMEM:-0}" = "1" ]; then
  echo "gpu_check.sh: refusing to run with JAX_TOKENWEAVE_ENABLE_MULTIMEM=1 (never use NVLink multicast here)"; exit 2
fi
unset JAX_TOKENWEAVE_ENABLE_MULTIMEM
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, also without pip install -e
if ! $PY -c "import jax_tokenweave.collective._C" 2>/dev/null; then
  echo "== building the extension"; $PY setup.py build_ext --inplace || exit 1
fi
NGPU=$($PY -c "import jax; print(jax.local_device_count())" 2>/dev/null)
echo "== $NGPU GPUs, jax $($PY -c 'import jax; print(jax.__version__)')"
status=0
filt() { grep -v "^W0000\|^I0000\|^E0000\|^WARNING: All log" ; }
if want single; then
  echo "== one process, TP 2, 4 and 8 as far as $NGPU GPUs go"
  $PY tests/gpu/fused_check.py single 2>&1 | filt; [ ${PIPESTATUS[0]} -eq 0 ] || status=1
fi
if want hang; then
  echo "== missing peer (must error, not hang)"
  timeout 120 $PY tests/gpu/fused_check.py hang > /tmp/tw_hang.log 2>&1 || status=1
  grep "OK missing\|FAIL\|error record\|timed out waiting" /tmp/tw_hang.log | head -5
fi
if ! want dist; then
  [ $status -eq 0 ] && echo "GPU CHECK PASSED ($PART)" || echo "GPU CHECK FAILED ($PART)"
  exit $status
fi
N=$(( NGPU < 8 ? NGPU : 8 ))  # one process per GPU, every GPU (TP = N)
echo "== jax.distributed, $N processes x 1 GPU"
export TW_PORT=$(( 12000 + RANDOM % 2000 ))
pids=()
for i in $(seq 0 $((N-1))); do
  timeout 300 $PY tests/gpu/fused_check.py proc $i $N > /tmp/tw_proc_$i.log 2>&1 & pids+=($!)
done
for i in $(seq 0 $((N-1))); do wait ${pids[$i]} || status=1; done
for i in $(seq 0 $((N-1))); do echo "-- process $i"; filt < /tmp/tw_proc_$i.log | tail -10; done
# ranks in different processes must agree bitwise: compare the per-case digests
if [ "$(for i in $(seq 0 $((N-1))); do grep -o 'T=.*normed_sha=[0-9a-f]*' /tmp/tw_proc_$i.log | sed 's/max_rel_err.*normed_sha/sha/' | md5sum; done | sort -u | wc -l)" != "1" ]; then
  echo "FAIL: processes disagree on normed digests"; status=1
else echo "OK: all processes produced bitwise identical normed outputs"; fi
[ $status -eq 0 ] && echo "GPU CHECK PASSED ($PART)" || echo "GPU CHECK FAILED ($PART)"
exit $status
