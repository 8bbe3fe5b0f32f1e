#!/usr/bin/env python3
"""GPU microbenchmark of the Pallas paged-attention kernels (jax_tokenweave/kernels/paged_attention.py).

One run does (each section guarded, the JSON rewritten after each, and no timing started past
--budget-s so the call ends inside its limit) check, bandwidth, (e), (f), decode at page size
16, (d), decode at the other page sizes:
  (a) correctness on the GPU against the XLA reference (bf16, and one fp32 case): max |err|;
  (c) copy bandwidth: ``x * 1.0001`` over 1 GiB of f32, 32 dependent steps in one jit, bytes
      read + written per step over the median step time;
  (b) ``paged_decode_attention`` for one layer of a Llama-3.1-8B shape (32 q / 8 kv heads, hd 128,
      bf16) at batch 1/8/32 x context 512/2048/8192 (+ capacity 8192 with 560 valid), page
      size 16, then 64 and 32 (VARIANTS_BY_PS: the default against its alternatives):
      32 dependent calls inside one jit (lax.fori_loop, the layer index i % L traced), median of
      >= 20 runs after warm-up, divided by 32; ratio_to_roofline = time / (valid KV bytes / bw);
  (d) ``jax.nn.dot_product_attention(implementation="cudnn")`` on a dense cache of the same
      valid length, timed the same way;
  (e) ``ragged_paged_attention`` for one 512-token prefill chunk on 1024 tokens of context plus
      31 decode rows (context 1024 each);
  (f) one prefill chunk alone (CHUNK_CASES: 256/512/2048 query tokens on 0/1024/4096 tokens of
      prefix, pages of 16): the ragged kernel against cuDNN (``jax.nn.dot_product_attention``) on
      the sequence's pages gathered into a dense [1, ctx, KVH, hd], without and with the gather
      in the timed loop, each checked against ``paged_attention_reference``. ``is_causal`` aligns
      the diagonal top-left (query i sees keys <= i: XLA's mask does, and the engine's
      models/layers.causal_attention assumes cuDNN's does too; the run probes it), but the
      chunk's queries are the last ones of its context, so cuDNN runs three ways: ``pad`` (the
      engine's way: P zero query rows in front), ``mask`` (an explicit bottom-right mask, which
      cuDNN gets as a bias: no causal tile skipping) and ``lse`` (prefix unmasked + the chunk's
      own square causal part, merged by their log-sum-exps, which jax returns in bf16). The
      fastest correct one is then timed with the gather; the table compares it with the ragged
      kernel (ratio > 1: cuDNN faster, gather included). At most CHUNK_BUDGET_S of the budget.
Prints a short table last; writes everything to $OUT/paged_attention_h200.json.
``--sections`` runs only some of them (e.g. ``--sections chunk``).
``--smoke`` runs the same code at tiny shapes on CPU (interpret mode) to check the script.

    python3 scripts/bench_paged_attention.py --out $OUT
"""
import argparse
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402


