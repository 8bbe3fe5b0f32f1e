"""Continuous-batching scheduler with chunked prefill over a paged KV cache (host side: pure
Python and numpy, no jax). Modelled on vLLM's scheduler.

Each step the scheduler picks, under a token budget (``max_num_batched_tokens``), a set of
*chunks*: a chunk ``(seq, start, num_tokens)`` asks the model to compute the K/V of
``seq.tokens[start : start + num_tokens]`` at positions ``start ..`` and, if it reaches the end
of ``seq.tokens``, to sample the sequence's next token from the logits of its last position.

The bookkeeping rule everything follows: ``seq.tokens`` is the prompt plus every generated token;
``seq.num_computed`` of them have their K/V in the cache. A chunk always starts at
``num_computed``; it *samples* iff ``start + num_tokens == len(seq.tokens)``. So

* a fresh request prefills its prompt (in one or several chunks) and the last chunk samples;
* a running sequence in decode phase has exactly one uncomputed token (the last sampled one):
  its chunk is that one token and samples the next. (``in_decode`` is exactly that state, so a
  chunked prompt whose remainder is a single token finishes as a one-token "decode" chunk: for
  the model both are one query token over a cached context.)
* a sequence preempted by recompute loses its pages and ``num_computed`` drops to 0, but keeps
  ``tokens`` (prompt + generated so far). When it is readmitted it prefills *all* of ``tokens``
  -- prompt and generated alike, the last generated token included, whose K/V had never been
  computed -- and the logits at the last position give the next token, exactly the token its
  decode step would have produced. Nothing is generated twice and nothing is lost.

Policy of one step (``schedule``):

1. every RUNNING sequence in decode phase gets its one token, oldest admitted first. When its
   position crosses into a new page and no page is free, the most recently admitted running
   sequence not yet scheduled this step is preempted (pages freed, back to the FRONT of the
   waiting queue, ``num_computed = 0``), repeatedly, until the page fits; if that sequence is the
   one asking, it preempts itself. So each step the oldest running sequence progresses.
2. RUNNING sequences still in prefill (chunked earlier) continue with a chunk of what budget is
   left, shrunk to the pages that can be had; when not even one token fits they preempt as in 1,
   except that one which would have to preempt itself while others run this step keeps its pages
   and waits a step instead (its computed prefix is not thrown away for nothing).
3. WAITING sequences are admitted in FIFO order while budget, ``max_num_seqs`` and free pages
   allow; a prompt longer than the remaining budget is chunked (its first chunk takes what budget
   remains). The head of the queue blocks the rest when its chunk's pages don't fit. No admission
   happens in a step that preempted (unless nothing else got scheduled), as in vLLM: the pages
   just freed go to the sequences already running instead of thrashing.

Padding the step's arrays to compile buckets is the runner's job; the plan's arrays are exact.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from jax_tokenweave.engine.block_manager import BlockManager


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


WAITING, RUNNING, FINISHED = SeqStatus.WAITING, SeqStatus.RUNNING, SeqStatus.FINISHED


@dataclass
class Request:
    """One generation request. ``sampling`` is opaque to the scheduler (the sampler's params).
    Generation stops at any of ``stop_ids`` unless ``ignore_eos`` (which ignores all of them: the
    scheduler does not know which is EOS). ``arrival_s=None``: stamped by the scheduler's clock
    at ``add``."""
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Any = None
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    arrival_s: Optional[float] = None

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.stop_ids = frozenset(int(t) for t in self.stop_ids)


class Sequence:
    """A request's state in the scheduler."""

    def __init__(self, request: Request, seq_id: int, arrival_s: float):
        self.request = request
        self.seq_id = seq_id                   # block-manager id; also the order of ``add``
        self.tokens: list[int] = list(request.prompt_ids)   # prompt + generated
        self.prompt_len = len(request.prompt_ids)
        self.num_computed = 0                  # tokens whose K/V are in the cache
        self.status = WAITING
        self.finish_reason: Optional[str] = None  # "stop" | "length" | "error"
        self.error: Optional[str] = None
        self.stop_token: Optional[int] = None  # the stop id that finished it (not in output_ids)
        self.arrival_s = arrival_s
        self.first_scheduled_s: Optional[float] = None
        self.first_token_s: Optional[float] = None
        self.finish_s: Optional[float] = None
        self.num_preemptions = 0
        self.admit_order = -1                  # bumped at every (re)admission

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def output_ids(self) -> list[int]:
        """Generated tokens (the stop token excluded)."""
        return self.tokens[self.prompt_len:]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def in_decode(self) -> bool:
        """Running with exactly one token left to compute (the last sampled one)."""
        return self.num_computed > 0 and len(self.tokens) - self.num_computed == 1

    @property
    def is_finished(self) -> bool:
        return self.status is FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, id={self.seq_id}, {self.status.value}, tokens={len(self.tokens)}, "
                f"computed={self.num_computed}, generated={self.num_generated}"
                f"{', ' + self.finish_reason if self.finish_reason else ''})")


