#!/usr/bin/env python
"""Where a decode step's time goes, on one GPU (random Llama-3.1-8B shape, TP1, bf16):

  1. the copy roofline (bench.harness.copy_bandwidth: every method, the best is the ceiling);
  2. per batch (--batches), 512 valid positions of --capacity: TPModel.decode step time
     (dispatch-ahead loop, median of 3 x 20), then a profile of 5 steps: GPU busy time (union of kernel intervals), idle time between
     kernels, kernels per step, time per category (matmul / attention / kv write / reduce /
     elementwise / memcpy) and the top kernels; one step's kernel sequence goes to the JSON;
  3. Generator.generate per token at batch 1 (64 new tokens minus 1, median of 3) and its
     profile's idle time (does the host loop starve the GPU?);
  4. variants (--variants): the decode jit compiled with other XLA options or other settings of
     the kernels (KERNEL_KNOBS), its step time at each of --variant-batches.

Prints a short table; writes <out>/profile_decode.json (with device, jax, date, command).

    python scripts/profile_decode.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402

forbid_multicast()

from jax_tokenweave.bench.harness import decode_loop_times, hlo_copy_counts, kernel_breakdown  # noqa: E402

VARIANTS = {   # how the decode jit is built, timed against the default at each --variant-batches
    # XLA compiler options (measured before: triton_gemm_any, cublas_fallback=false, the dot-merger
    # threshold and dynamic-slice fusion changed nothing; bench/results/profile_decode_h200.json)
    "default": {},
    # programmatic dependent launch (a kernel starts while the one before drains; Hopper+)
    "xla_pdl_on": {"xla_gpu_enable_pdl": True},
    "xla_pdl_off": {"xla_gpu_enable_pdl": False},
    # HLO rematerialization back on (the decode jits turn it off: runner.DECODE_COMPILER_OPTIONS;
    # on, batch 32 at capacity 8192 recomputes the RoPE and next-norm tables in every layer)
    "xla_remat": {"xla_disable_hlo_passes": ""},
    # the decode kernel's split rule fits at most this many (row, kv head, split) programs, rounded
    # down (default 3 x 132: one wave on the H200)
    "attn_programs_264": {"target_programs": 264},
    "attn_programs_528": {"target_programs": 528},
    # the decode kernel's KV tokens per inner step (default 64)
    "attn_block_k_128": {"attn_block_k": 128},
    # the decode kernel's Triton launch parameters (default 4 warps, 2 stages)
    "attn_warps_8": {"attn_warps": 8},
    "attn_warps_2": {"attn_warps": 2},
    "attn_stages_3": {"attn_stages": 3},
    "attn_stages_4": {"attn_stages": 4},
    "attn_stages_1": {"attn_stages": 1},
    # kernels.layer_matmul (o_proj): split-K chosen for this many programs (default 2 x 132)
    "matmul_programs_528": {"matmul_programs": 528},
    # its tiles and launch parameters (default N tile 64, 4 warps, 3 stages)
    "matmul_n32": {"matmul_block_n": 32},
    "matmul_stages_4": {"matmul_stages": 4},
    "matmul_warps_8": {"matmul_warps": 8},
    "matmul_k64": {"matmul_block_k": 64},
    # kernels.layer_swiglu (gate/up): default N tile 64 (224 programs for the 8B), K tile 64,
    # 4 warps, 3 stages (session 11 measured these against K 128: profile_decode_h200.json)
    "swiglu_k128": {"swiglu_block_k": 128},
    "swiglu_k32_stages_6": {"swiglu_block_k": 32, "swiglu_stages": 6},
    "swiglu_n32": {"swiglu_block_n": 32},
    "swiglu_stages_4": {"swiglu_stages": 4},
    "swiglu_warps_2": {"swiglu_warps": 2},
    # the decode kernel's shortest split (default 128 tokens of capacity: 16 splits at 2048)
    "attn_min_split_256": {"attn_min_split": 256},
    "attn_min_split_512": {"attn_min_split": 512},
    # kernels.layer_qkv (q/k/v + RoPE): off (XLA's GEMM and a RoPE fusion); its split-K (default
    # 4: 192 programs for the 8B), and the unsplit kernel of 32-column tiles that came first
    "qkv_xla": {"qkv_kernel": False},
    "qkv_s2": {"qkv_split_k": 2},
    "qkv_s8": {"qkv_split_k": 8},
    "qkv_s1_h32_k256_stages_4": {"qkv_split_k": 1, "qkv_block_h": 32, "qkv_block_k": 256, "qkv_stages": 4},
}
KERNEL_KNOBS = {   # variant key -> (kernel module, the global read while tracing)
    "target_programs": ("paged_attention", "_WAVE_PROGRAMS"),
    "attn_warps": ("paged_attention", "_DECODE_WARPS"),
    "attn_stages": ("paged_attention", "_DECODE_STAGES"),
    "attn_block_k": ("paged_attention", "_DEFAULT_BLOCK_K"),
    "matmul_programs": ("layer_matmul", "_TARGET_PROGRAMS"),
    "matmul_block_n": ("layer_matmul", "_BLOCK_N"),
    "matmul_block_k": ("layer_matmul", "_BLOCK_K"),
    "matmul_warps": ("layer_matmul", "_WARPS"),
    "matmul_stages": ("layer_matmul", "_STAGES"),
    "swiglu_block_n": ("layer_swiglu", "_BLOCK_N"),
    "swiglu_block_k": ("layer_swiglu", "_BLOCK_K"),
    "swiglu_warps": ("layer_swiglu", "_WARPS"),
    "swiglu_stages": ("layer_swiglu", "_STAGES"),
    "attn_min_split": ("paged_attention", "_MIN_SPLIT_TOKENS"),
    "qkv_kernel": ("layer_qkv", "_ENABLED"),
    "qkv_block_h": ("layer_qkv", "_BLOCK_H"),
    "qkv_block_k": ("layer_qkv", "_BLOCK_K"),
    "qkv_stages": ("layer_qkv", "_STAGES"),
    "qkv_warps": ("layer_qkv", "_WARPS"),
    "qkv_split_k": ("layer_qkv", "_SPLIT_K"),
}


def model_for(name: str):
    import jax.numpy as jnp
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.models import get_preset
    from jax_tokenweave.parallel.mesh import make_mesh
    return TPModel.random(get_preset(name), make_mesh(1), dtype=jnp.bfloat16)


def shape_of(m, capacity: int = 2048) -> tuple[int, int]:
    """(valid, capacity): 512 of `capacity` positions, scaled down for a model with a shorter window."""
    capacity = min(capacity, m.cfg.max_position_embeddings)
    return min(512, capacity // 4), capacity


def decode_setup(m, batch, capacity: int = 2048):
    valid, capacity = shape_of(m, capacity)
    import jax
    import numpy as np
    cache = m.init_cache(batch, capacity)
    cache = cache.replace(lengths=jax.device_put(np.full(batch, valid, np.int32),
                                                 cache.lengths.sharding))
    tok = jax.device_put(np.zeros(batch, np.int32), cache.lengths.sharding)
    return cache, tok


def model_decode(m):
    """m.decode as a `decode(tok, cache) -> (logits, cache)` step (no capacity check)."""
    return lambda tok, cache: m.decode(tok, cache, check_capacity=False)


def step_ms(decode, cache, tok, steps=20, reps=3):
    """(median ms per step, warm-up s, cache) of `decode(tok, cache) -> (logits, cache)`."""
    import jax
    t = time.perf_counter()
    for _ in range(3):
        _, cache = decode(tok, cache)
    jax.block_until_ready(cache.pages.k)
    warm = time.perf_counter() - t
    ts, _, cache = decode_loop_times(decode, cache, tok, steps=steps, reps=reps)
    return 1e3 * statistics.median(ts), warm, cache


def hlo_copies(m, cache, tok, out: str, B: int) -> list[str]:
    """The copy instructions of the compiled decode step (the optimized HLO goes to a file):
    which buffers XLA copies every step."""
    from jax_tokenweave.bench.harness import hlo_copy_lines
    # the runner's own decode jit (its compiler options included), the one step_ms timed
    txt = m._decode_fn.lower(m.params, tok, cache).compile().as_text()
    with open(os.path.join(out, f"decode_b{B}_hlo.txt"), "w") as f:
        f.write(txt)
    return [ln[:240] for ln in hlo_copy_lines(txt)][:40]


def profile_decode(m, cache, tok, out: str, tag: str, steps=5):
    import jax
    tdir = os.path.join(out, f"trace_{tag}")
    with jax.profiler.trace(tdir):
        for _ in range(steps):
            _, cache = m.decode(tok, cache, check_capacity=False)
        jax.block_until_ready(cache.pages.k)
    return kernel_breakdown(tdir, steps), cache


def generator_probe(m, out: str, new=64):
    import jax
    import numpy as np
    from jax_tokenweave.engine.generate import Generator
    valid = shape_of(m)[0]
    gen = Generator(m)
    prompt = np.random.default_rng(0).integers(1, m.cfg.vocab_size, (1, valid)).tolist()
    gen.warmup([valid], 1)
    gen.warmup([valid], new)
    gen.generate(prompt, max_new_tokens=new, ignore_eos=True)
    t1, tn = [], []
    for _ in range(3):
        t = time.perf_counter()
        gen.generate(prompt, max_new_tokens=1, ignore_eos=True)
        t1.append(time.perf_counter() - t)
        t = time.perf_counter()
        gen.generate(prompt, max_new_tokens=new, ignore_eos=True)
        tn.append(time.perf_counter() - t)
    res = dict(generator_ms=1e3 * (statistics.median(tn) - statistics.median(t1)) / (new - 1))
    tdir = os.path.join(out, "trace_generator")
    with jax.profiler.trace(tdir):
        gen.generate(prompt, max_new_tokens=16, ignore_eos=True)
    s = kernel_breakdown(tdir, 16)
    res.update({k: s.get(k) for k in ("window_us_per_step", "busy_us_per_step", "idle_us_per_step",
                                      "kernels_per_step")})
    return res


def variant_probe(m, B: int, variant: dict, capacity: int = 2048) -> dict:
    """The B-row decode step built as `variant` says (XLA compiler options, or the decode
    kernel's split target and launch parameters): its step time, and how many weight slices it materialises
    (`wrapped_slice` fusions: copies of a layer's slice of a stacked weight, made for cuBLAS
    calls) and how many cuBLAS calls it makes."""
    import jax
    import importlib
    from jax_tokenweave.engine.runner import DECODE_COMPILER_OPTIONS
    options = dict(DECODE_COMPILER_OPTIONS,
                   **{k: v for k, v in variant.items() if k not in KERNEL_KNOBS})
    cache, tok = decode_setup(m, B, capacity)
    knobs = {k: (importlib.import_module(f"jax_tokenweave.kernels.{mod}"), g)
             for k, (mod, g) in KERNEL_KNOBS.items()}
    saved = {k: getattr(mod, g) for k, (mod, g) in knobs.items()}
    for k, (mod, g) in knobs.items():   # read while tracing
        setattr(mod, g, variant.get(k, saved[k]))
    try:
        t = time.perf_counter()
        # a new function each time: jax's trace cache would otherwise reuse the default's trace
        compiled = jax.jit(lambda p, t, c: m.decode_fn(p, t, c), donate_argnums=(2,),
                           compiler_options=options).lower(m.params, tok, cache).compile()
        compile_s = time.perf_counter() - t
    finally:
        for k, (mod, g) in knobs.items():
            setattr(mod, g, saved[k])
    txt = compiled.as_text()
    ms, warm, cache = step_ms(lambda tok, cache: compiled(m.params, tok, cache), cache, tok)
    del cache
    counts = hlo_copy_counts(txt)
    return dict(step_ms=ms, compile_s=compile_s, variant=variant, wrapped_slices=counts["wrapped_slices"],
                cublas_calls=counts["cublas_calls"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/profile_decode")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--model", default="llama-3.1-8b", help="preset (tiny-llama: a CPU check of the script)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="names of VARIANTS, '' for none")
    p.add_argument("--variant-batches", default="8,32")
    p.add_argument("--capacity", type=int, default=2048,
                   help="cache positions per sequence (512 of them valid; the generator probe keeps 2048)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    import jax
    from jax_tokenweave.bench import harness as bench
    res = dict(info=bench.run_info(argv if argv is not None else sys.argv))
    path = os.path.join(a.out, "profile_decode.json")

    def save():
        bench.write_json(path, res)

    res["copy_bandwidth"] = bench.copy_bandwidth(2048 if jax.default_backend() == "gpu" else 16)
    save()
    m = model_for(a.model)
    res["batches"] = {}
    for B in [int(b) for b in a.batches.split(",") if b]:
        cache, tok = decode_setup(m, B, a.capacity)
        ms, warm, cache = step_ms(model_decode(m), cache, tok)
        prof, cache = profile_decode(m, cache, tok, a.out, f"b{B}")
        res["batches"][B] = dict(step_ms=ms, warmup_s=warm, **prof, hlo_copies=hlo_copies(m, cache, tok, a.out, B))
        del cache
        save()
    try:
        res["generator_b1"] = generator_probe(m, a.out) if a.batches else dict(skipped="--batches ''")
    except Exception as e:  # noqa: BLE001 - keep the rest
        res["generator_b1"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    save()
    res["variants"] = {}
    for B in [int(b) for b in a.variant_batches.split(",") if b]:
        for name in [v for v in a.variants.split(",") if v]:
            try:
                r = variant_probe(m, B, VARIANTS[name], a.capacity)
            except Exception as e:  # noqa: BLE001 - keep the rest
                r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            res["variants"][f"{name}@b{B}"] = r
            save()

    bw = res["copy_bandwidth"]
    print(f"copy bandwidth: {bw['bytes_per_s'] / 1e12:.3f} TB/s ({bw['best_method']}), read-only "
          f"{bw['read_bytes_per_s'] / 1e12:.3f}; "
          + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in bw["methods_bytes_per_s"].items()))
    print("| batch | step ms | busy us | idle us | kernels | " + " | ".join(
        ("matmul", "attention", "kv_write", "reduce", "elementwise", "memcpy")) + " |")
    for B, r in res["batches"].items():
        c = r.get("category_us_per_step", {})
        print(f"| {B} | {r['step_ms']:.3f} | {r.get('busy_us_per_step', 0):.0f} | {r.get('idle_us_per_step', 0):.0f} | "
              f"{r.get('kernels_per_step', 0):.0f} | " + " | ".join(
                  f"{c.get(k, 0):.0f}" for k in ("matmul", "attention", "kv_write", "reduce", "elementwise", "memcpy")) + " |")
        for n, t, k in r.get("top_kernels", [])[:12]:
            print(f"    {t:8.1f} us  x{k:3d}  {n}")
        print(f"  {len(r.get('hlo_copies', []))} copy instructions in the HLO, first ones:")
        for ln in r.get("hlo_copies", [])[:6]:
            print("    " + ln[:200])
    print("generator b1:", json.dumps(res["generator_b1"]))
    for name, v in res["variants"].items():
        print(f"variant {name}: {json.dumps(v)[:300]}")
    return res


if __name__ == "__main__":
    main()
