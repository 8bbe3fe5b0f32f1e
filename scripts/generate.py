#!/usr/bin/env python
"""Generate text with a tensor-parallel model.

    python scripts/generate.py --prompt "Write a haiku about the sea."

With no --checkpoint it uses the embedded default model (SmolLM2-135M-Instruct, converted from its
GGUF file on first use). Streams the text of the first prompt as it is generated, then prints a
summary with the time to first token and tokens per second.

Multi-process (one GPU per process, or several CPU processes with gloo collectives):

    python scripts/generate.py --prompt "..." --coordinator 127.0.0.1:12345 \
        --num-processes 2 --process-id 0          # and --process-id 1 in a second shell

(or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Only process 0 prints.

Many requests through the continuous-batching engine (engine/llm.py), one JSON object per line in
and out:

    python scripts/generate.py --requests reqs.jsonl --output results.jsonl

Each request line: {"id": "a", "prompt": "..."} or {"prompt_ids": [1, 2, 3]}, optionally
"max_new_tokens", "temperature", "top_k", "top_p", "seed", "chat" (else the command-line values).
Each result line: id, text, tokens, finish_reason ("stop" | "length" | "error"), error,
prompt_tokens, ttft_s, tpot_s, latency_s, preemptions. A progress bar runs meanwhile; a summary
(requests/s, output tokens/s, TTFT and time per output token, median and p99) ends it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# runnable from a checkout without installing
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import jax_tokenweave  # noqa: E402

try:
    import jax_tokenweave.models  # noqa: F401
except ImportError:  # not pip-installed: find models/ as jax_tokenweave.models, as setup.py maps it
    jax_tokenweave.__path__.append(_ROOT)

from jax_tokenweave.parallel import distributed as dist  # noqa: E402  (imports jax, initialises no backend)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat for a batch (default: a short greeting)")
    p.add_argument("--prompt-ids", action="append", default=None,
                   help="a prompt as comma-separated token ids (repeatable); skips the tokenizer")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap prompts in the chat template (default: on for instruct models)")
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--ignore-eos", action="store_true", help="don't stop at EOS / end-of-turn")
    p.add_argument("--max-cache-len", type=int, default=None,
                   help="most KV-cache positions (default: the model's max_position_embeddings)")
    p.add_argument("--checkpoint", default=None,
                   help="Orbax checkpoint directory from scripts/convert_hf.py (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--random-model", default=None, metavar="PRESET",
                   help="random weights (seed 0) with a config preset (e.g. 'tiny-llama'); token-id prompts only")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype (default: the checkpoint's; random models: bfloat16 on GPU, else float32)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: as many devices as the head counts allow)")
    p.add_argument("--impl", default=None, choices=["auto", "xla", "p2p", "multimem"],
                   help="fused all-reduce+RMSNorm implementation (default: auto on GPU, xla on CPU)")
    p.add_argument("--split", default="auto", choices=["auto", "off"],
                   help="TokenWeave's split of large batches (prefill, mixed engine steps) into two overlapped "
                        "halves: auto = the model's measured settings (weave_table.json) when tp > 1")
    p.add_argument("--split-threshold", type=int, default=None,
                   help="split batches of at least this many tokens (default: the table's)")
    p.add_argument("--no-warmup", action="store_true",
                   help="don't compile before timing (the summary then includes compile time)")
    p.add_argument("--requests", default=None, metavar="JSONL",
                   help="a file of requests, one JSON object per line: run them through the continuous-"
                        "batching engine (see the module doc)")
    p.add_argument("--output", default=None, metavar="JSONL",
                   help="with --requests: where the results go (default: <requests>.out.jsonl)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="with --requests: the token budget of one engine step")
    p.add_argument("--max-num-seqs", type=int, default=256, help="with --requests: most requests running at once")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results (tokens, text, timings) as JSON (process 0)")
    dist.add_cli_flags(p)
    return p.parse_args(argv)


def log(msg: str) -> None:
    dist.print0(msg, file=sys.stderr)


def pick_tp(cfg, requested, n_devices) -> int:
    """--tp as given, else the most devices the model's head counts allow."""
    if requested is not None:
        cfg.check_tp(requested)
        return requested
    for tp in range(n_devices, 0, -1):
        try:
            cfg.check_tp(tp)
            return tp
        except ValueError:
            continue
    return 1


