#!/usr/bin/env python
"""Where a decode step's time goes: a profile of a few TPModel.decode steps (random 8B shape,
one GPU), summarised as the top GPU kernels by total time, and the step time with the layer
scan unrolled for comparison (is the scan's per-layer weight slice copied?).

    python scripts/profile_decode.py --out $OUT
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402

forbid_multicast()


def timed_steps(m, batch, valid, steps=20):
    import jax
    import numpy as np
    cache = m.init_cache(batch, 2048)
    toks = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (batch, valid)).astype(np.int32)
    _, cache = m.prefill(toks, np.full(batch, valid, np.int32), cache)
    tok = np.zeros(batch, np.int32)
    for _ in range(3):
        _, cache = m.decode(tok, cache, check_capacity=False)
    jax.block_until_ready(cache.pages.k)
    t = time.perf_counter()
    for _ in range(steps):
        _, cache = m.decode(tok, cache, check_capacity=False)
    jax.block_until_ready(cache.pages.k)
    return (time.perf_counter() - t) / steps * 1e3, cache, tok


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/profile_decode")
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.models import get_preset
    from jax_tokenweave.parallel.mesh import make_mesh
    os.makedirs(a.out, exist_ok=True)
    res = {}
    m = TPModel.random(get_preset("llama-3.1-8b"), make_mesh(1), dtype=jnp.bfloat16)
    ms, cache, tok = timed_steps(m, a.batch, 512)
    res["scan_step_ms"] = ms
    tdir = os.path.join(a.out, "trace")
    with jax.profiler.trace(tdir):
        for _ in range(5):
            _, cache = m.decode(tok, cache, check_capacity=False)
        jax.block_until_ready(cache.pages.k)
    del cache
    f = sorted(glob.glob(os.path.join(tdir, "**", "*.trace.json.gz"), recursive=True))[-1]
    ev = json.load(gzip.open(f))["traceEvents"]
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in ev:
        if e.get("ph") == "X" and "GPU" in pname.get(e["pid"], "") and "dur" in e:
            tot[e["name"]] += e["dur"]
            cnt[e["name"]] += 1
    res["top_kernels_us_per_step"] = [(n[:120], round(t / 5, 1), cnt[n] // 5) for n, t in tot.most_common(15)]
    res["gpu_busy_us_per_step"] = sum(tot.values()) / 5
    orig = jax.lax.scan
    jax.lax.scan = functools.partial(orig, unroll=True)
    m2 = TPModel(m.cfg, m.params, m.mesh)
    res["unrolled_step_ms"] = timed_steps(m2, a.batch, 512)[0]
    jax.lax.scan = orig
    print(json.dumps(res, indent=1))
    json.dump(res, open(os.path.join(a.out, "profile_decode.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
