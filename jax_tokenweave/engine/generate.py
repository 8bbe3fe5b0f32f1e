"""Text generation on a tensor-parallel model: prefill + decode with a KV cache, sampling, stop
tokens, streaming, timings.

    gen = Generator(model, tokenizer)
    results = gen.generate(["The capital of France is"], max_new_tokens=32,
                           sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                           on_text=lambda i, delta: print(delta, end=""))
    results[0].text, results[0].ttft_s, results[0].decode_tokens_per_s

Shapes are bucketed so that new prompts reuse compiled functions: the prompt length is padded to
a power of two (at least 16), the batch to a power of two, and the KV cache to the power of two
that holds the longest prompt plus ``max_new_tokens`` (capped at ``max_cache_len``). Two requests
whose sizes fall into the same buckets run the same executables.

The model is a ``jax_tokenweave.engine.runner.TPModel`` (its ``init_cache``, ``params`` and the
pure ``prefill_fn`` / ``decode_fn``, which the Generator compiles together with sampling: one
program per prefill and per decode step). The loop keeps DISPATCH_AHEAD steps queued ahead of
the one whose tokens it reads, so the device never waits for the host's stop checks and
detokenizing. This is static
batching (one padded batch, prefill then decode until the longest finishes); ``engine.llm.LLM``
is the continuous-batching engine.

Multi-process (``jax.distributed``): every process calls ``generate`` with the same prompts and
settings; inputs are placed as replicated global arrays, sampled tokens come back replicated, so
every process takes the same stop decisions. Only the caller decides who prints.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from jax_tokenweave.parallel import distributed as dist
from jax_tokenweave.engine.runner import DECODE_COMPILER_OPTIONS
from jax_tokenweave.engine.sampler import (SamplingParams, all_greedy, as_arrays, request_keys, sample,
                                           step_keys)

MIN_PROMPT_BUCKET = 16
DISPATCH_AHEAD = 4   # decode steps queued on the device ahead of the host's reads


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket_len(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Padded length for a sequence of n tokens: the next power of two, at least `minimum`."""
    return max(minimum, next_pow2(n))


def bucket_batch(n: int) -> int:
    return next_pow2(n)


