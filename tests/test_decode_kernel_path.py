"""The decode step's GPU path, forced on CPU (the Pallas kernels in interpret mode): the qkv
projection as split-K pieces into the attention kernel, which applies RoPE and writes the new
token's K/V itself (models.layers.projection_fuses), against the XLA path of the same model,
at TP 1 and 2 (inside shard_map, one kv head per rank)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_tokenweave.engine import attention
from jax_tokenweave.engine.runner import TPModel
from jax_tokenweave.models import get_preset, layers
from jax_tokenweave.parallel.mesh import make_mesh


def _decode_steps(model, on, monkeypatch, steps=3):
    monkeypatch.setattr(attention, "use_kernels", lambda: on)
    monkeypatch.setattr(layers, "use_kernels", lambda: on)
    rng = np.random.default_rng(3)
    prompts = rng.integers(1, model.cfg.vocab_size, (3, 9)).astype(np.int32)
    lengths = np.array([9, 1, 5], np.int32)   # a one-token prompt, ragged lengths
    cache = model.init_cache(3, 64)
    logits, cache = model.prefill(prompts, lengths, cache)
    out, fused = [], None
    for t in range(steps):
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        if t == 0:
            fused = "paged_decode_attention_qkv" in str(jax.make_jaxpr(model.decode_fn)(model.params, tok, cache))
        logits, cache = model.decode(tok, cache)
        out.append(np.asarray(logits))
    return np.stack(out), fused


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_projection_decode_matches_xla_path(tp, monkeypatch):
    cfg = get_preset("tiny-llama")
    mesh = make_mesh(tp)
    model = TPModel.random(cfg, mesh, dtype=jnp.float32)
    want, fused_xla = _decode_steps(model, False, monkeypatch)
    got, fused = _decode_steps(TPModel(cfg, model.params, mesh), True, monkeypatch)
    assert fused and not fused_xla
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
