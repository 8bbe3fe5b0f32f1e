#!/usr/bin/env python
"""Mixtral (MoE) prefill benchmarks: baseline vs TokenWeave vs no-comm, random bf16 weights in
the model's runtime layout (harness.random_weights, created sharded), experts tensor-parallel
(every expert's FFN split over TP, router replicated). The layer and model sections run the
model's own forward on the Mixtral config (harness.layer_stack_fn -> weave.schedule.forward;
LayerSpec.of(cfg) picks the MoE FFN): the same functions as the dense benchmarks, the variants
differing only in the reduction passed in and in whether the batch is split.

    python scripts/bench_moe.py                         # Mixtral-8x22B shapes, TP = all GPUs
    python scripts/bench_moe.py --quick                 # fewer sizes, fewer iterations
    python scripts/bench_moe.py --tiny --tp 2           # tiny-mixtral on CPU (smoke test)

Sections (--sections; results in <out>/bench_moe.{json,md} and bench_moe_{layer,model}.png):
  moe     the MoE block alone (models.moe.moe_ffn on layer 0's router and expert weights of
          random_weights, one GPU's ffn shard, no collective):
          --moe-impls (ragged = jax.lax.ragged_dot, capacity = [E, C, D] batched matmul with a
          ragged fallback) next to a dense SwiGLU of the same active FLOPs (width k*F/TP). A
          ragged time far above the dense one means XLA lowered ragged_dot densely here;
          `ragged_pallas` is ragged_dot through jax's Pallas Triton grouped-GEMM lowering
          (jax_ragged_dot_use_gpu_pallas_triton_lowering, GPU only; --ragged-lowering pallas
          uses it in the layer/model sections too).
  layer   a --layers-deep model (embedding, layers under lax.scan, final norm; no LM head) on
          one prompt of T random tokens, median per layer; variants baseline (psum + add + RMSNorm, replicated residual), xla_split,
          fused (fused AllReduce+RMSNorm, token-sharded residual), tokenweave (fused + split +
          overlap), nocomm (reductions removed: the ideal). `threshold_estimate`: the smallest
          measured T from which tokenweave beats fused at every larger T (TokenWeave ships 2048
          for Mixtral; ours is this number).
  model   full depth (--model-layers, default the model's 56) prefill of one prompt through the
          embedding, all layers and the final norm (LM head left out), variants as in `layer`
          minus xla_split. Mixtral-8x22B's layers take ~1.2 GB per GPU each at TP4 (bf16).

Split: weave.config_for(model, TP) (tile/offset from weave_table.json); below its threshold the
tokenweave variant is still split (threshold 2) so that every size shows split vs unsplit.
Routing: random router and inputs give roughly balanced experts.
"""
import os

