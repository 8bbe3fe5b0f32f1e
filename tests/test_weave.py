"""TokenWeave's split schedule (jax_tokenweave/weave/split.py) on 8 host CPU devices.

The split model must give the unsplit model's logits (float32, atol=rtol=1e-5, as the TP tests)
at TP 1/2/4/8 for both split kinds, and prefill-with-split must leave the same KV cache (checked
through the decode steps that read it). A lowered threshold makes the tiny token counts split."""
import json
import re

import numpy as np
import pytest

from jax_tokenweave import weave
from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import get_preset
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.weave import SplitConfig, SplitPlan, plan_split, split_point

ATOL = RTOL = 1e-5
SMALL = SplitConfig(threshold=8, tile=4)


# --------------------------------------------------------------------------- split points

def test_split_point_threshold_tile_offset_clamp():
    cfg = SplitConfig()                       # shipped defaults: threshold 1024, tile 128
    assert split_point(1023, cfg) is None
    assert split_point(1024, cfg) == 512
    assert split_point(3000, cfg) == 1536     # 1500 -> 11.7 tiles -> 12 * 128
    assert split_point(2000, cfg) == 1024     # 1000 -> 7.8 tiles -> 8 * 128
    assert split_point(1088, cfg) == 512      # 544 -> 4.25 tiles -> 4 * 128
    assert split_point(4096, SplitConfig(offset=64)) == 2048 + 64
    assert split_point(4096, SplitConfig(offset=-128)) == 1920
    assert split_point(None or 10, None) is None
    # clamping: a half never empty
    assert split_point(1030, SplitConfig(offset=5000)) == 1029
    assert split_point(1030, SplitConfig(offset=-5000)) == 1
    assert split_point(10, SplitConfig(threshold=2, tile=64)) == 5   # under a tile: plain half
    # per-size offsets override the flat offset from their token count up
    c = SplitConfig(offset=0, offsets=((2048, 128), (8192, -128)))
    assert [split_point(t, c) for t in (1024, 2048, 4096, 8192, 16384)] == [512, 1152, 2176, 3968, 8064]


def test_plan_split_kinds():
    cfg = SplitConfig(threshold=1024, tile=128)
    assert plan_split(1, 1000, cfg) is None
    # several sequences: between sequences when balanced
    p = plan_split(8, 512, cfg)
    assert p == SplitPlan("batch", 4, 8, 512) and p.tokens == (2048, 2048)
    assert p.shapes == ((4, 512), (4, 512))
    # one long prompt: inside the sequence
    p = plan_split(1, 4096, cfg)
    assert p == SplitPlan("seq", 2048, 1, 4096) and p.shapes == ((1, 2048), (1, 2048))
    # two sequences of 3000: a split between them is exact
    assert plan_split(2, 3000, cfg).kind == "batch"
    # three sequences of 1000: nearest cut (1 or 2 sequences) is 500 tokens off -> inside
    p = plan_split(3, 1000, cfg)
    assert p.kind == "seq" and p.n0 == 512 and p.tokens == (1536, 1464)
    # many 1-token rows (a full forward of a big batch): always between rows
    p = plan_split(2048, 1, cfg)
    assert p.kind == "batch" and p.tokens == (1024, 1024)


def test_table_roundtrip(tmp_path):
    cfg = get_preset("llama-3.3-70b")
    key = weave.model_key(cfg, 4)
    assert key == "h8192-f28672-q64-kv8-d128-tp4"
    tuned = SplitConfig(threshold=2048, tile=256, offset=128, offsets=((4096, 256),))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"default": SplitConfig().to_dict(), key: tuned.to_dict()}))
    table = weave.load_table(str(path))
    assert table[key] == tuned
    assert weave.config_for(cfg, 4, table) == tuned
    assert weave.config_for(cfg, 2, table) == SplitConfig()
    assert weave.load_table(str(tmp_path / "missing.json")) == {"default": SplitConfig()}
    assert weave.WEAVE_TABLE["default"].threshold == 1024   # the shipped table loads
    with pytest.raises(ValueError, match="overlap"):
        SplitConfig(overlap="sometimes")
    with pytest.raises(ValueError, match="comm_ctas"):
        SplitConfig(comm_ctas=-1)


# --------------------------------------------------------------------------- model logits

