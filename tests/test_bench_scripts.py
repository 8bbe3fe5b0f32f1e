"""CPU smoke tests of the benchmark scripts (tiny shapes, 8 host devices) and a check that the
benchmark variants run the model: the correct ones give the model's hidden states."""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_tokenweave.bench import harness as bench
from jax_tokenweave import weave
from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.compat import shard_map
from jax_tokenweave.engine import attention
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.models import get_preset, transformer
from jax_tokenweave.models.layers import LayerSpec, rope_inv_freq
from jax_tokenweave.parallel.mesh import make_mesh

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_layer_smoke(tmp_path):
    out = _script("bench_layer").main(["--tiny", "--tp", "4", "--tokens", "64", "--layers", "2",
                                       "--iters", "1", "--warmup", "1", "--profile",
                                       "--out", str(tmp_path)])
    for f in ("bench_layer.json", "bench_layer.md", "bench_layer.png", "profile_tokenweave.png"):
        assert (tmp_path / f).exists(), f
    r = out["results"]
    assert set(r) == set(bench.VARIANTS) and all("per_layer_us" in r[v][64] for v in r)
    for v in ("baseline", "xla_split", "tokenweave"):   # correct variants agree with fused
        assert r[v][64]["max_abs_diff_vs_fused"] < 1e-4
    assert json.load(open(tmp_path / "bench_layer.json"))["info"]["tp"] == 4


def test_bench_model_smoke(tmp_path):
    out = _script("bench_model").main(["--tiny", "--tp", "2", "--tokens", "64", "--iters", "1",
                                       "--warmup", "1", "--decode-batch", "2", "--decode-context", "20",
                                       "--decode-steps", "2", "--out", str(tmp_path)])
    assert (tmp_path / "bench_model.md").exists() and (tmp_path / "bench_model.png").exists()
    assert all("median_us" in out["prefill"][f"{v}/xla"][64]
               for v in ("baseline", "fused", "tokenweave", "nocomm"))
    dec = out["decode"]["fused"]
    assert dec["decode_tok_per_s"] > 0 and dec["decode_step_ms"] > 0 and dec["logits_finite"], dec
    assert (dec["decode_batch"], dec["decode_context"]) == (2, 20)
    assert "Decode" in open(tmp_path / "bench_model.md").read()


def test_tune_split_smoke(tmp_path):
    table = tmp_path / "table.json"
    entry = _script("tune_split").main(["--tiny", "--tp", "2", "--tokens", "32,64",
                                        "--offsets=-8", "--tile", "16", "--comm-ctas", "0,4", "--comm-ctas-mlp", "2",
                                        "--layers", "1", "--iters", "1", "--table", str(table)])
    raw = json.load(open(table))
    key = weave.model_key(get_preset("tiny-llama"), 2)
    cfg = weave.load_table(str(table))[key]
    assert cfg == entry and cfg.tile == 16 and cfg.comm_ctas in (0, 4) and cfg.comm_ctas_mlp in (0, 2)
    assert set(dict(cfg.offsets).values()) <= {-8}
    measured = raw[key]["_measured"]["us_per_layer"]
    assert set(measured["fused"]) == {"32", "64"}
    assert cfg.threshold in (32, 64, 128)   # a measured size, or above all (never split)


def _model_hidden(cfg, tokens, dtype):
    """The reference: models.transformer.forward on one device (tp 1, nothing to reduce), the
    same random weights (a function of seed and index, not of the sharding)."""
    mesh1 = make_mesh(1)
    w = bench.random_weights(cfg, mesh1, dtype=dtype)
    B, S = tokens.shape

    def body(w, ids):
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        x, _ = transformer.forward(w, ids, pos, spec=LayerSpec.of(cfg), inv_freq=rope_inv_freq(cfg),
                                   reduce=Reducer("psum", "tp", cfg.rms_norm_eps),
                                   attend=attention.causal("xla"))
        return x
    fn = shard_map(body, mesh=mesh1, in_specs=(bench.weight_specs(cfg, mesh1), P()), out_specs=P(),
                   check_vma=False)
    return np.asarray(jax.jit(fn)(w, jnp.asarray(tokens)))


