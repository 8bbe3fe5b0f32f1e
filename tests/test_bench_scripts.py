"""CPU smoke tests of the benchmark scripts (tiny shapes, 8 host devices) and a correctness check
of the chunked-prefill path they time."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_tokenweave.bench import harness as bench
from jax_tokenweave import weave
from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import get_preset

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
                                       "--warmup", "1", "--chunk", "32", "--chunked-len", "64",
                                       "--decode-batch", "2", "--decode-steps", "2",
                                       "--out", str(tmp_path)])
    assert (tmp_path / "bench_model.md").exists() and (tmp_path / "bench_model.png").exists()
    assert all("median_us" in out["prefill"][f"{v}/xla"][64]
               for v in ("baseline", "fused", "tokenweave", "nocomm"))
    assert all("decode_tok_per_s" in out["chunked"][v] for v in ("baseline", "tokenweave"))


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


def test_chunked_prefill_matches_one_shot():
    """Chunked prefill (TokenWeave split inside each chunk, prefix from the cache) gives the
    one-shot prefill's hidden states for the last chunk, and decode runs on the filled cache."""
    cfg = get_preset("tiny-llama")
    mesh = make_mesh(4)
    L, T, C = 2, 48, 16
    w, wspecs = bench.random_layer(cfg, mesh, dtype=jnp.float32, num_layers=L)
    rep = NamedSharding(mesh, P())
    p = jax.device_put(0.5 * jax.random.normal(jax.random.key(0), (T, cfg.hidden_size)), rep)
    full, _ = bench.layer_stack_fn("fused", cfg, mesh, wspecs, tokens=T, num_layers=L,
                                   stacked=True)
    ref = np.asarray(full(w, p))[0]
    split = weave.SplitConfig(threshold=8, tile=4)
    cs = NamedSharding(mesh, P(None, None, None, "tp", None))
    shape = bench.cache_shape(cfg, 4, L, 1, T)
    ck, cv = (jax.device_put(jnp.zeros(shape), cs) for _ in range(2))
    for i in range(T // C):
        f = bench.chunk_fn("tokenweave", cfg, mesh, wspecs, chunk=C, offset=i * C, num_layers=L,
                           split=split)
        x, ck, cv = f(w, p[i * C:(i + 1) * C], ck, cv)
        np.testing.assert_allclose(np.asarray(x)[0], ref[i * C:(i + 1) * C], atol=1e-5, rtol=1e-5)