@dataclass
class Chunk:
    seq: Sequence
    start: int
    num_tokens: int
    is_decode: bool

    def __iter__(self):  # unpacks as (seq, start, num_tokens)
        return iter((self.seq, self.start, self.num_tokens))


@dataclass
class StepPlan:
    """One model step. ``chunks`` are decode chunks first, then prefill chunks, as scheduled
    (``reorder`` may lay them out otherwise before the step runs); row ``i`` of the per-sequence
    arrays belongs to ``chunks[i]``, and its tokens are ``query_start[i]:query_start[i+1]`` of the
    per-token ones. T = total tokens, S = len(chunks)."""
    step: int
    chunks: list[Chunk]
    token_ids: np.ndarray      # [T] int32
    positions: np.ndarray      # [T] int32
    slot_pages: np.ndarray     # [T] int32: page of each token's K/V
    slot_offsets: np.ndarray   # [T] int32: offset in that page
    query_start: np.ndarray    # [S+1] int32: chunk i's tokens are query_start[i]:query_start[i+1]
    context_lens: np.ndarray   # [S] int32: positions in the cache after this step (start + num_tokens)
    block_tables: np.ndarray   # [S, W] int32, W = most pages of any scheduled sequence, 0 padded
    sample_rows: np.ndarray    # [S] int32: index into T of each chunk's last token
    samples: np.ndarray        # [S] bool: the chunk's last logits give a new token
    num_prefill_tokens: int
    num_decode_tokens: int
    aborted: list[Sequence] = field(default_factory=list)  # errored while planning (rare)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]

    def reorder(self, order) -> None:
        """Make ``chunks[order[i]]`` chunk ``i``, in place: its row of every per-sequence array
        and its tokens move with it, so the plan stays self-consistent and ``update`` reads the
        sampled tokens in the new row order (the engine lays out split steps so, llm.py)."""
        order = [int(i) for i in order]
        if sorted(order) != list(range(self.num_seqs)):
            raise ValueError(f"reorder: {order} is not a permutation of the {self.num_seqs} chunks")
        qs = self.query_start
        rows = np.concatenate([np.arange(qs[i], qs[i + 1]) for i in order] + [np.zeros(0, np.int64)])
        for name in ("token_ids", "positions", "slot_pages", "slot_offsets"):
            setattr(self, name, getattr(self, name)[rows])
        self.query_start = np.zeros_like(qs)
        np.cumsum(np.diff(qs)[order], out=self.query_start[1:])
        self.sample_rows = (self.query_start[1:] - 1).astype(np.int32)
        self.context_lens, self.block_tables, self.samples = (
            a[order] for a in (self.context_lens, self.block_tables, self.samples))
        self.chunks = [self.chunks[i] for i in order]


