"""SparseDecodeStep (selector query -> decode_select -> sparse_decode): eager against the
reference, and its CUDA-graph replay against eager."""

from __future__ import annotations

import pytest
import torch

import spot_attention as sa
from spot_attention import reference
from spot_attention.decode import SparseDecodeStep, topk_blocks

requires_cuda = pytest.mark.skipif(not sa.cuda_available(), reason="needs the CUDA build of spot_ops and a GPU")

BLOCK = 64


def make_inputs(batch, heads_q, heads_kv, dim, rank, max_len, seq_lens, dtype, generator, device="cpu"):
    query = torch.randn(batch, heads_q, dim, generator=generator).to(dtype)
    keys = torch.randn(batch, max_len, heads_kv, dim, generator=generator).to(dtype)
    values = torch.randn(batch, max_len, heads_kv, dim, generator=generator).to(dtype)
    selector_query = torch.randn(batch, heads_kv, rank, generator=generator)
    selector_keys = torch.randn(batch, heads_kv, max_len // BLOCK, rank, generator=generator)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tensors = dict(query=query, keys=keys, values=values, selector_query=selector_query,
                   selector_keys=selector_keys, seq_lens=lens)
    return {name: value.to(device) for name, value in tensors.items()}


def dense_topk(k):
    def select(selector_query, selector_keys, selector_key_scales, seq_lens):
        scores = torch.einsum("bhr,bhkr->bhk", selector_query.float(), selector_keys.float())
        return topk_blocks(scores, seq_lens, BLOCK, k)
    return select


def test_topk_blocks_keeps_sink_local_and_best():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 4.0, -1.0, 9.0, 7.0]]])
    indices, counts = topk_blocks(scores, torch.tensor([5 * BLOCK - 3], dtype=torch.int32), BLOCK, 3)
    # visible blocks 0..4: sink 0 and local 4 forced, then the best of the rest (block 1).
    assert counts.tolist() == [[3]] and indices.tolist() == [[[0, 1, 4]]]
    indices, counts = topk_blocks(scores, torch.tensor([BLOCK + 1], dtype=torch.int32), BLOCK, 3)
    assert counts.tolist() == [[2]] and indices.tolist() == [[[0, 1, -1]]]
    indices, counts = topk_blocks(scores, torch.tensor([0], dtype=torch.int32), BLOCK, 3)
    assert counts.tolist() == [[0]] and indices.tolist() == [[[-1, -1, -1]]]


def test_cpu_step_matches_reference():
    gen = torch.Generator().manual_seed(0)
    t = make_inputs(3, 6, 2, 64, 32, 640, [640, 130, 7], torch.float32, gen)
    step = SparseDecodeStep(heads_q=6, heads_kv=2, head_dim=64, top_p=1.0, k_min=1, k_max=4, select_fn=dense_topk(4))
    out, lse, indices, counts = step.run(t["query"], t["keys"], t["values"], t["seq_lens"], t["selector_keys"],
                                         selector_query=t["selector_query"])
    assert counts.tolist() == [[4, 4], [3, 3], [1, 1]]
    spec_out, spec_lse = reference.sparse_decode(t["query"].double(), t["keys"].double(), t["values"].double(), None,
                                                 t["seq_lens"], indices, counts, BLOCK, 64 ** -0.5)
    torch.testing.assert_close(out.double(), spec_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), spec_lse.double(), atol=2e-5, rtol=2e-5)


def test_step_needs_a_selector_query():
    step = SparseDecodeStep(heads_q=4, heads_kv=2, head_dim=64, top_p=0.9, k_min=1, k_max=4)
    with pytest.raises(ValueError, match="selector"):
        step.selector_query(torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="heads_q"):
        SparseDecodeStep(heads_q=5, heads_kv=2, head_dim=64, top_p=0.9, k_min=1, k_max=4)


