"""Page accounting for the paged KV cache (host side: pure Python and numpy, no jax).

The cache holds, per layer, ``num_pages`` pages of ``page_size`` token slots. Page 0 is reserved
as a scratch page (the padding tokens of a step write their K/V there), so the pages a sequence
can own are ``1 .. num_pages - 1``. A sequence's block table lists its pages in order: position
``p`` lives in page ``table[p // page_size]`` at offset ``p % page_size``.

The block manager only counts: which pages are free and which sequence owns which pages. It
never touches the device arrays.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
    """Growing a sequence needs more free pages than the pool has."""


class UnknownSequence(KeyError):
    """A sequence id the block manager holds no pages for (never allocated, or already freed)."""

    def __str__(self) -> str:  # KeyError's str() quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class BlockManager:
    """Free list plus per-sequence page lists over pages ``1 .. num_pages - 1``.

    Freed pages are reused last-in first-out. ``allocate`` is atomic: when it raises
    ``OutOfPages`` nothing was allocated.
    """

    def __init__(self, num_pages: int, page_size: int):
        if int(num_pages) != num_pages or num_pages < 2:
            raise ValueError(f"BlockManager: num_pages must be an integer >= 2 (page 0 is the reserved "
                             f"scratch page), got {num_pages!r}")
        if int(page_size) != page_size or page_size < 1:
            raise ValueError(f"BlockManager: page_size must be an integer >= 1, got {page_size!r}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        # Popped from the end: a fresh manager hands out 1, 2, 3, ...
        self._free: list[int] = list(range(self.num_pages - 1, SCRATCH_PAGE, -1))
        self._tables: dict[int, list[int]] = {}

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        """Pages a sequence can own: all but the scratch page."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Positions the whole usable pool holds."""
        return self.num_usable * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` positions."""
        if num_tokens < 0:
            raise ValueError(f"pages_for: num_tokens must be >= 0, got {num_tokens}")
        return -(-int(num_tokens) // self.page_size)

    # ---- sequences -------------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    @property
    def seq_ids(self) -> list[int]:
        return list(self._tables)

    def _table(self, seq_id: int, what: str) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise UnknownSequence(f"{what}: sequence {seq_id!r} holds no pages (never allocated, or "
                                  f"already freed)") from None

    def num_pages_of(self, seq_id: int) -> int:
        return len(self._table(seq_id, "num_pages_of"))

    def capacity_of(self, seq_id: int) -> int:
        """Positions the sequence's pages hold now (0 for a sequence without pages)."""
        return len(self._tables.get(seq_id, ())) * self.page_size

    def _extra_pages(self, seq_id: int, num_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, self.pages_for(num_tokens) - have)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Would growing ``seq_id`` (new or existing) to hold ``num_tokens`` positions fit?"""
        return self._extra_pages(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s pages to hold ``num_tokens`` positions in total (never shrinks).

        A new sequence id is registered (with no pages if ``num_tokens`` is 0). Returns the pages
        added (possibly none). Raises ``OutOfPages`` and allocates nothing if they don't fit.
        """
        extra = self._extra_pages(seq_id, num_tokens)
        if extra > len(self._free):
            raise OutOfPages(
                f"KV cache out of pages: sequence {seq_id} needs {extra} more page"
                f"{'s' if extra != 1 else ''} of {self.page_size} tokens (to hold {num_tokens} "
                f"positions), {len(self._free)} free of {self.num_usable}; raise num_pages / "
                f"kv-cache memory or lower max_num_seqs / the token budget")
        table = self._tables.setdefault(seq_id, [])
        new = [self._free.pop() for _ in range(extra)]
        table.extend(new)
        return new

    def free(self, seq_id: int) -> int:
        """Return all of ``seq_id``'s pages to the free list; returns how many. Freeing an
        unknown or already freed sequence raises ``UnknownSequence``."""
        table = self._table(seq_id, "free")
        del self._tables[seq_id]
        # Reversed so that the sequence's first page is the next one handed out (LIFO).
        self._free.extend(reversed(table))
        return len(table)

    # ---- lookups ---------------------------------------------------------------------------
    def block_table(self, seq_id: int) -> list[int]:
        return list(self._table(seq_id, "block_table"))

    def slot(self, seq_id: int, position: int) -> tuple[int, int]:
        """``(page, offset)`` of ``position`` in ``seq_id``'s pages."""
        table = self._table(seq_id, "slot")
        if not 0 <= position < len(table) * self.page_size:
            raise IndexError(f"slot: position {position} of sequence {seq_id} is outside its "
                             f"{len(table)} pages ({len(table) * self.page_size} positions)")
        return table[position // self.page_size], position % self.page_size

    def slots(self, seq_id: int, start: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised ``slot`` for positions ``start .. start + num_tokens - 1``: int32
        ``(pages, offsets)``."""
        table = self._table(seq_id, "slots")
        if start < 0 or num_tokens < 0 or start + num_tokens > len(table) * self.page_size:
            raise IndexError(f"slots: positions {start}..{start + num_tokens - 1} of sequence {seq_id} "
                             f"are outside its {len(table)} pages ({len(table) * self.page_size} "
                             f"positions)")
        pos = np.arange(start, start + num_tokens, dtype=np.int64)
        pages = np.asarray(table, dtype=np.int32)[pos // self.page_size]
        return pages, (pos % self.page_size).astype(np.int32)

    def block_tables_array(self, seq_ids: Iterable[int], width: int) -> np.ndarray:
        """int32 ``[len(seq_ids), width]``: each row a block table, zero (scratch page) padded."""
        seq_ids = list(seq_ids)
        out = np.zeros((len(seq_ids), int(width)), np.int32)
        for row, sid in enumerate(seq_ids):
            table = self._table(sid, "block_tables_array")
            if len(table) > width:
                raise ValueError(f"block_tables_array: sequence {sid} has {len(table)} pages, more than "
                                 f"the width {width}")
            out[row, :len(table)] = table
        return out

    # ---- checks ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every usable page is either free or owned by exactly one sequence; the scratch page is
        neither. Raises ``AssertionError`` naming the first violation."""
        owner: dict[int, object] = {}
        for page in self._free:
            if not 1 <= page < self.num_pages:
                raise AssertionError(f"free list holds page {page}, outside 1..{self.num_pages - 1}")
            if page in owner:
                raise AssertionError(f"page {page} is on the free list twice")
            owner[page] = "free"
        for sid, table in self._tables.items():
            for page in table:
                if not 1 <= page < self.num_pages:
                    raise AssertionError(f"sequence {sid} owns page {page}, outside 1..{self.num_pages - 1}")
                if page in owner:
                    other = owner[page]
                    raise AssertionError(f"page {page} of sequence {sid} is also "
                                         f"{'free' if other == 'free' else f'owned by sequence {other}'}")
                owner[page] = sid
        if len(owner) != self.num_usable:
            missing = sorted(set(range(1, self.num_pages)) - set(owner))
            raise AssertionError(f"pages neither free nor owned (leaked): {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}")

    def __repr__(self) -> str:
        return (f"BlockManager(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"free={self.num_free}, seqs={len(self._tables)})")
