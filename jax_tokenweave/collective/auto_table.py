"""Measured choice between `p2p` and `xla` for impl="auto" (see scripts/bench_allreduce.py).

A table is a list of (max_message_bytes, impl) in increasing size; a message (tokens x hidden x
itemsize) takes the first entry whose bound it does not exceed. BY_HIDDEN[(num_ranks, hidden)] is
used where that hidden size was measured, else TABLE[num_ranks]. Sizes beyond the last entry, and
axis sizes that were not measured, use "xla", so "auto" is never slower than xla where it was
measured and falls back to xla where it was not. Bounds sit where ours was faster than the best XLA
option in most of the day's runs (on the shared machine the small sizes move by up to ±40% from
run to run: XLA psum + norm at 16 tokens took 20-38 µs, ours 16-28 µs).
"""
from __future__ import annotations

# Sources (4x H200, jax 0.11.2, 2026-11-21, slope timing, ours vs the best XLA option per size):
#   hidden 8192, three runs that day (the latest is bench/results/allreduce_tp4_h200_h8192.json):
#     0.25 MiB x1.36 / 1.14 / 0.83, 0.5 MiB x2.09 / 1.28 / 1.10, 1 MiB x0.95 / 1.14 / 0.99, then
#     0.8-1.1 up to 8 MiB, 0.86-1.0 at 16 MiB, 0.72-0.79 from 64 MiB. Bound: 0.5 MiB.
#   bench/results/allreduce_tp4_h200_h5120_6144.json: hidden 5120 x1.20-1.49 up to 2.5 MiB, 0.99 at
#     5 MiB; hidden 6144 x1.04-1.46 up to 3 MiB, 1.03-1.06 at 6-12 MiB (too close to call), 0.87 at
#     24 MiB.
SOURCE = "bench/results/allreduce_tp4_h200_h8192.json, bench/results/allreduce_tp4_h200_h5120_6144.json"
# Messages up to this size use the one-shot kernel (raw kernel timing: 15-18 us one-shot against
# 21-27 us two-shot at 0.25 MiB, a tie at 1 MiB).
ONESHOT_MAX_BYTES = 512 << 10
TABLE: dict[int, list[tuple[int, str]]] = {
    4: [(512 << 10, "p2p")],
}
BY_HIDDEN: dict[tuple[int, int], list[tuple[int, str]]] = {
    (4, 5120): [(5 << 19, "p2p")],     # 2.5 MiB
    (4, 6144): [(3 << 20, "p2p")],
    (4, 8192): [(512 << 10, "p2p")],
}


def choose(tokens: int, hidden: int, itemsize: int, num_ranks: int) -> str:
    msg = tokens * hidden * itemsize
    table = BY_HIDDEN.get((num_ranks, hidden), TABLE.get(num_ranks, ()))
    for bound, impl in table:
        if msg <= bound:
            return impl
    return "xla"
