"""CPU smoke tests of the engine benchmarks (scripts/bench_decode.py, scripts/bench_serving.py) on
tiny-llama: result files written, rows and metrics complete and finite, skipped rows carry the
bytes they needed, every serving request completed; and the XLA-attention variant of the decode
benchmark really traces without the Pallas kernel. The transformers peer is skipped here (no
GPU); BENCH_TEST_PEER_CPU=1 runs the serving peer's subprocess on a tiny CPU model too."""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokenweave.engine import attention
from jax_tokenweave.engine.runner import TPModel
from jax_tokenweave.models import get_preset
from jax_tokenweave.parallel.mesh import make_mesh

ROOT = os.path.join(os.path.dirname(__file__), "..")
ROW_KEYS = ("batch", "capacity", "valid", "step_ms", "roofline_ms", "ratio_to_roofline", "generator_ms",
            "xla_step_ms")


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pos(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_decode_tiny(tmp_path):
    bd = _script("bench_decode")
    cfg = get_preset("tiny-llama")
    # TP2 (two of the 8 host devices); a per-device limit that (2, 128) exceeds and the other
    # pairs fit: the skip path runs on CPU too
    mesh = make_mesh(2)
    limit = bd.estimate_row_bytes(cfg, mesh, 2, 64, 4)
    assert bd.estimate_row_bytes(cfg, mesh, 2, 128, 4) > limit
    out = bd.main(["--tiny", "--tp", "2", "--out", str(tmp_path), "--mem-limit-bytes", str(limit)])
    assert out["info"]["tp"] == 2
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"decode_cpu.{ext}").exists(), ext
    data = json.load(open(tmp_path / "decode_cpu.json"))
    assert data["info"]["device"] and data["info"]["jax"] and data["info"]["command"]
    assert _pos(data["copy_bandwidth"]["bytes_per_s"])
    rows = data["rows"]
    measured = [r for r in rows if "step_ms" in r]
    skipped = [r for r in rows if "skipped" in r]
    assert {(r["batch"], r["capacity"]) for r in skipped} == {(2, 128)}
    assert {r["valid"] for r in skipped} == {16, 96}
    for r in skipped:
        assert r["bytes_needed"] > r["bytes_limit"] == limit
    assert {(r["batch"], r["capacity"], r["valid"]) for r in measured} == {
        (1, 64, 16), (1, 64, 32), (1, 128, 16), (1, 128, 96), (2, 64, 16), (2, 64, 32)}
    for r in measured:
        assert all(k in r for k in ROW_KEYS), r
        for k in ("step_ms", "roofline_ms", "ratio_to_roofline", "xla_step_ms"):   # xla: capacity <= 8192
            assert _pos(r[k]), (k, r)
        assert r["logits_finite"] and r["compiles_in_timing"] == 0, r
    gen_rows = [r for r in measured if r["generator_ms"] is not None]
    assert [(r["batch"], r["capacity"], r["valid"]) for r in gen_rows] == [(1, 64, 16)]
    assert _pos(gen_rows[0]["generator_ms"]) and _pos(gen_rows[0]["generator_over_step"])
    # the peer either ran (peer_ms on its rows) or says why not
    assert "skipped" in data["peer"] or any("peer_ms" in r for r in measured)
    assert out["rows"] == rows or len(out["rows"]) == len(rows)
    md = open(tmp_path / "decode_cpu.md").read()
    assert "ratio" in md and "skipped" in md


