#!/usr/bin/env python
"""Full-depth model benchmarks of the split schedule (random bf16 weights, created sharded).

    python scripts/bench_model.py                       # Llama-3.3-70B shapes, 80 layers, TP = all GPUs
    python scripts/bench_model.py --quick               # 4K/8K prefill, short chunked/decode runs

Sections (written to <out>/bench_model.{json,md,png}):
  prefill    latency of one prompt of T tokens through --layers layers + final norm (the
             embedding lookup and LM head are left out: a few µs), variants baseline / fused /
             tokenweave / nocomm (bench.py), attention --attn (cudnn on GPU).
  chunked    one --chunked-len prompt prefilled in chunks of --chunk (each chunk attends to the
             cache of the earlier ones; TokenWeave splits each chunk), then --decode-steps decode
             steps of --decode-batch sequences (never split: fused op vs psum); tokens/s.
  attention  one GPU's share of causal prefill attention (heads/TP, kv_heads/TP): cuDNN vs XLA
             vs the Pallas Mosaic GPU kernel (errors are recorded, e.g. its bf16 refusal).
The layers run under lax.scan over stacked weights (one compiled layer body), so the compile
time does not grow with depth.
"""
import os

import argparse
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.3-70b")
    ap.add_argument("--tp", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="default: the model's depth")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--variants", default="baseline,fused,tokenweave,nocomm")
    ap.add_argument("--impl", default=None)
    ap.add_argument("--attn", default=None, help="prefill attention(s), e.g. cudnn or cudnn,xla")
    ap.add_argument("--xla-attn-max", type=int, default=8192, help="largest T for XLA attention")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--chunked-len", type=int, default=8192)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--sections", default="prefill,chunked,attention")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny-llama shapes (CPU smoke test)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.iters, a.warmup, a.decode_steps = "4096,8192", 3, 1, 8
    return a


