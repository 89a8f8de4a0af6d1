"""spot.selector_score, spot.select_blocks and spot.decode_select against reference.py (CPU) and
the CUDA kernels against the CPU kernels (GPU, marked)."""

from __future__ import annotations

import math

import pytest
import torch

import spot_attention
from spot_attention import reference
from spot_attention.decode import capture_cuda_graph

def gpu(test):
    """Marks a test `gpu` (selectable with -m gpu) and skips it without CUDA."""
    skip = pytest.mark.skipif(not spot_attention.cuda_available(), reason="needs CUDA and the CUDA build of spot_ops")
    return pytest.mark.gpu(skip(test))

FORMATS = ("dense", "int4", "mxfp4", "nvfp4")


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_visible(batch, rows, width, gen, full_fraction=0.3):
    """int32 [batch, rows] in [0, width], some rows fully visible, some empty."""
    visible = torch.randint(0, width + 1, (batch, rows), generator=gen, dtype=torch.int32)
    full = torch.rand(batch, rows, generator=gen) < full_fraction
    return torch.where(full, torch.full_like(visible, width), visible)


def pack(keys, fmt):
    """(codes or dense keys, scales or None, global_scale, dequantised float keys)."""
    if fmt == "dense":
        return keys, None, 1.0, keys.float()
    global_scale = 1.0
    if fmt == "nvfp4":
        # A float-representable global scale: the kernels take it as float32.
        global_scale = float(torch.tensor(float(keys.abs().max()) / (6 * 448), dtype=torch.float32))
    codes, scales = reference.pack_kcache(keys.float(), fmt, global_scale)
    return codes, scales, global_scale, reference.unpack_kcache(codes, scales, fmt, global_scale)


