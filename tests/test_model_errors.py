"""Bad configs, bad shardings and bad inputs raise the documented ValueErrors."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_tokenweave import fused_allreduce_rmsnorm
from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import ModelConfig, from_hf_config, get_preset
from jax_tokenweave.models.llama import unstack_layers
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.parallel.sharding import param_shardings

TINY = get_preset("tiny-llama")  # 8 heads, 2 KV heads, vocab 256, ffn 128


# ------------------------------------------------------------------------ tensor parallelism

@pytest.mark.parametrize("overrides, tp, message", [
    (dict(num_heads=6, num_kv_heads=2), 4, r"num_heads \(6\) is not divisible by tp=4"),
    (dict(num_heads=12, num_kv_heads=6), 4, r"num_kv_heads \(6\) is not divisible by tp=4"),
    (dict(num_heads=24, num_kv_heads=3), 8, r"tp=8 exceeds num_kv_heads \(3\).*multiple of num_kv_heads"),
    (dict(intermediate_size=100), 8, r"intermediate_size \(100\) is not divisible by tp=8"),
    (dict(vocab_size=250), 4, r"vocab_size \(250\) is not divisible by tp=4.*pad the vocabulary"),
])
def test_non_dividing_shapes(overrides, tp, message):
    cfg = TINY.replace(**overrides)
    with pytest.raises(ValueError, match=message):
        param_shardings(cfg, make_mesh(tp))
    with pytest.raises(ValueError, match=message):
        TPModel.random(cfg, make_mesh(tp))


def test_smollm2_splits_three_ways_not_two():
    cfg = get_preset("smollm2-135m")
    cfg.check_tp(3)
    with pytest.raises(ValueError, match=r"num_heads \(9\) is not divisible by tp=2"):
        cfg.check_tp(2)


def test_mesh_without_the_axis():
    with pytest.raises(ValueError, match="not 'model'"):
        TPModel.random(TINY, make_mesh(2), axis_name="model")


# ------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=8, num_kv_heads=3), r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"),
    (dict(head_dim=7), r"head_dim \(7\) must be even"),
    (dict(model_type="mistral"), r"model_type 'mistral' is not supported"),
    (dict(num_layers=0), r"num_layers must be >= 1"),
])
def test_bad_model_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**overrides)


def _hf_dict(**kw):
    d = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)
    d.update(kw)
    return d


def test_hf_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict()))
    cfg = from_hf_config(tmp_path)
    assert cfg == ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=8, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=4096)
    # transformers 4.x style rope_scaling with the llama3 keys
    cfg = from_hf_config(_hf_dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0,
                                                    original_max_position_embeddings=8192)))
    assert cfg.rope_scaling.factor == 8.0 and cfg.rope_theta == 10000.0
    assert from_hf_config(_hf_dict(model_type="qwen2")).attention_bias


@pytest.mark.parametrize("overrides, message", [
    (dict(model_type="gpt2"), r"model_type 'gpt2'; jax_tokenweave supports \('llama', 'qwen2'"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), r"rope type 'yarn' is not supported"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), r"llama3 rope scaling is missing"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True), r"use_sliding_window"),
])
def test_bad_hf_config(tmp_path, overrides, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_dict(**overrides)))
    with pytest.raises(ValueError, match=message):
        from_hf_config(path)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'llama-2'.*tiny-llama"):
        get_preset("llama-2")


# -------------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def model():
    return TPModel.random(TINY, make_mesh(2))


def test_params_must_match_the_config(model):
    flat = unstack_layers({k: to_host(v) for k, v in model.params.items()})   # the checkpoint layout
    missing = dict(flat)
    del missing["layers.1.mlp.up_proj.kernel"]
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.kernel'\]"):
        TPModel(TINY, missing, make_mesh(2))
    wrong = dict(flat, **{"final_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"'final_norm.weight' has shape \(32,\), the config needs \(64,\)"):
        TPModel(TINY, wrong, make_mesh(2))


def test_prompt_longer_than_cache(model):
    cache = model.init_cache(2, 8)
    with pytest.raises(ValueError, match=r"prompt of 9 tokens does not fit the KV cache of max_len 8; raise max_len"):
        model.prefill(np.zeros((2, 9), np.int32), np.array([9, 9]), cache)


@pytest.mark.parametrize("tokens, lengths, message", [
    (np.zeros((3, 4), np.int32), [4, 4, 4], r"batch of 3 prompts does not match the KV cache's batch of 2"),
    (np.zeros((2, 4), np.int32), [4, 0], r"lengths must lie in \[1, 4\]"),
    (np.zeros((2, 4), np.int32), [4, 5], r"lengths must lie in \[1, 4\]"),
    (np.zeros((2, 4), np.int32), [4], r"lengths must have shape \(2,\)"),
    (np.full((2, 4), 256, np.int32), [4, 4], r"tokens must lie in \[0, vocab_size=256\)"),
    (np.zeros((2, 4), np.float32), [4, 4], r"tokens must be integers"),
    (np.zeros((8,), np.int32), [4, 4], r"tokens must be \[batch, seq\]"),
])
def test_bad_prefill_inputs(model, tokens, lengths, message):
    with pytest.raises(ValueError, match=message):
        model.prefill(tokens, np.array(lengths), model.init_cache(2, 8))


def test_decode_on_full_cache(model):
    cache = model.init_cache(1, 4)
    _, cache = model.prefill(np.ones((1, 4), np.int32), np.array([4]), cache)
    with pytest.raises(ValueError, match=r"KV cache is full: a sequence already holds 4 of max_len=4"):
        model.decode(np.array([1]), cache)
    with pytest.raises(ValueError, match=r"tokens must have shape \(1,\)"):
        model.decode(np.array([1, 2]), cache)


def test_bad_logits_inputs(model):
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=256\)"):
        model.logits(np.array([[1, -1]]))
    with pytest.raises(ValueError, match=r"tokens must have 2 dims"):
        model.logits(np.array([1, 2]))


# ------------------------------------------------------------------- the fused op's own checks

def _call_fused(partial, residual, gamma, tp=2, **kw):
    fn = functools.partial(fused_allreduce_rmsnorm, axis_name="tp", eps=1e-5, **kw)
    smap = jax.shard_map(fn, mesh=make_mesh(tp), in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)
    return jax.jit(smap)(partial, residual, gamma)


@pytest.mark.parametrize("partial, residual, gamma, kw, message", [
    (jnp.zeros((5, 8)), jnp.zeros((2, 8)), jnp.ones(8), {}, r"residual must hold this rank's 3 token rows"),
    (jnp.zeros((4, 8)), jnp.zeros((2, 8), jnp.bfloat16), jnp.ones(8), {}, r"must share a dtype"),
    (jnp.zeros((4, 8)), jnp.zeros((2, 8)), jnp.ones(7), {}, r"gamma must have shape \(8,\)"),
    (jnp.zeros((1, 2, 2, 8)), jnp.zeros((2, 8)), jnp.ones(8), {}, r"partial must be \[tokens, hidden\]"),
    # a [pieces, tokens, hidden] stack (split-K pieces) is checked by its tokens
    (jnp.zeros((3, 5, 8)), jnp.zeros((2, 8)), jnp.ones(8), {}, r"residual must hold this rank's 3 token rows"),
    (jnp.zeros((4, 8)), jnp.zeros((2, 8)), jnp.ones(8), dict(impl="nccl"), r"impl='nccl' is unknown"),
])
def test_fused_op_errors(partial, residual, gamma, kw, message):
    with pytest.raises(ValueError, match=message):
        _call_fused(partial, residual, gamma, **kw)


def test_fused_op_reference_semantics():
    """The xla reference: residual rows += sum of partials, every row normalised."""
    x = jax.random.normal(jax.random.key(0), (5, 8))
    normed, res = _call_fused(x, jnp.ones((3, 8)), jnp.full(8, 2.0))
    total = 2 * x  # both ranks pass the same (replicated) partial
    want_res = 1.0 + total[:3]
    np.testing.assert_allclose(res, want_res, rtol=1e-6)
    h = 1.0 + total  # every rank's residual rows start at 1
    want_normed = 2.0 * h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(normed, want_normed, rtol=1e-5)


def test_auto_table_bounds():
    """impl='auto' takes p2p only up to each measured bound, per hidden size where one was
    measured, and xla beyond it and for axis sizes never measured."""
    from jax_tokenweave.collective import auto_table
    for (n, hidden), table in auto_table.BY_HIDDEN.items():
        bound = table[-1][0]
        tokens = bound // (hidden * 2)
        assert auto_table.choose(tokens, hidden, 2, n) == "p2p"
        assert auto_table.choose(tokens + 1, hidden, 2, n) == "xla"
    assert auto_table.choose(16, 8192, 2, 3) == "xla"            # TP3 never measured
    assert auto_table.choose(16, 4096, 2, 4) == "p2p"            # unmeasured hidden: the TP4 table
    assert auto_table.choose(1 << 20, 4096, 2, 4) == "xla"
