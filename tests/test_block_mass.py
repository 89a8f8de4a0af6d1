"""spot.block_mass (the distillation teacher) against reference.block_mass, on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

import spot_attention
from spot_attention import reference

_needs_cuda = pytest.mark.skipif(not spot_attention.cuda_available(), reason="needs CUDA and the CUDA build of spot_ops")


def gpu(test):
    """Marks a test `gpu` (selectable with -m gpu) and skips it without CUDA."""
    return pytest.mark.gpu(_needs_cuda(test))


def make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, device="cpu", seed=0, spread=1.0, pad_rows=0):
    """Packed varlen query/key with fresh random values; `pad_rows` unused rows after the batch."""
    generator = torch.Generator().manual_seed(seed)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    total = bounds[-1] + pad_rows
    query = (torch.randn(total, heads_q, head_dim, generator=generator) * spread).to(dtype)
    key = (torch.randn(total, heads_kv, head_dim, generator=generator) * spread).to(dtype)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    return query.to(device), key.to(device), cu_seqlens.to(device)


def num_blocks(length, block):
    return (length + block - 1) // block


def check_structure(mass, lengths, block_size_q, block_size_k):
    """Rows of existing query blocks sum to 1; everything outside a sequence or causal range is 0."""
    mass = mass.double().cpu()
    for b, length in enumerate(lengths):
        nq = num_blocks(length, block_size_q)
        sums = mass[b, :, :nq].sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=2e-5)
        assert (mass[b, :, nq:] == 0).all()
        for qb in range(nq):
            last_token = min((qb + 1) * block_size_q, length) - 1
            assert (mass[b, :, qb, last_token // block_size_k + 1 :] == 0).all()
        assert (mass[b] >= 0).all()


# --------------------------------------------------------------------------------------------
# CPU kernel against the reference
# --------------------------------------------------------------------------------------------

CPU_CASES = [
    # lengths (ragged, odd, shorter than a block, empty), heads_q, heads_kv, head_dim
    ((37, 100, 5), 3, 1, 64),
    ((130, 0, 70), 9, 3, 64),
    ((61, 9), 8, 1, 128),
    ((90,), 16, 2, 128),
    ((45, 33), 6, 2, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size_q,block_size_k", [(1, 16), (16, 64), (64, 16), (64, 64), (7, 20)])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"L{'-'.join(map(str, c[0]))}-h{c[1]}x{c[2]}-d{c[3]}")
def test_cpu_matches_reference(case, block_size_q, block_size_k, dtype):
    lengths, heads_q, heads_kv, head_dim = case
    query, key, cu_seqlens = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, pad_rows=3)
    max_seqlen = max(lengths) + 11  # room past the longest sequence stays zero
    scale = head_dim**-0.5
    got = spot_attention.block_mass(query, key, cu_seqlens, max_seqlen, block_size_q, block_size_k, scale)
    want = reference.block_mass(query, key, cu_seqlens, block_size_q, block_size_k, scale, max_seqlen)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    check_structure(got, lengths, block_size_q, block_size_k)


@pytest.mark.parametrize("block_size_q,block_size_k", [(1, 64), (64, 64), (256, 256)])
def test_cpu_peaked_logits(block_size_q, block_size_k):
    """Large logits (sharp softmax, many exp underflows) stay exact."""
    query, key, cu_seqlens = make_inputs((300, 77), 4, 2, 64, torch.float32, seed=3, spread=2.0)
    got = spot_attention.block_mass(query, key, cu_seqlens, 300, block_size_q, block_size_k, 1.0)
    want = reference.block_mass(query, key, cu_seqlens, block_size_q, block_size_k, 1.0, 300)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    check_structure(got, (300, 77), block_size_q, block_size_k)


def test_cpu_per_token_rows_are_softmax_mass():
    """block_size_q = 1 with one head per group: each row is one query's softmax, summed per block."""
    query, key, cu_seqlens = make_inputs((50,), 2, 2, 64, torch.float32, seed=5)
    got = spot_attention.block_mass(query, key, cu_seqlens, 50, 1, 16, 0.125)
    logits = torch.einsum("thd,shd->hts", query.double(), key.double()) * 0.125
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    prob = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    want = torch.nn.functional.pad(prob, (0, 14)).view(2, 50, 4, 16).sum(-1)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-7)


