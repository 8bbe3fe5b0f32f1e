"""kernels.l2_warm: the plan of what a warming program reads, the programs themselves (interpret
mode: each one's stored maximum must be that of exactly the tiles it was given), and the two
kernels that carry them (add_rmsnorm, the decode attention's combine): their results must be
identical with and without the warming programs."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_tokenweave.kernels import add_rmsnorm as ar
from jax_tokenweave.kernels import l2_warm
from jax_tokenweave.kernels import paged_attention as pa
from jax_tokenweave.kernels.l2_warm import WarmTarget


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def test_plan_reads_the_same_share_of_each_weight_within_the_budget():
    a, b = _normal(1, (3, 256, 384)), _normal(2, (3, 256, 192))   # 196608 / 98304 bytes a layer
    plan, views, layer = l2_warm.warm_plan(WarmTarget((a, b), 2, pieces=2), 120_000, programs=5)
    assert plan.views == ((3, 2, 96, 512), (3, 2, 48, 512))
    assert [v.shape for v in views] == list(plan.views)
    np.testing.assert_array_equal(np.asarray(views[0][2, 1]).reshape(-1),
                                  np.asarray(a[2]).reshape(-1)[96 * 512:])
    assert int(layer[0]) == 2
    # share 120000 / 294912 of each piece's rows, in whole tiles of 16 rows (16 KB)
    assert plan.tile_rows == (16, 16) and plan.tiles_per_piece == (2, 1)
    assert plan.bytes_read([a.dtype, b.dtype]) == (2 * 2 + 2 * 1) * 16 * 1024 <= 120_000


def test_plan_skips_what_it_cannot_read():
    a = _normal(3, (2, 64, 64))
    assert l2_warm.warm_plan(None, 1 << 20) is None
    assert l2_warm.warm_plan(WarmTarget((a,), 0), 0) is None
    assert l2_warm.warm_plan(WarmTarget((_normal(4, (2, 3, 7)),), 0), 1 << 20) is None  # rows < 64
    plan, _, _ = l2_warm.warm_plan(WarmTarget((a,), 1), 1 << 30, programs=3)   # the budget caps at all
    assert plan.bytes_read([a.dtype]) == 64 * 64 * 2


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_each_program_reads_its_tiles(programs):
    a, b = _normal(5, (4, 64, 512)), _normal(6, (4, 32, 256), jnp.float32)
    target = WarmTarget((a, b), 3, pieces=2)
    plan, views, layer = l2_warm.warm_plan(target, 1 << 20, programs=programs)
    assert plan.num_tiles == (4, 2)   # all of the layer: 2 x 2 tiles of 16 rows, 2 x 1 of 8

    def kernel(layer_ref, *refs):
        l2_warm.warm(plan, layer_ref, refs[:-1], refs[-1], pl.program_id(0))

    sink = pl.pallas_call(
        kernel, grid=(programs,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,))]
        + [pl.BlockSpec(v.shape, lambda i: (0, 0, 0, 0)) for v in views],
        out_specs=pl.BlockSpec((programs,), lambda i: (0,)),
        out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32), interpret=True)(layer, *views)
    want = np.full(programs, -np.inf, np.float32)
    for v, tr, tpp, n in zip(views, plan.tile_rows, plan.tiles_per_piece, plan.num_tiles):
        v = np.asarray(v[3], np.float32)
        for p in range(programs):
            for j in range(-(-n // programs)):
                t = min(p + j * programs, n - 1)   # past the last tile: the last again
                tile = v[t // tpp, (t % tpp) * tr:(t % tpp + 1) * tr]
                want[p] = max(want[p], tile.max())
    np.testing.assert_array_equal(np.asarray(sink), want)


def test_add_rmsnorm_with_warming_programs_is_unchanged(monkeypatch):
    parts = _normal(7, (4, 5, 192), jnp.float32)
    res, gamma = 3 * _normal(8, (5, 192)), 1 + 0.2 * _normal(9, (192,))
    target = WarmTarget((_normal(10, (3, 192, 512)), _normal(11, (3, 192, 512))), 2)
    plain = ar.add_rmsnorm(parts, res, gamma, eps=1e-5, interpret=True)
    monkeypatch.setattr(ar, "_WARM_BYTES", 100_000)
    assert l2_warm.warm_plan(target, ar._WARM_BYTES) is not None
    warmed = ar.add_rmsnorm(parts, res, gamma, eps=1e-5, warm=target, interpret=True)
    for x, y in zip(plain, warmed):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    want = ar.add_rmsnorm_reference(parts, res, gamma, eps=1e-5)
    for x, y in zip(warmed, want):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=2 ** -7, atol=2 ** -7)


def test_decode_combine_with_warming_programs_is_unchanged(monkeypatch):
    B, KVH, H, hd, ps, pages = 2, 2, 8, 64, 16, 12
    kp, vp = _normal(12, (2, KVH, 1 + B * pages, ps, hd)), _normal(13, (2, KVH, 1 + B * pages, ps, hd))
    bt = jnp.asarray(1 + np.random.default_rng(0).permutation(B * pages).reshape(B, pages), jnp.int32)
    ln = jnp.asarray([150, 17], jnp.int32)
    q, kn, vn = _normal(14, (B, H, hd)), _normal(15, (B, KVH, hd)), _normal(16, (B, KVH, hd))
    wo = _normal(17, (2, H * hd, 256))
    plain = pa.paged_decode_attention(q, kp, vp, bt, ln, 1, num_splits=4, new_kv=(kn, vn),
                                      interpret=True)
    monkeypatch.setattr(pa, "_WARM_BYTES", 200_000)
    warmed = pa.paged_decode_attention(q, kp, vp, bt, ln, 1, num_splits=4, new_kv=(kn, vn),
                                       warm=WarmTarget((wo,), 0), interpret=True)
    for x, y in zip(plain, warmed):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    ref = pa.paged_attention_reference(q, warmed[1], warmed[2], bt, ln, 1)
    np.testing.assert_allclose(np.asarray(warmed[0], np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-2)
