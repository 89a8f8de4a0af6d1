"""spot.sparse_prefill against reference.sparse_prefill (the spec), on CPU and CUDA.

CPU tests check the C++ reference kernel against the float64 spec; GPU tests (``-m gpu``) check
both CUDA implementations (``SPOT_PREFILL_IMPL=mma`` and ``wgmma``) against the CPU kernel, the
dense path against torch SDPA, and that every output element is written.
"""

from __future__ import annotations

import math

import pytest
import torch

import spot_attention
from spot_attention import ops, reference

BLOCK = 64
CUDA_IMPLS = ("mma", "wgmma")

# Tolerances against the float64 spec: half an output ulp plus fp32 accumulation error.
SPEC_TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.2e-2, rtol=1e-2),
}
# Two fp32-accumulating kernels may round one output element to neighbouring 16-bit values.
KERNEL_TOLERANCE = {
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def num_blocks(length: int) -> int:
    return (length + BLOCK - 1) // BLOCK


def make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(heads):
        return torch.randn(total, heads, head_dim, generator=generator).to(dtype).to(device)

    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    return rand(heads_q), rand(heads_kv), rand(heads_kv), cu_seqlens


def random_selection(lengths, heads_kv, density, seed=0, max_selected=None, garbage=False, extra_rows=0):
    """Block lists as select_blocks would give them (sink + local forced, the rest random at
    ``density``), ascending and -1 padded. ``garbage`` shuffles them and adds duplicates,
    negatives, future blocks and the diagonal, all of which the op must ignore or dedupe."""
    generator = torch.Generator().manual_seed(seed + 1000)
    nq = num_blocks(max(lengths)) + extra_rows
    width = max_selected if max_selected is not None else max(nq, 1) + (8 if garbage else 0)
    indices = torch.full((len(lengths), heads_kv, nq, width), -1, dtype=torch.int32)
    counts = torch.zeros((len(lengths), heads_kv, nq), dtype=torch.int32)
    for b, length in enumerate(lengths):
        for g in range(heads_kv):
            for qb in range(num_blocks(length)):
                picks = [j for j in range(qb) if j == 0 or j == qb - 1 or torch.rand((), generator=generator) < density]
                if garbage:
                    picks += [qb, qb + 3, -5, -1]
                    picks += picks[: len(picks) // 2]  # duplicates
                    order = torch.randperm(len(picks), generator=generator).tolist()
                    picks = [picks[i] for i in order]
                picks = picks[:width]
                counts[b, g, qb] = len(picks)
                if picks:
                    indices[b, g, qb, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
                if garbage:  # entries past the count are junk the op must never read
                    junk = torch.randint(0, nq, (width - len(picks),), generator=generator, dtype=torch.int32)
                    indices[b, g, qb, len(picks) :] = junk
            if garbage:  # so are the rows past the sequence's last block
                for qb in range(num_blocks(length), nq):
                    counts[b, g, qb] = width
                    indices[b, g, qb] = torch.randint(0, nq, (width,), generator=generator, dtype=torch.int32)
    return indices, counts


def all_blocks(lengths, heads_kv):
    nq = num_blocks(max(lengths))
    indices = torch.arange(nq, dtype=torch.int32).expand(len(lengths), heads_kv, nq, nq).contiguous()
    counts = torch.arange(nq, dtype=torch.int32).expand(len(lengths), heads_kv, nq).contiguous()
    return indices, counts  # row qb lists blocks 0..qb-1 (its count); the diagonal is implicit


def spec(query, key, value, cu_seqlens, indices, counts, scale):
    out, lse = reference.sparse_prefill(
        query.double().cpu(), key.double().cpu(), value.double().cpu(), cu_seqlens.cpu(), indices.cpu(),
        counts.cpu(), BLOCK, scale,
    )
    return out, lse


def run_op(query, key, value, cu_seqlens, max_seqlen, indices, counts, scale=None):
    return ops.sparse_prefill(
        query, key, value, cu_seqlens, max_seqlen, indices.to(query.device), counts.to(query.device), BLOCK, scale
    )


# --------------------------------------------------------------------------------------------
# CPU kernel against the spec
# --------------------------------------------------------------------------------------------

CPU_CASES = [
    # (lengths, heads_q, heads_kv, head_dim, dtype, density)
    ([1], 2, 2, 64, torch.bfloat16, 0.5),
    ([37, 200, 64], 2, 2, 64, torch.bfloat16, 0.5),
    ([131, 5, 250], 6, 2, 128, torch.float16, 0.3),
    ([257], 8, 1, 64, torch.float32, 0.4),
    ([65, 190], 24, 3, 128, torch.bfloat16, 0.6),
    ([300, 17], 3, 1, 64, torch.float16, 0.25),
    ([129], 4, 4, 128, torch.float32, 0.5),
]


@pytest.mark.parametrize("lengths,heads_q,heads_kv,head_dim,dtype,density", CPU_CASES)
def test_cpu_matches_spec(lengths, heads_q, heads_kv, head_dim, dtype, density):
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=len(lengths) + heads_q)
    indices, counts = random_selection(lengths, heads_kv, density, seed=heads_q)
    scale = head_dim**-0.5
    out, lse = run_op(query, key, value, cu, max(lengths), indices, counts)
    expected_out, expected_lse = spec(query, key, value, cu, indices, counts, scale)
    assert out.dtype == dtype and out.shape == query.shape
    assert lse.dtype == torch.float32 and lse.shape == query.shape[:2]
    torch.testing.assert_close(out.double(), expected_out, **SPEC_TOLERANCE[dtype])
    torch.testing.assert_close(lse.double(), expected_lse.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_messy_lists_match_spec_and_clean_lists(dtype):
    """Shuffled lists with duplicates, negatives, future blocks and the diagonal itself are read
    as the set of valid blocks: same result as the clean ascending list of that set."""
    lengths, heads_q, heads_kv, head_dim = [200, 77, 130], 6, 3, 64
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=3)
    messy_indices, messy_counts = random_selection(lengths, heads_kv, 0.5, seed=5, garbage=True, extra_rows=2)
    clean_indices = torch.full_like(messy_indices, -1)
    clean_counts = torch.zeros_like(messy_counts)
    for b in range(len(lengths)):
        for g in range(heads_kv):
            for qb in range(messy_indices.shape[2]):
                valid = sorted({j for j in messy_indices[b, g, qb, : messy_counts[b, g, qb]].tolist() if 0 <= j < qb})
                clean_counts[b, g, qb] = len(valid)
                if valid:
                    clean_indices[b, g, qb, : len(valid)] = torch.tensor(valid, dtype=torch.int32)
    out, lse = run_op(query, key, value, cu, max(lengths), messy_indices, messy_counts)
    clean_out, clean_lse = run_op(query, key, value, cu, max(lengths), clean_indices, clean_counts)
    assert torch.equal(out, clean_out) and torch.equal(lse, clean_lse)
    expected_out, expected_lse = spec(query, key, value, cu, messy_indices, messy_counts, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected_out, **SPEC_TOLERANCE[dtype])
    torch.testing.assert_close(lse.double(), expected_lse.double(), atol=1e-4, rtol=1e-5)


def test_cpu_counts_out_of_range_are_clamped():
    lengths, heads_kv = [260], 2
    query, key, value, cu = make_inputs(lengths, 4, heads_kv, 64, torch.float32, seed=9)
    indices, counts = random_selection(lengths, heads_kv, 1.0, seed=2, max_selected=6)
    counts[0, 0] = -3
    counts[0, 1] = 100
    out, lse = run_op(query, key, value, cu, 260, indices, counts)
    expected_out, expected_lse = spec(query, key, value, cu, indices, counts, 0.125)
    torch.testing.assert_close(out.double(), expected_out, **SPEC_TOLERANCE[torch.float32])
    torch.testing.assert_close(lse.double(), expected_lse.double(), atol=1e-5, rtol=1e-6)


def test_cpu_diagonal_only_is_blockwise_causal():
    """Counts 0: each query block sees only the causal part of its own block."""
    lengths, heads_q, heads_kv, head_dim = [150, 64, 3], 6, 2, 64
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, torch.float32, seed=11)
    indices = torch.randint(0, 3, (len(lengths), heads_kv, 3, 4), dtype=torch.int32)
    counts = torch.zeros((len(lengths), heads_kv, 3), dtype=torch.int32)
    out, lse = run_op(query, key, value, cu, 150, indices, counts, scale=0.1)
    # Independent check: dense causal attention on every 64-token chunk on its own.
    chunks = []
    for b, length in enumerate(lengths):
        for start in range(0, length, BLOCK):
            chunks.append(min(BLOCK, length - start))
    chunk_cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32)
    expected = reference.dense_causal_attention(query.double(), key.double(), value.double(), chunk_cu, 0.1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype,head_dim,heads_q,heads_kv", [(torch.bfloat16, 128, 8, 1), (torch.float16, 64, 9, 3)])
def test_cpu_all_blocks_is_dense_causal(dtype, head_dim, heads_q, heads_kv):
    lengths = [333, 64, 1, 190]
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=13)
    indices, counts = all_blocks(lengths, heads_kv)
    out, lse = run_op(query, key, value, cu, max(lengths), indices, counts)
    expected = reference.dense_causal_attention(query.double(), key.double(), value.double(), cu, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, **SPEC_TOLERANCE[dtype])
    # lse of dense causal attention, row by row.
    for b in range(len(lengths)):
        start, end = int(cu[b]), int(cu[b + 1])
        q = query[start:end].double().transpose(0, 1)
        k = key[start:end].double().transpose(0, 1).repeat_interleave(heads_q // heads_kv, 0)
        logits = q @ k.transpose(1, 2) * head_dim**-0.5
        mask = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        expected_lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).transpose(0, 1)
        torch.testing.assert_close(lse[start:end].double(), expected_lse, atol=1e-4, rtol=1e-5)


