"""Tensor-parallel consistency of the Llama-family model on 8 host CPU devices.

Tolerance: float32 logits at TP=2/4/8 agree with TP=1 to atol=2e-5, rtol=1e-5: the logits reach
magnitude ~15 with head_dim 16, and the sums over ranks reassociate, so a near-zero logit can be
off by a few ulps of that scale (worst seen 1.13e-5 at TP4, on 1 of 6912); prefill/decode
against the cache-free forward to the same bound."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import get_preset
from jax_tokenweave.engine.runner import TPModel, to_host

ATOL, RTOL = 2e-5, 1e-5
MODELS = ["tiny-llama", "tiny-qwen2"]
TPS = [1, 2, 4, 8]

_models: dict = {}


def _host_params(name):
    key = (name, "params")
    if key not in _models:
        m = TPModel.random(get_preset(name), make_mesh(1), seed=1)
        _models[key] = {k: to_host(v) for k, v in m.params.items()}
    return _models[key]


def model(name: str, tp: int) -> TPModel:
    """One TPModel per (config, tp) for the whole module, so compiled functions are reused."""
    if (name, tp) not in _models:
        _models[(name, tp)] = TPModel(get_preset(name), _host_params(name), make_mesh(tp))
    return _models[(name, tp)]


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, (3, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tokens):
    return {name: to_host(model(name, 1).logits(tokens)) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", TPS[1:])
def test_logits_agree_across_tp(name, tp, tokens, reference):
    got = to_host(model(name, tp).logits(tokens))
    assert got.shape == (3, 9, 256) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference[name], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_prefill_decode_match_full_forward(name, tp, tokens):
    """Right-padded prompts of different lengths, then three decode steps; every step's logits
    equal the cache-free forward over the same (unpadded) sequence."""
    m = model(name, tp)
    lengths = np.array([9, 4, 6], np.int32)
    padded = tokens.copy()
    for b, n in enumerate(lengths):
        padded[b, n:] = 0  # padding content must not matter
    new = np.random.default_rng(1).integers(0, 256, (3, 3)).astype(np.int32)
    # Sequences prompt + generated, right-padded, run through the full forward once.
    full_in = np.zeros((3, 12), np.int32)
    for b, n in enumerate(lengths):
        full_in[b, :n] = tokens[b, :n]
        full_in[b, n:n + 3] = new[b]
    full = to_host(m.logits(full_in))

    cache = m.init_cache(3, 16)
    logits, cache = m.prefill(padded, lengths, cache)
    np.testing.assert_array_equal(to_host(cache.lengths), lengths)
    np.testing.assert_allclose(to_host(logits), full[np.arange(3), lengths - 1], atol=ATOL, rtol=RTOL)
    for step in range(3):
        logits, cache = m.decode(new[:, step], cache)
        np.testing.assert_allclose(to_host(logits), full[np.arange(3), lengths + step],
                                   atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(to_host(cache.lengths), lengths + 3)


def test_odd_head_counts_tp_3_and_6():
    """SmolLM2-like ratios (3 KV heads): tp=3 shards KV heads, tp=6 replicates them (2 ranks each)."""
    cfg = get_preset("tiny-llama").replace(hidden_size=48, num_heads=6, num_kv_heads=3,
                                            intermediate_size=96, vocab_size=192, tie_word_embeddings=True)
    base = TPModel.random(cfg, make_mesh(1), seed=5)
    toks = np.random.default_rng(3).integers(0, 192, (2, 5))
    ref = to_host(base.logits(toks))
    for tp in (3, 6):
        got = to_host(TPModel(cfg, base.params, make_mesh(tp)).logits(toks))
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)


def test_cache_layout_and_weight_sharding():
    cfg = get_preset("tiny-llama")  # 8 heads, 2 KV heads, 2 layers
    L = cfg.num_layers
    m = model("tiny-llama", 8)
    # The static cache's default pages hold 64 tokens: 1 scratch page + one page per sequence.
    assert m.init_cache(2, 40).pages.k.shape[2:4] == (3, 64)
    cache = m.init_cache(2, 40, page_size=16)
    # Paged pools [L, KVH, pages, page, hd]: 1 scratch page + 2 sequences x ceil(40 / 16) pages.
    # KV heads replicated at tp=8 > 2: the cache holds one KV head per rank.
    assert cache.pages.k.shape == (L, 8, 1 + 2 * 3, 16, cfg.head_dim)
    assert cache.pages.k.addressable_shards[0].data.shape == (L, 1, 7, 16, cfg.head_dim)
    np.testing.assert_array_equal(to_host(cache.block_tables), [[1, 2, 3], [4, 5, 6]])
    assert cache.max_len == 40
    # Weights in the runtime layout: layers stacked on a leading axis.
    shard = lambda p: m.params[p].addressable_shards[0].data.shape  # noqa: E731
    assert shard("layers.attn.q_proj.kernel") == (L, 64, 1, 16)          # column-parallel heads
    assert shard("layers.attn.k_proj.kernel") == (L, 64, 2, 16)          # replicated KV heads
    assert shard("layers.attn.o_proj.kernel") == (L, 1, 16, 64)          # row-parallel
    assert shard("layers.mlp.gate_proj.kernel") == (L, 64, 16)
    assert shard("layers.mlp.down_proj.kernel") == (L, 16, 64)
    assert shard("embed_tokens.embedding") == (32, 64)                   # vocab-parallel
    assert shard("lm_head.kernel") == (64, 32)
    assert shard("final_norm.weight") == (64,)
    m2 = model("tiny-llama", 2)
    assert m2.params["layers.attn.k_proj.kernel"].addressable_shards[0].data.shape == (L, 64, 1, 16)


def test_bfloat16_runs_close_to_float32(tokens, reference):
    m = TPModel(get_preset("tiny-llama"), _host_params("tiny-llama"), make_mesh(4), dtype=jnp.bfloat16)
    assert m.dtype == jnp.bfloat16
    got = to_host(m.logits(tokens))
    assert got.dtype == np.float32
    ref = reference["tiny-llama"]
    # bf16 has 8 mantissa bits; two layers keep the error at a few percent of the logit scale.
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_random_init_is_sharded_per_device():
    """TPModel.random builds each shard on its device: the result is already placed."""
    m = TPModel.random(get_preset("tiny-qwen2"), make_mesh(4), seed=3)
    q = m.params["layers.attn.q_proj.bias"]
    assert q.shape == (2, 8, 16) and len(q.addressable_shards) == 4
    assert q.addressable_shards[0].data.shape == (2, 2, 16)
    assert "lm_head.kernel" not in m.params  # tied embeddings
    assert jax.tree.all(jax.tree.map(lambda a: bool(jnp.isfinite(a).all()), m.params))


def test_state_flat_roundtrip():
    """hf_keys.state_to_flat / flat_to_state move between the NNX state and our flat dict."""
    from flax import nnx
    from jax_tokenweave.models import Llama
    from jax_tokenweave.models.hf_keys import flat_to_state, param_shapes, state_to_flat

    cfg = get_preset("tiny-qwen2")
    module = Llama(cfg, rngs=nnx.Rngs(params=0))
    flat = state_to_flat(module)
    assert {k: tuple(v.shape) for k, v in flat.items()} == param_shapes(cfg)
    doubled = {k: 2 * v for k, v in flat.items()}
    nnx.update(module, flat_to_state(module, doubled))
    np.testing.assert_array_equal(module.layers[1].attn.k_proj.bias[...], doubled["layers.1.attn.k_proj.bias"])
    graphdef, _ = nnx.split(module)
    merged = nnx.merge(graphdef, flat_to_state(graphdef, flat))
    np.testing.assert_array_equal(merged.embed_tokens.embedding[...], flat["embed_tokens.embedding"])
    with pytest.raises(ValueError, match=r"missing \['final_norm.weight'\]"):
        flat_to_state(module, {k: v for k, v in flat.items() if k != "final_norm.weight"})
