"""The one-rank reduction deferred into the matmuls around it (kernels/deferred.py), Pallas in
interpret mode on CPU: layer_matmul_residual's epilogue (residual add, column tiles' sums of
squares) against XLA, layer_swiglu / layer_qkv normalising a PreNorm as they load it against the
same kernels on the XLA-normed rows, and the unrolled decode step with every kernel forced on
(norms deferred) against the XLA path.

Fresh normal data per case (seeded by the case), every output element compared."""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_tokenweave.collective import fused
from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.engine import attention
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.kernels.add_rmsnorm import add_rmsnorm_reference
from jax_tokenweave.kernels.deferred import PreNorm, prenorm_of
from jax_tokenweave.kernels.layer_matmul import layer_matmul_reference, layer_matmul_residual
from jax_tokenweave.kernels.layer_of import LayerOf
from jax_tokenweave.kernels.layer_qkv import layer_qkv
from jax_tokenweave.kernels.layer_swiglu import layer_swiglu, layer_swiglu_reference
from jax_tokenweave.models import get_preset, layers
from jax_tokenweave.parallel.mesh import make_mesh

# fp32: summation order; bf16: one ulp (2^-8 relative) where a value is rounded from an fp32
# sum taken in another order, and what that ulp does downstream of a matmul
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _close(got, want, dtype, **tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **(tol or TOL[dtype]))


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_residual_epilogue(m, split_k, dtype):
    # N = 96: column tiles of 32, three of them (a count that is not a power of two)
    kx, kw, kr, kg = jax.random.split(jax.random.PRNGKey(100 * m + split_k), 4)
    x, w = _normal(kx, (m, 128), dtype), _normal(kw, (3, 128, 96), dtype, 128 ** -0.5)
    residual, gamma = _normal(kr, (m, 96), dtype, 3.0), _normal(kg, (2, 96), dtype, 0.2) + 1
    for layer in (0, 2):
        out, ss = layer_matmul_residual(x, w, layer, residual, block_n=32, block_k=32,
                                        split_k=split_k, interpret=True)
        prod = jnp.dot(x, w[layer], precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
        want = (residual.astype(jnp.float32) + prod).astype(dtype)
        _close(out, want, dtype, rtol=2 ** -7 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)
        # the product of the right layer went in: another layer's differs
        other = (residual.astype(jnp.float32) + layer_matmul_reference(x, w, 1 - layer // 2)
                 .astype(jnp.float32)).astype(dtype)
        assert not np.allclose(np.asarray(want, np.float32), np.asarray(other, np.float32), atol=0.1)
        # each column tile's sum of squares of the stored residual
        of = np.asarray(out, np.float32)
        np.testing.assert_allclose(np.asarray(ss), (of ** 2).reshape(m, 3, 32).sum(-1), rtol=1e-5)
        # and the norm they give is the one-rank reduction's
        pre = PreNorm(out, ss, LayerOf(gamma, jnp.int32(1)), 1e-5)
        want_n, _ = add_rmsnorm_reference(prod, residual, gamma[1], eps=1e-5)
        _close(pre.value(), want_n, dtype, **({"rtol": 2 ** -7, "atol": 2 ** -7}
                                              if dtype == jnp.bfloat16 else {}))


def _prenorm(m, d, dtype, seed):
    kr, kp, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    gamma = _normal(kg, (3, d), dtype, 0.2) + 1
    # tiles of 32 columns: what layer_matmul_residual would have given with block_n 32
    return prenorm_of(_normal(kp, (m, d), dtype), _normal(kr, (m, d), dtype, 3.0),
                      LayerOf(gamma, jnp.int32(2)), 1e-5, tiles=d // 32)


@pytest.mark.parametrize("m", [1, 7, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_normalises_a_prenorm(m, dtype):
    pre = _prenorm(m, 128, dtype, seed=m)
    kg, ku = jax.random.split(jax.random.PRNGKey(m + 50))
    wg, wu = _normal(kg, (2, 128, 96), dtype, 0.25), _normal(ku, (2, 128, 96), dtype, 0.25)
    got = layer_swiglu(pre, wg, wu, 1, block_n=32, block_k=32, interpret=True)
    want = layer_swiglu_reference(pre.value(), wg, wu, 1)
    _close(got, want, dtype)
    # the norm was applied (the raw residual gives something else)
    raw = layer_swiglu_reference(pre.residual, wg, wu, 1)
    assert not np.allclose(np.asarray(raw, np.float32), np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qkv_normalises_a_prenorm(m, split_k, dtype):
    d, heads, kvh, hd = 64, 4, 2, 32
    pre = _prenorm(m, d, dtype, seed=10 * m + split_k)
    ks = jax.random.split(jax.random.PRNGKey(m), 4)
    w = [_normal(ks[0], (2, d, heads, hd), dtype, d ** -0.5),
         _normal(ks[1], (2, d, kvh, hd), dtype, d ** -0.5),
         _normal(ks[2], (2, d, kvh, hd), dtype, d ** -0.5)]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    cos, sin = layers.rope_cos_sin(jax.random.randint(ks[3], (m, 1), 0, 40000), inv_freq)
    kw = dict(block_h=16, block_k=16, split_k=split_k, interpret=True)
    got = layer_qkv(pre, *w, 1, cos[:, 0], sin[:, 0], **kw)
    want = layer_qkv(pre.value(), *w, 1, cos[:, 0], sin[:, 0], **kw)
    for g, r in zip(got, want):
        _close(g, r, dtype)


def test_deferred_reducer_needs_layer_of_gamma():
    red = Reducer("fused", "tp", 1e-5).deferring()
    x = jnp.ones((2, 64), jnp.float32)
    mesh = jax.make_mesh((1,), ("tp",))
    call = lambda g: jax.shard_map(lambda p: red(p, p, g)[1], mesh=mesh, in_specs=jax.P(),
                                   out_specs=jax.P(), check_vma=False)(x)
    fused_kernel = fused.one_rank_kernel
    try:
        fused.one_rank_kernel = lambda: True
        with pytest.raises(TypeError, match="gamma as LayerOf"):
            call(jnp.ones((64,), jnp.float32))
        np.testing.assert_array_equal(np.asarray(call(LayerOf(jnp.ones((1, 64)), 0))), 2.0)
    finally:
        fused.one_rank_kernel = fused_kernel


def test_matmul_residual_bad_residual_names_the_shape():
    x, w = jnp.ones((3, 64), jnp.float32), jnp.ones((1, 64, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"residual must be \[M, N\] = \[3, 32\]"):
        layer_matmul_residual(x, w, 0, jnp.ones((3, 64), jnp.float32))


def test_decode_step_defers_the_norms(monkeypatch):
    """The unrolled decode step at TP1 with every kernel forced on (interpret mode): no
    add_rmsnorm launch is left, o_proj / down_proj run the residual epilogue, q/k/v and gate/up
    normalise their input; logits match the XLA path's over three greedy steps."""
    cfg = get_preset("tiny-llama").replace(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                                           intermediate_size=256)
    mesh = make_mesh(1)
    base = TPModel.random(cfg, mesh, seed=3, dtype=jnp.float32)
    prompts = np.random.default_rng(3).integers(1, cfg.vocab_size, (3, 12)).astype(np.int32)
    lengths = np.array([12, 1, 7], np.int32)
    monkeypatch.setattr(layers, "fills_the_gpu", lambda f: True)   # 256 / 64 programs: too few on a GPU

    def run(on):
        monkeypatch.setattr(attention, "use_kernels", lambda: on)
        monkeypatch.setattr(fused, "one_rank_kernel", lambda: on)
        monkeypatch.setattr(layers, "use_kernels", lambda: on)
        model = TPModel(cfg, base.params, mesh)
        cache = model.init_cache(3, 64)
        logits, cache = model.prefill(prompts, lengths, cache)
        out, tok = [], None
        for _ in range(3):
            tok = np.asarray(to_host(logits)).argmax(-1).astype(np.int32)
            logits, cache = model.decode(tok, cache)
            out.append(np.asarray(to_host(logits)))
        text = str(jax.make_jaxpr(model.decode_fn)(model.params, jnp.asarray(tok), cache))
        return np.stack(out), text

    want, text_xla = run(False)
    got, text = run(True)
    launched = set(re.findall(r"name=(layer_\w+|add_rmsnorm\w*)", text))
    # o_proj (K 128: one split) and down_proj (K 256: two) with the epilogue, the consumers normalising
    assert {"layer_matmul_residual_n64_k128_s1", "layer_matmul_residual_n64_k128_s2",
            "layer_qkv_h16_k128_s1_prenorm", "layer_swiglu_n64_k64_prenorm"} == launched, launched
    assert "add_rmsnorm" not in text and "layer_matmul_residual" not in text_xla
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
