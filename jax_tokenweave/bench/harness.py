"""Benchmark harness for the split schedule: random sharded layer weights, the five layer
variants, timing, result files and a profile-trace timeline. Used by scripts/bench_layer.py,
scripts/bench_model.py and scripts/tune_split.py.

Variants (all run the same attention/MLP math, weave.py's functional layer):
    baseline    XLA's native TP path: psum + residual add + RMSNorm, replicated residual, no split
    xla_split   the same psum path with the batch split in two (weave's order): XLA's own async
                collectives do whatever overlap they can
    fused       fused_allreduce_rmsnorm (token-sharded residual), no split
    tokenweave  fused + split + overlap (start/done pairs on GPU with the CUDA impl, the
                collective on SplitConfig.comm_ctas SMs)
    nocomm      reductions removed (residual += local partial): the ideal, not a correct model
"""
from __future__ import annotations

import datetime
import gzip
import glob
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

from jax_tokenweave.gpu_env import forbid_multicast

forbid_multicast()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_tokenweave import weave
from jax_tokenweave.compat import shard_map
from jax_tokenweave.collective.extension import available as cuda_available

VARIANTS = ("baseline", "xla_split", "fused", "tokenweave", "nocomm")


def default_impl() -> str:
    """p2p where the CUDA extension registered it (GPU), else the xla reference."""
    return "p2p" if (cuda_available() and jax.default_backend() == "gpu") else "xla"


def check_impl(impl: str) -> str:
    if impl == "multimem":
        raise SystemExit("impl=multimem is never run by the benchmarks (NVLink multicast is off "
                         "on the lent machines)")
    return impl


