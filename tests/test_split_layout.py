"""How the engine lays out a split step (host side, no model): step_batch.split_order puts whole
sequences before the static cut t0 whenever the decode tokens can close the gap, and
StepPlan.reorder moves every chunk's row and tokens together."""
import itertools
import random

import numpy as np
import pytest

from jax_tokenweave.engine.block_manager import BlockManager
from jax_tokenweave.engine.scheduler import Request, Scheduler
from jax_tokenweave.engine.step_batch import buckets, split_order
from jax_tokenweave.weave.split import SplitConfig, plan_split

SPLIT = SplitConfig(threshold=16, tile=4)


def cut_at_boundary(lens, order, cut) -> bool:
    ends = np.cumsum([lens[i] for i in order])
    return cut >= ends[-1] or cut in ends


def boundary_possible(lens, cut) -> bool:
    """Brute force: some prefill chunks total s <= cut and the single tokens fill cut - s."""
    multi = [n for n in lens if n > 1]
    singles = len(lens) - len(multi)
    sums = {sum(c) for r in range(len(multi) + 1) for c in itertools.combinations(multi, r)}
    return any(0 <= cut - s <= singles for s in sums) or cut >= sum(lens)


@pytest.mark.parametrize("lens,cut,boundary", [
    ([1, 1, 1, 2, 14, 3], 16, True),       # 2 + 14 = 16 exactly
    ([1, 1, 1, 1, 12, 9], 16, True),       # 12 + four decodes
    ([1, 8, 3, 20], 16, False),            # 8 + 3 + the one decode = 12: the 20 straddles 16
    ([8, 9, 12, 3], 16, False),            # no decodes: 12 + 3 = 15 closest, 8 straddles
    ([1, 1, 7], 16, True),                 # the real tokens end before the cut (padding after)
    ([1] * 20, 16, True),
])
def test_split_order_cases(lens, cut, boundary):
    order = split_order(lens, cut)
    assert sorted(order) == list(range(len(lens)))
    assert cut_at_boundary(lens, order, cut) == boundary
    if not boundary:   # the straddled chunk is a prefill chunk (a decode token cannot be cut)
        ends = np.cumsum([lens[i] for i in order])
        assert lens[order[int(np.searchsorted(ends, cut, side="right"))]] > 1


def test_split_order_finds_a_boundary_whenever_one_exists():
    rng = random.Random(0)
    for _ in range(2000):
        lens = [rng.choice([1, 1, 1, rng.randint(2, 40)]) for _ in range(rng.randint(1, 9))]
        cut = rng.randint(1, max(1, sum(lens) + 3))
        order = split_order(lens, cut)
        assert sorted(order) == list(range(len(lens)))
        assert cut_at_boundary(lens, order, cut) == boundary_possible(lens, cut), (lens, cut, order)
        singles = [i for i in order if lens[i] == 1]
        assert singles == sorted(singles)           # decodes keep the scheduler's order


def _mixed_plan(prompt_lens):
    """A plan of ten decodes (short requests already prefilled) plus prefills of prompt_lens."""
    bm = BlockManager(64, 8)
    s = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=16, max_model_len=128)
    for i in range(10):
        s.add(Request(f"d{i}", [1 + i, 2, 3], 5, ignore_eos=True))
    s.update(s.schedule(), np.full(10, 7, np.int32))
    for i, n in enumerate(prompt_lens):
        s.add(Request(f"p{i}", list(range(1, n + 1)), 5, ignore_eos=True))
    plan = s.schedule()
    assert plan.num_decode_tokens == 10 and plan.num_prefill_tokens == min(sum(prompt_lens), 54)
    return s, plan


def _token_rows(plan):
    return sorted((c.seq.seq_id, int(plan.positions[t]), int(plan.token_ids[t]),
                   int(plan.slot_pages[t]), int(plan.slot_offsets[t]))
                  for i, c in enumerate(plan.chunks)
                  for t in range(plan.query_start[i], plan.query_start[i + 1]))


@pytest.mark.parametrize("prompt_lens,boundary", [
    ((20, 9), True), ((40,), False), ((9, 6, 30), True),
    ((40, 20), False),                     # the 20 is chunked to 14 (budget 64): a row that does not sample
])
def test_reordered_mixed_plan_stays_consistent(prompt_lens, boundary):
    s, plan = _mixed_plan(prompt_lens)
    Tb, _ = buckets(plan.num_tokens, plan.num_seqs)
    t0 = plan_split(1, Tb, SPLIT).n0
    before = _token_rows(plan)
    rows = {c.seq.seq_id: (int(plan.context_lens[i]), bool(plan.samples[i]), plan.block_tables[i].tolist())
            for i, c in enumerate(plan.chunks)}
    plan.reorder(split_order([c.num_tokens for c in plan.chunks], t0))
    qs = plan.query_start
    assert qs[0] == 0 and qs[-1] == plan.num_tokens and (np.diff(qs) >= 1).all()
    assert (t0 in qs) == boundary
    assert _token_rows(plan) == before        # the same (seq, position, token, slot) multiset
    assert plan.sample_rows.tolist() == (qs[1:] - 1).tolist()
    for i, c in enumerate(plan.chunks):
        a, b = qs[i], qs[i + 1]
        assert b - a == c.num_tokens
        assert plan.positions[a:b].tolist() == list(range(c.start, c.start + c.num_tokens))
        assert plan.token_ids[a:b].tolist() == c.seq.tokens[c.start:c.start + c.num_tokens]
        assert list(zip(plan.slot_pages[a:b], plan.slot_offsets[a:b])) == \
            [s.bm.slot(c.seq.seq_id, p) for p in range(c.start, c.start + c.num_tokens)]
        assert (int(plan.context_lens[i]), bool(plan.samples[i]), plan.block_tables[i].tolist()) == \
            rows[c.seq.seq_id]
    # the scheduler reads the sampled tokens in the new row order
    sampled = np.array([100 + c.seq.seq_id for c in plan.chunks], np.int32)
    s.update(plan, sampled)
    for i, c in enumerate(plan.chunks):
        if plan.samples[i]:
            assert c.seq.tokens[-1] == 100 + c.seq.seq_id


def test_reorder_rejects_a_non_permutation():
    _, plan = _mixed_plan((9,))
    with pytest.raises(ValueError, match="permutation"):
        plan.reorder([0] * plan.num_seqs)