def main(argv=None):
    a = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave import weave
    from jax_tokenweave.parallel.mesh import make_mesh
    from jax_tokenweave.models import get_preset

    cfg = get_preset("tiny-llama" if a.tiny else a.model)
    L = a.layers or cfg.num_layers
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    attns = (a.attn or ("cudnn" if on_gpu else "xla")).split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    sections = a.sections.split(",")
    variants = a.variants.split(",")
    dtype = jnp.bfloat16 if on_gpu or not a.tiny else jnp.float32
    comm = bench.make_comm(mesh, impl, max(tokens + [a.chunk]), cfg.hidden_size)
    split = weave.config_for(cfg, tp)
    w, wspecs = bench.random_layer(cfg, mesh, dtype=dtype, num_layers=L)
    rep = NamedSharding(mesh, P())
    info = bench.run_info(argv if argv is not None else sys.argv)
    info.update(model="tiny-llama" if a.tiny else a.model, layers=L, tp=tp, impl=impl, attn=attns,
                split=split.to_dict(), dtype=str(dtype))
    print(f"# {info['device']} x{tp}, jax {info['jax']}, impl={impl}, {L} layers", flush=True)
    out = dict(info=info)
    os.makedirs(a.out, exist_ok=True)

    def rand(shape, seed):
        return jax.device_put(0.5 * jax.random.normal(jax.random.key(seed), shape, dtype), rep)

    if "prefill" in sections:
        pre = {}
        for attn in attns:
            for v in variants:
                for T in tokens:
                    if attn == "xla" and on_gpu and T > a.xla_attn_max:
                        continue
                    fn, _ = bench.layer_stack_fn(v, cfg, mesh, wspecs, tokens=T, num_layers=L,
                                                 impl=impl, comm=comm, attn_impl=attn,
                                                 split=split, stacked=True)
                    try:
                        r = bench.time_fn(fn, w, rand((T, cfg.hidden_size), T), iters=a.iters,
                                          warmup=a.warmup)
                    except Exception as e:  # noqa: BLE001
                        r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    pre.setdefault(f"{v}/{attn}", {})[T] = r
                    print(f"prefill T={T:6d} {v:10s} attn={attn:5s} "
                          f"{r.get('median_us', float('nan')) / 1e3:9.2f} ms", flush=True)
        out["prefill"] = pre
        a0 = attns[0]
        ms = lambda v, T: pre.get(f"{v}/{a0}", {}).get(T, {}).get("median_us")  # noqa: E731
        out["prefill_ratios"] = {T: {"baseline/tokenweave": (ms("baseline", T) / ms("tokenweave", T)
                                                             if ms("baseline", T) and ms("tokenweave", T) else None),
                                     "tokenweave/nocomm": (ms("tokenweave", T) / ms("nocomm", T)
                                                           if ms("tokenweave", T) and ms("nocomm", T) else None)}
                                 for T in tokens}
        bench.plot_lines(os.path.join(a.out, "bench_model.png"), tokens,
                         {v: [(ms(v, T) or float("nan")) / 1e3 for T in tokens] for v in variants},
                         xlabel="prompt tokens", ylabel="prefill ms",
                         title=f"{info['model']} {L} layers, TP{tp}, {info['device']} (attn={a0})")

    if "chunked" in sections:
        ch = {}
        n_chunks = max(1, a.chunked_len // a.chunk)
        B = a.decode_batch
        for v in [x for x in ("baseline", "tokenweave") if x in variants or x == "baseline"]:
            try:
                max_len = n_chunks * a.chunk + 1
                cshape = bench.cache_shape(cfg, tp, L, 1, max_len)
                cs = NamedSharding(mesh, P(None, None, None, "tp", None))
                ck = jax.device_put(jnp.zeros(cshape, dtype), cs)
                cv = jax.device_put(jnp.zeros(cshape, dtype), cs)
                fns = [bench.chunk_fn(v, cfg, mesh, wspecs, chunk=a.chunk, offset=i * a.chunk,
                                      num_layers=L, impl=impl, comm=comm, attn_impl=attns[0],
                                      split=split) for i in range(n_chunks)]
                p = rand((a.chunk, cfg.hidden_size), 7)
                import time
                times = []
                for rep_i in range(1 + max(1, a.iters // 2)):   # first pass compiles
                    t = time.perf_counter()
                    for i, f in enumerate(fns):
                        x, ck, cv = f(w, p, ck, cv)
                    jax.block_until_ready(x)
                    times.append(time.perf_counter() - t)
                t_pre = float(np.median(times[1:]))
                del ck, cv
                dshape = bench.cache_shape(cfg, tp, L, B, max_len)
                ck = jax.device_put(jnp.zeros(dshape, dtype), cs)
                cv = jax.device_put(jnp.zeros(dshape, dtype), cs)
                dv = "baseline" if v == "baseline" else "fused"
                df = bench.decode_fn(dv, cfg, mesh, wspecs, batch=B, impl=impl, comm=comm)
                pd = rand((B, cfg.hidden_size), 8)
                lengths = jax.device_put(jnp.full((B,), n_chunks * a.chunk // 2, jnp.int32), rep)
                x, ck, cv = df(w, pd, ck, cv, lengths)
                jax.block_until_ready(x)
                t = time.perf_counter()
                for s in range(a.decode_steps):
                    x, ck, cv = df(w, pd, ck, cv, lengths + s)
                jax.block_until_ready(x)
                t_dec = (time.perf_counter() - t) / a.decode_steps
                del ck, cv
                ch[v] = dict(prefill_s=t_pre, prefill_tok_per_s=n_chunks * a.chunk / t_pre,
                             decode_step_ms=t_dec * 1e3, decode_tok_per_s=B / t_dec,
                             chunks=n_chunks, chunk=a.chunk, decode_batch=B,
                             decode_context=n_chunks * a.chunk // 2)
            except Exception as e:  # noqa: BLE001
                ch[v] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"chunked {v}: {ch[v]}", flush=True)
        out["chunked"] = ch

    if "attention" in sections:
        if on_gpu:
            h, kvh = cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)
            out["attention"] = bench.attention_microbench(tokens, heads=h, kv_heads=kvh,
                                                          head_dim=cfg.head_dim, iters=a.iters)
        else:
            out["attention"] = bench.attention_microbench(tokens[:1], heads=2, kv_heads=1,
                                                          head_dim=cfg.head_dim, iters=2,
                                                          impls=("xla",))
        print("attention µs:", out["attention"], flush=True)

    os.makedirs(a.out, exist_ok=True)
    bench.write_json(os.path.join(a.out, "bench_model.json"), out)
    write_md(os.path.join(a.out, "bench_model.md"), out, tokens, variants)
    print(open(os.path.join(a.out, "bench_model.md")).read())
    return out


def write_md(path, out, tokens, variants):
    info = out["info"]
    f = lambda x, d=2: "—" if not isinstance(x, (int, float)) else f"{x:.{d}f}"  # noqa: E731
    lines = [f"# Model: {info['model']}, {info['layers']} layers, TP{info['tp']}, {info['device']}",
             "", f"{info['date']} · jax {info['jax']} · impl={info['impl']} · `{info['command']}`", ""]
    if "prefill" in out:
        lines += ["## Prefill latency (ms)", "",
                  "| variant/attn | " + " | ".join(str(T) for T in tokens) + " |",
                  "|---|" + "---|" * len(tokens)]
        for k, row in out["prefill"].items():
            lines.append(f"| {k} | " + " | ".join(
                f((row.get(T) or {}).get("median_us", 0) / 1e3 if (row.get(T) or {}).get("median_us") else None)
                for T in tokens) + " |")
        lines += ["", "| ratio | " + " | ".join(str(T) for T in tokens) + " |", "|---|" + "---|" * len(tokens)]
        for r in ("baseline/tokenweave", "tokenweave/nocomm"):
            lines.append(f"| {r} | " + " | ".join(f(out["prefill_ratios"][T][r], 3) for T in tokens) + " |")
    if "chunked" in out:
        lines += ["", "## Chunked prefill + decode", "",
                  "| variant | prefill tok/s | decode step ms | decode tok/s |", "|---|---|---|---|"]
        for v, r in out["chunked"].items():
            lines.append(f"| {v} | {f(r.get('prefill_tok_per_s'), 0)} | {f(r.get('decode_step_ms'))} | "
                         f"{f(r.get('decode_tok_per_s'), 0)} |" if "error" not in r else f"| {v} | {r['error']} | | |")
    if "attention" in out:
        lines += ["", "## Attention, one GPU's share (µs)", ""]
        for T, row in out["attention"].items():
            lines.append(f"- {T} tokens: " + ", ".join(f"{k}={f(v, 0) if isinstance(v, float) else v}"
                                                      for k, v in row.items()))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