@pytest.mark.parametrize("batch", [1, 2])
def test_variants_match_model(batch):
    """Every variant of layer_stack_fn but nocomm gives the model's final normed hidden states:
    fused against models.transformer.forward run directly (tp 1) and against TPModel.logits (its
    LM head applied to the hidden states), baseline / xla_split / tokenweave against fused
    (split actually cut: kind "seq" for one prompt, "batch" for two; tokenweave's start/done
    structure forced). nocomm, the no-communication ideal, does not."""
    cfg = get_preset("tiny-llama")
    mesh = make_mesh(4)
    T = 48
    w = bench.random_weights(cfg, mesh, dtype=jnp.float32)
    ids = bench.token_ids(mesh, batch, T // batch, cfg.vocab_size, seed=3)
    split = weave.SplitConfig(threshold=8, tile=4, overlap="force")
    outs = {}
    for v in bench.VARIANTS:
        fn, plan = bench.layer_stack_fn(v, cfg, mesh, tokens=T, batch=batch, split=split)
        if v in ("xla_split", "tokenweave"):
            assert plan is not None and plan.kind == ("seq" if batch == 1 else "batch"), plan
        else:
            assert plan is None
        outs[v] = np.asarray(fn(w, ids))
        assert outs[v].shape == (batch, T // batch, cfg.hidden_size)
    ref = _model_hidden(cfg, np.asarray(ids), jnp.float32)
    np.testing.assert_allclose(outs["fused"], ref, atol=1e-5, rtol=1e-5)
    logits = to_host(TPModel(cfg, w, mesh).logits(np.asarray(ids)))
    np.testing.assert_allclose(outs["fused"] @ np.asarray(w["lm_head.kernel"]), logits, atol=1e-4, rtol=1e-4)
    for v in ("baseline", "xla_split", "tokenweave"):
        np.testing.assert_allclose(outs[v], outs["fused"], atol=1e-5, rtol=1e-5, err_msg=v)
    assert not np.allclose(outs["nocomm"], outs["fused"], atol=1e-2), "nocomm drops the reductions"


def test_variant_split_forced_below_threshold():
    """xla_split / tokenweave split every size (threshold 2 below the config's threshold, same
    tile and offset, overlap and CTA counts kept); the others never split."""
    split = weave.SplitConfig(threshold=1024, tile=16, offset=4, comm_ctas=8, overlap="off",
                              offsets=((512, 8),))
    forced = bench.variant_split("tokenweave", 1, 64, split)
    assert (forced.threshold, forced.tile, forced.offset, forced.offsets) == (2, 16, 4, ())
    assert (forced.comm_ctas, forced.overlap) == (8, "off")
    assert bench.variant_split("xla_split", 1, 2048, split) is split   # the config cuts it itself
    assert all(bench.variant_split(v, 1, 2048, split) is None for v in ("baseline", "fused", "nocomm"))
    kinds = {v: bench.make_reducer(v, get_preset("tiny-llama")).kind for v in bench.VARIANTS}
    assert kinds == dict(baseline="psum", xla_split="psum", fused="fused", tokenweave="fused", nocomm="nocomm")


@pytest.mark.parametrize("n,prefix", [(8, 0), (16, 40)])
def test_bench_paged_attention_chunk_variants_match_the_reference(n, prefix):
    """Section (f)'s cuDNN variants (through XLA here, as under --smoke) attend like the paged
    reference: the chunk's queries are the last n positions of its context; plain is_causal is
    top-left aligned, so it is wrong as soon as there is a prefix."""
    bpa = _script("bench_paged_attention")
    bpa.CUDNN_IMPL = "xla"
    ps, ctx = 16, n + prefix
    pages = -(-ctx // ps)
    rng = np.random.default_rng(n + prefix)
    kp, vp = (jnp.asarray(rng.normal(size=(2, 2, pages + 1, ps, 16)), jnp.bfloat16) for _ in "kv")
    q = jnp.asarray(rng.normal(size=(n, 8, 16)), jnp.bfloat16)
    bt = jnp.arange(pages, 0, -1, dtype=jnp.int32)[None]          # pages out of order
    ref = bpa.pa.paged_attention_reference(q, kp, vp, bt, jnp.asarray([ctx], jnp.int32), 1,
                                           query_start=jnp.asarray([0, n], jnp.int32), num_seqs=1)
    k, v = jax.jit(bpa.gather_dense, static_argnums=(3, 4))(kp, vp, bt, 1, ctx)
    assert k.shape == (1, ctx, 2, 16)
    for variant in bpa.CHUNK_VARIANTS:   # jitted: eager dispatch compiles every op (seconds each)
        e = bpa.errs(jax.jit(functools.partial(bpa.chunk_attention, variant))(q[None], k, v)[0], ref)
        assert e["rel_fro_err"] < bpa.CHUNK_TOL, (variant, e)
    if prefix:
        assert bpa.causal_alignment(q, k, v, ref)["alignment"] == "top-left"