def test_cpu_empty_batch_and_zero_max_seqlen():
    query, key, _ = make_inputs((4,), 2, 1, 64, torch.float32)
    out = spot_attention.block_mass(query, key, torch.zeros(1, dtype=torch.int32), 0, 64, 64)
    assert out.shape == (0, 1, 0, 0)
    out = spot_attention.block_mass(query, key, torch.zeros(3, dtype=torch.int32), 0, 64, 64)
    assert out.shape == (2, 1, 0, 0)


def test_opcheck_cpu():
    query, key, cu_seqlens = make_inputs((21, 40), 6, 2, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.spot.block_mass.default, (query, key, cu_seqlens, 40, 16, 16, 0.125))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _good_args(device="cpu"):
    query, key, cu_seqlens = make_inputs((20, 12), 4, 2, 64, torch.bfloat16, device=device)
    return dict(query=query, key=key, cu_seqlens=cu_seqlens, max_seqlen=20, block_size_q=16, block_size_k=16,
                softmax_scale=0.125)


def _call(args):
    return torch.ops.spot.block_mass(
        args["query"], args["key"], args["cu_seqlens"], args["max_seqlen"], args["block_size_q"],
        args["block_size_k"], args["softmax_scale"],
    )


def _bad_inputs(device):
    good = _good_args(device)
    q, k, cu = good["query"], good["key"], good["cu_seqlens"]
    cases = [
        ("query", dict(query=q[0])),
        ("query", dict(query=q.to(torch.int32), key=k.to(torch.int32))),
        ("query", dict(query=q.transpose(0, 1).contiguous().transpose(0, 1))),
        ("key", dict(key=k.float())),
        ("key", dict(key=k[:-1])),
        ("key", dict(key=k[..., :32].contiguous())),
        ("key", dict(key=torch.cat([k, k[:, :1]], 1))),
        ("key", dict(key=k.transpose(0, 1).contiguous().transpose(0, 1))),
        ("cu_seqlens", dict(cu_seqlens=cu.long())),
        ("cu_seqlens", dict(cu_seqlens=cu[None])),
        ("cu_seqlens", dict(cu_seqlens=cu.flip(0).contiguous())),
        ("cu_seqlens", dict(cu_seqlens=cu + 1)),
        ("cu_seqlens", dict(cu_seqlens=cu - 1)),
        ("max_seqlen", dict(max_seqlen=19)),
        ("max_seqlen", dict(max_seqlen=-1)),
        ("block_size_q", dict(block_size_q=0)),
        ("block_size_q", dict(block_size_q=257)),
        ("block_size_k", dict(block_size_k=8)),
        ("block_size_k", dict(block_size_k=512)),
        ("softmax_scale", dict(softmax_scale=0.0)),
        ("softmax_scale", dict(softmax_scale=float("nan"))),
    ]
    return good, cases


@pytest.mark.parametrize("index", range(21))
def test_validation_cpu(index):
    good, cases = _bad_inputs("cpu")
    argument, change = cases[index]
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        _call({**good, **change})


def test_validation_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    good = _good_args()
    with pytest.raises(ValueError, match="argument 'key'"):
        _call({**good, "key": good["key"].cuda()})


# --------------------------------------------------------------------------------------------
# CUDA kernel against the CPU kernel
# --------------------------------------------------------------------------------------------


def assert_relative_close(got, want, rtol=2e-3, atol=2e-6):
    got, want = got.double().cpu(), want.double().cpu()
    excess = (got - want).abs() - (atol + rtol * want.abs())
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (
        f"max excess {excess.max().item():.3g} at flat index {worst}: got {got.flatten()[worst].item():.6g}, "
        f"want {want.flatten()[worst].item():.6g}"
    )