def test_bench_serving_tiny(tmp_path):
    args = ["--tiny", "--tp", "2", "--out", str(tmp_path)]   # TP2: the TokenWeave split is on
    if os.environ.get("BENCH_TEST_PEER_CPU") and importlib.util.find_spec("torch"):
        args += ["--peer-device", "cpu"]   # the peer's subprocess on a tiny CPU model (~15 s more)
    out = _script("bench_serving").main(args)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"serving_cpu.{ext}").exists(), ext
    data = json.load(open(tmp_path / "serving_cpu.json"))
    wl = data["workload"]
    assert wl["num_requests"] == 12 and wl["clip"] == [4, 32] and wl["distribution"].startswith("lognormal")
    assert wl["output_stats"]["max"] <= 32 and wl["input_stats"]["min"] >= 4
    e = data["results"]["engine"]
    assert e["all_completed"] and e["completed"] == e["requests"] == 12 and data["all_completed"]
    assert e["useful_output_tokens"] == wl["output_stats"]["total"]
    for k in ("requests_per_s", "output_tokens_per_s", "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median",
              "tpot_ms_p99"):
        assert _pos(data[k]), k
    assert 0.0 <= data["split_step_fraction"] <= 1.0
    assert e["split_at_boundary"] + e["split_in_chunk"] == e["split_steps"]
    assert e["compiles_in_timing"] == 0, e   # the full warm-up covered every step shape
    s = data["results"]["static"]
    assert s["requests"] == 12 and not s["subset"] and _pos(s["output_tokens_per_s"])
    assert s["useful_output_tokens"] == wl["output_stats"]["total"] and 0 < s["useful_fraction"] <= 1
    assert _pos(data["speedup_vs_static"])
    p = data["results"]["peer"]
    if "skipped" in p:
        assert data["speedup_vs_peer"] is None
    else:
        assert p["requests"] > 0 and _pos(p["output_tokens_per_s"]) and _pos(data["speedup_vs_peer"])
    assert out["speedup_vs_static"] == data["speedup_vs_static"]
    assert "speedup_vs_static" in open(tmp_path / "serving_cpu.md").read()


def _has_pallas(jaxpr) -> bool:
    return "pallas_call" in str(jaxpr)


def test_xla_variant_traces_without_kernel(monkeypatch):
    """patched_decode_attention swaps the Pallas decode kernel for the XLA reference (tracing
    only, nothing compiled; the kernel path forced as on GPU), and puts the switch back afterwards."""
    monkeypatch.setattr(attention, "use_kernels", lambda: True)
    bd = _script("bench_decode")
    cfg = get_preset("tiny-llama")
    mesh = make_mesh(1)
    model = TPModel.random(cfg, mesh, dtype=jnp.float32)
    cache = model.init_cache(1, 32)
    tok = jnp.zeros((1,), jnp.int32)
    kernel_path = attention.use_kernels
    assert _has_pallas(jax.make_jaxpr(model.decode_fn)(model.params, tok, cache))
    xla_model = TPModel(cfg, model.params, mesh)
    with bd.patched_decode_attention():
        assert not _has_pallas(jax.make_jaxpr(xla_model.decode_fn)(xla_model.params, tok, cache))
    assert attention.use_kernels is kernel_path   # restored
    assert _has_pallas(jax.make_jaxpr(TPModel(cfg, model.params, mesh).decode_fn)(model.params, tok, cache))


@pytest.mark.parametrize("kind, slug", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100_80gb_hbm3"),
                                        ("cpu", "cpu")])
def test_device_slug(kind, slug):
    bd = _script("bench_decode")
    assert bd.device_slug(kind, "cpu" if kind == "cpu" else "gpu") == slug


def test_workload_is_seeded_and_clipped():
    bs = _script("bench_serving")
    a = bs.parse(["--num-requests", "64", "--seed", "3"])
    w1, w2 = bs.make_workload(a, 1000), bs.make_workload(a, 1000)
    assert w1["prompts"] == w2["prompts"] and w1["output_lens"] == w2["output_lens"]
    lens = np.array([len(p) for p in w1["prompts"]])
    assert lens.min() >= 4 and lens.max() <= 2000 and np.array(w1["output_lens"]).max() <= 2000
    assert 100 < np.median(lens) < 400   # median ~200


def test_profile_decode_tiny(tmp_path):
    """scripts/profile_decode.py end to end on CPU (no GPU kernels in the trace: the breakdown
    says so instead of failing), with the default build and one split-target variant."""
    pd = _script("profile_decode")
    res = pd.main(["--model", "tiny-llama", "--batches", "1", "--variants", "default,attn_programs_528",
                   "--variant-batches", "1", "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "profile_decode.json"))
    bw = data["copy_bandwidth"]
    assert bw["bytes_per_s"] == max(bw["methods_bytes_per_s"].values()) > 0
    assert data["batches"]["1"]["step_ms"] > 0
    assert "no GPU kernel events" in data["batches"]["1"]["error"]   # CPU: nothing to break down
    assert data["generator_b1"]["generator_ms"] > 0
    assert data["variants"]["default@b1"]["step_ms"] > 0 and res["info"]["command"]
    assert data["variants"]["attn_programs_528@b1"]["variant"] == {"target_programs": 528}
    assert data["variants"]["attn_programs_528@b1"]["step_ms"] > 0
