"""kernels.layer_matmul (Pallas, interpret mode on CPU) against its XLA reference, and the
unrolled decode's o_proj through layers.LayerOf.

Fresh normal data per case (seeded by the case), every output element compared."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_tokenweave.kernels.layer_matmul import layer_matmul, layer_matmul_reference
from jax_tokenweave.models import layers

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=1e-2, atol=6e-2)}


def _data(m, k, n, layers_, dtype, seed):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(kx, (m, k), jnp.float32).astype(dtype),
            jax.random.normal(kw, (layers_, k, n), jnp.float32).astype(dtype))


def _check(got, x, w, layer, dtype):
    assert got.shape == (x.shape[0], w.shape[2]) and got.dtype == x.dtype
    ref = layer_matmul_reference(x, w, layer)
    # the reference must differ from every other layer's product, or a wrong layer would pass
    other = layer_matmul_reference(x, w, (layer + 1) % w.shape[0])
    assert not np.allclose(np.asarray(ref, np.float32), np.asarray(other, np.float32), **TOL[dtype])
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), **TOL[dtype])


@pytest.mark.parametrize("m", [1, 5, 8, 16, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_and_dtypes(m, dtype):
    x, w = _data(m, 128, 64, 3, dtype, seed=m)
    for layer in range(3):
        _check(layer_matmul(x, w, layer, block_n=32, block_k=32), x, w, layer, dtype)


@pytest.mark.parametrize("split_k,block_n,block_k", [(1, 16, 64), (2, 32, 32), (4, 64, 16), (None, None, None)])
def test_splits_and_blocks(split_k, block_n, block_k):
    x, w = _data(8, 256, 192, 2, jnp.float32, seed=split_k or 0)
    _check(layer_matmul(x, w, 1, block_n=block_n, block_k=block_k, split_k=split_k), x, w, 1, jnp.float32)


def test_traced_layer_under_jit():
    x, w = _data(4, 64, 48, 4, jnp.float32, seed=11)
    f = jax.jit(lambda x, w, l: layer_matmul(x, w, l, block_n=16, block_k=16, split_k=2))
    for layer in (0, 3):
        _check(f(x, w, jnp.int32(layer)), x, w, layer, jnp.float32)


def test_bad_inputs_name_the_fix():
    x, w = _data(4, 64, 48, 2, jnp.float32, seed=3)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and w \[L, K, N\]"):
        layer_matmul(x[:, :32], w, 0)
    with pytest.raises(ValueError, match="cast x to the weights' dtype"):
        layer_matmul(x.astype(jnp.bfloat16), w, 0)
    with pytest.raises(ValueError, match="must be >= 16 and divide"):
        layer_matmul(x, w, 0, block_n=32)
    with pytest.raises(ValueError, match="split_k=3 must divide"):
        layer_matmul(x, w, 0, block_k=16, split_k=3)
    with pytest.raises(ValueError, match="layer must be an integer scalar"):
        layer_matmul(x, w, jnp.zeros(2, jnp.int32))


def test_out_projection_layer_of_matches_slice():
    """The decode path's LayerOf gives the einsum of the layer's own slice (here on CPU, the
    slice path; on GPU the kernel, checked above against the same reference)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(5))
    out = jax.random.normal(kx, (8, 1, 4, 16), jnp.float32)
    wo = jax.random.normal(kw, (3, 4, 16, 32), jnp.float32)
    for layer in range(3):
        got = layers.out_projection(out, layers.LayerOf(wo, jnp.int32(layer)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(layers.out_projection(out, wo[layer])),
                                   rtol=1e-6, atol=1e-6)


def test_unsummed_pieces_add_up():
    x, w = _data(8, 256, 64, 2, jnp.float32, seed=31)
    pieces = layer_matmul(x, w, 0, block_n=32, block_k=32, split_k=4, sum_splits=False)
    assert pieces.shape == (4, 8, 64) and pieces.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(pieces.sum(0)), np.asarray(layer_matmul_reference(x, w, 0)),
                               **TOL[jnp.float32])
    # each piece is a different share of K: no two are equal
    assert not np.allclose(np.asarray(pieces[0]), np.asarray(pieces[1]))
