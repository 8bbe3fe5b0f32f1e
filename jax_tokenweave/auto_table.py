"""Measured choice between `p2p` and `xla` for impl="auto" (see scripts/bench_allreduce.py).

TABLE[num_ranks] is a list of (max_message_bytes, impl) in increasing size; a message
(tokens x hidden x itemsize) takes the first entry whose bound it does not exceed. Sizes beyond the
last entry, and axis sizes that were not measured, use "xla" (never slower than xla by
construction). Regenerate with `python scripts/bench_allreduce.py --write-auto-table`.
"""
from __future__ import annotations

# Measured: see SOURCE. Until a measurement exists for an axis size, "xla" is chosen.
SOURCE = "none yet"
ONESHOT_MAX_BYTES = 512 << 10
TABLE: dict[int, list[tuple[int, str]]] = {}


def choose(tokens: int, hidden: int, itemsize: int, num_ranks: int) -> str:
    msg = tokens * hidden * itemsize
    for bound, impl in TABLE.get(num_ranks, ()):
        if msg <= bound:
            return impl
    return "xla"
