"""GPU correctness of the fused AllReduce + residual + RMSNorm against the `xla` reference.

    python tests/gpu/fused_check.py single            # one process: TP 2, 4 and 8 as far as the GPUs go
    python tests/gpu/fused_check.py proc RANK NPROC   # one of NPROC jax.distributed processes
    python tests/gpu/fused_check.py hang              # a missing peer must fail, not hang
    python tests/gpu/fused_check.py async             # only the asynchronous cases (same TP sizes)
    python tests/gpu/fused_check.py graph             # only the CUDA-graph (command buffer) cases

Besides the synchronous op, the asynchronous form (start / matmuls beside it / done, two slots
chained through the residual, as the split layer uses it) must give the synchronous op's bits, and
so must a chain of calls that XLA captured into a CUDA graph and replays.

Fresh random inputs each case (never zeros); the normed output memory is poisoned (the allocator's
free blocks are filled with NaN) before every checked call; every element is compared; ranks must
agree bitwise; repeated runs must be bitwise equal. Prints one line per case and 'ALL OK'.
Run it through scripts/gpu_check.sh (which sets the environment).
"""
import functools
import hashlib
import os
import sys
import time

for k, v in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    assert os.environ.get(k) == v, f"{k} must be {v} (NVLink multicast stays off)"
assert os.environ.get("JAX_TOKENWEAVE_ENABLE_MULTIMEM") != "1", "multimem must not run here"

import numpy as np

MODE = sys.argv[1] if len(sys.argv) > 1 else "single"
if MODE == "proc":
    import jax
    rank, nproc = int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{os.environ.get('TW_PORT', '12377')}", num_processes=nproc,
                               process_id=rank, local_device_ids=[rank])
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_tokenweave as jtw
from jax_tokenweave.collective import cuda_ops
from jax_tokenweave.collective.fused import (fused_allreduce_rmsnorm, fused_allreduce_rmsnorm_done, rows_per_rank)
from jax_tokenweave.parallel.mesh import make_mesh

FAILS = []


def tol(dtype):
    return {jnp.bfloat16: 2 ** -7, jnp.float16: 2 ** -10, jnp.float32: 1e-5}[dtype]


def make_fns(mesh, n, comm, mode, eps):
    spec = (P("tp", None), P("tp", None), P(None))

    def body(impl):
        def f(x, r, g):
            if impl == "xla":
                return fused_allreduce_rmsnorm(x, r, g, axis_name="tp", eps=eps, impl="xla")
            return cuda_ops.p2p_fused(x, r, g, axis_name="tp", eps=eps, comm=comm, mode=mode)
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=(P("tp", None), P("tp", None)),
                                     check_vma=False))
    return body("xla"), body("p2p")


