"""The offline continuous-batching engine (the shape of vLLM's ``LLM.generate``).

    llm = LLM(model, tokenizer)                       # model: engine.runner.TPModel
    outs = llm.generate(["Hello", "What is TP?"], SamplingParams(temperature=0.7, seed=1),
                        max_new_tokens=128)
    outs[0].text, outs[0].finish_reason, outs[0].ttft_s

Every engine step is one flat batch of at most ``max_num_batched_tokens`` tokens: one token of
each running request plus chunks of waiting prompts (chunked prefill), picked by the scheduler
(scheduler.py) over the paged KV cache (block_manager.py, kv_cache.py). The model runs the batch
in one compiled step with sampling on the device (``TPModel.step``); a step of at least the split
threshold that holds prefill is run as TokenWeave's two overlapped halves, cut at a static token
of its bucket; the engine lays the chunks out so that whole sequences end there when enough
decode tokens can close the gap (step_batch.split_order), else the cut falls inside a prefill
chunk. Requests are admitted as pages free up, finish on their own stop token or length, and
are preempted (and recomputed later) when pages run out. Every request comes back: with its
tokens, or with finish_reason "error" and the reason (a prompt longer than the model takes, a
request that cannot fit the KV cache even alone) -- none is dropped or truncated silently.

Multi-process (``jax.distributed``): every process runs the same engine on the same requests;
scheduling is deterministic and sampled tokens come back replicated, so all processes agree.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence as Seq

import numpy as np
from tqdm.auto import tqdm

from jax_tokenweave.engine.block_manager import BlockManager
from jax_tokenweave.engine.generate import encode_prompt
from jax_tokenweave.engine.kv_cache import DEFAULT_PAGE_SIZE, pages_bytes
from jax_tokenweave.engine.sampler import SamplingParams, as_arrays, request_keys
from jax_tokenweave.engine.scheduler import Request, Scheduler
from jax_tokenweave.engine.step_batch import buckets, from_plan, split_order
from jax_tokenweave.parallel.distributed import to_host


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: list[int]
    tokens: list[int]               # generated ids, without the stop token
    text: str
    finish_reason: str              # "stop" | "length" | "error"
    error: str | None
    arrival_s: float                # engine clock (perf_counter) times
    first_token_s: float | None
    finish_s: float | None
    num_preemptions: int

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_s is None or self.finish_s is None or len(self.tokens) < 2:
            return None
        return (self.finish_s - self.first_token_s) / (len(self.tokens) - 1)


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    split_steps: int = 0            # steps run as TokenWeave's two halves, of which
    split_at_boundary: int = 0      #   cut between whole sequences (or in the padding)
    split_in_chunk: int = 0         #   cut inside a prefill chunk
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    wall_s: float = 0.0


CPU_KV_BYTES = 2 << 30


def default_num_pages(model, page_size: int, max_num_seqs: int, max_model_len: int,
                      memory_fraction: float = 0.5) -> int:
    """Pages for the pools: enough for max_num_seqs sequences of max_model_len, capped by memory:
    on GPU a fraction of the device memory still free (vLLM's gpu_memory_utilization idea),
    elsewhere CPU_KV_BYTES of host memory. Fewer pages only means more waiting and preemption."""
    want = 1 + max_num_seqs * -(-max_model_len // page_size)
    per_page = pages_bytes(model.cfg, 1, page_size, model.dtype) / model.tp
    dev = model.mesh.devices.flat[0]
    stats = dev.memory_stats() if dev.platform == "gpu" else None
    if stats and "bytes_limit" in stats:
        budget = memory_fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    else:
        budget = CPU_KV_BYTES
    return int(max(2, min(want, budget // per_page)))


class LLM:
    """Continuous-batching generation on `model` (engine.runner.TPModel).

    max_num_batched_tokens: the token budget of one step (vLLM's name; default 2048).
    max_num_seqs: most requests running at once. max_model_len: most positions a request may
    reach (default: the config's max_position_embeddings). num_pages / page_size: the KV pools
    (default: default_num_pages)."""

    def __init__(self, model, tokenizer=None, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int | None = None, num_pages: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = int(max_model_len or model.cfg.max_position_embeddings)
        self.page_size = page_size
        max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.num_pages = num_pages or default_num_pages(model, page_size, max_num_seqs, self.max_model_len)
        self.block_manager = BlockManager(self.num_pages, page_size)
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.width = -(-self.max_model_len // page_size)   # most pages a request can hold
        self.pages = model.init_pages(self.num_pages, page_size)
        self.stop_ids = frozenset(getattr(tokenizer, "eos_ids", None) or ())
        self.stats = EngineStats()

    def _encode(self, prompt, chat: bool) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat=chat)

    def _lay_out(self, plan) -> bool:
        """Whether the step runs split; if so, reorder its chunks (plan.reorder, so sampled rows
        still map back) for the static cut of its bucket and count where that cut falls."""
        Tb, _ = buckets(plan.num_tokens, plan.num_seqs)
        t0 = self.model.split_cut(Tb, plan.num_tokens == plan.num_seqs)
        if t0 is None:
            return False
        plan.reorder(split_order([c.num_tokens for c in plan.chunks], t0))
        if t0 >= plan.num_tokens or t0 in plan.query_start:
            self.stats.split_at_boundary += 1
        else:
            self.stats.split_in_chunk += 1
        return True

    def generate(self, prompts: Seq, sampling: SamplingParams | Seq[SamplingParams] = SamplingParams(), *,
                 max_new_tokens: int | Seq[int] = 64, chat: bool = False, ignore_eos: bool = False,
                 request_ids: Seq[str] | None = None, progress: bool = True) -> list[RequestOutput]:
        """Run every request to completion; outputs in request order."""
        n = len(prompts)
        sampling = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(sampling) != n or len(max_new) != n:
            raise ValueError(f"{n} prompts but {len(sampling)} SamplingParams and {len(max_new)} max_new_tokens")
        ids = list(request_ids) if request_ids is not None else [str(i) for i in range(n)]
        sched = Scheduler(self.block_manager, max_num_batched_tokens=self.max_num_batched_tokens,
                          max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len)
        keys = {}
        for rid, prompt, sp, mx in zip(ids, prompts, sampling, max_new):
            sched.add(Request(rid, self._encode(prompt, chat), mx, sampling=sp, stop_ids=self.stop_ids,
                              ignore_eos=ignore_eos))
            keys[rid] = request_keys([sp.seed])[0]
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc="requests", unit="req", disable=not progress)
        bar.update(sum(1 for s in sched.finished))
        while sched.has_unfinished():
            plan = sched.schedule()
            if plan is None:
                break
            if plan.num_seqs == 0:                   # only aborted requests this step
                bar.update(len(sched.update(plan, np.zeros(0, np.int32))))
                continue
            split = self._lay_out(plan)
            sps = [c.seq.request.sampling for c in plan.chunks]
            temp, top_k, top_p = as_arrays(sps)
            rows = (temp, top_k, top_p, np.stack([keys[c.seq.request_id] for c in plan.chunks]),
                    np.array([c.seq.num_generated for c in plan.chunks], np.int32))
            # block tables as wide as this step needs (a power of two): the XLA attention off GPU
            # reads every listed page; the kernels read only valid ones either way
            width = min(self.width, 1 << max(3, (plan.block_tables.shape[1] - 1).bit_length()))
            batch = from_plan(plan, width=width, sampling_rows=rows)
            toks, self.pages = self.model.step(batch, self.pages)
            self.stats.steps += 1
            self.stats.split_steps += int(split)
            done = sched.update(plan, to_host(toks))
            bar.update(len(done))
        bar.close()
        st = sched.stats()
        self.stats.prefill_tokens += st.get("prefill_tokens", 0)
        self.stats.decode_tokens += st.get("decode_tokens", 0)
        self.stats.preemptions += st.get("preemptions", 0)
        self.stats.wall_s += time.perf_counter() - t0
        outs = []
        for seq in sched.finished:
            text = self.tokenizer.decode(seq.output_ids) if self.tokenizer is not None else ""
            outs.append(RequestOutput(seq.request_id, list(seq.request.prompt_ids), list(seq.output_ids), text,
                                      seq.finish_reason, seq.error, seq.arrival_s, seq.first_token_s,
                                      seq.finish_s, seq.num_preemptions))
        order = {rid: i for i, rid in enumerate(ids)}
        return sorted(outs, key=lambda o: order[o.request_id])
