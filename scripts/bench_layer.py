#!/usr/bin/env python
"""Per-layer time of the five TP variants (jax_tokenweave/bench/harness.py) over token counts, one run.

    python scripts/bench_layer.py                      # Llama-3.3-70B layer, TP = all GPUs
    python scripts/bench_layer.py --quick --profile    # fewer sizes/iters + a TokenWeave trace PNG

Each measurement runs the model's own forward (weave.schedule.forward: embedding, --layers
layers under lax.scan, final norm; no LM head) on random token ids, one prompt of T tokens (or
--seqs sequences of T/seqs), with random bf16 weights of a --layers-deep model in the runtime
layout (harness.random_weights, created sharded); the variants differ only in the reduction
they pass in and whether the batch is split. Median of --iters calls, reported per layer (the
embedding lookup and its reduction are counted in; they are one gather and one reduction of
2L+1). Writes <out>/bench_layer.{json,md,png} (+ profile_tokenweave.png and the trace with
--profile). Ratios: baseline/variant (>1 = faster than XLA's native path) and tokenweave/nocomm.
"""
import os

import argparse
import dataclasses
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.3-70b", help="preset name (models/config.py)")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all devices)")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--seqs", type=int, default=1, help="sequences per batch (1: one long prompt)")
    ap.add_argument("--variants", default="baseline,xla_split,fused,tokenweave,nocomm")
    ap.add_argument("--impl", default=None, help="fused impl (default p2p on GPU, xla elsewhere)")
    ap.add_argument("--attn", default=None, help="attention: cudnn|xla (default cudnn on GPU)")
    ap.add_argument("--layers", type=int, default=4, help="layers per measured call")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tile", type=int, default=None, help="override the table's split tile")
    ap.add_argument("--offset", type=int, default=None, help="override the table's split offset")
    ap.add_argument("--comm-ctas", type=int, default=None, help="override the table's CTAs per overlapped collective")
    ap.add_argument("--quick", action="store_true", help="tokens 2048,8192; 5 iters")
    ap.add_argument("--profile", action="store_true", help="trace one TokenWeave run + PNG")
    ap.add_argument("--profile-tokens", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true", help="tiny-llama shapes (CPU smoke test)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.iters, a.warmup = "2048,8192", 5, 2
    return a


def main(argv=None):
    a = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave import weave
    from jax_tokenweave.parallel.mesh import make_mesh
    from jax_tokenweave.models import get_preset

    cfg = get_preset("tiny-llama" if a.tiny else a.model)
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    attn = a.attn or ("cudnn" if on_gpu else "xla")
    tokens = [int(t) for t in a.tokens.split(",")]
    comm = bench.make_comm(mesh, impl, max(tokens), cfg.hidden_size)
    split = weave.config_for(cfg, tp)
    if a.tile is not None or a.offset is not None:
        split = dataclasses.replace(split, tile=a.tile or split.tile,
                                    offset=split.offset if a.offset is None else a.offset, offsets=())
    if a.comm_ctas is not None:
        split = dataclasses.replace(split, comm_ctas=a.comm_ctas)
    dtype = jnp.float32 if a.tiny and not on_gpu else jnp.bfloat16
    w = bench.random_weights(cfg, mesh, num_layers=a.layers, dtype=dtype)
    variants = a.variants.split(",")
    info = bench.run_info(argv if argv is not None else sys.argv)
    info.update(model=a.model if not a.tiny else "tiny-llama", tp=tp, impl=impl, attn=attn,
                layers_per_call=a.layers, seqs=a.seqs, split=split.to_dict(), dtype=str(dtype))
    print(f"# {info['device']} x{tp}, jax {info['jax']}, impl={impl}, attn={attn}", flush=True)
    results = {v: {} for v in variants}
    plans = {}
    for T in tokens:
        p = bench.token_ids(mesh, a.seqs, T // a.seqs, cfg.vocab_size, seed=T)
        outs = {}
        for v in variants:
            fn, plan = bench.layer_stack_fn(v, cfg, mesh, tokens=T, batch=a.seqs, impl=impl,
                                            comm=comm, attn_impl=attn, split=split)
            if plan is not None:
                plans[T] = dict(kind=plan.kind, tokens=plan.tokens)
            try:
                r = bench.time_fn(fn, w, p, iters=a.iters, warmup=a.warmup)
            except Exception as e:  # keep the other variants' numbers
                print(f"T={T} {v}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                results[v][T] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                continue
            r["per_layer_us"] = r["median_us"] / a.layers
            results[v][T] = r
            outs[v] = np.asarray(jax.device_get(fn(w, p)), np.float32)
            print(f"T={T:6d} {v:10s} {r['per_layer_us']:10.1f} us/layer", flush=True)
        if "fused" in outs:  # sanity: the correct variants agree (bf16 tolerance on GPU)
            for v in ("baseline", "xla_split", "tokenweave"):
                if v in outs:
                    results[v][T]["max_abs_diff_vs_fused"] = float(np.abs(outs[v] - outs["fused"]).max())

    def per(v, T):
        return results.get(v, {}).get(T, {}).get("per_layer_us")

    ratios = {}
    for T in tokens:
        b = per("baseline", T)
        ratios[T] = {f"baseline/{v}": (b / per(v, T) if b and per(v, T) else None) for v in variants}
        tw, nc = per("tokenweave", T), per("nocomm", T)
        ratios[T]["tokenweave/nocomm"] = tw / nc if tw and nc else None
    os.makedirs(a.out, exist_ok=True)
    out = dict(info=info, split_plans=plans, results=results, ratios=ratios)
    if a.profile:
        out["profile"] = profile(a, cfg, mesh, w, impl, comm, attn, split)
    bench.write_json(os.path.join(a.out, "bench_layer.json"), out)
    bench.plot_lines(os.path.join(a.out, "bench_layer.png"), tokens,
                     {v: [per(v, T) for T in tokens] for v in variants},
                     xlabel="tokens", ylabel="µs per layer",
                     title=f"{info['model']} layer, TP{tp}, {info['device']} (impl={impl}, attn={attn})")
    write_md(os.path.join(a.out, "bench_layer.md"), info, tokens, variants, per, ratios)
    print(open(os.path.join(a.out, "bench_layer.md")).read())
    return out


def profile(a, cfg, mesh, w, impl, comm, attn, split):
    import jax
    from jax_tokenweave.bench import harness as bench
    T = a.profile_tokens if not a.tiny else min(a.profile_tokens, 64)
    fn, _ = bench.layer_stack_fn("tokenweave", cfg, mesh, tokens=T, batch=a.seqs, impl=impl,
                                 comm=comm, attn_impl=attn, split=split)
    p = bench.token_ids(mesh, a.seqs, T // a.seqs, cfg.vocab_size, seed=1)
    jax.block_until_ready(fn(w, p))
    log_dir = os.path.join(a.out, "trace_tokenweave")
    with jax.profiler.trace(log_dir):
        for _ in range(3):
            jax.block_until_ready(fn(w, p))
    trace = bench.find_trace(log_dir)
    png = os.path.join(a.out, "profile_tokenweave.png")
    s = bench.trace_timeline(trace, png, device_filter="GPU" if jax.default_backend() == "gpu" else "",
                             title=f"TokenWeave, {T} tokens, {a.layers} layers, TP{mesh.shape['tp']}")
    print(f"profile: {png}; comm/compute kernel overlap {s['comm_compute_overlap_us']:.0f} µs in window",
          flush=True)
    return s


def write_md(path, info, tokens, variants, per, ratios):
    lines = [f"# Layer time: {info['model']}, TP{info['tp']}, {info['device']}",
             "", f"{info['date']} · jax {info['jax']} · impl={info['impl']} · attn={info['attn']} · "
             f"{info['layers_per_call']} layers/call · seqs={info['seqs']} · `{info['command']}`", "",
             "| tokens | " + " | ".join(f"{v} µs" for v in variants) +
             " | baseline/tokenweave | baseline/xla_split | tokenweave/nocomm |",
             "|" + "---|" * (len(variants) + 4)]
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    for T in tokens:
        r = ratios[T]
        lines.append(f"| {T} | " + " | ".join(f(per(v, T)) for v in variants) +
                     f" | {f(r.get('baseline/tokenweave'), 3)} | {f(r.get('baseline/xla_split'), 3)}"
                     f" | {f(r.get('tokenweave/nocomm'), 3)} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
