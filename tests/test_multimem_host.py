"""Host logic of the multimem transport with the multicast driver calls stubbed out, and its
opt-in gate. Nothing here creates a multicast object."""
import os

import pytest

from jax_tokenweave.collective import cuda_ops, extension

C = extension.extension() if extension.available() else None
pytestmark = pytest.mark.skipif(C is None, reason="the CUDA extension is NOT built here (no nvcc?): "
                                                  "multimem host logic cannot be tested")


def test_setup_sequence_with_stubbed_driver():
    cap = 3 * (1 << 20) + 5
    r = C.multimem_dry_run([0, 1, 2, 3], cap)
    log = r["log"]
    # every device is checked for multicast support, the object is created once for 4 devices
    assert [l for l in log if l.startswith("cuDeviceGetAttribute")] == [f"cuDeviceGetAttribute 132 {d}" for d in range(4)]
    creates = [l for l in log if l.startswith("cuMulticastCreate")]
    assert len(creates) == 1 and creates[0].endswith("n=4")
    # all devices join before any memory is bound
    first_bind = next(i for i, l in enumerate(log) if l.startswith("cuMulticastBindMem"))
    adds = [i for i, l in enumerate(log) if l.startswith("cuMulticastAddDevice")]
    assert len(adds) == 4 and max(adds) < first_bind
    # sizes: input + output regions, rounded to the 2 MiB (stub) granularity
    assert r["out_off"] >= cap and r["out_off"] % 4096 == 0
    assert r["bytes"] % (2 << 20) == 0 and r["bytes"] >= 2 * r["out_off"]
    assert f"cuMulticastCreate size={r['bytes']} n=4" in log
    # one physical allocation, bind, unicast + multicast mapping with access per device
    for d in range(4):
        assert f"cuMemCreate dev={d} size={r['bytes']}" in log
        assert log.count(f"cuMemSetAccess dev={d}") == 2
    assert log.count(f"cuMulticastBindMem size={r['bytes']}") == 4
    assert len(r["uc"]) == 4 and len(r["mc"]) == 4 and len(set(r["uc"] + r["mc"])) == 8


def test_single_device_refused():
    with pytest.raises(RuntimeError, match="at least 2 devices"):
        C.multimem_dry_run([0], 1 << 20)


def test_gate_requires_opt_in(monkeypatch):
    monkeypatch.delenv("JAX_TOKENWEAVE_ENABLE_MULTIMEM", raising=False)
    with pytest.raises(RuntimeError, match="opt-in"):
        C.check_multimem_allowed()


@pytest.mark.parametrize("var,val", [("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
                                     ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")])
def test_gate_refuses_machines_with_nvls_disabled(monkeypatch, var, val):
    monkeypatch.setenv("JAX_TOKENWEAVE_ENABLE_MULTIMEM", "1")
    for v in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, val)
    with pytest.raises(RuntimeError, match="disabled on this machine"):
        C.check_multimem_allowed()


def test_python_impl_refuses_without_opt_in(monkeypatch):
    import jax.numpy as jnp
    monkeypatch.delenv("JAX_TOKENWEAVE_ENABLE_MULTIMEM", raising=False)
    with pytest.raises(RuntimeError, match="opt-in"):
        cuda_ops.multimem_fused(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((1, 8), jnp.bfloat16), jnp.ones((8,)), axis_name="tp")