@functools.lru_cache(maxsize=None)
def poison_fn(nbytes):
    return jax.jit(lambda: jnp.full((nbytes // 4,), jnp.nan, jnp.float32))


def poison(mesh, nbytes):
    # Fill free device memory blocks of about the output size with NaN, then free them: the next
    # allocation of the output likely reuses them, so unwritten elements would show up as NaN.
    for d in mesh.devices.flat:
        if d.process_index == jax.process_index():
            with jax.default_device(d):
                a = poison_fn(max(nbytes, 1024))()
                a.block_until_ready()
                del a


def local_blocks(a):
    return {s.device.id: np.asarray(s.data) for s in a.addressable_shards}


def run_case(mesh, n, comm, T, D, dtype, mode, seed, eps=1e-5):
    R = rows_per_rank(T, n)
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    shx = NamedSharding(mesh, P("tp", None))
    xs = np.asarray(jax.random.normal(k1, (n * T, D), jnp.float32).astype(dtype))
    rs = np.asarray((jax.random.normal(k2, (n * R, D), jnp.float32) * 2).astype(dtype))
    gs = np.asarray((1 + 0.1 * jax.random.normal(k3, (D,), jnp.float32)).astype(dtype))
    x = jax.make_array_from_callback(xs.shape, shx, lambda i: xs[i])
    r = jax.make_array_from_callback(rs.shape, shx, lambda i: rs[i])
    g = jax.make_array_from_callback(gs.shape, NamedSharding(mesh, P(None)), lambda i: gs[i])
    f_ref, f_ours = make_fns(mesh, n, comm, mode, eps)
    nref, rref = f_ref(x, r, g)
    nref, rref = local_blocks(nref), local_blocks(rref)
    rin = local_blocks(r)
    outs = []
    for rep in range(3):
        poison(mesh, T * D * jnp.dtype(dtype).itemsize)
        no, ro = f_ours(x, r, g)
        outs.append((local_blocks(no), local_blocks(ro)))
    t = tol(dtype)
    worst_n = worst_r = 0.0
    ok = True
    why = []
    for dev, a in outs[0][0].items():
        b = nref[dev].astype(np.float32)
        a32 = a.astype(np.float32)
        if not np.all(np.isfinite(a32)):
            ok = False; why.append(f"dev{dev} normed has {int((~np.isfinite(a32)).sum())} non-finite")
        err = np.abs(a32 - b) / (np.abs(b) + 1.0)
        worst_n = max(worst_n, float(err.max()))
        ro = outs[0][1][dev].astype(np.float32)
        rb = rref[dev].astype(np.float32)
        errr = np.abs(ro - rb) / (np.abs(rb) + 1.0)
        worst_r = max(worst_r, float(errr.max()))
        # padding rows of residual_out keep the input residual exactly
        rank = [d.id for d in mesh.devices.flat].index(dev)
        pad0 = max(0, min(R, T - rank * R))
        if pad0 < R and not np.array_equal(outs[0][1][dev][pad0:], rin[dev][pad0:]):
            ok = False; why.append(f"dev{dev} padding rows of residual_out changed")
    if worst_n > 2 * t or worst_r > 2 * t:
        ok = False; why.append(f"error normed {worst_n:.2e} residual {worst_r:.2e} > {2*t:.1e}")
    # identical on every local rank, and from run to run (bitwise)
    blocks = list(outs[0][0].values())
    if any(not np.array_equal(blocks[0].view(np.uint8), b.view(np.uint8)) for b in blocks[1:]):
        ok = False; why.append("normed differs between ranks")
    for rep in (1, 2):
        for dev in outs[0][0]:
            if not (np.array_equal(outs[0][0][dev].view(np.uint8), outs[rep][0][dev].view(np.uint8)) and
                    np.array_equal(outs[0][1][dev].view(np.uint8), outs[rep][1][dev].view(np.uint8))):
                ok = False; why.append(f"run {rep} differs from run 0 on dev{dev}")
                break
    digest = hashlib.sha1(blocks[0].tobytes()).hexdigest()[:12]
    line = (f"tp={n} T={T:5d} D={D:5d} {jnp.dtype(dtype).name:8s} mode={mode:8s} max_rel_err normed={worst_n:.1e} "
            f"residual={worst_r:.1e} normed_sha={digest} {'OK' if ok else 'FAIL ' + '; '.join(why)}")
    print(line, flush=True)
    if not ok:
        FAILS.append(line)


def run_async_case(mesh, n, comm, T, D, seed, ctas=(16, 32), eps=1e-5):
    """start(slot 0) || matmuls || done, then start(slot 1) on its outputs || matmuls || done:
    equal bit for bit to the same two synchronous calls, and close to xla."""
    R = rows_per_rank(T, n)
    ks = jax.random.split(jax.random.key(seed), 5)
    shx = NamedSharding(mesh, P("tp", None))
    mk = lambda a: jax.make_array_from_callback(a.shape, shx, lambda i: a[i])  # noqa: E731
    xs = np.asarray(jax.random.normal(ks[0], (n * T, D), jnp.float32).astype(jnp.bfloat16))
    rs = np.asarray((jax.random.normal(ks[1], (n * R, D), jnp.float32) * 2).astype(jnp.bfloat16))
    gs = np.asarray((1 + 0.1 * jax.random.normal(ks[2], (D,), jnp.float32)).astype(jnp.bfloat16))
    a_s = np.asarray(jax.random.normal(ks[3], (n * 2048, 4096), jnp.float32).astype(jnp.bfloat16))
    b_s = np.asarray((jax.random.normal(ks[4], (4096, 4096), jnp.float32) / 64).astype(jnp.bfloat16))
    x, r, a = mk(xs), mk(rs), mk(a_s)
    g = jax.make_array_from_callback(gs.shape, NamedSharding(mesh, P(None)), lambda i: gs[i])
    b = jax.make_array_from_callback(b_s.shape, NamedSharding(mesh, P(None)), lambda i: b_s[i])

    def body(kind):
        def f(x, r, g, a, b):
            if kind == "async":
                pend = cuda_ops.p2p_start(x, r, g, axis_name="tp", eps=eps, comm=comm, slot=0, ctas=ctas[0])
                pend, a = jax.lax.optimization_barrier((pend, a))
                y = (a @ b) @ b
                n0, r0 = fused_allreduce_rmsnorm_done(pend, after=y)
                pend = cuda_ops.p2p_start(n0, r0, g, axis_name="tp", eps=eps, comm=comm, slot=1, ctas=ctas[1])
                pend, y = jax.lax.optimization_barrier((pend, y))
                y = (y @ b) @ b
                n1, r1 = fused_allreduce_rmsnorm_done(pend, after=y)
                return n0, n1, r1, y
            impl = "xla" if kind == "xla" else "p2p"
            y = (((a @ b) @ b) @ b) @ b
            n0, r0 = fused_allreduce_rmsnorm(x, r, g, axis_name="tp", eps=eps, impl=impl, comm=comm)
            n1, r1 = fused_allreduce_rmsnorm(n0, r0, g, axis_name="tp", eps=eps, impl=impl, comm=comm)
            return n0, n1, r1, y
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(shx.spec,) * 2 + (P(None), shx.spec, P(None)),
                                     out_specs=(shx.spec,) * 4, check_vma=False))
    ref = [local_blocks(o) for o in body("xla")(x, r, g, a, b)]
    sync = [local_blocks(o) for o in body("sync")(x, r, g, a, b)]
    f_async = body("async")
    ok, why, worst = True, [], 0.0
    for rep in range(3):
        poison(mesh, T * D * 2)
        got = [local_blocks(o) for o in f_async(x, r, g, a, b)]
        for k, name in enumerate(("normed0", "normed1", "residual1", "matmul")):
            for dev in got[k]:
                if not np.array_equal(got[k][dev].view(np.uint8), sync[k][dev].view(np.uint8)):
                    ok = False; why.append(f"run {rep} {name} dev{dev} differs from the synchronous op")
                if k < 3:
                    e = np.abs(got[k][dev].astype(np.float32) - ref[k][dev].astype(np.float32))
                    worst = max(worst, float((e / (np.abs(ref[k][dev].astype(np.float32)) + 1)).max()))
    if worst > 4 * tol(jnp.bfloat16):
        ok = False; why.append(f"error vs xla {worst:.2e}")
    line = (f"tp={n} T={T:5d} D={D:5d} async start/matmul/done x2 ctas={ctas} max_rel_err_vs_xla={worst:.1e} "
            f"{'OK (bitwise = synchronous)' if ok else 'FAIL ' + '; '.join(sorted(set(why))[:4])}")
    print(line, flush=True)
    if not ok:
        FAILS.append(line)


def run_graph_case(mesh, n, comm, T, D, seed, K=8):
    """K synchronous calls chained in one jit, which XLA captures into a CUDA graph (command
    buffer) and replays: bit for bit equal to the same K calls made one jit at a time (not
    captured), on every replay, and close to the xla chain. Checks the device-side call counter
    that a replayed launch depends on."""
    R = rows_per_rank(T, n)
    ks = jax.random.split(jax.random.key(seed), 3)
    shx = NamedSharding(mesh, P("tp", None))
    mk = lambda a: jax.make_array_from_callback(a.shape, shx, lambda i: a[i])  # noqa: E731
    x = mk(np.asarray(jax.random.normal(ks[0], (n * T, D), jnp.float32).astype(jnp.bfloat16)))
    r = mk(np.asarray((jax.random.normal(ks[1], (n * R, D), jnp.float32) * 2).astype(jnp.bfloat16)))
    gs = np.asarray((1 + 0.1 * jax.random.normal(ks[2], (D,), jnp.float32)).astype(jnp.bfloat16))
    g = jax.make_array_from_callback(gs.shape, NamedSharding(mesh, P(None)), lambda i: gs[i])
    spec = (shx.spec, shx.spec, P(None))

    def chain(impl, k):
        def f(v, r, g):
            for _ in range(k):
                v, r = (fused_allreduce_rmsnorm(v, r, g, axis_name="tp", impl="xla") if impl == "xla" else
                        cuda_ops.p2p_fused(v, r, g, axis_name="tp", comm=comm))
            return v, r
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=(shx.spec,) * 2, check_vma=False))
    f_chain = chain("p2p", K)
    step = chain("p2p", 1)
    v, rr = x, r
    for _ in range(K):
        v, rr = step(v, rr, g)
    want = (local_blocks(v), local_blocks(rr))
    ref = [local_blocks(o) for o in chain("xla", K)(x, r, g)]
    ok, why, worst = True, [], 0.0
    jax.block_until_ready(f_chain(x, r, g))  # compiled, and captured if XLA does
    launches = min(comm.host_launches().values())
    for rep in range(3):
        poison(mesh, T * D * 2)
        got = [local_blocks(o) for o in f_chain(x, r, g)]
        for k, name in enumerate(("normed", "residual")):
            for dev in got[k]:
                if not np.array_equal(got[k][dev].view(np.uint8), want[k][dev].view(np.uint8)):
                    ok = False; why.append(f"replay {rep} {name} dev{dev} differs from the calls one by one")
                e = np.abs(got[k][dev].astype(np.float32) - ref[k][dev].astype(np.float32))
                worst = max(worst, float((e / (np.abs(ref[k][dev].astype(np.float32)) + 1)).max()))
    # host launches per executed call: 1 when every call goes through its handler, < 1 when XLA
    # replays it from a CUDA graph
    per_call = (min(comm.host_launches().values()) - launches) / (3 * K)
    captured = per_call < 1
    if worst > 8 * tol(jnp.bfloat16):
        ok = False; why.append(f"error vs xla chain {worst:.2e}")
    line = (f"tp={n} T={T:5d} D={D:5d} chain of {K} in one jit: host launches per call {per_call:.2f} "
            f"(in a CUDA graph: {'yes' if captured else 'NO'}), "
            f"max_rel_err_vs_xla={worst:.1e} {'OK (bitwise = one call per jit, 3 replays)' if ok else 'FAIL ' + '; '.join(sorted(set(why))[:4])}")
    print(line, flush=True)
    if not ok:
        FAILS.append(line)
    return captured


