"""spot.sparse_decode against reference.sparse_decode and a float64 softmax.

CPU tests run everywhere; tests marked ``gpu`` need the CUDA build and a device. Every case uses
fresh random data, NaN in every cache entry the op must not read, ragged lengths (shorter than a
block, not multiples of it) and per-(sequence, KV head) block lists of different lengths.
"""

from __future__ import annotations

import math

import pytest
import torch

import spot_attention as sa
from spot_attention import reference
from spot_attention.decode import capture_cuda_graph

requires_cuda = pytest.mark.skipif(not sa.cuda_available(), reason="needs the CUDA build of spot_ops and a GPU")

# Absolute and relative tolerances against a float64 result, per output dtype. The CPU kernel
# only rounds once (fp32 accumulation, one final rounding); the CUDA kernel also rounds the
# softmax weights to the value dtype before the P @ V product.
CPU_TOL = {torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 2e-3), torch.float32: (2e-5, 2e-5)}
GPU_TOL = {torch.bfloat16: (1.5e-2, 1.5e-2), torch.float16: (3e-3, 3e-3)}


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


# --------------------------------------------------------------------------------------------
# Case construction
# --------------------------------------------------------------------------------------------


def choose_blocks(seq_lens, heads_kv, block_size, budget, generator, k_max=None, empty_rows=0):
    """Random ascending block lists per (sequence, KV head).

    budget: "one" (1 block), "some" (random 1..visible), "all" (every visible block) or an int.
    ``empty_rows`` (sequence, head) rows get count 0. Returns (indices, counts) int32, -1 padded.
    """
    batch = len(seq_lens)
    rows = []
    for b in range(batch):
        visible = num_blocks(seq_lens[b], block_size)
        for g in range(heads_kv):
            if visible == 0:
                rows.append([])
                continue
            if budget == "one":
                count = 1
            elif budget == "some":
                count = int(torch.randint(1, visible + 1, (1,), generator=generator))
            elif budget == "all":
                count = visible
            else:
                count = min(int(budget), visible)
            chosen = torch.randperm(visible, generator=generator)[:count].sort().values.tolist()
            rows.append(chosen)
    for r in torch.randperm(len(rows), generator=generator)[:empty_rows].tolist():
        rows[r] = []
    width = max([len(r) for r in rows] + [1]) if k_max is None else k_max
    indices = torch.full((batch, heads_kv, width), -1, dtype=torch.int32)
    counts = torch.zeros((batch, heads_kv), dtype=torch.int32)
    for r, chosen in enumerate(rows):
        b, g = divmod(r, heads_kv)
        counts[b, g] = len(chosen)
        if chosen:
            indices[b, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return indices, counts


def attended_mask(seq_lens, indices, counts, block_size, max_len):
    """bool [B, Hkv, max_len]: tokens the op must read."""
    batch, heads_kv, _ = indices.shape
    mask = torch.zeros(batch, heads_kv, max_len, dtype=torch.bool)
    for b in range(batch):
        for g in range(heads_kv):
            for j in indices[b, g, : int(counts[b, g])].tolist():
                mask[b, g, j * block_size : min((j + 1) * block_size, int(seq_lens[b]))] = True
    return mask


def make_case(batch, heads_q, heads_kv, dim, seq_lens, dtype, budget, block_size=64, generator=None,
              empty_rows=0, k_max=None, extra_len=7):
    """Random query and caches [B, L_max, Hkv, d] with NaN in every token the op must not read."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    max_len = max(seq_lens) + extra_len
    query = torch.randn(batch, heads_q, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, max_len, heads_kv, dim, generator=gen).to(dtype)
    values = torch.randn(batch, max_len, heads_kv, dim, generator=gen).to(dtype)
    indices, counts = choose_blocks(seq_lens, heads_kv, block_size, budget, gen, k_max, empty_rows)
    mask = attended_mask(seq_lens, indices, counts, block_size, max_len)  # [B, Hkv, L]
    poison = ~mask.transpose(1, 2)[..., None]  # [B, L, Hkv, 1]
    keys = keys.masked_fill(poison, float("nan"))
    values = values.masked_fill(poison, float("nan"))
    return {
        "query": query,
        "keys": keys,
        "values": values,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "indices": indices,
        "counts": counts,
        "block_size": block_size,
        "scale": dim**-0.5,
    }


def to_layout(keys, values, layout, page_size=16, generator=None):
    """(key_cache, value_cache, block_table) for contiguous [B, L, Hkv, d] keys and values.

    strided: a [B, L, Hkv, d] view of [B, Hkv, L, d] storage (the Hugging Face cache layout).
    paged: pages [P, page_size, Hkv, d] in shuffled order behind a block table, plus NaN pages
    no sequence owns.
    """
    if layout == "contiguous":
        return keys, values, None
    if layout == "strided":
        return keys.transpose(1, 2).contiguous().transpose(1, 2), values.transpose(1, 2).contiguous().transpose(1, 2), None
    assert layout == "paged"
    gen = generator if generator is not None else torch.Generator().manual_seed(1)
    batch, max_len, heads_kv, dim = keys.shape
    pages_per_seq = num_blocks(max_len, page_size)
    spare = 3
    total = batch * pages_per_seq + spare
    order = torch.randperm(total, generator=gen)
    block_table = order[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
    padded = pages_per_seq * page_size
    key_pages = torch.full((total, page_size, heads_kv, dim), float("nan"), dtype=keys.dtype)
    value_pages = torch.full_like(key_pages, float("nan"))
    key_pad = torch.full((batch, padded, heads_kv, dim), float("nan"), dtype=keys.dtype)
    value_pad = torch.full_like(key_pad, float("nan"))
    key_pad[:, :max_len] = keys
    value_pad[:, :max_len] = values
    flat_table = block_table.view(-1).long()
    key_pages[flat_table] = key_pad.view(batch * pages_per_seq, page_size, heads_kv, dim)
    value_pages[flat_table] = value_pad.view(batch * pages_per_seq, page_size, heads_kv, dim)
    return key_pages, value_pages, block_table


def masked_reference(case, device="cpu"):
    """Float64 block-sparse decode written as a masked dense softmax (fast enough for GPU-sized
    cases); equal to reference.sparse_decode, which test_masked_reference_matches_spec checks."""
    query = case["query"].to(device).double()
    keys, values = case["keys"].to(device).double(), case["values"].to(device).double()
    batch, heads_q, dim = query.shape
    max_len, heads_kv = keys.shape[1], keys.shape[2]
    group = heads_q // heads_kv
    mask = attended_mask(case["seq_lens"], case["indices"], case["counts"], case["block_size"], max_len).to(device)
    token_mask = mask.transpose(1, 2)[..., None]
    keys = keys.masked_fill(~token_mask, 0.0)
    values = values.masked_fill(~token_mask, 0.0)
    q = query.view(batch, heads_kv, group, dim)
    logits = torch.einsum("bgjd,blgd->bgjl", q, keys) * case["scale"]  # [B, Hkv, G, L]
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    weights = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(logits), torch.softmax(logits, -1).nan_to_num(0.0))
    out = torch.einsum("bgjl,blgd->bgjd", weights, values)
    return out.reshape(batch, heads_q, dim), lse.reshape(batch, heads_q)


def dense_attention(case):
    """Float64 softmax over every token < seq_len: what the all-blocks budget must reproduce."""
    query = case["query"].double()
    batch, heads_q, dim = query.shape
    heads_kv = case["keys"].shape[2]
    group = heads_q // heads_kv
    out = torch.zeros(batch, heads_q, dim, dtype=torch.float64)
    lse = torch.full((batch, heads_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        length = int(case["seq_lens"][b])
        if length == 0:
            continue
        keys = case["keys"][b, :length].double().repeat_interleave(group, 1)  # [len, Hq, d]
        values = case["values"][b, :length].double().repeat_interleave(group, 1)
        logits = torch.einsum("hd,lhd->hl", query[b], keys) * case["scale"]
        lse[b] = torch.logsumexp(logits, -1)
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(logits, -1), values)
    return out, lse


def run_op(case, layout="contiguous", page_size=16, device="cpu"):
    key_cache, value_cache, block_table = to_layout(case["keys"], case["values"], layout, page_size)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return sa.sparse_decode(
        move(case["query"]), move(key_cache), move(value_cache), move(case["seq_lens"]), move(case["indices"]),
        move(case["counts"]), block_size=case["block_size"], softmax_scale=case["scale"],
        block_table=move(block_table),
    )


def assert_matches(out, lse, expected_out, expected_lse, dtype, tolerances):
    atol, rtol = tolerances[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    empty = torch.isinf(expected_lse)
    assert torch.equal(torch.isinf(lse.cpu()) & (lse.cpu() < 0), empty.cpu()), "rows without tokens must have lse -inf"
    torch.testing.assert_close(out.cpu().double(), expected_out.cpu(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().double()[~empty.cpu()], expected_lse.cpu()[~empty.cpu()], atol=1e-3, rtol=1e-4)
    assert torch.all(out.cpu()[empty.cpu()] == 0), "rows without tokens must be zero"


# --------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 128])
def test_cpu_matches_reference(dtype, heads_q, heads_kv, dim):
    gen = torch.Generator().manual_seed(heads_q * 1000 + dim + int(dtype.itemsize))
    case = make_case(3, heads_q, heads_kv, dim, [200, 37, 129], dtype, "some", generator=gen, empty_rows=1)
    out, lse = run_op(case)
    key_cache, value_cache, _ = to_layout(case["keys"], case["values"], "contiguous")
    spec_out, spec_lse = reference.sparse_decode(
        case["query"].double(), key_cache.double(), value_cache.double(), None, case["seq_lens"], case["indices"],
        case["counts"], case["block_size"], case["scale"],
    )
    assert_matches(out, lse, spec_out, spec_lse.double(), dtype, CPU_TOL)


@pytest.mark.parametrize("layout,page_size", [("strided", 0), ("paged", 16), ("paged", 32), ("paged", 64)])
@pytest.mark.parametrize("budget", ["one", "some", "all"])
def test_cpu_layouts(layout, page_size, budget):
    gen = torch.Generator().manual_seed(7 + page_size)
    case = make_case(3, 6, 2, 64, [150, 20, 64], torch.bfloat16, budget, generator=gen, extra_len=40)
    out, lse = run_op(case, layout, page_size)
    key_cache, value_cache, block_table = to_layout(case["keys"], case["values"], layout, page_size)
    spec_out, spec_lse = reference.sparse_decode(
        case["query"].double(), key_cache.double(), value_cache.double(), block_table, case["seq_lens"],
        case["indices"], case["counts"], case["block_size"], case["scale"],
    )
    assert_matches(out, lse, spec_out, spec_lse.double(), torch.bfloat16, CPU_TOL)


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("heads_q,heads_kv", [(3, 1), (8, 8), (16, 2)])
def test_cpu_all_blocks_equal_dense(block_size, heads_q, heads_kv):
    gen = torch.Generator().manual_seed(block_size + heads_q)
    lengths = [1, block_size - 1, 3 * block_size + 5, 300]
    case = make_case(4, heads_q, heads_kv, 64, lengths, torch.bfloat16, "all", block_size, gen)
    out, lse = run_op(case)
    dense_out, dense_lse = dense_attention(case)
    assert_matches(out, lse, dense_out, dense_lse, torch.bfloat16, CPU_TOL)


def test_cpu_head_dim_256_and_budget_ladder():
    gen = torch.Generator().manual_seed(3)
    for budget in [1, 2, 5]:
        case = make_case(2, 4, 2, 256, [330, 100], torch.float16, budget, generator=gen)
        out, lse = run_op(case)
        expected = masked_reference(case)
        assert_matches(out, lse, *expected, torch.float16, CPU_TOL)


def test_cpu_empty_rows_and_zero_length():
    gen = torch.Generator().manual_seed(11)
    case = make_case(3, 4, 2, 64, [0, 70, 5], torch.bfloat16, "all", generator=gen, empty_rows=2, k_max=4)
    out, lse = run_op(case)
    expected_out, expected_lse = masked_reference(case)
    assert torch.isinf(expected_lse).any() and not torch.isinf(expected_lse).all()
    assert_matches(out, lse, expected_out, expected_lse, torch.bfloat16, CPU_TOL)
    assert torch.all(lse[0] == float("-inf")) and torch.all(out[0] == 0)


def test_cpu_no_selected_width():
    gen = torch.Generator().manual_seed(12)
    case = make_case(2, 4, 2, 64, [10, 90], torch.bfloat16, "one", generator=gen)
    case["indices"] = torch.empty(2, 2, 0, dtype=torch.int32)
    case["counts"] = torch.zeros(2, 2, dtype=torch.int32)
    case["keys"] = torch.randn_like(case["keys"].float()).to(torch.bfloat16)
    case["values"] = torch.randn_like(case["keys"].float()).to(torch.bfloat16)
    out, lse = run_op(case)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_masked_reference_matches_spec():
    gen = torch.Generator().manual_seed(5)
    case = make_case(3, 6, 3, 64, [100, 64, 7], torch.float32, "some", 32, gen, empty_rows=1)
    spec = reference.sparse_decode(
        case["query"].double(), case["keys"].double(), case["values"].double(), None, case["seq_lens"],
        case["indices"], case["counts"], case["block_size"], case["scale"],
    )
    mine = masked_reference(case)
    torch.testing.assert_close(mine[0], spec[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(mine[1], spec[1].double(), atol=1e-6, rtol=1e-6)


def test_cpu_duplicate_entries_count_twice_like_the_spec():
    gen = torch.Generator().manual_seed(6)
    case = make_case(1, 2, 1, 64, [130], torch.float32, "all", generator=gen)
    case["indices"] = torch.tensor([[[0, 0, 2]]], dtype=torch.int32)
    case["counts"] = torch.tensor([[3]], dtype=torch.int32)
    case["keys"] = torch.randn(case["keys"].shape, generator=gen)
    case["values"] = torch.randn(case["values"].shape, generator=gen)
    out, lse = run_op(case)
    spec = reference.sparse_decode(case["query"], case["keys"], case["values"], None, case["seq_lens"],
                                   case["indices"], case["counts"], 64, case["scale"])
    assert_matches(out, lse, spec[0].double(), spec[1].double(), torch.float32, CPU_TOL)


def _opcheck_args(layout):
    gen = torch.Generator().manual_seed(9)
    case = make_case(2, 4, 2, 64, [70, 33], torch.bfloat16, "some", generator=gen)
    key_cache, value_cache, block_table = to_layout(case["keys"], case["values"], layout, 16)
    return (case["query"], key_cache, value_cache, block_table, case["seq_lens"], case["indices"], case["counts"],
            case["block_size"], case["scale"])


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_cpu_opcheck(layout):
    torch.library.opcheck(torch.ops.spot.sparse_decode.default, _opcheck_args(layout))


def _valid_args(device="cpu"):
    gen = torch.Generator().manual_seed(10)
    case = make_case(2, 4, 2, 64, [70, 33], torch.bfloat16, "some", generator=gen)
    case["keys"] = case["keys"].nan_to_num(0.5)
    case["values"] = case["values"].nan_to_num(0.5)
    args = {
        "query": case["query"], "key_cache": case["keys"], "value_cache": case["values"], "block_table": None,
        "seq_lens": case["seq_lens"], "block_indices": case["indices"], "block_counts": case["counts"],
        "block_size": 64, "softmax_scale": 0.125,
    }
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _paged_args(device="cpu"):
    args = _valid_args(device)
    key_cache, value_cache, block_table = to_layout(args["key_cache"].cpu(), args["value_cache"].cpu(), "paged", 16)
    args.update(key_cache=key_cache.to(device), value_cache=value_cache.to(device), block_table=block_table.to(device))
    return args


def _call(args):
    return torch.ops.spot.sparse_decode(
        args["query"], args["key_cache"], args["value_cache"], args["block_table"], args["seq_lens"],
        args["block_indices"], args["block_counts"], args["block_size"], args["softmax_scale"],
    )


def _bad_inputs(device):
    """(argument name, args) pairs, each with one bad input."""
    cases = []

    def bad(name, paged=False, **changes):
        args = _paged_args(device) if paged else _valid_args(device)
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        cases.append((name, args))

    bad("query", query=lambda a: a["query"][0])
    bad("query", query=lambda a: a["query"].to(torch.int32))
    bad("query", query=lambda a: a["query"].transpose(0, 1))
    bad("query", query=lambda a: a["query"][..., :32].contiguous(), key_cache=lambda a: a["key_cache"][..., :32],
        value_cache=lambda a: a["value_cache"][..., :32])
    bad("key_cache", key_cache=lambda a: a["key_cache"].half())
    bad("key_cache", key_cache=lambda a: a["key_cache"][:, :, :1].expand(-1, -1, 3, -1))
    bad("key_cache", key_cache=lambda a: a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3))
    bad("key_cache", key_cache=lambda a: a["key_cache"][:1])
    bad("key_cache", key_cache=lambda a: a["key_cache"][..., :32])
    bad("value_cache", value_cache=lambda a: a["value_cache"][:, :-1])
    bad("seq_lens", seq_lens=lambda a: a["seq_lens"].long())
    bad("seq_lens", seq_lens=lambda a: a["seq_lens"][:1])
    bad("block_indices", block_indices=lambda a: a["block_indices"][:, :1].contiguous())
    bad("block_indices", block_indices=lambda a: a["block_indices"].long())
    bad("block_counts", block_counts=lambda a: a["block_counts"][:, :1].contiguous())
    bad("block_table", paged=True, block_table=lambda a: a["block_table"].long())
    bad("block_table", paged=True, block_table=lambda a: a["block_table"][:1])
    bad("key_cache", paged=True, block_size=24)
    bad("block_size", block_size=0)
    bad("softmax_scale", softmax_scale=float("nan"))
    return cases


def _bad_contents():
    """Data-dependent errors the CPU kernel raises (CUDA skips such entries instead)."""
    cases = []

    def bad(name, paged=False, **changes):
        args = _paged_args() if paged else _valid_args()
        for key, value in changes.items():
            args[key] = value(args)
        cases.append((name, args))

    def set_entry(key, index, value):
        def change(args):
            tensor = args[key].clone()
            tensor[index] = value
            return tensor
        return change

    bad("seq_lens", seq_lens=set_entry("seq_lens", 0, 10_000))
    bad("seq_lens", seq_lens=set_entry("seq_lens", 1, -1))
    bad("block_counts", block_counts=set_entry("block_counts", (0, 1), 99))
    bad("block_counts", block_counts=set_entry("block_counts", (1, 0), -2))
    bad("block_indices", block_counts=set_entry("block_counts", (0, 0), 1),
        block_indices=set_entry("block_indices", (0, 0, 0), 2))  # seq_len 70 has 2 blocks
    bad("block_indices", block_counts=set_entry("block_counts", (1, 1), 1),
        block_indices=set_entry("block_indices", (1, 1, 0), -1))
    bad("block_table", paged=True, block_table=set_entry("block_table", (0, 0), 10_000))
    bad("block_table", paged=True, block_table=set_entry("block_table", (1, 2), -5))  # page 2 holds tokens 32..
    return cases


@pytest.mark.parametrize("case_index", range(len(_bad_inputs("cpu"))))
def test_cpu_validation(case_index):
    name, args = _bad_inputs("cpu")[case_index]
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        _call(args)


@pytest.mark.parametrize("case_index", range(len(_bad_contents())))
def test_cpu_content_validation(case_index):
    name, args = _bad_contents()[case_index]
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        _call(args)


def test_cpu_valid_args_pass():
    out, lse = _call(_valid_args())
    assert torch.isfinite(out.float()).all()
    out, lse = _call(_paged_args())
    assert torch.isfinite(out.float()).all()


def test_cpu_unused_block_table_entries_are_not_checked():
    args = _paged_args()
    table = args["block_table"].clone()
    table[1, 3:] = -7  # sequence 1 has 33 tokens: pages 0..2 only
    args["block_table"] = table
    out, _ = _call(args)
    assert torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------------------------
# CUDA (run by `pytest -m gpu` on a machine with a GPU)
# --------------------------------------------------------------------------------------------


def _poison_allocator(*shapes):
    """Fill freed blocks of the CUDA caching allocator with NaN so unwritten outputs show up."""
    blocks = [torch.full(shape, float("nan"), device="cuda") for shape in shapes]
    del blocks


def run_gpu(case, layout="contiguous", page_size=16):
    batch, heads_q, dim = case["query"].shape
    _poison_allocator((batch, heads_q, dim), (batch, heads_q), (batch, heads_q, 64, dim), (batch, heads_q, 64))
    out, lse = run_op(case, layout, page_size, device="cuda")
    torch.cuda.synchronize()
    return out, lse


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (9, 3), (32, 8), (40, 2)])
@pytest.mark.parametrize("budget", ["one", "some", "all"])
def test_gpu_matches_reference(dtype, dim, heads_q, heads_kv, budget):
    gen = torch.Generator().manual_seed(dim + heads_q + len(budget))
    lengths = [1, 63, 64, 65, 1000, 4099]
    case = make_case(len(lengths), heads_q, heads_kv, dim, lengths, dtype, budget, generator=gen, empty_rows=2)
    out, lse = run_gpu(case)
    expected = masked_reference(case, "cuda")
    assert_matches(out, lse, *expected, dtype, GPU_TOL)
    cpu_out, cpu_lse = run_op(case)
    assert_matches(out, lse, cpu_out.double(), cpu_lse.double(), dtype, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layout,page_size", [("strided", 0), ("paged", 16), ("paged", 32), ("paged", 64)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_gpu_layouts(layout, page_size, block_size):
    gen = torch.Generator().manual_seed(page_size + block_size)
    lengths = [5, 700, 3000]
    case = make_case(3, 32, 8, 128, lengths, torch.bfloat16, "some", block_size, gen, extra_len=50)
    out, lse = run_gpu(case, layout, page_size)
    assert_matches(out, lse, *masked_reference(case, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("block_size", [16, 32, 64, 80, 128])
@pytest.mark.parametrize("heads_q,heads_kv,dim", [(32, 8, 128), (9, 3, 64), (8, 1, 256)])
def test_gpu_all_blocks_equal_dense(block_size, heads_q, heads_kv, dim):
    gen = torch.Generator().manual_seed(block_size * 3 + dim)
    lengths = [3, block_size + 1, 2048, 6000]
    case = make_case(4, heads_q, heads_kv, dim, lengths, torch.bfloat16, "all", block_size, gen)
    out, lse = run_gpu(case)
    assert_matches(out, lse, *dense_attention(case), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch,budget", [(1, "all"), (2, 3), (8, "some"), (80, 2), (80, "one"), (130, "some")])
def test_gpu_split_planner_shapes(batch, budget):
    """Few long rows (many splits) through many short rows (one split, direct output)."""
    gen = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 3000 if batch > 8 else 20000, (batch,), generator=gen).tolist()
    case = make_case(batch, 32, 8, 128, lengths, torch.bfloat16, budget, generator=gen, empty_rows=3)
    out, lse = run_gpu(case, "paged", 32)
    assert_matches(out, lse, *masked_reference(case, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("merge", ["cluster", "workspace"])
@pytest.mark.parametrize("splits", [2, 5, 16, 33])
@pytest.mark.parametrize("heads_q,heads_kv,dim", [(32, 8, 128), (40, 2, 64)])
def test_gpu_split_merges(monkeypatch, merge, splits, heads_q, heads_kv, dim):
    """Forced split counts through both merges: a thread-block cluster (Hopper, up to 16 splits;
    more fall back to the workspace) and the merge kernel, with splits left empty by short rows."""
    monkeypatch.setenv("SPOT_DECODE_SPLITS", str(splits))
    monkeypatch.setenv("SPOT_DECODE_CLUSTER", "1" if merge == "cluster" else "0")
    gen = torch.Generator().manual_seed(splits * 7 + dim)
    case = make_case(3, heads_q, heads_kv, dim, [4097, 130, 9000], torch.bfloat16, "some", generator=gen,
                     empty_rows=1)
    out, lse = run_gpu(case)
    assert_matches(out, lse, *masked_reference(case, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
def test_gpu_long_chosen_lists():
    """Chosen lists of 750 and 563 blocks (16-token blocks), all of them: must equal dense attention."""
    gen = torch.Generator().manual_seed(47)
    case = make_case(2, 8, 2, 128, [12000, 9001], torch.bfloat16, "all", 16, generator=gen)
    assert case["counts"].max().item() > 512
    out, lse = run_gpu(case)
    assert_matches(out, lse, *dense_attention(case), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
def test_gpu_skips_out_of_range_entries():
    gen = torch.Generator().manual_seed(21)
    case = make_case(3, 8, 2, 128, [300, 130, 64], torch.bfloat16, "all", generator=gen, k_max=7)
    valid = {key: value for key, value in case.items()}
    indices, counts = case["indices"].clone(), case["counts"].clone()
    # Entries past each row's count, negative and too-large indices, and a count past k_max.
    indices[0, 0, counts[0, 0]] = 99
    counts[0, 0] += 1
    indices[1, 1, counts[1, 1]] = -3
    counts[1, 1] += 1
    indices[2, 0, 1] = 1  # seq_len 64: only block 0 exists
    counts[2, 0] = 2
    counts[2, 1] = 50
    case["indices"], case["counts"] = indices, counts
    out, lse = run_gpu(case)
    assert_matches(out, lse, *masked_reference(valid, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay():
    """Capture once, then replay with new queries, block lists and lengths in the same buffers."""
    gen = torch.Generator().manual_seed(31)
    first = make_case(3, 32, 8, 128, [3000, 77, 1024], torch.bfloat16, 8, generator=gen, k_max=8)
    second = make_case(3, 32, 8, 128, [2000, 500, 1030], torch.bfloat16, 8, generator=gen, k_max=8, extra_len=1007)
    keys_cpu, values_cpu = first["keys"].nan_to_num(0.25), first["values"].nan_to_num(-0.5)
    for case in (first, second):
        case["keys"], case["values"] = keys_cpu, values_cpu
    keys, values = keys_cpu.cuda(), values_cpu.cuda()
    static = {name: first[name].cuda() for name in ("query", "seq_lens", "indices", "counts")}

    def step():
        return sa.sparse_decode(static["query"], keys, values, static["seq_lens"], static["indices"],
                                static["counts"], block_size=64, softmax_scale=first["scale"])

    graph, (out, lse) = capture_cuda_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, lse, *masked_reference(first, "cuda"), torch.bfloat16, GPU_TOL)
    for name in static:
        static[name].copy_(second[name].cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, lse, *masked_reference(second, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gpu_opcheck(layout):
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(layout))
    torch.library.opcheck(torch.ops.spot.sparse_decode.default, args)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case_index", range(len(_bad_inputs("cpu"))))
def test_gpu_validation(case_index):
    name, args = _bad_inputs("cuda")[case_index]
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        _call(args)


@pytest.mark.gpu
@requires_cuda
def test_gpu_rejects_float32_and_misaligned_caches():
    args = _valid_args("cuda")
    float_args = dict(args, query=args["query"].float(), key_cache=args["key_cache"].float(),
                      value_cache=args["value_cache"].float())
    with pytest.raises(ValueError, match="argument 'query'"):
        _call(float_args)
    storage = torch.zeros(args["key_cache"].numel() + 1, dtype=torch.bfloat16, device="cuda")
    shifted = storage[1:].view(args["key_cache"].shape)
    with pytest.raises(ValueError, match="argument 'key_cache'"):
        _call(dict(args, key_cache=shifted))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads_q,heads_kv", [(8, 8), (9, 3), (16, 2)])  # groups 1, 3, 8
@pytest.mark.parametrize("layout,page_size", [("contiguous", 0), ("strided", 0), ("paged", 16), ("paged", 64)])
def test_gpu_groups_layouts_dtypes(dtype, dim, heads_q, heads_kv, layout, page_size):
    gen = torch.Generator().manual_seed(dim * 7 + heads_q * 3 + page_size + int(dtype.itemsize))
    lengths = [1, 129, 777, 2050, 63]
    case = make_case(len(lengths), heads_q, heads_kv, dim, lengths, dtype, "some", generator=gen, empty_rows=1)
    out, lse = run_gpu(case, layout, page_size or 16)
    assert_matches(out, lse, *masked_reference(case, "cuda"), dtype, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("heads_q,heads_kv,dim", [(32, 8, 128), (9, 3, 64)])
def test_gpu_budget_ladder_long_sequences(heads_q, heads_kv, dim):
    """1 block through every block of a 20K-token sequence (split path: few rows, many blocks),
    and a sharp softmax (logits std ~4) so the running max and rescaling are exercised."""
    gen = torch.Generator().manual_seed(heads_q + dim)
    lengths = [20_000, 3_333]
    visible = num_blocks(20_000, 64)
    for budget in [1, 3, 17, visible // 10, visible // 3, "all"]:
        case = make_case(2, heads_q, heads_kv, dim, lengths, torch.bfloat16, budget, generator=gen)
        case["query"] = (case["query"].float() * 4).to(torch.bfloat16)
        for layout in ("contiguous", "paged"):
            out, lse = run_gpu(case, layout, 32)
            assert_matches(out, lse, *masked_reference(case, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batch", [1, 4, 96])
def test_gpu_all_blocks_equal_torch_sdpa(batch):
    """Every block chosen == dense SDPA over the first seq_len tokens (bf16 tolerance), through
    the split path (batch 1, 4) and the direct path (batch 96)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(batch)
    heads_q, heads_kv, dim = 32, 8, 128
    lengths = torch.randint(1, 9000 if batch < 8 else 1500, (batch,), generator=gen).tolist()
    lengths[0] = 8191 if batch < 8 else 1499
    case = make_case(batch, heads_q, heads_kv, dim, lengths, torch.bfloat16, "all", generator=gen)
    case["keys"], case["values"] = case["keys"].nan_to_num(0.0), case["values"].nan_to_num(0.0)
    out, lse = run_gpu(case)
    query, keys, values = case["query"].cuda(), case["keys"].cuda(), case["values"].cuda()
    for b, length in enumerate(lengths):
        k = keys[b, :length].transpose(0, 1)[None]  # [1, Hkv, L, d]
        v = values[b, :length].transpose(0, 1)[None]
        expected = F.scaled_dot_product_attention(query[b][None, :, None], k, v, scale=case["scale"],
                                                  enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[b].float(), expected.float(), atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.gpu
@requires_cuda
def test_gpu_seq_lens_clamped_to_cache():
    """seq_lens past L_max (contiguous) or past the block table (paged) read only what exists."""
    gen = torch.Generator().manual_seed(41)
    case = make_case(2, 8, 2, 128, [300, 90], torch.bfloat16, "all", generator=gen, extra_len=0)
    max_len = case["keys"].shape[1]
    clamped = dict(case)
    too_long = dict(case, seq_lens=torch.tensor([max_len + 500, 90], dtype=torch.int32))
    out, lse = run_gpu(too_long)
    assert_matches(out, lse, *masked_reference(clamped, "cuda"), torch.bfloat16, GPU_TOL)


@pytest.mark.gpu
@requires_cuda
def test_gpu_every_output_written_repeatedly():
    """Fresh NaN-poisoned outputs on every call, and identical results call to call (no stale
    state in the split workspace)."""
    gen = torch.Generator().manual_seed(42)
    case = make_case(3, 24, 8, 64, [5000, 64, 1], torch.float16, "some", generator=gen, empty_rows=2)
    first = run_gpu(case, "paged", 64)
    for _ in range(3):
        again = run_gpu(case, "paged", 64)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert_matches(*first, *masked_reference(case, "cuda"), torch.float16, GPU_TOL)
