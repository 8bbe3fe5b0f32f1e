#!/usr/bin/env python
"""Decode step against the HBM roofline, XLA attention and the transformers peer, one run.

    python scripts/bench_decode.py                       # Llama-3.1-8B shape, TP = all local GPUs
    python scripts/bench_decode.py --rows 1:2048,8:8192  # a subset of (batch, capacity) pairs
    python scripts/bench_decode.py --tiny                # tiny-llama on CPU, seconds

Rows: batch (--batches 1,8,32) x capacity (--capacities 2048,8192,32768) x valid (--valid 512 and
capacity - --headroom 256). Random bf16 weights of the model's shape (TPModel.random), the paged
cache of ``init_cache(batch, capacity)``. Per row:

  step_ms      TPModel.decode in a dispatch-ahead loop: --steps calls back to back, one
               block_until_ready at the end, divided; median of --reps such loops (after
               --warmup calls). The cache holds `valid` positions per sequence when the loop
               starts (it grows by one per call; the roofline uses the mean).
               --fill random (default): the pools are filled with random values and the lengths
               set to `valid` -- the same bytes for the kernel as after a prefill, without a
               prefill compile per row; --fill prefill: the model's prefill of a random prompt
               of `valid` tokens (a compile per row and valid).
  roofline_ms  (weight bytes + valid KV bytes read) / copy bandwidth, per device. Weights: every
               parameter but the embedding table (a decode step gathers B of its rows; counted in
               when the LM head is tied to it). KV: 2 (K, V) x layers x local KV heads x positions
               read x head_dim x itemsize x batch, positions = the mean over the timed steps.
               Copy bandwidth: the best of bench.harness.copy_bandwidth over --bw-mib MiB (a
               device copy and x * 1.0001 in f32 and bf16) and, when the peer runs, torch's
               y.copy_(x) timed with CUDA events; read + written bytes / median time.
  ratio_to_roofline   step_ms / roofline_ms (targets: <= 1.15 at batch 1, <= 1.25 at 8 and 32).
  generator_ms per-token time of Generator.generate (prompts of `valid` random tokens, ignore_eos):
               (time of max_new_tokens=--generator-new minus time of max_new_tokens=1) /
               (new - 1), medians of --generator-reps; on rows of --generator-capacity and
               --generator-valid (Generator picks its own cache bucket). Target <= 1.05 x step_ms.
  xla_step_ms  the same decode step with attention through kernels.paged_attention_reference
               (XLA gathers every page of the block table: attention over the whole capacity),
               on a second TPModel over the same weights (its own jit cache) traced with
               engine.attention.use_kernels off (XLA reference); capacities <= --xla-max-capacity.
  peer_ms      transformers + torch on the same GPU, in a subprocess run before jax touches the GPU
               (so both get the whole memory): LlamaForCausalLM(config) in bf16,
               generate(cache_implementation="static", attention_mask, pad_token_id=0,
               do_sample=False, min_new_tokens=max_new_tokens) on `valid` random tokens; (time of a
               --generator-new + 1 token generate - time of a 1-token generate) / --generator-new,
               medians of 3. Batches --peer-batches at capacity 2048 / valid 512 only. The peer's
               static cache holds prompt + new tokens (it does not read the capacity either).
  speedup_vs_peer     peer_ms / generator_ms (both whole generate loops; peer_ms / step_ms is
               step_speedup_vs_peer). Target >= 1.5.

A (batch, capacity) whose weights + KV (2 x L x KVH x capacity x hd x itemsize x batch, per
device) exceed the device's ``memory_stats()["bytes_limit"]`` (or --mem-limit-bytes) is listed as
skipped with the bytes it needed. One compile per (batch, capacity) for the kernel and one for
XLA (the valid length is data, not shape); ``compiles_in_timing`` counts XLA compiles that fell
inside a timed loop (0 expected). Writes <out>/decode_<device>.{json,md,png}.
"""
import os

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

# meta-llama/Llama-3.1-8B config.json (no preset of that name in models/config.py yet)
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                   max_position_embeddings=131072, model_type="llama")
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)