def tp_sizes():
    """Axis sizes to check on this machine: 2, 4 and 8, as far as the local GPUs go."""
    return [n for n in (2, 4, 8) if n <= jax.local_device_count()]


def sweep(mesh, n, comm, quick=False):
    seed = int(time.time()) % 100000  # fresh data every run
    tokens = [1, 3, 16, 17, 64, 255, 1024, 4097, 16384] if not quick else [1, 16, 17, 1000, 4096]
    for D in (2048, 4096, 5120, 8192):
        for T in tokens:
            if T == 16384 and D not in (2048, 8192):
                continue
            modes = ["auto"]
            if T * D * 2 <= comm.oneshot_max_bytes:
                modes = ["oneshot", "twoshot"]
            for m in modes:
                seed += 1
                run_case(mesh, n, comm, T, D, jnp.bfloat16, m, seed)
    for dtype in (jnp.float16, jnp.float32):
        for T, D, m in ((16, 4096, "oneshot"), (1000, 4096, "twoshot"), (5, 8, "auto")):
            seed += 1
            run_case(mesh, n, comm, T, D, dtype, m, seed)
    for T, D in ((16, 8192), (1000, 8192), (4096, 8192), (2048, 5120)):
        seed += 1
        run_async_case(mesh, n, comm, T, D, seed)
    for T, D in ((16, 8192), (64, 8192), (1000, 8192)):
        seed += 1
        run_graph_case(mesh, n, comm, T, D, seed)


