"""Pallas paged-attention kernels (interpret mode on CPU) against their XLA reference.

Every check draws fresh normal data, fills the whole pool (pages the sequences do not own
included) and compares every output element with assert_allclose.
"""
import importlib.util
import pathlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

try:
    from jax_tokenweave.kernels import paged_attention as pa
except Exception:  # the package's other modules may be mid-refactor: load the file itself
    _path = pathlib.Path(__file__).resolve().parents[1] / "jax_tokenweave" / "kernels" / "paged_attention.py"
    _spec = importlib.util.spec_from_file_location("_paged_attention_under_test", _path)
    pa = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(pa)

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# One draw of jax.random.normal, handed out in fresh slices: every array of every check gets
# new data (no two share values) without compiling a random kernel per shape.
_NORMAL = np.asarray(jax.random.normal(jax.random.key(20261201), (1 << 22,), jnp.float32))
_state = {"at": 0, "rng": np.random.default_rng(7)}


def _normal(shape, dtype):
    n = int(np.prod(shape))
    at = _state["at"]
    if at + n > _NORMAL.size:
        at = int(_state["rng"].integers(0, _NORMAL.size - n))
    _state["at"] = at + n
    return jnp.asarray(_NORMAL[at:at + n].reshape(shape)).astype(dtype)


def _pools(layers, kvh, num_pages, page_size, hd, dtype):
    shape = (layers, kvh, num_pages, page_size, hd)
    return _normal(shape, dtype), _normal(shape, dtype)


def _block_tables(num_seqs, max_pages, num_pages, pages_needed):
    """Shuffled, non-contiguous page ids; entries past a sequence's pages hold 0."""
    perm = _state["rng"].permutation(np.arange(1, num_pages))
    bt = np.zeros((num_seqs, max_pages), np.int32)
    at = 0
    for s, n in enumerate(pages_needed):
        bt[s, :n] = perm[at:at + n]
        at += n
    assert at <= num_pages - 1
    return jnp.asarray(bt)


def _check(out, ref, dtype):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, **TOL[dtype])


def _decode_case(dtype, hd, group, page_size, lengths, kvh=2, layers=2, max_pages=None):
    lengths = np.asarray(lengths, np.int32)
    need = [-(-int(n) // page_size) for n in lengths]
    max_pages = max(need) if max_pages is None else max_pages
    num_pages = sum(need) + 3
    kp, vp = _pools(layers, kvh, num_pages, page_size, hd, dtype)
    q = _normal((len(lengths), kvh * group, hd), dtype)
    bt = _block_tables(len(lengths), max_pages, num_pages, need)
    return q, kp, vp, bt, jnp.asarray(lengths)


# ---------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("dtype,hd,group,page_size", [
    (jnp.float32, 64, 4, 8),
    (jnp.bfloat16, 128, 8, 16),
    (jnp.float32, 128, 1, 16),
    (jnp.bfloat16, 64, 4, 32),
])
def test_decode_lengths_across_page_boundaries(dtype, hd, group, page_size):
    ps = page_size
    lengths = [1, ps - 1, ps, ps + 1, 2 * ps, 3 * ps + 5]
    q, kp, vp, bt, ln = _decode_case(dtype, hd, group, ps, lengths)
    out = pa.paged_decode_attention(q, kp, vp, bt, ln, 1)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, pa.paged_attention_reference(q, kp, vp, bt, ln, 1), dtype)


@pytest.mark.parametrize("ps,kw", [
    (8, dict(pages_per_split=1)),                      # fixed splits of one page, gathered tiles
    (16, dict(num_splits=3, block_k=32)),              # dynamic splits, two pages a step
    (16, dict(num_splits=2, block_k=32, kv_gather=True)),
])
def test_decode_multiple_splits(ps, kw):
    dtype = jnp.float32
    lengths = [3, ps, ps + 1, 5 * ps, 3 * ps - 1]  # several splits, empty splits for short rows
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 4, ps, lengths, max_pages=6)
    out = pa.paged_decode_attention(q, kp, vp, bt, ln, 0, **kw)
    _check(out, pa.paged_attention_reference(q, kp, vp, bt, ln, 0), dtype)