import argparse
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-8x22b", help="preset name (models/config.py)")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all devices)")
    ap.add_argument("--tokens", default="512,1024,1536,2048,3072,4096,8192,16384")
    ap.add_argument("--model-tokens", default="2048,4096,8192,16384")
    ap.add_argument("--sections", default="moe,layer,model")
    ap.add_argument("--variants", default="baseline,xla_split,fused,tokenweave,nocomm")
    ap.add_argument("--moe-impls", default="ragged,capacity",
                    help="grouped matmul(s); the first is used by the layer/model sections")
    ap.add_argument("--ragged-lowering", default="default", choices=("default", "pallas"),
                    help="ragged_dot lowering on GPU for the layer/model sections")
    ap.add_argument("--impl", default=None, help="fused impl (default p2p on GPU, xla elsewhere)")
    ap.add_argument("--attn", default=None, help="attention: cudnn|xla (default cudnn on GPU)")
    ap.add_argument("--layers", type=int, default=4, help="layers per call in the layer section")
    ap.add_argument("--model-layers", type=int, default=None, help="default: the model's depth")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    ap.add_argument("--tiny", action="store_true", help="tiny-mixtral shapes (CPU smoke test)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.model_tokens, a.iters, a.warmup = "1024,2048,4096,8192", "4096,8192", 5, 2
    if a.tiny:
        a.model = "tiny-mixtral"
        if a.tokens == ap.get_default("tokens"):
            a.tokens = "16,32,64"
        if a.model_tokens == ap.get_default("model_tokens"):
            a.model_tokens = "32,64"
    return a


# ----------------------------------------------------------------------------- weights

def ragged_lowering(pallas: bool):
    """Context in which jit lowers ragged_dot with jax's Pallas Triton grouped GEMM (GPU) or
    the default rule; a no-op where this jax has no such flag."""
    import contextlib
    from jax._src import config as jcfg
    flag = getattr(jcfg, "jax_ragged_dot_use_gpu_pallas_triton_lowering", None)
    return flag(pallas) if flag is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------ MoE alone

def moe_alone_fn(cfg, mesh, impl: str, axis="tp"):
    """(jitted fn(ffn weights, x [T, D]) -> per-rank FFN partial [tp, T, D] (no reduction), the
    weight paths it takes): layer 0 of random_weights' ``layers.mlp.*``, through models.moe.moe_ffn
    with grouped-matmul `impl`, or, for impl="dense_equiv" (a dense config), the dense SwiGLU
    (models.layers.dense_ffn)."""
    import jax
    from jax.sharding import PartitionSpec as P
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave.compat import shard_map
    from jax_tokenweave.models.layers import dense_ffn
    from jax_tokenweave.models.moe import moe_ffn
    specs = {k: v for k, v in bench.weight_specs(cfg, mesh, axis).items() if k.startswith("layers.mlp.")}

    def body(w, x):
        lw = {k[len("layers."):]: v[0] for k, v in w.items()}
        if impl == "dense_equiv":
            return dense_ffn(lw, x)[None]
        return moe_ffn(x, lw["mlp.gate.kernel"], lw["mlp.experts.w1"], lw["mlp.experts.w3"],
                       lw["mlp.experts.w2"], k=cfg.num_experts_per_tok, impl=impl)[None]

    fn = shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=P(axis), check_vma=False)
    return jax.jit(fn), tuple(specs)