def main():
    if MODE == "single":
        for n in tp_sizes():
            mesh = make_mesh(n)
            comm = jtw.Communicator(mesh, "tp", max_bytes=16384 * 8192 * 2, timeout_s=20)
            print(f"== one process, {comm}", flush=True)
            sweep(mesh, n, comm)
            comm.close()
        # errors that must be clear
        mesh = make_mesh(2)
        comm = jtw.Communicator(mesh, "tp", max_bytes=1 << 20)
        try:
            run_case(mesh, 2, comm, 4096, 8192, jnp.bfloat16, "auto", 1)
            FAILS.append("too-large message was not refused")
        except ValueError as e:
            print("OK refused too-large message:", str(e)[:120])
        m4 = make_mesh(min(4, jax.local_device_count()))
        if m4.shape["tp"] != 2:
            try:
                run_case(m4, m4.shape["tp"], comm, 16, 4096, jnp.bfloat16, "auto", 1)
                FAILS.append("mesh mismatch was not refused")
            except ValueError as e:
                print("OK refused wrong mesh:", str(e)[:120])
    elif MODE == "async":
        for n in tp_sizes():
            mesh = make_mesh(n)
            comm = jtw.Communicator(mesh, "tp", max_bytes=4096 * 8192 * 2, timeout_s=20)
            for T, D in ((16, 8192), (1000, 8192), (4096, 8192), (2048, 5120)):
                run_async_case(mesh, n, comm, T, D, int(time.time()) % 100000 + T)
            comm.close()
    elif MODE == "graph":
        for n in tp_sizes():
            mesh = make_mesh(n)
            comm = jtw.Communicator(mesh, "tp", max_bytes=4096 * 8192 * 2, timeout_s=20)
            for T, D in ((16, 8192), (64, 8192), (1000, 8192)):
                run_graph_case(mesh, n, comm, T, D, int(time.time()) % 100000 + T)
            comm.close()
    elif MODE == "proc":
        n = jax.device_count()
        mesh = make_mesh(n)
        comm = jtw.Communicator(mesh, "tp", max_bytes=4096 * 8192 * 2, timeout_s=60)
        print(f"== process {jax.process_index()}/{jax.process_count()} {comm}", flush=True)
        for T, D, m in ((1, 4096, "oneshot"), (16, 8192, "oneshot"), (64, 5120, "twoshot"), (1000, 8192, "auto"),
                        (4096, 8192, "auto"), (777, 2048, "auto")):
            run_case(mesh, n, comm, T, D, jnp.bfloat16, m, 1234 + T)
        run_async_case(mesh, n, comm, 2048, 8192, 99)
        run_graph_case(mesh, n, comm, 16, 8192, 98)
        jax.distributed.shutdown()
    elif MODE == "hang":
        # Rank 0 of a 2-GPU communicator runs alone: it must fail within the timeout, not hang.
        mesh = make_mesh(2)
        comm = jtw.Communicator(mesh, "tp", max_bytes=1 << 20, timeout_s=2)
        d0 = jax.devices()[0]
        x = jax.device_put(jnp.ones((16, 1024), jnp.bfloat16), d0)
        r = jax.device_put(jnp.ones((8, 1024), jnp.bfloat16), d0)
        g = jax.device_put(jnp.ones((1024,), jnp.float32), d0)
        call = jax.ffi.ffi_call(cuda_ops.TARGET, (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(r.shape, r.dtype)))
        t0 = time.time()
        try:
            out = jax.jit(lambda x, r, g: call(x, r, g, comm_id=np.int64(comm.id), eps=np.float32(1e-5), ctas=np.int64(4),
                                                mode=np.int64(0), num_ranks=np.int64(2), transport=np.int64(0)))(x, r, g)
            jax.block_until_ready(out)
            print("FAIL: a call with a missing peer returned"); sys.exit(3)
        except Exception as e:
            print(f"OK missing peer -> error after {time.time()-t0:.1f}s: {type(e).__name__}: {str(e)[:200]}")
            print("error record (code, rank, missing peer, call, block):", comm.last_error())
            sys.exit(0)
    if FAILS:
        print(f"{len(FAILS)} FAILED:\n" + "\n".join(FAILS)); sys.exit(1)
    print("ALL OK")


if __name__ == "__main__":
    main()
