"""Child process of test_checkpoint.test_load_under_jax_distributed: joins a 2-process
jax.distributed run (4 CPU devices each), restores a checkpoint onto a tp=8 mesh spanning both
processes and checks every addressable shard against the expected values."""
import sys

import numpy as np

from jax_tokenweave.parallel.distributed import maybe_initialize


def main(coord, pid, ckpt_dir, expected_npz):
    maybe_initialize(coord, 2, int(pid), timeout_s=60)
    import jax
    from jax_tokenweave.model_io.checkpoint import load_checkpoint
    from jax_tokenweave.parallel.mesh import make_mesh
    from jax_tokenweave.parallel.sharding import param_shardings
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh(8)
    cfg, params, _ = load_checkpoint(ckpt_dir, mesh)
    want = param_shardings(cfg, mesh)
    expected = np.load(expected_npz)
    n = 0
    for k, arr in params.items():
        assert not arr.is_fully_addressable, k
        assert arr.sharding.is_equivalent_to(want[k], arr.ndim), k
        assert len(arr.addressable_shards) == 4, k
        for s in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), expected[k][s.index], err_msg=k)
            n += 1
    print(f"process {pid}: {len(params)} params, {n} shards ok", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