# -------------------------------------------------------------------------------- main

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

    cfg = get_preset(a.model)
    if not cfg.num_experts:
        raise SystemExit(f"{a.model} is not a mixture-of-experts preset; use scripts/bench_layer.py")
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    cfg.check_tp(tp)
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    attn = a.attn or ("cudnn" if on_gpu else "xla")
    sections = a.sections.split(",")
    variants = a.variants.split(",")
    moe_impls = a.moe_impls.split(",")
    tokens = [int(t) for t in a.tokens.split(",")]
    model_tokens = [int(t) for t in a.model_tokens.split(",")]
    dtype = jnp.float32 if a.tiny and not on_gpu else jnp.bfloat16
    comm = bench.make_comm(mesh, impl, max(tokens + model_tokens), cfg.hidden_size)
    split = weave.config_for(cfg, tp)
    rep = NamedSharding(mesh, P())
    info = bench.run_info(argv if argv is not None else sys.argv)
    info.update(model=a.model, tp=tp, impl=impl, attn=attn, moe_impl=moe_impls[0],
                ragged_lowering=a.ragged_lowering,
                layers_per_call=a.layers, split=split.to_dict(), dtype=jnp.dtype(dtype).name)
    print(f"# {info['device']} x{tp}, jax {info['jax']}, impl={impl}, attn={attn}, "
          f"moe={moe_impls[0]}", flush=True)
    out = dict(info=info)
    os.makedirs(a.out, exist_ok=True)

    def rand(shape, seed):
        return jax.device_put(0.5 * jax.random.normal(jax.random.key(seed), shape, dtype), rep)

    def timed(label, fn, *args, pallas=a.ragged_lowering == "pallas"):
        try:
            with ragged_lowering(pallas):  # compiled on the first call, inside the context
                r = bench.time_fn(fn, *args, iters=a.iters, warmup=a.warmup)
        except Exception as e:  # noqa: BLE001 -- keep the other numbers
            r = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
            print(f"{label}: FAILED {r['error']}", flush=True)
        return r

    if "moe" in sections or "layer" in sections:
        w = bench.random_weights(cfg, mesh, num_layers=a.layers if "layer" in sections else 1, dtype=dtype)
    if "moe" in sections:
        F_active = cfg.num_experts_per_tok * cfg.intermediate_size
        dense_cfg = cfg.replace(model_type="llama", num_experts=0, num_experts_per_tok=0,
                                intermediate_size=F_active)
        wd = bench.random_weights(dense_cfg, mesh, num_layers=1, dtype=dtype)
        res = {}
        for T in tokens:
            x = rand((T, cfg.hidden_size), T)
            for mi in moe_impls + ["ragged_pallas", "dense_equiv"]:
                ww, cc = (wd, dense_cfg) if mi == "dense_equiv" else (w, cfg)
                fn, keys = moe_alone_fn(cc, mesh, "ragged" if mi == "ragged_pallas" else mi)
                r = timed(f"moe T={T} {mi}", fn, {k: ww[k] for k in keys}, x, pallas=mi == "ragged_pallas")
                res.setdefault(mi, {})[T] = r
                if "median_us" in r:
                    print(f"moe   T={T:6d} {mi:12s} {r['median_us']:10.1f} us", flush=True)
        out["moe"] = res
        del wd

    if "layer" in sections:
        res, outs_all = {v: {} for v in variants}, {}
        for T in tokens:
            p, outs = bench.token_ids(mesh, 1, T, cfg.vocab_size, seed=T), {}
            for v in variants:
                fn, plan = bench.layer_stack_fn(v, cfg, mesh, tokens=T, impl=impl, comm=comm,
                                                attn_impl=attn, split=split, moe_impl=moe_impls[0])
                r = timed(f"layer T={T} {v}", fn, w, p)
                if "median_us" in r:
                    r["per_layer_us"] = r["median_us"] / a.layers
                    if plan is not None:
                        r["split"] = dict(kind=plan.kind, tokens=plan.tokens)
                    outs[v] = np.asarray(jax.device_get(fn(w, p)), np.float32)
                    print(f"layer T={T:6d} {v:10s} {r['per_layer_us']:10.1f} us/layer", flush=True)
                res[v][T] = r
            if "fused" in outs:  # sanity: the correct variants agree (bf16 tolerance on GPU)
                for v in ("baseline", "xla_split", "tokenweave"):
                    if v in outs:
                        res[v][T]["max_abs_diff_vs_fused"] = float(np.abs(outs[v] - outs["fused"]).max())
            outs_all[T] = outs
        per = lambda v, T: res.get(v, {}).get(T, {}).get("per_layer_us")  # noqa: E731
        out["layer"] = res
        out["layer_ratios"] = {T: _ratios(per, T) for T in tokens}
        out["threshold_estimate"] = _threshold(per, tokens)
        bench.plot_lines(os.path.join(a.out, "bench_moe_layer.png"), tokens,
                         {v: [per(v, T) for T in tokens] for v in variants}, xlabel="tokens",
                         ylabel="µs per layer",
                         title=f"{a.model} layer, TP{tp}, {info['device']} (impl={impl})")
    if "moe" in sections or "layer" in sections:
        del w

    if "model" in sections:
        L = a.model_layers or cfg.num_layers
        info["model_layers"] = L
        w = bench.random_weights(cfg, mesh, num_layers=L, dtype=dtype, seed=1)
        res = {}
        for v in [v for v in variants if v != "xla_split"]:
            for T in model_tokens:
                fn, _ = bench.layer_stack_fn(v, cfg, mesh, tokens=T, impl=impl, comm=comm,
                                             attn_impl=attn, split=split, moe_impl=moe_impls[0])
                r = timed(f"model T={T} {v}", fn, w, bench.token_ids(mesh, 1, T, cfg.vocab_size, seed=T))
                res.setdefault(v, {})[T] = r
                if "median_us" in r:
                    print(f"model T={T:6d} {v:10s} {r['median_us'] / 1e3:10.2f} ms", flush=True)
        ms = lambda v, T: res.get(v, {}).get(T, {}).get("median_us")  # noqa: E731
        out["model"] = res
        out["model_ratios"] = {T: _ratios(ms, T) for T in model_tokens}
        bench.plot_lines(os.path.join(a.out, "bench_moe_model.png"), model_tokens,
                         {v: [(ms(v, T) or float("nan")) / 1e3 for T in model_tokens] for v in res},
                         xlabel="prompt tokens", ylabel="prefill ms",
                         title=f"{a.model} {L} layers, TP{tp}, {info['device']} (impl={impl})")
        del w

    bench.write_json(os.path.join(a.out, "bench_moe.json"), out)
    write_md(os.path.join(a.out, "bench_moe.md"), out, tokens, model_tokens, variants, moe_impls)
    print(open(os.path.join(a.out, "bench_moe.md")).read())
    return out