def _appended(kp, vp, bt, ln, layer, k_new, v_new):
    """The pools with each sequence's token at position ln-1 written by XLA (the reference)."""
    ps = kp.shape[3]
    pos = np.asarray(ln) - 1
    page = np.asarray(bt)[np.arange(len(pos)), pos // ps]
    return kp.at[layer, :, page, pos % ps].set(k_new), vp.at[layer, :, page, pos % ps].set(v_new)


@pytest.mark.parametrize("dtype,hd,group,ps,kw", [
    (jnp.float32, 64, 4, 8, {}),
    (jnp.bfloat16, 128, 8, 16, dict(num_splits=3)),
    (jnp.float32, 128, 1, 16, dict(num_splits=1)),
    (jnp.bfloat16, 64, 4, 32, dict(num_splits=2, block_k=32)),
])
def test_decode_appends_the_new_token(dtype, hd, group, ps, kw):
    """new_kv: the kernel writes the token's k/v to its slot (position length-1) in place and
    attends to it: the same output as the reference on pools written by XLA, the same pools,
    and every other slot (other layers, other pages, the rest of the page) untouched."""
    lengths = [1, ps - 1, ps, ps + 1, 2 * ps, 3 * ps + 5]
    q, kp, vp, bt, ln = _decode_case(dtype, hd, group, ps, lengths)
    kvh = kp.shape[1]
    k_new, v_new = _normal((len(lengths), kvh, hd), dtype), _normal((len(lengths), kvh, hd), dtype)
    kr, vr = _appended(kp, vp, bt, ln, 1, k_new, v_new)
    assert not np.array_equal(np.asarray(kr, np.float32), np.asarray(kp, np.float32))
    out, k2, v2 = pa.paged_decode_attention(q, kp, vp, bt, ln, 1, new_kv=(k_new, v_new), **kw)
    _check(out, pa.paged_attention_reference(q, kr, vr, bt, ln, 1), dtype)
    np.testing.assert_array_equal(np.asarray(k2, np.float32), np.asarray(kr, np.float32))
    np.testing.assert_array_equal(np.asarray(v2, np.float32), np.asarray(vr, np.float32))


def test_decode_combines_more_splits_than_one_chunk():
    """The combine loads the partial outputs in chunks of 16 splits (group 4): 20 splits of one
    page, 19 of them holding pages for the long row, none past the first for the short ones."""
    dtype, ps = jnp.float32, 8
    lengths = [300, 1, 9, 130]
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 4, ps, lengths)
    k_new, v_new = _normal((4, kp.shape[1], 64), dtype), _normal((4, kp.shape[1], 64), dtype)
    kr, vr = _appended(kp, vp, bt, ln, 0, k_new, v_new)
    out, k2, v2 = pa.paged_decode_attention(q, kp, vp, bt, ln, 0, num_splits=20, block_k=8,
                                            new_kv=(k_new, v_new))
    _check(out, pa.paged_attention_reference(q, kr, vr, bt, ln, 0), dtype)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(kr))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vr))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_busy_rows_only(num_splits):
    """busy_rows: the first rows are the batch's sequences, the rest padding. The busy rows'
    outputs and slots match the reference; the padding rows' outputs are zeros and their slots
    are not written (the pools equal the reference with only the busy rows appended)."""
    dtype, ps = jnp.float32, 16
    lengths = [70, 33, 1, 1, 1]
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 4, ps, lengths)
    kvh = kp.shape[1]
    k_new, v_new = _normal((5, kvh, 64), dtype), _normal((5, kvh, 64), dtype)
    kr, vr = _appended(kp, vp, bt[:2], ln[:2], 1, k_new[:2], v_new[:2])
    out, k2, v2 = pa.paged_decode_attention(q, kp, vp, bt, ln, 1, new_kv=(k_new, v_new),
                                            num_splits=num_splits, busy_rows=2)
    _check(out[:2], pa.paged_attention_reference(q[:2], kr, vr, bt[:2], ln[:2], 1), dtype)
    np.testing.assert_array_equal(np.asarray(out[2:]), 0)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(kr))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vr))
    with pytest.raises(ValueError, match=r"busy_rows=6 must be in \[1, batch=5\]"):
        pa.paged_decode_attention(q, kp, vp, bt, ln, 1, new_kv=(k_new, v_new), busy_rows=6)