def load_weights(args):
    """(cfg, params, tokenizer, mesh): the checkpoint (or random weights) placed on the mesh."""
    import jax
    import jax.numpy as jnp
    from jax_tokenweave.parallel.mesh import make_mesh
    n = len(jax.devices())
    if args.random_model:
        from jax_tokenweave.models.config import get_preset
        from jax_tokenweave.engine.runner import TPModel
        cfg = get_preset(args.random_model)
        mesh = make_mesh(pick_tp(cfg, args.tp, n))
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
            args.dtype, jnp.bfloat16 if jax.devices()[0].platform == "gpu" else jnp.float32)
        m = TPModel.random(cfg, mesh, seed=0, dtype=dtype, axis_name=mesh.axis_names[0])
        return cfg, m.params, None, mesh
    from jax_tokenweave.model_io.checkpoint import load_checkpoint, load_config
    if args.checkpoint:
        path = args.checkpoint
    else:
        from jax_tokenweave.model_io import default_model
        path = default_model.ensure_default_checkpoint(progress=dist.is_main_process())
    cfg = load_config(path)
    mesh = make_mesh(pick_tp(cfg, args.tp, n))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    cfg, params, tokenizer = load_checkpoint(path, mesh, axis_name=mesh.axis_names[0], dtype=dtype)
    return cfg, params, tokenizer, mesh


