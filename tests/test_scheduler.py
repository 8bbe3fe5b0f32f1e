"""The continuous-batching scheduler (host side, no jax), driven by a deterministic fake model.

The fake model keeps a fake paged KV cache: every scheduled token "writes" (sequence, admission,
position, token) at its slot, and every chunk "reads" positions 0..context_len-1 back through its
block table before sampling ``next_token(history read from the cache)``. So a wrong slot mapping,
block table, position or token stream changes the generated tokens, and the streams are compared
with a reference generated without any scheduler.
"""
import random
import zlib

import numpy as np
import pytest

from jax_tokenweave.engine.block_manager import BlockManager
from jax_tokenweave.engine.scheduler import FINISHED, RUNNING, WAITING, Request, Scheduler, StepPlan
from jax_tokenweave.engine.step_batch import split_order

V = 50


def next_token(history) -> int:
    return zlib.crc32(np.asarray(history, np.int64).tobytes()) % V


def reference(prompt, max_new, stop_ids=frozenset(), ignore_eos=False, max_model_len=10 ** 9):
    """(output ids, finish reason, stop token) of greedy generation with ``next_token``."""
    toks, out = list(prompt), []
    while True:
        t = next_token(toks)
        if t in stop_ids and not ignore_eos:
            return out, "stop", t
        toks.append(t)
        out.append(t)
        if len(out) >= max_new or len(toks) >= max_model_len:
            return out, "length", None


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


