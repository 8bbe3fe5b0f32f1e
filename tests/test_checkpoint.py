"""HF safetensors folder -> Orbax -> sharded arrays: round trip onto TP meshes, strict key checks,
atomicity, bounded host memory, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from hf_llama_shapes import hf_llama_shapes  # noqa: E402  (tests/, on pytest's path)
from jax_tokenweave.model_io import checkpoint as ckpt  # noqa: E402
from jax_tokenweave.model_io.checkpoint import (CheckpointError, convert_hf_to_orbax, load_checkpoint,  # noqa: E402
                                       save_params)
from jax_tokenweave.parallel.mesh import make_mesh  # noqa: E402
from jax_tokenweave.models import hf_keys  # noqa: E402
from jax_tokenweave.models.config import get_preset, to_hf_dict  # noqa: E402
from jax_tokenweave.models.llama import unstack_layers
from jax_tokenweave.engine.runner import TPModel, to_host  # noqa: E402
from jax_tokenweave.parallel.sharding import param_shardings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
          "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}


def _hf_model(name: str, seed: int = 0):
    cfg = get_preset(f"tiny-{name}")
    model_cls, config_cls = MODELS[name]
    torch.manual_seed(seed)
    hf_cfg = config_cls(**to_hf_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = model_cls(hf_cfg).eval()
    with torch.no_grad():  # randomise norms and biases too, so a swapped tensor shows
        for pname, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if "norm" in pname else 0.0))
    return cfg, hf


def _tiny_tokenizer_files(d):
    """A byte-level BPE tokenizer.json + tokenizer_config.json (with a chat template) in `d`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from jax_tokenweave.model_io.tokenizer import _bytes_to_unicode
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    vocab["Ġt"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                   "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"},
                  f)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    """A tiny random model saved by transformers in sharded safetensors (with an index)."""
    name = request.param
    cfg, hf = _hf_model(name)
    d = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(d, max_shard_size="40KB", safe_serialization=True)
    assert (d / "model.safetensors.index.json").exists()
    _tiny_tokenizer_files(d)
    return name, cfg, hf, d


def _expected_params(cfg, hf):
    flat = {}
    for key, t in hf.state_dict().items():
        out = hf_keys.hf_to_param(cfg, key, t.detach().numpy())
        if out is not None:
            flat[out[0]] = out[1]
    return flat


def _no_leftovers(out):
    parent, base = os.path.dirname(out), os.path.basename(out)
    return not os.path.exists(out) and not [n for n in os.listdir(parent) if n.startswith(base + ".")]


@pytest.mark.parametrize("tp", [1, 4])
def test_round_trip_onto_mesh(hf_dir, tmp_path, tp):
    name, cfg, hf, d = hf_dir
    out = convert_hf_to_orbax(d, tmp_path / "ck", progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "jax_tokenweave.json", "params", "tokenizer"]
    mesh = make_mesh(tp)
    cfg2, params, tok = load_checkpoint(out, mesh)
    assert cfg2 == cfg
    want_shardings = param_shardings(cfg, mesh)
    expected = _expected_params(cfg, hf)
    assert set(params) == set(expected) == set(hf_keys.param_shapes(cfg))
    for k, arr in params.items():
        assert arr.sharding.is_equivalent_to(want_shardings[k], arr.ndim), k
        assert arr.dtype == np.float32, k
        np.testing.assert_array_equal(to_host(arr) if arr.is_fully_replicated else np.asarray(arr),
                                      expected[k], err_msg=k)
    # Each device holds only its shard: nothing was gathered on one device.
    q = params["layers.0.attn.q_proj.kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(cfg.hidden_size, cfg.num_heads // tp,
                                                             cfg.head_dim)}
    # The tokenizer travelled with the checkpoint.
    # (<s>, </s> follow the 257 BPE tokens; the HF config's own eos_token_id joins the EOS set)
    assert tok.bos_id == 257 and tok.eos_id == 258 and 258 in tok.eos_ids and tok.add_bos
    assert tok.encode("hi there") == [257] + tok.encode("hi there", add_bos=False)
    assert tok.decode(tok.encode("héllo tu", add_bos=False)) == "héllo tu"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<user>x</s><assistant>"


