"""The parallel plan: the device mesh (`mesh`), the one table of logical-axis -> mesh-axis
sharding rules for weights and KV cache (`sharding`), and multi-process start-up with
`jax.distributed` plus host <-> global-array helpers (`distributed`)."""