class FakeModel:
    """Checks every plan for consistency, then 'runs' it. ``garbage`` is returned in rows whose
    chunk does not sample (a stop id, so that a scheduler reading them would finish early)."""

    def __init__(self, sched: Scheduler, garbage: int = -1, decode_first: bool = True):
        self.sched = sched
        self.decode_first = decode_first   # False: plans laid out otherwise (StepPlan.reorder)
        bm = sched.bm
        # (seq_id, admit_order, position, token) per slot
        self.cache = np.full((bm.num_pages, bm.page_size, 4), -1, np.int64)
        self.garbage = garbage
        self.plans = []        # (step, [(request_id, start, n, samples, is_decode)])

    def check(self, plan: StepPlan):
        s, bm = self.sched, self.sched.bm
        S, T = plan.num_seqs, plan.num_tokens
        assert S >= 1 and T >= 1
        for name in ("token_ids", "positions", "slot_pages", "slot_offsets"):
            a = getattr(plan, name)
            assert a.shape == (T,) and a.dtype == np.int32, name
        assert plan.query_start.shape == (S + 1,) and plan.query_start.dtype == np.int32
        assert plan.context_lens.shape == (S,) and plan.sample_rows.shape == (S,)
        assert plan.samples.shape == (S,) and plan.samples.dtype == bool
        assert plan.block_tables.dtype == np.int32 and plan.block_tables.shape[0] == S
        # budget and batch limits
        assert T <= s.max_num_batched_tokens
        assert S <= s.max_num_seqs
        assert len(s.running) <= s.max_num_seqs
        assert len({c.seq.seq_id for c in plan.chunks}) == S
        # decode chunks first (as scheduled), one token each
        kinds = [c.is_decode for c in plan.chunks]
        assert kinds == sorted(kinds, reverse=True) or not self.decode_first
        assert plan.num_decode_tokens == sum(kinds)
        assert plan.num_prefill_tokens == T - sum(kinds)
        assert all(c.num_tokens == 1 for c in plan.chunks if c.is_decode)
        assert plan.query_start[0] == 0 and plan.query_start[-1] == T
        width = max(bm.num_pages_of(c.seq.seq_id) for c in plan.chunks)
        assert plan.block_tables.shape[1] == width
        for i, c in enumerate(plan.chunks):
            seq, start, n = c
            a, b = plan.query_start[i], plan.query_start[i + 1]
            assert b - a == n >= 1
            assert seq.status is RUNNING
            assert start == seq.num_computed            # continues what is cached
            assert start + n <= seq.num_tokens
            assert plan.positions[a:b].tolist() == list(range(start, start + n))
            assert plan.token_ids[a:b].tolist() == seq.tokens[start:start + n]
            assert plan.context_lens[i] == start + n
            assert plan.sample_rows[i] == b - 1
            assert plan.samples[i] == (start + n == seq.num_tokens)
            slots = [bm.slot(seq.seq_id, p) for p in range(start, start + n)]
            assert list(zip(plan.slot_pages[a:b].tolist(), plan.slot_offsets[a:b].tolist())) == slots
            table = bm.block_table(seq.seq_id)
            assert len(table) == bm.pages_for(start + n)    # pages for exactly what it computes
            assert plan.block_tables[i, :len(table)].tolist() == table
            assert not plan.block_tables[i, len(table):].any()
        assert (plan.slot_pages != 0).all()                 # no real token writes the scratch page
        assert len(set(zip(plan.slot_pages.tolist(), plan.slot_offsets.tolist()))) == T

    def __call__(self, plan: StepPlan) -> np.ndarray:
        self.check(plan)
        bm = self.sched.bm
        ps = bm.page_size
        self.plans.append((plan.step, [(c.seq.request_id, c.start, c.num_tokens, bool(plan.samples[i]),
                                        c.is_decode) for i, c in enumerate(plan.chunks)]))
        # write K/V
        for i, c in enumerate(plan.chunks):
            a, b = plan.query_start[i], plan.query_start[i + 1]
            entry = np.stack([np.full(b - a, c.seq.seq_id), np.full(b - a, c.seq.admit_order),
                              plan.positions[a:b], plan.token_ids[a:b]], axis=1)
            self.cache[plan.slot_pages[a:b], plan.slot_offsets[a:b]] = entry
        # read back the whole context of every chunk through its block table, and sample
        out = np.full(plan.num_seqs + 3, self.garbage, np.int32)   # longer than S, like a padded batch
        for i, c in enumerate(plan.chunks):
            ctx = int(plan.context_lens[i])
            pos = np.arange(ctx)
            got = self.cache[plan.block_tables[i][pos // ps], pos % ps]
            # every position it attends to was written, by this sequence in its current admission
            assert (got[:, 0] == c.seq.seq_id).all() and (got[:, 1] == c.seq.admit_order).all(), c.seq
            assert (got[:, 2] == pos).all()
            if plan.samples[i]:
                out[i] = next_token(got[:, 3])
        return out


def run(sched, model=None, arrivals=(), max_steps=100_000, on_step=None, lay_out=None):
    """Engine loop. ``arrivals``: (step, Request) pairs, added when the loop reaches that step;
    ``lay_out(plan)`` runs before the model (the engine reorders split steps there). Returns the
    list of sequences added."""
    model = model or FakeModel(sched)
    pending = sorted(arrivals, key=lambda x: x[0])
    added, done = [], []
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            added.append(sched.add(pending.pop(0)[1]))
        step += 1
        assert step < max_steps, "engine did not finish"
        plan = sched.schedule()
        if plan is None:
            assert not sched.has_unfinished()
            continue
        if lay_out:
            lay_out(plan)
        finished = sched.update(plan, model(plan))
        assert all(f.status is FINISHED for f in finished)
        done.extend(finished)
        sched.bm.check_invariants()
        if on_step:
            on_step(plan, finished)
    return added


def req(rid, prompt, max_new, stop=(), ignore_eos=False, arrival=None):
    return Request(request_id=rid, prompt_ids=list(prompt), max_new_tokens=max_new, sampling=None,
                   stop_ids=frozenset(stop), ignore_eos=ignore_eos, arrival_s=arrival)


def assert_matches_reference(sched, seqs):
    for seq in seqs:
        r = seq.request
        if seq.finish_reason == "error":
            continue
        out, reason, stop = reference(r.prompt_ids, r.max_new_tokens, r.stop_ids, r.ignore_eos,
                                      sched.max_model_len)
        assert seq.output_ids == out, seq
        assert seq.finish_reason == reason and seq.stop_token == stop, seq


# ---- validation ---------------------------------------------------------------------------------
def test_constructor_validates():
    with pytest.raises(ValueError, match="max_num_batched_tokens .* must be >= max_num_seqs"):
        Scheduler(BlockManager(8, 4), max_num_batched_tokens=4, max_num_seqs=8, max_model_len=32)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(8, 4), max_model_len=0)


def test_impossible_requests_error_at_add_with_clear_message():
    bm = BlockManager(9, 4)   # 8 usable pages = 32 positions
    s = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=40)
    cases = {
        "empty": (req("empty", [], 4), "empty prompt"),
        "zero": (req("zero", [1, 2], 0), "max_new_tokens must be an integer >= 1"),
        "long": (req("long", range(30), 11), "exceeds max_model_len (40)"),
        "pool": (req("pool", range(30), 10), "whole cache has 8 usable pages"),
    }
    seqs = {k: s.add(r) for k, (r, _) in cases.items()}
    for k, (_, phrase) in cases.items():
        seq = seqs[k]
        assert seq.status is FINISHED and seq.finish_reason == "error", k
        assert phrase in seq.error, (k, seq.error)
        assert k in seq.error          # names the request
    assert "raise max_model_len" in seqs["long"].error
    assert "raise num_pages" in seqs["pool"].error
    assert [q.request_id for q in s.finished] == ["empty", "zero", "long", "pool"]
    assert not s.has_unfinished()
    assert s.schedule() is None
    assert bm.num_free == 8
    # exactly at the limits is accepted: 30 + 3 = 33 <= 40 tokens, 32 positions ever cached = 8 pages
    ok = s.add(req("ok", range(30), 3))
    assert ok.status is WAITING
    run(s)
    assert ok.finish_reason in ("length", "stop") and len(ok.tokens) <= 33
    assert_matches_reference(s, [ok])
    assert bm.num_free == 8