# --------------------------------------------------------------------------------------------
# selector_score
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 13, 64), (1, 2, 70, 67, 32), (3, 1, 1, 9, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_selector_score_cpu_matches_reference(shape, dtype, fmt):
    batch, heads, rows, width, dim = shape
    gen = generator(hash((shape, fmt)) % 1000)
    query = torch.randn(batch, heads, rows, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, heads, width, dim, generator=gen).to(dtype)
    visible = random_visible(batch, rows, width, gen)
    stored, scales, global_scale, dense = pack(keys, fmt)
    scale = dim**-0.5
    got = spot_attention.selector_score(query, stored, visible, scale, key_scales=scales, format=fmt,
                                        global_scale=global_scale)
    want = reference.selector_score(query, dense, visible, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    column = torch.arange(width)
    hidden = column[None, None, :] >= visible[:, :, None]
    assert torch.isneginf(got[hidden[:, None].expand_as(got)]).all()
    assert torch.isfinite(got[~hidden[:, None].expand_as(got)]).all()


def test_selector_score_odd_dim_dense():
    gen = generator(7)
    query = torch.randn(2, 2, 3, 40, generator=gen)
    keys = torch.randn(2, 2, 11, 40, generator=gen)
    visible = torch.tensor([[11, 4, 0], [1, 11, 7]], dtype=torch.int32)
    got = spot_attention.selector_score(query, keys, visible, 0.3)
    torch.testing.assert_close(got, reference.selector_score(query, keys, visible, 0.3), rtol=1e-5, atol=1e-5)


def test_selector_score_opcheck():
    gen = generator(1)
    query = torch.randn(2, 2, 5, 64, generator=gen).bfloat16()
    keys = torch.randn(2, 2, 9, 64, generator=gen).bfloat16()
    visible = random_visible(2, 5, 9, gen)
    torch.library.opcheck(torch.ops.spot.selector_score.default, (query, keys, None, visible, "dense", 1.0, 0.125))
    codes, scales = reference.pack_kcache(keys.float(), "int4")
    torch.library.opcheck(torch.ops.spot.selector_score.default, (query, codes, scales, visible, "int4", 1.0, 0.125))


# --------------------------------------------------------------------------------------------
# select_blocks
# --------------------------------------------------------------------------------------------

KNOBS = [
    # top_p, k_min, k_max, sink, local
    (0.5, 0, 8, 1, 1),
    (0.9, 2, 6, 1, 2),
    (0.99, 0, 40, 0, 0),
    (1.0, 1, 64, 2, 1),
    (0.9, 5, 5, 1, 1),      # k_min == k_max: fixed budget
    (0.5, 12, 30, 0, 3),    # k_min raises the count
    (0.99, 0, 3, 1, 2),     # k_max == sink + local: only forced blocks
    (0.0, 0, 10, 1, 1),     # top_p 0: forced blocks only unless k_min asks for more
]


def random_scores(batch, heads, rows, width, gen, spread=2.0, neg_inf_fraction=0.0):
    scores = torch.randn(batch, heads, rows, width, generator=gen) * spread
    if neg_inf_fraction:
        hole = torch.rand(batch, heads, rows, width, generator=gen) < neg_inf_fraction
        scores = scores.masked_fill(hole, float("-inf"))
    return scores


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "p{}-k{}-{}-s{}-l{}".format(*k))
@pytest.mark.parametrize("width", [1, 7, 33, 129])
def test_select_blocks_cpu_matches_reference(width, knobs):
    top_p, k_min, k_max, sink, local = knobs
    gen = generator(width * 31 + int(top_p * 100) + k_min)
    batch, heads, rows = 2, 3, 5
    scores = random_scores(batch, heads, rows, width, gen, spread=2.5)
    visible = random_visible(batch, rows, width, gen)
    got = spot_attention.select_blocks(scores, visible, top_p, k_min, k_max, sink, local)
    want = reference.select_blocks(scores, visible, top_p, k_min, k_max, sink, local)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


# top_p = 1.0 is left out with zero-probability candidates: whether the float64 running mass of
# the positive ones lands on exactly 1.0 (stop) or just below it (take the zeros too) depends on
# summation rounding, in the reference as in the kernels.
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 0.999])
def test_select_blocks_cpu_with_masked_logits(top_p):
    """-inf logits inside the visible range (probability 0, ranked by index) and all -inf rows."""
    gen = generator(11)
    scores = random_scores(2, 2, 6, 37, gen, neg_inf_fraction=0.4)
    scores[0, 1, 2] = float("-inf")
    visible = random_visible(2, 6, 37, gen)
    for k_min, k_max in ((0, 12), (9, 20), (30, 37)):
        got = spot_attention.select_blocks(scores, visible, top_p, k_min, k_max, 1, 1)
        want = reference.select_blocks(scores, visible, top_p, k_min, k_max, 1, 1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_select_blocks_cpu_equal_logits_break_ties_by_index():
    scores = torch.tensor([[[[1.0, 3.0, 2.0, 3.0, 3.0, 2.0, 0.5, 3.0]]]])
    visible = torch.tensor([[8]], dtype=torch.int32)
    for top_p in (0.3, 0.5, 0.7, 0.95):
        for k_min in (0, 3, 6):
            got = spot_attention.select_blocks(scores, visible, top_p, k_min, 8, 0, 0)
            want = reference.select_blocks(scores, visible, top_p, k_min, 8, 0, 0)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_select_blocks_budget_structure():
    """Counts within [min(k_min, n), k_max] (forced blocks aside), indices ascending and -1 padded,
    forced blocks present."""
    gen = generator(5)
    width = 50
    scores = random_scores(1, 4, 20, width, gen)
    visible = random_visible(1, 20, width, gen)
    indices, counts = spot_attention.select_blocks(scores, visible, 0.8, 4, 12, 2, 2)
    for h in range(4):
        for q in range(20):
            n = int(visible[0, q])
            count = int(counts[0, h, q])
            row = indices[0, h, q]
            assert count <= 12 and count >= min(4, n)
            assert (row[count:] == -1).all()
            chosen = row[:count].tolist()
            assert chosen == sorted(set(chosen)) and all(0 <= j < n for j in chosen)
            forced = set(range(min(2, n))) | set(range(max(n - 2, 0), n))
            assert forced <= set(chosen)


def test_select_blocks_opcheck():
    gen = generator(2)
    scores = random_scores(2, 2, 3, 10, gen)
    visible = random_visible(2, 3, 10, gen)
    torch.library.opcheck(torch.ops.spot.select_blocks.default, (scores, visible, 0.9, 1, 6, 1, 1))


# --------------------------------------------------------------------------------------------
# decode_select
# --------------------------------------------------------------------------------------------


def decode_inputs(batch, heads, width, dim, dtype, fmt, block_size, gen, max_len=None):
    query = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, heads, width, dim, generator=gen).to(dtype)
    max_len = max_len if max_len is not None else (width + 1) * block_size - 1
    seq_lens = torch.randint(0, max_len + 1, (batch,), generator=gen, dtype=torch.int32)
    seq_lens[0] = max_len
    stored, scales, global_scale, dense = pack(keys, fmt)
    return query, stored, scales, global_scale, dense, seq_lens


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("knobs", KNOBS[:4], ids=lambda k: "p{}-k{}-{}-s{}-l{}".format(*k))
def test_decode_select_cpu_matches_reference(knobs, fmt):
    top_p, k_min, k_max, sink, local = knobs
    gen = generator(int(top_p * 100) + len(fmt))
    block_size = 16
    query, stored, scales, global_scale, dense, seq_lens = decode_inputs(5, 3, 23, 64, torch.float32, fmt,
                                                                        block_size, gen)
    # Logits within ~+-10: at top_p = 1.0 no tail probability falls below float64 rounding.
    scale = 64**-0.5 * 1.5
    got = spot_attention.decode_select(query, stored, seq_lens, top_p, k_min, k_max, sink, local, block_size, scale,
                                       key_scales=scales, format=fmt, global_scale=global_scale)
    want = reference.decode_select(query, dense, seq_lens, block_size, scale, top_p, k_min, k_max, sink, local)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