def test_cpu_few_thousand_tokens_is_fast():
    import time

    lengths, heads_q, heads_kv, head_dim = [3000], 4, 2, 128
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, torch.bfloat16, seed=17)
    indices, counts = all_blocks(lengths, heads_kv)
    started = time.perf_counter()
    out, _ = run_op(query, key, value, cu, 3000, indices, counts)
    elapsed = time.perf_counter() - started
    assert elapsed < 20, f"dense 3000-token CPU prefill took {elapsed:.1f} s"
    rows = slice(2900, 3000)  # spot-check the last rows against the spec restricted to them
    q = query[rows].double().transpose(0, 1)
    k = key.double().transpose(0, 1).repeat_interleave(2, 0)
    v = value.double().transpose(0, 1).repeat_interleave(2, 0)
    logits = q @ k.transpose(1, 2) * head_dim**-0.5
    mask = torch.arange(3000)[None, :] <= torch.arange(2900, 3000)[:, None]
    expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out[rows].double(), expected.transpose(0, 1), **SPEC_TOLERANCE[torch.bfloat16])


def test_opcheck():
    lengths = [70, 1, 130]
    query, key, value, cu = make_inputs(lengths, 6, 2, 64, torch.bfloat16, seed=19)
    indices, counts = random_selection(lengths, 2, 0.5, seed=4)
    torch.library.opcheck(
        torch.ops.spot.sparse_prefill.default, (query, key, value, cu, 130, indices, counts, BLOCK, 0.125)
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _valid_args(device="cpu"):
    lengths = [70, 30]
    query, key, value, cu = make_inputs(lengths, 4, 2, 64, torch.bfloat16, device=device, seed=23)
    indices, counts = random_selection(lengths, 2, 0.5, seed=6)
    return dict(query=query, key=key, value=value, cu_seqlens=cu, max_seqlen=70,
                block_indices=indices.to(device), block_counts=counts.to(device), block_size=BLOCK, softmax_scale=0.125)


def _call(args):
    return torch.ops.spot.sparse_prefill(
        args["query"], args["key"], args["value"], args["cu_seqlens"], args["max_seqlen"], args["block_indices"],
        args["block_counts"], args["block_size"], args["softmax_scale"],
    )


BAD_INPUTS = [
    ("query", lambda a: a.update(query=a["query"][0])),
    ("query", lambda a: a.update(query=a["query"].to(torch.int32))),
    ("query", lambda a: a.update(query=a["query"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("key", lambda a: a.update(key=a["key"].half())),
    ("key", lambda a: a.update(key=a["key"][:-1], value=a["value"][:-1])),
    ("key", lambda a: a.update(key=a["key"][:, :, :32], value=a["value"][:, :, :32])),
    ("key", lambda a: a.update(key=a["key"].repeat(1, 3, 1)[:, :3], value=a["value"].repeat(1, 3, 1)[:, :3])),
    ("value", lambda a: a.update(value=a["value"][:, :1])),
    ("value", lambda a: a.update(value=a["value"].float())),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"].long())),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"][:1])),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 30, 20, 100], dtype=torch.int32),
                                      block_indices=a["block_indices"].repeat(2, 1, 1, 1)[:3],
                                      block_counts=a["block_counts"].repeat(2, 1, 1)[:3])),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([1, 70, 100], dtype=torch.int32))),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 70, 99], dtype=torch.int32))),
    ("max_seqlen", lambda a: a.update(max_seqlen=69)),
    ("max_seqlen", lambda a: a.update(max_seqlen=-1)),
    ("block_indices", lambda a: a.update(block_indices=a["block_indices"][:, :, :1].contiguous(),
                                         block_counts=a["block_counts"][:, :, :1].contiguous())),
    ("block_indices", lambda a: a.update(block_indices=a["block_indices"][:1])),
    ("block_indices", lambda a: a.update(block_indices=a["block_indices"].long())),
    ("block_indices", lambda a: a.update(block_indices=a["block_indices"][..., 0])),
    ("block_counts", lambda a: a.update(block_counts=a["block_counts"][:, :1].contiguous())),
    ("block_counts", lambda a: a.update(block_counts=a["block_counts"].float())),
    ("block_size", lambda a: a.update(block_size=0)),
    ("softmax_scale", lambda a: a.update(softmax_scale=float("nan"))),
]


