"""TPModel: a Llama-family model placed on a tensor-parallel mesh, with jit-compiled
``logits`` / ``prefill`` / ``decode``.

Every method runs the model under ``jax.shard_map`` over ``axis_name``; the weights are a flat
dict ``path -> jax.Array`` placed by ``jax_tokenweave.parallel.sharding``'s rules, and each call merges
the local shards back into the NNX module inside the shard_map. Host inputs become replicated
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

from jax_tokenweave.compat import shard_map
from jax_tokenweave.engine.kv_cache import KVCache, init_cache
from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.hf_keys import check_complete, flat_to_state, param_shapes, state_to_flat
from jax_tokenweave.models.llama import Llama, TPContext, abstract_model
from jax_tokenweave.models.mixtral import MOE_IMPLS
from jax_tokenweave.parallel.sharding import cache_spec, param_shardings

__all__ = ["TPModel", "KVCache", "to_host"]


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy, on any process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _place(value: Any, sharding: NamedSharding, dtype) -> jax.Array:
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

    params: nnx.State, an nnx Module, or a flat dict path -> array (numpy or jax); placed onto
    the mesh with the sharding rules (left where they are when already placed so).
    impl / comm: the fused_allreduce_rmsnorm implementation and its Communicator.
    attn_impl: prefill attention, "xla" or "cudnn"; None picks cuDNN on GPU meshes (used there
    for bf16/fp16 weights only) and XLA elsewhere. Decode attention always uses XLA.
    split: TokenWeave's token splitting for logits/prefill (jax_tokenweave.weave): None (off), a
    weave.SplitConfig, or "auto" (this model's entry of weave.WEAVE_TABLE). Decode is never split.
    moe_impl: Mixtral's grouped expert matmul, "ragged" or "capacity" (models/mixtral.py).
    """

    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, *, axis_name: str = "tp",
                 impl: str = "xla", comm=None, attn_impl: str | None = None, dtype=None,
                 split=None, moe_impl: str = "ragged"):
        self.cfg, self.mesh, self.axis_name = cfg, mesh, axis_name
        self.impl, self.comm = impl, comm
        self._shardings = param_shardings(cfg, mesh, axis_name)  # raises on non-dividing shapes
        self.tp = mesh.shape[axis_name]
        if isinstance(params, (nnx.State, nnx.Module)):
            params = state_to_flat(params)
        check_complete(cfg, params.keys())
        for path, shape in param_shapes(cfg).items():
            if tuple(params[path].shape) != shape:
                raise ValueError(f"parameter {path!r} has shape {tuple(params[path].shape)}, the "
                                 f"config needs {shape}")
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
            from jax_tokenweave.weave import config_for
            split = config_for(cfg, self.tp)
        self.split = split
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={moe_impl!r}; choose one of {MOE_IMPLS}")
        self.ctx = TPContext(axis_name=axis_name, impl=impl, comm=comm, attn_impl=attn_impl,
                             split=split, moe_impl=moe_impl)
        self._graphdef = nnx.split(abstract_model(cfg))[0]
        self._replicated = NamedSharding(mesh, P())
        self._build()

    @classmethod
    def random(cls, cfg: ModelConfig, mesh: Mesh, *, seed: int = 0, dtype=jnp.float32,
               axis_name: str = "tp", **kw) -> "TPModel":
        """Random weights, each shard created on its own device (never the whole model on one)."""
        shardings = param_shardings(cfg, mesh, axis_name)

        def init():
            return state_to_flat(Llama(cfg, rngs=nnx.Rngs(params=seed), dtype=dtype))

        params = jax.jit(init, out_shardings=shardings)()
        return cls(cfg, params, mesh, axis_name=axis_name, **kw)

    # ------------------------------------------------------------------ compiled functions

    def _local_model(self, local_params) -> Llama:
        return nnx.merge(self._graphdef, flat_to_state(self._graphdef, local_params))

    def _build(self):
        ctx, cs, rep = self.ctx, cache_spec(self.axis_name), P()
        pspecs = {k: s.spec for k, s in self._shardings.items()}
        smap = lambda f, ins, outs: shard_map(f, mesh=self.mesh, in_specs=ins,  # noqa: E731
                                              out_specs=outs, check_vma=False)

        def logits_local(params, tokens):
            model = self._local_model(params)
            B, S = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            x, _ = model(tokens, pos, ctx=ctx, mode="full")
            return model.lm_head_logits(x.reshape(B * S, -1), ctx).reshape(B, S, -1)

        def prefill_local(params, tokens, lengths, k, v):
            model = self._local_model(params)
            B, S = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            x, (k, v) = model(tokens, pos, ctx=ctx, mode="prefill", cache=(k, v))
            last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return model.lm_head_logits(last, ctx), k, v

        def decode_local(params, tokens, lengths, k, v):
            model = self._local_model(params)
            x, (k, v) = model(tokens[:, None], lengths[:, None], ctx=ctx, mode="decode",
                              cache=(k, v), lengths=lengths)
            return model.lm_head_logits(x[:, 0], ctx), k, v

        logits_sm = smap(logits_local, (pspecs, rep), rep)
        prefill_sm = smap(prefill_local, (pspecs, rep, rep, cs, cs), (rep, cs, cs))
        decode_sm = smap(decode_local, (pspecs, rep, rep, cs, cs), (rep, cs, cs))

        def prefill(params, tokens, lengths, cache):
            logits, k, v = prefill_sm(params, tokens, lengths, cache.k, cache.v)
            return logits, KVCache(k=k, v=v, lengths=lengths)

        def decode(params, tokens, cache):
            logits, k, v = decode_sm(params, tokens, cache.lengths, cache.k, cache.v)
            return logits, KVCache(k=k, v=v, lengths=cache.lengths + 1)

        # jax.jit caches one executable per input shape; the cache buffers are updated in place.
        self._logits_fn = jax.jit(logits_sm)
        self._prefill_fn = jax.jit(prefill, donate_argnums=(3,))
        self._decode_fn = jax.jit(decode, donate_argnums=(2,))

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

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions."""
        return init_cache(self.cfg, self.mesh, batch, max_len, dtype or self.dtype, self.axis_name)

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
