"""Benchmark harness shared by `scripts/bench_*.py`: random sharded weights, the layer variants
that differ only in the reduction they pass to the model's layer functions, timing with warm-up
and medians, run metadata, result files (JSON, Markdown, PNG) and profile timelines."""