_cache: dict = {}


def _params(name):
    if name not in _cache:
        m = TPModel.random(get_preset(name), make_mesh(1), seed=1)
        _cache[name] = {k: to_host(v) for k, v in m.params.items()}
    return _cache[name]


def _model(name, tp, split):
    key = (name, tp, split)
    if key not in _cache:
        _cache[key] = TPModel(get_preset(name), _params(name), make_mesh(tp), split=split)
    return _cache[key]


SHAPES = {"seq": (1, 19), "batch": (4, 6)}


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    out = {}
    for kind, shape in SHAPES.items():
        toks = rng.integers(0, 256, shape).astype(np.int32)
        assert plan_split(*shape, SMALL).kind == kind
        out[kind] = (toks, to_host(_model("tiny-llama", 1, None).logits(toks)))
    return out


@pytest.mark.parametrize("kind", ["seq", "batch"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_split_logits_equal_unsplit(kind, tp, batches):
    toks, ref = batches[kind]
    got = to_host(_model("tiny-llama", tp, SMALL).logits(toks))
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)


def test_split_logits_qwen2_bias_tied():
    toks = np.random.default_rng(3).integers(0, 256, (1, 21)).astype(np.int32)
    ref = to_host(_model("tiny-qwen2", 1, None).logits(toks))
    np.testing.assert_allclose(to_host(_model("tiny-qwen2", 4, SMALL).logits(toks)), ref,
                               atol=ATOL, rtol=RTOL)


def test_below_threshold_is_unsplit(batches):
    toks, ref = batches["batch"]
    big = SplitConfig(threshold=10_000)
    np.testing.assert_array_equal(to_host(_model("tiny-llama", 2, big).logits(toks)),
                                  to_host(_model("tiny-llama", 2, None).logits(toks)))


# ------------------------------------------------------------------- prefill, then decode

@pytest.mark.parametrize("kind,tp", [("seq", 2), ("batch", 4), ("seq", 8)])
def test_prefill_split_then_decode(kind, tp):
    """Right-padded prompts prefilled with a split, then decode steps: the same logits as the
    unsplit model, so both halves wrote the cache where the unsplit prefill does."""
    split = SplitConfig(threshold=8, tile=1, max_imbalance=0.0)
    shape, lengths = {"seq": ((3, 7), [7, 3, 5]), "batch": ((4, 6), [6, 2, 5, 4])}[kind]
    assert plan_split(*shape, split).kind == kind
    rng = np.random.default_rng(2)
    toks = rng.integers(0, 256, shape).astype(np.int32)
    lengths = np.array(lengths, np.int32)
    for b, n in enumerate(lengths):
        toks[b, n:] = 0
    new = rng.integers(0, 256, (shape[0], 2)).astype(np.int32)
    results = []
    for s in (None, split):
        m = _model("tiny-llama", tp, s)
        cache = m.init_cache(shape[0], 12)
        logits, cache = m.prefill(toks, lengths, cache)
        steps = [to_host(logits)]
        for i in range(2):
            logits, cache = m.decode(new[:, i], cache)
            steps.append(to_host(logits))
        results.append(steps)
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------- overlap structure

def _model_logits(overlap, toks):
    cfg = get_preset("tiny-llama")
    m = TPModel(cfg, _params("tiny-llama"), make_mesh(2),
                split=SplitConfig(threshold=8, tile=4, overlap=overlap))
    x = m._input(toks, "tokens", 2)
    return m._logits_fn.lower(m.params, x).as_text(), to_host(m._logits_fn(m.params, x))


def test_overlap_structure():
    """With overlap (forced here; automatic on GPU with the CUDA impls) every pair is start,
    an optimization barrier, the other half's compute, done: one barrier per pair, 4 per layer,
    in the one scanned layer body. On CPU ("auto") there are none, and the logits are the same
    either way."""
    toks = np.random.default_rng(0).integers(0, 256, (1, 19)).astype(np.int32)
    txt_on, logits_on = _model_logits("force", toks)
    txt_auto, logits_auto = _model_logits("auto", toks)
    assert txt_on.count("stablehlo.optimization_barrier") == 4   # 4 pairs in the scanned layer
    assert "optimization_barrier" not in txt_auto
    np.testing.assert_array_equal(logits_on, logits_auto)
