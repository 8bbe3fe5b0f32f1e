"""The continuous-batching engine (engine/llm.py): greedy tokens equal static-batch generation
at TP 1/2/4/8, with and without TokenWeave's split of mixed steps, through chunked prefill and
preemption; every request completes or says why not."""
import numpy as np
import pytest

from jax_tokenweave import weave
from jax_tokenweave.engine.generate import Generator
from jax_tokenweave.engine.llm import LLM
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.models import get_preset
from jax_tokenweave.parallel.mesh import make_mesh

CFG = get_preset("tiny-llama")
NEW = 10


@pytest.fixture(scope="module")
def params():
    return {k: to_host(v) for k, v in TPModel.random(CFG, make_mesh(1), seed=2).params.items()}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [list(map(int, rng.integers(1, CFG.vocab_size, n))) for n in (7, 33, 3, 50, 18, 1)]


@pytest.fixture(scope="module")
def static_tokens(params, prompts):
    gen = Generator(TPModel(CFG, params, make_mesh(1)))
    return [r.tokens for r in gen.generate(prompts, max_new_tokens=NEW, ignore_eos=True)]


@pytest.mark.parametrize("tp,split", [(1, False), (2, True), (4, False), (4, True), (8, True)])
def test_continuous_equals_static(params, prompts, static_tokens, tp, split):
    """A 32-token budget chunks the long prompts and mixes them with decode tokens; with the
    split on, steps of >= 16 tokens run as two overlapped halves, cut inside prefill chunks (at
    most three decode tokens are there to close a gap)."""
    cfg = weave.SplitConfig(threshold=16, tile=4) if split else None
    llm = LLM(TPModel(CFG, params, make_mesh(tp), split=cfg), max_num_batched_tokens=32, max_num_seqs=4,
              num_pages=64, max_model_len=128)
    outs = llm.generate(prompts, max_new_tokens=NEW, ignore_eos=True, progress=False)
    assert [o.tokens for o in outs] == static_tokens
    assert all(o.finish_reason == "length" and o.ttft_s > 0 for o in outs)
    assert (llm.stats.split_steps > 0) == split
    assert llm.stats.split_at_boundary + llm.stats.split_in_chunk == llm.stats.split_steps
    assert llm.block_manager.num_free == llm.block_manager.num_usable   # every page back


@pytest.mark.parametrize("tp", [2, 4])
def test_split_steps_cut_between_whole_sequences(params, tp):
    """Up to six requests at once, finishing at different lengths, so later prompts are admitted
    beside running decodes: split steps are laid out with whole sequences before the cut where
    the decode tokens can close the gap (here prefill 2 + 14 = 16 and 7 + 1 = 8 of the cuts at 16
    and 8) and inside a prefill chunk otherwise; tokens still equal static generation."""
    rng = np.random.default_rng(6)
    prompts = [list(map(int, rng.integers(1, CFG.vocab_size, n))) for n in (40, 9, 12, 5, 14, 3, 11, 7)]
    max_new = [3, 10, 6, 8, 4, 10, 5, 9]
    ref = Generator(TPModel(CFG, params, make_mesh(1))).generate(prompts, max_new_tokens=max(max_new),
                                                                  ignore_eos=True)
    llm = LLM(TPModel(CFG, params, make_mesh(tp), split=weave.SplitConfig(threshold=16, tile=4)),
              max_num_batched_tokens=32, max_num_seqs=6, num_pages=64, max_model_len=128)
    outs = llm.generate(prompts, max_new_tokens=max_new, ignore_eos=True, progress=False)
    assert [o.tokens for o in outs] == [r.tokens[:n] for r, n in zip(ref, max_new)]
    st = llm.stats
    assert st.split_at_boundary >= 2 and st.split_in_chunk >= 1, st
    assert st.split_at_boundary + st.split_in_chunk == st.split_steps


def test_preemption_recomputes_to_the_same_tokens(params, prompts):
    """Six usable pages of 16 tokens for sequences that grow to 96 positions together: running
    requests are preempted when decode needs a page, and recomputed later; tokens unchanged."""
    new = 30
    ref = Generator(TPModel(CFG, params, make_mesh(1))).generate(prompts, max_new_tokens=new, ignore_eos=True)
    llm = LLM(TPModel(CFG, params, make_mesh(2)), max_num_batched_tokens=64, max_num_seqs=6,
              num_pages=7, max_model_len=128)
    outs = llm.generate(prompts, max_new_tokens=new, ignore_eos=True, progress=False)
    assert llm.stats.preemptions > 0 and sum(o.num_preemptions for o in outs) == llm.stats.preemptions
    assert [o.tokens for o in outs] == [r.tokens for r in ref]


def test_every_request_completes_or_says_why(params, prompts):
    llm = LLM(TPModel(CFG, params, make_mesh(1)), max_num_batched_tokens=32, max_num_seqs=4,
              num_pages=12, max_model_len=64)
    reqs = [prompts[0], list(range(1, 70)), [], prompts[2]]
    outs = llm.generate(reqs, max_new_tokens=[5, 5, 5, 62], ignore_eos=True, progress=False)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "error"]
    assert len(outs[0].tokens) == 5 and all(o.tokens == [] for o in outs[1:])
    assert "exceeds max_model_len (64)" in outs[1].error and "shorten the prompt" in outs[1].error
    assert "empty" in outs[2].error
    assert "exceeds max_model_len (64)" in outs[3].error
    small = LLM(llm.model, max_num_batched_tokens=32, max_num_seqs=4, num_pages=3, max_model_len=64)
    (o,) = small.generate([prompts[3]], max_new_tokens=5, ignore_eos=True, progress=False)
    assert o.finish_reason == "error" and "KV-cache pages" in o.error and "raise num_pages" in o.error, o.error


def test_stop_tokens_end_requests(params, prompts, static_tokens):
    """A request ends at a stop id (not included), the others run on."""
    stop = static_tokens[1][3]
    llm = LLM(TPModel(CFG, params, make_mesh(1)), max_num_batched_tokens=32, max_num_seqs=4,
              num_pages=64, max_model_len=128)
    llm.stop_ids = frozenset({stop})
    outs = llm.generate(prompts, max_new_tokens=NEW, progress=False)
    for o, ref in zip(outs, static_tokens):
        if stop in ref:
            assert o.finish_reason == "stop" and o.tokens == ref[:ref.index(stop)]
        else:
            assert o.finish_reason == "length" and o.tokens == ref
