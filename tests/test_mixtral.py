"""Mixtral: routing, grouped expert matmuls, HF transformers parity (float32, CPU), TP 1/2/4/8
agreement, HF key conversion of per-expert tensors (incl. the Orbax converter), token splitting.

Tolerances: logits vs HF to atol=rtol=1e-4; across TP and MoE implementations to 1e-5."""
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import get_preset
from jax_tokenweave.models import hf_keys
from jax_tokenweave.models.config import ModelConfig, from_hf_config, to_hf_dict
from jax_tokenweave.models.mixtral import MoE, capacity, moe_ffn, route, sort_by_expert
from jax_tokenweave.engine.runner import TPModel, to_host

ATOL = RTOL = 1e-5
CFG = get_preset("tiny-mixtral")


# ------------------------------------------------------------------------------ config

def test_config_checks_and_presets():
    big = get_preset("mixtral-8x22b")
    assert (big.num_experts, big.num_experts_per_tok, big.hidden_size, big.intermediate_size) == (
        8, 2, 6144, 16384)
    big.check_tp(4), big.check_tp(8)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        CFG.replace(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="dense"):
        get_preset("tiny-llama").replace(num_experts=8, num_experts_per_tok=2)
    d = to_hf_dict(CFG)
    assert from_hf_config(d) == CFG
    with pytest.raises(ValueError, match="sliding_window"):
        from_hf_config({**d, "sliding_window": 4096})


# ------------------------------------------------------------------------------ routing

def _np_route(logits, k):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, -1)
    return w / w.sum(-1, keepdims=True), idx


def test_route_top2_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32) * 3
    w, e = route(jnp.asarray(logits), 2)
    w_ref, e_ref = _np_route(logits.astype(np.float64), 2)
    np.testing.assert_array_equal(np.asarray(e), e_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)
    assert w.dtype == jnp.float32 and np.allclose(np.asarray(w).sum(-1), 1)
    # bf16 logits are routed in fp32 as well.
    assert route(jnp.asarray(logits, jnp.bfloat16), 2)[0].dtype == jnp.float32


def test_sort_by_expert_groups():
    e = jnp.asarray([[3, 0], [0, 5], [3, 1]], jnp.int32)
    order, sorted_e, sizes = sort_by_expert(e, 8)
    np.testing.assert_array_equal(np.asarray(sizes), [2, 1, 0, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(sorted_e), [0, 0, 1, 3, 3, 5])
    np.testing.assert_array_equal(np.asarray(e).reshape(-1)[np.asarray(order)], np.asarray(sorted_e))


# ------------------------------------------------------------------- grouped expert FFN

def _dense_reference(moe: MoE, x: np.ndarray) -> np.ndarray:
    """Every expert on every token (float64), weighted by the routing: what the sparse path
    must reproduce."""
    g = np.asarray(moe.gate.kernel[...], np.float64)
    w1, w3, w2 = (np.asarray(a[...], np.float64) for a in
                  (moe.experts.w1, moe.experts.w3, moe.experts.w2))
    w, idx = _np_route(x @ g, CFG.num_experts_per_tok)
    gate, up = np.einsum("td,edf->tef", x, w1), np.einsum("td,edf->tef", x, w3)
    y = np.einsum("tef,efd->ted", gate / (1 + np.exp(-gate)) * up, w2)   # [T, E, D]
    return np.einsum("tkd,tk->td", np.take_along_axis(y, idx[:, :, None], 1), w)


def _moe(moe: MoE, x, impl="ragged"):
    """The MoE math (models/moe.py) on the container's weights, as the layer calls it."""
    return moe_ffn(x, moe.gate.kernel[...], moe.experts.w1[...], moe.experts.w3[...], moe.experts.w2[...],
                   k=CFG.num_experts_per_tok, impl=impl)


@pytest.mark.parametrize("impl", ["ragged", "capacity"])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_matches_dense_reference(impl, skew):
    """ragged_dot path and capacity path against the dense reference; `skew` routes almost every
    token to experts 0 and 1, so the capacity path overflows and falls back to ragged_dot."""
    moe = MoE(CFG, rngs=nnx.Rngs(3), dtype=jnp.float32)
    if skew:
        moe.gate.kernel[...] = moe.gate.kernel[...].at[:, :2].add(5.0)
    x = np.random.default_rng(1).normal(size=(2, 37, CFG.hidden_size)).astype(np.float32)
    got = jax.jit(lambda m, x: _moe(m, x, impl))(moe, jnp.asarray(x))
    assert got.shape == x.shape and got.dtype == jnp.float32
    ref = _dense_reference(moe, x.reshape(-1, CFG.hidden_size).astype(np.float64))
    np.testing.assert_allclose(np.asarray(got).reshape(-1, CFG.hidden_size), ref, atol=1e-5, rtol=1e-5)
    if skew:  # the skewed case really overflows the capacity
        _, e = route(jnp.asarray(x.reshape(-1, CFG.hidden_size)) @ moe.gate.kernel[...], 2)
        assert np.bincount(np.asarray(e).ravel(), minlength=8).max() > capacity(74 * 2, 8)


def test_moe_lowers_to_ragged_dot_not_a_loop():
    moe = MoE(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: _moe(moe, x))(jnp.zeros((16, CFG.hidden_size))))
    assert jaxpr.count("ragged_dot_general[") == 3 and "while" not in jaxpr


