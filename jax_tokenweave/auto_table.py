"""Measured choice between `p2p` and `xla` for impl="auto" (see scripts/bench_allreduce.py).

TABLE[num_ranks] is a list of (max_message_bytes, impl) in increasing size; a message
(tokens x hidden x itemsize) takes the first entry whose bound it does not exceed. Sizes beyond the
last entry, and axis sizes that were not measured, use "xla", so "auto" is never slower than xla
where it was measured and falls back to xla where it was not.
"""
from __future__ import annotations

# Source: bench/results/allreduce_tp4_h200_h8192.json (4x H200, jax 0.11.2, 2026-11-21, hidden 8192,
# ours vs the best XLA option per size, 10 chained calls inside one jit): ours was faster from 2 MiB
# (128 tokens, x1.27) to 32 MiB (2048 tokens, x1.05) and slower at 0.25-1 MiB and >= 64 MiB.
SOURCE = "bench/results/allreduce_tp4_h200_h8192.json (+ allreduce_tp4_h200_h5120_6144.json)"
# Messages up to this size use the one-shot kernel (raw kernel timing: 15.4 us one-shot against
# 21.1 us two-shot at 0.25 MiB, a tie at 1 MiB).
ONESHOT_MAX_BYTES = 512 << 10
TABLE: dict[int, list[tuple[int, str]]] = {
    4: [(1 << 20, "xla"), (32 << 20, "p2p")],
}


def choose(tokens: int, hidden: int, itemsize: int, num_ranks: int) -> str:
    msg = tokens * hidden * itemsize
    for bound, impl in TABLE.get(num_ranks, ()):
        if msg <= bound:
            return impl
    return "xla"
