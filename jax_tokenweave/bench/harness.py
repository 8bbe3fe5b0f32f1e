"""Benchmark harness for the split schedule: the five variants of the model's forward, random
weights in the model's runtime layout, timing, result files and a profile-trace timeline. Used
by scripts/bench_layer.py, scripts/bench_model.py, scripts/bench_moe.py and scripts/tune_split.py.

There is no benchmark-only layer math: every variant runs the model's functions
(``weave.schedule.forward`` -> models/transformer.py or the split schedule -> models/layers.py)
on ``random_weights`` (model_io/random_weights.py, the layout TPModel runs) and differs only in
the reduction it passes in (collective/reducer.py) and in whether the batch is split:

    baseline    Reducer "psum": XLA's native TP path (psum + residual add + RMSNorm, replicated
                residual), no split
    xla_split   the same psum reducer with the batch split in two (weave's order): XLA's own async
                collectives do whatever overlap they can
    fused       Reducer "fused": fused_allreduce_rmsnorm (token-sharded residual), no split
    tokenweave  fused + split + overlap (start/done pairs on GPU with the CUDA impl, the
                collective on SplitConfig.comm_ctas SMs; ``schedule.use_overlap`` decides)
    nocomm      Reducer "nocomm": reductions removed (residual += local partial): the ideal, not
                a correct model
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import gzip
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
from functools import partial

from jax_tokenweave.gpu_env import forbid_multicast

forbid_multicast()

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_tokenweave.collective.communicator import Communicator
from jax_tokenweave.collective.extension import available as cuda_available
from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.compat import shard_map
from jax_tokenweave.engine import attention
from jax_tokenweave.model_io.random_weights import random_params
from jax_tokenweave.models.layers import LayerSpec, rope_inv_freq
from jax_tokenweave.parallel.sharding import param_shardings
from jax_tokenweave.weave import schedule
from jax_tokenweave.weave.split import SplitConfig, plan_split

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
    tp = mesh.shape["tp"]
    rows = -(-max_tokens // tp) * tp
    return Communicator(mesh, "tp", max_bytes=rows * hidden * itemsize + (1 << 20))


def random_weights(cfg, mesh, *, num_layers: int | None = None, dtype=jnp.bfloat16, seed: int = 0,
                   axis: str = "tp") -> dict:
    """The model's own random weights (model_io/random_weights.py) in its runtime layout
    (``layers.<path>`` [L, ...]) with `num_layers` layers (default: the config's), created
    sharded on the devices: what TPModel and every benchmark variant run on."""
    if num_layers is not None:
        cfg = cfg.replace(num_layers=num_layers)
    return random_params(cfg, mesh, seed=seed, dtype=dtype, axis_name=axis)


def weight_specs(cfg, mesh, axis: str = "tp") -> dict[str, P]:
    """path -> PartitionSpec of the runtime layout (the shard_map in_specs of the weights; the
    layer count does not enter them)."""
    return {k: s.spec for k, s in param_shardings(cfg, mesh, axis, stacked=True).items()}


def token_ids(mesh, batch: int, seq: int, vocab: int, seed: int = 0) -> jax.Array:
    """Random token ids [batch, seq] int32, replicated over the mesh."""
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, jnp.int32)
    return jax.device_put(ids, NamedSharding(mesh, P()))


def make_reducer(variant: str, cfg, impl: str = "xla", comm=None, axis: str = "tp",
                 split: SplitConfig | None = None) -> Reducer:
    """The reduction a variant passes to the model's forward (the only thing that differs
    between the variants besides the split): psum for baseline/xla_split, none for nocomm, the
    fused op for fused/tokenweave (with the split's CTA counts for the overlapped calls)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; choose from {VARIANTS}")
    kind = {"baseline": "psum", "xla_split": "psum", "nocomm": "nocomm"}.get(variant, "fused")
    split = split or SplitConfig()
    return Reducer(kind, axis, cfg.rms_norm_eps, impl, comm, split.comm_ctas, split.comm_ctas_mlp)


def variant_split(variant: str, batch: int, seq: int, split: SplitConfig | None) -> SplitConfig | None:
    """The SplitConfig a variant runs a [batch, seq] batch with: None (unsplit) for baseline,
    fused and nocomm; for xla_split and tokenweave `split`, or, where `split` would not cut this
    shape (below its threshold), the same config with threshold 2 and no per-size offsets, so
    that every size shows split against unsplit."""
    if variant not in ("xla_split", "tokenweave"):
        return None
    split = split or SplitConfig()
    if plan_split(batch, seq, split) is None:
        split = dataclasses.replace(split, threshold=2, offsets=())
    return split


def layer_stack_fn(variant: str, cfg, mesh, *, tokens: int, batch: int = 1, impl: str = "xla",
                   comm=None, attn_impl: str = "xla", split: SplitConfig | None = None,
                   moe_impl: str = "ragged", axis: str = "tp"):
    """(jitted fn(weights, token_ids [B, S]) -> final normed hidden [B, S, D] (replicated), the
    SplitPlan the variant runs, or None).

    fn is the model's own forward, ``weave.schedule.forward`` (embedding, the stacked layers
    under lax.scan, final norm; the LM head left out), under shard_map over `axis`, with
    causal attention over the batch (engine/attention.py's ``causal`` / ``split_causal`` with
    `attn_impl`). The variants differ only in the Reducer they pass (make_reducer) and in the
    SplitConfig (variant_split); tokenweave's start/done overlap is ``schedule.use_overlap``'s
    choice. The depth is the weights' (random_weights(num_layers=...)); a Mixtral config runs
    its MoE FFN (LayerSpec.of(cfg), `moe_impl`). B = batch, S = tokens // batch."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; choose from {VARIANTS}")
    if tokens % batch:
        raise ValueError(f"tokens ({tokens}) must be a multiple of batch ({batch})")
    S = tokens // batch
    red = make_reducer(variant, cfg, impl, comm, axis, split)
    vsplit = variant_split(variant, batch, S, split)
    plan = plan_split(batch, S, vsplit) if vsplit is not None else None
    spec = LayerSpec.of(cfg, axis, moe_impl)
    inv_freq = rope_inv_freq(cfg)

    def body(weights, ids):
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (batch, S))
        x, _ = schedule.forward(weights, ids, pos, split=vsplit, spec=spec, red=red, inv_freq=inv_freq,
                                attend=attention.causal(attn_impl),
                                split_attend=attention.split_causal(attn_impl))
        return x

    fn = shard_map(body, mesh=mesh, in_specs=(weight_specs(cfg, mesh, axis), P()), out_specs=P(),
                   check_vma=False)
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


def smaller_defaults(ap, args, **values) -> None:
    """A script's --tiny: `values` replace the defaults the user left alone (an option given on
    the command line keeps its value)."""
    for k, v in values.items():
        if getattr(args, k) == ap.get_default(k):
            setattr(args, k, v)


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


def decode_loop_times(decode, cache, tok, *, steps: int, reps: int):
    """Seconds per step of `reps` dispatch-ahead loops of `steps` calls ``decode(tok, cache) ->
    (logits, cache)`` (the caller warms up): (per-step times, last logits, cache)."""
    ts, logits = [], None
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            logits, cache = decode(tok, cache)
        jax.block_until_ready(logits)
        ts.append((time.perf_counter() - t) / steps)
    return ts, logits, cache


# ------------------------------------------------------------------------- the copy roofline

def _median_s(f, x, reps: int) -> float:
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(mib: int = 2048, reps: int = 10) -> dict:
    """The device's memory ceiling for a roofline: the best of three ways of streaming `mib` MiB
    through device memory, each counted as bytes read + bytes written over the median time of
    `reps` calls after a warm-up (one call moves GBs, so dispatch is noise):

      copy_f32     ``jnp.copy`` of f32 (XLA emits a device-to-device copy)
      scale_f32    ``x * 1.0001`` in f32 (an elementwise kernel)
      scale_bf16   ``x * 1.0001`` in bf16 (f32 math, the dtype the model streams)

    The best one is the roofline's bandwidth (a kernel cannot beat the fastest plain stream), so
    every method and its figure is kept for the reader. Also reported, not part of the best:
    ``read_bytes_per_s``, a read-only stream (``x.sum()`` of f32). A decode step mostly reads,
    but XLA's reduction ran below its copy on the H200 (2.8-3.3 against 3.45 TB/s), so it is no
    ceiling; it is kept to show that."""
    n = max(1, mib * (1 << 20) // 4)
    methods = {"copy_f32": (jnp.float32, lambda x: jnp.copy(x)),
               "scale_f32": (jnp.float32, lambda x: x * 1.0001),
               "scale_bf16": (jnp.bfloat16, lambda x: (x.astype(jnp.float32) * 1.0001).astype(jnp.bfloat16))}
    res = {}
    for name, (dt, fn) in methods.items():
        count = n * 4 // jnp.dtype(dt).itemsize
        x = jax.jit(lambda: jnp.full((count,), 1.5, dt))()
        res[name] = 2 * count * jnp.dtype(dt).itemsize / _median_s(jax.jit(fn), x, reps)
        del x
    x = jax.jit(lambda: jnp.full((n,), 1.5, jnp.float32))()
    read = 4 * n / _median_s(jax.jit(jnp.sum), x, reps)
    del x
    best = max(res, key=res.get)
    return dict(bytes_per_s=res[best], best_method=best, methods_bytes_per_s=res, mib=mib,
                read_bytes_per_s=read,
                method=f"best of {', '.join(res)} over {mib} MiB, (read + written) / median of {reps}")


# ------------------------------------------------------------------- compiled HLO, read as text

_HLO_COPY = re.compile(r"= \S+ copy(-start)?\(")


def hlo_copy_lines(hlo_text: str) -> list[str]:
    """The copy instructions of an optimized HLO module (which buffers it copies every call)."""
    return [ln.strip() for ln in hlo_text.splitlines() if _HLO_COPY.search(ln)]


def hlo_copy_counts(hlo_text: str) -> dict:
    """How much an optimized HLO module copies: copy instructions, ``wrapped_slice`` fusions
    (a slice of a stacked weight materialised, e.g. for a cuBLAS call; each is named twice in
    the text) and cuBLAS calls."""
    return dict(copies=len(hlo_copy_lines(hlo_text)), wrapped_slices=hlo_text.count("%wrapped_slice") // 2,
                cublas_calls=hlo_text.count('"__cublas'))


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
    if any(s in n for s in ("fmha", "cudnn", "flash", "attention", "softmax", "paged", "ragged")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "sm90", "dot", "matmul", "swiglu", "xmma",
                            "cublas")):
        return "matmul"
    return "other"


COLORS = {"communication": "#d62728", "attention": "#2ca02c", "matmul": "#1f77b4", "other": "#999999"}


def decode_category(name: str) -> str:
    """A decode step's kernel kinds: _category's, with its "other" split into copies, KV page
    writes, reductions and elementwise fusions."""
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memcpy"
    kind = _category(name)
    if kind != "other":
        return kind
    if "scatter" in n or "dynamic_update" in n:
        return "kv_write"
    if "reduce" in n:
        return "reduce"
    return "elementwise"


def kernel_breakdown(tdir: str, steps: int) -> dict:
    """GPU kernels of a trace of `steps` identical steps, per step: busy time (union of kernel
    intervals), idle time between kernels, kernel count, time per decode_category, the top
    kernels, and the kernel sequence of one step."""
    ev = json.load(gzip.open(find_trace(tdir)))["traceEvents"]
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    ks = sorted((e for e in ev if e.get("ph") == "X" and "dur" in e and "GPU" in pname.get(e["pid"], "")),
                key=lambda e: e["ts"])
    if not ks:
        return dict(error="no GPU kernel events in the trace")
    busy, end = 0.0, ks[0]["ts"]
    for e in ks:                      # union of intervals (streams may overlap)
        s, f = e["ts"], e["ts"] + e["dur"]
        if f > end:
            busy += f - max(s, end)
            end = f
    wall = end - ks[0]["ts"]
    tot, cnt, cat = collections.Counter(), collections.Counter(), collections.Counter()
    for e in ks:
        tot[e["name"]] += e["dur"]
        cnt[e["name"]] += 1
        cat[decode_category(e["name"])] += e["dur"]
    per = len(ks) // steps
    return dict(window_us_per_step=wall / steps, busy_us_per_step=busy / steps,
                idle_us_per_step=(wall - busy) / steps, kernels_per_step=len(ks) / steps,
                category_us_per_step={k: round(v / steps, 1) for k, v in cat.most_common()},
                top_kernels=[(n[:100], round(t / steps, 1), cnt[n] // steps) for n, t in tot.most_common(25)],
                one_step=[(e["name"][:60], round(e["dur"], 2), round(e["ts"] - ks[per].get("ts"), 2))
                          for e in ks[per:2 * per]])


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


# ------------------------------------------------------------------------ attention alone

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
