"""The one synchronisation between programs of a kernel that the engine's kernels use: after each
program of a group has stored its share, the last of them to arrive, counted on a zeroed int32
counter, finishes the group's work (the decode kernel's split combine, layer_qkv's split-K sum).

Why the last one sees every share: the barrier orders all of this CTA's stores before its
increment; the increment is acq_rel at GPU scope (Pallas' Triton lowering of atomic_add), so it
releases them, and the last program's increment, which reads the value every earlier one left,
acquires them all (an acquire at GPU scope also invalidates the SM's L1, so its loads cannot hit
stale lines). Interpret mode runs the programs one after another and has no barrier (none is
needed there).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def last_to_arrive(cnt_ref, index: tuple, count, *, interpret: bool):
  """Count this program's arrival at ``cnt_ref[index]`` -> whether it is the
  last of ``count`` (traced or static) to arrive. Call it after the program's stores."""
  if not interpret:
    pltriton.debug_barrier()
  arrived = pltriton.atomic_add(cnt_ref, index, jnp.int32(1))
  return arrived == count - 1