GPU_CASES = [
    # lengths, heads_q, heads_kv, head_dim
    ((1000, 37, 5, 260), 3, 1, 64),
    ((517, 130), 9, 3, 64),
    ((700, 64, 1), 32, 4, 128),
    ((333, 2), 8, 1, 128),
    ((301, 47), 4, 4, 256),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "block_size_q,block_size_k",
    [(1, 16), (16, 64), (64, 32), (64, 64), (128, 64), (64, 128), (128, 128), (48, 256), (256, 64), (5, 16)],
)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"L{'-'.join(map(str, c[0]))}-h{c[1]}x{c[2]}-d{c[3]}")
def test_gpu_matches_cpu(case, block_size_q, block_size_k, dtype):
    lengths, heads_q, heads_kv, head_dim = case
    query, key, cu_seqlens = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=11, pad_rows=5)
    max_seqlen = max(lengths) + 70
    scale = head_dim**-0.5
    want = spot_attention.block_mass(query, key, cu_seqlens, max_seqlen, block_size_q, block_size_k, scale)
    got = spot_attention.block_mass(
        query.cuda(), key.cuda(), cu_seqlens.cuda(), max_seqlen, block_size_q, block_size_k, scale
    )
    assert got.is_cuda and got.shape == want.shape and got.dtype == torch.float32
    assert_relative_close(got, want)
    check_structure(got, lengths, block_size_q, block_size_k)


@gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_peaked_logits(head_dim):
    lengths = (777, 129)
    query, key, cu_seqlens = make_inputs(lengths, 8, 2, head_dim, torch.bfloat16, seed=13, spread=2.0)
    want = spot_attention.block_mass(query, key, cu_seqlens, 777, 64, 64, 1.0)
    got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), 777, 64, 64, 1.0)
    assert_relative_close(got, want)
    check_structure(got, lengths, 64, 64)


@gpu
def test_gpu_long_sequence_matches_cpu():
    """Many query tiles and key tiles per CTA; per-token targets at a few thousand tokens."""
    lengths = (4099, 1500)
    query, key, cu_seqlens = make_inputs(lengths, 6, 2, 64, torch.bfloat16, seed=17)
    for block_size_q, block_size_k in ((64, 64), (1, 128)):
        want = spot_attention.block_mass(query, key, cu_seqlens, 4099, block_size_q, block_size_k, 0.125)
        got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), 4099, block_size_q,
                                        block_size_k, 0.125)
        assert_relative_close(got, want)


@gpu
def test_gpu_matches_reference_directly():
    query, key, cu_seqlens = make_inputs((190, 66), 8, 1, 128, torch.bfloat16, seed=19)
    want = reference.block_mass(query, key, cu_seqlens, 16, 32, 0.1, 190)
    got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), 190, 16, 32, 0.1)
    assert_relative_close(got, want)


@gpu
def test_opcheck_gpu():
    query, key, cu_seqlens = make_inputs((129, 40), 6, 2, 128, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.spot.block_mass.default, (query, key, cu_seqlens, 129, 64, 64, 0.125))


@gpu
@pytest.mark.parametrize("index", range(21))
def test_validation_gpu(index):
    good, cases = _bad_inputs("cuda")
    argument, change = cases[index]
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        _call({**good, **change})


@gpu
def test_validation_gpu_only_limits():
    good = _good_args("cuda")
    with pytest.raises(ValueError, match="argument 'block_size_k'"):
        _call({**good, "block_size_k": 48})
    with pytest.raises(ValueError, match="argument 'query'"):
        _call({**good, "query": good["query"].float(), "key": good["key"].float()})
    query, key, cu_seqlens = make_inputs((20, 12), 4, 2, 96, torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="argument 'query'"):
        _call({**good, "query": query, "key": key})