@dataclasses.dataclass
class GenerationResult:
    """One request's output. Timings are those of the batch it ran in."""
    prompt_tokens: list[int]
    tokens: list[int]                 # generated ids, without the stop token
    text: str                         # decoded `tokens` ('' without a tokenizer)
    finish_reason: str                # "stop" (a stop token), "length" (max_new_tokens or cache full)
    stop_token: int | None
    ttft_s: float                     # start of generate -> first token on the host (prefill + sample)
    prefill_tokens_per_s: float       # real (unpadded) prompt tokens of the batch / ttft
    decode_tokens_per_s: float        # tokens generated after the first, whole batch, per second
    decode_s: float
    total_s: float
    batch_size: int
    padded_shape: tuple[int, int]     # (batch bucket, prompt bucket) the prefill ran at
    cache_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """A streamed piece of request `index`'s text (`token` is the id that completed it)."""
    index: int
    text: str
    token: int


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished
    UTF-8 character (a token that ends mid-character decodes to U+FFFD until the rest arrives).

    Decodes a short window (from `prefix` on) rather than the whole sequence at every step; fine
    for byte-level BPE vocabularies (Llama 3, Qwen2, SmolLM2), where a slice decodes on its own."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # start of the decode window
        self.read = 0     # ids before this have been emitted as text
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end), as decoded."""
        full = self.tok.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta


def _stop_ids_of(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_id", None) or getattr(tokenizer, "eos_token_id", None)
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {int(i) for i in ids}


def encode_prompt(tokenizer, prompt: str | Sequence[int], *, chat: bool = False,
                  system: str | None = None) -> list[int]:
    """Token ids of a prompt: a string (through the chat template when `chat`, which brings its
    own BOS if the model wants one; else with the tokenizer's default BOS) or ids as they are."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_bos=False))
    return list(tokenizer.encode(prompt))


class GenerationStream:
    """Iterator of TextDelta; `results` holds the GenerationResults once it is exhausted."""

    def __init__(self, gen: Iterator):
        self._gen = gen
        self.results: list[GenerationResult] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> TextDelta:
        try:
            return next(self._gen)
        except StopIteration as e:
            self.results = e.value
            raise


class Generator:
    """Batched generation on `model` (see the module doc), with `tokenizer` for text in and out.

    max_cache_len: most positions a KV cache may have (default: the model config's
    max_position_embeddings, if it has one). A prompt that does not fit raises ValueError.
    stop_token_ids: extra ids that end a sequence, beside the tokenizer's EOS / end-of-turn ids.
    """

    def __init__(self, model, tokenizer=None, *, max_cache_len: int | None = None,
                 stop_token_ids: Sequence[int] = (), pad_id: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = model.mesh
        if max_cache_len is None:
            cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
            max_cache_len = getattr(cfg, "max_position_embeddings", None)
        self.max_cache_len = max_cache_len
        self.stop_ids = _stop_ids_of(tokenizer) | {int(i) for i in stop_token_ids}
        self.pad_id = pad_id
        self._spare_cache = None
        # Model step and sampling compiled as one program each (no separate sampling dispatch,
        # nothing on the host between steps); the cache is donated, so updated in place. `greedy`
        # is static: an all-greedy batch compiles without the vocabulary sort (see sampler.sample).
        def prefill_sample(params, tokens, lengths, cache, keys, step, temp, top_k, top_p, greedy):
            logits, cache = model.prefill_fn(params, tokens, lengths, cache)
            return sample(logits, step_keys(keys, step), temp, top_k, top_p, greedy=greedy), step + 1, cache

        def decode_sample(params, tok, cache, keys, step, temp, top_k, top_p, greedy):
            logits, cache = model.decode_fn(params, tok, cache)
            return sample(logits, step_keys(keys, step), temp, top_k, top_p, greedy=greedy), step + 1, cache
        self._prefill_sample = jax.jit(prefill_sample, donate_argnums=(3,), static_argnames="greedy")
        self._decode_sample = jax.jit(decode_sample, donate_argnums=(2,), static_argnames="greedy",
                                      compiler_options=DECODE_COMPILER_OPTIONS)

    # ---------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: str | Sequence[int], *, chat: bool = False,
                      system: str | None = None) -> list[int]:
        """Token ids of a prompt: a string (through the chat template when `chat`) or ids as-is."""
        return encode_prompt(self.tokenizer, prompt, chat=chat, system=system)

    # ---------------------------------------------------------------- shapes
    def plan(self, prompt_lens: Sequence[int], max_new_tokens: int) -> tuple[int, int, int]:
        """(batch bucket, prompt bucket, cache length) for a batch; raises if a prompt can't fit."""
        longest = max(prompt_lens)
        if min(prompt_lens) < 1:
            raise ValueError("every prompt needs at least one token")
        cache_len = bucket_len(longest + max_new_tokens)
        if self.max_cache_len is not None:
            if longest > self.max_cache_len:
                raise ValueError(
                    f"prompt of {longest} tokens is longer than the KV cache ({self.max_cache_len} "
                    f"positions, max_cache_len); shorten the prompt or raise max_cache_len "
                    f"(--max-cache-len)")
            cache_len = min(cache_len, self.max_cache_len)
        prompt_bucket = min(bucket_len(longest), cache_len)
        return bucket_batch(len(prompt_lens)), prompt_bucket, cache_len

    # ---------------------------------------------------------------- API
    def generate(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 chat: bool = False, system: str | None = None, ignore_eos: bool = False,
                 on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        """Generate for a batch of prompts; `on_text(index, delta)` receives streamed text."""
        stream = self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling, chat=chat,
                             system=system, ignore_eos=ignore_eos, detokenize=on_text is not None)
        for d in stream:
            on_text(d.index, d.text)
        return stream.results

    def stream(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
               sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chat: bool = False, system: str | None = None, ignore_eos: bool = False,
               detokenize: bool = True) -> GenerationStream:
        """Like generate, as an iterator of TextDelta; `.results` once it is exhausted."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        ids = [self.encode_prompt(p, chat=chat, system=system) for p in prompts]
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(ids)
        if len(sampling) != len(ids):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(ids)} prompts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.plan([len(x) for x in ids], max_new_tokens)   # raise now, not at the first next()
        return GenerationStream(self._run(ids, max_new_tokens, list(sampling), ignore_eos,
                                          detokenize and self.tokenizer is not None))

    def warmup(self, prompt_lens: Sequence[int], max_new_tokens: int) -> float:
        """Compile prefill, decode and sampling for the buckets of a batch with these prompt
        lengths; returns the seconds it took."""
        t0 = time.perf_counter()
        dummy = [[self.pad_id] * n for n in prompt_lens]
        for _ in self._run(dummy, max_new_tokens, [SamplingParams()] * len(dummy), True, False,
                           max_steps=2):
            pass
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the loop
    def _take_cache(self, batch: int, max_len: int):
        # Reuse the previous call's cache when the buckets match: prefill starts a cache afresh
        # (positions past a sequence's length are never read), and this skips an allocation.
        spare, self._spare_cache = self._spare_cache, None
        if spare is not None and spare[0] == (batch, max_len):
            return spare[1]
        del spare
        return self.model.init_cache(batch, max_len)

    def _run(self, ids: list[list[int]], max_new_tokens: int, sampling: list[SamplingParams],
             ignore_eos: bool, detokenize: bool, max_steps: int | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = len(ids)
        lens = [len(x) for x in ids]
        B, S, cache_len = self.plan(lens, max_new_tokens)
        mesh = self.mesh

        t0 = time.perf_counter()
        tokens = np.full((B, S), self.pad_id, np.int32)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = x
        lengths = np.ones((B,), np.int32)          # padding rows: one pad token, output ignored
        lengths[:n] = lens
        temp, top_k, top_p = as_arrays(sampling, B)
        greedy = all_greedy(temp)
        keys = request_keys([p.seed for p in sampling] + [0] * (B - n))
        temp, top_k, top_p, keys = (dist.replicate(a, mesh) for a in (temp, top_k, top_p, keys))

        cache = self._take_cache(B, cache_len)
        step_dev = dist.replicate(np.int32(0), mesh)        # the sampling step, kept on device
        tok, step_dev, cache = self._prefill_sample(self.model.params, dist.replicate(tokens, mesh),
                                                    dist.replicate(lengths, mesh), cache, keys, step_dev,
                                                    temp, top_k, top_p, greedy=greedy)
        host = dist.to_host(tok)
        t_first = time.perf_counter()

        # per request: how many tokens it may still produce
        budget = [min(max_new_tokens, cache_len - L) for L in lens]
        limit = max(budget) if max_steps is None else min(max(budget), max_steps)
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        reason = ["length"] * n
        stop_tok: list[int | None] = [None] * n
        detok = [IncrementalDetokenizer(self.tokenizer) for _ in range(n)] if detokenize else None
        # Steps in flight: the device runs up to DISPATCH_AHEAD steps ahead of the host's stop
        # checks and detokenizing, and each token's copy to the host starts when its step is
        # queued, so reading it rarely waits. A stop seen late costs at most DISPATCH_AHEAD - 1
        # wasted steps, whose tokens are dropped (their cache writes stay inside the cache).
        inflight = collections.deque([host])
        produced = 1                 # tokens dispatched so far; the next step makes token `produced`
        while inflight:
            # token j is written by the step at cache position max(lens) + j - 1
            while (len(inflight) < DISPATCH_AHEAD and produced < limit and not all(done)
                   and max(lens) + produced - 1 < cache_len):
                tok, step_dev, cache = self._decode_sample(self.model.params, tok, cache, keys, step_dev,
                                                           temp, top_k, top_p, greedy=greedy)
                tok.copy_to_host_async()
                inflight.append(tok)
                produced += 1
            got = inflight.popleft()
            host = got if isinstance(got, np.ndarray) else dist.to_host(got)
            for i in range(n):
                if done[i]:
                    continue
                t = int(host[i])
                if not ignore_eos and t in self.stop_ids:
                    done[i], reason[i], stop_tok[i] = True, "stop", t
                    continue
                out[i].append(t)
                if detok is not None:
                    delta = detok[i].push(t)
                    if delta:
                        yield TextDelta(i, delta, t)
                if len(out[i]) >= budget[i]:
                    done[i] = True
            if all(done):
                break
        t_end = time.perf_counter()
        self._spare_cache = ((B, cache_len), cache)

        if detok is not None:
            for i in range(n):
                delta = detok[i].flush()
                if delta:
                    yield TextDelta(i, delta, out[i][-1] if out[i] else -1)

        ttft = t_first - t0
        decode_s = t_end - t_first
        decoded = sum(max(0, len(o) - 1) for o in out)
        results = []
        for i in range(n):
            text = self.tokenizer.decode(out[i]) if self.tokenizer is not None else ""
            results.append(GenerationResult(
                prompt_tokens=list(ids[i]), tokens=out[i], text=text, finish_reason=reason[i],
                stop_token=stop_tok[i], ttft_s=ttft,
                prefill_tokens_per_s=sum(lens) / ttft if ttft > 0 else float("inf"),
                decode_tokens_per_s=decoded / decode_s if decode_s > 0 and decoded else 0.0,
                decode_s=decode_s, total_s=t_end - t0, batch_size=n, padded_shape=(B, S),
                cache_len=cache_len))
        return results


def summary(results: Sequence[GenerationResult], compile_s: float | None = None) -> str:
    """A short human-readable summary of one generate call."""
    r = results[0]
    gen = sum(x.num_tokens for x in results)
    lines = [f"requests: {len(results)}   padded batch x prompt: {r.padded_shape[0]} x "
             f"{r.padded_shape[1]}   KV cache: {r.cache_len} positions",
             f"prompt tokens: {sum(len(x.prompt_tokens) for x in results)}   generated tokens: {gen}   "
             f"finish: {', '.join(x.finish_reason for x in results)}",
             f"time to first token: {r.ttft_s * 1e3:.1f} ms   prefill: {r.prefill_tokens_per_s:.1f} tok/s",
             f"decode: {r.decode_tokens_per_s:.2f} tok/s over {r.decode_s:.2f} s   total: {r.total_s:.2f} s"]
    if compile_s is not None:
        lines.append(f"compile (warm-up, not in the numbers above): {compile_s:.1f} s")
    return "\n".join(lines)


def generate(model, tokenizer, prompts, **kwargs) -> list[GenerationResult]:
    """One-shot convenience: Generator(model, tokenizer).generate(prompts, **kwargs)."""
    gen_kw = {k: kwargs.pop(k) for k in ("max_cache_len", "stop_token_ids") if k in kwargs}
    return Generator(model, tokenizer, **gen_kw).generate(prompts, **kwargs)


__all__ = ["Generator", "encode_prompt", "GenerationResult", "GenerationStream", "TextDelta", "IncrementalDetokenizer",
           "generate", "summary", "bucket_len", "bucket_batch", "SamplingParams"]