def test_decode_append_rejects_bad_new_kv():
    q, kp, vp, bt, ln = _decode_case(jnp.float32, 64, 4, 16, [3, 20])
    good = _normal((2, kp.shape[1], 64), jnp.float32)
    with pytest.raises(ValueError, match=r"k_new must be float32\[2, 2, 64\]"):
        pa.paged_decode_attention(q, kp, vp, bt, ln, 0, new_kv=(good[:, :1], good))
    with pytest.raises(ValueError, match="cast it to the pools' dtype"):
        pa.paged_decode_attention(q, kp, vp, bt, ln, 0, new_kv=(good, good.astype(jnp.bfloat16)))


def test_decode_split_rule():
    # at most one wave of 3 x 132 programs (rounded down), at least one split; capped by
    # 128-token splits
    assert pa.decode_num_splits(1, 8, 512, 16) == 49
    assert pa.decode_num_splits(1, 8, 32, 16) == 4
    assert pa.decode_num_splits(8, 8, 512, 16) == 6
    assert pa.decode_num_splits(32, 8, 128, 16) == 1
    assert pa.decode_num_splits(64, 8, 128, 16) == 1
    # default rule with several splits at small shapes: 2 kv heads, batch 2 -> capped by capacity
    q, kp, vp, bt, ln = _decode_case(jnp.float32, 64, 2, 16, [200, 33], max_pages=16)
    assert pa.decode_num_splits(2, 2, 16, 16) == 2
    out = pa.paged_decode_attention(q, kp, vp, bt, ln, 1, scale=0.3)
    _check(out, pa.paged_attention_reference(q, kp, vp, bt, ln, 1, scale=0.3), jnp.float32)


