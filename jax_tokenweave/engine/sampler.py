"""Token sampling in pure JAX: greedy, temperature, top-k, top-p (nucleus), per-request seeds.

Every parameter is per request (a batch row), so one compiled function serves a batch that mixes
greedy and sampled requests. All shapes are static; nothing here depends on values at trace time.

    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1)
    keys   = request_keys([p.seed for p in batch])            # [B] typed keys, one per request
    toks   = sample(logits, step_keys(keys, step), *as_arrays(batch))

Semantics (the order Hugging Face's generation uses): logits / temperature, then keep the
``top_k`` highest, then keep the smallest set of those whose probabilities sum to ``top_p``
(the most likely token is always kept), then draw from the renormalised distribution.
``temperature == 0`` is greedy (argmax of the raw logits); ``top_k == 0`` and ``top_p >= 1``
disable those filters.

Randomness: request ``i`` draws step ``t`` from ``fold_in(key(seed_i), t)``. A request's tokens
therefore depend only on its own seed and logits, not on which other requests share its batch
or on the batch's padding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one request. temperature=0 (default) is greedy."""
    temperature: float = 0.0
    top_k: int = 0           # 0: no top-k filter
    top_p: float = 1.0       # 1.0: no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def as_arrays(params: Sequence[SamplingParams], batch: int | None = None):
    """(temperature [B] f32, top_k [B] i32, top_p [B] f32) as numpy, padded to `batch` rows with
    greedy rows."""
    batch = len(params) if batch is None else batch
    pad = [SamplingParams()] * (batch - len(params))
    ps = list(params) + pad
    return (np.array([p.temperature for p in ps], np.float32),
            np.array([p.top_k for p in ps], np.int32),
            np.array([p.top_p for p in ps], np.float32))


def request_keys(seeds: Sequence[int]) -> np.ndarray:
    """Raw uint32 PRNG key data [B, 2] (threefry), one per request, from integer seeds."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s) & 0xFFFFFFFF,
                                                                    impl="threefry2x32")))
                     for s in seeds]).astype(np.uint32)


def step_keys(keys: jax.Array, step) -> jax.Array:
    """Keys for decoding step `step` (a scalar, may be traced): fold_in(key_i, step), row-wise."""
    wrapped = jax.random.wrap_key_data(keys, impl="threefry2x32")
    return jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, step))(wrapped))


def row_keys(keys: jax.Array, steps: jax.Array) -> jax.Array:
    """Keys for rows at their own steps: fold_in(key_i, steps[i]) (the continuous engine, where
    each request is at its own step)."""
    wrapped = jax.random.wrap_key_data(keys, impl="threefry2x32")
    return jax.random.key_data(jax.vmap(jax.random.fold_in)(wrapped, steps))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scaled, top-k / top-p masked logits in *descending order*, and the vocabulary ids of
    that order. logits [B, V]; temperature/top_p [B] f32; top_k [B] i32. Masked entries are -inf.

    Rows with temperature 0 are scaled by 1 (their filtered distribution is only used by the
    statistical tests; `sample` takes the argmax for them)."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    # one descending sort serves both filters
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    srt = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    srt = jnp.where(rank < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    # keep token i while the mass strictly before it is < top_p: the top token always survives
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) | (rank == 0)
    srt = jnp.where(keep, srt, -jnp.inf)
    return srt, order


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, greedy: bool = False) -> jax.Array:
    """Next token ids [B] int32. keys: raw key data [B, 2] uint32 for this step (see step_keys).

    greedy (static): every row has temperature 0, so the vocabulary sort is left out of the
    program. The caller decides from the batch's temperatures on the host (`all_greedy`).
    It is a compile-time switch rather than a ``lax.cond`` on the temperatures because XLA:GPU
    runs a conditional by copying its predicate to the host and waiting for the stream: the step
    would block its own dispatch thread, and the next step could not be queued behind it."""
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return greedy_tok
    srt, order = filter_logits(logits, temperature, top_k, top_p)
    wrapped = jax.random.wrap_key_data(keys, impl="threefry2x32")
    pos = jax.vmap(lambda k, l: jax.random.categorical(k, l))(wrapped, srt)
    tok = jnp.take_along_axis(order, pos[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, tok, greedy_tok)


def all_greedy(temperature: np.ndarray) -> bool:
    """Host-side: whether a batch's temperatures (numpy, as ``as_arrays`` gives them) are all 0."""
    return not bool(np.any(np.asarray(temperature) > 0))


@functools.partial(jax.jit, static_argnames="greedy")
def sample_step(logits, keys, step, temperature, top_k, top_p, greedy=False):
    """jit'd `sample` with the per-step keys folded in."""
    return sample(logits, step_keys(keys, step), temperature, top_k, top_p, greedy=greedy)