def test_duplicate_request_id_rejected_while_unfinished():
    s = Scheduler(BlockManager(9, 4), max_num_batched_tokens=16, max_num_seqs=4, max_model_len=40)
    s.add(req("a", [1, 2, 3], 2))
    with pytest.raises(ValueError, match="already queued"):
        s.add(req("a", [1], 1))
    run(s)
    s.add(req("a", [4, 5], 1))       # reusing a finished id is fine
    run(s)
    assert len(s.finished) == 2


# ---- plans ---------------------------------------------------------------------------------------
def test_chunked_prefill_of_a_long_prompt():
    bm = BlockManager(33, 4)
    s = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=80)
    prompt = [(7 * i) % V for i in range(50)]
    seq = s.add(req("long", prompt, 5))
    model = FakeModel(s)
    starts = []
    for expect_start, expect_n, expect_sample in [(0, 16, False), (16, 16, False), (32, 16, False),
                                                   (48, 2, True)]:
        plan = s.schedule()
        assert plan.num_seqs == 1
        (c,) = plan.chunks
        assert (c.start, c.num_tokens, bool(plan.samples[0])) == (expect_start, expect_n, expect_sample)
        assert not c.is_decode and plan.num_prefill_tokens == expect_n and plan.num_decode_tokens == 0
        assert plan.positions.tolist() == list(range(expect_start, expect_start + expect_n))
        assert plan.token_ids.tolist() == prompt[expect_start:expect_start + expect_n]
        assert [tuple(x) for x in zip(plan.slot_pages, plan.slot_offsets)] == \
            [bm.slot(seq.seq_id, p) for p in plan.positions]
        assert bm.num_pages_of(seq.seq_id) == bm.pages_for(expect_start + expect_n)
        starts.append(c.start)
        s.update(plan, model(plan))
        assert seq.num_computed == expect_start + expect_n
        assert seq.num_generated == (1 if expect_sample else 0)
    # then decode, one token a step
    plan = s.schedule()
    assert [(c.start, c.num_tokens, c.is_decode) for c in plan.chunks] == [(50, 1, True)]
    assert plan.token_ids.tolist() == [seq.tokens[50]]
    s.update(plan, model(plan))
    run(s, model)
    assert_matches_reference(s, [seq])
    assert bm.num_free == 32


