"""GPU tests (device machine only; excluded from the default CPU run by pytest.ini).

    pytest -m multigpu tests/gpu      # runs scripts/gpu_check.sh (one process and jax.distributed)
"""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
@pytest.mark.multigpu
def test_gpu_check_script():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", NVSHMEM_DISABLE_NVLS="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    env.pop("JAX_PLATFORMS", None)
    env.pop("JAX_TOKENWEAVE_ENABLE_MULTIMEM", None)
    env["XLA_FLAGS"] = ""
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True, text=True)
    print(r.stdout[-5000:])
    assert r.returncode == 0 and "GPU CHECK PASSED" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
