"""jax_tokenweave: TokenWeave-style compute-communication overlap for tensor-parallel inference in JAX.

`pip install -e .` installs the Python package (and maps the top-level `models/` folder to
`jax_tokenweave.models`). The CUDA extension is built by the kernel build step described in BUILD.md
when nvcc is present; without nvcc the package installs as pure JAX (impl="xla").
"""
from setuptools import setup

setup(
    name="jax_tokenweave",
    version="0.1.0",
    description="Fused AllReduce+RMSNorm and token-split overlap for tensor-parallel LLM inference in JAX",
    python_requires=">=3.11",
    packages=["jax_tokenweave", "jax_tokenweave.models"],
    package_dir={"jax_tokenweave": "jax_tokenweave", "jax_tokenweave.models": "models"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "orbax-checkpoint",
        "safetensors",
        "tokenizers",
        "gguf",
        "numpy",
        "tqdm",
        "pybind11",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "torch==2.13.0", "transformers", "jinja2"],
        "bench": ["matplotlib"],
    },
)
