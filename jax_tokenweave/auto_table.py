"""Measured choice between `p2p` and `xla` for impl="auto" (see scripts/bench_allreduce.py).

TABLE[num_ranks] is a list of (max_message_bytes, impl) in increasing size; a message
(tokens x hidden x itemsize) takes the first entry whose bound it does not exceed. Sizes beyond the
last entry, and axis sizes that were not measured, use "xla", so "auto" is never slower than xla
where it was measured and falls back to xla where it was not.
"""
from __future__ import annotations

# Source: bench/results/allreduce_tp4_h200_h8192.json (4x H200, jax 0.11.2, 2026-11-21, hidden 8192,
# ours vs the best XLA option per size; per-call slope timing): ours was faster at 0.25 MiB (16
# tokens, x1.36) and 0.5 MiB (32 tokens, x2.09), slower from 1 MiB on except a tie at 16 MiB (x1.00).
SOURCE = "bench/results/allreduce_tp4_h200_h8192.json"
# Messages up to this size use the one-shot kernel (raw kernel timing: 15-18 us one-shot against
# 21-27 us two-shot at 0.25 MiB, a tie at 1 MiB).
ONESHOT_MAX_BYTES = 512 << 10
TABLE: dict[int, list[tuple[int, str]]] = {
    4: [(512 << 10, "p2p")],
}


def choose(tokens: int, hidden: int, itemsize: int, num_ranks: int) -> str:
    msg = tokens * hidden * itemsize
    for bound, impl in TABLE.get(num_ranks, ()):
        if msg <= bound:
            return impl
    return "xla"
