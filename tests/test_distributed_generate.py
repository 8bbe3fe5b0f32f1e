"""Generation under jax.distributed: two CPU processes on localhost (gloo collectives), each with
two host devices, produce the same tokens as one process with four devices."""
import json
import os
import subprocess
import sys

import pytest

from jax_tokenweave.parallel.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")
TIMEOUT = 240
ARGS = ["--random-model", "tiny-llama", "--prompt-ids", "5,17,99,3,250,8,1", "--prompt-ids", "42,7",
        "--max-new-tokens", "12", "--no-warmup"]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISTRIBUTED_TIMEOUT"] = "60"
    env.update(extra)
    return env


def _run_single(tmp_path, extra):
    out = tmp_path / "single.json"
    p = subprocess.run([sys.executable, SCRIPT, *ARGS, *extra, "--json", str(out)],
                       env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def _run_two_processes(tmp_path, extra):
    """Process 0 takes its settings from flags, process 1 from the environment."""
    port = free_port()
    procs = []
    for pid in range(2):
        out = tmp_path / f"multi{pid}.json"
        if pid == 0:
            cmd = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
            env = _env(2)
        else:
            cmd = []
            env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *ARGS, *extra, *cmd, "--json", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, f"process exited {p.returncode}:\n{se[-3000:]}"
    # only process 0 prints and writes results
    summary = "TTFT median" if "--requests" in extra else "time to first token"
    assert summary in outs[0][1] and summary not in outs[1][1]
    # (gloo's native library prints its connection lines itself, e.g. 'Rank 1 is connected to 1 peer ranks')
    assert [l for l in outs[1][0].splitlines()
            if l.strip() and not l.startswith("[Gloo]") and "peer ranks" not in l] == []
    assert not (tmp_path / "multi1.json").exists()
    return json.loads((tmp_path / "multi0.json").read_text())


@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path):
    """Seeded top-k/top-p sampling at tp=4: 2 processes x 2 devices == 1 process x 4 devices."""
    extra = ["--tp", "4", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    single = _run_single(tmp_path, extra)
    multi = _run_two_processes(tmp_path, extra)
    assert single["devices"] == multi["devices"] == 4
    assert single["processes"] == 1 and multi["processes"] == 2
    assert [r["tokens"] for r in multi["results"]] == [r["tokens"] for r in single["results"]]
    assert all(len(r["tokens"]) == 12 for r in single["results"])


def test_two_processes_match_one_continuous_engine(tmp_path):
    """The continuous engine (--requests) at tp=4 with TokenWeave's split of mixed steps: the
    processes schedule identically and 2 processes x 2 devices == 1 process x 4 devices."""
    import json as _json
    reqs = tmp_path / "reqs.jsonl"
    with open(reqs, "w") as f:
        for i, ids in enumerate(([5, 17, 99, 3, 250, 8, 1] * 5, [42, 7], list(range(1, 30)))):
            f.write(_json.dumps({"id": f"r{i}", "prompt_ids": ids, "max_new_tokens": 6 + i,
                                 "temperature": 0.8, "top_k": 50, "seed": i}) + "\n")
    extra = ["--tp", "4", "--requests", str(reqs), "--max-num-batched-tokens", "32", "--split-threshold", "16"]
    single = _run_single(tmp_path, extra)
    multi = _run_two_processes(tmp_path, extra)
    assert single["processes"] == 1 and multi["processes"] == 2
    assert [r["tokens"] for r in multi["results"]] == [r["tokens"] for r in single["results"]]
    assert [len(r["tokens"]) for r in single["results"]] == [6, 7, 8]
    assert single["split_steps"] > 0 and single["split_steps"] == multi["split_steps"]
    assert single["split_at_boundary"] + single["split_in_chunk"] == single["split_steps"]
    assert single["split_at_boundary"] == multi["split_at_boundary"]


def test_missing_process_is_an_error_not_a_hang(tmp_path):
    port = free_port()
    p = subprocess.run([sys.executable, SCRIPT, *ARGS, "--coordinator", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", "0"],
                       env=_env(2, JAX_DISTRIBUTED_TIMEOUT="5"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "waiting up to 5 s" in p.stderr and "DEADLINE_EXCEEDED" in p.stderr


def test_maybe_initialize_settings(monkeypatch):
    from jax_tokenweave.parallel import distributed as dist
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert dist.maybe_initialize() is False                      # nothing set: single process
    assert dist.maybe_initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="coordinator"):
        dist.maybe_initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="number of processes"):
        dist.maybe_initialize(coordinator="127.0.0.1:1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="process's id"):
        dist.maybe_initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="outside 0..1"):
        dist.maybe_initialize()


@pytest.mark.multigpu
@pytest.mark.timeout(900)
def test_generate_gpu_check():
    """On the device machine (2+ GPUs): xla == p2p == jax.distributed p2p greedy tokens."""
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "generate_gpu_check.sh")],
                       capture_output=True, text=True, timeout=880, cwd=ROOT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "GENERATE GPU CHECK PASSED" in p.stdout
