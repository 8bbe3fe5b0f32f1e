"""kernels.add_rmsnorm (Pallas, interpret mode on CPU) against its XLA reference, and the
one-rank fused reduction that runs it on GPU (forced here) against the xla implementation,
inside shard_map as the model calls it; split-K pieces through every reducer kind.

Fresh normal data per case (seeded by the case), every output element compared."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jax_tokenweave.collective import fused
from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_reference

# one bf16 ulp (2^-8 relative) for rounding done at a different fp32 value; fp32: summation order
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


def _data(pieces, t, d, piece_dtype, dtype, seed):
    kp, kr, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    parts = jax.random.normal(kp, (pieces, t, d), jnp.float32).astype(piece_dtype)
    residual = (3 * jax.random.normal(kr, (t, d), jnp.float32)).astype(dtype)
    gamma = (1 + 0.2 * jax.random.normal(kg, (d,), jnp.float32)).astype(dtype)
    return parts, residual, gamma


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize("pieces,t,d", [(1, 1, 64), (1, 17, 576), (3, 5, 96), (8, 8, 4096), (2, 3, 8192)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference(pieces, t, d, dtype):
    # pieces in fp32 (a split-K matmul's), a single partial in the residual's dtype
    piece_dtype = jnp.float32 if pieces > 1 else dtype
    parts, residual, gamma = _data(pieces, t, d, piece_dtype, dtype, seed=pieces * 1000 + t + d)
    normed, res = add_rmsnorm(parts, residual, gamma, eps=1e-5, interpret=True)
    want_n, want_r = add_rmsnorm_reference(parts, residual, gamma, eps=1e-5)
    _close(res, want_r, dtype)
    _close(normed, want_n, dtype)
    # the residual really moved (a kernel that skipped the pieces would fail the check above)
    assert not np.allclose(np.asarray(res, np.float32), np.asarray(residual, np.float32), atol=0.1)


def test_two_dim_partial_is_one_piece():
    parts, residual, gamma = _data(1, 4, 128, jnp.bfloat16, jnp.bfloat16, seed=7)
    a = add_rmsnorm(parts[0], residual, gamma, eps=1e-6, interpret=True)
    b = add_rmsnorm(parts, residual, gamma, eps=1e-6, interpret=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_bad_inputs_name_the_problem():
    parts, residual, gamma = _data(2, 4, 64, jnp.float32, jnp.float32, seed=3)
    with pytest.raises(ValueError, match=r"partials must be \[S, T, D\]"):
        add_rmsnorm(parts[:, :3], residual, gamma, eps=1e-5)
    with pytest.raises(ValueError, match=r"gamma must be \[64\]"):
        add_rmsnorm(parts, residual, gamma[:32], eps=1e-5)


@pytest.mark.parametrize("pieces", [1, 4])
def test_one_rank_fused_op_runs_the_kernel(monkeypatch, pieces):
    """What the model runs at TP1 on GPU: the fused op at one rank is the kernel, inside shard_map
    (check_vma=False, as engine/runner.py builds it: jax's interpreter cannot run this kernel's
    scalar arithmetic on varying values under check_vma), and gives what the xla implementation
    gives (a single partial) or the reference (pieces: the xla implementation rounds their sum to
    bf16 before the add, the kernel does not)."""
    check_vma = False
    dtype = jnp.bfloat16
    parts, residual, gamma = _data(pieces, 6, 256, jnp.float32 if pieces > 1 else dtype, dtype, seed=pieces)
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))

    def run(p, r, g):
        return jax.jit(jax.shard_map(
            lambda p, r, g: fused.fused_allreduce_rmsnorm(p, r, g, axis_name="tp", eps=1e-5, impl="xla"),
            mesh=mesh, in_specs=(P(None, "tp") if p.ndim == 3 else P("tp"), P("tp"), P()),
            out_specs=(P("tp"), P("tp")), check_vma=check_vma))(p, r, g)

    calls = []
    real = fused.add_rmsnorm
    monkeypatch.setattr(fused, "add_rmsnorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(fused, "one_rank_kernel", lambda: True)
    normed, res = run(parts if pieces > 1 else parts[0], residual, gamma)
    assert calls, "the one-rank fused op did not run kernels.add_rmsnorm"
    monkeypatch.setattr(fused, "one_rank_kernel", lambda: False)
    if pieces == 1:
        want_n, want_r = run(parts[0], residual, gamma)
    else:
        want_n, want_r = add_rmsnorm_reference(parts, residual, gamma, eps=1e-5)
    assert len(calls) == 1
    _close(res, want_r, dtype)
    _close(normed, want_n, dtype)


@pytest.mark.parametrize("kind", ["fused", "psum", "nocomm"])
def test_reducers_take_split_k_pieces(kind):
    """layers.out_projection hands the reduction a [S, T, D] stack on GPU: every reducer adds it
    up as the summed partial (here on CPU, at 2 ranks, through shard_map)."""
    parts, residual, gamma = _data(3, 4, 64, jnp.float32, jnp.float32, seed=11)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    red = Reducer(kind, "tp", 1e-5)
    spec = P("tp") if kind == "fused" else P()   # fused: each rank holds its 2 rows of the 4

    def run(p):
        return jax.jit(jax.shard_map(lambda p, r, g: red(p, r, g), mesh=mesh, in_specs=(P(), spec, P()),
                                     out_specs=(P(), spec), check_vma=False))(p, residual, gamma)

    got = run(parts)
    want = run(parts.sum(0))
    for x, y in zip(got, want):
        _close(x, y, jnp.float32)


def test_stacked_gamma_read_in_place():
    """gamma as LayerOf a stacked [L, D] (the unrolled decode step's norms): row `layer` is used."""
    from jax_tokenweave.kernels.layer_of import LayerOf
    parts, residual, _ = _data(2, 3, 128, jnp.float32, jnp.bfloat16, seed=5)
    gammas = (1 + 0.3 * jax.random.normal(jax.random.PRNGKey(6), (4, 128), jnp.float32)).astype(jnp.bfloat16)
    for layer in (0, 3):
        got = add_rmsnorm(parts, residual, LayerOf(gammas, jnp.int32(layer)), eps=1e-5, interpret=True)
        want = add_rmsnorm_reference(parts, residual, gammas[layer], eps=1e-5)
        for x, y in zip(got, want):
            _close(x, y, jnp.bfloat16)
    other = add_rmsnorm_reference(parts, residual, gammas[1], eps=1e-5)[0]
    assert not np.allclose(np.asarray(got[0], np.float32), np.asarray(other, np.float32), **TOL[jnp.bfloat16])