def make_comm(mesh, impl: str, max_tokens: int, hidden: int, itemsize: int = 2):
    """The Communicator the CUDA impls need, sized for the largest message (None for xla)."""
    if impl not in ("p2p", "auto") or not cuda_available():
        return None
    from jax_tokenweave.collective.communicator import Communicator
    tp = mesh.shape["tp"]
    rows = -(-max_tokens // tp) * tp
    return Communicator(mesh, "tp", max_bytes=rows * hidden * itemsize + (1 << 20))


def layer_specs(cfg, tp: int, axis: str = "tp") -> dict[str, P]:
    kv = axis if tp <= cfg.num_kv_heads else None
    specs = dict(wq=P(None, axis, None), wk=P(None, kv, None), wv=P(None, kv, None),
                 wo=P(axis, None, None), w_gate=P(None, axis), w_up=P(None, axis),
                 w_down=P(axis, None), input_norm=P(), post_attn_norm=P())
    if cfg.attention_bias:
        specs.update(bq=P(axis, None), bk=P(kv, None), bv=P(kv, None))
    return specs


def random_sharded(mesh, shapes: dict, specs: dict, fan_in: dict, *, seed=0,
                   dtype=jnp.bfloat16, num_layers: int | None = None):
    """Random weights {name: shape} (or `num_layers` stacked on a leading axis), created sharded
    on the devices by a jit with out_shardings, so a large model never sits whole on one device.
    Norm weights are ones; biases (names starting with "b") std 0.02; the rest fan_in**-0.5.
    Returns (weights, {name: PartitionSpec})."""
    lead = () if num_layers is None else (num_layers,)
    shard = {k: NamedSharding(mesh, P(*((None,) * len(lead)), *specs[k])) for k in shapes}

    def init():
        keys = jax.random.split(jax.random.key(seed), len(shapes))
        out = {}
        for key, (name, shp) in zip(keys, sorted(shapes.items())):
            if name.endswith("norm"):
                out[name] = jnp.ones(lead + shp, dtype)
            else:
                std = 0.02 if name.startswith("b") else fan_in[name] ** -0.5
                out[name] = (std * jax.random.normal(key, lead + shp, jnp.float32)).astype(dtype)
        return out

    return jax.jit(init, out_shardings=shard)(), {k: s.spec for k, s in shard.items()}


def random_layer(cfg, mesh, *, seed=0, dtype=jnp.bfloat16, num_layers: int | None = None,
                 axis: str = "tp"):
    """One dense layer's weights (or `num_layers` stacked), created sharded."""
    D, H, KVH, hd, F = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    shapes = dict(wq=(D, H, hd), wk=(D, KVH, hd), wv=(D, KVH, hd), wo=(H, hd, D), w_gate=(D, F),
                  w_up=(D, F), w_down=(F, D), input_norm=(D,), post_attn_norm=(D,))
    if cfg.attention_bias:
        shapes.update(bq=(H, hd), bk=(KVH, hd), bv=(KVH, hd))
    fan_in = dict(wq=D, wk=D, wv=D, w_gate=D, w_up=D, wo=H * hd, w_down=F)
    return random_sharded(mesh, shapes, layer_specs(cfg, mesh.shape[axis], axis), fan_in,
                          seed=seed, dtype=dtype, num_layers=num_layers)


def make_reducer(variant: str, cfg, impl: str, comm=None, axis: str = "tp",
                 split: weave.SplitConfig | None = None) -> weave.Reducer:
    kind = {"baseline": "psum", "xla_split": "psum", "nocomm": "nocomm"}.get(variant, "fused")
    split = split or weave.SplitConfig()
    return weave.Reducer(kind, axis, cfg.rms_norm_eps, impl, comm, split.comm_ctas, split.comm_ctas_mlp)


def layer_stack_fn(variant: str, cfg, mesh, wspecs, *, tokens: int, batch: int = 1,
                   num_layers: int = 4, impl: str = "xla", comm=None, attn_impl: str = "xla",
                   split: weave.SplitConfig | None = None, stacked: bool = False,
                   axis: str = "tp"):
    """A jitted fn(weights, partial [T, D]) -> normed [B, S, D] running `num_layers` layers of
    `variant` under shard_map (lax.scan over the layers; the same weights each layer unless
    `stacked`). `partial` plays the embedding's partial sum; every rank gets the same."""
    from jax_tokenweave.models.llama import rope_cos_sin, rope_inv_freq
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; choose from {VARIANTS}")
    S = tokens // batch
    split = split or weave.SplitConfig()
    red = make_reducer(variant, cfg, impl, comm, axis, split)
    spec = weave.LayerSpec(cfg.num_kv_heads, axis, attn_impl)
    plan = None
    if variant in ("xla_split", "tokenweave"):
        plan = weave.plan_split(batch, S, split)
        if plan is None:
            plan = weave.plan_split(batch, S, weave.SplitConfig(threshold=2, tile=split.tile,
                                                                offset=split.offset))
    overlap = variant == "tokenweave" and weave.use_overlap(split, red)
    inv = rope_inv_freq(cfg)

    def body(w, p):
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (batch, S))
        D = p.shape[-1]
        norm0 = jax.tree.map(lambda a: a[0], w)["input_norm"] if stacked else w["input_norm"]
        xs = w if stacked else None
        pick = (lambda wl: wl) if stacked else (lambda _: w)
        if plan is None:
            x, r = red(p, red.init(tokens, D, p.dtype), norm0)
            x = x.reshape(batch, S, D)
            rope = rope_cos_sin(pos, inv)

            def step(c, wl):
                wl = pick(wl)
                x, r, _ = weave.plain_layer(wl, *c, wl["input_norm"], rope, spec=spec, red=red)
                return (x, r), None
            (x, _), _ = jax.lax.scan(step, (x, r), xs, length=num_layers)
            return x
        pos0, pos1 = plan.split(pos)
        rope0, rope1 = rope_cos_sin(pos0, inv), rope_cos_sin(pos1, inv)
        T0, _ = plan.tokens
        if plan.kind == "batch":
            p0, p1 = p[:T0], p[T0:]
        else:
            pb = p.reshape(batch, S, D)
            p0, p1 = (a.reshape(-1, D) for a in plan.split(pb))
        carry = weave.split_begin(p0, p1, norm0, plan, red)

        def step(c, wl):
            wl = pick(wl)
            c, _ = weave.split_layer(wl, c, wl["input_norm"], rope0, rope1, plan=plan, spec=spec,
                                     red=red, overlap=overlap)
            return c, None
        carry, _ = jax.lax.scan(step, carry, xs, length=num_layers)
        return weave.split_end(carry, norm0, plan, red)

    fn = shard_map(body, mesh=mesh, in_specs=(wspecs, P()), out_specs=P(), check_vma=False)
    return jax.jit(fn), plan


