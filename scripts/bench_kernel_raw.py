"""Kernel-only timing of the p2p fused kernel (no XLA, no host in the loop): `iters` dependent
launches captured into one CUDA graph per GPU and replayed, CUDA events around the replay. The
first row is an empty kernel (the launch gap between dependent kernels: the floor of any call).
--phases also times variants with phases switched off (wrong results, timing only) to see where
the time goes. With --out DIR it also writes
DIR/allreduce_raw_kernel_tp<N>.json (rows + device, jax version, date, command)."""
import datetime, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()
import jax
import jax_tokenweave as jtw
from jax_tokenweave.collective import cuda_ops
from jax_tokenweave.collective.communicator import cuda_ordinal
from jax_tokenweave.parallel.mesh import make_mesh

n = jax.device_count()
comm = jtw.Communicator(make_mesh(n), "tp", max_bytes=64 << 20, oneshot_max_bytes=4 << 20)
C = cuda_ops.extension()
ords = [cuda_ordinal(d) for d in comm.devices]
print(f"raw kernel timing, {n} ranks, bf16, us per call (max over GPUs)")
rows = []
ITERS = 200
floor = max(C.bench_raw(comm.id, ords, 16, 8192, -1, 16, ITERS, 0))
rows.append(dict(tokens=0, hidden=0, mode="empty kernel", ctas=16, us=dict(full=floor)))
print(f"empty kernel, 16 CTAs: {floor:7.1f}", flush=True)
for T, D, mode, ctas in [(16, 8192, 1, 8), (16, 8192, 1, 16), (16, 8192, 2, 16), (16, 8192, 2, 132), (64, 8192, 1, 32),
                         (64, 8192, 1, 64), (64, 8192, 2, 32), (64, 8192, 2, 132), (256, 8192, 2, 132),
                         (1024, 8192, 2, 132), (1024, 8192, 2, 64), (1024, 8192, 2, 32), (1024, 8192, 2, 16),
                         (2048, 8192, 2, 64), (2048, 8192, 2, 32), (4096, 8192, 2, 132)]:
    res = {}
    for name, dbg in (("full", 0), ("no_push", 1), ("no_pull", 2), ("no_norm", 4), ("barriers_only", 7)):
        if name != "full" and "--phases" not in sys.argv:
            continue
        res[name] = max(C.bench_raw(comm.id, ords, T, D, mode, ctas, ITERS, dbg))
    rows.append(dict(tokens=T, hidden=D, mode="oneshot" if mode == 1 else "twoshot", ctas=ctas, us=res))
    print(f"T={T:5d} D={D} {'oneshot' if mode == 1 else 'twoshot'} ctas={ctas:3d}: " + "  ".join(f"{k} {v:7.1f}" for k, v in res.items()), flush=True)
if "--out" in sys.argv:
    out = sys.argv[sys.argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    meta = dict(device=f"{n}x {jax.devices()[0].device_kind}", jax=jax.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                command="python3 " + " ".join(sys.argv), what=f"kernel alone: {ITERS} dependent launches in a CUDA graph per GPU, CUDA events around "
                "the replay, us per call, max over GPUs; phases switched off by Params.dbg give wrong results")
    path = os.path.join(out, f"allreduce_raw_kernel_tp{n}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", path)