def _graph_matches_eager(step, inputs, next_inputs, block_table=None, key_scales=None):
    eager = step.run(inputs["query"], inputs["keys"], inputs["values"], inputs["seq_lens"], inputs["selector_keys"],
                     key_scales, block_table, inputs["selector_query"])
    captured = step.capture(inputs["query"], inputs["keys"], inputs["values"], inputs["seq_lens"],
                            inputs["selector_keys"], key_scales, block_table, inputs["selector_query"])
    # Poison the static outputs: the replay must rewrite every element.
    captured.out.fill_(float("nan"))
    captured.lse.fill_(float("nan"))
    captured.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.block_indices, eager[2]) and torch.equal(captured.block_counts, eager[3])
    assert torch.equal(captured.out, eager[0]) and torch.equal(captured.lse, eager[1])
    # New per-step inputs through the same graph.
    eager = step.run(next_inputs["query"], inputs["keys"], inputs["values"], next_inputs["seq_lens"],
                     inputs["selector_keys"], key_scales, block_table, next_inputs["selector_query"])
    captured.replay(query=next_inputs["query"], seq_lens=next_inputs["seq_lens"],
                    selector_query=next_inputs["selector_query"])
    torch.cuda.synchronize()
    assert torch.equal(captured.block_counts, eager[3])
    assert torch.equal(captured.out, eager[0]) and torch.equal(captured.lse, eager[1])
    return captured


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("heads_q,heads_kv,dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch", [1, 5])
def test_gpu_graph_replay_equals_eager_topk(heads_q, heads_kv, dim, batch):
    gen = torch.Generator().manual_seed(batch * 100 + dim)
    lens = torch.randint(1, 8192, (batch,), generator=gen).tolist()
    inputs = make_inputs(batch, heads_q, heads_kv, dim, 64, 8192, lens, torch.bfloat16, gen, "cuda")
    next_lens = torch.randint(1, 8192, (batch,), generator=gen).tolist()
    next_inputs = make_inputs(batch, heads_q, heads_kv, dim, 64, 64, [1] * batch, torch.bfloat16, gen, "cuda")
    next_inputs["seq_lens"] = torch.tensor(next_lens, dtype=torch.int32, device="cuda")
    step = SparseDecodeStep(heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, top_p=1.0, k_min=1, k_max=16,
                            select_fn=dense_topk(16))
    captured = _graph_matches_eager(step, inputs, next_inputs)
    # And the graph's result is the reference's for the blocks it chose.
    spec_out, spec_lse = reference.sparse_decode(
        next_inputs["query"].cpu().double(), inputs["keys"].cpu().double(), inputs["values"].cpu().double(), None,
        next_inputs["seq_lens"].cpu(), captured.block_indices.cpu(), captured.block_counts.cpu(), BLOCK, dim ** -0.5,
    )
    torch.testing.assert_close(captured.out.cpu().double(), spec_out.double(), atol=1.5e-2, rtol=1.5e-2)
    torch.testing.assert_close(captured.lse.cpu().double(), spec_lse.double(), atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_gpu_graph_replay_equals_eager_decode_select_paged():
    """The default path: packed int4 selector K-cache through spot.decode_select, paged KV."""
    gen = torch.Generator().manual_seed(7)
    batch, heads_q, heads_kv, dim, rank, max_len, page = 3, 32, 8, 128, 64, 4096, 16
    inputs = make_inputs(batch, heads_q, heads_kv, dim, rank, max_len, [4096, 1000, 70], torch.bfloat16, gen, "cuda")
    codes, scales = reference.pack_kcache(inputs["selector_keys"].cpu(), "int4")
    inputs["selector_keys"], key_scales = codes.cuda(), scales.cuda()
    pages_per_seq = max_len // page
    order = torch.randperm(batch * pages_per_seq, generator=gen)
    block_table = order.view(batch, pages_per_seq).to(torch.int32).cuda()
    for name in ("keys", "values"):
        pages = torch.empty(batch * pages_per_seq, page, heads_kv, dim, dtype=torch.bfloat16, device="cuda")
        pages[block_table.view(-1).long()] = inputs[name].view(batch * pages_per_seq, page, heads_kv, dim)
        inputs[name] = pages
    step = SparseDecodeStep(heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, top_p=0.9, k_min=2, k_max=24)
    try:
        step.select(inputs["selector_query"], inputs["selector_keys"], key_scales, inputs["seq_lens"])
    except (RuntimeError, NotImplementedError) as error:
        if "not implemented" in str(error):
            pytest.skip("spot.decode_select has no CUDA kernel in this build")
        raise
    next_inputs = dict(inputs, query=torch.randn_like(inputs["query"]),
                       selector_query=torch.randn_like(inputs["selector_query"]),
                       seq_lens=torch.tensor([3000, 1001, 64], dtype=torch.int32, device="cuda"))
    _graph_matches_eager(step, inputs, next_inputs, block_table, key_scales)