def test_logits_after_round_trip_match_transformers(hf_dir, tmp_path):
    name, cfg, hf, d = hf_dir
    out = convert_hf_to_orbax(d, tmp_path / "ck", progress=False)
    _, params, _ = load_checkpoint(out, make_mesh(4))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7), dtype=np.int32)
    ours = to_host(TPModel(cfg, params, make_mesh(4)).logits(tokens))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_dtype_on_convert_and_on_load(hf_dir, tmp_path):
    name, cfg, hf, d = hf_dir
    out = convert_hf_to_orbax(d, tmp_path / "ck", dtype="bfloat16", progress=False)
    manifest = ckpt.read_manifest(out)
    assert {v["dtype"] for v in manifest["params"].values()} == {"bfloat16"}
    _, p16, _ = load_checkpoint(out, make_mesh(2))
    _, p32, _ = load_checkpoint(out, make_mesh(2), dtype="float32")
    k = "layers.1.mlp.down_proj.kernel"
    assert p16[k].dtype.name == "bfloat16" and p32[k].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(p16[k]).astype(np.float32), np.asarray(p32[k]))
    np.testing.assert_allclose(np.asarray(p32[k]), _expected_params(cfg, hf)[k], rtol=1e-2, atol=1e-2)


def test_save_params_round_trip(tmp_path):
    cfg = get_preset("tiny-llama")
    model = TPModel.random(cfg, make_mesh(2), seed=3)
    out = save_params(tmp_path / "ck", cfg, {k: np.asarray(v) for k, v in model.params.items()})
    cfg2, params, tok = load_checkpoint(out, make_mesh(8))
    assert cfg2 == cfg and tok is None
    per_layer = unstack_layers({k: np.asarray(v) for k, v in model.params.items()})   # the checkpoint layout
    assert set(params) == set(per_layer)
    for k, v in per_layer.items():
        np.testing.assert_array_equal(np.asarray(params[k]), v, err_msg=k)


# ----------------------------------------------------------------------- broken checkpoints

@pytest.fixture
def single_file_dir(tmp_path):
    """tiny-llama in one model.safetensors (easy to edit); returns (cfg, dir, tensors)."""
    cfg, hf = _hf_model("llama", seed=1)
    d = tmp_path / "hf"
    hf.save_pretrained(d, safe_serialization=True)
    assert (d / "model.safetensors").exists()
    return cfg, d, load_file(d / "model.safetensors")


def _rewrite(d, tensors):
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _convert_fails(d, out, match):
    with pytest.raises(CheckpointError, match=match) as info:
        convert_hf_to_orbax(d, out, progress=False)
    assert _no_leftovers(str(out))
    return str(info.value)


def test_missing_tensor_is_named(single_file_dir, tmp_path):
    cfg, d, t = single_file_dir
    del t["model.layers.1.mlp.up_proj.weight"]
    _rewrite(d, t)
    msg = _convert_fails(d, tmp_path / "out", "missing tensor 'model.layers.1.mlp.up_proj.weight'")
    assert "layers.1.mlp.up_proj.kernel" in msg


def test_extra_tensor_is_named(single_file_dir, tmp_path):
    cfg, d, t = single_file_dir
    t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    t["model.layers.7.input_layernorm.weight"] = np.ones(cfg.hidden_size, np.float32)  # no layer 7
    _rewrite(d, t)
    msg = _convert_fails(d, tmp_path / "out", "unexpected tensor 'model.layers.0.self_attn.extra_proj.weight'")
    assert "model.layers.7.input_layernorm.weight" in msg


