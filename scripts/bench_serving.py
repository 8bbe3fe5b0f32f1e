#!/usr/bin/env python
"""Offline serving throughput on a synthetic workload: continuous batching against static batching
and the transformers peer, the same random model, one run.

    python scripts/bench_serving.py                        # 256 requests, Llama-3.1-8B shape
    python scripts/bench_serving.py --num-requests 128     # smaller / faster
    python scripts/bench_serving.py --tiny                 # tiny-llama on CPU, 12 requests

Workload (fixed --seed): --num-requests requests, all arriving at t=0, each with random token ids
as its prompt and its own output length; prompt and output lengths drawn from lognormals with
medians --input-median 200 / --output-median 150 and sigma --input-sigma / --output-sigma 1.0
(mean ~1.65x and p90 ~3.6x the median: the long tail of ShareGPT-like conversation statistics;
a synthetic fit, not ShareGPT itself), rounded and clipped to [--min-len 4, --max-len 2000]. The
JSON records the parameters and the drawn lengths' statistics. Every system generates exactly
each request's output length (ignore_eos, greedy); useful output tokens = the sum of those.

Systems:
  engine   engine.llm.LLM (continuous batching: chunked prefill + decode in one flat step of at
           most --max-num-batched-tokens 2048, paged KV, TokenWeave split of large mixed steps)
           on all requests. Compiles are warmed up first: --warmup full (default) runs the whole
           workload once untimed (the timed run has exactly the same step shapes), --warmup quick
           runs the first 16 requests only. compiles_in_timing counts XLA compiles inside the
           timed run (0 expected with full).
  static   engine.generate.Generator over the requests in arrival order in fixed batches of
           --static-batch 32: each batch padded to its longest prompt and run to its longest
           output (what static batching costs); each request counts only its own output length.
           Each batch's shapes are compiled before it is timed (compile excluded). Batches run in
           order until --static-max-s 45 of timed generation has passed: throughput is measured on
           those batches (a subset when the cap cut it; the JSON says which).
  peer     transformers + torch (LlamaForCausalLM(config), bf16, generate with
           cache_implementation="static", left padding + attention_mask, pad_token_id=0, greedy,
           min_new_tokens = max_new_tokens = the batch's longest output) in batches of
           --peer-batch 32 the same way, in a subprocess run before jax takes the GPU. Each
           batch's compile is warmed up (a generate of the same shapes stopped after 4 tokens)
           and excluded; batches run until --peer-max-s 60 of timed generation, or that plus 120 s
           of wall with compiles (a subset, said so).

Metrics: requests_per_s, output_tokens_per_s (useful output tokens / timed wall), total
tokens/s, TTFT and TPOT median and p99 for the engine (all requests arrive at t=0, so TTFT
includes queueing), speedup_vs_static and speedup_vs_peer (ratios of output_tokens_per_s),
split_step_fraction (llm.stats.split_steps / steps of the timed run), split_at_boundary /
split_in_chunk (of those, cut between whole sequences / inside a prefill chunk). Targets on one H200:
speedup_vs_static >= 3, speedup_vs_peer >= 5. Writes <out>/serving_<device>.{json,md,png}.
"""
import os

import argparse
import importlib.util
import json
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

TARGETS = {"speedup_vs_static": 3.0, "speedup_vs_peer": 5.0}
SYSTEMS = ("engine", "static", "peer")