@pytest.mark.parametrize("append", [False, True])
def test_split_pages_counts_the_splits_that_hold_pages(append):
    """The decode kernel runs and the combine reads splits 0 .. used-1 only: `used` must be
    the number of splits whose page range is not empty (split 0 always, it holds the new key
    or the first page), for the dynamic rule and for static pages_per_split."""
    for page_size, ppb, max_pages in ((16, 4, 40), (64, 1, 32), (8, 8, 64)):
        for num_splits, static_pps in ((1, None), (3, None), (16, None), (33, None), (5, 8), (4, 16)):
            if static_pps is not None and -(-max_pages // static_pps) != num_splits:
                continue
            for length in range(1, max_pages * page_size + 1, 7):
                cached, n_pages, pps, used = (int(x) for x in pa._split_pages(
                    jnp.int32(length), page_size, max_pages, num_splits, static_pps, ppb, append))
                assert cached == (length - 1 if append else length)
                assert n_pages == min(-(-cached // page_size), max_pages)
                holding = [s for s in range(num_splits) if s * pps < n_pages]
                assert used == max(len(holding), 1) and used <= num_splits
                assert holding == list(range(len(holding)))   # the first `used`, no gaps
                assert num_splits * pps >= n_pages             # every page has a split


def test_decode_traced_layer_in_scan():
    dtype = jnp.bfloat16
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 4, 16, [5, 16, 17, 33], layers=3)

    @jax.jit
    def run(q, kp, vp, bt, ln):
        def step(carry, layer):
            o = pa.paged_decode_attention(q, kp, vp, bt, ln, layer, num_splits=2)
            return carry, o
        return jax.lax.scan(step, 0, jnp.arange(3, dtype=jnp.int32))[1]

    outs = run(q, kp, vp, bt, ln)
    refs = [pa.paged_attention_reference(q, kp, vp, bt, ln, layer) for layer in range(3)]
    for layer in range(3):
        _check(outs[layer], refs[layer], dtype)
    # the layers really differ
    assert float(jnp.abs(refs[0].astype(jnp.float32) - refs[1].astype(jnp.float32)).max()) > 1e-2


def test_decode_bad_input():
    q, kp, vp, bt, ln = _decode_case(jnp.float32, 64, 4, 8, [3, 9])
    with pytest.raises(ValueError, match="whole pool"):
        pa.paged_decode_attention(q, kp[0], vp[0], bt, ln, 0)
    with pytest.raises(ValueError, match="dtypes differ"):
        pa.paged_decode_attention(q.astype(jnp.bfloat16), kp, vp, bt, ln, 0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        pa.paged_decode_attention(q[:, :7], kp, vp, bt, ln, 0)
    with pytest.raises(ValueError, match="lengths"):
        pa.paged_decode_attention(q, kp, vp, bt, ln.astype(jnp.float32), 0)
    with pytest.raises(ValueError, match="block_tables"):
        pa.paged_decode_attention(q, kp, vp, bt[:1], ln, 0)
    with pytest.raises(ValueError, match="out of range"):
        pa.paged_decode_attention(q, kp, vp, bt, ln, 5)
    with pytest.raises(ValueError, match="kv_gather"):
        pa.paged_decode_attention(q, kp, vp, bt, ln, 0, kv_gather=False)


# ---------------------------------------------------------------------------------------------
# ragged


def _ragged_case(dtype, hd, group, page_size, q_lens, ctx_lens, num_rows, kvh=2, layers=2,
                 slots=None):
    """q_lens / ctx_lens per live sequence; ``slots`` >= len adds dead sequence slots."""
    slots = len(q_lens) if slots is None else slots
    q_lens = list(q_lens) + [0] * (slots - len(q_lens))
    ctx = list(ctx_lens) + [0] * (slots - len(ctx_lens))
    qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert qs[-1] <= num_rows
    need = [-(-int(c) // page_size) for c in ctx]
    max_pages = max(need)
    num_pages = sum(need) + 3
    kp, vp = _pools(layers, kvh, num_pages, page_size, hd, dtype)
    q = _normal((num_rows, kvh * group, hd), dtype)
    bt = _block_tables(slots, max_pages, num_pages, need)
    return q, kp, vp, bt, jnp.asarray(ctx, jnp.int32), jnp.asarray(qs)


# decode rows (q_len 1), prefill without context (q_len == ctx), prefill chunks with earlier
# context crossing page boundaries, padding rows at the end
_MIX_Q = [1, 21, 1, 9, 1, 14]
_MIX_CTX = [5, 21, 16, 9 + 11, 33, 14 + 18]


@pytest.mark.parametrize("dtype,hd,group,page_size", [
    (jnp.float32, 64, 4, 8),
    (jnp.bfloat16, 128, 8, 16),
])
def test_ragged_mixed_batch(dtype, hd, group, page_size):
    q, kp, vp, bt, ctx, qs = _ragged_case(dtype, hd, group, page_size, _MIX_Q, _MIX_CTX, 56)
    ns = len(_MIX_Q)
    out = pa.ragged_paged_attention(q, kp, vp, bt, ctx, qs, ns, 1)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = pa.paged_attention_reference(q, kp, vp, bt, ctx, 1, query_start=qs, num_seqs=ns)
    _check(out, ref, dtype)
    assert float(jnp.abs(out[int(qs[ns]):].astype(jnp.float32)).max()) == 0.0


def test_ragged_num_seqs_below_slots_and_small_blocks():
    dtype = jnp.float32
    # G = 2 with 8-row query blocks (M = 16), one page per KV step
    q, kp, vp, bt, ctx, qs = _ragged_case(dtype, 64, 2, 8, [3, 1, 12, 5], [3, 17, 20, 9], 32,
                                          slots=6)
    ns = jnp.int32(3)  # the 4th live-looking sequence is padding too
    out = pa.ragged_paged_attention(q, kp, vp, bt, ctx, qs, ns, 0, block_q=8, block_k=8)
    ref = pa.paged_attention_reference(q, kp, vp, bt, ctx, 0, query_start=qs, num_seqs=3)
    _check(out, ref, dtype)
    assert float(jnp.abs(out[int(qs[3]):]).max()) == 0.0


def test_ragged_decode_only_matches_decode_kernel():
    dtype = jnp.float32
    lengths = [1, 7, 8, 9, 16, 30]
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 1, 8, lengths)  # G = 1
    qs = jnp.arange(len(lengths) + 1, dtype=jnp.int32)
    out_r = pa.ragged_paged_attention(q, kp, vp, bt, ln, qs, len(lengths), 1)
    out_d = pa.paged_decode_attention(q, kp, vp, bt, ln, 1)
    _check(out_r, pa.paged_attention_reference(q, kp, vp, bt, ln, 1), dtype)
    _check(out_r, out_d, dtype)


def test_ragged_traced_layer_and_num_seqs_in_scan():
    dtype = jnp.bfloat16
    q, kp, vp, bt, ctx, qs = _ragged_case(dtype, 64, 4, 16, [1, 17, 2], [30, 40, 18], 24,
                                          layers=3)

    @jax.jit
    def run(q, kp, vp, bt, ctx, qs, ns):
        def step(carry, layer):
            return carry, pa.ragged_paged_attention(q, kp, vp, bt, ctx, qs, ns, layer)
        return jax.lax.scan(step, 0, jnp.arange(3, dtype=jnp.int32))[1]

    outs = run(q, kp, vp, bt, ctx, qs, jnp.int32(3))
    for layer in range(3):
        ref = pa.paged_attention_reference(q, kp, vp, bt, ctx, layer, query_start=qs, num_seqs=3)
        _check(outs[layer], ref, dtype)


@pytest.mark.parametrize("check_vma", [False, True])
def test_shard_map_over_kv_heads(check_vma):
    """Both kernels inside jax.shard_map on 2 devices, kv heads (and q heads) sharded."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    dtype = jnp.float32
    q, kp, vp, bt, ln = _decode_case(dtype, 64, 4, 8, [1, 9, 24], kvh=4)
    qr, kpr, vpr, btr, ctx, qs = _ragged_case(dtype, 64, 4, 8, [1, 10, 1], [12, 19, 8], 14,
                                              kvh=4)
    pool = P(None, "tp")

    def body(q, kp, vp, bt, ln, qr, kpr, vpr, btr, ctx, qs, ns, layer):
        return (pa.paged_decode_attention(q, kp, vp, bt, ln, layer, num_splits=2),
                pa.ragged_paged_attention(qr, kpr, vpr, btr, ctx, qs, ns, layer))

    fn = jax.jit(jax.shard_map(
        body, mesh=mesh, check_vma=check_vma,
        in_specs=(P(None, "tp"), pool, pool, P(), P(), P(None, "tp"), pool, pool, P(), P(), P(),
                  P(), P()),
        out_specs=(P(None, "tp"), P(None, "tp"))))
    out_d, out_r = fn(q, kp, vp, bt, ln, qr, kpr, vpr, btr, ctx, qs, jnp.int32(3), jnp.int32(1))
    _check(out_d, pa.paged_attention_reference(q, kp, vp, bt, ln, 1), dtype)
    _check(out_r, pa.paged_attention_reference(qr, kpr, vpr, btr, ctx, 1, query_start=qs,
                                               num_seqs=3), dtype)


def test_ragged_bad_input():
    q, kp, vp, bt, ctx, qs = _ragged_case(jnp.float32, 64, 4, 8, [1, 3], [4, 9], 8)
    with pytest.raises(ValueError, match="query_start"):
        pa.ragged_paged_attention(q, kp, vp, bt, ctx, qs[:-1], 2, 0)
    with pytest.raises(ValueError, match="context_lens"):
        pa.ragged_paged_attention(q, kp, vp, bt, ctx[:1], qs, 2, 0)
    with pytest.raises(ValueError, match="head_dim"):
        pa.ragged_paged_attention(q[..., :32], kp, vp, bt, ctx, qs, 2, 0)
    with pytest.raises(ValueError, match="num_seqs"):
        pa.ragged_paged_attention(q, kp, vp, bt, ctx, qs, 2.0, 0)
