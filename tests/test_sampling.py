"""Sampling: greedy, temperature, top-k and top-p, checked statistically with fixed seeds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokenweave.engine.sampler import (SamplingParams, as_arrays, filter_logits, request_keys,
                                     sample_step)

# a known distribution over 8 tokens, in a shuffled vocabulary order
PROBS = np.array([0.05, 0.30, 0.02, 0.20, 0.15, 0.01, 0.12, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)
N = 4000


def draw(params: SamplingParams, n=N, logits=LOGITS):
    """n draws: n requests with the same logits and seeds params.seed + i, one step."""
    ps = [SamplingParams(params.temperature, params.top_k, params.top_p, params.seed + i)
          for i in range(n)]
    t, k, p = as_arrays(ps)
    toks = sample_step(jnp.broadcast_to(logits, (n, logits.shape[-1])), request_keys([q.seed for q in ps]),
                       0, t, k, p)
    return np.asarray(toks)


def freqs(toks, v=8):
    return np.bincount(toks, minlength=v) / len(toks)


def expected(keep):
    q = np.where(keep, PROBS, 0.0)
    return q / q.sum()


def assert_close(f, q):
    # 4000 draws: the standard error of a frequency is <= 0.008; allow ~4.5 sigma
    np.testing.assert_allclose(f, q, atol=0.035)


def test_greedy_is_argmax():
    rng = np.random.RandomState(0)
    logits = rng.randn(5, 100).astype(np.float32)
    t, k, p = as_arrays([SamplingParams()] * 5)
    toks = sample_step(logits, request_keys(range(5)), 3, t, k, p)
    np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))


def test_temperature_one_matches_softmax():
    assert_close(freqs(draw(SamplingParams(temperature=1.0, seed=11))), PROBS)


def test_top_k_keeps_only_k_most_likely():
    toks = draw(SamplingParams(temperature=1.0, top_k=3, seed=100))
    top3 = np.argsort(-PROBS, kind="stable")[:3]  # ties (ids 4, 7) go to the lower id
    assert set(np.unique(toks)) <= set(top3.tolist())
    keep = np.zeros(8, bool)
    keep[top3] = True
    assert_close(freqs(toks), expected(keep))


def test_top_p_keeps_the_nucleus():
    # sorted probs .30 .20 .15 .15 .12 ...; mass before each: 0 .30 .50 .65 .80 -> top_p=0.6 keeps 3
    toks = draw(SamplingParams(temperature=1.0, top_p=0.6, seed=7))
    # ids 4 and 7 tie at .15; the stable sort keeps the lower id first
    kept = set(np.unique(toks).tolist())
    assert kept <= {1, 3, 4}, kept
    keep = np.zeros(8, bool)
    keep[[1, 3, 4]] = True
    assert_close(freqs(toks), expected(keep))


def test_top_p_always_keeps_the_top_token():
    toks = draw(SamplingParams(temperature=1.0, top_p=0.01, seed=3), n=200)
    assert set(np.unique(toks).tolist()) == {1}


def test_top_k_then_top_p():
    # top_k=4 keeps .30 .20 .15 .15 (ids 1 3 4 7); renormalised .375 .25 .1875 .1875;
    # top_p=0.7: mass before: 0 .375 .625 .8125 -> keeps ids 1 3 4
    srt, order = filter_logits(jnp.asarray(LOGITS)[None], jnp.array([1.0]), jnp.array([4]),
                               jnp.array([0.7]))
    kept = np.asarray(order[0])[np.isfinite(np.asarray(srt[0]))]
    assert sorted(kept.tolist()) == [1, 3, 4]
    toks = draw(SamplingParams(temperature=1.0, top_k=4, top_p=0.7, seed=5))
    keep = np.zeros(8, bool)
    keep[[1, 3, 4]] = True
    assert_close(freqs(toks), expected(keep))


def test_low_temperature_concentrates_high_spreads():
    cold = freqs(draw(SamplingParams(temperature=0.25, seed=21)))
    hot = freqs(draw(SamplingParams(temperature=4.0, seed=21)))
    p_cold = PROBS ** 4 / (PROBS ** 4).sum()
    p_hot = PROBS ** 0.25 / (PROBS ** 0.25).sum()
    assert_close(cold, p_cold)
    assert_close(hot, p_hot)


def test_seed_reproducible_and_independent_of_batch():
    rng = np.random.RandomState(1)
    logits = rng.randn(4, 50).astype(np.float32)
    ps = [SamplingParams(1.0, 0, 1.0, s) for s in (5, 6, 7, 8)]
    keys = request_keys([p.seed for p in ps])
    a = np.asarray(sample_step(logits, keys, 9, *as_arrays(ps)))
    b = np.asarray(sample_step(logits, keys, 9, *as_arrays(ps)))
    np.testing.assert_array_equal(a, b)
    # request 2 alone, and in another batch position: same token
    solo = np.asarray(sample_step(logits[2:3], keys[2:3], 9, *as_arrays(ps[2:3])))
    assert solo[0] == a[2]
    perm = [2, 0, 3, 1]
    c = np.asarray(sample_step(logits[perm], keys[perm], 9, *as_arrays([ps[i] for i in perm])))
    np.testing.assert_array_equal(c, a[perm])
    # different steps draw differently (not a constant stream)
    steps = {int(np.asarray(sample_step(logits[:1], keys[:1], s, *as_arrays(ps[:1])))[0])
             for s in range(20)}
    assert len(steps) > 3


def test_mixed_batch_greedy_rows_stay_greedy():
    rng = np.random.RandomState(2)
    logits = rng.randn(6, 30).astype(np.float32)
    ps = [SamplingParams(), SamplingParams(1.5, 0, 1.0, 1)] * 3
    for step in range(5):
        toks = np.asarray(sample_step(logits, request_keys([p.seed for p in ps]), step, *as_arrays(ps)))
        np.testing.assert_array_equal(toks[::2], logits[::2].argmax(-1))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_invalid_params_raise(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_sampling_program_has_no_conditional():
    """The step must not hold a lax.cond: XLA:GPU reads a conditional's predicate on the host
    and waits for the stream, which stalls the dispatch-ahead loop. Greedy is a static switch."""
    import jax.numpy as jnp
    from jax_tokenweave.engine.sampler import sample
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 300)), jnp.float32)
    args = (logits, request_keys(range(4)), *as_arrays([SamplingParams(temperature=0.5)] * 4))
    f = jax.jit(sample, static_argnames="greedy")
    sampled = f.lower(*args, greedy=False).as_text()
    greedy = f.lower(*args, greedy=True).as_text()
    for text in (sampled, greedy):
        assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert "sort" in sampled and "sort" not in greedy
    assert np.array_equal(np.asarray(f(*args, greedy=True)), np.argmax(np.asarray(logits), -1))
