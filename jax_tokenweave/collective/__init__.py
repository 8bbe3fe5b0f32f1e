"""The fused AllReduce + residual-add + RMSNorm collective: its contract and `xla` reference
(`fused`), the CUDA binding that loads the extension built from `xla_ffi/` (`extension`), the
`p2p`/`multimem`/`auto` implementations on top of it (`cuda_ops`), the peer-memory communicator
they run on (`communicator`) and the measured table `auto` picks from (`auto_table`)."""
