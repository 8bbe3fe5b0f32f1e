"""Parity with Hugging Face transformers (torch, CPU, float32): random tiny Llama (Llama-3 rope
scaling, untied) and Qwen2 (q/k/v bias, tied) models, loaded through hf_keys.hf_to_param.

Tolerance: logits agree to atol=1e-4, rtol=1e-4 (float32)."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jax_tokenweave.parallel.mesh import make_mesh  # noqa: E402
from jax_tokenweave.models import from_hf_config, get_preset  # noqa: E402
from jax_tokenweave.models.config import to_hf_dict  # noqa: E402
from jax_tokenweave.models.hf_keys import check_complete, hf_to_param, is_ignored  # noqa: E402
from jax_tokenweave.models.layers import rope_inv_freq  # noqa: E402
from jax_tokenweave.engine.generate import Generator  # noqa: E402
from jax_tokenweave.engine.runner import TPModel, to_host  # noqa: E402

ATOL = RTOL = 1e-4
CASES = {
    # A shorter original context than the tiny preset, so all three RoPE bands (kept, blended,
    # slowed) occur among the 4 frequencies of head_dim 8 (wavelengths 6, 167, 4443, 1.2e5).
    "llama": (get_preset("tiny-llama"), dict(original_max_position_embeddings=200,
                                                high_freq_factor=25.0, factor=4.0),
              transformers.LlamaForCausalLM, transformers.LlamaConfig),
    "qwen2": (get_preset("tiny-qwen2"), None, transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
}


def _cfg(name):
    cfg, rope_kw = CASES[name][:2]
    if rope_kw:
        cfg = cfg.replace(rope_scaling=dataclasses.replace(cfg.rope_scaling, **rope_kw))
    return cfg


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request):
    name = request.param
    cfg = _cfg(name)
    _, _, model_cls, config_cls = CASES[name]
    torch.manual_seed(0)
    hf_cfg = config_cls(**to_hf_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = model_cls(hf_cfg).eval()
    # HF initialises norms to 1 and biases to 0; randomise everything so that a swapped norm or
    # a dropped bias shows up in the logits.
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.ndim == 1 and "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return name, cfg, hf_cfg, hf


def _convert(cfg, hf):
    flat = {}
    for key, t in hf.state_dict().items():
        out = hf_to_param(cfg, key, t.detach().numpy())
        if out is None:
            continue
        path, arr = out
        assert path not in flat, f"{key} maps to {path} twice"
        flat[path] = arr
    check_complete(cfg, flat)
    return flat


def test_config_roundtrip(hf_case, tmp_path):
    name, cfg, hf_cfg, _ = hf_case
    hf_cfg.save_pretrained(tmp_path)
    assert from_hf_config(tmp_path) == cfg
    assert from_hf_config(tmp_path / "config.json") == cfg


def test_rope_inv_freq_matches_hf(hf_case):
    _, cfg, _, hf = hf_case
    np.testing.assert_allclose(rope_inv_freq(cfg), hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("tp", [1, 4])
def test_logits_match_hf(hf_case, tp):
    name, cfg, _, hf = hf_case
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.float().numpy()
    model = TPModel(cfg, _convert(cfg, hf), make_mesh(tp))
    got = to_host(model.logits(tokens))
    print(f"{name} tp={tp}: max |ours - HF| = {np.abs(got - want).max():.2e}, max |HF| = {np.abs(want).max():.2f}")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    if tp == 1:
        # Prefill on right-padded prompts returns the HF logits at each prompt's last token.
        lengths = np.array([24, 11], np.int32)
        logits, _ = model.prefill(tokens, lengths, model.init_cache(2, 32))
        np.testing.assert_allclose(to_host(logits), want[np.arange(2), lengths - 1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_greedy_generation_matches_hf(hf_case, tp):
    """The engine's whole decode path (prefill into the paged cache, then one decode step per
    token, sampling inside the step) against transformers' greedy generate, token for token, for
    a ragged batch of two prompts; at tp 4 and 8 the 2 KV heads are replicated over ranks."""
    name, cfg, _, hf = hf_case
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (9, 4)]
    new = 12
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    gen = Generator(TPModel(cfg, _convert(cfg, hf), make_mesh(tp)))
    got = [r.tokens for r in gen.generate(prompts, max_new_tokens=new, ignore_eos=True)]
    assert got == want, f"{name} tp={tp}: greedy tokens differ from transformers"


def test_tied_lm_head_is_ignored_and_buffers_skipped(hf_case):
    _, cfg, _, hf = hf_case
    assert is_ignored(cfg, "model.layers.0.self_attn.rotary_emb.inv_freq")
    assert is_ignored(cfg, "lm_head.weight") == cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown HF key 'model.layers.0.mlp.experts.0.w1.weight'"):
        hf_to_param(cfg, "model.layers.0.mlp.experts.0.w1.weight", np.zeros((4, 4)))
    q = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    with pytest.raises(ValueError, match=r"q_proj.weight.*got shape \(128, 63\)"):
        hf_to_param(cfg, "model.layers.0.self_attn.q_proj.weight", q[:, :63])
    with pytest.raises(ValueError, match="layers.7"):
        hf_to_param(cfg, "model.layers.7.input_layernorm.weight", np.ones(64, np.float32))
