"""The inference engine around the model: the paged KV cache and its block manager, the
scheduler, the model runner, the sampler, static-batch generation and the continuous-batching
engine."""