def time_fn(fn, *args, iters: int = 10, warmup: int = 2) -> dict:
    """Median/min wall time of fn(*args) in µs (each call synchronised)."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t) * 1e6)
    return dict(median_us=statistics.median(ts), min_us=min(ts), iters=iters)


def run_info(argv=None) -> dict:
    dev = jax.devices()[0]
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + list(argv or sys.argv)),
                jax=jax.__version__, backend=jax.default_backend(),
                device=getattr(dev, "device_kind", str(dev)), device_count=jax.device_count(),
                host=platform.node(),
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS",
                                                    "TORCH_SYMM_MEM_DISABLE_MULTICAST", "XLA_FLAGS")})


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def plot_lines(path: str, xs, series: dict[str, list], *, xlabel: str, ylabel: str, title: str,
               logx: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- profile timeline

def find_trace(log_dir: str) -> str:
    """The newest trace json.gz that jax.profiler.trace wrote under log_dir."""
    found = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True) +
                   glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}")
    return found[-1]


def _category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("twoshot_kernel", "oneshot_kernel", "multimem_kernel", "fused_ar",
                            "tokenweave", "allreduce", "all-reduce", "all_reduce",
                            "nccl", "reduce-scatter", "reduce_scatter", "all-gather", "allgather",
                            "all_gather", "p2p", "custom-call", "custom_call", "ffi")):
        return "communication"
    if any(s in n for s in ("fmha", "cudnn", "flash", "attention", "softmax")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90", "dot", "matmul", "xmma", "cublas")):
        return "matmul"
    return "other"


COLORS = {"communication": "#d62728", "attention": "#2ca02c", "matmul": "#1f77b4", "other": "#999999"}


def trace_timeline(trace_path: str, png_path: str, *, device_filter: str = "GPU",
                   window: tuple[float, float] | None = None, title: str = "") -> dict:
    """Render the kernel events of each device stream as a timeline PNG. Returns a summary:
    per row busy time and the time where communication and compute kernels overlap."""
    with gzip.open(trace_path) as f:
        d = json.load(f)
    ev = d["traceEvents"] if isinstance(d, dict) else d
    pname, tname = {}, {}
    for e in ev:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e["pid"], e.get("tid"))] = e["args"]["name"]
    rows: dict = {}
    for e in ev:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        pn, tn = pname.get(e["pid"], str(e["pid"])), tname.get((e["pid"], e.get("tid")), "")
        if device_filter and device_filter not in pn:
            continue
        if any(s in tn for s in ("XLA Modules", "XLA Ops", "TraceMe", "Source", "Steps")):
            continue
        rows.setdefault((pn, tn), []).append((float(e["ts"]), float(e["dur"]), e.get("name", "")))
    if not rows:   # e.g. a CPU trace with no device streams: fall back to all threads
        for e in ev:
            if e.get("ph") == "X" and "dur" in e:
                key = (pname.get(e["pid"], ""), tname.get((e["pid"], e.get("tid")), ""))
                rows.setdefault(key, []).append((float(e["ts"]), float(e["dur"]), e.get("name", "")))
    if window is None:   # the last 40% of the trace: the last of the profiled calls
        t0 = min(s for r in rows.values() for s, _, _ in r)
        t1 = max(s + du for r in rows.values() for s, du, _ in r)
        window = (t0 + 0.6 * (t1 - t0), t1)
    lo, hi = window
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted(rows)
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(keys) + 1.8))
    summary = {}
    comm_iv, comp_iv = [], []
    for y, key in enumerate(keys):
        busy = 0.0
        for cat in COLORS:
            bars = [(s - lo, du) for s, du, n in rows[key]
                    if _category(n) == cat and s + du > lo and s < hi]
            busy += sum(du for _, du in bars)
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLORS[cat], edgecolor="none")
            ivs = [(s, s + du) for s, du, n in rows[key]
                   if _category(n) == cat and s + du > lo and s < hi]
            (comm_iv if cat == "communication" else comp_iv if cat in ("matmul", "attention")
             else []).extend((key[0], a, b) for a, b in ivs)
        summary[f"{key[0]} | {key[1]}"] = dict(busy_us=busy, events=len(rows[key]))
    overlap = 0.0
    for dev in {k[0] for k in keys}:
        a = sorted((s, e) for dv, s, e in comm_iv if dv == dev)
        b = sorted((s, e) for dv, s, e in comp_iv if dv == dev)
        i = j = 0
        while i < len(a) and j < len(b):
            overlap += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{p.split('/')[-1]} {t}"[:48] for p, t in keys], fontsize=7)
    ax.set_xlim(0, hi - lo)
    ax.set_xlabel("µs")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], fontsize=7,
              loc="upper right", ncol=4)
    ax.set_title(title or os.path.basename(trace_path), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return dict(trace=trace_path, png=png_path, window_us=[lo, hi],
                comm_compute_overlap_us=overlap, rows=summary)


# ------------------------------------------------------------------ chunked prefill + decode

def cache_shape(cfg, tp: int, num_layers: int, batch: int, max_len: int):
    return (num_layers, batch, max_len, max(cfg.num_kv_heads, tp), cfg.head_dim)


def chunk_fn(variant: str, cfg, mesh, wspecs, *, chunk: int, offset: int, num_layers: int,
             impl="xla", comm=None, attn_impl="xla", split=None, axis="tp"):
    """A jitted fn(stacked weights, partial [chunk, D], ck, cv) -> (normed [1, chunk, D], ck, cv):
    one prefill chunk of one sequence at static position `offset`, attending to the cache's
    first `offset` positions; its k/v written at [offset, offset+chunk). ck/cv donated."""
    from jax_tokenweave.models.llama import rope_cos_sin, rope_inv_freq
    split = split or weave.SplitConfig()
    red = make_reducer(variant, cfg, impl, comm, axis, split)
    spec = weave.LayerSpec(cfg.num_kv_heads, axis, attn_impl)
    plan = weave.plan_split(1, chunk, split) if variant in ("xla_split", "tokenweave") else None
    overlap = variant == "tokenweave" and weave.use_overlap(split, red)
    inv = rope_inv_freq(cfg)
    cs = P(None, None, None, axis, None)

    def body(w, p, ck, cv):
        D = p.shape[-1]
        pos = (offset + jnp.arange(chunk, dtype=jnp.int32))[None]
        norm0 = w["input_norm"][0]

        def prefix(ckl, cvl):
            return (ckl[:, :offset], cvl[:, :offset]) if offset else None

        if plan is None:
            x, r = red(p, red.init(chunk, D, p.dtype), norm0)
            rope = rope_cos_sin(pos, inv)

            def step(c, xs):
                wl, ckl, cvl = xs
                x, r, kv = weave.plain_layer(wl, *c, wl["input_norm"], rope, spec=spec, red=red,
                                             prefix_kv=prefix(ckl, cvl))
                return (x, r), kv
            (x, _), (ks, vs) = jax.lax.scan(step, (x.reshape(1, chunk, D), r), (w, ck, cv))
        else:
            pos0, pos1 = plan.split(pos)
            rope0, rope1 = rope_cos_sin(pos0, inv), rope_cos_sin(pos1, inv)
            T0, _ = plan.tokens
            carry = weave.split_begin(p[:T0], p[T0:], norm0, plan, red)

            def step(c, xs):
                wl, ckl, cvl = xs
                c, (k0, v0, k1, v1) = weave.split_layer(
                    wl, c, wl["input_norm"], rope0, rope1, plan=plan, spec=spec, red=red,
                    overlap=overlap, prefix_kv=prefix(ckl, cvl))
                return c, (jnp.concatenate([k0, k1], 1), jnp.concatenate([v0, v1], 1))
            carry, (ks, vs) = jax.lax.scan(step, carry, (w, ck, cv))
            x = weave.split_end(carry, norm0, plan, red)
        ck = jax.lax.dynamic_update_slice(ck, ks.astype(ck.dtype), (0, 0, offset, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, vs.astype(cv.dtype), (0, 0, offset, 0, 0))
        return x, ck, cv

    fn = shard_map(body, mesh=mesh, in_specs=(wspecs, P(), cs, cs), out_specs=(P(), cs, cs),
                   check_vma=False)
    return jax.jit(fn, donate_argnums=(2, 3))


def decode_fn(variant: str, cfg, mesh, wspecs, *, batch: int, impl="xla", comm=None, axis="tp"):
    """A jitted fn(stacked weights, partial [B, D], ck, cv, lengths [B]) -> (normed [B, D], ck, cv):
    one decode step for `batch` sequences (never split), k/v written at `lengths`."""
    from jax_tokenweave.models.llama import rope_cos_sin, rope_inv_freq
    red = make_reducer(variant, cfg, impl, comm, axis)
    spec = weave.LayerSpec(cfg.num_kv_heads, axis, "xla")
    inv = rope_inv_freq(cfg)
    cs = P(None, None, None, axis, None)

    def body(w, p, ck, cv, lengths):
        D = p.shape[-1]
        cos, sin = rope_cos_sin(lengths[:, None], inv)
        x, r = red(p, red.init(batch, D, p.dtype), w["input_norm"][0])
        max_len = ck.shape[2]
        # cached keys j < lengths[b] plus the new key (appended last)
        mask = jnp.concatenate([jnp.arange(max_len)[None] < lengths[:, None],
                                jnp.ones((batch, 1), bool)], axis=1)[:, None, None, :]

        def step(c, xs):
            wl, ckl, cvl = xs
            x, r = c
            q, k, v = weave.qkv(wl, x.reshape(batch, 1, D), cos, sin, spec)
            kk = jnp.concatenate([ckl.astype(k.dtype), k], axis=1)
            vv = jnp.concatenate([cvl.astype(v.dtype), v], axis=1)
            o = jax.nn.dot_product_attention(q, kk, vv, mask=mask, implementation="xla")
            h = jnp.einsum("bshk,hkd->bsd", o, wl["wo"]).reshape(batch, D)
            x, r = red(h, r, wl["post_attn_norm"])
            x, r = red(weave.mlp_block(wl, x), r, wl["input_norm"])
            return (x, r), (k[:, 0], v[:, 0])
        (x, _), (ks, vs) = jax.lax.scan(step, (x, r), (w, ck, cv))
        b = jnp.arange(batch)
        ck = ck.at[:, b, lengths].set(ks.astype(ck.dtype))
        cv = cv.at[:, b, lengths].set(vs.astype(cv.dtype))
        return x, ck, cv

    fn = shard_map(body, mesh=mesh, in_specs=(wspecs, P(), cs, cs, P()), out_specs=(P(), cs, cs),
                   check_vma=False)
    return jax.jit(fn, donate_argnums=(2, 3))


def attention_microbench(tokens, *, heads=16, kv_heads=2, head_dim=128, iters=10,
                         impls=("cudnn", "xla", "mgpu")):
    """One GPU's share of causal prefill attention: µs per impl per token count (errors kept)."""
    out = {}
    for T in tokens:
        ks = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(ks[0], (1, T, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, T, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, T, kv_heads, head_dim), jnp.bfloat16)
        row = {}
        for impl in impls:
            try:
                if impl == "mgpu":
                    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
                    # the kernel's own GQA; block sizes as its example's best at head_dim 128
                    cfgm = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                           causal=True)
                    f = jax.jit(lambda q, k, v: am.attention(q, k, v, cfgm))
                    try:
                        row[impl] = time_fn(f, q, k, v, iters=iters, warmup=2)["median_us"]
                    except ValueError as e:   # jax 0.11.2's kernel refuses bf16: time fp16
                        row[impl] = f"{type(e).__name__}: {str(e)[:200]}"
                        h = [a.astype(jnp.float16) for a in (q, k, v)]
                        row["mgpu_fp16"] = time_fn(f, *h, iters=iters, warmup=2)["median_us"]
                    continue
                f = jax.jit(partial(jax.nn.dot_product_attention, is_causal=True,
                                    implementation=impl))
                row[impl] = time_fn(f, q, k, v, iters=iters, warmup=2)["median_us"]
            except Exception as e:   # noqa: BLE001 - report and go on
                row[impl] = f"{type(e).__name__}: {str(e)[:200]}"
        out[T] = row
    return out