@pytest.mark.parametrize("argument,mutate", BAD_INPUTS)
def test_validation_errors(argument, mutate):
    args = _valid_args()
    _call(args)  # the unmutated inputs are fine
    mutate(args)
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        _call(args)


# --------------------------------------------------------------------------------------------
# CUDA (run on a GPU: pytest tests/test_sparse_prefill.py -m gpu)
# --------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not spot_attention.cuda_available(), reason="needs CUDA and the CUDA build of spot_ops")


@pytest.fixture(params=CUDA_IMPLS + ("auto",))
def cuda_impl(request, monkeypatch):
    """Each CUDA implementation forced, and the default choice (variable unset)."""
    if request.param == "auto":
        monkeypatch.delenv("SPOT_PREFILL_IMPL", raising=False)
    else:
        monkeypatch.setenv("SPOT_PREFILL_IMPL", request.param)
    return request.param


@pytest.fixture(params=["mma", "auto"])
def mma_or_default(request, monkeypatch):
    """Cases the Hopper kernel may decline (block_size 128): the mma kernel forced, and the
    default choice, which must fall back to it."""
    if request.param == "auto":
        monkeypatch.delenv("SPOT_PREFILL_IMPL", raising=False)
    else:
        monkeypatch.setenv("SPOT_PREFILL_IMPL", request.param)
    return request.param