# ---------------------------------------------------------------------- TP agreement

_models: dict = {}


def _host_params():
    if "params" not in _models:
        m = TPModel.random(CFG, make_mesh(1), seed=1)
        _models["params"] = {k: to_host(v) for k, v in m.params.items()}
    return _models["params"]


def model(tp: int) -> TPModel:
    if tp not in _models:
        _models[tp] = TPModel(CFG, _host_params(), make_mesh(tp))
    return _models[tp]


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tokens):
    return to_host(model(1).logits(tokens))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_logits_agree_across_tp(tp, tokens, reference):
    got = to_host(model(tp).logits(tokens))
    assert got.shape == (3, 9, CFG.vocab_size)
    np.testing.assert_allclose(got, reference, atol=ATOL, rtol=RTOL)


def test_expert_weights_sharded_on_ffn():
    m = model(4)
    shard = lambda p: m.params[p].addressable_shards[0].data.shape  # noqa: E731
    L = CFG.num_layers   # layers stacked on a leading axis (runtime layout)
    assert shard("layers.mlp.experts.w1") == (L, 8, 64, 16)
    assert shard("layers.mlp.experts.w3") == (L, 8, 64, 16)
    assert shard("layers.mlp.experts.w2") == (L, 8, 16, 64)
    assert shard("layers.mlp.gate.kernel") == (L, 64, 8)      # router replicated


def test_prefill_decode_match_full_forward(tokens):
    m = model(2)
    lengths = np.array([9, 4, 6], np.int32)
    new = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 2)).astype(np.int32)
    full_in = np.zeros((3, 11), np.int32)
    for b, n in enumerate(lengths):
        full_in[b, :n], full_in[b, n:n + 2] = tokens[b, :n], new[b]
    full = to_host(m.logits(full_in))
    logits, cache = m.prefill(tokens, lengths, m.init_cache(3, 16))
    np.testing.assert_allclose(to_host(logits), full[np.arange(3), lengths - 1], atol=ATOL, rtol=RTOL)
    for step in range(2):
        logits, cache = m.decode(new[:, step], cache)
        np.testing.assert_allclose(to_host(logits), full[np.arange(3), lengths + step],
                                   atol=ATOL, rtol=RTOL)


def test_capacity_impl_matches_ragged(tokens, reference):
    m = TPModel(CFG, _host_params(), make_mesh(2), moe_impl="capacity")
    np.testing.assert_allclose(to_host(m.logits(tokens)), reference, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="moe_impl='dense'"):
        TPModel(CFG, _host_params(), make_mesh(1), moe_impl="dense")


# ------------------------------------------------------------------ token splitting

@pytest.mark.parametrize("kind,shape,tp", [("batch", (3, 9), 2), ("seq", (1, 19), 4),
                                           ("seq", (1, 19), 8)])
