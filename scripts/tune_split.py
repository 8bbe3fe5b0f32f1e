#!/usr/bin/env python
"""Measure the TokenWeave layer time over candidate split tiles/offsets and write the best into
jax_tokenweave/weave_table.json (entry weave.model_key(model, tp)).

    python scripts/tune_split.py --model llama-3.3-70b            # TP = all GPUs
    python scripts/tune_split.py --quick --dry-run                # print, do not write

For every token count the best offset (per tile) is kept; the table entry gets the tile with
the lowest summed time, its per-size offsets (SplitConfig.offsets) and --threshold.
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
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--tiles", default="128,256")
    ap.add_argument("--offsets", default="-256,-128,0,128,256")
    ap.add_argument("--threshold", type=int, default=1024)
    ap.add_argument("--impl", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tokens 2048,8192; offsets -128,0,128; tile 128")
    ap.add_argument("--tiny", action="store_true", help="tiny-llama (CPU smoke test)")
    ap.add_argument("--table", default=None, help="table path (default: the package's)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.offsets, a.tiles, a.iters = "2048,8192", "-128,0,128", "128", 5

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax_tokenweave import bench, weave
    from jax_tokenweave.mesh import make_mesh
    from jax_tokenweave.models import get_preset

    cfg = get_preset("tiny-llama" if a.tiny else a.model)
    mesh = make_mesh(a.tp)
    tp = mesh.shape["tp"]
    on_gpu = jax.default_backend() == "gpu"
    impl = bench.check_impl(a.impl or bench.default_impl())
    tokens = [int(t) for t in a.tokens.split(",")]
    comm = bench.make_comm(mesh, impl, max(tokens), cfg.hidden_size)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    w, wspecs = bench.random_layer(cfg, mesh, dtype=dtype)
    attn = "cudnn" if on_gpu else "xla"
    measured = {}
    for tile in (int(t) for t in a.tiles.split(",")):
        for T in tokens:
            p = jax.device_put(0.5 * jax.random.normal(jax.random.key(T), (T, cfg.hidden_size), dtype),
                               NamedSharding(mesh, P()))
            for off in (int(o) for o in a.offsets.split(",")):
                split = weave.SplitConfig(threshold=2, tile=tile, offset=off)
                fn, plan = bench.layer_stack_fn("tokenweave", cfg, mesh, wspecs, tokens=T,
                                                num_layers=a.layers, impl=impl, comm=comm,
                                                attn_impl=attn, split=split)
                us = bench.time_fn(fn, w, p, iters=a.iters)["median_us"] / a.layers
                measured.setdefault(tile, {}).setdefault(T, {})[off] = us
                print(f"tile={tile:4d} T={T:6d} offset={off:+5d} split={plan.tokens} {us:9.1f} us/layer",
                      flush=True)
    best_tile = min(measured, key=lambda t: sum(min(r.values()) for r in measured[t].values()))
    offsets = {T: min(r, key=r.get) for T, r in measured[best_tile].items()}
    entry = weave.SplitConfig(threshold=a.threshold, tile=best_tile, offset=0,
                              offsets=tuple(sorted(offsets.items())))
    key = weave.model_key(cfg, tp)
    print(f"{key}: {entry.to_dict()}")
    if a.dry_run:
        return entry, measured
    path = a.table or weave.TABLE_PATH
    raw = json.load(open(path)) if os.path.exists(path) else {"default": weave.SplitConfig().to_dict()}
    raw[key] = entry.to_dict()
    raw[key]["_measured"] = dict(device=bench.run_info()["device"], jax=jax.__version__, impl=impl,
                                 us_per_layer={str(t): {str(T): r for T, r in m.items()}
                                               for t, m in measured.items()})
    with open(path, "w") as f:
        json.dump(raw, f, indent=1)
    print(f"wrote {path}")
    return entry, measured


if __name__ == "__main__":
    main()