TARGETS = {"ratio_to_roofline": {1: 1.15, "other": 1.25}, "generator_over_step": 1.05,
           "speedup_vs_peer": 1.5}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="preset name (models/config.py) or llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all local devices)")
    ap.add_argument("--impl", default=None, help="fused op impl (default xla at TP1, the harness default above)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--capacities", default="2048,8192,32768")
    ap.add_argument("--valid", type=int, default=512, help="short valid length")
    ap.add_argument("--headroom", type=int, default=256, help="long valid = capacity - headroom")
    ap.add_argument("--rows", default=None,
                    help="subset: comma list of batch:capacity[:valid] (valid a number, short or long)")
    ap.add_argument("--steps", type=int, default=20, help="decode calls per timed loop")
    ap.add_argument("--reps", type=int, default=3, help="timed loops per row (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fill", choices=("random", "prefill"), default="random")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per KV page (TPModel.init_cache's default)")
    ap.add_argument("--xla-max-capacity", type=int, default=8192)
    ap.add_argument("--no-xla", action="store_true")
    ap.add_argument("--generator-capacity", type=int, default=2048)
    ap.add_argument("--generator-valid", default=None, help="comma list (default: --valid)")
    ap.add_argument("--generator-batches", default=None, help="comma list (default: all batches)")
    ap.add_argument("--generator-new", type=int, default=64)
    ap.add_argument("--generator-reps", type=int, default=3)
    ap.add_argument("--no-generator", action="store_true")
    ap.add_argument("--peer-batches", default="1,8")
    ap.add_argument("--peer-capacity", type=int, default=2048, help="rows the peer is reported on")
    ap.add_argument("--peer-device", default="cuda", help="torch device of the peer (cpu: smoke test)")
    ap.add_argument("--peer-timeout", type=int, default=420)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mem-limit-bytes", type=int, default=None,
                    help="per-device limit for the skip rule (default: memory_stats bytes_limit)")
    ap.add_argument("--bw-mib", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny-llama, capacities 64/128, batches 1/2 (CPU)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.tiny:
        from jax_tokenweave.bench.harness import smaller_defaults
        a.model = "tiny-llama"
        smaller_defaults(ap, a, batches="1,2", capacities="64,128", valid=16, headroom=32, steps=4,
                         reps=2, warmup=1, generator_capacity=64, generator_new=8, generator_reps=1,
                         generator_batches="1", peer_batches="1,2", peer_capacity=64, bw_mib=8)
    return a


# --------------------------------------------------------------------------- shared helpers

def model_config(name: str):
    """A preset, or the built-in Llama-3.1-8B shape."""
    from jax_tokenweave.models.config import ModelConfig, RopeScaling, get_preset
    try:
        return get_preset(name)
    except ValueError:
        if name.lower().replace("_", "-") in ("llama-3.1-8b", "llama3.1-8b"):
            return ModelConfig(rope_scaling=RopeScaling(**LLAMA3_ROPE), **LLAMA_31_8B)
        raise


def device_slug(kind: str, backend: str) -> str:
    """'NVIDIA H200' -> 'h200'; CPU -> 'cpu'."""
    if backend == "cpu":
        return "cpu"
    s = re.sub(r"^nvidia\s+", "", kind.strip().lower())
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_") or "device"


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring) while entered."""

    def __init__(self):
        self.n, self.secs = 0, 0.0

    def __call__(self, event, duration, **kw):
        if event == COMPILE_EVENT:
            self.n += 1
            self.secs += duration

    def __enter__(self):
        import jax
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        import jax
        unreg = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unreg is not None:
            try:
                unreg(self)
            except Exception:  # noqa: BLE001 - an already removed listener
                pass


def fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def run_peer_subprocess(script: str, args: list[str], timeout: int, device: str = "cuda") -> dict:
    """Run `script --peer-only --peer-json F args` in a fresh interpreter (jax kept off the GPU
    there) and return the JSON it wrote; a dict with `skipped` when it could not run (torch or
    transformers missing, no CUDA device for a cuda peer: checked here without importing torch)."""
    import glob
    import importlib.util
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return dict(skipped=f"{mod} is not importable here")
    if device.startswith("cuda") and not glob.glob("/dev/nvidia[0-9]*"):
        return dict(skipped="no CUDA device (/dev/nvidia*) for the peer")
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "peer.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_PYTHON_CLIENT_PREALLOCATE="false")
        cmd = [sys.executable, script, "--peer-only", "--peer-json", path] + list(args)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = dict(skipped=f"peer subprocess ran past {timeout} s")
            if os.path.exists(path):   # partial results written so far
                out.update(json.load(open(path)), partial=True)
            tail = (e.stdout or b"")[-2000:]
            out["log_tail"] = tail.decode() if isinstance(tail, bytes) else tail
            return out
        wall = time.perf_counter() - t0
        for line in (p.stdout or "").splitlines()[-40:]:
            print(f"  [peer] {line}", flush=True)
        if os.path.exists(path):
            out = json.load(open(path))
        else:
            out = dict(skipped=f"peer subprocess exited {p.returncode} without results")
        if p.returncode != 0:
            out.setdefault("skipped", f"peer subprocess exited {p.returncode}")
            out["stderr_tail"] = (p.stderr or "")[-3000:]
        out["subprocess_wall_s"] = wall
        return out


def hf_model(cfg, device: str):
    """(transformers LlamaForCausalLM with random weights on `device`, bf16 on GPU / fp32 on CPU, torch)."""
    import torch
    import transformers
    from jax_tokenweave.models.config import to_hf_dict
    hc = transformers.LlamaConfig(**to_hf_dict(cfg))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hc)
    finally:
        torch.set_default_dtype(prev)
    return model.eval(), torch


def torch_sync(torch, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peer_env_check(device: str) -> str | None:
    """Why the peer cannot run on `device`, or None."""
    try:
        import torch
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torch/transformers not importable: {type(e).__name__}: {e}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "torch.cuda is not available (no GPU for the peer)"
    return None


def peer_versions() -> dict:
    import torch
    import transformers
    d = dict(torch=torch.__version__, transformers=transformers.__version__)
    try:
        d["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    return d


def torch_copy_bandwidth(torch, mib: int, reps: int = 10) -> dict:
    """torch's device-to-device copy (``y.copy_(x)``, f32), CUDA events, median of `reps`:
    a second opinion on the copy ceiling from the peer's runtime (read + written bytes)."""
    n = mib * (1 << 20) // 4
    x = torch.full((n,), 1.5, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return dict(bytes_per_s=2 * 4 * n / statistics.median(ts), mib=mib,
                method=f"torch y.copy_(x) f32 {mib} MiB, CUDA events, median of {reps}")


def peer_decode_main(a) -> dict:
    """The subprocess side: per-token time of transformers' static-cache generate."""
    res = dict(method="transformers generate, cache_implementation=static, greedy, "
                      "min_new_tokens=max_new_tokens; (t(new+1) - t(1)) / new, medians of 3")

    def save():
        with open(a.peer_json, "w") as f:
            json.dump(res, f, indent=1)

    why = peer_env_check(a.peer_device)
    if why:
        res["skipped"] = why
        save()
        return res
    res.update(peer_versions())
    cfg = model_config(a.model)
    model, torch = hf_model(cfg, a.peer_device)
    if a.peer_device.startswith("cuda"):
        res["copy"] = torch_copy_bandwidth(torch, a.bw_mib)
        save()
    res["rows"] = {}
    new = a.generator_new
    for B in [int(b) for b in a.peer_batches.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(B)
        ids = torch.randint(1, cfg.vocab_size, (B, a.valid), generator=g).to(a.peer_device)
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, cache_implementation="static", pad_token_id=0)

        def timed(n):
            torch_sync(torch, a.peer_device)
            t = time.perf_counter()
            out = gen(n)
            torch_sync(torch, a.peer_device)
            assert out.shape[1] == a.valid + n, out.shape
            return time.perf_counter() - t

        try:
            t0 = time.perf_counter()
            timed(new + 1)          # compiles the decode step (torch.compile on CUDA)
            timed(new + 1)
            warm = time.perf_counter() - t0
            t1 = [timed(1) for _ in range(3)]
            tn = [timed(new + 1) for _ in range(3)]
            m1, mn = statistics.median(t1), statistics.median(tn)
            res["rows"][str(B)] = dict(batch=B, valid=a.valid, new=new, peer_ms=1e3 * (mn - m1) / new,
                                       ttft_ms=1e3 * m1, total_ms=1e3 * mn, warmup_s=warm)
            print(f"peer B={B}: {res['rows'][str(B)]['peer_ms']:.2f} ms/token", flush=True)
        except Exception as e:  # noqa: BLE001 - keep the other batches
            res["rows"][str(B)] = dict(batch=B, error=f"{type(e).__name__}: {str(e)[:400]}")
            print(f"peer B={B}: FAILED {e}", flush=True)
        save()
    del model
    if a.peer_device.startswith("cuda"):
        torch.cuda.empty_cache()
    save()
    return res


# --------------------------------------------------------------------------- jax side

def weight_bytes_per_device(cfg, mesh, itemsize: int, axis: str = "tp") -> int:
    """Bytes of the parameters a decode step reads on one device: all but the embedding table
    (B rows gathered), which counts when the LM head is tied to it."""
    from jax_tokenweave.models.llama import stacked_param_info
    from jax_tokenweave.parallel.sharding import param_shardings
    tp = mesh.shape[axis]
    specs = {k: s.spec for k, s in param_shardings(cfg, mesh, axis, stacked=True).items()}
    total = 0
    for path, (shape, _, _) in stacked_param_info(cfg).items():
        if path == "embed_tokens.embedding" and not cfg.tie_word_embeddings:
            continue
        n = 1
        for d in shape:
            n *= d
        if any(e is not None for e in tuple(specs[path])):
            n //= tp
        total += n * itemsize
    return total


def kv_bytes_per_device(cfg, tp: int, batch: int, positions: float, itemsize: int) -> float:
    from jax_tokenweave.parallel.sharding import cache_kv_heads
    kvh_local = cache_kv_heads(cfg, tp) // tp
    return 2 * cfg.num_layers * kvh_local * positions * cfg.head_dim * itemsize * batch


def estimate_row_bytes(cfg, mesh, batch: int, capacity: int, itemsize: int) -> int:
    """The skip rule's estimate per device: weights + 2 L KVH capacity hd itemsize batch."""
    w = weight_bytes_per_device(cfg, mesh, itemsize)
    from jax_tokenweave.parallel.sharding import cache_kv_heads
    w_embed = 0
    if not cfg.tie_word_embeddings:   # the embedding is resident even if a step reads B rows of it
        tp = mesh.shape["tp"]
        w_embed = cfg.vocab_size * cfg.hidden_size * itemsize // tp
    kvh_local = cache_kv_heads(cfg, mesh.shape["tp"]) // mesh.shape["tp"]
    return int(w + w_embed + 2 * cfg.num_layers * kvh_local * capacity * cfg.head_dim * itemsize * batch)


def fill_pages_random(pages, seed: int):
    """Random normal values in both pools (donated; shapes and shardings kept)."""
    import jax
    from jax_tokenweave.engine.kv_cache import KVPages
    from jax_tokenweave.model_io.random_weights import hashed_normal

    def fill(p):
        return KVPages(hashed_normal(p.k.shape, seed * 2 + 1, layered=True).astype(p.k.dtype),
                       hashed_normal(p.v.shape, seed * 2 + 2, layered=True).astype(p.v.dtype))
    shard = jax.tree.map(lambda x: x.sharding, pages)
    return jax.jit(fill, donate_argnums=0, out_shardings=shard)(pages)


def replicated(mesh, arr):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.device_put(arr, NamedSharding(mesh, P()))


def time_decode(model, cache, tok, *, warmup: int, steps: int, reps: int, counter: CompileCounter):
    """(dict with step_ms etc., cache). Dispatch-ahead loops of model.decode."""
    import jax
    import numpy as np
    from jax_tokenweave.bench import harness as bench
    logits = None
    t0 = time.perf_counter()
    c0 = counter.n
    for _ in range(max(1, warmup)):
        logits, cache = model.decode(tok, cache, check_capacity=False)
    jax.block_until_ready(logits)
    warm_s, warm_compiles = time.perf_counter() - t0, counter.n - c0
    c1 = counter.n
    ts, logits, cache = bench.decode_loop_times(lambda t, c: model.decode(t, c, check_capacity=False),
                                                cache, tok, steps=steps, reps=reps)
    lg = np.asarray(jax.device_get(logits))
    return dict(step_ms=1e3 * statistics.median(ts), step_ms_reps=[1e3 * t for t in ts],
                warmup_s=warm_s, warmup_compiles=warm_compiles, compiles_in_timing=counter.n - c1,
                logits_finite=bool(np.isfinite(lg).all())), cache


def profile_steps(model, cache, tok, steps: int = 5):
    """(kernel breakdown of `steps` decode steps from a profiler trace, cache): GPU busy and
    idle time per step, time per kernel kind, the top kernels."""
    import jax
    from jax_tokenweave.bench import harness as bench
    with tempfile.TemporaryDirectory() as tdir:
        with jax.profiler.trace(tdir):
            for _ in range(steps):
                logits, cache = model.decode(tok, cache, check_capacity=False)
            jax.block_until_ready(logits)
        try:
            b = bench.kernel_breakdown(tdir, steps)
        except Exception as e:  # noqa: BLE001 - a profile is a note, not a result
            return dict(error=f"{type(e).__name__}: {str(e)[:200]}"), cache
    b.pop("one_step", None)
    if "top_kernels" in b:
        b["top_kernels"] = b["top_kernels"][:10]
    return b, cache


class patched_decode_attention:
    """While entered, engine.attention's decode builds attention with the XLA reference (and
    writes the new K/V with a scatter): the attention before the Pallas kernel (the step's other
    kernels stay)."""

    def __enter__(self):
        from jax_tokenweave.engine import attention
        self._saved = attention.use_kernels
        attention.use_kernels = lambda: False
        return self

    def __exit__(self, *exc):
        from jax_tokenweave.engine import attention
        attention.use_kernels = self._saved


def select_rows(a):
    batches = [int(b) for b in a.batches.split(",")]
    caps = [int(c) for c in a.capacities.split(",")]
    rows = [(B, C, v) for B in batches for C in caps for v in (a.valid, C - a.headroom)]
    if a.rows:
        keep = []
        for item in a.rows.split(","):
            parts = item.strip().split(":")
            B, C = int(parts[0]), int(parts[1])
            v = None
            if len(parts) > 2:
                v = {"short": a.valid, "long": C - a.headroom}.get(parts[2])
                v = int(parts[2]) if v is None else v
            keep.append((B, C, v))
        rows = [(B, C, v) for B, C, v in
                sorted({(B, C, v if v is not None else vv) for B, C, v in keep
                        for vv in ((a.valid, C - a.headroom) if v is None else (v,))})]
    bad = [(B, C, v) for B, C, v in rows if not 1 <= v or v + a.warmup + a.reps * a.steps > C]
    if bad:
        raise SystemExit(f"rows {bad}: valid must be >= 1 and leave room for warmup + reps x steps "
                         f"({a.warmup + a.reps * a.steps}) decode positions in the capacity")
    return rows


def generator_time(gen, prompts, new: int, reps: int, counter: CompileCounter) -> dict:
    lens = [len(p) for p in prompts]
    t = time.perf_counter()
    gen.warmup(lens, 1)
    gen.warmup(lens, new)
    gen.generate(prompts, max_new_tokens=new, ignore_eos=True)
    warm = time.perf_counter() - t
    c0 = counter.n
    t1, tn = [], []
    for _ in range(reps):
        t = time.perf_counter()
        r1 = gen.generate(prompts, max_new_tokens=1, ignore_eos=True)
        t1.append(time.perf_counter() - t)
        t = time.perf_counter()
        rn = gen.generate(prompts, max_new_tokens=new, ignore_eos=True)
        tn.append(time.perf_counter() - t)
    assert all(len(r.tokens) == 1 for r in r1) and all(len(r.tokens) == new for r in rn)
    m1, mn = statistics.median(t1), statistics.median(tn)
    return dict(generator_ms=1e3 * (mn - m1) / (new - 1), generator_ttft_ms=1e3 * m1,
                generator_total_ms=1e3 * mn, generator_cache_len=rn[0].cache_len,
                generator_warmup_s=warm, generator_compiles_in_timing=counter.n - c0)


def main(argv=None):
    a = parse(argv)
    if a.peer_only:
        return peer_decode_main(a)
    os.makedirs(a.out, exist_ok=True)
    rows_wanted = select_rows(a)
    gen_valids = [int(v) for v in (a.generator_valid or str(a.valid)).split(",")]
    gen_batches = [int(b) for b in (a.generator_batches or a.batches).split(",")]

    # 1. the peer first, in its own process, before this one's jax takes the GPU memory
    peer_batches = [int(b) for b in a.peer_batches.split(",")]
    peer_batches = [B for B in peer_batches if (B, a.peer_capacity, a.valid) in rows_wanted]
    if a.no_peer:
        peer = dict(skipped="--no-peer")
    elif not peer_batches:
        peer = dict(skipped="no selected row is a peer row")
    else:
        print(f"# peer: transformers in a subprocess, batches {peer_batches}", flush=True)
        peer = run_peer_subprocess(os.path.abspath(__file__),
                                   ["--model", a.model, "--peer-batches", ",".join(map(str, peer_batches)),
                                    "--valid", str(a.valid), "--bw-mib", str(a.bw_mib), "--generator-new", str(a.generator_new),
                                    "--peer-device", a.peer_device], a.peer_timeout, a.peer_device)
        if "skipped" in peer:
            print(f"# peer skipped: {peer['skipped']}", flush=True)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave.engine.generate import Generator
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.parallel.mesh import make_mesh

    counter = CompileCounter().__enter__()
    try:
        cfg = model_config(a.model)
        mesh = make_mesh(a.tp)
        tp = mesh.shape["tp"]
        on_gpu = jax.default_backend() == "gpu"
        dtype = jnp.bfloat16 if on_gpu or not a.tiny else jnp.float32
        itemsize = jnp.dtype(dtype).itemsize
        impl = a.impl or ("xla" if tp == 1 else bench.default_impl())
        impl = bench.check_impl(impl)
        from jax_tokenweave.engine.generate import bucket_batch, bucket_len
        max_prefill = max([bucket_batch(max(gen_batches)) * bucket_len(max(gen_valids))] +
                          ([B * v for B, _, v in rows_wanted] if a.fill == "prefill" else []))
        comm = bench.make_comm(mesh, impl, max_prefill, cfg.hidden_size)
        info = bench.run_info(argv if argv is not None else sys.argv)
        slug = device_slug(info["device"], info["backend"])
        info.update(model=a.model, tp=tp, impl=impl, dtype=str(jnp.dtype(dtype)), fill=a.fill,
                    steps=a.steps, reps=a.reps, warmup=a.warmup, page_size=a.page_size,
                    generator_new=a.generator_new, layers=cfg.num_layers)
        print(f"# {info['device']} x{tp}, jax {info['jax']}, {a.model} ({cfg.num_layers} layers), "
              f"{info['dtype']}, fill={a.fill}", flush=True)

        bw = bench.copy_bandwidth(a.bw_mib)
        tc = peer.get("copy", {}).get("bytes_per_s")
        if tc:   # the roofline takes the fastest copy either runtime achieved on this GPU
            bw["methods_bytes_per_s"]["torch_copy_f32"] = tc
            if tc > bw["bytes_per_s"]:
                bw.update(bytes_per_s=tc, best_method="torch_copy_f32")
            bw["method"] += " and torch's y.copy_(x) (peer subprocess, CUDA events)"
        print(f"# copy bandwidth {bw['bytes_per_s'] / 1e12:.3f} TB/s", flush=True)
        t = time.perf_counter()
        model = TPModel.random(cfg, mesh, dtype=dtype, seed=a.seed, impl=impl, comm=comm)
        jax.block_until_ready(model.params)
        info["model_init_s"] = time.perf_counter() - t
        wbytes = weight_bytes_per_device(cfg, mesh, itemsize)
        xla_model = None if a.no_xla else TPModel(cfg, model.params, mesh, impl=impl, comm=comm)

        dev0 = mesh.devices.flat[0]
        stats = dev0.memory_stats() if hasattr(dev0, "memory_stats") else None
        limit = a.mem_limit_bytes or (stats or {}).get("bytes_limit")
        rng = np.random.default_rng(a.seed)
        rows = []
        partial = os.path.join(a.out, f"decode_{slug}.partial.json")
        pairs = sorted({(B, C) for B, C, _ in rows_wanted})
        for B, C in pairs:
            valids = [v for b, c, v in rows_wanted if (b, c) == (B, C)]
            need = estimate_row_bytes(cfg, mesh, B, C, itemsize)
            if limit is not None and need > limit:
                for v in valids:
                    rows.append(dict(batch=B, capacity=C, valid=v, skipped="weights + KV cache exceed the "
                                     "device memory limit", bytes_needed=need, bytes_limit=int(limit)))
                print(f"B={B:3d} cap={C:6d}: skipped, needs {fmt_bytes(need)} of {fmt_bytes(limit)}",
                      flush=True)
                continue
            try:
                rows.extend(run_pair(a, model, xla_model, cfg, mesh, B, C, valids, wbytes, bw, itemsize,
                                     counter, rng, need))
            except Exception as e:  # noqa: BLE001 - keep the other rows
                msg = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"B={B} cap={C}: FAILED {msg}", flush=True)
                rows.extend(dict(batch=B, capacity=C, valid=v, error=msg, bytes_needed=need) for v in valids)
            bench.write_json(partial, dict(info=info, copy_bandwidth=bw, peer=peer, rows=rows))  # a kill keeps these

        # Generator per token, on the rows of --generator-capacity
        if not a.no_generator:
            gen = Generator(model)
            for r in rows:
                if (r["capacity"] != a.generator_capacity or r["valid"] not in gen_valids
                        or r["batch"] not in gen_batches or "step_ms" not in r):
                    continue
                B, v = r["batch"], r["valid"]
                try:
                    prompts = rng.integers(1, cfg.vocab_size, (B, v)).tolist()
                    g = generator_time(gen, prompts, a.generator_new, a.generator_reps, counter)
                    r.update(g, generator_over_step=g["generator_ms"] / r["step_ms"])
                    print(f"B={B:3d} cap={r['capacity']:6d} valid={v:6d} generator {g['generator_ms']:8.3f} ms "
                          f"({r['generator_over_step']:.3f}x step)", flush=True)
                except Exception as e:  # noqa: BLE001
                    r["generator_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    print(f"B={B} generator FAILED {r['generator_error']}", flush=True)
            del gen

        for r in rows:   # every measured row names every column (None where not measured)
            if "step_ms" in r:
                for k in ("generator_ms", "xla_step_ms"):
                    r.setdefault(k, None)
            pr = (peer.get("rows") or {}).get(str(r["batch"]))
            if (pr and "peer_ms" in pr and r["capacity"] == a.peer_capacity and r["valid"] == a.valid
                    and "step_ms" in r):
                r["peer_ms"] = pr["peer_ms"]
                base = r.get("generator_ms") or r["step_ms"]
                r["speedup_vs_peer"] = pr["peer_ms"] / base
                r["speedup_basis"] = "generator_ms" if r.get("generator_ms") else "step_ms"
                r["step_speedup_vs_peer"] = pr["peer_ms"] / r["step_ms"]
    finally:
        counter.__exit__()

    out = dict(info=info, copy_bandwidth=bw, weight_bytes_per_device=wbytes, bytes_limit=limit,
               targets=TARGETS, peer=peer, rows=rows, compile_s_total=counter.secs, compiles_total=counter.n)
    base = os.path.join(a.out, f"decode_{slug}")
    bench.write_json(base + ".json", out)
    if os.path.exists(base + ".partial.json"):
        os.remove(base + ".partial.json")
    write_md(base + ".md", out)
    measured = [r for r in rows if "step_ms" in r]
    if measured:
        nan = float("nan")
        bench.plot_lines(base + ".png", list(range(len(measured))),
                         {k: [r.get(k) if r.get(k) is not None else nan for r in measured]
                          for k in ("step_ms", "roofline_ms", "generator_ms", "xla_step_ms", "peer_ms")},
                         xlabel="row # (decode_*.md)", ylabel="ms per decode step",
                         title=f"{a.model} decode, TP{tp}, {info['device']}", logx=False)
    print(open(base + ".md").read())
    return out


def run_pair(a, model, xla_model, cfg, mesh, B, C, valids, wbytes, bw, itemsize, counter, rng, need):
    """The rows of one (batch, capacity): one cache, the kernel then XLA, each valid length."""
    import numpy as np
    tok = replicated(mesh, rng.integers(0, cfg.vocab_size, (B,)).astype(np.int32))
    cache = model.init_cache(B, C, page_size=a.page_size)
    if a.fill == "random":
        cache = cache.replace(pages=fill_pages_random(cache.pages, a.seed + B * 7919 + C))
    rows = []
    for v in valids:
        def reset(cache):
            if a.fill == "prefill":
                prompt = rng.integers(0, cfg.vocab_size, (B, v)).astype(np.int32)
                _, cache = model.prefill(prompt, np.full((B,), v, np.int32), cache)
                return cache
            return cache.replace(lengths=replicated(mesh, np.full((B,), v, np.int32)))
        cache = reset(cache)
        r, cache = time_decode(model, cache, tok, warmup=a.warmup, steps=a.steps, reps=a.reps, counter=counter)
        prof = None
        if C == a.peer_capacity and v == a.valid:   # where the time goes, on the rows the peer runs
            prof, cache = profile_steps(model, cache, tok)
        start = v + max(1, a.warmup)
        mean_pos = start + (a.reps * a.steps - 1) / 2 + 1   # positions read: length + 1 per step
        kv = kv_bytes_per_device(cfg, mesh.shape["tp"], B, mean_pos, itemsize)
        roof = 1e3 * (wbytes + kv) / bw["bytes_per_s"]
        row = dict(batch=B, capacity=C, valid=v, mean_context=mean_pos, step_ms=r["step_ms"],
                   roofline_ms=roof, ratio_to_roofline=r["step_ms"] / roof,
                   target_ratio=TARGETS["ratio_to_roofline"][1 if B == 1 else "other"],
                   kv_bytes_read=kv, weight_bytes=wbytes, bytes_needed=need,
                   step_ms_reps=r["step_ms_reps"], compiles_in_timing=r["compiles_in_timing"],
                   decode_warmup_s=r["warmup_s"], logits_finite=r["logits_finite"])
        if prof is not None:
            row["profile"] = prof
        if xla_model is not None and C <= a.xla_max_capacity:
            cache = reset(cache)
            with patched_decode_attention():
                rx, cache = time_decode(xla_model, cache, tok, warmup=a.warmup, steps=a.steps, reps=a.reps,
                                        counter=counter)
            row.update(xla_step_ms=rx["step_ms"], xla_ratio_to_roofline=rx["step_ms"] / roof,
                       xla_compiles_in_timing=rx["compiles_in_timing"], xla_warmup_s=rx["warmup_s"])
        rows.append(row)
        x = f"  xla {row['xla_step_ms']:8.3f}" if "xla_step_ms" in row else ""
        print(f"B={B:3d} cap={C:6d} valid={v:6d} step {row['step_ms']:8.3f} ms  roofline "
              f"{roof:8.3f} ms  ratio {row['ratio_to_roofline']:.3f}{x}", flush=True)
    del cache
    return rows


def write_md(path, out):
    info, bw = out["info"], out["copy_bandwidth"]
    f = lambda x, d=3: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    ok = lambda x, t, le=True: "" if x is None else (" ✓" if (x <= t if le else x >= t) else " ✗")  # noqa: E731
    peer = out["peer"]
    peer_line = (f"peer: skipped ({peer['skipped']})" if "skipped" in peer and not peer.get("rows") else
                 f"peer: transformers {peer.get('transformers')} + torch {peer.get('torch')} on "
                 f"{peer.get('device')}, static cache generate")
    lines = [f"# Decode step: {info['model']}, TP{info['tp']}, {info['device']}", "",
             f"{info['date']} · jax {info['jax']} · {info['dtype']} · impl={info['impl']} · fill={info['fill']} · "
             f"{info['steps']} steps x {info['reps']} reps · `{info['command']}`", "",
             f"copy bandwidth {bw['bytes_per_s'] / 1e12:.3f} TB/s ({bw['method']}); weights read per step "
             f"{out['weight_bytes_per_device'] / 1e6:.1f} MB per device; {peer_line}", "",
             "Targets: ratio_to_roofline ≤ 1.15 at batch 1, ≤ 1.25 at 8 / 32; generator ≤ 1.05 × step; "
             "speedup_vs_peer ≥ 1.5 (peer per token / generator per token).", "",
             "| # | batch | capacity | valid | step ms | roofline ms | ratio (target) | generator ms | gen/step (≤1.05) "
             "| xla step ms | peer ms | speedup vs peer (≥1.5) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    i = 0
    for r in out["rows"]:
        if "step_ms" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| — | {r['batch']} | {r['capacity']} | {r['valid']} | skipped: {why}; needs "
                         f"{fmt_bytes(r.get('bytes_needed', 0))} of {fmt_bytes(r.get('bytes_limit') or 0)} "
                         f"| | | | | | | |")
            continue
        lines.append(
            f"| {i} | {r['batch']} | {r['capacity']} | {r['valid']} | {f(r['step_ms'])} | {f(r['roofline_ms'])} | "
            f"{f(r['ratio_to_roofline'])} (≤{r['target_ratio']}){ok(r['ratio_to_roofline'], r['target_ratio'])} | "
            f"{f(r.get('generator_ms'))} | {f(r.get('generator_over_step'))}"
            f"{ok(r.get('generator_over_step'), TARGETS['generator_over_step'])} | {f(r.get('xla_step_ms'))} | "
            f"{f(r.get('peer_ms'))} | {f(r.get('speedup_vs_peer'), 2)}"
            f"{ok(r.get('speedup_vs_peer'), TARGETS['speedup_vs_peer'], le=False)} |")
        i += 1
    leaks = sum(r.get("compiles_in_timing", 0) + r.get("xla_compiles_in_timing", 0) +
                r.get("generator_compiles_in_timing", 0) for r in out["rows"])
    lines += ["", f"XLA compiles inside timed loops: {leaks} (0 expected); all compiles: "
              f"{out['compiles_total']} ({out['compile_s_total']:.0f} s)."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