def test_decode_select_cpu_lengths_past_the_cache_and_bf16():
    """seq_len // block_size past the cached blocks: the extra visible blocks have probability 0."""
    gen = generator(9)
    query, keys, _, _, dense, _ = decode_inputs(3, 2, 6, 32, torch.bfloat16, "dense", 64, gen)
    seq_lens = torch.tensor([6 * 64 + 5, 9 * 64, 0], dtype=torch.int32)
    for k_min in (0, 8):
        got = spot_attention.decode_select(query, keys, seq_lens, 0.9, k_min, 10, 1, 1, 64, 0.2)
        want = reference.decode_select(query.float(), dense, seq_lens, 64, 0.2, 0.9, k_min, 10, 1, 1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_decode_select_opcheck():
    gen = generator(4)
    query, stored, scales, global_scale, _, seq_lens = decode_inputs(2, 2, 9, 64, torch.float16, "mxfp4", 32, gen)
    torch.library.opcheck(torch.ops.spot.decode_select.default,
                          (query, stored, scales, seq_lens, 32, "mxfp4", 1.0, 0.125, 0.9, 1, 6, 1, 1))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _select_args():
    gen = generator(0)
    return dict(scores=random_scores(1, 2, 3, 8, gen), num_visible=torch.full((1, 3), 8, dtype=torch.int32),
                top_p=0.9, k_min=1, k_max=4, sink_blocks=1, local_blocks=1)


@pytest.mark.parametrize("change,argument", [
    (dict(scores=torch.zeros(1, 2, 3)), "scores"),
    (dict(scores=torch.zeros(1, 2, 3, 8, dtype=torch.float64)), "scores"),
    (dict(num_visible=torch.full((1, 4), 8, dtype=torch.int32)), "num_visible"),
    (dict(num_visible=torch.full((1, 3), 8, dtype=torch.int64)), "num_visible"),
    (dict(num_visible=torch.full((1, 3), 9, dtype=torch.int32)), "num_visible"),
    (dict(num_visible=torch.full((1, 3), -1, dtype=torch.int32)), "num_visible"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(k_min=5), "k_min"),
    (dict(k_min=-1), "k_min"),
    (dict(k_max=1), "k_max"),
    (dict(sink_blocks=-1), "sink_blocks"),
    (dict(local_blocks=-2), "local_blocks"),
])
def test_select_blocks_validation(change, argument):
    args = {**_select_args(), **change}
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        torch.ops.spot.select_blocks(*args.values())


def _score_args(fmt="dense"):
    gen = generator(0)
    query = torch.randn(1, 2, 3, 64, generator=gen)
    keys = torch.randn(1, 2, 5, 64, generator=gen)
    stored, scales, global_scale, _ = pack(keys, fmt)
    return dict(query=query, keys=stored, key_scales=scales, num_visible=torch.full((1, 3), 5, dtype=torch.int32),
                format=fmt, global_scale=global_scale, softmax_scale=0.125)


@pytest.mark.parametrize("fmt,change,argument", [
    ("dense", dict(query=torch.zeros(1, 2, 64)), "query"),
    ("dense", dict(query=torch.zeros(1, 2, 3, 64, dtype=torch.int32)), "query"),
    ("dense", dict(keys=torch.zeros(1, 2, 5, 32)), "keys"),
    ("dense", dict(keys=torch.zeros(2, 2, 5, 64)), "keys"),
    ("dense", dict(key_scales=torch.zeros(1, 2, 5, 2)), "key_scales"),
    ("dense", dict(format="fp8"), "format"),
    ("dense", dict(num_visible=torch.full((1, 3), 6, dtype=torch.int32)), "num_visible"),
    ("dense", dict(num_visible=torch.full((1, 2), 5, dtype=torch.int32)), "num_visible"),
    ("dense", dict(softmax_scale=0.0), "softmax_scale"),
    ("int4", dict(key_scales=None), "key_scales"),
    ("int4", dict(key_scales=torch.zeros(1, 2, 5, 2, dtype=torch.uint8)), "key_scales"),
    ("mxfp4", dict(key_scales=torch.zeros(1, 2, 5, 4, dtype=torch.uint8)), "key_scales"),
    ("mxfp4", dict(keys=torch.zeros(1, 2, 5, 64, dtype=torch.uint8)), "keys"),
    ("nvfp4", dict(global_scale=0.0), "global_scale"),
    ("int4", dict(query=torch.zeros(1, 2, 3, 48), keys=torch.zeros(1, 2, 5, 24, dtype=torch.uint8)), "query"),
])
def test_selector_score_validation(fmt, change, argument):
    args = {**_score_args(fmt), **change}
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        torch.ops.spot.selector_score(*args.values())


def _decode_args():
    gen = generator(0)
    return dict(query=torch.randn(2, 2, 64, generator=gen), keys=torch.randn(2, 2, 4, 64, generator=gen),
                key_scales=None, seq_lens=torch.tensor([100, 7], dtype=torch.int32), block_size=32, format="dense",
                global_scale=1.0, softmax_scale=0.125, top_p=0.9, k_min=1, k_max=4, sink_blocks=1, local_blocks=1)


@pytest.mark.parametrize("change,argument", [
    (dict(query=torch.zeros(2, 2, 1, 64)), "query"),
    (dict(keys=torch.zeros(2, 3, 4, 64)), "keys"),
    (dict(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), "seq_lens"),
    (dict(seq_lens=torch.tensor([-1, 2], dtype=torch.int32)), "seq_lens"),
    (dict(seq_lens=torch.tensor([1, 2], dtype=torch.int64)), "seq_lens"),
    (dict(block_size=0), "block_size"),
    (dict(top_p=-0.1), "top_p"),
    (dict(k_max=1), "k_max"),
    (dict(format="int4"), "keys"),
])
def test_decode_select_validation(change, argument):
    args = {**_decode_args(), **change}
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        torch.ops.spot.decode_select(*args.values())


# --------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels
# --------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 1, 13, 64), (1, 2, 130, 67, 32), (2, 8, 64, 200, 128), (1, 1, 3, 2048, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_selector_score_cuda_matches_cpu(shape, dtype, fmt):
    batch, heads, rows, width, dim = shape
    gen = generator(sum(shape) + len(fmt))
    query = torch.randn(batch, heads, rows, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, heads, width, dim, generator=gen).to(dtype)
    visible = random_visible(batch, rows, width, gen)
    stored, scales, global_scale, dense = pack(keys, fmt)
    kwargs = dict(format=fmt, global_scale=global_scale)
    want = spot_attention.selector_score(query, stored, visible, 0.125, key_scales=scales, **kwargs)
    got = spot_attention.selector_score(query.cuda(), stored.cuda(), visible.cuda(), 0.125,
                                        key_scales=None if scales is None else scales.cuda(), **kwargs)
    # Same fma order on both devices: equal up to the sign of zero.
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    torch.testing.assert_close(want, reference.selector_score(query, dense, visible, 0.125), rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "p{}-k{}-{}-s{}-l{}".format(*k))
@pytest.mark.parametrize("width", [1, 31, 257, 2048, 5000])
def test_select_blocks_cuda_matches_cpu(width, knobs):
    top_p, k_min, k_max, sink, local = knobs
    gen = generator(width + int(top_p * 1000) + k_max)
    batch, heads, rows = 2, 3, 7 if width < 1000 else 3
    # No zero-probability candidates at top_p = 1.0 (see test_select_blocks_cpu_with_masked_logits).
    scores = random_scores(batch, heads, rows, width, gen, spread=3.0, neg_inf_fraction=0.05 if top_p < 1 else 0.0)
    visible = random_visible(batch, rows, width, gen)
    want = spot_attention.select_blocks(scores, visible, top_p, k_min, k_max, sink, local)
    got = spot_attention.select_blocks(scores.cuda(), visible.cuda(), top_p, k_min, k_max, sink, local)
    assert torch.equal(got[1].cpu(), want[1])
    assert torch.equal(got[0].cpu(), want[0])


@gpu
def test_select_blocks_cuda_ties_and_empty_rows():
    gen = generator(3)
    scores = torch.randint(-3, 3, (2, 2, 9, 300), generator=gen).float()  # many exact ties
    scores[0, 0, 0] = float("-inf")
    scores[1, 1, 4, ::3] = float("-inf")
    visible = random_visible(2, 9, 300, gen)
    for top_p, k_min, k_max in ((0.5, 0, 40), (0.9, 20, 60), (0.999, 0, 300), (0.99, 100, 120)):
        want = spot_attention.select_blocks(scores, visible, top_p, k_min, k_max, 1, 2)
        got = spot_attention.select_blocks(scores.cuda(), visible.cuda(), top_p, k_min, k_max, 1, 2)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        ref = reference.select_blocks(scores, visible, top_p, k_min, k_max, 1, 2)
        assert torch.equal(want[0], ref[0]) and torch.equal(want[1], ref[1])


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# Widths cover every sort size of the CUDA kernel (1 to 16 blocks per thread of 512), the threshold
# search past 8192 blocks, and 1024 blocks, whose dynamic shared memory is under 48 KB but not
# with the static memory added.
@pytest.mark.parametrize("width,dim,heads", [(9, 64, 1), (300, 32, 3), (700, 64, 2), (1024, 64, 8), (2048, 64, 8),
                                             (2100, 128, 2), (5000, 64, 1), (9000, 32, 1)])
def test_decode_select_cuda_matches_cpu(width, dim, heads, dtype, fmt):
    gen = generator(width + dim + len(fmt))
    block_size = 64
    query, stored, scales, global_scale, _, seq_lens = decode_inputs(3, heads, width, dim, dtype, fmt, block_size,
                                                                   gen, max_len=width * block_size + 40)
    seq_lens[1] = 0
    kwargs = dict(key_scales=scales, format=fmt, global_scale=global_scale)
    cuda_kwargs = dict(key_scales=None if scales is None else scales.cuda(), format=fmt, global_scale=global_scale)
    scale = dim**-0.5 * 2
    for top_p, k_min, k_max, sink, local in ((0.5, 2, 64, 1, 2), (0.9, 0, 256, 1, 1), (0.99, 16, 40, 2, 2),
                                             (1.0, 0, width + 1, 0, 1)):
        want = spot_attention.decode_select(query, stored, seq_lens, top_p, k_min, k_max, sink, local, block_size,
                                            scale, **kwargs)
        got = spot_attention.decode_select(query.cuda(), stored.cuda(), seq_lens.cuda(), top_p, k_min, k_max, sink,
                                           local, block_size, scale, **cuda_kwargs)
        assert torch.equal(got[1].cpu(), want[1])
        assert torch.equal(got[0].cpu(), want[0])


@gpu
@pytest.mark.parametrize("k_min,k_max", [(0, 10), (8, 10), (0, 40), (30, 2000)])
def test_decode_select_cuda_lengths_past_the_cache(k_min, k_max):
    """Sequences longer than the cache: the visible blocks past the cached keys have probability
    0 and rank after every cached block, by index; k_max = 2000 takes the threshold search."""
    gen = generator(k_max)
    query, keys, _, _, _, _ = decode_inputs(4, 2, 24, 32, torch.bfloat16, "dense", 64, gen)
    seq_lens = torch.tensor([24 * 64 + 5, 37 * 64, 0, 3000 * 64 + 1], dtype=torch.int32)
    want = spot_attention.decode_select(query, keys, seq_lens, 0.9, k_min, k_max, 1, 2, 64, 0.2)
    got = spot_attention.decode_select(query.cuda(), keys.cuda(), seq_lens.cuda(), 0.9, k_min, k_max, 1, 2, 64, 0.2)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_select_cuda_dense_keys_off_the_16_byte_grid(dtype):
    """Dense rows of 36 values (not whole 16-byte chunks), and keys whose storage starts one
    element off a 16-byte boundary, take the element-by-element scoring path."""
    gen = generator(36)
    query = torch.randn(2, 3, 36, generator=gen).to(dtype)
    keys = torch.randn(2, 3, 200, 36, generator=gen).to(dtype)
    seq_lens = torch.tensor([200 * 16, 77 * 16 + 3], dtype=torch.int32)
    want = spot_attention.decode_select(query, keys, seq_lens, 0.9, 2, 40, 1, 2, 16, 0.2)
    shifted = torch.empty(keys.numel() + 1, dtype=dtype, device="cuda")
    shifted[1:] = keys.flatten().cuda()
    for cuda_keys in (keys.cuda(), shifted[1:].view(keys.shape)):
        got = spot_attention.decode_select(query.cuda(), cuda_keys, seq_lens.cuda(), 0.9, 2, 40, 1, 2, 16, 0.2)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@gpu
@pytest.mark.parametrize("width", [37, 1500, 6000])
def test_decode_select_cuda_ties_break_by_index(width):
    """Keys drawn from four vectors: every logit ties with many others, and the blocks taken at the
    cut must be the lowest-indexed of their tie, as on the CPU. k_max <= 64 over more than 512
    blocks takes the clustered kernel on Hopper, whose CTAs merge their chunks' ordered lists."""
    gen = generator(width)
    dim, heads, block_size = 32, 2, 16
    palette = torch.randn(4, dim, generator=gen)
    keys = palette[torch.randint(0, 4, (2, heads, width), generator=gen)]
    query = torch.randn(2, heads, dim, generator=gen)
    seq_lens = torch.tensor([width * block_size, width * block_size // 2 + 5], dtype=torch.int32)
    for top_p, k_min, k_max in ((0.3, 0, width), (0.7, 3, width // 2 + 1), (0.95, 0, width), (0.5, width // 3, width),
                                (0.95, 2, 64), (0.5, 0, 40)):
        want = spot_attention.decode_select(query, keys, seq_lens, top_p, k_min, k_max, 1, 1, block_size, 0.3)
        got = spot_attention.decode_select(query.cuda(), keys.cuda(), seq_lens.cuda(), top_p, k_min, k_max, 1, 1,
                                           block_size, 0.3)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@gpu
@pytest.mark.parametrize("fmt", ["int4", "dense"])
@pytest.mark.parametrize("batch,heads,width,dim", [(1, 8, 2048, 64), (2, 3, 1500, 32), (1, 1, 4000, 64)])
def test_decode_select_cuda_small_batch_clusters(batch, heads, width, dim, fmt):
    """Few rows of at most 8 x 512 blocks: on an H100 or H200 each row runs as a cluster of 4 or 8
    CTAs of at most 512 blocks each (the decode shapes at batch 1), which sort their chunks and
    merge the ordered lists in the first CTA. Covered: the last visible block unscored
    (probability 0), sinks and local windows across CTA chunks (the short second sequence),
    k_min past the positive probabilities, and logits so spread that most probabilities
    underflow to 0 (those blocks then rank by index)."""
    gen = generator(width + batch)
    block_size = 64
    query, stored, scales, global_scale, _, seq_lens = decode_inputs(batch, heads, width, dim, torch.bfloat16, fmt,
                                                                   block_size, gen, max_len=width * block_size - 9)
    if batch > 1:
        seq_lens[1] = 150 * block_size + 7
    kwargs = dict(key_scales=scales, format=fmt, global_scale=global_scale)
    cuda_kwargs = dict(key_scales=None if scales is None else scales.cuda(), format=fmt, global_scale=global_scale)
    cases = [(0.9, 0, 64, 1, 1, 0.125), (0.5, 8, 40, 2, 3, 0.3), (0.99, 64, 64, 1, 1, 0.125),
             (1.0, 0, 64, 0, 0, 0.125), (0.9, 4, 64, 30, 20, 0.125), (0.9, 4, 128, 60, 60, 0.125),
             (0.9, 60, 64, 1, 1, 400.0), (1.0, 0, 64, 0, 2, 400.0)]
    for top_p, k_min, k_max, sink, local, scale in cases:
        want = spot_attention.decode_select(query, stored, seq_lens, top_p, k_min, k_max, sink, local, block_size,
                                            scale, **kwargs)
        got = spot_attention.decode_select(query.cuda(), stored.cuda(), seq_lens.cuda(), top_p, k_min, k_max, sink,
                                           local, block_size, scale, **cuda_kwargs)
        assert torch.equal(got[1].cpu(), want[1]), (top_p, k_min, k_max, sink, local, scale)
        assert torch.equal(got[0].cpu(), want[0]), (top_p, k_min, k_max, sink, local, scale)


@gpu
def test_decode_select_cuda_graph_capture():
    gen = generator(8)
    query, stored, scales, global_scale, _, seq_lens = decode_inputs(4, 8, 512, 64, torch.bfloat16, "int4", 64, gen)
    query, stored, scales, seq_lens = query.cuda(), stored.cuda(), scales.cuda(), seq_lens.cuda()

    def step():
        return spot_attention.decode_select(query, stored, seq_lens, 0.9, 2, 64, 1, 2, 64, 0.125, key_scales=scales,
                                            format="int4")

    eager = step()
    graph, captured = capture_cuda_graph(step)
    seq_lens.add_(37)  # the graph reads the new lengths
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])
    assert not torch.equal(eager[1], want[1]) or not torch.equal(eager[0], want[0])


@gpu
def test_select_ops_cuda_opcheck():
    gen = generator(6)
    scores = random_scores(2, 2, 3, 10, gen).cuda()
    visible = random_visible(2, 3, 10, gen).cuda()
    torch.library.opcheck(torch.ops.spot.select_blocks.default, (scores, visible, 0.9, 1, 6, 1, 1))
    query = torch.randn(2, 2, 64, generator=gen).cuda()
    keys = torch.randn(2, 2, 9, 64, generator=gen).cuda()
    seq_lens = torch.tensor([600, 64], dtype=torch.int32).cuda()
    torch.library.opcheck(torch.ops.spot.decode_select.default,
                          (query, keys, None, seq_lens, 64, "dense", 1.0, 0.125, 0.9, 1, 6, 1, 1))