class Scheduler:
    """Continuous batching with chunked prefill and preemption by recompute (see the module doc)."""

    def __init__(self, block_manager: BlockManager, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int,
                 clock: Callable[[], float] = time.perf_counter):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError(f"Scheduler: max_num_seqs ({max_num_seqs}), max_num_batched_tokens "
                             f"({max_num_batched_tokens}) and max_model_len ({max_model_len}) must be >= 1")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"Scheduler: max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}), so that every running sequence's decode token "
                             f"fits in a step; raise the token budget or lower max_num_seqs")
        self.bm = block_manager
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order (oldest first)
        self._finished: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._next_seq_id = 0
        self._next_admit = 0
        self._outstanding: Optional[StepPlan] = None
        self._aborted: list[Sequence] = []      # errored while planning the current step
        self._preempted_this_step = False
        # stats
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0

    # ---- requests --------------------------------------------------------------------------
    def _lifetime_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        # The last generated token is never fed back, so at most prompt + max_new - 1 positions
        # ever hold K/V (a recompute prefills at most that many too).
        return self.bm.pages_for(prompt_len + max_new_tokens - 1)

    def _validate(self, req: Request) -> Optional[str]:
        n = len(req.prompt_ids)
        if n == 0:
            return "empty prompt: a request needs at least one prompt token"
        if int(req.max_new_tokens) != req.max_new_tokens or req.max_new_tokens < 1:
            return f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}"
        if n + req.max_new_tokens > self.max_model_len:
            return (f"prompt ({n} tokens) + max_new_tokens ({req.max_new_tokens}) = "
                    f"{n + req.max_new_tokens} exceeds max_model_len ({self.max_model_len}); shorten the "
                    f"prompt, lower max_new_tokens or raise max_model_len")
        need = self._lifetime_pages(n, req.max_new_tokens)
        if need > self.bm.num_usable:
            return (f"prompt ({n} tokens) + max_new_tokens ({req.max_new_tokens}) needs {need} KV-cache "
                    f"pages of {self.bm.page_size} tokens, but the whole cache has {self.bm.num_usable} "
                    f"usable pages ({self.bm.capacity_tokens} tokens) even with nothing else running; "
                    f"raise num_pages / kv-cache memory, or shorten the prompt / lower max_new_tokens")
        return None

    def add(self, request: Request) -> Sequence:
        """Queue a request (FIFO). An invalid request is not queued: it comes back already
        FINISHED with ``finish_reason == "error"`` and ``error`` saying why and what to change."""
        if request.request_id in self._by_id and not self._by_id[request.request_id].is_finished:
            raise ValueError(f"add: request id {request.request_id!r} is already queued or running")
        now = self.clock()
        seq = Sequence(request, self._next_seq_id,
                       request.arrival_s if request.arrival_s is not None else now)
        self._next_seq_id += 1
        self._by_id[request.request_id] = seq
        err = self._validate(request)
        if err is not None:
            self._finish(seq, "error", error=f"request {request.request_id!r} rejected: {err}")
        else:
            self.waiting.append(seq)
        return seq

    def abort(self, request_id: str, error: str = "aborted") -> Sequence:
        """Finish a queued or running request with ``finish_reason "error"`` (frees its pages).
        Safe between ``schedule`` and ``update``: ``update`` skips it."""
        seq = self._by_id.get(request_id)
        if seq is None:
            raise KeyError(f"abort: unknown request id {request_id!r}")
        if not seq.is_finished:
            self._finish(seq, "error", error=error)
        return seq

    def get(self, request_id: str) -> Sequence:
        return self._by_id[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def finished(self) -> list[Sequence]:
        """All finished sequences, in the order their requests were added."""
        return sorted(self._finished, key=lambda s: s.seq_id)

    def clear_finished(self) -> list[Sequence]:
        """Forget the finished sequences (a long-running server calls this after reporting
        them); returns them in request order."""
        done = self.finished
        self._finished = []
        for seq in done:
            if self._by_id.get(seq.request_id) is seq:
                del self._by_id[seq.request_id]
        return done

    def stats(self) -> dict:
        return dict(steps=self.num_steps, preemptions=self.num_preemptions,
                    prefill_tokens=self.num_prefill_tokens, decode_tokens=self.num_decode_tokens,
                    waiting=len(self.waiting), running=len(self.running), finished=len(self._finished),
                    free_pages=self.bm.num_free)

    # ---- state changes ---------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, *, error: Optional[str] = None) -> None:
        if seq.status is RUNNING:
            self.running.remove(seq)
        elif seq.status is WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)
        seq.status = FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finish_s = self.clock()
        self._finished.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: free the pages, back to the front of the waiting queue."""
        self.running.remove(seq)
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence) -> None:
        seq.status = RUNNING
        seq.admit_order = self._next_admit
        self._next_admit += 1
        if seq.first_scheduled_s is None:
            seq.first_scheduled_s = self.clock()
        self.running.append(seq)           # newest admitted last

    def _fit(self, seq: Sequence, want: int) -> int:
        """How many of ``want`` tokens from ``seq.num_computed`` its pages plus the free ones hold."""
        cap = self.bm.capacity_of(seq.seq_id) + self.bm.num_free * self.bm.page_size - seq.num_computed
        return max(0, min(want, cap))

    def _reserve(self, seq: Sequence, want: int, scheduled: set[int], may_wait: bool = False) -> int:
        """Allocate pages for up to ``want`` tokens of a running ``seq`` (at least one), preempting
        the newest running sequences not scheduled yet this step as needed. Returns the tokens
        reserved; 0 when ``seq`` gets nothing this step: it was preempted, or errored if it can't
        fit alone, or -- ``may_wait``, a prefill continuation that would have to preempt itself
        while others run this step -- it keeps its pages and waits (a later decode that needs a
        page preempts it then, as the newest, unless pages were freed meanwhile)."""
        while True:
            n = self._fit(seq, want)
            if n > 0:
                self.bm.allocate(seq.seq_id, seq.num_computed + n)
                return n
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            if victim is seq and may_wait and scheduled:
                return 0
            if victim is seq and len(self.running) == 1:
                # Alone and still no room: pages are held outside this scheduler (a request
                # validated at add always fits the pool alone). Don't wait forever.
                self._finish(seq, "error", error=self._no_room_error(seq, seq.num_computed + 1))
                self._aborted.append(seq)
                return 0
            self._preempt(victim)
            self._preempted_this_step = True
            if victim is seq:
                return 0

    def _no_room_error(self, seq: Sequence, num_tokens: int) -> str:
        extra = self.bm.pages_for(num_tokens) - self.bm.capacity_of(seq.seq_id) // self.bm.page_size
        held = self.bm.num_used - self.bm.capacity_of(seq.seq_id) // self.bm.page_size
        return (f"request {seq.request_id!r}: KV cache out of pages with nothing else running: needs "
                f"{extra} more pages of {self.bm.page_size} tokens to hold {num_tokens} positions, "
                f"{self.bm.num_free} free of {self.bm.num_usable} ({held} held outside this scheduler); "
                f"raise num_pages / kv-cache memory or free the pages held elsewhere")

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> Optional[StepPlan]:
        """Plan the next step, or None when nothing is waiting or running. Every plan must be
        passed to ``update`` before the next ``schedule``."""
        if self._outstanding is not None:
            raise RuntimeError("schedule: the previous plan was not passed to update() yet")
        if not self.running and not self.waiting:
            return None
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        decode: list[Chunk] = []
        prefill: list[Chunk] = []
        self._aborted: list[Sequence] = []
        self._preempted_this_step = False

        # 1. decodes, oldest admitted first
        for seq in list(self.running):
            if seq.status is not RUNNING or not seq.in_decode:
                continue
            if self._reserve(seq, 1, scheduled):
                scheduled.add(seq.seq_id)
                decode.append(Chunk(seq, seq.num_computed, 1, True))
                budget -= 1

        # 2. running sequences part-way through their prefill
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not RUNNING or seq.seq_id in scheduled:
                continue
            n = self._reserve(seq, min(seq.num_uncomputed, budget), scheduled, may_wait=True)
            if n:
                scheduled.add(seq.seq_id)
                prefill.append(Chunk(seq, seq.num_computed, n, False))
                budget -= n

        # 3. admit waiting sequences, FIFO
        if not (self._preempted_this_step and (decode or prefill)):
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                n = min(seq.num_uncomputed, budget)
                if not self.bm.can_allocate(seq.seq_id, n):
                    if not self.running:
                        # Whole pool for it and still no room: pages held elsewhere (see _reserve).
                        self.waiting.popleft()
                        self._finish(seq, "error", error=self._no_room_error(seq, n))
                        self._aborted.append(seq)
                        continue
                    break
                self.waiting.popleft()
                self._admit(seq)
                self.bm.allocate(seq.seq_id, n)
                scheduled.add(seq.seq_id)
                prefill.append(Chunk(seq, 0, n, False))
                budget -= n

        chunks = decode + prefill
        if not chunks and not self._aborted:
            if not self.running and not self.waiting:
                return None
            raise RuntimeError(f"schedule: no progress possible ({self.stats()}); this is a scheduler bug")
        plan = self._build(chunks)
        plan.aborted = self._aborted
        self._outstanding = plan
        self.num_steps += 1
        self.num_prefill_tokens += plan.num_prefill_tokens
        self.num_decode_tokens += plan.num_decode_tokens
        return plan

    def _build(self, chunks: list[Chunk]) -> StepPlan:
        S = len(chunks)
        lens = np.array([c.num_tokens for c in chunks], np.int32)
        query_start = np.zeros(S + 1, np.int32)
        np.cumsum(lens, out=query_start[1:])
        T = int(query_start[-1])
        token_ids = np.empty(T, np.int32)
        positions = np.empty(T, np.int32)
        slot_pages = np.empty(T, np.int32)
        slot_offsets = np.empty(T, np.int32)
        samples = np.zeros(S, bool)
        context_lens = np.zeros(S, np.int32)
        n_prefill = 0
        for i, c in enumerate(chunks):
            a, b = int(query_start[i]), int(query_start[i + 1])
            end = c.start + c.num_tokens
            token_ids[a:b] = c.seq.tokens[c.start:end]
            positions[a:b] = np.arange(c.start, end, dtype=np.int32)
            slot_pages[a:b], slot_offsets[a:b] = self.bm.slots(c.seq.seq_id, c.start, c.num_tokens)
            samples[i] = end == len(c.seq.tokens)
            context_lens[i] = end
            if not c.is_decode:
                n_prefill += c.num_tokens
        width = max([self.bm.num_pages_of(c.seq.seq_id) for c in chunks], default=0)
        block_tables = self.bm.block_tables_array([c.seq.seq_id for c in chunks], max(width, 1))
        return StepPlan(step=self.num_steps, chunks=chunks, token_ids=token_ids, positions=positions,
                        slot_pages=slot_pages, slot_offsets=slot_offsets, query_start=query_start,
                        context_lens=context_lens, block_tables=block_tables,
                        sample_rows=(query_start[1:] - 1).astype(np.int32), samples=samples,
                        num_prefill_tokens=n_prefill, num_decode_tokens=T - n_prefill)

    def update(self, plan: StepPlan, sampled: np.ndarray) -> list[Sequence]:
        """Apply a step's results: ``sampled[i]`` is the token drawn for ``plan.chunks[i]``
        (read only where ``plan.samples[i]``; entries past S, e.g. the runner's padding, are
        ignored). Returns the sequences that finished this step (``plan.aborted`` included)."""
        if plan is not self._outstanding:
            raise RuntimeError("update: this plan is not the one the last schedule() returned")
        sampled = np.asarray(sampled).reshape(-1)
        if sampled.shape[0] < plan.num_seqs:
            raise ValueError(f"update: got {sampled.shape[0]} sampled tokens for {plan.num_seqs} scheduled "
                             f"sequences")
        self._outstanding = None
        done: list[Sequence] = list(plan.aborted)
        now = None
        for i, c in enumerate(plan.chunks):
            seq = c.seq
            if seq.status is not RUNNING:          # aborted between schedule and update
                continue
            if seq.num_computed != c.start:
                raise RuntimeError(f"update: {seq} was planned from position {c.start}")
            seq.num_computed = c.start + c.num_tokens
            if not plan.samples[i]:
                continue
            tok = int(sampled[i])
            if seq.first_token_s is None:
                now = self.clock() if now is None else now
                seq.first_token_s = now
            req = seq.request
            if tok in req.stop_ids and not req.ignore_eos:
                seq.stop_token = tok
                self._finish(seq, "stop")
                done.append(seq)
                continue
            seq.tokens.append(tok)
            if seq.num_generated >= req.max_new_tokens or len(seq.tokens) >= self.max_model_len:
                self._finish(seq, "length")
                done.append(seq)
        return done
