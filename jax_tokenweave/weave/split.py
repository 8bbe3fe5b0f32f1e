"""When and where TokenWeave cuts a batch in two.

A batch of T >= ``threshold`` tokens is cut into two halves at a wave-aware point:
``t0 = round(T/2 / tile) * tile + offset`` (clamped to [1, T-1]), so the GEMMs of each half fill
whole tiles (waves) of the GPU; ``tile``/``offset`` come from a per-model table that
``scripts/tune_split.py`` measures (``weave_table.json``). Below the threshold: no split, the
fused op alone. Two kinds for a padded [B, S] batch, chosen statically from its shape:

``batch``  B >= 2 and some b sequences hold ~t0 tokens (|b*S - t0| <= max(tile,
           max_imbalance*T)): half 0 = sequences [0, b), half 1 = [b, B). The halves'
           attentions are independent.
``seq``    otherwise (one long prompt, or a batch split too unbalanced): every sequence is cut at
           position s0 = round(t0 / B): half 0 = x[:, :s0], half 1 = x[:, s0:]. Half 1 attends to
           half 0's keys/values too.

A flat ragged batch of the continuous engine ([1, T]: several sequences back to back) takes the
``seq`` kind: it is cut at token t0 (static, so one compile per token bucket). The host knows
t0 and lays the step's chunks out around it (engine/step_batch.py ``split_order``): prefill
chunks and enough decode tokens to end exactly at t0, so the halves are whole sequences, when
the decode tokens can close the gap; otherwise t0 falls inside a prefill chunk, whose second
part reads the first part's keys/values from the pages, which half 0 writes first
(engine/attention.py ``split_ragged``). The schedule (schedule.py) is the same either way.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp


TABLE_PATH = os.path.join(os.path.dirname(__file__), "weave_table.json")


# ------------------------------------------------------------------------------ configuration

@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """When and where to split a batch. Hashable: it is part of the compiled graph (TPContext)."""
    threshold: int = 1024          # split batches of at least this many tokens
    tile: int = 128                # GEMM tile multiple the half is rounded to
    offset: int = 0                # tokens added to the rounded half (tuned; may be negative)
    offsets: tuple = ()            # ((min_tokens, offset), ...): per-size offsets, override `offset`
    max_imbalance: float = 0.125   # `batch` kind only if |b*S - t0| <= max(tile, this * T)
    comm_ctas: int = 0             # CTAs (SMs) of a collective overlapped with attention; 0: the
                                   # communicator's count
    comm_ctas_mlp: int = 0         # the same beside the MLP (longer: fewer SMs suffice); 0: comm_ctas
    overlap: str = "auto"          # "auto": start/done overlap for custom-call impls on GPU;
                                   # "off"; "force": the start/done structure everywhere (tests)

    def __post_init__(self):
        if self.threshold < 2 or self.tile < 1:
            raise ValueError(f"SplitConfig: threshold ({self.threshold}) must be >= 2 and tile "
                             f"({self.tile}) >= 1")
        if self.overlap not in ("auto", "off", "force"):
            raise ValueError(f"SplitConfig.overlap={self.overlap!r}; use auto, off or force")
        if self.comm_ctas < 0 or self.comm_ctas_mlp < 0:
            raise ValueError(f"SplitConfig.comm_ctas={self.comm_ctas}, comm_ctas_mlp="
                             f"{self.comm_ctas_mlp}; use 0 (the default) or a positive CTA count")

    def offset_for(self, num_tokens: int) -> int:
        off = self.offset
        for min_tokens, o in sorted(self.offsets):
            if num_tokens >= min_tokens:
                off = o
        return off

    @classmethod
    def from_dict(cls, d: dict) -> "SplitConfig":
        d = dict(d)
        if "offsets" in d:
            offs = d["offsets"]
            items = offs.items() if isinstance(offs, dict) else offs
            d["offsets"] = tuple(sorted((int(k), int(v)) for k, v in items))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["offsets"] = {str(k): v for k, v in self.offsets}
        return d


def model_key(cfg, tp: int) -> str:
    """The table key of a model shape at a TP degree (layer count does not matter)."""
    return (f"h{cfg.hidden_size}-f{cfg.intermediate_size}-q{cfg.num_heads}-kv{cfg.num_kv_heads}"
            f"-d{cfg.head_dim}-tp{tp}")


def load_table(path: str = TABLE_PATH) -> dict[str, SplitConfig]:
    """model_key -> SplitConfig from weave_table.json ({"default": {...}, key: {...}})."""
    if not os.path.exists(path):
        return {"default": SplitConfig()}
    with open(path) as f:
        raw = json.load(f)
    table = {k: SplitConfig.from_dict(v) for k, v in raw.items() if not k.startswith("_")}
    table.setdefault("default", SplitConfig())
    return table


WEAVE_TABLE: dict[str, SplitConfig] = load_table()


def config_for(cfg, tp: int, table: dict[str, SplitConfig] | None = None) -> SplitConfig:
    table = WEAVE_TABLE if table is None else table
    return table.get(model_key(cfg, tp), table["default"])


def split_point(num_tokens: int, cfg: SplitConfig | None) -> int | None:
    """Tokens in half 0, or None when the batch is not split (below threshold or no config)."""
    if cfg is None or num_tokens < cfg.threshold or num_tokens < 2:
        return None
    half = int(num_tokens / 2 / cfg.tile + 0.5) * cfg.tile   # nearest tile multiple, half up
    if not 0 < half < num_tokens:                              # batch smaller than ~a tile
        half = num_tokens // 2
    t0 = half + cfg.offset_for(num_tokens)
    return min(max(t0, 1), num_tokens - 1)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """How a [B, S] batch is cut: kind "batch" (n0 sequences) or "seq" (n0 positions)."""
    kind: str
    n0: int
    batch: int
    seq: int

    @property
    def tokens(self) -> tuple[int, int]:
        t0 = self.n0 * (self.seq if self.kind == "batch" else self.batch)
        return t0, self.batch * self.seq - t0

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        B, S, n = self.batch, self.seq, self.n0
        if self.kind == "batch":
            return (n, S), (B - n, S)
        return (B, n), (B, S - n)

    def split(self, x):
        """x [B, S, ...] -> (half 0, half 1)."""
        ax = 0 if self.kind == "batch" else 1
        return (jax.lax.slice_in_dim(x, 0, self.n0, axis=ax),
                jax.lax.slice_in_dim(x, self.n0, x.shape[ax], axis=ax))

    def join(self, a, b):
        return jnp.concatenate([a, b], axis=0 if self.kind == "batch" else 1)


def plan_split(batch: int, seq: int, cfg: SplitConfig | None) -> SplitPlan | None:
    """Choose the split of a [batch, seq] batch (see the module doc), or None."""
    T = batch * seq
    t0 = split_point(T, cfg)
    if t0 is None:
        return None
    if batch >= 2:
        b = min(max(int(t0 / seq + 0.5), 1), batch - 1)
        if abs(b * seq - t0) <= max(cfg.tile, cfg.max_imbalance * T):
            return SplitPlan("batch", b, batch, seq)
    if seq < 2:
        return None
    s0 = min(max(int(t0 / batch + 0.5), 1), seq - 1)
    return SplitPlan("seq", s0, batch, seq)
