"""jax_tokenweave: TokenWeave-style compute-communication overlap for tensor-parallel inference in JAX.

`pip install -e .` installs the Python package (and maps the top-level `models/` folder to
`jax_tokenweave.models`). The CUDA extension `jax_tokenweave.collective._C` (sources in `xla_ffi/`) is built
with nvcc for sm_90a when nvcc is present; without nvcc the package installs as pure JAX
(impl="xla") and says so. See BUILD.md.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_SOURCES = ["xla_ffi/tw_kernels.cu", "xla_ffi/tw_host.cc", "xla_ffi/tw_multimem_host.cc", "xla_ffi/tw_module.cc"]


def _say(msg):
    print(f"[jax_tokenweave build] {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    if os.environ.get("JAX_TOKENWEAVE_NO_CUDA") == "1":
        return None, "JAX_TOKENWEAVE_NO_CUDA=1"
    cands = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c, None
    return None, "nvcc not found (PATH, $NVCC, $CUDA_HOME/bin)"


def _site_dirs():
    # The target interpreter's own site-packages first (sysconfig names it even under PEP 517
    # build isolation), then whatever is on sys.path (the isolated build environment).
    dirs = []
    for key in ("purelib", "platlib"):
        d = sysconfig.get_paths().get(key)
        if d and d not in dirs:
            dirs.append(d)
    return dirs + [p for p in sys.path if p.endswith("site-packages") and p not in dirs]


def _find_header_dir(rel_dir: str, header: str) -> str | None:
    for d in _site_dirs():
        if os.path.isfile(os.path.join(d, rel_dir, header)):
            return os.path.join(d, rel_dir)
    return None


def _include_dirs():
    """jax's FFI headers and pybind11's: those of the target environment first (the jax that will
    run the extension), else the build environment's (pyproject.toml's build requirements)."""
    ffi = os.environ.get("JAX_TOKENWEAVE_JAX_INCLUDE") or _find_header_dir(os.path.join("jaxlib", "include"),
                                                                          os.path.join("xla", "ffi", "api", "ffi.h"))
    if not ffi:
        try:
            import jax.ffi
            ffi = jax.ffi.include_dir()
        except Exception:
            ffi = None
    pyb = _find_header_dir(os.path.join("pybind11", "include"), os.path.join("pybind11", "pybind11.h"))
    if not pyb:
        try:
            import pybind11
            pyb = pybind11.get_include()
        except Exception:
            pyb = None
    return ffi, pyb


class NvccBuildExt(build_ext):
    """Builds jax_tokenweave.collective._C with nvcc (sm_90a), or skips it with a message."""

    skipped = False

    def get_outputs(self):
        return [] if self.skipped else super().get_outputs()

    def get_output_mapping(self):
        return {} if self.skipped else super().get_output_mapping()

    def run(self):
        nvcc, why = _find_nvcc()
        ffi_inc, pyb_inc = _include_dirs()
        if nvcc is None or ffi_inc is None or pyb_inc is None:
            why = why or ("jax's FFI headers not found (install jax first or set JAX_TOKENWEAVE_JAX_INCLUDE)"
                          if ffi_inc is None else "pybind11 headers not found (pip install pybind11)")
            _say(f"SKIPPING the CUDA extension: {why}. impl='xla' works; impl='p2p' will not.")
            NvccBuildExt.skipped = True
            return
        for ext in self.extensions:
            self._build(ext, nvcc, ffi_inc, pyb_inc)

    def _build(self, ext, nvcc, ffi_inc, pyb_inc):
        out = self.get_ext_fullpath(ext.name)
        tmp = os.path.join(self.build_temp, "xla_ffi")
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        arch = os.environ.get("JAX_TOKENWEAVE_CUDA_ARCH", "90a")
        common = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo",
                  f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]",
                  "-I", ffi_inc, "-I", pyb_inc, "-I", sysconfig.get_paths()["include"], "-I", os.path.join(HERE, "xla_ffi")]
        _say(f"nvcc {nvcc}, sm_{arch}, jax FFI headers {ffi_inc}")

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = common + ["-c", os.path.join(HERE, src), "-o", obj]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        cmd = [nvcc, "-shared", f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]",
               "-cudart", "static", "-o", out] + objs
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc link failed:\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
        # Editable installs import the package from the source tree: put the .so there too.
        src_copy = os.path.join(HERE, *ext.name.split(".")[:-1], os.path.basename(out))
        if os.path.abspath(src_copy) != os.path.abspath(out):
            shutil.copyfile(out, src_copy)
        _say(f"built {out}")


setup(
    name="jax_tokenweave",
    version="0.1.0",
    description="Fused AllReduce+RMSNorm and token-split overlap for tensor-parallel LLM inference in JAX",
    python_requires=">=3.11",
    packages=sorted(set(find_packages(include=["jax_tokenweave", "jax_tokenweave.*"])) | {"jax_tokenweave.models"}),
    package_dir={"jax_tokenweave": "jax_tokenweave", "jax_tokenweave.models": "models"},
    package_data={"jax_tokenweave.weave": ["weave_table.json"]},  # the measured split settings
    ext_modules=[Extension("jax_tokenweave.collective._C", sources=CUDA_SOURCES)],
    cmdclass={"build_ext": NvccBuildExt},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "orbax-checkpoint",
        "safetensors",
        "tokenizers",
        "gguf",
        "numpy",
        "tqdm",
        "jinja2>=3.1",
        "pybind11",
    ],
    extras_require={
        # torch is pinned to the CPU wheel the test machines carry (other specs pull CUDA wheels);
        # matplotlib because the benchmark scripts' smoke tests write their plots; cuobjdump to read
        # (with nvdisasm) the kernels' SASS in the build test.
        "test": ["pytest", "pytest-timeout", "torch==2.13.0", "transformers", "accelerate", "matplotlib",
                 "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"],
        "bench": ["matplotlib"],
    },
)
