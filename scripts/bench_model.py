#!/usr/bin/env python
"""Full-depth model benchmarks of the split schedule (random bf16 weights in the model's
runtime layout, created sharded).

    python scripts/bench_model.py                       # Llama-3.3-70B shapes, 80 layers, TP = all GPUs
    python scripts/bench_model.py --quick               # 4K/8K prefill, a short decode run

Sections (--sections; written to <out>/bench_model.{json,md,png}):
  prefill    latency of one prompt of T tokens through the model's own forward
             (harness.layer_stack_fn -> weave.schedule.forward: embedding, --layers layers, final
             norm; the LM head is left out), variants baseline / fused / tokenweave / nocomm
             (jax_tokenweave/bench/harness.py: they differ only in the reduction passed in and in
             whether the batch is split), attention --attn (cudnn on GPU).
  decode     TPModel.decode steps (the engine's own decode: paged KV cache, Pallas paged
             attention, never split) of --decode-batch sequences after a --decode-context token
             prompt each; step ms and tokens/s. Only the fused reduction is timed: TPModel always
             runs the fused op, so there is no psum decode column any more. The prompts are
             written into the cache by a second TPModel on the same weights with impl "xla"
             (setup, not timed), so the Communicator stays sized for the prefill section.
  attention  one GPU's share of causal prefill attention (heads/TP, kv_heads/TP): cuDNN vs XLA
             vs the Pallas Mosaic GPU kernel (errors are recorded, e.g. its bf16 refusal).
Chunked prefill (chunks attending to the earlier pages) is not measured here: the continuous
engine's serving benchmark measures it (through engine/attention.py's ``ragged``).
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
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=4096, help="prompt tokens per sequence before decoding")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--sections", default="prefill,decode,attention")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny-llama shapes (CPU smoke test)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.iters, a.warmup, a.decode_steps = "4096,8192", 3, 1, 8
    return a


def main(argv=None):
    a = parse(argv)
    import time
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave import weave
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.parallel.mesh import make_mesh
    from jax_tokenweave.models import get_preset

    cfg = get_preset("tiny-llama" if a.tiny else a.model)
    L = a.layers or cfg.num_layers
    cfg = cfg.replace(num_layers=L)
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    attns = (a.attn or ("cudnn" if on_gpu else "xla")).split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    sections = a.sections.split(",")
    variants = a.variants.split(",")
    dtype = jnp.bfloat16 if on_gpu or not a.tiny else jnp.float32
    comm = bench.make_comm(mesh, impl, max(tokens + [a.decode_batch]), cfg.hidden_size)
    split = weave.config_for(cfg, tp)
    w = bench.random_weights(cfg, mesh, dtype=dtype)
    info = bench.run_info(argv if argv is not None else sys.argv)
    info.update(model="tiny-llama" if a.tiny else a.model, layers=L, tp=tp, impl=impl, attn=attns,
                split=split.to_dict(), dtype=str(dtype))
    print(f"# {info['device']} x{tp}, jax {info['jax']}, impl={impl}, {L} layers", flush=True)
    out = dict(info=info)
    os.makedirs(a.out, exist_ok=True)

    if "prefill" in sections:
        pre = {}
        for attn in attns:
            for v in variants:
                for T in tokens:
                    if attn == "xla" and on_gpu and T > a.xla_attn_max:
                        continue
                    fn, _ = bench.layer_stack_fn(v, cfg, mesh, tokens=T, impl=impl, comm=comm,
                                                 attn_impl=attn, split=split)
                    try:
                        r = bench.time_fn(fn, w, bench.token_ids(mesh, 1, T, cfg.vocab_size, seed=T),
                                          iters=a.iters, warmup=a.warmup)
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

    if "decode" in sections:
        B, ctx = a.decode_batch, a.decode_context
        try:
            model = TPModel(cfg, w, mesh, impl=impl, comm=comm, attn_impl=attns[0])
            filler = model if impl == "xla" else TPModel(cfg, w, mesh, impl="xla", attn_impl=attns[0])
            rng = np.random.default_rng(0)
            prompts = rng.integers(0, cfg.vocab_size, (B, ctx)).astype(np.int32)
            step_ids = rng.integers(0, cfg.vocab_size, (B,)).astype(np.int32)
            cache = filler.init_cache(B, ctx + a.decode_steps + 2)
            _, cache = filler.prefill(prompts, np.full((B,), ctx, np.int32), cache)
            del filler
            logits, cache = model.decode(step_ids, cache)   # compiles
            jax.block_until_ready(logits)
            t = time.perf_counter()
            for _ in range(a.decode_steps):
                logits, cache = model.decode(step_ids, cache, check_capacity=False)
            jax.block_until_ready(logits)
            t_dec = (time.perf_counter() - t) / a.decode_steps
            dec = {"fused": dict(decode_step_ms=t_dec * 1e3, decode_tok_per_s=B / t_dec, decode_batch=B,
                                 decode_context=ctx, decode_steps=a.decode_steps,
                                 logits_finite=bool(np.isfinite(np.asarray(jax.device_get(logits))).all()))}
            del cache, model
        except Exception as e:  # noqa: BLE001
            dec = {"fused": dict(error=f"{type(e).__name__}: {str(e)[:300]}")}
        print(f"decode fused: {dec['fused']}", flush=True)
        out["decode"] = dec

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
    if "decode" in out:
        lines += ["", "## Decode (TPModel.decode, fused reduction only)", "",
                  "| variant | batch | context | decode step ms | decode tok/s |", "|---|---|---|---|---|"]
        for v, r in out["decode"].items():
            lines.append(f"| {v} | {r.get('decode_batch')} | {r.get('decode_context')} | "
                         f"{f(r.get('decode_step_ms'))} | {f(r.get('decode_tok_per_s'), 0)} |"
                         if "error" not in r else f"| {v} | {r['error']} | | | |")
    if "attention" in out:
        lines += ["", "## Attention, one GPU's share (µs)", ""]
        for T, row in out["attention"].items():
            lines.append(f"- {T} tokens: " + ", ".join(f"{k}={f(v, 0) if isinstance(v, float) else v}"
                                                      for k, v in row.items()))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