def _poison_allocator(nbytes: int):
    """Fill cached device memory with NaN, so outputs the kernel fails to write stay NaN."""
    block = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del block


GPU_CASES = [
    # (lengths, heads_q, heads_kv, head_dim, dtype, density)
    ([1, 63, 64, 65, 300, 1000], 8, 8, 128, torch.bfloat16, 0.5),
    ([777, 5, 1500], 9, 3, 64, torch.bfloat16, 0.3),
    ([2049, 130], 32, 4, 128, torch.float16, 0.2),
    ([513, 1, 1024], 16, 2, 64, torch.float16, 0.7),
    ([4000], 8, 1, 128, torch.bfloat16, 0.1),
    ([100, 200, 300, 400, 129], 3, 1, 64, torch.bfloat16, 1.0),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lengths,heads_q,heads_kv,head_dim,dtype,density", GPU_CASES)
def test_gpu_matches_cpu(cuda_impl, lengths, heads_q, heads_kv, head_dim, dtype, density):
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=sum(lengths))
    indices, counts = random_selection(lengths, heads_kv, density, seed=heads_q, garbage=density < 0.5)
    expected_out, expected_lse = run_op(query, key, value, cu, max(lengths), indices, counts)
    _poison_allocator(query.numel() * query.element_size() * 4)
    out, lse = run_op(query.cuda(), key.cuda(), value.cuda(), cu.cuda(), max(lengths), indices, counts)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.cpu(), expected_out, **KERNEL_TOLERANCE[dtype])
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,head_dim,heads_q,heads_kv", [
    (torch.bfloat16, 128, 32, 8), (torch.bfloat16, 64, 9, 3), (torch.float16, 128, 8, 1), (torch.float16, 64, 4, 4),
])
def test_gpu_dense_matches_sdpa(cuda_impl, dtype, head_dim, heads_q, heads_kv):
    lengths = [3001, 64, 1, 1234]
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, device="cuda", seed=29)
    indices, counts = all_blocks(lengths, heads_kv)
    _poison_allocator(query.numel() * query.element_size() * 4)
    out, lse = run_op(query, key, value, cu, max(lengths), indices, counts)
    group = heads_q // heads_kv
    for b in range(len(lengths)):
        start, end = int(cu[b]), int(cu[b + 1])
        q = query[start:end].transpose(0, 1).float()[None]
        k = key[start:end].transpose(0, 1).float().repeat_interleave(group, 0)[None]
        v = value[start:end].transpose(0, 1).float().repeat_interleave(group, 0)[None]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end].float(), expected, **KERNEL_TOLERANCE[dtype])
        logits = (q[0] @ k[0].transpose(1, 2)) * head_dim**-0.5
        mask = torch.ones(end - start, end - start, dtype=torch.bool, device="cuda").tril()
        expected_lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).transpose(0, 1)
        torch.testing.assert_close(lse[start:end], expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_long_sparse_sequence(cuda_impl):
    """16K tokens at 5% density: many blocks per list, long skips between chosen blocks."""
    lengths, heads_q, heads_kv, head_dim = [16384 + 37], 4, 1, 128
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, torch.bfloat16, seed=31)
    indices, counts = random_selection(lengths, heads_kv, 0.05, seed=8)
    expected_out, expected_lse = run_op(query, key, value, cu, lengths[0], indices, counts)
    out, lse = run_op(query.cuda(), key.cuda(), value.cuda(), cu.cuda(), lengths[0], indices, counts)
    torch.testing.assert_close(out.cpu(), expected_out, **KERNEL_TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_implementations_agree_and_are_deterministic():
    import os

    lengths = [1000, 333]
    query, key, value, cu = make_inputs(lengths, 8, 2, 128, torch.bfloat16, device="cuda", seed=37)
    indices, counts = random_selection(lengths, 2, 0.4, seed=9)
    results = {}
    previous = os.environ.get("SPOT_PREFILL_IMPL")
    try:
        for impl in CUDA_IMPLS:
            os.environ["SPOT_PREFILL_IMPL"] = impl
            first = run_op(query, key, value, cu, 1000, indices, counts)
            second = run_op(query, key, value, cu, 1000, indices, counts)
            assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
            results[impl] = first
    finally:
        if previous is None:
            os.environ.pop("SPOT_PREFILL_IMPL", None)
        else:
            os.environ["SPOT_PREFILL_IMPL"] = previous
    torch.testing.assert_close(results["mma"][0], results["wgmma"][0], **KERNEL_TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(results["mma"][1], results["wgmma"][1], atol=2e-3, rtol=1e-4)


def selection_for_block_size(lengths, heads_kv, density, block_size, seed=0, max_selected=None):
    """random_selection's clean lists (sink + local + random, ascending) for any block size."""
    generator = torch.Generator().manual_seed(seed + 2000)
    nq = max((length + block_size - 1) // block_size for length in lengths)
    width = max_selected if max_selected is not None else max(nq, 1)
    indices = torch.full((len(lengths), heads_kv, nq, width), -1, dtype=torch.int32)
    counts = torch.zeros((len(lengths), heads_kv, nq), dtype=torch.int32)
    for b, length in enumerate(lengths):
        for g in range(heads_kv):
            for qb in range((length + block_size - 1) // block_size):
                picks = [j for j in range(qb) if j == 0 or j == qb - 1 or torch.rand((), generator=generator) < density]
                picks = picks[:width]
                counts[b, g, qb] = len(picks)
                if picks:
                    indices[b, g, qb, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
    return indices, counts


GPU_EXTRA_CASES = [
    # (lengths, heads_q, heads_kv, head_dim, dtype, density, block_size): G = 1 puts two query
    # blocks (two lists) in one CTA; G = 3 makes CTAs straddle query blocks; 128-token blocks.
    ([1000, 77, 1, 640], 4, 4, 128, torch.float16, 0.3, 64),
    ([1000, 77, 1, 640], 4, 4, 64, torch.bfloat16, 0.0, 64),
    ([901, 64, 33], 6, 2, 64, torch.float16, 1.0, 64),
    ([1100, 129, 5], 8, 8, 128, torch.bfloat16, 0.4, 128),
    ([700, 1, 300], 9, 3, 64, torch.float16, 0.2, 128),
    ([2500], 8, 1, 128, torch.bfloat16, 1.0, 128),
    ([383, 1000], 24, 3, 128, torch.float16, 0.0, 128),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lengths,heads_q,heads_kv,head_dim,dtype,density,block_size", GPU_EXTRA_CASES)
def test_gpu_block_sizes_and_groups_match_cpu(mma_or_default, lengths, heads_q, heads_kv, head_dim, dtype, density,
                                             block_size):
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=sum(lengths) + block_size)
    indices, counts = selection_for_block_size(lengths, heads_kv, density, block_size, seed=heads_q)
    if density == 0.0:  # diagonal only: counts 0 over junk entries
        indices = torch.randint(0, 5, indices.shape, dtype=torch.int32)
        counts.zero_()
    scale = head_dim**-0.5
    expected_out, expected_lse = ops.sparse_prefill(query, key, value, cu, max(lengths), indices, counts, block_size,
                                                    scale)
    _poison_allocator(query.numel() * query.element_size() * 4)
    out, lse = ops.sparse_prefill(query.cuda(), key.cuda(), value.cuda(), cu.cuda(), max(lengths), indices.cuda(),
                                  counts.cuda(), block_size, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.cpu(), expected_out, **KERNEL_TOLERANCE[dtype])
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_lists_longer_than_one_bitmap_chunk(mma_or_default):
    """Past 2048 key blocks the kernel rebuilds its bitmaps chunk by chunk: lists whose entries
    sit on both sides of the boundary, shuffled, with duplicates, and a tiny max_selected."""
    length, heads_q, heads_kv, head_dim = 2048 * BLOCK + 200, 2, 1, 64
    query, key, value, cu = make_inputs([length], heads_q, heads_kv, head_dim, torch.bfloat16, seed=41)
    nq = num_blocks(length)
    generator = torch.Generator().manual_seed(43)
    indices = torch.randint(0, nq, (1, heads_kv, nq, 5), generator=generator, dtype=torch.int32)
    indices[..., 0] = 0
    indices[..., 1] = torch.clamp(torch.arange(nq, dtype=torch.int32) - 1, min=0)
    indices[..., 4] = indices[..., 2]  # duplicate
    counts = torch.full((1, heads_kv, nq), 5, dtype=torch.int32)
    expected_out, expected_lse = run_op(query, key, value, cu, length, indices, counts)
    out, lse = run_op(query.cuda(), key.cuda(), value.cuda(), cu.cuda(), length, indices, counts)
    torch.testing.assert_close(out.cpu(), expected_out, **KERNEL_TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_counts_out_of_range_and_negative_scale(mma_or_default):
    lengths, heads_kv = [700, 260], 2
    query, key, value, cu = make_inputs(lengths, 6, heads_kv, 128, torch.float16, seed=47)
    indices, counts = random_selection(lengths, heads_kv, 1.0, seed=3, max_selected=6)
    counts[0, 0] = -3
    counts[1, 1] = 100
    expected_out, expected_lse = run_op(query, key, value, cu, 700, indices, counts, scale=-0.07)
    out, lse = run_op(query.cuda(), key.cuda(), value.cuda(), cu.cuda(), 700, indices, counts, scale=-0.07)
    torch.testing.assert_close(out.cpu(), expected_out, **KERNEL_TOLERANCE[torch.float16])
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_unknown_impl_is_rejected(monkeypatch):
    monkeypatch.setenv("SPOT_PREFILL_IMPL", "bogus")
    with pytest.raises(Exception, match="SPOT_PREFILL_IMPL"):
        _call(_valid_args("cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("argument,mutate", [
    ("query", lambda a: a.update(query=a["query"].float(), key=a["key"].float(), value=a["value"].float())),
    ("query", lambda a: a.update(query=a["query"][..., :32].contiguous(), key=a["key"][..., :32].contiguous(),
                                 value=a["value"][..., :32].contiguous())),
    ("block_size", lambda a: a.update(block_size=32, block_indices=a["block_indices"].repeat(1, 1, 2, 1),
                                      block_counts=a["block_counts"].repeat(1, 1, 2))),
    ("block_size", lambda a: a.update(block_size=256)),
    ("key", lambda a: a.update(key=a["key"].cpu())),
    ("block_counts", lambda a: a.update(block_counts=a["block_counts"].cpu())),
])
def test_gpu_validation_errors(argument, mutate):
    args = _valid_args("cuda")
    _call(args)
    mutate(args)
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        _call(args)
