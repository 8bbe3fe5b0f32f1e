#!/usr/bin/env python
"""Time to a usable random model: TPModel.random (hashed random weights, created sharded) plus
the first prefill compiled and run, for big model shapes on the GPUs here.

    python scripts/bench_init.py --out bench/results        # llama-3.1-8b and llama-3.3-70b

A model whose bf16 weights do not fit the GPUs here (the 70B shape on one H200: 141 GB) is
compiled without being allocated (``jit(...).lower().compile()`` on abstract shapes): that is
the time a user waits beyond the memory traffic of writing the weights. Writes
<out>/init_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402

forbid_multicast()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.1-8b,llama-3.3-70b")
    p.add_argument("--prompt", type=int, default=512, help="tokens of the first prefill")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_tokenweave.bench.harness import run_info, write_json
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.model_io.random_weights import random_params
    from jax_tokenweave.models import get_preset
    from jax_tokenweave.models.llama import stacked_param_info
    from jax_tokenweave.parallel.mesh import make_mesh

    info = run_info(argv)
    rows = []
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit", 0) * len(jax.devices()) if dev.platform == "gpu" else 0
    for name in a.models.split(","):
        cfg = get_preset(name)
        mesh = make_mesh(len(jax.devices()))
        weight_bytes = 2 * sum(int(np.prod(s)) for s, _, _ in stacked_param_info(cfg).values())
        row = dict(model=name, layers=cfg.num_layers, tp=mesh.shape["tp"], weight_gb=weight_bytes / 1e9)
        if weight_bytes < 0.85 * limit:
            t0 = time.perf_counter()
            m = TPModel.random(cfg, mesh, dtype=jnp.bfloat16)
            jax.block_until_ready(m.params)
            row["random_weights_s"] = time.perf_counter() - t0
            cache = m.init_cache(1, a.prompt + 64)
            toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, a.prompt)).astype(np.int32)
            t1 = time.perf_counter()
            logits, cache = m.prefill(toks, np.array([a.prompt]), cache)
            jax.block_until_ready(logits)
            row["first_prefill_s"] = time.perf_counter() - t1
            row["total_s"] = time.perf_counter() - t0
            row["logits_std"] = float(np.asarray(logits).std())
            row["mode"] = "allocated and run"
            del m, cache, logits
        else:
            # compile only: the init program and the prefill program on abstract inputs
            t0 = time.perf_counter()
            init = jax.jit(lambda: random_params(cfg, mesh, dtype=jnp.bfloat16))
            init.lower().compile()
            row["random_weights_compile_s"] = time.perf_counter() - t0
            abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, (s, _, _) in stacked_param_info(cfg).items()}
            m = TPModel(cfg, abstract, mesh)   # abstract weights: the compiled functions, nothing placed
            t1 = time.perf_counter()
            cache = m.init_cache(1, a.prompt + 64)
            toks = jax.ShapeDtypeStruct((1, a.prompt), jnp.int32, sharding=m._replicated)
            lens = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=m._replicated)
            m._prefill_fn.lower(m.params, toks, lens, cache).compile()
            row["first_prefill_compile_s"] = time.perf_counter() - t1
            row["total_s"] = time.perf_counter() - t0
            row["mode"] = f"compile only ({weight_bytes / 1e9:.0f} GB of weights > the GPUs' {limit / 1e9:.0f} GB)"
        rows.append(row)
        print(row, flush=True)
    slug = info["device"].lower().replace("nvidia ", "").replace(" ", "_")
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, f"init_{slug}.json"), dict(info=info, rows=rows))
    lines = [f"# Random model ready: {info['device']} x{info['device_count']}, jax {info['jax']}, {info['date']}", "",
             f"`{info['command']}`", "", "| model | layers | tp | weights GB | mode | seconds to first prefill |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['tp']} | {r['weight_gb']:.1f} | {r['mode']} | {r['total_s']:.1f} |")
    with open(os.path.join(a.out, f"init_{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