def _load_module():
    try:
        from jax_tokenweave.kernels import paged_attention as pa
        return pa
    except Exception:  # the package may not import here: load the file itself
        path = ROOT / "jax_tokenweave" / "kernels" / "paged_attention.py"
        spec = importlib.util.spec_from_file_location("paged_attention", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


pa = _load_module()

L_LAYERS = 8          # layers of the timing pools (the loop reads layer i % L: L2 cannot hold them)
H, KVH, HD = 32, 8, 128
DT = jnp.bfloat16
INNER = 32            # dependent calls per timed jit
REPS = 20
# --smoke (CPU, interpret mode): tiny shapes, to check the script itself
BATCHES, CONTEXTS, PAGE_SIZES = (1, 8, 32), (512, 2048, 8192), (16, 64, 32)
CHECK_LENGTHS_EXTRA = (1000, 3001, 37)
RAGGED_PREFILL, RAGGED_CTX, RAGGED_DECODE = 512, 1024, 31
# (f): (query tokens, prefix tokens) of one chunk: (e)'s chunk first, then the corners, then the
# rest, so that a run cut short by the deadline still spans the range
CHUNK_CASES = ((512, 1024), (2048, 0), (256, 4096), (2048, 4096), (256, 0), (512, 0),
               (256, 1024), (2048, 1024), (512, 4096))
CHUNK_VARIANTS = ("pad", "mask", "lse")
CUDNN_IMPL = "cudnn"  # "xla" under --smoke (CPU): the same code through XLA's attention
CHUNK_TOL = 2e-2      # rel. Frobenius error vs the reference for a variant to count as correct
CHUNK_BUDGET_S = 90.0  # most seconds (f) may take of --budget-s
SMOKE = False
# decode variants per page size. Measured on the H200 (bench/results/paged_attention_h200.json):
# run 1 timed gathered multi-page tiles (bk64/bk128), run 2 per-page loads (u*) against them;
# u64 (the default) was best or within noise at the sizes that matter, u128/s3/u16 no better,
# and a full sweep of all of them does not fit one 300 s call (Triton compiles the unrolled
# steps in ~4 s each), so the sweep below is the default against its alternatives only.
ALL_VARIANTS = {
    "g64": dict(block_k=64, kv_gather=True), "u16": dict(block_k=16, kv_gather=False),
    "u64": dict(block_k=64, kv_gather=False), "u128": dict(block_k=128, kv_gather=False),
    "u64s3": dict(block_k=64, kv_gather=False, num_stages=3),
    "u128s3": dict(block_k=128, kv_gather=False, num_stages=3),
    "u64w8": dict(block_k=64, kv_gather=False, num_warps=8),
}
VARIANTS_BY_PS = {16: ["u64", "g64"], 64: ["u64", "u128"], 32: ["u64"]}


def log(*a):
    print(*a, flush=True)


def median_time(fn, *args, reps=REPS, warmup=2):
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def normal_pool(key, shape, dtype):
    """[L, ...] normal draws, one per layer (keeps each draw under 2**31 elements)."""
    keys = jax.random.split(key, shape[0])
    return jax.jit(jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype)))(keys)


def block_tables_for(rng, batch, pages_per_seq, num_pages):
    perm = rng.permutation(np.arange(1, num_pages))[: batch * pages_per_seq]
    return jnp.asarray(perm.reshape(batch, pages_per_seq).astype(np.int32))


def errs(out, ref):
    o = np.asarray(out.astype(jnp.float32))
    r = np.asarray(ref.astype(jnp.float32))
    return dict(max_abs_err=float(np.abs(o - r).max()),
                rel_fro_err=float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)),
                finite=bool(np.isfinite(o).all()))


# ---------------------------------------------------------------------------------------------


