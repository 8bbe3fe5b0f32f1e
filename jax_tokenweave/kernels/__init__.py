"""Pallas kernels of the engine: attention over the paged KV cache, and the decode step's o_proj
on the stacked weights. Each kernel runs on GPU through Pallas' Triton lowering and on CPU in
interpret mode, which is how CI tests it against its XLA reference."""
