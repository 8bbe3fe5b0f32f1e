"""kernels.layer_qkv (Pallas, interpret mode on CPU) against the model's own q/k/v math
(models/layers: the einsums on the layer's slices, bias, apply_rope), and layers.qkv's decode
path through LayerOf weights.

Fresh normal data per case (seeded by the case), positions spread over a long range so that RoPE
rotates every pair, every output element compared."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_tokenweave.kernels.layer_qkv import layer_qkv
from jax_tokenweave.kernels.layer_of import LayerOf
from jax_tokenweave.models import layers

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _data(m, d, heads, kvh, hd, num_layers, dtype, seed, bias=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    rnd = lambda k, s, scale=1.0: (jax.random.normal(k, s, jnp.float32) * scale).astype(dtype)
    x = rnd(ks[0], (m, d))
    w = [rnd(ks[1], (num_layers, d, heads, hd), d ** -0.5),
         rnd(ks[2], (num_layers, d, kvh, hd), d ** -0.5),
         rnd(ks[3], (num_layers, d, kvh, hd), d ** -0.5)]
    b = None
    if bias:
        b = [rnd(ks[4], (num_layers, heads, hd)), rnd(ks[5], (num_layers, kvh, hd)),
             rnd(ks[6], (num_layers, kvh, hd))]
    positions = jax.random.randint(ks[7], (m,), 0, 40000)
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    cos, sin = layers.rope_cos_sin(positions[:, None], inv_freq)
    return x, w, b, cos[:, 0], sin[:, 0]


def _reference(x, w, b, cos, sin, layer, kv0=0, kv_heads=None):
    """The model's math (layers.apply_rope) on the layer's slices."""
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    outs = []
    for i, wt in enumerate(w):
        wt = wt[layer]
        bt = None if b is None else b[i][layer]
        if i and kv_heads is not None:
            wt, bt = wt[:, kv0:kv0 + kv_heads], None if bt is None else bt[kv0:kv0 + kv_heads]
        y = jnp.einsum("md,dhk->mhk", x, wt, precision=prec)
        y = y if bt is None else y + bt
        outs.append(y if i == 2 else layers.apply_rope(y[:, None], cos[:, None], sin[:, None])[:, 0])
    return outs


def _check(got, ref, dtype):
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), **TOL[dtype])


@pytest.mark.parametrize("m", [1, 5, 16, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_and_dtypes(m, dtype):
    x, w, b, cos, sin = _data(m, 128, 8, 2, 64, 3, dtype, seed=m)
    for layer in (0, 2):
        ref = _reference(x, w, b, cos, sin, layer)
        # the layer matters: another layer's projection differs
        other = _reference(x, w, b, cos, sin, 1)
        assert not np.allclose(np.asarray(ref[0], np.float32), np.asarray(other[0], np.float32), **TOL[dtype])
        _check(layer_qkv(x, *w, layer, cos, sin, block_h=16, block_k=32), ref, dtype)
        # K in 4 pieces, added up by the last program of each column tile
        _check(layer_qkv(x, *w, layer, cos, sin, block_h=16, block_k=32, split_k=4), ref, dtype)


@pytest.mark.parametrize("heads,kvh,hd,split_k", [(4, 4, 32, 1), (8, 2, 128, 2), (16, 2, 64, None)])
def test_gqa_head_dims_and_default_blocks(heads, kvh, hd, split_k):
    x, w, b, cos, sin = _data(8, 512, heads, kvh, hd, 2, jnp.float32, seed=hd + heads)
    f = jax.jit(lambda x, l: layer_qkv(x, *w, l, cos, sin, split_k=split_k))
    _check(f(x, jnp.int32(1)), _reference(x, w, b, cos, sin, 1), jnp.float32)


def test_bias_is_added_before_the_rotation():
    x, w, b, cos, sin = _data(6, 64, 4, 2, 32, 2, jnp.float32, seed=21, bias=True)
    ref = _reference(x, w, b, cos, sin, 1)
    unbiased = _reference(x, w, None, cos, sin, 1)
    assert not np.allclose(np.asarray(ref[1]), np.asarray(unbiased[1]), **TOL[jnp.float32])
    _check(layer_qkv(x, *w, 1, cos, sin, biases=b, block_h=16, block_k=16), ref, jnp.float32)


def test_one_replicated_kv_head():
    """tp > num_kv_heads: a rank computes only kv head kv_head0 (traced), of all of them."""
    x, w, b, cos, sin = _data(4, 64, 2, 4, 32, 2, jnp.float32, seed=5, bias=True)
    f = jax.jit(lambda kv0: layer_qkv(x, *w, 0, cos, sin, biases=b, kv_head0=kv0, kv_heads=1,
                                      block_h=16, block_k=16, split_k=2))
    for kv0 in (0, 3):
        _check(f(jnp.int32(kv0)), _reference(x, w, b, cos, sin, 0, kv0, 1), jnp.float32)


def test_layers_qkv_kernel_path_matches_the_einsums(monkeypatch):
    """models.layers.qkv with LayerOf weights and the kernels on gives the einsum path's q/k/v."""
    x, w, b, cos, sin = _data(3, 64, 4, 2, 32, 2, jnp.float32, seed=8, bias=True)
    names = ("q_proj", "k_proj", "v_proj")
    spec = layers.LayerSpec(num_kv_heads=2)
    stacked = {**{f"attn.{n}.kernel": a for n, a in zip(names, w)},
               **{f"attn.{n}.bias": a for n, a in zip(names, b)}}
    rope = (cos[None], sin[None])

    def run(kernels, layer):
        monkeypatch.setattr(layers, "use_kernels", lambda: kernels)
        wl = {k: LayerOf(a, jnp.int32(layer)) for k, a in stacked.items()}
        f = jax.shard_map(lambda x: layers.qkv(wl, x, rope, spec), mesh=jax.make_mesh((1,), ("tp",)),
                          in_specs=jax.P(), out_specs=jax.P(), check_vma=False)
        return f(x[None])

    for layer in (0, 1):
        _check(run(True, layer), run(False, layer), jnp.float32)


def test_bad_inputs_name_the_fix():
    x, w, b, cos, sin = _data(4, 64, 4, 2, 32, 2, jnp.float32, seed=3)
    with pytest.raises(ValueError, match=r"wk, wv \[L, D, KVH, hd\]"):
        layer_qkv(x, w[0], w[1][:, :, :1], w[2], 0, cos, sin)
    with pytest.raises(ValueError, match="cast x to the weights' dtype"):
        layer_qkv(x.astype(jnp.bfloat16), *w, 0, cos, sin)
    with pytest.raises(ValueError, match=r"cos and sin must be \[M, hd\]"):
        layer_qkv(x, *w, 0, cos[:2], sin)
    with pytest.raises(ValueError, match="must be >= 16 and divide"):
        layer_qkv(x, *w, 0, cos, sin, block_h=8)
    with pytest.raises(ValueError, match=r"kv_heads=3 must be in \[1, KVH=2\]"):
        layer_qkv(x, *w, 0, cos, sin, kv_heads=3)
    with pytest.raises(ValueError, match="split_k=3 must be a power of two dividing"):
        layer_qkv(x, *w, 0, cos, sin, block_k=16, split_k=3)
