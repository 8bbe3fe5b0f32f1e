"""Tensor-parallel weight placement, written once as rules from logical axis names to mesh axes.

Column-parallel q/k/v and gate/up, row-parallel o and down, vocab-parallel embedding and LM
head all follow from four rules: the sharded logical axes are vocab, heads, kv_heads and ffn.
KV heads are replicated when tp exceeds their number (each rank then computes the one KV head
its query heads read)."""
from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_tokenweave.models.config import ModelConfig
from jax_tokenweave.models.llama import param_info, stacked_param_info

TP = "tp"  # placeholder for the tensor-parallel mesh axis in RULES; replaced by the real axis name

# logical axis -> mesh axis (None: replicated). Axes not listed are replicated.
RULES: dict[str, str | None] = {
    "vocab": TP,
    "heads": TP,
    "kv_heads": TP,
    "ffn": TP,
    "embed": None,
    "head_dim": None,
    "experts": None,  # Mixtral: every rank holds a 1/tp ffn slice of every expert; router replicated
    "layers": None,   # the stacked layer axis the scan runs over
}


def rules_for(cfg: ModelConfig, tp: int, axis_name: str = "tp") -> dict[str, str | None]:
    """RULES with the real axis name, and kv_heads replicated when tp > num_kv_heads."""
    rules = {k: (axis_name if v == TP else v) for k, v in RULES.items()}
    if tp > cfg.num_kv_heads:
        rules["kv_heads"] = None
    return rules


def logical_to_spec(axes: tuple, rules: dict[str, str | None]) -> P:
    return P(*(rules.get(a) for a in axes))


def param_specs(cfg: ModelConfig, tp: int, axis_name: str = "tp", *, stacked: bool = False) -> dict[str, P]:
    """Flat param path -> PartitionSpec, in the checkpoint layout (``layers.i.*``) or, stacked,
    the runtime layout (``layers.*`` [L, ...]). Raises ValueError when the model does not split
    tp ways."""
    cfg.check_tp(tp)
    rules = rules_for(cfg, tp, axis_name)
    info = stacked_param_info(cfg) if stacked else param_info(cfg)
    return {path: logical_to_spec(meta[1], rules) for path, meta in info.items()}


def param_shardings(cfg: ModelConfig, mesh: Mesh, axis_name: str = "tp", *,
                    stacked: bool = False) -> dict[str, NamedSharding]:
    """Flat param path -> NamedSharding on `mesh` (for device_put, jit out_shardings, orbax restore)."""
    check_axis(mesh, axis_name)
    specs = param_specs(cfg, mesh.shape[axis_name], axis_name, stacked=stacked)
    return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}


def check_axis(mesh: Mesh, axis_name: str) -> None:
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis_name!r}; build it with "
                         f"jax_tokenweave.parallel.mesh.make_mesh(tp, axis_name={axis_name!r})")


def cache_spec(axis_name: str = "tp") -> P:
    """Paged KV cache pools [L, KVH_cache, num_pages, page_size, hd]: sharded over the KV-head axis."""
    return P(None, axis_name, None, None, None)


def cache_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """KV heads held by the cache: one per rank when tp > num_kv_heads (replication)."""
    return max(cfg.num_kv_heads, tp)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


__all__ = ["RULES", "rules_for", "logical_to_spec", "param_specs", "param_shardings", "check_axis", "cache_spec",
           "cache_kv_heads", "replicated"]