def make_comm(impl, mesh, max_tokens, hidden, itemsize):
    """(impl, Communicator or None): on GPU the fused op's CUDA path, when the extension is built."""
    import jax
    if impl == "xla":
        return "xla", None
    if mesh.devices.size == 1 and impl in ("auto", "p2p"):
        return "xla", None                          # one device: nothing to all-reduce
    if jax.devices()[0].platform != "gpu":
        # auto means xla off GPUs; an explicit CUDA impl fails in the fused op, saying why
        return ("xla" if impl == "auto" else impl), None
    from jax_tokenweave.collective import cuda_ops
    if not cuda_ops.available():
        if impl == "auto":
            log("CUDA extension not built: using impl=xla (see BUILD.md)")
            return "xla", None
        cuda_ops.extension()  # raises with the reason
    from jax_tokenweave.collective.communicator import Communicator
    tp = mesh.devices.size
    rows = -(-max_tokens // tp) * tp
    max_bytes = max(rows * hidden * itemsize, 1 << 20)
    return impl, Communicator(mesh, mesh.axis_names[0], max_bytes=max_bytes)


def split_config(args, cfg, tp):
    """The SplitConfig --split / --split-threshold ask for (None: no split; nothing to overlap at tp 1)."""
    import dataclasses
    from jax_tokenweave.weave import config_for
    if args.split == "off" or tp == 1:
        return None
    split = config_for(cfg, tp)
    if args.split_threshold is not None:
        split = dataclasses.replace(split, threshold=args.split_threshold)
    return split


def read_requests(path: str, args) -> list[dict]:
    """The request lines, with the command-line defaults filled in; a bad line names its number."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e}); write one JSON object per line")
            if not isinstance(r, dict) or ("prompt" in r) == ("prompt_ids" in r):
                raise SystemExit(f"{path}:{n}: needs exactly one of \"prompt\" (text) or \"prompt_ids\" (token ids)")
            r.setdefault("id", str(len(out)))
            for key in ("max_new_tokens", "temperature", "top_k", "top_p"):
                r.setdefault(key, getattr(args, key))
            r.setdefault("seed", args.seed + len(out))
            out.append(r)
    if not out:
        raise SystemExit(f"{path}: no requests")
    if len({r["id"] for r in out}) != len(out):
        raise SystemExit(f"{path}: request ids must be unique")
    return out


def percentile(xs, q):
    import numpy as np
    return float(np.percentile(xs, q)) if xs else float("nan")


def serve_requests(args, cfg, params, tokenizer, mesh, impl) -> int:
    """--requests: the continuous engine over a JSONL file; results to --output."""
    import jax
    from jax_tokenweave.engine.generate import encode_prompt
    from jax_tokenweave.engine.llm import LLM
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.engine.sampler import SamplingParams
    reqs = read_requests(args.requests, args)
    if any("prompt" in r for r in reqs) and tokenizer is None:
        raise SystemExit("this model has no tokenizer: give requests as \"prompt_ids\"")
    instruct = bool(getattr(tokenizer, "chat_template", None))
    prompts = []
    for r in reqs:
        if "prompt_ids" in r:
            prompts.append([int(t) for t in r["prompt_ids"]])
        else:
            chat = r.get("chat", instruct if args.chat is None else args.chat)
            prompts.append(encode_prompt(tokenizer, r["prompt"], chat=chat, system=args.system))
    itemsize = jax.numpy.dtype(params["embed_tokens.embedding"].dtype).itemsize
    impl, comm = make_comm(impl, mesh, args.max_num_batched_tokens, cfg.hidden_size, itemsize)
    model = TPModel(cfg, params, mesh, axis_name=mesh.axis_names[0], impl=impl, comm=comm,
                    split=split_config(args, cfg, mesh.devices.size))
    llm = LLM(model, tokenizer, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_cache_len)
    log(f"engine: {llm.num_pages} KV pages of {llm.page_size} tokens, budget {llm.max_num_batched_tokens} "
        f"tokens/step, tp={model.tp}, impl={impl}")
    sampling = [SamplingParams(float(r["temperature"]), int(r["top_k"]), float(r["top_p"]), int(r["seed"]))
                for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling, max_new_tokens=[int(r["max_new_tokens"]) for r in reqs],
                        ignore_eos=args.ignore_eos, request_ids=[str(r["id"]) for r in reqs],
                        progress=dist.is_main_process())
    wall = time.perf_counter() - t0
    if dist.is_main_process():
        path = args.output or os.path.splitext(args.requests)[0] + ".out.jsonl"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for o in outs:
                f.write(json.dumps(dict(id=o.request_id, text=o.text, tokens=o.tokens, finish_reason=o.finish_reason,
                                        error=o.error, prompt_tokens=len(o.prompt_tokens), ttft_s=o.ttft_s,
                                        tpot_s=o.tpot_s, preemptions=o.num_preemptions,
                                        latency_s=None if o.finish_s is None else o.finish_s - o.arrival_s)) + "\n")
        os.replace(tmp, path)   # never a half-written results file
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": [dict(id=o.request_id, tokens=o.tokens, finish_reason=o.finish_reason)
                                       for o in outs],
                           "devices": len(jax.devices()), "processes": jax.process_count(), "impl": impl,
                           "steps": llm.stats.steps, "split_steps": llm.stats.split_steps,
                           "split_at_boundary": llm.stats.split_at_boundary,
                           "split_in_chunk": llm.stats.split_in_chunk}, f)
        ok = [o for o in outs if o.finish_reason != "error"]
        gen = sum(len(o.tokens) for o in outs)
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
        log(f"--- {len(outs)} requests ({len(outs) - len(ok)} errors) in {wall:.2f} s -> {path}\n"
            f"requests/s: {len(outs) / wall:.2f}   output tokens/s: {gen / wall:.1f}   "
            f"steps: {llm.stats.steps} ({llm.stats.split_steps} split: {llm.stats.split_at_boundary} between "
            f"sequences, {llm.stats.split_in_chunk} inside a chunk)   preemptions: {llm.stats.preemptions}\n"
            f"TTFT median {1e3 * percentile(ttft, 50):.1f} ms, p99 {1e3 * percentile(ttft, 99):.1f} ms   "
            f"TPOT median {1e3 * percentile(tpot, 50):.2f} ms, p99 {1e3 * percentile(tpot, 99):.2f} ms")
        for o in outs:
            if o.error:
                log(f"request {o.request_id}: error: {o.error}")
    dist.sync("generate-done")
    if comm is not None:
        comm.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.initialize_from_args(args)

    import jax
    from jax_tokenweave.engine.generate import Generator, bucket_batch, bucket_len, encode_prompt, summary
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.engine.sampler import SamplingParams

    on_gpu = jax.devices()[0].platform == "gpu"
    impl = args.impl or ("auto" if on_gpu else "xla")
    t0 = time.perf_counter()
    cfg, params, tokenizer, mesh = load_weights(args)
    if args.requests:
        rc = serve_requests(args, cfg, params, tokenizer, mesh, impl)
        if jax.process_count() > 1:
            jax.distributed.shutdown()
        return rc

    if args.prompt_ids:
        prompts = [[int(t) for t in s.replace(" ", "").split(",") if t] for s in args.prompt_ids]
        chat = False
    else:
        if tokenizer is None:
            raise SystemExit("this model has no tokenizer: pass --prompt-ids")
        prompts = args.prompt or ["Hello! Tell me a short fact about the ocean."]
        instruct = bool(getattr(tokenizer, "chat_template", None))
        chat = instruct if args.chat is None else args.chat
    ids = [encode_prompt(tokenizer, p, chat=chat, system=args.system) for p in prompts]

    # the largest fused all-reduce message is the prefill of the padded batch
    B, S = bucket_batch(len(ids)), bucket_len(max(len(x) for x in ids))
    itemsize = jax.numpy.dtype(params["embed_tokens.embedding"].dtype).itemsize
    impl, comm = make_comm(impl, mesh, B * S, cfg.hidden_size, itemsize)
    model = TPModel(cfg, params, mesh, axis_name=mesh.axis_names[0], impl=impl, comm=comm,
                    split=split_config(args, cfg, mesh.devices.size))
    log(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s) over {jax.process_count()} process(es); "
        f"tp={model.tp}; impl={impl}; dtype={model.dtype}")

    gen = Generator(model, tokenizer, max_cache_len=args.max_cache_len)
    sampling = [SamplingParams(args.temperature, args.top_k, args.top_p, args.seed + i)
                for i in range(len(prompts))]

    try:
        gen.plan([len(x) for x in ids], args.max_new_tokens)
    except ValueError as e:
        log(f"error: {e}")
        return 2

    compile_s = None
    if not args.no_warmup:
        log("compiling ...")
        compile_s = gen.warmup([len(x) for x in ids], args.max_new_tokens)

    main_proc = dist.is_main_process()
    stream = gen.stream(ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        ignore_eos=args.ignore_eos, detokenize=tokenizer is not None)
    if main_proc and len(ids) > 1:
        print("=== [0]", flush=True)
    for d in stream:
        if main_proc and d.index == 0:
            print(d.text, end="", flush=True)
    results = stream.results
    if main_proc:
        if tokenizer is None:
            print(" ".join(map(str, results[0].tokens)), end="")
        print(flush=True)
        for i, r in enumerate(results[1:], 1):
            print(f"=== [{i}]\n{r.text if tokenizer is not None else ' '.join(map(str, r.tokens))}")
        print("---", file=sys.stderr)
        print(summary(results, compile_s), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": [dict(prompt_tokens=r.prompt_tokens, tokens=r.tokens, text=r.text,
                                            finish_reason=r.finish_reason, ttft_s=r.ttft_s,
                                            decode_tokens_per_s=r.decode_tokens_per_s,
                                            prefill_tokens_per_s=r.prefill_tokens_per_s)
                                       for r in results],
                           "devices": len(jax.devices()), "processes": jax.process_count(),
                           "impl": impl, "compile_s": compile_s}, f)
    dist.sync("generate-done")
    if comm is not None:
        comm.close()
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