def _decode_script():
    """scripts/bench_decode.py (model config, compile counter, peer helpers)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_decode.py")
    spec = importlib.util.spec_from_file_location("_bench_decode_for_serving", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="preset name (models/config.py) or llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=None, help="TP degree (default: all local devices)")
    ap.add_argument("--impl", default=None, help="fused op impl (default xla at TP1, the harness default above)")
    ap.add_argument("--split", choices=("auto", "off", "on"), default="auto",
                    help="TokenWeave split of large mixed steps: on = the weave table's entry, off = none, "
                         "auto = on when TP > 1 (at TP1 there is no communication to hide)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-median", type=float, default=200)
    ap.add_argument("--input-sigma", type=float, default=1.0)
    ap.add_argument("--output-median", type=float, default=150)
    ap.add_argument("--output-sigma", type=float, default=1.0)
    ap.add_argument("--min-len", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--warmup", choices=("full", "quick"), default="full")
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--static-max-s", type=float, default=45.0)
    ap.add_argument("--peer-batch", type=int, default=32)
    ap.add_argument("--peer-max-s", type=float, default=60.0)
    ap.add_argument("--peer-device", default="cuda", help="torch device of the peer (cpu: smoke test)")
    ap.add_argument("--peer-timeout", type=int, default=480)
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny-llama, 12 requests, lengths <= 32 (CPU)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.tiny:
        from jax_tokenweave.bench.harness import smaller_defaults
        a.model = "tiny-llama"
        smaller_defaults(ap, a, num_requests=12, input_median=12, output_median=10, max_len=32,
                         max_num_batched_tokens=32, max_num_seqs=8, static_batch=6, peer_batch=6,
                         static_max_s=30.0, peer_max_s=20.0)
    return a


def make_workload(a, vocab: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(a.seed)
    n = a.num_requests

    def lengths(median, sigma):
        x = rng.lognormal(np.log(median), sigma, n)
        return np.clip(np.round(x), a.min_len, a.max_len).astype(int)
    lin, lout = lengths(a.input_median, a.input_sigma), lengths(a.output_median, a.output_sigma)
    prompts = [rng.integers(1, vocab, int(L)).astype(int).tolist() for L in lin]

    def summary(x):
        return dict(mean=float(np.mean(x)), median=float(np.median(x)), p90=float(np.percentile(x, 90)),
                    p99=float(np.percentile(x, 99)), min=int(np.min(x)), max=int(np.max(x)), total=int(np.sum(x)))
    spec = dict(distribution="lognormal, rounded and clipped", seed=a.seed, num_requests=n,
                input=dict(median=a.input_median, sigma=a.input_sigma), output=dict(median=a.output_median,
                sigma=a.output_sigma), clip=[a.min_len, a.max_len], arrival="all at t=0",
                token_ids="uniform random in [1, vocab)", note="synthetic lengths shaped like "
                "ShareGPT statistics (long-tailed), not the ShareGPT data set",
                input_stats=summary(lin), output_stats=summary(lout))
    return dict(prompts=prompts, output_lens=[int(x) for x in lout], spec=spec)


def batches_of(n: int, size: int):
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def pctl(xs, q):
    import numpy as np
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


# --------------------------------------------------------------------------- peer (subprocess)

def peer_serving_main(a) -> dict:
    bd = _decode_script()
    res = dict(method=f"transformers generate, static cache, batches of {a.peer_batch} in arrival order, "
                      "left-padded to the batch's longest prompt, min_new_tokens = max_new_tokens = "
                      "the batch's longest output; each batch's compile warmed up (same shapes, "
                      "stopped after 4 tokens) and excluded")

    def save():
        with open(a.peer_json, "w") as f:
            json.dump(res, f, indent=1)
    why = bd.peer_env_check(a.peer_device)
    if why:
        res["skipped"] = why
        save()
        return res
    res.update(bd.peer_versions())
    wl = json.load(open(a.workload_json))
    cfg = bd.model_config(a.model)
    model, torch = bd.hf_model(cfg, a.peer_device)
    import transformers

    class StopAfter(transformers.StoppingCriteria):
        def __init__(self, start, n):
            self.start, self.n = start, n

        def __call__(self, input_ids, scores, **kw):
            done = input_ids.shape[1] - self.start >= self.n
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    prompts, outs = wl["prompts"], wl["output_lens"]
    batches = batches_of(len(prompts), a.peer_batch)
    res.update(batches_total=len(batches), batches=[])
    timed = useful = generated = 0.0
    done_requests = 0
    t_start = time.perf_counter()
    for bi, idx in enumerate(batches):
        L = max(len(prompts[i]) for i in idx)
        mx = max(outs[i] for i in idx)
        ids = torch.zeros((len(idx), L), dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):          # left padding (decoder-only generate)
            p = prompts[i]
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        ids, mask = ids.to(a.peer_device), mask.to(a.peer_device)
        kw = dict(attention_mask=mask, max_new_tokens=mx, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
        try:
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, stopping_criteria=transformers.StoppingCriteriaList([StopAfter(L, 4)]), **kw)
            bd.torch_sync(torch, a.peer_device)
            warm = time.perf_counter() - t
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, min_new_tokens=mx, **kw)
            bd.torch_sync(torch, a.peer_device)
            dt = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001
            res["batches"].append(dict(batch=bi, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"peer batch {bi}: FAILED {e}", flush=True)
            break
        assert out.shape[1] == L + mx, (out.shape, L, mx)
        timed += dt
        useful += sum(outs[i] for i in idx)
        generated += len(idx) * mx
        done_requests += len(idx)
        res["batches"].append(dict(batch=bi, requests=len(idx), prompt_len=L, max_new=mx, wall_s=dt,
                                   warmup_s=warm, finish_s=timed))
        print(f"peer batch {bi}: {len(idx)} x ({L} + {mx}) in {dt:.2f} s (+{warm:.1f} s warm-up)", flush=True)
        res.update(requests=done_requests, timed_s=timed, useful_output_tokens=useful,
                   generated_tokens=generated, requests_per_s=done_requests / timed,
                   output_tokens_per_s=useful / timed, subset=bi + 1 < len(batches),
                   batches_measured=bi + 1)
        save()
        if timed >= a.peer_max_s or time.perf_counter() - t_start >= a.peer_max_s + 120:
            break
    del model
    if a.peer_device.startswith("cuda"):
        torch.cuda.empty_cache()
    save()
    return res


# --------------------------------------------------------------------------- jax side

def run_engine(a, model, wl, counter, mml: int) -> dict:
    from jax_tokenweave.engine.llm import LLM
    prompts, outs = wl["prompts"], wl["output_lens"]
    llm = LLM(model, max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
              max_model_len=mml, page_size=a.page_size)
    t = time.perf_counter()
    c = counter.n
    if a.warmup == "full":
        llm.generate(prompts, max_new_tokens=outs, ignore_eos=True, progress=False)
    else:
        k = min(16, len(prompts))
        llm.generate(prompts[:k], max_new_tokens=outs[:k], ignore_eos=True, progress=False)
    warm_s, warm_compiles = time.perf_counter() - t, counter.n - c
    s0 = dict(vars(llm.stats))
    c0 = counter.n
    t0 = time.perf_counter()
    res = llm.generate(prompts, max_new_tokens=outs, ignore_eos=True, progress=False)
    wall = time.perf_counter() - t0
    st = {k: v - s0[k] for k, v in vars(llm.stats).items()}
    useful = sum(len(r.tokens) for r in res)
    completed = [r.finish_reason == "length" and len(r.tokens) == outs[i] for i, r in enumerate(res)]
    ttft = [r.ttft_s * 1e3 for r in res if r.ttft_s is not None]
    tpot = [r.tpot_s * 1e3 for r in res if r.tpot_s is not None]
    finish = sorted(r.finish_s - t0 for r in res if r.finish_s is not None)
    out = dict(requests=len(res), completed=sum(completed), all_completed=all(completed),
               errors=[r.error for r in res if r.error][:5], wall_s=wall,
               requests_per_s=len(res) / wall, output_tokens_per_s=useful / wall,
               total_tokens_per_s=(useful + sum(len(p) for p in prompts)) / wall,
               useful_output_tokens=useful,
               ttft_ms_median=pctl(ttft, 50), ttft_ms_p99=pctl(ttft, 99),
               tpot_ms_median=pctl(tpot, 50), tpot_ms_p99=pctl(tpot, 99),
               steps=st["steps"], split_steps=st["split_steps"],
               split_step_fraction=st["split_steps"] / st["steps"] if st["steps"] else 0.0,
               split_at_boundary=st["split_at_boundary"], split_in_chunk=st["split_in_chunk"],
               preemptions=st["preemptions"], prefill_tokens=st["prefill_tokens"],
               decode_tokens=st["decode_tokens"], num_pages=llm.num_pages, max_model_len=mml,
               max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=llm.max_num_seqs,
               warmup=a.warmup, warmup_s=warm_s, warmup_compiles=warm_compiles,
               compiles_in_timing=counter.n - c0, finish_s=finish)
    del llm
    return out


def run_static(a, model, wl, counter) -> dict:
    from jax_tokenweave.engine.generate import Generator
    prompts, outs = wl["prompts"], wl["output_lens"]
    gen = Generator(model)
    batches = batches_of(len(prompts), a.static_batch)
    per, timed, useful, generated, reqs = [], 0.0, 0, 0, 0
    finish = []
    leaks = 0
    for bi, idx in enumerate(batches):
        ps = [prompts[i] for i in idx]
        mx = max(outs[i] for i in idx)
        t = time.perf_counter()
        gen.warmup([len(p) for p in ps], mx)
        warm = time.perf_counter() - t
        c0 = counter.n
        t = time.perf_counter()
        res = gen.generate(ps, max_new_tokens=mx, ignore_eos=True)
        dt = time.perf_counter() - t
        leaks += counter.n - c0
        short = [i for i, r in zip(idx, res) if len(r.tokens) < outs[i]]
        if short:
            raise RuntimeError(f"static batch {bi}: requests {short[:5]} got fewer tokens than asked")
        timed += dt
        useful += sum(outs[i] for i in idx)
        generated += len(idx) * mx
        reqs += len(idx)
        finish += [timed] * len(idx)
        per.append(dict(batch=bi, requests=len(idx), padded_shape=list(res[0].padded_shape),
                        cache_len=res[0].cache_len, max_new=mx, wall_s=dt, warmup_s=warm))
        print(f"static batch {bi}: {len(idx)} x ({res[0].padded_shape[1]} + {mx}) in {dt:.2f} s "
              f"(+{warm:.1f} s warm-up)", flush=True)
        if timed >= a.static_max_s:
            break
    del gen
    return dict(requests=reqs, batches_measured=len(per), batches_total=len(batches),
                subset=len(per) < len(batches), timed_s=timed, useful_output_tokens=useful,
                generated_tokens=generated, useful_fraction=useful / generated if generated else None,
                requests_per_s=reqs / timed, output_tokens_per_s=useful / timed,
                compiles_in_timing=leaks, batches=per, finish_s=finish, static_batch=a.static_batch)


def main(argv=None):
    a = parse(argv)
    if a.peer_only:
        return peer_serving_main(a)
    bd = _decode_script()
    systems = [s for s in a.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        raise SystemExit(f"--systems: unknown {sorted(bad)}; choose from {SYSTEMS}")
    os.makedirs(a.out, exist_ok=True)
    cfg = bd.model_config(a.model)
    wl = make_workload(a, cfg.vocab_size)
    phases = {}

    # 1. the peer first, in its own process, before this one's jax takes the GPU memory
    peer = None
    if "peer" in systems:
        print(f"# peer: transformers in a subprocess, batches of {a.peer_batch}", flush=True)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as td:
            wpath = os.path.join(td, "workload.json")
            with open(wpath, "w") as f:
                json.dump(dict(prompts=wl["prompts"], output_lens=wl["output_lens"]), f)
            peer = bd.run_peer_subprocess(os.path.abspath(__file__),
                                          ["--model", a.model, "--workload-json", wpath,
                                           "--peer-batch", str(a.peer_batch), "--peer-max-s", str(a.peer_max_s),
                                           "--peer-device", a.peer_device], a.peer_timeout, a.peer_device)
        phases["peer_s"] = time.perf_counter() - t
        if "skipped" in peer:
            print(f"# peer skipped: {peer['skipped']}", flush=True)

    import jax
    import jax.numpy as jnp
    from jax_tokenweave.bench import harness as bench
    from jax_tokenweave.engine.runner import TPModel
    from jax_tokenweave.parallel.mesh import make_mesh

    counter = bd.CompileCounter().__enter__()
    try:
        mesh = make_mesh(a.tp)
        tp = mesh.shape["tp"]
        on_gpu = jax.default_backend() == "gpu"
        dtype = jnp.bfloat16 if on_gpu or not a.tiny else jnp.float32
        impl = bench.check_impl(a.impl or ("xla" if tp == 1 else bench.default_impl()))
        from jax_tokenweave.engine.generate import bucket_batch, bucket_len
        static_tokens = bucket_batch(a.static_batch) * bucket_len(max(len(p) for p in wl["prompts"]))
        comm = bench.make_comm(mesh, impl, max(a.max_num_batched_tokens, static_tokens), cfg.hidden_size)
        info = bench.run_info(argv if argv is not None else sys.argv)
        slug = bd.device_slug(info["device"], info["backend"])
        info.update(model=a.model, tp=tp, impl=impl, dtype=str(jnp.dtype(dtype)), layers=cfg.num_layers,
                    systems=systems)
        print(f"# {info['device']} x{tp}, jax {info['jax']}, {a.model}, {a.num_requests} requests "
              f"(input median {wl['spec']['input_stats']['median']:.0f}, output median "
              f"{wl['spec']['output_stats']['median']:.0f}, {wl['spec']['output_stats']['total']} output tokens)",
              flush=True)
        t = time.perf_counter()
        split = "auto" if (a.split == "on" or (a.split == "auto" and tp > 1)) else None
        model = TPModel.random(cfg, mesh, dtype=dtype, seed=a.seed, impl=impl, comm=comm, split=split)
        info["split"] = model.split.to_dict() if model.split is not None else None
        jax.block_until_ready(model.params)
        phases["model_init_s"] = time.perf_counter() - t
        ps = a.page_size
        mml = -(-max(len(p) + o for p, o in zip(wl["prompts"], wl["output_lens"])) // ps) * ps
        results = {}
        for name, fn in (("engine", lambda: run_engine(a, model, wl, counter, mml)),
                         ("static", lambda: run_static(a, model, wl, counter))):
            if name not in systems:
                continue
            t = time.perf_counter()
            try:
                results[name] = r = fn()
            except Exception as ex:  # noqa: BLE001 - keep the other systems' numbers
                results[name] = dict(error=f"{type(ex).__name__}: {str(ex)[:600]}")
                print(f"{name}: FAILED {results[name]['error']}", flush=True)
                continue
            finally:
                phases[f"{name}_s"] = time.perf_counter() - t
            if name == "engine":
                print(f"engine: {r['output_tokens_per_s']:.1f} output tok/s, {r['requests_per_s']:.2f} req/s, "
                      f"{r['steps']} steps ({r['split_steps']} split: {r['split_at_boundary']} between "
                      f"sequences, {r['split_in_chunk']} inside a chunk), wall {r['wall_s']:.2f} s "
                      f"(warm-up {r['warmup_s']:.1f} s, {r['warmup_compiles']} compiles)", flush=True)
            else:
                print(f"static: {r['output_tokens_per_s']:.1f} output tok/s on {r['batches_measured']} of "
                      f"{r['batches_total']} batches", flush=True)
    finally:
        counter.__exit__()
    if peer is not None:
        results["peer"] = peer

    e = results.get("engine", {})
    s = results.get("static", {})
    pr = results.get("peer", {})
    speed = dict(
        speedup_vs_static=(e["output_tokens_per_s"] / s["output_tokens_per_s"]
                           if e.get("output_tokens_per_s") and s.get("output_tokens_per_s") else None),
        speedup_vs_peer=(e["output_tokens_per_s"] / pr["output_tokens_per_s"]
                         if e.get("output_tokens_per_s") and pr.get("output_tokens_per_s") else None))
    out = dict(info=info, workload=wl["spec"], targets=TARGETS, results=results, phases_s=phases,
               compiles_total=counter.n, compile_s_total=counter.secs, **speed)
    if e.get("output_tokens_per_s"):
        for k in ("requests_per_s", "output_tokens_per_s", "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median",
                  "tpot_ms_p99", "split_step_fraction", "all_completed"):
            out[k] = e[k]
    base = os.path.join(a.out, f"serving_{slug}")
    bench.write_json(base + ".json", out)
    write_md(base + ".md", out)
    plot(base + ".png", out)
    print(open(base + ".md").read())
    return out


def plot(path, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = out["results"]
    names = [n for n in SYSTEMS if res.get(n, {}).get("output_tokens_per_s")]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax0.bar(names, [res[n]["output_tokens_per_s"] for n in names], color=["#1f77b4", "#ff7f0e", "#2ca02c"][:len(names)])
    for i, n in enumerate(names):
        sub = " (subset)" if res[n].get("subset") else ""
        ax0.text(i, res[n]["output_tokens_per_s"], f"{res[n]['output_tokens_per_s']:.0f}{sub}",
                 ha="center", va="bottom", fontsize=8)
    ax0.set_ylabel("useful output tokens / s")
    ax0.set_title("throughput", fontsize=10)
    for n in names:
        fin = res[n].get("finish_s")
        if fin is None and n == "peer":
            fin = [b["finish_s"] for b in res[n].get("batches", []) if "finish_s" in b
                   for _ in range(b["requests"])]
        if fin:
            ax1.step(sorted(fin), range(1, len(fin) + 1), where="post", label=n)
    ax1.set_xlabel("timed wall s")
    ax1.set_ylabel("requests completed")
    ax1.set_title("completion over time (compile excluded)", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    info = out["info"]
    fig.suptitle(f"{info['model']} serving, TP{info['tp']}, {info['device']}, "
                 f"{out['workload']['num_requests']} requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_md(path, out):
    info, wl, res = out["info"], out["workload"], out["results"]
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    ins, outs = wl["input_stats"], wl["output_stats"]
    lines = [f"# Offline serving: {info['model']}, TP{info['tp']}, {info['device']}", "",
             f"{info['date']} · jax {info['jax']} · {info['dtype']} · impl={info['impl']} · `{info['command']}`", "",
             f"Workload: {wl['num_requests']} requests at t=0, seed {wl['seed']}, random token ids; lengths "
             f"lognormal (input median {wl['input']['median']:.0f} σ {wl['input']['sigma']}, output median "
             f"{wl['output']['median']:.0f} σ {wl['output']['sigma']}), clipped to {wl['clip']} — synthetic, "
             f"ShareGPT-like long tail. Drawn: input mean {ins['mean']:.0f} / median {ins['median']:.0f} / "
             f"p99 {ins['p99']:.0f}; output mean {outs['mean']:.0f} / median {outs['median']:.0f} / p99 "
             f"{outs['p99']:.0f}; {outs['total']} output tokens in all. Compile time excluded everywhere.", "",
             "| system | requests measured | req/s | output tok/s | notes |", "|---|---|---|---|---|"]
    def row(label, r, make):   # None (did not run), FAILED with its error, or the system's row
        if not r:
            return None
        if "error" in r:
            lines.append(f"| {label} | — | — | — | FAILED: {r['error'][:200]} |")
            return None
        lines.append(make(r))
        return r

    e = row("engine", res.get("engine"), lambda e: (
        f"| engine (LLM, continuous) | {e['requests']} | {f(e['requests_per_s'], 2)} | "
        f"{f(e['output_tokens_per_s'])} | {e['steps']} steps, {e['split_steps']} split "
        f"({f(100 * e['split_step_fraction'])}%; {e.get('split_at_boundary', '?')} cut between "
        f"sequences, {e.get('split_in_chunk', '?')} inside a chunk), {e['preemptions']} preemptions, "
        f"completed {e['completed']}/{e['requests']}, warm-up {e['warmup']}, "
        f"{e['compiles_in_timing']} compiles in timing |"))
    row("static", res.get("static"), lambda s: (
        f"| static (Generator, batch {s['static_batch']}) | {s['requests']} | "
        f"{f(s['requests_per_s'], 2)} | {f(s['output_tokens_per_s'])} | {s['batches_measured']} of "
        f"{s['batches_total']} batches{' (subset)' if s['subset'] else ''}; useful / generated "
        f"{f(s['useful_fraction'], 2)} |"))
    p = res.get("peer")
    if p is not None:
        if p.get("output_tokens_per_s"):
            lines.append(f"| peer (transformers {p.get('transformers')}, static cache) | {p['requests']} | "
                         f"{f(p['requests_per_s'], 2)} | {f(p['output_tokens_per_s'])} | {p['batches_measured']} of "
                         f"{p['batches_total']} batches{' (subset)' if p['subset'] else ''} |")
        else:
            lines.append(f"| peer | — | — | — | skipped: {p.get('skipped', 'no batch measured')} |")
    lines += ["", f"speedup_vs_static {f(out['speedup_vs_static'], 2)} (target ≥ {TARGETS['speedup_vs_static']}) · "
              f"speedup_vs_peer {f(out['speedup_vs_peer'], 2)} (target ≥ {TARGETS['speedup_vs_peer']})"]
    if e:
        lines += ["", f"Engine latency: TTFT median {f(e['ttft_ms_median'])} ms, p99 {f(e['ttft_ms_p99'])} ms "
                  f"(queueing included: all requests arrive at t=0); TPOT median {f(e['tpot_ms_median'], 2)} ms, "
                  f"p99 {f(e['tpot_ms_p99'], 2)} ms."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
