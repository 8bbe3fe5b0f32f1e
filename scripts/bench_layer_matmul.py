#!/usr/bin/env python3
"""Decode's skinny matmuls over stacked weights: XLA's dot on ``w[layer]`` against the Pallas
``kernels.layer_matmul`` (which reads the layer in place), on one GPU.

For each Llama-3.1-8B projection shape (o_proj 4096x4096, qkv 4096x6144, gate 4096x14336, down
14336x4096; 32 stacked layers, bf16) and rows M (8, 32): a jit of 4 x 32 dependent calls, one
per layer in order as the unrolled decode step runs them (each output feeds the next input by a
tiny add), median of --reps runs after warm-up, per call. ``none`` times the chain without the
matmul (its fixed cost). Each row: µs per call, weight TB/s, ratio to the weight bytes at the copy
bandwidth measured in the same run (bench.harness.copy_bandwidth), and for XLA how many
copies, weight-slice copies and cuBLAS calls its compiled HLO holds
(bench.harness.hlo_copy_counts). Pallas configs are checked against the reference.

Prints a table; writes <out>/layer_matmul_<device>.json.

    python3 scripts/bench_layer_matmul.py --out $OUT
    python3 scripts/bench_layer_matmul.py --tiny --out /tmp/lm     # CPU smoke (interpret mode)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402

forbid_multicast()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_tokenweave.bench.harness import copy_bandwidth, hlo_copy_counts, run_info, time_fn, write_json  # noqa: E402
from jax_tokenweave.kernels.layer_matmul import layer_matmul, layer_matmul_reference  # noqa: E402

SHAPES = {"o_proj": (4096, 4096), "qkv": (4096, 6144), "gate": (4096, 14336), "down": (14336, 4096)}
# (block_n, block_k, split_k, num_warps, num_stages); split_k None = the kernel's rule
CONFIGS = [(128, 128, None, 4, 3), (64, 128, None, 4, 3), (64, 256, None, 4, 3),
           (128, 256, None, 4, 3), (128, 64, None, 4, 4), (32, 256, None, 4, 3),
           (64, 128, None, 4, 5), (128, 128, 1, 4, 3), (64, 512, None, 8, 3), (256, 64, None, 8, 4)]
PASSES = 4


def chain(mm, L: int):
    """PASSES x L dependent calls mm(x, w, layer) in layer order (the unrolled decode's pattern)."""
    def f(x, w):
        for _ in range(PASSES):
            for layer in range(L):
                y = mm(x, w, layer)
                x = x + (y[:, :1] * 1e-3).astype(x.dtype)
        return x
    return jax.jit(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="small shapes, 2 configs (CPU smoke)")
    args = ap.parse_args(argv)
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    configs = CONFIGS
    if args.tiny:
        shapes = {"tiny": (256, 128)}
        configs = [(32, 64, None, 4, 3), (64, 128, 1, 4, 3)]
        args.layers, args.reps = 3, 2
    info = run_info(argv)
    bw = copy_bandwidth(mib=64 if args.tiny else 2048)
    res = dict(info=info, copy_bandwidth=bw, rows=[])
    L, calls = args.layers, PASSES * args.layers
    print(f"{'shape':8} {'M':>3} {'variant':24} {'us/call':>8} {'TB/s':>6} {'x roof':>6} notes")
    for name, (K, N) in shapes.items():
        kw, kx = jax.random.split(jax.random.PRNGKey(K + N))
        w = jax.random.normal(kw, (L, K, N), jnp.bfloat16)
        roof_us = 1e6 * K * N * 2 / bw["bytes_per_s"]
        for M in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(kx, (M, K), jnp.bfloat16)
            ref = layer_matmul_reference(x, w, L - 1).astype(jnp.float32)
            variants = {"none": (lambda x, w, l: x[:, :1], {}),
                        "xla": (lambda x, w, l: jnp.einsum("mk,kn->mn", x, w[l]), None)}
            for bn, bk, sk, nw, ns in configs:
                if K % bk or N % bn:
                    continue
                mm = (lambda bn, bk, sk, nw, ns: lambda x, w, l: layer_matmul(
                    x, w, l, block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns))(bn, bk, sk, nw, ns)
                variants[f"pallas n{bn} k{bk} s{sk or 'auto'} w{nw} st{ns}"] = (mm, {})
            for vname, (mm, notes) in variants.items():
                row = dict(shape=name, K=K, N=N, M=M, layers=L, variant=vname)
                try:
                    f = chain(mm, L)
                    if notes is None:
                        notes = hlo_copy_counts(f.lower(x, w).compile().as_text())
                    if vname.startswith("pallas"):
                        got = jax.jit(mm, static_argnums=2)(x, w, L - 1).astype(jnp.float32)
                        notes["max_err"] = float(jnp.max(jnp.abs(got - ref)))
                        notes["ref_max"] = float(jnp.max(jnp.abs(ref)))
                    us = time_fn(f, x, w, iters=args.reps, warmup=1)["median_us"] / calls
                    row.update(notes, us_per_call=us, weight_tb_s=K * N * 2 / us / 1e6,
                               ratio_to_roofline=us / roof_us)
                    print(f"{name:8} {M:3d} {vname:24} {us:8.2f} {row['weight_tb_s']:6.2f} "
                          f"{row['ratio_to_roofline']:6.2f} {notes}")
                except Exception as e:  # one failing config must not cost the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{name:8} {M:3d} {vname:24} error {row['error'][:100]}")
                res["rows"].append(row)
                write_json(os.path.join(args.out, f"layer_matmul_{info['device'].replace(' ', '_').lower()}.json"), res)


if __name__ == "__main__":
    main()