def test_decodes_first_then_prefill_fills_the_budget():
    bm = BlockManager(65, 4)
    s = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=200)
    a = s.add(req("a", [1, 2, 3], 20))
    b = s.add(req("b", [4, 5], 20))
    model = FakeModel(s)
    plan = s.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("a", 0, 3), ("b", 0, 2)]
    s.update(plan, model(plan))
    c = s.add(req("c", range(40), 3))
    plan = s.schedule()
    # a and b decode first, c's prompt takes the rest of the budget (16 - 2)
    assert [(x.seq.request_id, x.start, x.num_tokens, x.is_decode) for x in plan.chunks] == \
        [("a", 3, 1, True), ("b", 2, 1, True), ("c", 0, 14, False)]
    assert plan.num_tokens == 16 and plan.num_decode_tokens == 2 and plan.num_prefill_tokens == 14
    assert plan.samples.tolist() == [True, True, False]
    assert plan.sample_rows.tolist() == [0, 1, 15]
    assert plan.query_start.tolist() == [0, 1, 2, 16]
    assert plan.context_lens.tolist() == [4, 3, 14]
    assert plan.block_tables.shape == (3, 4)
    s.update(plan, model(plan))
    # next step: decodes, then c continues its prompt (a running prefill) before any admission
    d = s.add(req("d", range(5), 3))
    plan = s.schedule()
    assert [(x.seq.request_id, x.start, x.num_tokens) for x in plan.chunks] == \
        [("a", 4, 1), ("b", 3, 1), ("c", 14, 14)]
    assert d.status is WAITING
    s.update(plan, model(plan))

    def budget(plan, finished):
        assert plan.num_tokens <= 16

    run(s, model, on_step=budget)
    assert_matches_reference(s, [a, b, c, d])


def test_admission_limited_by_max_num_seqs():
    bm = BlockManager(65, 4)
    s = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=100)
    seqs = [s.add(req(f"r{i}", [i + 1] * 3, 4 + 3 * i)) for i in range(5)]
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["r0", "r1"]
    assert [q.status for q in seqs] == [RUNNING, RUNNING, WAITING, WAITING, WAITING]
    model = FakeModel(s)
    s.update(plan, model(plan))

    def check(plan, finished):
        assert len(s.running) <= 2 and plan.num_seqs <= 2

    run(s, model, on_step=check)
    assert_matches_reference(s, seqs)
    # FIFO: admitted in request order
    firsts = [q.first_scheduled_s for q in seqs]
    assert firsts == sorted(firsts)


def test_admission_limited_by_free_pages():
    bm = BlockManager(9, 4)     # 8 usable pages
    s = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100)
    seqs = [s.add(req(f"r{i}", [i + 1] * 12, 4)) for i in range(3)]   # 3 pages of prompt each
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["r0", "r1"]
    assert bm.num_free == 2
    assert seqs[2].status is WAITING and s.waiting[0] is seqs[2]
    model = FakeModel(s)
    s.update(plan, model(plan))
    run(s, model)
    assert_matches_reference(s, seqs)
    assert bm.num_free == 8


