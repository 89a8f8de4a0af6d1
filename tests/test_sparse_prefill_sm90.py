"""The Hopper (sm_90a, wgmma + TMA) spot.sparse_prefill kernel against the portable CUDA kernel
(``SPOT_PREFILL_IMPL=mma``), the C++ CPU kernel and, for dense selections, torch SDPA.

Every test here needs an sm_90 GPU (``pytest tests/test_sparse_prefill_sm90.py -m gpu``): on other
devices the default dispatch runs the portable kernel, so comparing it with itself would prove
nothing and the tests skip.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import spot_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not spot_attention.cuda_available() or torch.cuda.get_device_capability() != (9, 0),
        reason="needs an sm_90 GPU and the CUDA build of spot_ops",
    ),
]

# Two fp32-accumulating kernels may round one output element to neighbouring 16-bit values, and
# their exp2 / log approximations differ in the last bits.
OUT_TOLERANCE = {
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
LSE_TOLERANCE = dict(atol=1e-3, rtol=1e-4)


@contextlib.contextmanager
def prefill_impl(name: str | None):
    """Runs the block with SPOT_PREFILL_IMPL set to `name` (None: unset, the default dispatch)."""
    previous = os.environ.get("SPOT_PREFILL_IMPL")
    try:
        if name is None:
            os.environ.pop("SPOT_PREFILL_IMPL", None)
        else:
            os.environ["SPOT_PREFILL_IMPL"] = name
        yield
    finally:
        os.environ.pop("SPOT_PREFILL_IMPL", None)
        if previous is not None:
            os.environ["SPOT_PREFILL_IMPL"] = previous


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(heads):
        return torch.randn(total, heads, head_dim, generator=generator).to(dtype)

    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return rand(heads_q), rand(heads_kv), rand(heads_kv), torch.tensor(bounds, dtype=torch.int32)


def make_selection(lengths, heads_kv, block_size, density, seed, messy=False):
    """Block lists: sink and local block forced, the rest chosen at `density` (0: diagonal only,
    1: every block), ascending and -1 padded. `messy` shuffles them and adds duplicates,
    negatives, future blocks and the diagonal, which the op must ignore or dedupe; entries past
    the count and rows past a sequence's last block hold junk the op must never read."""
    generator = torch.Generator().manual_seed(seed + 1000)
    nq = max(num_blocks(max(lengths), block_size), 1)
    width = nq + (8 if messy else 0)
    indices = torch.full((len(lengths), heads_kv, nq, width), -1, dtype=torch.int32)
    counts = torch.zeros((len(lengths), heads_kv, nq), dtype=torch.int32)
    for b, length in enumerate(lengths):
        for g in range(heads_kv):
            for qb in range(num_blocks(length, block_size)):
                if density <= 0:
                    picks = []
                else:
                    picks = [
                        j for j in range(qb)
                        if j == 0 or j == qb - 1 or torch.rand((), generator=generator) < density
                    ]
                if messy:
                    picks += [qb, qb + 3, -5, -1]
                    picks += picks[: len(picks) // 2]
                    order = torch.randperm(len(picks), generator=generator).tolist()
                    picks = [picks[i] for i in order]
                picks = picks[:width]
                counts[b, g, qb] = len(picks)
                if picks:
                    indices[b, g, qb, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
                if messy:
                    indices[b, g, qb, len(picks):] = torch.randint(
                        0, nq, (width - len(picks),), generator=generator, dtype=torch.int32)
            if messy:
                for qb in range(num_blocks(length, block_size), nq):
                    counts[b, g, qb] = width
                    indices[b, g, qb] = torch.randint(0, nq, (width,), generator=generator, dtype=torch.int32)
    return indices, counts


def poison_allocator(nbytes: int):
    """Fills cached device memory with NaN, so outputs the kernel fails to write stay NaN."""
    block = torch.full((nbytes // 4 + 4096,), float("nan"), device="cuda")
    del block


def run_cuda(impl, query, key, value, cu, max_seqlen, indices, counts, block_size, scale):
    args = [t.cuda() for t in (query, key, value, cu)]
    poison_allocator(query.numel() * query.element_size() * 2 + query.shape[0] * query.shape[1] * 4)
    with prefill_impl(impl):
        out, lse = torch.ops.spot.sparse_prefill(
            *args, max_seqlen, indices.cuda(), counts.cuda(), block_size, scale)
    torch.cuda.synchronize()
    return out.cpu(), lse.cpu()


def run_all(query, key, value, cu, lengths, indices, counts, block_size, scale):
    """(sm90 out, lse), (mma out, lse), (cpu out, lse); skips when the entry rejects block_size
    on CUDA (the portable kernel may tile only 64-token blocks)."""
    max_seqlen = max(lengths)
    try:
        sm90 = run_cuda(None, query, key, value, cu, max_seqlen, indices, counts, block_size, scale)
    except (ValueError, RuntimeError) as error:
        if "block_size" in str(error) and block_size != 64:
            pytest.skip(f"block_size {block_size} is not accepted on CUDA by the op entry: {error}")
        raise
    mma = run_cuda("mma", query, key, value, cu, max_seqlen, indices, counts, block_size, scale)
    cpu = torch.ops.spot.sparse_prefill(query, key, value, cu, max_seqlen, indices, counts, block_size, scale)
    return sm90, mma, cpu


def assert_agree(result, expected, dtype):
    out, lse = result
    expected_out, expected_lse = expected
    assert torch.isfinite(out.float()).all(), "output not written (NaN poison left) or not finite"
    assert torch.isfinite(lse).all(), "lse not written (NaN poison left) or not finite"
    torch.testing.assert_close(out.float(), expected_out.float(), **OUT_TOLERANCE[dtype])
    torch.testing.assert_close(lse, expected_lse, **LSE_TOLERANCE)


CASES = [
    # (lengths, heads_q, heads_kv, head_dim, dtype, density, block_size)
    ([1, 63, 64, 65, 300, 1000], 8, 8, 128, torch.bfloat16, 0.5, 64),    # G 1, odd lengths
    ([777, 5, 1500], 9, 3, 64, torch.bfloat16, 0.3, 64),                   # G 3: an idle warpgroup
    ([2049, 130], 32, 4, 128, torch.float16, 0.2, 64),                     # G 8
    ([513, 1, 1024], 16, 2, 64, torch.float16, 0.7, 64),                   # G 8
    ([4000], 8, 1, 128, torch.bfloat16, 0.1, 64),                          # G 8, long list walk
    ([100, 200, 300, 400, 129], 3, 1, 64, torch.bfloat16, 1.0, 64),        # G 3, all blocks
    ([700, 3, 1], 6, 2, 128, torch.bfloat16, 0.0, 64),                     # diagonal only
    ([1, 127, 128, 129, 1000], 8, 8, 128, torch.bfloat16, 0.5, 128),       # 128-token blocks
    ([777, 5, 1500], 9, 3, 64, torch.float16, 0.3, 128),
    ([2049, 130], 32, 4, 128, torch.bfloat16, 1.0, 128),
    ([300, 65], 4, 4, 64, torch.bfloat16, 0.0, 128),
]


@pytest.mark.parametrize("lengths,heads_q,heads_kv,head_dim,dtype,density,block_size", CASES)
def test_sm90_matches_mma_and_cpu(lengths, heads_q, heads_kv, head_dim, dtype, density, block_size):
    seed = sum(lengths) + heads_q + head_dim + block_size
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed)
    indices, counts = make_selection(lengths, heads_kv, block_size, density, seed)
    scale = head_dim ** -0.5
    sm90, mma, cpu = run_all(query, key, value, cu, lengths, indices, counts, block_size, scale)
    assert_agree(sm90, cpu, dtype)
    assert_agree(sm90, mma, dtype)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_messy_lists_match_clean_lists(dtype, block_size):
    lengths = [900, 70, 1300]
    query, key, value, cu = make_inputs(lengths, 12, 4, 128, dtype, seed=5)
    messy_indices, messy_counts = make_selection(lengths, 4, block_size, 0.4, seed=9, messy=True)
    # The clean lists the messy ones mean: the valid entries as an ascending set.
    clean_indices = torch.full_like(messy_indices, -1)
    clean_counts = torch.zeros_like(messy_counts)
    for b, length in enumerate(lengths):
        for g in range(4):
            for qb in range(num_blocks(length, block_size)):
                count = int(messy_counts[b, g, qb])
                kept = sorted({j for j in messy_indices[b, g, qb, :count].tolist() if 0 <= j < qb})
                clean_counts[b, g, qb] = len(kept)
                if kept:
                    clean_indices[b, g, qb, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    scale = 0.1
    messy, _, cpu = run_all(query, key, value, cu, lengths, messy_indices, messy_counts, block_size, scale)
    clean, _, _ = run_all(query, key, value, cu, lengths, clean_indices, clean_counts, block_size, scale)
    assert_agree(messy, cpu, dtype)
    # The same blocks, walked in list order (shuffled here): equal up to summation order.
    assert_agree(messy, clean, dtype)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (32, 8), (24, 3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_all_blocks_is_sdpa_causal(dtype, head_dim, heads_q, heads_kv, block_size):
    lengths = [1500, 1, 2048, 333]
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, seed=head_dim + heads_q)
    indices, counts = make_selection(lengths, heads_kv, block_size, 1.0, seed=3)
    try:
        out, lse = run_cuda(None, query, key, value, cu, max(lengths), indices, counts, block_size, head_dim ** -0.5)
    except (ValueError, RuntimeError) as error:
        if "block_size" in str(error) and block_size != 64:
            pytest.skip(f"block_size {block_size} is not accepted on CUDA by the op entry: {error}")
        raise
    group = heads_q // heads_kv
    bounds = cu.tolist()
    for b in range(len(lengths)):
        start, end = bounds[b], bounds[b + 1]
        q = query[start:end].cuda().transpose(0, 1)
        k = key[start:end].cuda().transpose(0, 1).repeat_interleave(group, 0)
        v = value[start:end].cuda().transpose(0, 1).repeat_interleave(group, 0)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).cpu()
        torch.testing.assert_close(out[start:end].float(), expected.float(), **OUT_TOLERANCE[dtype])
        logits = (q.double() @ k.double().transpose(1, 2)) * head_dim ** -0.5
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device="cuda").tril()
        expected_lse = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1).transpose(0, 1).float().cpu()
        torch.testing.assert_close(lse[start:end], expected_lse, **LSE_TOLERANCE)


def test_sm90_long_dense_sequence_matches_sdpa():
    length, heads_q, heads_kv, head_dim = 16384, 8, 2, 128
    generator = torch.Generator(device="cuda").manual_seed(11)
    query = torch.randn(length, heads_q, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    key = torch.randn(length, heads_kv, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    value = torch.randn(length, heads_kv, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    nq = length // 64
    indices = torch.arange(nq, dtype=torch.int32, device="cuda").expand(1, heads_kv, nq, nq).contiguous()
    counts = torch.arange(nq, dtype=torch.int32, device="cuda").expand(1, heads_kv, nq).contiguous()
    out, _ = torch.ops.spot.sparse_prefill(query, key, value, cu, length, indices, counts, 64, head_dim ** -0.5)
    group = heads_q // heads_kv
    expected = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1).repeat_interleave(group, 0),
        value.transpose(0, 1).repeat_interleave(group, 0), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out.float(), expected.float(), **OUT_TOLERANCE[torch.bfloat16])


def test_sm90_is_deterministic_and_reads_the_lists():
    lengths = [1000, 37]
    query, key, value, cu = make_inputs(lengths, 8, 2, 128, torch.bfloat16, seed=21)
    indices, counts = make_selection(lengths, 2, 64, 0.5, seed=21)
    first = run_cuda(None, query, key, value, cu, 1000, indices, counts, 64, 0.09)
    second = run_cuda(None, query, key, value, cu, 1000, indices, counts, 64, 0.09)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # A different selection must change the output (the lists are really read).
    fewer_counts = torch.minimum(counts, torch.ones_like(counts))
    third = run_cuda(None, query, key, value, cu, 1000, indices, fewer_counts, 64, 0.09)
    assert not torch.equal(first[0], third[0])


def test_unaligned_tensors_are_rejected():
    lengths = [300, 129]
    total, heads_q, heads_kv, head_dim = sum(lengths), 4, 2, 64
    query, key, value, cu = make_inputs(lengths, heads_q, heads_kv, head_dim, torch.bfloat16, seed=8)
    # Contiguous, but 2 bytes past a 16-byte boundary: neither cp.async nor TMA can address it.
    storage = torch.empty(total * heads_q * head_dim + 1, dtype=torch.bfloat16, device="cuda")
    shifted_query = storage[1:].view(total, heads_q, head_dim)
    shifted_query.copy_(query.cuda())
    indices, counts = make_selection(lengths, heads_kv, 64, 0.5, seed=8)
    with pytest.raises(ValueError, match="argument 'query'.*16-byte aligned"):
        torch.ops.spot.sparse_prefill(
            shifted_query, key.cuda(), value.cuda(), cu.cuda(), 300, indices.cuda(), counts.cuda(), 64, 0.125)
