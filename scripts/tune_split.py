#!/usr/bin/env python
"""Measure the TokenWeave layer over candidate split settings and write the best into
jax_tokenweave/weave/weave_table.json (entry weave.model_key(model, tp)).

    python scripts/tune_split.py --model llama-3.3-70b            # TP = all GPUs
    python scripts/tune_split.py --quick --dry-run                # print, do not write
    python scripts/tune_split.py --table $OUT/weave_table.json    # write elsewhere (device runs)

Every measurement is the model's own forward (harness.layer_stack_fn: weave.schedule.forward
over --layers layers of random weights in the runtime layout, one prompt of T random tokens),
per layer. Four steps, each at every token count: (1) the CTA count of the overlapped collectives
(SplitConfig.comm_ctas, all pairs alike) at offset 0, best summed over the sizes; (2) a smaller
count for the collectives beside the MLP (comm_ctas_mlp; the MLP is longer than attention, so
fewer SMs may still hide them); (3) the split offset with those counts, best per size
(SplitConfig.offsets); (4) the threshold: the smallest measured size at which the tuned
TokenWeave layer beats the unsplit fused layer (if none does, the threshold is set above the
largest measured size, i.e. never split).
"""
import os

import argparse
import json
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.3-70b")
    ap.add_argument("--tp", type=int, default=None)
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--comm-ctas", default="16,32,64,0", help="candidates (0: the communicator's default)")
    ap.add_argument("--comm-ctas-mlp", default="8,16,32", help="candidates beside the MLP (below step 1's)")
    ap.add_argument("--offsets", default="-256,-128,128,256", help="tried besides 0")
    ap.add_argument("--impl", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tokens 2048,8192; offsets -128,128; 5 iters")
    ap.add_argument("--tiny", action="store_true", help="tiny-llama (CPU smoke test)")
    ap.add_argument("--table", default=None, help="table path (default: the package's)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.offsets, a.iters = "2048,8192", "-128,128", 5

    import jax
    import jax.numpy as jnp
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave import weave
    from jax_tokenweave.weave import split as weave_split
    from jax_tokenweave.parallel.mesh import make_mesh
    from jax_tokenweave.models import get_preset

    cfg = get_preset("tiny-llama" if a.tiny else a.model)
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    tokens = [int(t) for t in a.tokens.split(",")]
    comm = bench.make_comm(mesh, impl, max(tokens), cfg.hidden_size)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    w = bench.random_weights(cfg, mesh, num_layers=a.layers, dtype=dtype)
    attn = "cudnn" if on_gpu else "xla"
    inputs = {T: bench.token_ids(mesh, 1, T, cfg.vocab_size, seed=T) for T in tokens}

    def layer_us(variant, T, **split_kw):
        split = weave.SplitConfig(threshold=2, tile=a.tile, **split_kw)
        fn, plan = bench.layer_stack_fn(variant, cfg, mesh, tokens=T, impl=impl, comm=comm,
                                        attn_impl=attn, split=split)
        us = bench.time_fn(fn, w, inputs[T], iters=a.iters)["median_us"] / a.layers
        print(f"{variant:10s} T={T:6d} {split_kw} split={plan.tokens if plan else None} {us:9.1f} us/layer",
              flush=True)
        return us

    fused = {T: layer_us("fused", T) for T in tokens}
    by_ctas = {c: {T: layer_us("tokenweave", T, comm_ctas=c) for T in tokens}
               for c in (int(x) for x in a.comm_ctas.split(","))}
    ctas = min(by_ctas, key=lambda c: sum(by_ctas[c].values()))
    by_ctas_mlp = {0: by_ctas[ctas]}
    for c in (int(x) for x in a.comm_ctas_mlp.split(",") if x):
        if 0 < c < (ctas or 10 ** 9):
            by_ctas_mlp[c] = {T: layer_us("tokenweave", T, comm_ctas=ctas, comm_ctas_mlp=c) for T in tokens}
    ctas_mlp = min(by_ctas_mlp, key=lambda c: sum(by_ctas_mlp[c].values()))
    by_offset = {T: {0: by_ctas_mlp[ctas_mlp][T]} for T in tokens}
    for T in tokens:
        for off in (int(o) for o in a.offsets.split(",") if o):
            by_offset[T][off] = layer_us("tokenweave", T, comm_ctas=ctas, comm_ctas_mlp=ctas_mlp,
                                         offset=off)
    offsets = {T: min(r, key=r.get) for T, r in by_offset.items()}
    wins = [T for T in tokens if by_offset[T][offsets[T]] < fused[T]]
    threshold = min(wins) if wins else 2 * max(tokens)
    entry = weave.SplitConfig(threshold=threshold, tile=a.tile, offset=0, comm_ctas=ctas,
                              comm_ctas_mlp=ctas_mlp, offsets=tuple(sorted((T, o) for T, o in offsets.items() if o)))
    key = weave.model_key(cfg, tp)
    print(f"{key}: {entry.to_dict()}")
    if a.dry_run:
        return entry
    path = a.table or weave_split.TABLE_PATH
    raw = json.load(open(path)) if os.path.exists(path) else {"default": weave.SplitConfig().to_dict()}
    raw[key] = entry.to_dict()
    info = bench.run_info(argv if argv is not None else sys.argv)
    raw[key]["_measured"] = dict(device=info["device"], device_count=info["device_count"], jax=info["jax"],
                                 date=info["date"], command=info["command"], impl=impl,
                                 layers_per_call=a.layers, us_per_layer=dict(
                                     fused={str(T): v for T, v in fused.items()},
                                     tokenweave_by_comm_ctas={str(c): {str(T): v for T, v in r.items()}
                                                              for c, r in by_ctas.items()},
                                     tokenweave_by_comm_ctas_mlp={str(c): {str(T): v for T, v in r.items()}
                                                                  for c, r in by_ctas_mlp.items()},
                                     tokenweave_by_offset={str(T): {str(o): v for o, v in r.items()}
                                                           for T, r in by_offset.items()}))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(raw, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return entry


if __name__ == "__main__":
    main()
