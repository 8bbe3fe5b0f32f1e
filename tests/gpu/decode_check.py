"""GPU check of the decode step's kernels, compiled (not interpret mode), at Llama-3.1-8B layer
shapes (32 q / 8 kv heads, hd 128, bf16), against their XLA references:

  1. kernels.paged_decode_attention with new_kv (the new token's K/V written in place) at batch
     1 / 8 / 32, pages of 16 and 64, ragged lengths incl. 1 and page boundaries: output max |err|
     and the pools (bit-exact against XLA's scatter);
     (every batch here splits the sequences, so the in-kernel split combine runs too);
  2. kernels.layer_matmul on the 8B o_proj (32 stacked layers) at 8 and 32 rows, and
     kernels.layer_swiglu on the 8B gate/up at 1, 8 and 32 rows, kernels.layer_qkv on the 8B
     q/k/v (+ RoPE) at 1, 8 and 32 rows;
  3. kernels.add_rmsnorm (the one-rank fused reduction) at 1 / 8 / 32 / 4096 rows of 4096, one
     bf16 partial or 8 fp32 split-K pieces;
  4. TPModel.decode of a 4-layer 8B-width random model for 6 steps with the kernels against the
     same model with engine.attention.use_kernels, collective.fused.one_rank_kernel and
     models.layers.use_kernels off (XLA's scatter, the reference attention, XLA's add + RMSNorm,
     XLA's GEMMs), both fed the XLA path's greedy tokens: logits (per batch row) and greedy
     choices; all kernels, then the attention and norm kernels alone, then the matmul kernels.

Prints one line per case and 'ALL OK' (exit 1 otherwise).

    python tests/gpu/decode_check.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_tokenweave.collective import fused  # noqa: E402
from jax_tokenweave.engine import attention  # noqa: E402
from jax_tokenweave.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_reference  # noqa: E402
from jax_tokenweave.engine.runner import TPModel, to_host  # noqa: E402
from jax_tokenweave.kernels import paged_attention as pa  # noqa: E402
from jax_tokenweave.kernels.layer_matmul import layer_matmul, layer_matmul_reference  # noqa: E402
from jax_tokenweave.kernels.layer_swiglu import layer_swiglu, layer_swiglu_reference  # noqa: E402
from jax_tokenweave.kernels.layer_qkv import layer_qkv  # noqa: E402
from jax_tokenweave.models import get_preset, layers  # noqa: E402
from jax_tokenweave.parallel.mesh import make_mesh  # noqa: E402

rng = np.random.default_rng(0)
ok = True


def report(name, good, detail):
    global ok
    ok &= bool(good)
    print(f"{'ok ' if good else 'BAD'} {name}: {detail}", flush=True)


def normal(shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


# 1. decode attention with the append
L, KVH, H, HD = 2, 8, 32, 128
for ps in (16, 64):
    for B in (1, 8, 32):
        lengths = rng.integers(1, 700, B).astype(np.int32)
        lengths[: min(B, 4)] = [1, ps, ps + 1, 2 * ps - 1][: min(B, 4)]
        max_pages = -(-int(lengths.max()) // ps)
        num_pages = 1 + B * max_pages
        kp, vp = normal((L, KVH, num_pages, ps, HD)), normal((L, KVH, num_pages, ps, HD))
        bt = jnp.asarray(1 + rng.permutation(B * max_pages).reshape(B, max_pages).astype(np.int32))
        q, kn, vn = normal((B, H, HD)), normal((B, KVH, HD)), normal((B, KVH, HD))
        ln = jnp.asarray(lengths)
        pos = lengths - 1
        page = np.asarray(bt)[np.arange(B), pos // ps]
        kr, vr = kp.at[1, :, page, pos % ps].set(kn), vp.at[1, :, page, pos % ps].set(vn)
        ref = pa.paged_attention_reference(q, kr, vr, bt, ln, 1).astype(jnp.float32)
        out, k2, v2 = jax.jit(lambda q, kp, vp: pa.paged_decode_attention(
            q, kp, vp, bt, ln, 1, new_kv=(kn, vn)), donate_argnums=(1, 2))(q, kp, vp)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
        pools = bool(jnp.array_equal(k2, kr)) and bool(jnp.array_equal(v2, vr))
        report(f"decode+append ps{ps} B{B}", err < 2e-2 and pools, f"max|err| {err:.4f}, pools equal {pools}")

# 2. layer_matmul on the o_proj
w = normal((32, 4096, 4096))
for M in (8, 32):
    x = normal((M, 4096))
    for layer in (0, 31):
        got = jax.jit(layer_matmul)(x, w, jnp.int32(layer)).astype(jnp.float32)
        ref = layer_matmul_reference(x, w, layer).astype(jnp.float32)
        rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        report(f"layer_matmul M{M} layer {layer}", rel < 1e-2, f"max|err| / max|ref| {rel:.2e}")
del w
wg, wu = normal((8, 4096, 14336)) * 0.05, normal((8, 4096, 14336)) * 0.05   # 8B gate/up
for M in (1, 8, 32):
    x = normal((M, 4096))
    got = jax.jit(layer_swiglu)(x, wg, wu, jnp.int32(7)).astype(jnp.float32)
    ref = layer_swiglu_reference(x, wg, wu, 7).astype(jnp.float32)
    rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    report(f"layer_swiglu M{M}", rel < 2e-2, f"max|err| / max|ref| {rel:.2e}")
del wg, wu
wq, wk, wv = normal((4, 4096, 32, 128)) * 0.02, normal((4, 4096, 8, 128)) * 0.02, normal((4, 4096, 8, 128)) * 0.02
inv_freq = layers.rope_inv_freq(get_preset("llama-3.1-8b"))
for M in (1, 8, 32):
    x = normal((M, 4096))
    cos, sin = layers.rope_cos_sin(jnp.asarray(rng.integers(0, 30000, (M, 1)), jnp.int32), inv_freq)
    ein = lambda w: jnp.einsum("md,dhk->mhk", x, w[3])
    rope = lambda y: layers.apply_rope(y[:, None], cos, sin)[:, 0]
    want = (rope(ein(wq)), rope(ein(wk)), ein(wv))
    for kw in ({}, dict(split_k=8), dict(block_h=32, split_k=1)):
        got = jax.jit(lambda *a: layer_qkv(*a, **kw))(x, wq, wk, wv, jnp.int32(3), cos[:, 0], sin[:, 0])
        rel = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                        / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(got, want))
        report(f"layer_qkv M{M} {kw}", rel < 2e-2, f"max|err| / max|ref| over q, k, v {rel:.2e}")
del wq, wk, wv

# 3. add_rmsnorm
for T in (1, 8, 32, 4096):
    for pieces, pdt in ((1, jnp.bfloat16), (8, jnp.float32)):
        parts, res, g = normal((pieces, T, 4096), pdt), 3 * normal((T, 4096)), 1 + 0.2 * normal((4096,))
        got = jax.jit(lambda p, r, g: add_rmsnorm(p, r, g, eps=1e-5))(parts, res, g)
        want = add_rmsnorm_reference(parts, res, g, eps=1e-5)
        errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
                              / (1 + jnp.abs(b.astype(jnp.float32))))) for a, b in zip(got, want)]
        # one bf16 ulp where fp32 sums in another order round the other way
        report(f"add_rmsnorm T{T} pieces {pieces}", max(errs) <= 2 ** -7,
               f"max rel err normed {errs[0]:.2e}, residual {errs[1]:.2e}")

# 4. the decode step, kernels against the XLA path
cfg = get_preset("llama-3.1-8b").replace(num_layers=4)
mesh = make_mesh(1)
m = TPModel.random(cfg, mesh, seed=0, dtype=jnp.bfloat16)
saved = attention.use_kernels, fused.one_rank_kernel, layers.use_kernels
m_xla = TPModel(cfg, m.params, mesh)   # its own jit cache: run() traces it with use_kernels off
prompts = rng.integers(1, cfg.vocab_size, (8, 100)).astype(np.int32)
lengths = np.array([100, 37, 64, 65, 1, 90, 63, 2], np.int32)


def run(model, kernels_on, matmul_kernels=None, feed=None):
    """6 decode steps; each step's input tokens are `feed`'s (teacher forcing: a near-tie that
    flips one greedy token would otherwise make the two runs diverge from there on) or, without
    it, the run's own greedy tokens. -> (logits [6, B, V], the tokens fed)."""
    attention.use_kernels = fused.one_rank_kernel = (lambda: kernels_on)
    mk = kernels_on if matmul_kernels is None else matmul_kernels
    layers.use_kernels = lambda: mk
    cache = model.init_cache(8, 256)
    logits, cache = model.prefill(prompts, lengths, cache)
    out, toks = [], []
    for t in range(6):
        tok = np.asarray(to_host(logits)).argmax(-1).astype(np.int32) if feed is None else feed[t]
        toks.append(tok)
        logits, cache = model.decode(tok, cache)
        out.append(np.asarray(to_host(logits)))
    return np.stack(out), np.stack(toks)


ref, ref_toks = run(m_xla, False)
for name, model, on, mk in (("all kernels", m, True, None),
                            ("attention + norm kernels, XLA matmuls", TPModel(cfg, m.params, mesh), True, False),
                            ("matmul kernels only", TPModel(cfg, m.params, mesh), False, True)):
    got, _ = run(model, on, mk, feed=ref_toks)
    err = np.abs(got - ref).max(axis=(0, 2)) / np.abs(ref).max()
    same = float((got.argmax(-1) == ref.argmax(-1)).mean())
    report(f"TPModel.decode {name} vs the XLA path (4 layers, 6 steps, batch 8, same input tokens)",
           err.max() < 3e-2 and same >= 0.9,
           f"max|dlogits| / max|logits| {err.max():.2e} (per row {np.round(err, 4).tolist()}), "
           f"greedy choices equal {same:.0%}")
attention.use_kernels, fused.one_rank_kernel, layers.use_kernels = saved
print("ALL OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