def test_finish_on_stop_id_and_ignore_eos():
    prompt = [3, 1, 4, 1, 5]
    full, _, _ = reference(prompt, 30)
    k = next(i for i in range(2, 30) if full[i] not in full[:i])   # first fresh token past index 2
    stop = full[k]
    s = Scheduler(BlockManager(33, 4), max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", prompt, 30, stop=[stop]))
    b = s.add(req("b", prompt, 30, stop=[stop], ignore_eos=True))
    run(s, FakeModel(s, garbage=stop))     # non-sampling rows carry the stop id: must be ignored
    assert a.finish_reason == "stop" and a.stop_token == stop
    assert a.output_ids == full[:k] and stop not in a.output_ids
    assert b.finish_reason == "length" and b.output_ids == full and b.stop_token is None
    assert s.bm.num_free == 32


def test_finish_on_max_new_tokens_and_max_model_len():
    s = Scheduler(BlockManager(33, 4), max_num_batched_tokens=32, max_num_seqs=4, max_model_len=20)
    a = s.add(req("a", range(5), 7))
    b = s.add(req("b", range(12), 8))    # 12 + 8 == max_model_len
    run(s)
    assert a.finish_reason == "length" and a.num_generated == 7
    assert b.finish_reason == "length" and len(b.tokens) == 20
    assert_matches_reference(s, [a, b])
    assert s.bm.num_free == 32


def test_max_model_len_stops_even_when_checked_at_update():
    # max_model_len reached before max_new_tokens (bypassing add's check to reach update's)
    s = Scheduler(BlockManager(33, 4), max_num_batched_tokens=32, max_num_seqs=4, max_model_len=100)
    a = s.add(req("a", range(10), 50))
    s.max_model_len = 14
    run(s)
    assert a.finish_reason == "length" and len(a.tokens) == 14 and a.num_generated == 4


def test_timing_hooks_use_the_injected_clock():
    clock = FakeClock()
    s = Scheduler(BlockManager(33, 4), max_num_batched_tokens=4, max_num_seqs=2, max_model_len=64,
                  clock=clock)
    a = s.add(req("a", range(10), 3))            # three prefill chunks: 4, 4, 2
    b = s.add(req("b", range(2), 2, arrival=-5.0))
    assert a.arrival_s == 1.0 and b.arrival_s == -5.0
    model = FakeModel(s)
    plan = s.schedule()
    s.update(plan, model(plan))
    assert a.first_scheduled_s is not None and a.first_token_s is None
    plan = s.schedule()
    s.update(plan, model(plan))
    assert a.first_token_s is None
    plan = s.schedule()
    t_before = clock.t
    s.update(plan, model(plan))
    assert a.first_token_s is not None and a.first_token_s > t_before
    run(s, model)
    for q in (a, b):
        assert q.arrival_s <= q.first_scheduled_s <= q.first_token_s <= q.finish_s


# ---- preemption ---------------------------------------------------------------------------------
def test_preemption_by_recompute_keeps_the_token_stream():
    bm = BlockManager(7, 4)   # 6 usable pages; each request's lifetime needs 5 (8 + 12 - 1 positions)
    s = Scheduler(bm, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", [1] * 8, 12))
    b = s.add(req("b", [2] * 8, 12))
    c = s.add(req("c", [3] * 2, 3))
    model = FakeModel(s)
    events = []

    def on_step(plan, finished):
        events.append([(x.seq.request_id, x.start, x.num_tokens, bool(plan.samples[i]))
                       for i, x in enumerate(plan.chunks)])

    prev = {}
    orig_preempt = s._preempt

    def spy(seq):
        prev[seq.request_id] = list(seq.tokens)
        orig_preempt(seq)
        assert s.waiting[0] is seq and seq.num_computed == 0 and seq.seq_id not in bm
        assert seq.tokens == prev[seq.request_id]      # generated tokens are kept
        events.append(("preempt", seq.request_id, len(prev[seq.request_id])))

    s._preempt = spy
    run(s, model, on_step=on_step)
    assert s.num_preemptions >= 1
    assert sum(q.num_preemptions for q in (a, b, c)) == s.num_preemptions
    assert_matches_reference(s, [a, b, c])
    # recompute rule: after a preemption the sequence's chunks restart at 0 and are contiguous; the
    # one that samples ends at len(tokens) at preemption time, i.e. prompt + everything generated
    # so far (the last generated token included: its K/V was never computed) -- and the token it
    # samples is the next one of the reference stream (checked above)
    checked = 0
    for i, e in enumerate(events):
        if e[0] != "preempt":
            continue
        _, rid, ntok = e
        pos = 0
        for later in events[i + 1:]:
            if later and later[0] == "preempt":
                if later[1] == rid:
                    break
                continue
            mine = [ch for ch in later if ch[0] == rid]
            if not mine:
                continue
            (_, start, n, sampled), = mine
            assert start == pos
            pos += n
            if sampled:
                assert pos == ntok
                checked += 1
                break
    assert checked >= 1
    assert any(e[0] == "preempt" and e[2] > s.get(e[1]).prompt_len for e in events)   # had generated
    assert bm.num_free == 6


def test_preempted_sequence_goes_to_front_of_queue_and_newest_is_preempted():
    bm = BlockManager(7, 2)   # 6 usable pages of 2
    s = Scheduler(bm, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", [1, 1], 8))      # 2-token prompts: 1 page each
    b = s.add(req("b", [2, 2], 8))
    c = s.add(req("c", [3, 3], 8))
    model = FakeModel(s)
    plan = s.schedule()
    s.update(plan, model(plan))         # a, b, c hold 1 page each, 3 free; each has 3 tokens
    d = s.add(req("d", [4] * 6, 2))     # 3 pages: admitted next step after the decodes
    plan = s.schedule()                 # decodes a, b, c at position 2 -> 3 new pages: 0 free
    assert [x.seq.request_id for x in plan.chunks] == ["a", "b", "c"]
    assert d.status is WAITING and bm.num_free == 0
    s.update(plan, model(plan))
    plan = s.schedule()                 # position 3 fits; no preemption yet
    s.update(plan, model(plan))
    plan = s.schedule()                 # position 4 needs a page each: c (newest) goes, its 2
    assert [x.seq.request_id for x in plan.chunks] == ["a", "b"]    # pages serve a and b
    assert c.status is WAITING and c.num_computed == 0 and c.seq_id not in bm
    assert list(s.waiting) == [c, d]    # the preempted one in front of the queue
    assert c.num_preemptions == 1 and a.num_preemptions == b.num_preemptions == 0
    assert s.num_preemptions == 1
    assert bm.num_free == 0
    s.update(plan, model(plan))
    # c is readmitted (recompute) before d once pages free up
    while c.status is WAITING:
        plan = s.schedule()
        if c.status is WAITING:
            assert d.status is WAITING
        s.update(plan, model(plan))
    assert d.status is WAITING or d.first_scheduled_s >= c.first_scheduled_s
    run(s, model)
    assert_matches_reference(s, [a, b, c, d])
    assert bm.num_free == 6


def test_sequence_that_needs_the_page_preempts_itself_when_newest():
    bm = BlockManager(4, 2)   # 3 usable pages of 2
    s = Scheduler(bm, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", [1, 1, 1], 2))   # 2 pages, lifetime 4 positions = 2 pages
    b = s.add(req("b", [2], 4))         # 1 page; grows to a 2nd at position 2
    model = FakeModel(s)
    plan = s.schedule()
    s.update(plan, model(plan))
    plan = s.schedule()                 # a decodes at 3 (own page), b at 1 (own page)
    s.update(plan, model(plan))
    assert a.is_finished                # a: 2 tokens generated
    run(s, model)
    assert_matches_reference(s, [a, b])


def test_prefill_that_would_preempt_itself_waits_until_a_decode_needs_its_pages():
    bm = BlockManager(7, 4)   # 6 usable pages
    s = Scheduler(bm, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=64)
    a = s.add(req("a", [1] * 4, 8))     # lifetime 11 positions: 3 pages
    p = s.add(req("p", range(20), 1))   # lifetime 20 positions: 5 pages
    model = FakeModel(s)
    expect = [
        [("a", 0, 4), ("p", 0, 4)],
        [("a", 4, 1), ("p", 4, 7)],     # a takes a 2nd page, p grows to 3
        [("a", 5, 1), ("p", 11, 5)],    # p's chunk shrunk to the one free page
        [("a", 6, 1)],                  # p has no room: it would be its own victim -> waits
        [("a", 7, 1)],
        [("a", 8, 1)],                  # a needs a 3rd page: p (newest) is preempted for it
    ]
    for step, chunks in enumerate(expect):
        plan = s.schedule()
        assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == chunks, step
        if step in (3, 4):
            assert p.status is RUNNING and p.num_computed == 16 and bm.num_pages_of(p.seq_id) == 4
            assert p.num_preemptions == 0 and bm.num_free == 0
        s.update(plan, model(plan))
    assert p.status is WAITING and p.num_preemptions == 1 and p.num_computed == 0
    run(s, model)
    assert_matches_reference(s, [a, p])
    assert bm.num_free == 6


def test_lone_sequence_without_room_errors_instead_of_looping():
    # Pages held outside the scheduler (e.g. a shared pool): a lone request can never grow.
    bm = BlockManager(5, 2)             # 4 usable
    bm.allocate(999, 4)                 # someone else holds 2 pages
    s = Scheduler(bm, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", [1, 2, 3], 4))   # passes add (lifetime 6 positions = 3 pages <= 4)
    model = FakeModel(s)
    plan = s.schedule()
    assert plan.chunks[0].num_tokens == 3
    s.update(plan, model(plan))
    assert a.status is RUNNING and bm.num_free == 0
    plan = s.schedule()                 # decode at position 3: still in its 2nd page
    assert [(x.start, x.num_tokens) for x in plan.chunks] == [(3, 1)]
    s.update(plan, model(plan))
    plan = s.schedule()                 # position 4 wants a 3rd page; none free, nobody to preempt
    assert plan.num_seqs == 0 and plan.aborted == [a]
    assert a.finish_reason == "error" and "out of pages" in a.error and "held outside" in a.error
    assert s.update(plan, np.zeros(0, np.int32)) == [a]
    assert not s.has_unfinished() and s.schedule() is None
    # and a waiting one that can't be admitted with the whole pool to itself errors too
    b = s.add(req("b", [1] * 5, 1))     # 3 pages; 2 free
    plan = s.schedule()
    assert plan.aborted == [b] and b.finish_reason == "error"
    s.update(plan, np.zeros(0, np.int32))
    bm.free(999)
    assert bm.num_free == 4
    bm.check_invariants()


# ---- protocol -----------------------------------------------------------------------------------
def test_update_protocol_errors():
    s = Scheduler(BlockManager(17, 4), max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64)
    s.add(req("a", [1, 2], 3))
    s.add(req("b", [1, 2, 3], 3))
    plan = s.schedule()
    with pytest.raises(RuntimeError, match="not passed to update"):
        s.schedule()
    with pytest.raises(ValueError, match="1 sampled tokens for 2"):
        s.update(plan, np.zeros(1, np.int32))
    s.update(plan, np.zeros(2, np.int32))
    with pytest.raises(RuntimeError, match="not the one"):
        s.update(plan, np.zeros(2, np.int32))


def test_abort_between_schedule_and_update():
    s = Scheduler(BlockManager(17, 4), max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64)
    a = s.add(req("a", [1, 2], 5))
    b = s.add(req("b", [3, 4], 5))
    c = s.add(req("c", [5], 5))
    model = FakeModel(s)
    plan = s.schedule()
    sampled = model(plan)
    d = s.add(req("d", [6], 5))          # still waiting
    s.abort("a", "client went away")
    s.abort("c")
    s.abort("d")
    assert a.finish_reason == "error" and a.error == "client went away" and a.seq_id not in s.bm
    assert d.is_finished and not s.waiting
    with pytest.raises(KeyError):
        s.abort("nope")
    s.update(plan, sampled)
    assert a.num_generated == 0
    run(s, model)
    assert [q.request_id for q in s.finished] == ["a", "b", "c", "d"]
    assert_matches_reference(s, [b])
    assert s.bm.num_free == 16


# ---- randomized engine simulation ---------------------------------------------------------------
@pytest.mark.parametrize("seed,page_size,num_pages,budget,max_seqs", [
    (0, 8, 60, 48, 12),
    (1, 4, 90, 32, 16),
    (2, 16, 20, 64, 8),
    (3, 1, 300, 24, 24),
])
def test_randomized_simulation_all_requests_complete(seed, page_size, num_pages, budget, max_seqs):
    rng = random.Random(seed)
    N, max_model_len = 300, 320
    bm = BlockManager(num_pages, page_size)
    s = Scheduler(bm, max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_model_len)
    arrivals, step = [], 0
    for i in range(N):
        step += int(rng.expovariate(1.5))
        plen = min(int(rng.paretovariate(1.1) * 6), 400)      # long tail, some over the limits
        max_new = min(int(rng.paretovariate(1.3) * 4), 150)
        stop = frozenset(rng.sample(range(V), rng.choice([0, 1, 2])))
        prompt = [rng.randrange(V) for _ in range(plen)]
        arrivals.append((step, req(f"r{i}", prompt, max_new, stop=stop, ignore_eos=rng.random() < 0.1)))
    stats = {"chunked": 0, "max_T": 0}

    def on_step(plan, finished):
        assert plan.num_tokens <= budget
        stats["max_T"] = max(stats["max_T"], plan.num_tokens)
        stats["chunked"] += int(sum(1 for i, c in enumerate(plan.chunks)
                                    if not c.is_decode and not plan.samples[i]))

    seqs = run(s, FakeModel(s, garbage=0), arrivals=arrivals, on_step=on_step)
    # nothing dropped: every request finished, exactly once
    assert len(seqs) == N and all(q.is_finished for q in seqs)
    assert [q.request_id for q in s.finished] == [f"r{i}" for i in range(N)]
    errors = [q for q in seqs if q.finish_reason == "error"]
    for q in errors:   # only the impossible ones, each with its reason
        n, m = len(q.request.prompt_ids), q.request.max_new_tokens
        assert n == 0 or n + m > max_model_len or bm.pages_for(n + m - 1) > bm.num_usable, q.error
        assert "rejected" in q.error
    assert 0 < len(errors) < 20
    assert {q.finish_reason for q in seqs} == {"stop", "length", "error"}
    assert_matches_reference(s, seqs)
    assert bm.num_free == num_pages - 1 and not bm.seq_ids
    bm.check_invariants()
    # the scenario exercised what it is meant to
    assert s.num_preemptions > 0
    assert stats["chunked"] > 0 and stats["max_T"] == budget
    assert s.num_decode_tokens > 0 and s.num_prefill_tokens > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_reordered_plans_map_sampled_tokens_back(seed):
    """Plans laid out for a split (StepPlan.reorder with split_order at a random cut) before the
    fake model runs them: its cache checks still pass and every stream equals the reference, so
    update reads each sampled token from its chunk's new row."""
    rng = random.Random(seed)
    bm = BlockManager(40, 4)
    s = Scheduler(bm, max_num_batched_tokens=32, max_num_seqs=10, max_model_len=200)
    arrivals = [(rng.randrange(60), req(f"r{i}", [rng.randrange(V) for _ in range(rng.randint(1, 45))],
                                        rng.randint(1, 30), stop=frozenset({3}))) for i in range(60)]
    moved = []

    def lay_out(plan):
        kinds = [c.is_decode for c in plan.chunks]
        plan.reorder(split_order([c.num_tokens for c in plan.chunks], rng.randint(1, plan.num_tokens)))
        moved.append([c.is_decode for c in plan.chunks] != kinds)

    seqs = run(s, FakeModel(s, garbage=0, decode_first=False), arrivals=arrivals, lay_out=lay_out)
    assert all(q.is_finished for q in seqs) and sum(moved) > 20
    assert_matches_reference(s, seqs)
