"""kernels.layer_swiglu (Pallas, interpret mode on CPU) against its XLA reference, and the
unrolled decode's dense FFN through LayerOf gate/up weights.

Fresh normal data per case (seeded by the case), every output element compared."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_tokenweave.kernels.layer_swiglu import layer_swiglu, layer_swiglu_reference
from jax_tokenweave.models import layers

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _data(m, k, f, layers_, dtype, seed):
    kx, kg, ku = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kx, (m, k), jnp.float32).astype(dtype),
            (jax.random.normal(kg, (layers_, k, f), jnp.float32) / 4).astype(dtype),
            (jax.random.normal(ku, (layers_, k, f), jnp.float32) / 4).astype(dtype))


@pytest.mark.parametrize("m", [1, 5, 16, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_and_dtypes(m, dtype):
    x, wg, wu = _data(m, 128, 96, 3, dtype, seed=m)
    for layer in (0, 2):
        got = layer_swiglu(x, wg, wu, layer, block_n=32, block_k=32)
        ref = layer_swiglu_reference(x, wg, wu, layer)
        assert got.shape == (m, 96) and got.dtype == dtype
        # the layer matters: another layer's product differs
        other = layer_swiglu_reference(x, wg, wu, 1)
        assert not np.allclose(np.asarray(ref, np.float32), np.asarray(other, np.float32), **TOL[dtype])
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), **TOL[dtype])


def test_default_blocks_and_traced_layer():
    x, wg, wu = _data(8, 256, 192, 2, jnp.float32, seed=9)
    f = jax.jit(lambda x, l: layer_swiglu(x, wg, wu, l))
    np.testing.assert_allclose(np.asarray(f(x, jnp.int32(1))), np.asarray(layer_swiglu_reference(x, wg, wu, 1)),
                               **TOL[jnp.float32])


def test_bad_inputs_name_the_fix():
    x, wg, wu = _data(4, 64, 48, 2, jnp.float32, seed=3)
    with pytest.raises(ValueError, match=r"w_gate, w_up \[L, K, N\] \(all one shape\)"):
        layer_swiglu(x, wg, wu[:, :, :32], 0)
    with pytest.raises(ValueError, match="cast x to the weights' dtype"):
        layer_swiglu(x.astype(jnp.bfloat16), wg, wu, 0)
    with pytest.raises(ValueError, match="must be >= 16 and divide"):
        layer_swiglu(x, wg, wu, 0, block_n=32)


def test_dense_ffn_layer_of_matches_slices():
    """The unrolled decode step hands gate/up as LayerOf; on CPU the einsums run on the slices."""
    x, wg, wu = _data(6, 32, 48, 3, jnp.float32, seed=41)
    down = jax.random.normal(jax.random.PRNGKey(42), (48, 32), jnp.float32)
    for layer in range(3):
        got = layers.dense_ffn({"mlp.gate_proj.kernel": layers.LayerOf(wg, layer),
                                "mlp.up_proj.kernel": layers.LayerOf(wu, layer), "mlp.down_proj.kernel": down}, x)
        want = layers.dense_ffn({"mlp.gate_proj.kernel": wg[layer], "mlp.up_proj.kernel": wu[layer],
                                 "mlp.down_proj.kernel": down}, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)


def test_fills_the_gpu_rule():
    """8B at TP1 (14336 wide) takes the kernel; 70B at TP4 (7168 per rank) and odd widths do not."""
    from jax_tokenweave.kernels.layer_swiglu import fills_the_gpu
    assert fills_the_gpu(14336) and fills_the_gpu(28672)
    assert not fills_the_gpu(7168) and not fills_the_gpu(14336 + 8) and not fills_the_gpu(1536)
