"""GPU check of the split schedule: TPModel logits with TokenWeave splitting (impl p2p, start/done
overlap, cuDNN attention) against the unsplit model (impl xla), both split kinds, TP =
all local GPUs; then prefill-with-split + decode against unsplit. bf16 weights, so the bound is a
bf16 one (max |diff| of logits relative to their scale). Prints one line per case and 'ALL OK'.

    python tests/gpu/weave_check.py [TP]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from jax_tokenweave.gpu_env import forbid_multicast  # noqa: E402
forbid_multicast()

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokenweave import Communicator
from jax_tokenweave.parallel.mesh import make_mesh
from jax_tokenweave.models import get_preset
from jax_tokenweave.engine.runner import TPModel, to_host
from jax_tokenweave.weave import SplitConfig, plan_split

tp = int(sys.argv[1]) if len(sys.argv) > 1 else jax.device_count()
mesh = make_mesh(tp)
cfg = get_preset("tiny-llama").replace(hidden_size=1024, intermediate_size=2816, num_heads=16,
                                       num_kv_heads=4, head_dim=64, vocab_size=1024, num_layers=4)
comm = Communicator(mesh, "tp", max_bytes=4096 * cfg.hidden_size * 2 + (1 << 20))
ref_m = TPModel.random(cfg, mesh, seed=0, dtype=jnp.bfloat16, impl="xla")
split = SplitConfig(threshold=256, tile=64)
tw_m = TPModel(cfg, ref_m.params, mesh, impl="p2p", comm=comm, split=split)
rng = np.random.default_rng(0)
ok = True
for shape in [(1, 1024), (4, 256), (3, 300)]:
    toks = rng.integers(0, cfg.vocab_size, shape).astype(np.int32)
    ref = to_host(ref_m.logits(toks))
    got = to_host(tw_m.logits(toks))
    err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6))
    good = err < 3e-2 and np.isfinite(got).all()
    ok &= good
    print(f"logits {shape} plan={plan_split(*shape, split)} rel_err={err:.2e} {'ok' if good else 'FAIL'}", flush=True)
toks = rng.integers(0, cfg.vocab_size, (2, 512)).astype(np.int32)
lengths = np.array([512, 300], np.int32)
outs = []
for m in (ref_m, tw_m):
    cache = m.init_cache(2, 520)
    lg, cache = m.prefill(toks, lengths, cache)
    steps = [to_host(lg)]
    for s in range(3):
        lg, cache = m.decode(toks[:, s], cache)
        steps.append(to_host(lg))
    outs.append(np.stack(steps))
err = float(np.abs(outs[0] - outs[1]).max() / (np.abs(outs[0]).max() + 1e-6))
good = err < 3e-2
ok &= good
print(f"prefill(split)+decode rel_err={err:.2e} {'ok' if good else 'FAIL'}", flush=True)
print("ALL OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
