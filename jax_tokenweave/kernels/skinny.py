"""What the decode step's skinny-matmul kernels share (layer_matmul.py, layer_swiglu.py): the
GPU's size, Triton's smallest dot, tile arithmetic and the checks of the stacked operands. The SM
count is also the one add_rmsnorm.py and paged_attention.py size their grids by."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_SMS = 132         # H200
MIN_ROWS = 16         # Triton's dot: M >= 16 (fewer rows are padded by masked loads)


def pow2_at_most(n: int, cap: int) -> int:
  """The largest power of two <= cap that divides n (>= 1)."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def padded_rows(m: int) -> int:
  """The rows a tile of m rows is padded to: a power of two, at least MIN_ROWS."""
  return max(MIN_ROWS, 1 << max(0, (m - 1).bit_length()))


def tiles(fn: str, n: int, k: int, block_n, block_k, *, cap_n: int, cap_k: int, n_name: str,
          hint: str):
  """(block_n, block_k): the given ones, or the largest powers of two <= cap_n / cap_k dividing
  N / K; both must be >= 16 (Triton's dot) and divide N and K."""
  bn = pow2_at_most(n, cap_n) if block_n is None else int(block_n)
  bk = pow2_at_most(k, cap_k) if block_k is None else int(block_k)
  if n % bn or k % bk or bn < 16 or bk < 16:
    raise ValueError(f"{fn}: block_n={bn} / block_k={bk} must be >= 16 and divide "
                     f"{n_name}={n} / K={k}; {hint}")
  return bn, bk


def check_stacked(fn: str, x, weights: dict, layer) -> jax.Array:
  """x [M, K] against stacked weights {name: [L, K, N]} of one shape and x's dtype, and an
  integer scalar layer -> the layer as the one-element int32 array the kernels take."""
  shapes = {w.shape for w in weights.values()}
  names = ", ".join(weights)
  first = next(iter(weights.values()))
  if x.ndim != 2 or len(shapes) != 1 or first.ndim != 3 or x.shape[1] != first.shape[1]:
    got = ", ".join(f"{n}{list(w.shape)}" for n, w in weights.items())
    raise ValueError(f"{fn}: x must be [M, K] and {names} [L, K, N] (all one shape); got "
                     f"x{list(x.shape)}, {got}.")
  if any(w.dtype != x.dtype for w in weights.values()):
    raise ValueError(f"{fn}: x is {x.dtype} and {names} "
                     f"{', '.join(str(w.dtype) for w in weights.values())}; cast x to the weights' dtype.")
  layer = jnp.asarray(layer)
  if layer.size != 1 or not jnp.issubdtype(layer.dtype, jnp.integer):
    raise ValueError(f"{fn}: layer must be an integer scalar, got {layer.dtype}{list(layer.shape)}.")
  return layer.astype(jnp.int32).reshape(1)
