"""``LayerOf``: layer ``layer`` of a stacked weight [L, ...], handed to a kernel whole.

Why: in the unrolled decode step a layer's slice of a stacked weight that feeds a custom call
(a cuBLAS-Lt GEMM, a Pallas kernel) is copied into a buffer of its own first, one copy kernel
per weight per layer (bench/results/profile_decode_h200.json: o_proj's slices for cuBLAS-Lt, 0.5
ms a step; the norm weights' for kernels.add_rmsnorm, 64 copies of 1.3 us). The kernels take the
stacked array and the layer index and offset their loads themselves. Everything else takes
``.slice()``, which XLA fuses into its consumer.
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class LayerOf:
    stacked: jax.Array
    layer: int | jax.Array   # the layer index: an int, or an int32 scalar (may be traced)

    def slice(self) -> jax.Array:
        return self.stacked[self.layer]

    @property
    def shape(self) -> tuple:
        """The layer's shape (the slice's)."""
        return self.stacked.shape[1:]

    @property
    def dtype(self):
        return self.stacked.dtype


def resolve(w):
    """A plain array for ``w`` (an array, or a LayerOf to be sliced)."""
    return w.slice() if isinstance(w, LayerOf) else w