def test_misshaped_tensor_is_named(single_file_dir, tmp_path):
    cfg, d, t = single_file_dir
    w = t["model.layers.0.self_attn.k_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((w.shape[0] + 8, w.shape[1]), w.dtype)
    t["model.layers.1.mlp.gate_proj.weight"] = np.ascontiguousarray(t["model.layers.1.mlp.gate_proj.weight"].T)
    _rewrite(d, t)
    msg = _convert_fails(d, tmp_path / "out", "mis-shaped tensor 'model.layers.0.self_attn.k_proj.weight'")
    assert "mis-shaped tensor 'model.layers.1.mlp.gate_proj.weight'" in msg


def test_missing_config_is_named(single_file_dir, tmp_path):
    cfg, d, t = single_file_dir
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_hf_to_orbax(d, tmp_path / "out", progress=False)
    assert _no_leftovers(str(tmp_path / "out"))


def test_missing_shard_file_is_named(hf_dir, tmp_path):
    name, cfg, hf, d = hf_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    for f in os.listdir(d):
        if f != files[1]:
            os.symlink(d / f, broken / f)
    _convert_fails(broken, tmp_path / "out", files[1])


def test_failure_midway_leaves_nothing(single_file_dir, tmp_path, monkeypatch):
    cfg, d, _ = single_file_dir
    real, calls = hf_keys.hf_to_param, []

    def flaky(cfg, key, tensor):
        calls.append(key)
        if len(calls) == 6:
            raise RuntimeError("disk on fire")
        return real(cfg, key, tensor)

    monkeypatch.setattr(hf_keys, "hf_to_param", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_hf_to_orbax(d, out, progress=False)
    assert _no_leftovers(str(out))
    with pytest.raises(FileNotFoundError, match="not a jax_tokenweave checkpoint"):
        load_checkpoint(out, make_mesh(1))


def test_existing_output_needs_overwrite(single_file_dir, tmp_path):
    cfg, d, _ = single_file_dir
    out = convert_hf_to_orbax(d, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_hf_to_orbax(d, out, progress=False)
    convert_hf_to_orbax(d, out, progress=False, overwrite=True, dtype="float16")
    assert _no_leftovers(str(tmp_path / "nothing"))
    assert [n for n in os.listdir(tmp_path) if n.startswith("out")] == ["out"]
    assert {v["dtype"] for v in ckpt.read_manifest(out)["params"].values()} == {"float16"}


def test_host_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Peak numpy allocation while converting stays a small multiple of the largest tensor,
    far below the model's size (tracemalloc sees numpy's buffers, including orbax's copies)."""
    cfg = get_preset("tiny-llama").replace(num_layers=12, hidden_size=256, intermediate_size=1024,
                                           num_heads=8, head_dim=32, vocab_size=1024)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(to_hf_dict(cfg)))
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in hf_llama_shapes(cfg).items()}
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    save_file(tensors, d / "model.safetensors")
    del tensors
    # The same conversion once untraced: imports, caches and orbax's event loop / thread pools
    # (whose one-off buffers depend on what ran before in the process) are set up outside the window.
    convert_hf_to_orbax(d, tmp_path / "warm-up", progress=False)
    tracemalloc.start()
    try:
        convert_hf_to_orbax(d, tmp_path / "out", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 20 * largest
    assert peak < 4 * largest + 4 * 2**20, (peak, largest, total)


def test_cli(single_file_dir, tmp_path):
    cfg, d, _ = single_file_dir
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_hf.py"), "--hf-dir",
                        str(d), "--out", str(out), "--dtype", "bfloat16", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ckpt.is_checkpoint(out) and ckpt.load_config(out) == cfg
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_hf.py"), "--hf-dir",
                        str(d), "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_load_under_jax_distributed(tmp_path):
    """Two processes (4 CPU devices each) restore one checkpoint onto a tp=8 mesh spanning both:
    each reads only its own devices' shards."""
    from jax_tokenweave.parallel.distributed import free_port
    cfg = get_preset("tiny-llama")
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in hf_keys.param_shapes(cfg).items()}
    out = save_params(tmp_path / "ck", cfg, params)
    np.savez(tmp_path / "expected.npz", **params)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    coord = f"127.0.0.1:{free_port()}"
    script = os.path.join(REPO, "tests", "_mp_load_checkpoint.py")
    procs = [subprocess.Popen([sys.executable, script, coord, str(i), out, str(tmp_path / "expected.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{o[-4000:]}"
        assert f"process {i}: {len(params)} params" in o
