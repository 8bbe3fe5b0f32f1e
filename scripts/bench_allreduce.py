"""Benchmark: fused AllReduce + residual + RMSNorm (ours, p2p) against XLA, per message size.

    python scripts/bench_allreduce.py --out bench/results            # full sweep, all local GPUs
    python scripts/bench_allreduce.py --only-xla --tag xla_ck        # (internal) one baseline column

Columns per (hidden, tokens): XLA psum + add + RMSNorm with a replicated residual (NCCL; exactly
/work/shared/probes/probe_ar_only.py's ar_norm), the same under XLA's own collective kernels
(--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE, a separate process since XLA_FLAGS are
read at start), the `xla` reference implementation of the contract (psum_scatter + norm +
all_gather), and ours: one-shot and two-shot, with the CTA count used. Up to --graph-tokens tokens,
where a call is short enough for the host's launch cost to matter, two more columns: XLA psum + norm
with its NCCL all-reduce captured into XLA's CUDA graphs too (command buffers with COLLECTIVES),
and ours with command buffers switched off. Per row, how many kernels our host handler launched
per executed call (1: every call through the host; 0: XLA replays it from a CUDA graph, whose
capture is the only launch). Each time is a slope: the
fastest of `--reps` timings of a chain of 44 back-to-back calls inside one jit, minus that of a
chain of 4, divided by 40 (after warm-up), so the fixed dispatch + synchronisation cost cancels.
Writes allreduce_<tag>.json / .md / .png.
"""
import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.pop("JAX_TOKENWEAVE_ENABLE_MULTIMEM", None)

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="bench/results")
ap.add_argument("--tag", default=None)
ap.add_argument("--hidden", default="8192,5120,6144")
ap.add_argument("--tokens", default="16,32,64,128,256,512,1024,2048,4096,8192,16384")
ap.add_argument("--reps", type=int, default=15)
ap.add_argument("--ctas", default="8,16,32,64,132")
ap.add_argument("--only-xla", action="store_true", help="only the XLA psum baseline (used for the collective-kernels column)")
ap.add_argument("--no-xla-ck", action="store_true")
ap.add_argument("--graph-tokens", type=int, default=256, help="largest token count of the graph / no-graph columns")
args = ap.parse_args()

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_tokenweave.collective.fused import fused_allreduce_rmsnorm, rows_per_rank
from jax_tokenweave.parallel.mesh import make_mesh

N = jax.device_count()
mesh = make_mesh(N)
SHORT, LONG = 4, 44   # calls per jit of the two chains whose time difference is measured
# XLA's command buffers (CUDA graphs): none at all, or the default kinds plus NCCL collectives.
NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}
GRAPHS_WITH_COLLECTIVES = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"}
LAST_LAUNCHES_PER_CALL = None  # of our op in the last long chain's timed runs (Communicator.host_launches)


comm = None  # ours (set below; --only-xla runs without one)


def host_launches():
    return min(comm.host_launches().values()) if comm is not None else 0


def per_call_us(make, options=None):
    """µs per call from the slope between a short and a long chain of calls in one jit:
    (min t(LONG) - min t(SHORT)) / (LONG - SHORT). The fixed cost of a dispatch and the final
    synchronisation (~0.1-0.3 ms with 4 devices) cancels out, for XLA and ours alike; the minimum
    over repetitions drops the host's scheduling noise, which is larger than a small call."""
    global LAST_LAUNCHES_PER_CALL
    best = {}
    for n in (SHORT, LONG):
        f, a = make(n)
        f = f.lower(*a).compile(compiler_options=options or {})
        r = f(*a); jax.block_until_ready(r)
        for _ in range(3):
            r = f(*a)
        jax.block_until_ready(r)
        ts = []
        launched = host_launches()
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        LAST_LAUNCHES_PER_CALL = (host_launches() - launched) / (n * args.reps)
        best[n] = float(np.min(ts))
    return (best[LONG] - best[SHORT]) / (LONG - SHORT) * 1e6


smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)


def xla_psum_norm(T, H, options=None):  # the probe's ar_norm: replicated residual, psum + add + RMSNorm
    x = jax.device_put(jax.random.normal(jax.random.key(0), (N * T, H), jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
    g = jax.device_put(jnp.ones((H,), jnp.bfloat16), NamedSharding(mesh, P(None)))

    def make(iters):
        @jax.jit
        @functools.partial(smap, in_specs=(P("tp", None), P(None)), out_specs=P("tp", None))
        def ar_norm(v, g):
            r = v
            for _ in range(iters):
                s = jax.lax.psum(v, "tp") + r
                r = s
                sf = s.astype(jnp.float32)
                v = (sf * jax.lax.rsqrt(jnp.mean(sf * sf, -1, keepdims=True) + 1e-5)).astype(jnp.bfloat16) * g
            return v
        return ar_norm, (x, g)
    return per_call_us(make, options)


def chain(T, H, impl, options=None, **kw):
    R = rows_per_rank(T, N)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (N * T, H), jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
    r = jax.device_put(jax.random.normal(jax.random.key(1), (N * R, H), jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
    g = jax.device_put(jnp.ones((H,), jnp.bfloat16), NamedSharding(mesh, P(None)))

    def make(iters):
        @jax.jit
        @functools.partial(smap, in_specs=(P("tp", None), P("tp", None), P(None)), out_specs=(P("tp", None), P("tp", None)))
        def f(v, r, g):
            for _ in range(iters):
                if impl == "xla":
                    v, r = fused_allreduce_rmsnorm(v, r, g, axis_name="tp", impl="xla")
                else:
                    v, r = cuda_ops.p2p_fused(v, r, g, axis_name="tp", comm=comm, **kw)
            return v, r
        return f, (x, r, g)
    return per_call_us(make, options)


hiddens = [int(h) for h in args.hidden.split(",")]
tokens = [int(t) for t in args.tokens.split(",")]
meta = dict(device=f"{N}x {jax.devices()[0].device_kind}", jax=jax.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
            command=" ".join([os.path.basename(sys.executable)] + sys.argv), num_ranks=N, chain_lengths=[SHORT, LONG], reps=args.reps,
            xla_flags=os.environ.get("XLA_FLAGS", ""))

if args.only_xla:
    res = {f"{H}x{T}": xla_psum_norm(T, H) for H in hiddens for T in tokens}
    print("JSON" + json.dumps(res))
    sys.exit(0)

import jax_tokenweave as jtw
from jax_tokenweave.collective import cuda_ops

from jax_tokenweave.collective.communicator import cuda_ordinal
sms = cuda_ops.extension().sm_count(cuda_ordinal(jax.local_devices()[0]))
comm = jtw.Communicator(mesh, "tp", max_bytes=max(tokens + [1024]) * max(hiddens) * 2 + (1 << 20),  # 1024: the CTA sweep
                        oneshot_max_bytes=4 << 20)

ck = {}
if not args.no_xla_ck:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_experimental_use_collective_kernels=ALL_REDUCE").strip())
    p = subprocess.run([sys.executable, __file__, "--only-xla", "--hidden", args.hidden, "--tokens", args.tokens, "--reps", str(args.reps)],
                       env=env, capture_output=True, text=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("JSON")]
    if line:
        ck = json.loads(line[0][4:])
    else:
        print("collective-kernels run failed (flag unknown to this jax?):", p.stderr[-800:])
        meta["xla_collective_kernels"] = "failed: " + p.stderr[-300:]

rows = []
for H in hiddens:
    for T in tokens:
        msg = T * H * 2
        R = rows_per_rank(T, N)
        row = dict(hidden=H, tokens=T, bytes=msg)
        row["xla_psum_norm_us"] = xla_psum_norm(T, H)
        small = T <= args.graph_tokens
        if small:
            row["xla_psum_norm_graph_us"] = xla_psum_norm(T, H, GRAPHS_WITH_COLLECTIVES)
        row["xla_collective_kernels_us"] = ck.get(f"{H}x{T}")
        row["xla_ref_impl_us"] = chain(T, H, "xla")
        if msg <= comm.oneshot_max_bytes:
            row["ours_oneshot_us"] = chain(T, H, "p2p", mode="oneshot", ctas=min(sms, T))
            row["ours_oneshot_ctas"] = min(sms, T)
            row["ours_oneshot_host_launches_per_call"] = LAST_LAUNCHES_PER_CALL
        row["ours_twoshot_us"] = chain(T, H, "p2p", mode="twoshot", ctas=sms)
        row["ours_twoshot_ctas"] = min(sms, R)
        row["ours_twoshot_host_launches_per_call"] = LAST_LAUNCHES_PER_CALL
        best_mode = min((k for k in ("ours_oneshot_us", "ours_twoshot_us") if k in row), key=lambda k: row[k])
        row["ours_us"] = row[best_mode]
        row["ours_mode"] = best_mode.split("_")[1]
        row["ours_sms"] = row[f"ours_{row['ours_mode']}_ctas"]
        row["ours_host_launches_per_call"] = row[f"ours_{row['ours_mode']}_host_launches_per_call"]
        if small:
            row["ours_nograph_us"] = chain(T, H, "p2p", NO_GRAPHS, mode=row["ours_mode"], ctas=row["ours_sms"])
            row["ours_nograph_host_launches_per_call"] = LAST_LAUNCHES_PER_CALL
        xla_best = min(v for v in (row["xla_psum_norm_us"], row.get("xla_psum_norm_graph_us"),
                                   row["xla_collective_kernels_us"], row["xla_ref_impl_us"]) if v)
        row["xla_best_us"] = xla_best
        row["speedup_vs_xla_psum_norm"] = row["xla_psum_norm_us"] / row["ours_us"]
        row["speedup_vs_best_xla"] = xla_best / row["ours_us"]
        row["busbw_GBps"] = 2 * (N - 1) / N * msg / (row["ours_us"] * 1e-6) / 1e9
        rows.append(row)
        print(f"H={H} T={T:5d} {msg/2**20:7.2f} MiB  xla {row['xla_psum_norm_us']:7.1f}  "
              f"xla+graphs {row.get('xla_psum_norm_graph_us') or 0:7.1f}  ours without graphs {row.get('ours_nograph_us') or 0:7.1f} "
              f"({row.get('ours_nograph_host_launches_per_call') or 0:.2f} host launches/call, with graphs "
              f"{row['ours_host_launches_per_call']:.2f})  xla_ck {row['xla_collective_kernels_us'] or 0:7.1f}  "
              f"xla_ref {row['xla_ref_impl_us']:7.1f}  ours {row['ours_us']:7.1f} ({row['ours_mode']}, {row['ours_sms']} SMs)  "
              f"x{row['speedup_vs_xla_psum_norm']:.2f} vs psum+norm, x{row['speedup_vs_best_xla']:.2f} vs best xla, "
              f"busbw {row['busbw_GBps']:.0f} GB/s", flush=True)

# time against CTA count at 1024 tokens x 8192 (16 MiB at TP4) and 64 tokens
cta_rows = []
for T in (1024, 64):
    H = 8192
    if H not in hiddens:
        break
    base = next(r["xla_psum_norm_us"] for r in rows if r["hidden"] == H and r["tokens"] == T) if T in tokens else xla_psum_norm(T, H)
    for c in [int(c) for c in args.ctas.split(",")]:
        c = min(c, sms)
        for mode in (("twoshot",) if T * H * 2 > comm.oneshot_max_bytes else ("oneshot", "twoshot")):
            t = chain(T, H, "p2p", mode=mode, ctas=c)
            cta_rows.append(dict(tokens=T, hidden=H, ctas=c, mode=mode, us=t, xla_psum_norm_us=base, speedup=base / t))
            print(f"CTAs {c:4d} T={T} {mode}: {t:7.1f} us  x{base/t:.2f} vs xla psum+norm", flush=True)

tag = args.tag or f"tp{N}_{jax.devices()[0].device_kind.replace(' ', '_')}"
os.makedirs(args.out, exist_ok=True)
base = os.path.join(args.out, f"allreduce_{tag}")
with open(base + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows, cta_sweep=cta_rows), f, indent=1)
with open(base + ".md", "w") as f:
    f.write(f"# Fused AllReduce + residual + RMSNorm, {meta['device']}\n\n")
    f.write(f"jax {meta['jax']}, {meta['date']}, command: `{meta['command']}`. Per call: (fastest of {args.reps} timings of "
            f"{LONG} chained calls in one jit - the same for {SHORT}) / {LONG - SHORT}. bf16. Times in µs per call.\n\n")
    f.write("XLA psum+norm, graphs: NCCL captured into XLA's CUDA graphs too (command buffers + COLLECTIVES). "
            "Ours, no graphs: command buffers off. Launches: kernels our host handler launched per executed call "
            "(0: replayed from a CUDA graph).\n\n")
    f.write("| hidden | tokens | MiB | XLA psum+norm | XLA psum+norm, graphs | XLA coll. kernels | xla ref impl | ours | launches | ours, no graphs | mode | SMs | × vs psum+norm | × vs best XLA | bus GB/s |\n")
    f.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v: f"{v:.1f}" if v else "n/a"  # noqa: E731
    for r in rows:
        f.write(f"| {r['hidden']} | {r['tokens']} | {r['bytes']/2**20:.2f} | {r['xla_psum_norm_us']:.1f} | "
                f"{fmt(r.get('xla_psum_norm_graph_us'))} | {fmt(r['xla_collective_kernels_us'])} | "
                f"{r['xla_ref_impl_us']:.1f} | {r['ours_us']:.1f} | {r['ours_host_launches_per_call']:.2f} | {fmt(r.get('ours_nograph_us'))} | "
                f"{r['ours_mode']} | {r['ours_sms']} | {r['speedup_vs_xla_psum_norm']:.2f} | {r['speedup_vs_best_xla']:.2f} | {r['busbw_GBps']:.0f} |\n")
    f.write("\n## Time against CTA count\n\n| tokens | hidden | CTAs | mode | µs | × vs XLA psum+norm |\n|---|---|---|---|---|---|\n")
    for r in cta_rows:
        f.write(f"| {r['tokens']} | {r['hidden']} | {r['ctas']} | {r['mode']} | {r['us']:.1f} | {r['speedup']:.2f} |\n")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(hiddens), figsize=(6 * len(hiddens), 4.5), squeeze=False)
    for ax, H in zip(axs[0], hiddens):
        rs = [r for r in rows if r["hidden"] == H]
        tk = [r["tokens"] for r in rs]
        ax.plot(tk, [r["xla_psum_norm_us"] for r in rs], "o-", label="XLA psum+add+RMSNorm (NCCL)")
        if any(r["xla_collective_kernels_us"] for r in rs):
            ax.plot(tk, [r["xla_collective_kernels_us"] for r in rs], "s--", label="XLA collective kernels")
        ax.plot(tk, [r["xla_ref_impl_us"] for r in rs], "^:", label="xla impl (RS+norm+AG)")
        ax.plot(tk, [r["ours_us"] for r in rs], "o-", lw=2, label="ours (p2p fused)")
        ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("tokens"); ax.set_ylabel("µs per call")
        ax.set_title(f"hidden {H}, {meta['device']}"); ax.grid(True, which="both", alpha=.3); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(base + ".png", dpi=110)
except Exception as e:
    print("plot failed:", e)
print("wrote", base + ".{json,md,png}")