def test_split_logits_equal_unsplit(kind, shape, tp):
    """TokenWeave's split schedule with MoE layers: each half routes its own tokens; the
    logits equal the unsplit model's."""
    weave = pytest.importorskip("jax_tokenweave.weave")
    split = weave.SplitConfig(threshold=8, tile=4)
    assert weave.plan_split(*shape, split).kind == kind
    toks = np.random.default_rng(4).integers(0, CFG.vocab_size, shape).astype(np.int32)
    ref = to_host(model(1).logits(toks))
    got = to_host(TPModel(CFG, _host_params(), make_mesh(tp), split=split).logits(toks))
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------ HF parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny MixtralForCausalLM saved as HF does on disk (per-expert w1/w2/w3 tensors)."""
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(**to_hf_dict(CFG))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    path = tmp_path_factory.mktemp("hf_mixtral")
    hf.save_pretrained(path)
    return path, hf


def _load_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for n in sorted(os.listdir(path)):
        if n.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, n)))
    return out


def _convert(cfg, tensors: dict, order=None):
    asm, flat = hf_keys.ParamAssembler(cfg), {}
    for key in order or tensors:
        res = asm.add(key, tensors[key])
        if res is not None:
            assert res[0] not in flat
            flat[res[0]] = res[1]
    asm.check_done()
    hf_keys.check_complete(cfg, flat)
    return flat


def test_hf_config_roundtrip(hf_dir):
    assert from_hf_config(hf_dir[0]) == CFG


@pytest.mark.parametrize("tp", [1, 4])
def test_logits_match_hf(hf_dir, tp):
    path, hf = hf_dir
    tensors = _load_safetensors(path)
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in tensors
    # Shuffled order: per-expert slices of different parameters arrive interleaved.
    order = list(np.random.default_rng(tp).permutation(sorted(tensors)))
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.float().numpy()
    got = to_host(TPModel(CFG, _convert(CFG, tensors, order), make_mesh(tp)).logits(tokens))
    print(f"mixtral tp={tp}: max |ours - HF| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_convert_hf_to_orbax_mixtral(hf_dir, tmp_path):
    from jax_tokenweave.model_io.checkpoint import convert_hf_to_orbax, load_checkpoint
    path, _ = hf_dir
    out = convert_hf_to_orbax(path, tmp_path / "ckpt", progress=False)
    cfg, params, _ = load_checkpoint(out, make_mesh(2))
    assert cfg == CFG
    want = _convert(CFG, _load_safetensors(path))
    for k, v in want.items():
        np.testing.assert_array_equal(to_host(params[k]), v)


def test_hf_key_errors(hf_dir, tmp_path):
    from jax_tokenweave.model_io.checkpoint import CheckpointError, check_keys
    tensors = _load_safetensors(hf_dir[0])
    k = "model.layers.1.block_sparse_moe.experts.{}.w{}.weight"
    shapes = [(key, t.shape) for key, t in tensors.items()]
    # missing expert: named by its HF key
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe"
                                              r"\.experts\.5\.w3\.weight'"):
        check_keys(CFG, [(a, s) for a, s in shapes if a != k.format(5, 3)], source="x")
    # extra expert (index past num_experts) and extra layer
    with pytest.raises(CheckpointError, match="expert 8 of 'layers.1.mlp.experts.w1'"):
        check_keys(CFG, shapes + [(k.format(8, 1), (64, 64))], source="x")
    with pytest.raises(ValueError, match="num_experts=8"):
        hf_keys.hf_to_slice(CFG, k.format(9, 2), np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="maps to expert 0"):
        hf_keys.hf_to_slice(CFG, "model.layers.2.block_sparse_moe.experts.0.w1.weight",
                            np.zeros((64, 64), np.float32))
    # mis-shaped expert
    with pytest.raises(CheckpointError, match=r"w2\.weight.*shape \(64, 32\)"):
        check_keys(CFG, [(a, (64, 32) if a == k.format(0, 2) else s) for a, s in shapes], source="x")
    # duplicate expert and incomplete stacks in the assembler
    asm = hf_keys.ParamAssembler(CFG)
    assert asm.add(k.format(0, 1), tensors[k.format(0, 1)]) is None
    with pytest.raises(ValueError, match="expert 0 of 'layers.1.mlp.experts.w1' was given twice"):
        asm.add(k.format(0, 1), tensors[k.format(0, 1)])
    with pytest.raises(ValueError, match=r"missing experts: \{'layers.1.mlp.experts.w1': \[1, 2"):
        asm.check_done()
    # per-expert keys are slices: hf_to_param refuses them; dense models do not know them
    with pytest.raises(ValueError, match="hf_to_slice"):
        hf_keys.hf_to_param(CFG, k.format(0, 1), tensors[k.format(0, 1)])
    with pytest.raises(ValueError, match="does not have"):
        hf_keys.hf_to_slice(get_preset("tiny-llama"), k.format(0, 1), tensors[k.format(0, 1)])
    with pytest.raises(ValueError, match="does not have"):
        hf_keys.hf_to_param(get_preset("tiny-llama"), "model.layers.0.block_sparse_moe.gate.weight",
                            np.zeros((8, 64), np.float32))


def test_bench_moe_smoke(tmp_path):
    """scripts/bench_moe.py on tiny-mixtral shapes (CPU): every section runs (the layer and model
    sections through harness.layer_stack_fn, the model's forward on the Mixtral config), split
    and unsplit layers agree, results are written."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        "bench_moe", os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_moe.py"))
    bench_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_moe)
    out = bench_moe.main(["--tiny", "--tp", "2", "--tokens", "24", "--model-tokens", "24",
                          "--variants", "baseline,fused,tokenweave", "--moe-impls", "ragged",
                          "--layers", "1", "--model-layers", "1", "--iters", "1", "--warmup", "0",
                          "--out", str(tmp_path)])
    assert out["layer"]["tokenweave"][24]["max_abs_diff_vs_fused"] < 1e-5
    assert out["layer"]["baseline"][24]["max_abs_diff_vs_fused"] < 1e-5
    assert sum(out["layer"]["tokenweave"][24]["split"]["tokens"]) == 24   # split below the threshold too
    assert "split" not in out["layer"]["fused"][24]
    assert "median_us" in out["model"]["tokenweave"][24] and "median_us" in out["moe"]["ragged"][24]
    assert "median_us" in out["moe"]["dense_equiv"][24]
    assert json.load(open(tmp_path / "bench_moe.json"))["info"]["model"] == "tiny-mixtral"
    assert (tmp_path / "bench_moe.md").exists()
