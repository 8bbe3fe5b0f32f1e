"""Pallas kernels of the engine: attention over the paged KV cache (and its split combine); the
decode step's skinny matmuls on the stacked weights in place (o_proj, SwiGLU's gate + up); the
one-rank fused reduction (residual add + RMSNorm). Each kernel runs on GPU through Pallas' Triton
lowering and on CPU in interpret mode, which is how CI tests it against its XLA reference."""
