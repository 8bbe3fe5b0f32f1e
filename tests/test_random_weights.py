"""Random weights for quick GPU tries and benchmarks: normally distributed with each parameter's
declared scale, different per parameter and per layer, reproducible per seed."""
import numpy as np

from jax_tokenweave.model_io.random_weights import hashed_normal, normal_from_bits, random_params
from jax_tokenweave.models import get_preset
from jax_tokenweave.models.llama import stacked_param_info
from jax_tokenweave.parallel.mesh import make_mesh


def test_hashed_normal_is_standard_normal():
    z = np.asarray(hashed_normal((64, 1024), salt=5, layered=False)).ravel()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    # tails of a normal, not of a uniform: P(|z| > 3) ~ 0.27%
    assert 0.0015 < np.mean(np.abs(z) > 3) < 0.004
    assert len(np.unique(z)) > 0.95 * z.size


def test_random_params_scales_layers_and_seeds():
    cfg = get_preset("tiny-qwen2")
    p = random_params(cfg, make_mesh(2), seed=0)
    info = stacked_param_info(cfg)
    assert set(p) == set(info)
    for path, (shape, _, std) in info.items():
        a = np.asarray(p[path])
        assert a.shape == shape, path
        if std is None:
            np.testing.assert_array_equal(a, 1.0)
        elif a.size >= 1024:
            assert abs(a.std() / std - 1.0) < 0.1, (path, a.std(), std)
    q = np.asarray(p["layers.attn.q_proj.kernel"])
    assert not np.allclose(q[0], q[1])                              # layers differ
    assert not np.allclose(q, np.asarray(p["layers.attn.k_proj.kernel"]).mean())
    again = random_params(cfg, make_mesh(1), seed=0)                # same seed, other mesh: same values
    np.testing.assert_array_equal(np.asarray(again["layers.attn.q_proj.kernel"]), q)
    other = random_params(cfg, make_mesh(1), seed=1)
    assert not np.allclose(np.asarray(other["layers.attn.q_proj.kernel"]), q)


def test_extreme_bits_stay_finite():
    """The largest and smallest hash values map to finite values (an 8B model has ~8e9 of them;
    a uniform that reaches 1.0 gives erfinv(1) = inf and NaN logits)."""
    z = np.asarray(normal_from_bits(np.array([0, 1, 511, 512, 0xFFFFFE00, 0xFFFFFFFF], np.uint32)))
    assert np.isfinite(z).all() and z[0] < -5 and z[-1] > 5
    np.testing.assert_allclose(z[0], -z[-1], rtol=1e-5)
