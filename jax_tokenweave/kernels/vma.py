"""Output types of a pallas_call inside ``shard_map(check_vma=True)``: there each output needs the
manual-axis type saying over which mesh axes it varies, or pallas_call refuses to trace. The
kernels give every output the type of their most varying input."""
from __future__ import annotations

import jax


def most_varying_mat(*xs):
  """The manual-axis type of the most varying of ``xs``, or None (outside shard_map)."""
  best = None
  for x in xs:
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is not None and (best is None or len(getattr(mat, "varying", ()))
                            > len(getattr(best, "varying", ()))):
      best = mat
  return best


def out_struct(shape, dtype, mat):
  """A ShapeDtypeStruct carrying ``mat`` (most_varying_mat's) where this jax has the argument."""
  if mat is not None:
    try:
      return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    except TypeError:  # a jax without manual axis types
      pass
  return jax.ShapeDtypeStruct(shape, dtype)