def make_peaky_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed):
    """Realistic attention statistics: unit-variance queries and keys at the usual 1/sqrt(d) scale,
    plus a few large-norm keys per sequence (sink-like) and a shared direction that some queries
    align with, so some rows are nearly one-hot and others spread over many blocks."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    query = torch.randn(total, heads_q, head_dim, generator=generator, dtype=torch.float64)
    key = torch.randn(total, heads_kv, head_dim, generator=generator, dtype=torch.float64)
    direction = torch.randn(head_dim, generator=generator, dtype=torch.float64)
    direction /= direction.norm()
    start = 0
    for length in lengths:
        if length:
            # Token 0 (a sink) and a few random tokens get keys 6-12x their usual norm along `direction`.
            chosen = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(0, length, (3,), generator=generator)])
            boost = 6 + 6 * torch.rand(len(chosen), heads_kv, 1, generator=generator, dtype=torch.float64)
            key[start + chosen] += boost * direction * head_dim**0.5
        start += length
    aligned = torch.rand(total, heads_q, generator=generator) < 0.3
    query[aligned] += 2 * direction
    bounds = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return query.to(dtype), key.to(dtype), bounds


PEAKY_CASES = [
    # lengths (odd, ragged, shorter than a block, single token), heads_q, heads_kv, head_dim
    ((611, 1, 45), 8, 8, 64),   # G = 1
    ((389, 130), 9, 3, 64),     # G = 3
    ((257, 63, 300), 24, 3, 128),  # G = 8
    ((500,), 32, 8, 128),       # qwen3-8b heads
]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size_q,block_size_k", [(64, 64), (128, 64), (64, 128), (1, 64), (16, 16)])
@pytest.mark.parametrize("case", PEAKY_CASES, ids=lambda c: f"L{'-'.join(map(str, c[0]))}-h{c[1]}x{c[2]}-d{c[3]}")
def test_gpu_peaky_matches_float64_reference(case, block_size_q, block_size_k, dtype):
    lengths, heads_q, heads_kv, head_dim = case
    query, key, cu_seqlens = make_peaky_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=23)
    max_seqlen = max(lengths)
    scale = head_dim**-0.5
    want = reference.block_mass(query, key, cu_seqlens, block_size_q, block_size_k, scale, max_seqlen)
    got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), max_seqlen, block_size_q,
                                    block_size_k, scale)
    assert_relative_close(got, want)
    check_structure(got, lengths, block_size_q, block_size_k)


@gpu
def test_gpu_per_token_rows_are_softmax_mass():
    """block_size_q = 1, one head per group: each row is one query's causal softmax summed per key block."""
    query, key, cu_seqlens = make_peaky_inputs((300,), 2, 2, 128, torch.bfloat16, seed=29)
    got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), 300, 1, 32, 0.09)
    logits = torch.einsum("thd,shd->hts", query.double(), key.double()) * 0.09
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    prob = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    want = torch.nn.functional.pad(prob, (0, 20)).view(2, 300, 10, 32).sum(-1)
    assert_relative_close(got[0], want)


@gpu
def test_gpu_sequence_shorter_than_one_block_and_empty_sequences():
    lengths = (0, 3, 0, 17, 1)
    query, key, cu_seqlens = make_inputs(lengths, 6, 2, 64, torch.bfloat16, seed=31, spread=1.5)
    want = reference.block_mass(query, key, cu_seqlens, 64, 64, 0.125, 40)
    got = spot_attention.block_mass(query.cuda(), key.cuda(), cu_seqlens.cuda(), 40, 64, 64, 0.125)
    assert_relative_close(got, want)
    check_structure(got, lengths, 64, 64)


@gpu
def test_gpu_offset_sequences_and_trailing_rows():
    """cu_seqlens need not start at 0 or cover every row; rows outside are never read into the result."""
    query, key, _ = make_inputs((400,), 4, 2, 128, torch.float16, seed=37)
    cu_seqlens = torch.tensor([7, 200, 333], dtype=torch.int32)
    want = reference.block_mass(query, key, cu_seqlens, 64, 64, 0.1, 193)
    poisoned_query = query.clone()
    poisoned_query[:7] = float("nan")
    poisoned_query[333:] = float("nan")
    poisoned_key = key.clone()
    poisoned_key[:7] = float("nan")
    poisoned_key[333:] = float("nan")
    got = spot_attention.block_mass(poisoned_query.cuda(), poisoned_key.cuda(), cu_seqlens.cuda(), 193, 64, 64, 0.1)
    assert_relative_close(got, want)
    check_structure(got, (193, 133), 64, 64)
