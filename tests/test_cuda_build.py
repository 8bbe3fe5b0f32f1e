"""The CUDA extension builds with nvcc for sm_90a, its PTX/SASS hold the multimem instructions,
and the module exports the FFI handler. Runs on the CPU machine (nothing CUDA is executed)."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is NOT installed here: the CUDA build and PTX/SASS checks "
                                                     "cannot run (install the CUDA toolkit to run them)")


@needs_nvcc
def test_kernels_ptx_and_sass_hold_multimem(tmp_path):
    src = os.path.join(ROOT, "xla_ffi", "tw_kernels.cu")
    ptx = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90a", "-ptx", src, "-o", str(ptx)], check=True)
    text = ptx.read_text()
    assert "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2" in text
    assert "multimem.st.relaxed.sys.global.v4.f32" in text
    assert "st.release.sys.global.u32" in text and "ld.acquire.sys.global.u32" in text
    # the two-shot's TMA bulk copies (global -> shared -> global) and their completion barrier
    assert "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes" in text
    assert "cp.async.bulk.global.shared::cta.bulk_group" in text
    assert "mbarrier.try_wait.parity.shared::cta.b64" in text
    # ptxas accepts them for sm_90a (the cubin holds machine code for them)
    cubin = tmp_path / "k.cubin"
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", src, "-o", str(cubin)], check=True)
    assert cubin.stat().st_size > 0


def _cuobjdump():
    """cuobjdump from PATH, beside nvcc, or from the nvidia-cuda-cuobjdump wheel."""
    cands = [shutil.which("cuobjdump"), os.path.join(os.path.dirname(os.path.realpath(NVCC)), "cuobjdump")]
    try:
        import nvidia
        cands += [os.path.join(d, sub, "bin", "cuobjdump") for d in nvidia.__path__ for sub in ("cu13", "cuda_cuobjdump")]
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@needs_nvcc
def test_sass_holds_multimem(tmp_path):
    cuobjdump = _cuobjdump()
    assert cuobjdump, ("cuobjdump not found: the [test] extra installs it (nvidia-cuda-cuobjdump); "
                       "or put the CUDA toolkit's bin on PATH")
    src = os.path.join(ROOT, "xla_ffi", "tw_kernels.cu")
    cubin = tmp_path / "k.cubin"
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", src, "-o", str(cubin)], check=True)
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))  # its nvdisasm
    sass = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], check=True, capture_output=True, text=True,
                          env=env).stdout
    funcs = sass.split("Function : ")
    mm = [f for f in funcs if "multimem_kernel" in f.split("\n")[0]]
    assert mm, "multimem kernels missing from the SASS"
    body = mm[0]
    assert any(op in body for op in ("LDGMC", "MULTIMEM", "multimem")), "no multimem instruction in the multimem kernel's SASS"


@needs_nvcc
def test_extension_builds_and_exports_handler():
    so = glob.glob(os.path.join(ROOT, "jax_tokenweave", "collective", "_C*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))
    if not so:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, check=True)
        so = glob.glob(os.path.join(ROOT, "jax_tokenweave", "collective", "_C*" + sysconfig.get_config_var("EXT_SUFFIX")))
    assert so, "setup.py did not produce jax_tokenweave/collective/_C"
    syms = subprocess.run(["nm", "-D", so[0]], check=True, capture_output=True, text=True).stdout
    for sym in ("TwFusedAllReduceRMSNorm", "TwFusedStart", "TwFusedDone", "PyInit__C"):
        assert f" T {sym}" in syms, sym
    deps = subprocess.run(["ldd", so[0]], capture_output=True, text=True).stdout
    assert "libcuda.so" not in deps, "the extension must not link libcuda (driver API is resolved at run time)"
    from jax_tokenweave.collective import cuda_ops
    C = cuda_ops.extension()
    assert set(C.handlers()) == {cuda_ops.TARGET, cuda_ops.START_TARGET, cuda_ops.DONE_TARGET}
    # only the synchronous call may be captured into XLA's CUDA graphs (Start/Done use our stream)
    assert {name: graph_safe for name, (_, graph_safe) in C.handlers().items()} == {
        cuda_ops.TARGET: True, cuda_ops.START_TARGET: False, cuda_ops.DONE_TARGET: False}
    cuda_ops.register_targets()
    from jax_tokenweave.collective import fused
    assert {"p2p", "multimem", "auto"} <= set(fused._REGISTRY)
    assert "p2p" in fused._START_REGISTRY


class _FakeComm:
    """Stands in for a Communicator (which needs GPUs) when only lowering is checked."""
    id, num_ranks, max_bytes, ctas, axis_name, closed, transport = 7, 2, 1 << 20, 132, "tp", False, "p2p"


@needs_nvcc
def test_async_pair_lowering():
    """start -> barrier -> the overlapped matmul -> done, where done takes the kernel's inputs
    (kept alive) and the matmul's output (issued before the wait), and aliases start's results."""
    import re
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jax_tokenweave.collective import cuda_ops
    from jax_tokenweave.collective import fused
    from jax_tokenweave.parallel.mesh import make_mesh

    def f(x, r, g, a):
        pend = cuda_ops.p2p_start(x, r, g, axis_name="tp", comm=_FakeComm(), slot=1, ctas=24)
        pend, a = jax.lax.optimization_barrier((pend, a))
        y = a @ a
        n, r2 = fused.fused_allreduce_rmsnorm_done(pend, after=y)
        return n, r2, y
    mesh = make_mesh(2)
    sm = jax.shard_map(f, mesh=mesh, in_specs=(P("tp"), P("tp"), P(), P()),
                       out_specs=(P("tp"), P("tp"), P()), check_vma=False)
    bf = jnp.bfloat16
    txt = jax.jit(sm).lower(jax.ShapeDtypeStruct((32, 64), bf), jax.ShapeDtypeStruct((16, 64), bf),
                            jax.ShapeDtypeStruct((64,), bf), jax.ShapeDtypeStruct((128, 128), bf)).as_text()
    lines = txt.splitlines()
    start = next(i for i, l in enumerate(lines) if cuda_ops.START_TARGET in l)
    barrier = next(i for i, l in enumerate(lines) if "optimization_barrier" in l)
    dot = next(i for i, l in enumerate(lines) if "dot_general" in l)
    done = next(i for i, l in enumerate(lines) if cuda_ops.DONE_TARGET in l)
    assert start < barrier < dot < done
    assert "slot = 1" in lines[start] and "ctas = 24" in lines[start]
    operands = re.search(r"custom_call @" + cuda_ops.DONE_TARGET + r"\(([^)]*)\)", lines[done]).group(1)
    assert len(operands.split(",")) == 5          # normed, residual_out, partial, gamma32, y
    assert "output_operand_aliases" in lines[done] or "output_operand_aliases" in txt[txt.index(cuda_ops.DONE_TARGET):]


def test_without_nvcc_setup_skips_cleanly(tmp_path):
    env = dict(os.environ, JAX_TOKENWEAVE_NO_CUDA="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
                        str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "SKIPPING the CUDA extension" in r.stderr