def section_check(res):
    rng = np.random.default_rng(0)
    key = jax.random.key(1)
    out = []
    for ps, dtype, kw in [(16, jnp.bfloat16, {}), (16, jnp.bfloat16, dict(pages_per_split=2)),
                          (16, jnp.bfloat16, dict(kv_gather=True)), (64, jnp.bfloat16, {}),
                          (32, jnp.bfloat16, {}), (16, jnp.float32, {}), (8, jnp.bfloat16, {})]:
        lengths = np.array([1, ps - 1, ps, ps + 1, 2 * ps, *CHECK_LENGTHS_EXTRA], np.int32)
        mp = int(-(-lengths.max() // ps))
        P = len(lengths) * mp + 1
        k1, k2, k3, key = jax.random.split(key, 4)
        kp = normal_pool(k1, (3, KVH, P, ps, HD), dtype)
        vp = normal_pool(k2, (3, KVH, P, ps, HD), dtype)
        q = jax.random.normal(k3, (len(lengths), H, HD), dtype)
        bt = block_tables_for(rng, len(lengths), mp, P)
        ln = jnp.asarray(lengths)
        o = pa.paged_decode_attention(q, kp, vp, bt, ln, 2, **kw)
        r = pa.paged_attention_reference(q, kp, vp, bt, ln, 2)
        e = dict(kernel="decode", page_size=ps, dtype=str(jnp.dtype(dtype)), kw=kw, **errs(o, r))
        log("check", e)
        out.append(e)
    # ragged: decode rows, prefill with / without context, chunks across pages, padding rows
    for ps in (16, 64):
        q_lens = [1, 300, 1, 77, 1, 130, 0, 0]
        ctx = [900, 300, 17, 77 + 1000, 64, 130 + 33, 0, 0]
        ns = 6
        qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        T = int(qs[-1]) + 11
        need = [-(-c // ps) for c in ctx]
        mp = max(need)
        P = sum(need) + 1
        k1, k2, k3, key = jax.random.split(key, 4)
        kp = normal_pool(k1, (2, KVH, P, ps, HD), DT)
        vp = normal_pool(k2, (2, KVH, P, ps, HD), DT)
        q = jax.random.normal(k3, (T, H, HD), DT)
        bt = np.zeros((len(q_lens), mp), np.int32)
        perm = rng.permutation(np.arange(1, P))
        at = 0
        for s, n in enumerate(need):
            bt[s, :n] = perm[at:at + n]
            at += n
        bt = jnp.asarray(bt)
        args = (q, kp, vp, bt, jnp.asarray(ctx, jnp.int32), jnp.asarray(qs), jnp.int32(ns), 1)
        for kw in ({}, dict(kv_gather=True)) if ps == 16 else ({},):
            o = pa.ragged_paged_attention(*args, **kw)
            r = pa.paged_attention_reference(q, kp, vp, bt, jnp.asarray(ctx, jnp.int32), 1,
                                             query_start=jnp.asarray(qs), num_seqs=ns)
            e = dict(kernel="ragged", page_size=ps, dtype="bfloat16", kw=kw, **errs(o, r),
                     padding_rows_zero=bool(np.all(np.asarray(o[int(qs[ns]):]) == 0)))
            log("check", e)
            out.append(e)
    res["check"] = out


def section_bandwidth(res):
    """x * 1.0001 over 1 GiB of f32, timed like the kernels: INNER dependent steps in one jit
    (a single synchronous call also counts ~50 us of dispatch: run 1 read 2.9 TB/s that way)."""
    n = (1 << 28) if not SMOKE else (1 << 16)
    x = jnp.ones((n,), jnp.float32) * 1.5
    one = jax.jit(lambda x: x * 1.0001)
    med1, _ = median_time(one, x)
    loop = jax.jit(lambda x: lax.fori_loop(0, INNER, lambda i, x: x * 1.0001, x))
    med, best = median_time(loop, x)
    bw = 2 * n * 4 / (med / INNER)
    res["bandwidth"] = dict(bytes_per_step=2 * n * 4, step_median_s=med / INNER,
                            bytes_per_s=bw, single_call_bytes_per_s=2 * n * 4 / med1,
                            method=f"x * 1.0001, 1 GiB f32, {INNER} dependent steps in one jit")
    log(f"copy bandwidth: {bw / 1e12:.3f} TB/s in a loop; one synchronous call: "
        f"{2 * n * 4 / med1 / 1e12:.3f} TB/s")
    return bw


def _decode_loop(kw):
    def run(q, kp, vp, bt, ln):
        def body(i, q):
            return pa.paged_decode_attention(q, kp, vp, bt, ln, i % L_LAYERS, **kw)
        return lax.fori_loop(0, INNER, body, q)
    return jax.jit(run)


def section_decode(res, bw, deadline, page_sizes):
    rng = np.random.default_rng(1)
    key = jax.random.key(2)
    rows = res.setdefault("decode", [])
    max_tokens = max(BATCHES) * max(CONTEXTS)
    for ps in page_sizes:
        P = max_tokens // ps + 1
        k1, k2, key = jax.random.split(key, 3)
        kp = normal_pool(k1, (L_LAYERS, KVH, P, ps, HD), DT)
        vp = normal_pool(k2, (L_LAYERS, KVH, P, ps, HD), DT)
        jax.block_until_ready((kp, vp))
        configs = [(b, c, c) for b in BATCHES for c in CONTEXTS]
        # the engine's case (DESIGN.md section 9): capacity 8192, ~560 valid
        cap = max(CONTEXTS)
        configs.append((BATCHES[min(1, len(BATCHES) - 1)], cap, 560 if cap == 8192 else cap // 3))
        for batch, cap, valid in configs:
            bt = block_tables_for(rng, batch, cap // ps, P)
            ln = jnp.full((batch,), valid, jnp.int32)
            q = jax.random.normal(jax.random.key(batch * cap), (batch, H, HD), DT)
            kv_bytes = batch * valid * KVH * HD * 2 * 2
            for name in VARIANTS_BY_PS[ps]:
                kw = ALL_VARIANTS[name]
                if time.time() > deadline:
                    log("deadline: skipping", ps, batch, cap, name)
                    continue
                row = dict(page_size=ps, batch=batch, capacity=cap, valid=valid, variant=name,
                           kw=kw, num_splits=pa.decode_num_splits(batch, KVH, cap // ps, ps),
                           kv_bytes=kv_bytes)
                try:
                    f = _decode_loop(kw)
                    med, best = median_time(f, q, kp, vp, bt, ln)
                    t = med / INNER
                    roof = kv_bytes / bw
                    row.update(us=t * 1e6, min_us=best / INNER * 1e6, roofline_us=roof * 1e6,
                               ratio_to_roofline=t / roof, achieved_TBps=kv_bytes / t / 1e12)
                except Exception as e:  # keep going: one failing variant must not end the run
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc()
                log("decode", {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in row.items()})
                rows.append(row)
        del kp, vp


def section_cudnn(res, bw, deadline):
    rows = []
    res["cudnn"] = rows
    for batch in BATCHES:
        for ctx in CONTEXTS:
            if time.time() > deadline:
                log("deadline: skipping cudnn", batch, ctx)
                continue
            k1, k2, k3 = jax.random.split(jax.random.key(batch + ctx), 3)
            k = jax.random.normal(k1, (batch, ctx, KVH, HD), DT)
            v = jax.random.normal(k2, (batch, ctx, KVH, HD), DT)
            q = jax.random.normal(k3, (batch, H, HD), DT)
            kv_bytes = batch * ctx * KVH * HD * 2 * 2
            row = dict(batch=batch, context=ctx, kv_bytes=kv_bytes)

            def run(q, k, v):
                def body(i, q):
                    o = jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")
                    return o[:, 0]
                return lax.fori_loop(0, INNER, body, q)

            try:
                med, best = median_time(jax.jit(run), q, k, v)
                t = med / INNER
                row.update(us=t * 1e6, roofline_us=kv_bytes / bw * 1e6,
                           ratio_to_roofline=t / (kv_bytes / bw))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            log("cudnn", row)
            rows.append(row)
            del k, v


def section_ragged(res, bw, deadline):
    rows = []
    res["ragged"] = rows
    ps = 16
    q_lens = [RAGGED_PREFILL] + [1] * RAGGED_DECODE
    ctx = [RAGGED_CTX + RAGGED_PREFILL] + [RAGGED_CTX] * RAGGED_DECODE
    qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(qs[-1]) + 1  # 543 rows + 1 padding row
    need = [c // ps for c in ctx]
    P = sum(need) + 1
    rng = np.random.default_rng(3)
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    kp = normal_pool(k1, (L_LAYERS, KVH, P, ps, HD), DT)
    vp = normal_pool(k2, (L_LAYERS, KVH, P, ps, HD), DT)
    q = jax.random.normal(k3, (T, H, HD), DT)
    bt = np.zeros((len(q_lens), max(need)), np.int32)
    perm = rng.permutation(np.arange(1, P))
    at = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[at:at + n]
        at += n
    bt = jnp.asarray(bt)
    ctx_a, qs_a = jnp.asarray(ctx, jnp.int32), jnp.asarray(qs)
    kv_bytes = sum(ctx) * KVH * HD * 2 * 2
    # causal attention FLOPs: 4 * hd per (query head, visible key)
    visible = sum(sum(c - ql + j + 1 for j in range(ql)) for ql, c in zip(q_lens, ctx))
    flops = 4 * HD * H * visible
    for name, kw in (("default", {}), ("gather_bk64", dict(kv_gather=True)),
                     ("bq32", dict(block_q=32))):
        if time.time() > deadline:
            log("deadline: skipping ragged", name)
            continue
        row = dict(variant=name, kw=kw, rows=T, kv_bytes=kv_bytes, flops=flops)

        def run(q, kp, vp, bt, ctx_a, qs_a):
            def body(i, q):
                return pa.ragged_paged_attention(q, kp, vp, bt, ctx_a, qs_a,
                                                 jnp.int32(len(q_lens)),
                                                 i % L_LAYERS, **kw)
            return lax.fori_loop(0, INNER, body, q)

        try:
            med, best = median_time(jax.jit(run), q, kp, vp, bt, ctx_a, qs_a)
            t = med / INNER
            row.update(us=t * 1e6, kv_roofline_us=kv_bytes / bw * 1e6,
                       ratio_to_kv_roofline=t / (kv_bytes / bw), TFLOPs=flops / t / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        log("ragged", row)
        rows.append(row)


def gather_dense(kp, vp, bt, layer, ctx):
    """Sequence 0's K/V of `layer` (int or traced) from the pools, as dense [1, ctx, KVH, hd]
    (cuDNN's BTNH layout): what the engine would have to build to hand a chunk to cuDNN."""
    def one(pool):
        x = pool[layer][:, bt[0]]                                  # [KVH, pages, ps, hd]
        return x.reshape(x.shape[0], -1, x.shape[-1])[:, :ctx].transpose(1, 0, 2)[None]
    return one(kp), one(vp)


def chunk_attention(variant, q, k, v):
    """Causal attention of a chunk's queries q [1, n, H, hd], the LAST n of the ctx positions of
    k/v [1, ctx, KVH, hd]: query i sees keys <= P + i, P = ctx - n (bottom-right diagonal)."""
    dpa = functools.partial(jax.nn.dot_product_attention, implementation=CUDNN_IMPL)
    n = q.shape[1]
    P = k.shape[1] - n
    if variant == "causal":   # is_causal as is: right only if the diagonal is bottom-right aligned
        return dpa(q, k, v, is_causal=True)
    if variant == "pad":      # top-left causal over P zero queries + the chunk (the engine's way)
        qp = jnp.concatenate([jnp.zeros((1, P) + q.shape[2:], q.dtype), q], axis=1)
        return dpa(qp, k, v, is_causal=True)[:, P:]
    if variant == "mask":     # bottom-right as a mask; cuDNN takes it as a bias, computes all tiles
        mask = jnp.arange(P + n)[None, :] <= P + jnp.arange(n)[:, None]
        return dpa(q, k, v, mask=mask[None, None])
    if variant == "lse":      # prefix unmasked + own keys (square: alignment moot), merged by LSE
        o1, l1 = dpa(q, k[:, P:], v[:, P:], is_causal=True, return_residual=True)
        if P == 0:
            return o1
        o0, l0 = dpa(q, k[:, :P], v[:, :P], return_residual=True)
        l0, l1 = l0.astype(jnp.float32), l1.astype(jnp.float32)   # [1, n, H]; jax hands them in q's dtype
        m = jnp.maximum(l0, l1)
        w0, w1 = jnp.exp(l0 - m)[..., None], jnp.exp(l1 - m)[..., None]
        return ((o0 * w0 + o1 * w1) / (w0 + w1)).astype(q.dtype)
    raise ValueError(variant)


def _timed_loop(body):
    """jit of INNER dependent calls: q_{i+1} = body(i, q_i, *args) (the layer is i % L_LAYERS)."""
    return jax.jit(lambda q, *args: lax.fori_loop(0, INNER, lambda i, q: body(i, q, *args), q))


def section_chunk(res, deadline):
    """(f): one prefill chunk, the ragged kernel vs cuDNN on gathered pages (module doc)."""
    rows = res.setdefault("chunk", [])
    for case, (n, prefix) in enumerate(CHUNK_CASES):
        if time.time() > deadline:
            log("deadline: skipping chunk", n, prefix)
            continue
        try:
            chunk_case(res, rows, case, n, prefix, deadline)
        except Exception as ex:  # e.g. the reference out of memory: the next case may still run
            rows.append(dict(q_len=n, prefix=prefix, method="setup", gather=False,
                             error=f"{type(ex).__name__}: {ex}"[:2000]))
            traceback.print_exc()


def chunk_case(res, rows, case, n, prefix, deadline):
    """One chunk of n queries on a prefix of `prefix` tokens: one sequence's pages (random
    order) in pools of L_LAYERS layers, read at layer i % L_LAYERS like the other sections."""
    ps = 16
    rng = np.random.default_rng(5 + case)
    ctx = prefix + n
    n_pages = -(-ctx // ps)
    k1, k2, k3 = jax.random.split(jax.random.key(100 + case), 3)
    kp = normal_pool(k1, (L_LAYERS, KVH, n_pages + 1, ps, HD), DT)
    vp = normal_pool(k2, (L_LAYERS, KVH, n_pages + 1, ps, HD), DT)
    q = jax.random.normal(k3, (n, H, HD), DT)
    bt = jnp.asarray(rng.permutation(np.arange(1, n_pages + 1))[None].astype(np.int32))
    ctx_a, qs_a = jnp.asarray([ctx], jnp.int32), jnp.asarray([0, n], jnp.int32)
    flops = 4 * HD * H * (n * prefix + n * (n + 1) // 2)  # 4 * hd per (query head, visible key)
    base = dict(q_len=n, prefix=prefix, context=ctx, page_size=ps, flops=flops)
    ref = pa.paged_attention_reference(q, kp, vp, bt, ctx_a, 0, query_start=qs_a, num_seqs=1)
    k0, v0 = jax.jit(gather_dense, static_argnums=(3, 4))(kp, vp, bt, 0, ctx)

    def add(method, gather, f, *args, check=None):
        if time.time() > deadline:
            log("deadline: skipping chunk", n, prefix, method, gather)
            return None
        row = dict(base, method=method, gather=gather)
        try:
            if check is not None:
                e = errs(check(), ref)
                row.update(e, ok=e["finite"] and e["rel_fro_err"] < CHUNK_TOL)
            med, best = median_time(f, *args)
            t = med / INNER
            row.update(us=t * 1e6, min_us=best / INNER * 1e6, TFLOPs=flops / t / 1e12)
        except Exception as ex:  # one failing method must not end the section
            row["error"] = f"{type(ex).__name__}: {ex}"[:2000]
            traceback.print_exc()
        log("chunk", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        rows.append(row)
        return row

    # the ragged kernel on the chunk alone (no decode rows), reading the pools in place
    ragged = _timed_loop(lambda i, q, kp, vp, bt, c, s: pa.ragged_paged_attention(
        q, kp, vp, bt, c, s, jnp.int32(1), i % L_LAYERS))
    add("ragged", False, ragged, q, kp, vp, bt, ctx_a, qs_a,
        check=(lambda: pa.ragged_paged_attention(q, kp, vp, bt, ctx_a, qs_a, jnp.int32(1), 0))
        if case == 0 else None)   # section (a) checks the kernel; once here for this layout
    if prefix > 0 and "chunk_causal_alignment" not in res:
        try:
            res["chunk_causal_alignment"] = causal_alignment(q, k0, v0, ref)
        except Exception as ex:
            res["chunk_causal_alignment"] = dict(error=f"{type(ex).__name__}: {ex}"[:2000])
            traceback.print_exc()
        log("chunk: is_causal alignment", res["chunk_causal_alignment"])
    # cuDNN on K/V already dense (the gather not counted) ...
    timed = []
    for variant in CHUNK_VARIANTS:
        f = _timed_loop(lambda i, q, k, v, variant=variant: chunk_attention(variant, q, k, v))
        one = jax.jit(functools.partial(chunk_attention, variant))
        r = add(f"cudnn_{variant}", False, f, q[None], k0, v0,
                check=lambda one=one: one(q[None], k0, v0)[0])
        if r and r.get("ok") and "us" in r:
            timed.append((r["us"], variant))
    # ... and the fastest correct variant with the gather from the pools inside the loop
    if timed:
        variant = min(timed)[1]
        f = _timed_loop(lambda i, q, kp, vp, bt: chunk_attention(
            variant, q, *gather_dense(kp, vp, bt, i % L_LAYERS, ctx)))
        add(f"cudnn_{variant}", True, f, q[None], kp, vp, bt)


def causal_alignment(q, k, v, ref) -> dict:
    """Which diagonal jax's is_causal=True uses when the queries are fewer than the keys."""
    out = jax.jit(functools.partial(chunk_attention, "causal"))(q[None], k, v)[0]

    @jax.jit
    def top_left(q, k, v):   # fp32 XLA attention, query i over keys <= i
        f32 = [x.astype(jnp.float32) for x in (q[None], k, v)]
        mask = jnp.arange(k.shape[1])[None, :] <= jnp.arange(q.shape[0])[:, None]
        return jax.nn.dot_product_attention(*f32, mask=mask[None, None], implementation="xla")[0]
    tl = top_left(q, k, v)
    e_br, e_tl = errs(out, ref)["rel_fro_err"], errs(out, tl)["rel_fro_err"]
    which = "bottom-right" if e_br < CHUNK_TOL else "top-left" if e_tl < CHUNK_TOL else "neither"
    return dict(alignment=which, rel_err_vs_bottom_right=e_br, rel_err_vs_top_left=e_tl,
                implementation=CUDNN_IMPL)


def chunk_table(res) -> list[str]:
    """(f) as one line per chunk: each method's us (x: wrong result, -: not run), then the
    fastest correct cuDNN variant with the gather counted against the ragged kernel."""
    rows = res.get("chunk", [])
    if not rows:
        return []
    methods = ["ragged"] + [f"cudnn_{v}" for v in CHUNK_VARIANTS]
    lines = ["chunk alone (us per call; cudnn_* on K/V already dense; +gather: the fastest correct "
             "one gathering from the pages; ratio = ragged / that)",
             f"{'q':>5} {'prefix':>6} " + " ".join(f"{m:>11}" for m in methods)
             + f" {'+gather':>17} {'ratio':>6}"]
    for n, prefix in sorted(CHUNK_CASES):
        mine = [r for r in rows if r["q_len"] == n and r["prefix"] == prefix]
        if not mine:
            continue

        def us(r):
            if r is None or "us" not in r:
                return "ERR" if r is not None else "-"
            return f"{r['us']:.1f}" + ("" if r.get("ok", True) else "x")
        cells = [us(next((r for r in mine if r["method"] == m and not r["gather"]), None)) for m in methods]
        g = next((r for r in mine if r["gather"]), None)
        rg = next((r for r in mine if r["method"] == "ragged"), None)
        gcell = f"{g['method'][6:]} {g['us']:.1f}" if g and "us" in g else "-"
        ratio = f"{rg['us'] / g['us']:.2f}" if g and "us" in g and rg and "us" in rg else "-"
        lines.append(f"{n:>5} {prefix:>6} " + " ".join(f"{c:>11}" for c in cells) + f" {gcell:>17} {ratio:>6}")
    a = res.get("chunk_causal_alignment")
    if a and "error" in a:
        lines.append(f"is_causal alignment probe: ERROR {a['error'][:80]}")
    elif a:
        lines.append(f"is_causal with fewer queries than keys ({a['implementation']}): {a['alignment']} aligned "
                     f"(rel err {a['rel_err_vs_bottom_right']:.1e} vs bottom-right, "
                     f"{a['rel_err_vs_top_left']:.1e} vs top-left)")
    return lines


def table(res):
    lines = ["", "decode (us per call, one layer; ratio = time / valid-KV roofline)"]
    lines.append(f"{'ps':>3} {'B':>3} {'cap':>5} {'valid':>5} {'variant':>10} {'ns':>3} "
                 f"{'us':>8} {'roof':>7} {'ratio':>6}")
    for r in res.get("decode", []):
        if "us" in r:
            lines.append(f"{r['page_size']:>3} {r['batch']:>3} {r['capacity']:>5} {r['valid']:>5} "
                         f"{r['variant']:>10} {r['num_splits']:>3} {r['us']:>8.1f} "
                         f"{r['roofline_us']:>7.1f} {r['ratio_to_roofline']:>6.2f}")
        else:
            lines.append(f"{r['page_size']:>3} {r['batch']:>3} {r['capacity']:>5} "
                         f"{r['variant']:>10} ERROR {r.get('error', '')[:80]}")
    lines.append("cudnn dense (us per call)")
    for r in res.get("cudnn", []):
        lines.append(f"  B={r['batch']:>2} ctx={r['context']:>5}: "
                     + (f"{r['us']:.1f} us, ratio {r['ratio_to_roofline']:.2f}" if "us" in r
                        else "ERROR " + r.get("error", "")[:80]))
    lines.append("ragged (512-token chunk on 1024 context + 31 decode rows)")
    for r in res.get("ragged", []):
        lines.append(f"  {r['variant']}: " + (
            f"{r['us']:.1f} us, KV-roofline ratio {r['ratio_to_kv_roofline']:.2f}, "
            f"{r['TFLOPs']:.0f} TFLOP/s" if "us" in r else "ERROR " + r.get("error", "")[:80]))
    lines += chunk_table(res)
    for c in res.get("check", []):
        lines.append(f"check {c['kernel']} ps={c['page_size']} {c['dtype']} {c['kw']}: "
                     f"max|err| {c['max_abs_err']:.2e} rel {c['rel_fro_err']:.2e}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=250.0,
                    help="stop starting new timings after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpret mode)")
    ap.add_argument("--sections", default="check,bandwidth,decode,cudnn,ragged,chunk",
                    help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    if args.smoke:
        global L_LAYERS, INNER, REPS, BATCHES, CONTEXTS, PAGE_SIZES, CHECK_LENGTHS_EXTRA
        global RAGGED_PREFILL, RAGGED_CTX, RAGGED_DECODE, H, KVH, SMOKE, CHUNK_CASES, CUDNN_IMPL
        SMOKE = True
        CHUNK_CASES, CUDNN_IMPL = ((24, 16), (16, 0), (8, 37)), "xla"   # 37: ctx not a page multiple
        L_LAYERS, INNER, REPS, H, KVH = 2, 2, 2, 8, 2
        BATCHES, CONTEXTS, PAGE_SIZES = (1, 2), (32, 64), (16, 32)
        VARIANTS_BY_PS.update({16: ["u64", "g64"], 32: ["u64s3"]})
        CHECK_LENGTHS_EXTRA = (40,)
        RAGGED_PREFILL, RAGGED_CTX, RAGGED_DECODE = 24, 16, 3
    t_start = time.time()
    deadline = t_start + args.budget_s
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "paged_attention_h200.json"
    dev = jax.devices()[0]
    res = dict(meta=dict(jax=jax.__version__, device=str(getattr(dev, "device_kind", dev)),
                         backend=jax.default_backend(), python=platform.python_version(),
                         shape=dict(q_heads=H, kv_heads=KVH, head_dim=HD, dtype="bfloat16",
                                    layers_in_pool=L_LAYERS),
                         timing=f"median of {REPS} runs of a jit of {INNER} dependent calls "
                                "(lax.fori_loop), divided by {INNER}".replace("{INNER}",
                                                                                str(INNER))))

    def save():
        res["meta"]["elapsed_s"] = time.time() - t_start
        path.write_text(json.dumps(res, indent=1))

    bw = 3.9e12
    # (e) and (f) before the decode sweeps: their rows are the new ones, and the decode rows the
    # deadline may cut short were measured before (bench/results); (f) gets at most
    # CHUNK_BUDGET_S of the budget, so the page-16 sweep keeps about the time it had.
    sections = [("check", lambda: section_check(res)),
                ("bandwidth", lambda: section_bandwidth(res)),
                ("ragged", lambda: section_ragged(res, bw, deadline)),
                ("chunk", lambda: section_chunk(res, min(deadline, time.time() + CHUNK_BUDGET_S))),
                ("decode", lambda: section_decode(res, bw, deadline, PAGE_SIZES[:1])),
                ("cudnn", lambda: section_cudnn(res, bw, deadline))]
    if len(PAGE_SIZES) > 1:
        sections.append(("decode", lambda: section_decode(res, bw, deadline, PAGE_SIZES[1:])))
    wanted = set(args.sections.split(","))
    for name, fn in sections:
        if name not in wanted:
            continue
        t0 = time.time()
        try:
            r = fn()
            if name == "bandwidth":
                bw = r
        except Exception as e:
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:4000]
            traceback.print_exc()
        log(f"[{name}] {time.time() - t0:.1f} s")
        save()
    log(table(res))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
