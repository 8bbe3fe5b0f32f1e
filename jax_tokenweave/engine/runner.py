"""TPModel: a Llama-family model placed on a tensor-parallel mesh, with jit-compiled
``logits`` / ``prefill`` / ``decode`` over a paged KV cache.

Every method runs the model's functions (models/transformer.py, or weave/schedule.py for a split
batch) under ``jax.shard_map`` over ``axis_name``. The weights are a flat dict in the runtime
layout (layers stacked, ``layers.<path>`` [L, ...]) placed by ``parallel.sharding``'s rules;
checkpoints in the per-layer layout are stacked on the way in. Host inputs become replicated
global arrays with ``make_array_from_process_local_data`` and outputs are replicated, so the same
code runs under ``jax.distributed`` on a mesh that spans processes (read outputs with ``to_host``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_tokenweave.collective.reducer import Reducer
from jax_tokenweave.compat import shard_map
from jax_tokenweave.engine import attention, sampler
from jax_tokenweave.engine.step_batch import StepBatch
from jax_tokenweave.engine.kv_cache import (DEFAULT_PAGE_SIZE, SCRATCH_PAGE, STATIC_PAGE_SIZE, KVCache, KVPages,
                                            init_pages, static_block_tables)
from jax_tokenweave.model_io.random_weights import random_params
from jax_tokenweave.models import transformer
from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.hf_keys import check_complete, state_to_flat
from jax_tokenweave.models.layers import LayerSpec, rope_inv_freq
from jax_tokenweave.models.llama import is_stacked, stack_layers, stacked_param_info
from jax_tokenweave.models.moe import MOE_IMPLS
from jax_tokenweave.parallel.sharding import cache_spec, param_shardings
from jax_tokenweave.weave import schedule
from jax_tokenweave.weave.split import SplitConfig, config_for, plan_split

__all__ = ["TPModel", "KVCache", "to_host"]

DECODE_MIN_ROWS = 8   # a decode step runs at least this many rows (see TPModel.decode_fn)
# XLA options of every jit that runs a decode step (this runner's, the Generator's, the profile's).
# No HLO rematerialization: it counts the donated cache, updated in place, twice, so at large caches
# it believes the step is over the memory limit (8B, batch 32, capacity 8192 on the H200: "Can't
# reduce memory use below 87 GiB ... only to 96.04 GiB") and recomputes the RoPE and next-norm
# tables in every layer, 91 more kernels a step; it saves nothing (96.04 GiB before and after).
# Off, that step went 5.27 -> 5.17 ms, the same as at capacity 2048; other shapes unchanged
# (bench/results/profile_decode_h200.json, session_11 no_remat).
DECODE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy, on any process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _place(value: Any, sharding: NamedSharding, dtype) -> jax.Array:
    if isinstance(value, jax.ShapeDtypeStruct):   # abstract weights: compile without allocating
        return jax.ShapeDtypeStruct(value.shape, dtype or value.dtype, sharding=sharding)
    if isinstance(value, jax.Array):
        if dtype is not None and value.dtype != dtype:
            value = value.astype(dtype)
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        return jax.device_put(value, sharding)
    arr = np.asarray(value) if dtype is None else np.asarray(value).astype(dtype)
    # Each process builds only the shards of its own devices (works across processes).
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


class TPModel:
    """A tensor-parallel Llama-family model on ``mesh``.

    params: a flat dict path -> array (numpy or jax) in the checkpoint layout (``layers.i.*``) or
    the runtime layout (``layers.*`` stacked), or an nnx Module / State; placed onto the mesh
    with the sharding rules (left where they are when already placed so).
    impl / comm: the fused_allreduce_rmsnorm implementation and its Communicator.
    attn_impl: prefill attention, "xla" or "cudnn"; None picks cuDNN on GPU meshes (used there
    for bf16/fp16 weights only) and XLA elsewhere. Decode attention is the Pallas paged kernel.
    split: TokenWeave's token splitting for logits/prefill (jax_tokenweave.weave): None (off), a
    weave.SplitConfig, or "auto" (this model's entry of weave.WEAVE_TABLE). Decode is never split.
    moe_impl: Mixtral's grouped expert matmul, "ragged" or "capacity" (models/moe.py).
    """

    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, *, axis_name: str = "tp",
                 impl: str = "xla", comm=None, attn_impl: str | None = None, dtype=None,
                 split=None, moe_impl: str = "ragged"):
        self.cfg, self.mesh, self.axis_name = cfg, mesh, axis_name
        self.impl, self.comm = impl, comm
        self._shardings = param_shardings(cfg, mesh, axis_name, stacked=True)  # raises on non-dividing shapes
        self.tp = mesh.shape[axis_name]
        if isinstance(params, (nnx.State, nnx.Module)):
            params = state_to_flat(params)
        if not is_stacked(params):
            check_complete(cfg, params.keys())
            params = stack_layers(params, cfg)
        for path, (shape, _, _) in stacked_param_info(cfg).items():
            if path not in params:
                raise ValueError(f"parameter {path!r} is missing")
            if tuple(params[path].shape) != shape:
                raise ValueError(f"parameter {path!r} has shape {tuple(params[path].shape)}, the "
                                 f"config needs {shape}")
        unknown = sorted(set(params) - set(self._shardings))
        if unknown:
            raise ValueError(f"unknown parameters {unknown[:5]} for this config")
        self.params = {k: _place(v, self._shardings[k], dtype) for k, v in params.items()}
        self.dtype = self.params["embed_tokens.embedding"].dtype
        if attn_impl is None:
            on_gpu = mesh.devices.flat[0].platform in ("gpu", "cuda")
            attn_impl = "cudnn" if on_gpu else "xla"
        if attn_impl not in ("xla", "cudnn"):
            raise ValueError(f"attn_impl={attn_impl!r}; choose 'xla', 'cudnn' or None (auto)")
        if isinstance(split, str):
            if split != "auto":
                raise ValueError(f"split={split!r}; pass None, 'auto' or a weave.SplitConfig")
            split = config_for(cfg, self.tp)
        self.split: SplitConfig | None = split
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={moe_impl!r}; choose one of {MOE_IMPLS}")
        self.attn_impl = attn_impl
        self.spec = LayerSpec.of(cfg, axis_name, moe_impl)
        self.reducer = Reducer("fused", axis_name, cfg.rms_norm_eps, impl, comm,
                               split.comm_ctas if split else 0, split.comm_ctas_mlp if split else 0)
        self._inv_freq = rope_inv_freq(cfg)
        self._replicated = NamedSharding(mesh, P())
        self._build()

    @classmethod
    def random(cls, cfg: ModelConfig, mesh: Mesh, *, seed: int = 0, dtype=jnp.float32,
               axis_name: str = "tp", **kw) -> "TPModel":
        """Random normal weights (model_io/random_weights.py), each shard made on its own device;
        compiles in seconds for any depth."""
        params = random_params(cfg, mesh, seed=seed, dtype=dtype, axis_name=axis_name)
        return cls(cfg, params, mesh, axis_name=axis_name, **kw)

    # ------------------------------------------------------------------ compiled functions

    def forward(self, params, tokens, positions, *, attend, cache=None, split_attend=None, unroll=False):
        """The model on local shards (inside shard_map): final normed hidden [B, S, D], cache.
        unroll: decode steps (memory-bound) unroll the layer loop (models/transformer.py)."""
        return schedule.forward(params, tokens, positions, split=self.split, spec=self.spec, red=self.reducer,
                                inv_freq=self._inv_freq, attend=attend, split_attend=split_attend, cache=cache,
                                unroll=unroll)

    def prefill_fn(self, params, tokens, lengths, cache: KVCache):
        """Pure (un-jitted) prefill on global arrays: (float32 logits [B, V] at lengths-1, cache)."""
        def local(params, tokens, lengths, block_tables, pages):
            B, S = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            x, pages = self.forward(params, tokens, pos, cache=pages,
                                    attend=attention.prefill(self.attn_impl, block_tables, lengths),
                                    split_attend=attention.split_prefill(self.attn_impl, block_tables, lengths))
            last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return transformer.logits_at(params, last, self.axis_name), pages
        logits, pages = self._smap(local, (self._pspecs, P(), P(), P(), self._cspecs), (P(), self._cspecs))(
            params, tokens, lengths, cache.block_tables, cache.pages)
        return logits, KVCache(pages=pages, block_tables=cache.block_tables, lengths=lengths, max_len=cache.max_len)

    def decode_fn(self, params, tokens, cache: KVCache):
        """Pure (un-jitted) decode step: (float32 logits [B, V], cache with lengths + 1).

        Batches under DECODE_MIN_ROWS run padded to it (rows of length 0 on the scratch page): the
        weights are read once either way, and on the H200 XLA turns the narrowest projections of
        a 1-row step into reduce loops at ~1 TB/s (bench/results/profile_decode_h200.json), so
        the 8-row step is faster than the 1-row one."""
        B = tokens.shape[0]
        pad = max(0, DECODE_MIN_ROWS - B)
        tables, lens = cache.block_tables, cache.lengths
        if pad:
            tokens = jnp.pad(tokens, (0, pad))
            tables = jnp.pad(tables, ((0, pad), (0, 0)), constant_values=SCRATCH_PAGE)
            lens = jnp.pad(lens, (0, pad))

        def local(params, tokens, lengths, block_tables, pages):
            x, pages = self.forward(params, tokens[:, None], lengths[:, None], cache=pages,
                                    attend=attention.decode(block_tables, lengths, busy_rows=B), unroll=True)
            return transformer.logits_at(params, x[:, 0], self.axis_name), pages
        logits, pages = self._smap(local, (self._pspecs, P(), P(), P(), self._cspecs), (P(), self._cspecs))(
            params, tokens, lens, tables, cache.pages)
        return logits[:B], KVCache(pages=pages, block_tables=cache.block_tables, lengths=cache.lengths + 1,
                                   max_len=cache.max_len)

    def step_fn(self, params, batch: StepBatch, pages: KVPages, greedy: bool = False):
        """Pure (un-jitted) continuous-batching step: the flat ragged batch through the model
        (TokenWeave's split when it is large enough and mixes prefill), each sequence's next token
        sampled on the device (greedy, static: no row samples). -> (tokens [S] int32, pages)."""
        def local(params, batch, pages):
            x, pages = self.forward(params, batch.token_ids[None], batch.positions[None], cache=pages,
                                    attend=attention.ragged(batch),
                                    split_attend=None if batch.decode_only else attention.split_ragged(batch),
                                    unroll=batch.decode_only)
            logits = transformer.logits_at(params, x[0][batch.sample_rows], self.axis_name)
            keys = sampler.row_keys(batch.keys, batch.sample_step)
            return sampler.sample(logits, keys, batch.temperature, batch.top_k, batch.top_p,
                                  greedy=greedy), pages
        bspec = jax.tree.map(lambda _: P(), batch)
        return self._smap(local, (self._pspecs, bspec, self._cspecs), (P(), self._cspecs))(params, batch, pages)

    def step(self, batch: StepBatch, pages: KVPages) -> tuple[jax.Array, KVPages]:
        """One engine step (step_fn, compiled per bucket shape); `pages` is donated."""
        greedy = sampler.all_greedy(batch.temperature)
        batch = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else
                             jax.make_array_from_process_local_data(self._replicated, np.asarray(a)), batch)
        return self._step_fn(self.params, batch, pages, greedy=greedy)

    def split_cut(self, num_tokens: int, decode_only: bool) -> int | None:
        """Tokens in half 0 when a step of num_tokens flat tokens runs as TokenWeave's two halves
        (the static cut step_fn traces), else None."""
        plan = None if decode_only or self.split is None else plan_split(1, num_tokens, self.split)
        return None if plan is None else plan.n0

    def init_pages(self, num_pages: int, page_size: int = DEFAULT_PAGE_SIZE, dtype=None) -> KVPages:
        """Empty pools of num_pages pages (page 0 is scratch) for the continuous engine."""
        return init_pages(self.cfg, self.mesh, num_pages, page_size, dtype or self.dtype, self.axis_name)

    def _smap(self, f, ins, outs):
        return shard_map(f, mesh=self.mesh, in_specs=ins, out_specs=outs, check_vma=False)

    def _build(self):
        self._pspecs = {k: s.spec for k, s in self._shardings.items()}
        cs = cache_spec(self.axis_name)
        self._cspecs = KVPages(k=cs, v=cs)

        def logits_local(params, tokens):
            B, S = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            x, _ = self.forward(params, tokens, pos, attend=attention.causal(self.attn_impl),
                                split_attend=attention.split_causal(self.attn_impl))
            return transformer.logits_at(params, x.reshape(B * S, -1), self.axis_name).reshape(B, S, -1)

        # jax.jit caches one executable per input shape; the cache pools are updated in place.
        self._logits_fn = jax.jit(self._smap(logits_local, (self._pspecs, P()), P()))
        self._prefill_fn = jax.jit(self.prefill_fn, donate_argnums=(3,))
        self._decode_fn = jax.jit(self.decode_fn, donate_argnums=(2,),
                                  compiler_options=DECODE_COMPILER_OPTIONS)
        self._step_fn = jax.jit(self.step_fn, donate_argnums=(2,), static_argnames="greedy")

    # ---------------------------------------------------------------------------- inputs

    def _input(self, x, name: str, ndim: int) -> jax.Array:
        if isinstance(x, jax.Array):
            if x.ndim != ndim:
                raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
            return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
        arr = np.asarray(x)
        if arr.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dims, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
        if name == "tokens" and arr.size and (arr.min() < 0 or arr.max() >= self.cfg.vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={self.cfg.vocab_size}); got values "
                             f"in [{arr.min()}, {arr.max()}]")
        return jax.make_array_from_process_local_data(self._replicated, arr.astype(np.int32))

    # ---------------------------------------------------------------------------- public

    def init_cache(self, batch: int, max_len: int, dtype=None, page_size: int = STATIC_PAGE_SIZE) -> KVCache:
        """An empty paged KV cache for `batch` sequences of up to `max_len` positions (each
        sequence owns ceil(max_len / page_size) pages; page 0 is scratch)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be >= 1")
        per_seq = -(-max_len // page_size)
        pages = init_pages(self.cfg, self.mesh, 1 + batch * per_seq, page_size, dtype or self.dtype,
                           self.axis_name)
        tables = self._input(static_block_tables(batch, per_seq), "block_tables", 2)
        return KVCache(pages=pages, block_tables=tables, lengths=self._input(np.zeros(batch, np.int32), "lengths", 1),
                       max_len=max_len)

    def logits(self, tokens) -> jax.Array:
        """tokens [B, S] -> float32 logits [B, S, V] (causal, no cache)."""
        return self._logits_fn(self.params, self._input(tokens, "tokens", 2))

    def prefill(self, tokens, lengths, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Right-padded prompts tokens [B, S] of lengths [B] -> (float32 logits [B, V] at position
        lengths-1, cache holding the prompts). Starts the cache afresh; `cache` is donated."""
        shape = np.shape(tokens)
        if len(shape) != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {shape}")
        B, S = shape
        if B != cache.batch:
            raise ValueError(f"batch of {B} prompts does not match the KV cache's batch of "
                             f"{cache.batch}; create the cache with init_cache({B}, max_len)")
        if S > cache.max_len:
            raise ValueError(f"prompt of {S} tokens does not fit the KV cache of max_len "
                             f"{cache.max_len}; raise max_len in init_cache(batch, max_len) or "
                             f"shorten the prompt")
        if np.shape(lengths) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {np.shape(lengths)}")
        if not isinstance(lengths, jax.Array):
            lens = np.asarray(lengths)
            if lens.min() < 1 or lens.max() > S:
                raise ValueError(f"lengths must lie in [1, {S}] (the padded prompt length); got "
                                 f"{lens.tolist()}")
        return self._prefill_fn(self.params, self._input(tokens, "tokens", 2),
                                self._input(lengths, "lengths", 1), cache)

    def decode(self, tokens, cache: KVCache, *, check_capacity: bool = True
               ) -> tuple[jax.Array, KVCache]:
        """One token per sequence, tokens [B] -> (float32 logits [B, V], cache with lengths + 1).
        `cache` is donated. check_capacity reads cache.lengths on the host (a small sync) to
        raise when a sequence would run past max_len; pass False in a loop that knows its bound."""
        if np.shape(tokens) != (cache.batch,):
            raise ValueError(f"tokens must have shape ({cache.batch},) (one per cached sequence), "
                             f"got {np.shape(tokens)}")
        if check_capacity:
            longest = int(to_host(cache.lengths).max())
            if longest >= cache.max_len:
                raise ValueError(f"KV cache is full: a sequence already holds {longest} of "
                                 f"max_len={cache.max_len} positions; raise max_len in "
                                 f"init_cache(batch, max_len) or stop generating")
        return self._decode_fn(self.params, self._input(tokens, "tokens", 1), cache)