def _ratios(t, T):
    def r(a, b):
        x, y = t(a, T), t(b, T)
        return x / y if x and y else None
    return {"baseline/tokenweave": r("baseline", "tokenweave"), "fused/tokenweave": r("fused", "tokenweave"),
            "baseline/fused": r("baseline", "fused"), "tokenweave/nocomm": r("tokenweave", "nocomm")}


def _threshold(per, tokens):
    """Smallest measured T from which tokenweave beats fused at every larger measured T."""
    best = None
    for T in sorted(tokens, reverse=True):
        tw, fu = per("tokenweave", T), per("fused", T)
        if tw is None or fu is None or tw >= fu:
            break
        best = T
    return best


def write_md(path, out, tokens, model_tokens, variants, moe_impls):
    info = out["info"]
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"# Mixtral benchmarks: {info['model']}, TP{info['tp']}, {info['device']}", "",
             f"{info['date']} · jax {info['jax']} · impl={info['impl']} · attn={info['attn']} · "
             f"moe={info['moe_impl']} · {info['dtype']} · `{info['command']}`", ""]
    if "moe" in out:
        impls = moe_impls + ["ragged_pallas", "dense_equiv"]
        lines += ["## MoE block alone (one GPU's shard, µs)", "",
                  "| tokens | " + " | ".join(impls) + " |", "|" + "---|" * (len(impls) + 1)]
        for T in tokens:
            lines.append(f"| {T} | " + " | ".join(f(out["moe"][m][T].get("median_us")) for m in impls) + " |")
        lines.append("")
    if "layer" in out:
        per = lambda v, T: out["layer"].get(v, {}).get(T, {}).get("per_layer_us")  # noqa: E731
        lines += [f"## Layer ({info['layers_per_call']} layers/call, µs per layer)", "",
                  "| tokens | " + " | ".join(variants) + " | baseline/tokenweave | fused/tokenweave | "
                  "tokenweave/nocomm |", "|" + "---|" * (len(variants) + 4)]
        for T in tokens:
            r = out["layer_ratios"][T]
            lines.append(f"| {T} | " + " | ".join(f(per(v, T)) for v in variants) +
                         f" | {f(r['baseline/tokenweave'], 3)} | {f(r['fused/tokenweave'], 3)} | "
                         f"{f(r['tokenweave/nocomm'], 3)} |")
        lines += ["", f"Split threshold estimate (tokenweave < fused from here on): "
                      f"{out['threshold_estimate']} tokens (TokenWeave ships 2048 for Mixtral).", ""]
    if "model" in out:
        vs = list(out["model"])
        ms = lambda v, T: out["model"].get(v, {}).get(T, {}).get("median_us")  # noqa: E731
        lines += [f"## Full model prefill ({info.get('model_layers')} layers, ms)", "",
                  "| tokens | " + " | ".join(vs) + " | baseline/tokenweave | tokenweave/nocomm |",
                  "|" + "---|" * (len(vs) + 3)]
        for T in model_tokens:
            r = out["model_ratios"][T]
            lines.append(f"| {T} | " + " | ".join(f((ms(v, T) or 0) / 1e3 if ms(v, T) else None, 2)
                                                  for v in vs) +
                         f" | {f(r['baseline/tokenweave'], 3)} | {f(r['tokenweave/nocomm'], 3)} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
