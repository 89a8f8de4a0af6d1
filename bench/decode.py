"""Decode attention benchmark: dense SDPA (FlashAttention and cuDNN backends), the SpotAttention
decode step and its parts, and Quest-/Twilight-style selection feeding the same sparse kernel,
against the device's copy bandwidth.

    python bench/decode.py            # full sweep (18 s on an H200)
    python bench/decode.py --quick    # a few configurations (well under a minute)

Writes bench/results/decode_<device>.json, .md and .png (<device>: the GPU model, ``h100`` on an
H100; ``--tag`` overrides it). Every time is the median over ``--iters`` runs of CUDA-event-timed calls
after warm-up, with the L2 cache emptied before every timed call by reading 256 MB (``--l2-flush
write`` zeroes them instead, which leaves dirty lines for the timed call to write back), so no
method reads its working set from L2. A configuration that does not fit in memory is skipped and
recorded as such.

Per-layer times (``timing: "layers"``, ``--graph-layers N``, at the sweep's longest length): each
method runs for N layers back to back inside one CUDA graph, every layer with its own KV cache,
selector cache and query, and the replay's median time is divided by N. A decoder replays one
graph per step for all its layers, so this is what a layer costs there; a single call
(``timing: "single"``) also pays one launch's fixed cost, which at B = 1 is a large part of a
sparse step. The L2 is flushed before each replay and no layer reads another's inputs.

Bytes moved: what each method must read from HBM at least (KV rows of the attended tokens,
selector cache or block metadata, candidate keys); ``bw_frac`` = bytes / time / copy bandwidth,
where the copy bandwidth is a device-to-device copy of 1 GiB counted as read + write. A copy of
fewer bytes pays the same launch and ramp as any kernel and reaches less of that bandwidth, so the
sparse rows timed singly also get ``copy_frac``: the time of a device copy moving the same bytes
(half read, half written; one call, L2 flushed, like the row) over the row's time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from benchlib import ROOT, device_tag, git_commit, import_spot_attention, time_us

sa = import_spot_attention()
from spot_attention import reference  # noqa: E402
from spot_attention.decode import SparseDecodeStep, capture_cuda_graph, topk_blocks  # noqa: E402

BLOCK = 64
SINK, LOCAL = 1, 2
SHAPES = {
    # name: (heads_q, heads_kv, head_dim, selector rank)
    "qwen3-8b": (32, 8, 128, 64),
    "smollm2": (9, 3, 64, 64),
}
FULL_LENGTHS = [16384, 32768, 65536, 131072]
FULL_BATCHES = [1, 8, 32]
FULL_BUDGETS = ["1%", "3%", "10%", 4096]
QUICK_LENGTHS = [32768, 131072]
QUICK_BATCHES = [1, 8]
QUICK_BUDGETS = ["3%", 4096]
TWILIGHT_CANDIDATES = 4  # Quest pre-selects this many times the budget, exact q.k prunes by top-p
TWILIGHT_TOP_P = 0.95


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timer:
    """``l2_flush="read"`` (the default) empties the L2 by reading 256 MB, leaving only clean lines;
    ``"write"`` zeroes the 256 MB, which leaves the L2 full of dirty lines that the timed call then
    writes back to HBM (on an H200, sparse_decode at B = 8 took 2.2 us more per layer of a 4-layer
    graph) - a cost of the benchmark, not of the method."""

    def __init__(self, warmup: int, iters: int, device, l2_flush: str = "read") -> None:
        if l2_flush not in ("read", "write"):
            raise ValueError(f"l2_flush must be 'read' or 'write', got {l2_flush!r}")
        self.warmup, self.iters, self.l2_flush = warmup, iters, l2_flush
        self.flush_buffer = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)
        self.flush_sink = torch.empty((), dtype=torch.float32, device=device)

    def flush(self) -> None:
        if self.l2_flush == "read":
            torch.sum(self.flush_buffer, dim=0, out=self.flush_sink)
        else:
            self.flush_buffer.zero_()

    def __call__(self, fn) -> float:
        """Median microseconds of ``fn()`` with a cold L2."""
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for i in range(self.iters):
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000.0


def read_bandwidth_gbps(device) -> float:
    """torch summing 1 GiB of float32: bytes read per second (GB/s), recorded beside the copy
    bandwidth that bw_frac divides by (a kernel that only reads can pass a bw_frac of 1)."""
    source = torch.ones(1 << 28, dtype=torch.float32, device=device)
    total = torch.empty((), dtype=torch.float32, device=device)
    us = time_us(lambda: torch.sum(source, dim=0, out=total))
    del source
    torch.cuda.empty_cache()
    return (1 << 30) / (us * 1e-6) / 1e9


def copy_bandwidth_gbps(device) -> float:
    """Device-to-device copy of 1 GiB, read + write bytes per second (GB/s)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    us = time_us(lambda: target.copy_(source))
    del source, target
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


# --------------------------------------------------------------------------------------------
# Baseline selections in plain torch (capturable: no host syncs)
# --------------------------------------------------------------------------------------------


def quest_scores(query, key_min, key_max, seq_lens, scale):
    """Quest bound sum_c max(q_c min_c, q_c max_c) per block, softmaxed over visible blocks and
    averaged over the group's heads. query [B, Hq, d]; bounds [B, Hkv, NK, d] -> [B, Hkv, NK]."""
    batch, heads_q, dim = query.shape
    heads_kv, num_blocks = key_min.shape[1], key_min.shape[2]
    q = query.view(batch, heads_kv, heads_q // heads_kv, dim)
    bound = (torch.matmul(q.clamp(min=0), key_max.transpose(-1, -2))
             + torch.matmul(q.clamp(max=0), key_min.transpose(-1, -2))).float() * scale  # [B, Hkv, G, NK]
    visible = (seq_lens.long() + BLOCK - 1) // BLOCK
    column = torch.arange(num_blocks, device=query.device)
    bound = bound.masked_fill((column[None, :] >= visible[:, None])[:, None, None], float("-inf"))
    return torch.softmax(bound, -1).mean(2)


def quest_select(query, key_min, key_max, seq_lens, scale, budget_blocks):
    scores = quest_scores(query, key_min, key_max, seq_lens, scale)
    return topk_blocks(scores, seq_lens, BLOCK, budget_blocks, SINK, LOCAL)


def twilight_select(query, key_blocks, key_min, key_max, seq_lens, scale, budget_blocks):
    """Quest pre-selects TWILIGHT_CANDIDATES x budget blocks; exact q.k over their tokens gives
    each candidate's attention mass (group-averaged); the fewest candidates reaching
    TWILIGHT_TOP_P are kept, at most the budget. key_blocks [B, Hkv, NK, BLOCK, d]."""
    batch, heads_q, dim = query.shape
    heads_kv, num_blocks = key_min.shape[1], key_min.shape[2]
    group = heads_q // heads_kv
    candidates, candidate_counts = quest_select(query, key_min, key_max, seq_lens, scale,
                                                min(num_blocks, TWILIGHT_CANDIDATES * budget_blocks))
    num_candidates = candidates.shape[-1]
    valid_candidate = torch.arange(num_candidates, device=query.device)[None, None] < candidate_counts[..., None]
    safe = candidates.clamp(min=0).long()
    gathered = torch.gather(key_blocks, 2, safe[..., None, None].expand(-1, -1, -1, BLOCK, dim))  # [B,Hkv,C,BLOCK,d]
    q = query.view(batch, heads_kv, group, dim)
    logits = torch.einsum("bhgd,bhctd->bhgct", q, gathered).float() * scale  # [B, Hkv, G, C, BLOCK]
    token = safe[..., None] * BLOCK + torch.arange(BLOCK, device=query.device)  # [B, Hkv, C, BLOCK]
    valid = (token < seq_lens.long()[:, None, None, None]) & valid_candidate[..., None]
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    weights = torch.softmax(logits.flatten(-2), -1).view_as(logits).nan_to_num(0.0)
    mass = weights.sum(-1).mean(2)  # [B, Hkv, C]
    order = torch.sort(mass, -1, descending=True)
    cumulative = order.values.cumsum(-1)
    keep = (cumulative - order.values < TWILIGHT_TOP_P).sum(-1)  # fewest reaching top_p
    counts = torch.minimum(keep, candidate_counts.long()).clamp(max=budget_blocks)  # capturable: no host tensor
    counts = counts.clamp(min=1) * (candidate_counts > 0)
    chosen = torch.gather(candidates, -1, order.indices)[..., :budget_blocks]
    return chosen.contiguous(), counts.to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


def kv_read_bytes(batch: int, heads_kv: int, tokens: int, dim: int) -> int:
    """K and V rows (bf16) of `tokens` tokens for every sequence and KV head."""
    return 2 * batch * heads_kv * tokens * dim * 2


def selection_read_bytes(codes, key_scales, key_min, num_blocks: int, blocks: int) -> dict[str, int]:
    """What each selection reads besides the attended KV: the packed selector cache (spot), the
    per-block key bounds (quest), and the bounds plus the candidates' keys (twilight)."""
    batch, heads_kv, _, dim = key_min.shape
    bounds = 2 * key_min.numel() * key_min.element_size()
    candidate_tokens = min(num_blocks, TWILIGHT_CANDIDATES * blocks) * BLOCK
    return {"spot": codes.numel() + key_scales.numel() * key_scales.element_size(), "quest": bounds,
            "twilight": bounds + kv_read_bytes(batch, heads_kv, candidate_tokens, dim) // 2}


def budget_blocks(budget, length: int) -> int:
    visible = math.ceil(length / BLOCK)
    if isinstance(budget, str):
        blocks = math.ceil(visible * float(budget.rstrip("%")) / 100.0)
    else:
        blocks = math.ceil(budget / BLOCK)
    return max(SINK + LOCAL + 1, min(blocks, visible))


def run_config(shape_name, length, batch, budgets, timer, device, rows, log):
    heads_q, heads_kv, dim, rank = SHAPES[shape_name]
    group = heads_q // heads_kv
    scale = dim ** -0.5
    num_blocks = math.ceil(length / BLOCK)
    kv_bytes = kv_read_bytes(batch, heads_kv, length, dim)

    def add(method, budget_tokens, us, nbytes):
        rows.append({"shape": shape_name, "L": length, "B": batch, "budget_tokens": int(budget_tokens),
                     "method": method, "timing": "single", "us": round(us, 2), "bytes": int(nbytes)})
        log(f"  {shape_name:9s} L={length:6d} B={batch:2d} budget={budget_tokens:6d} {method:18s} {us:9.1f} us")

    def attempt(method, budget_tokens, fn, nbytes) -> bool:
        try:
            add(method, budget_tokens, timer(fn), nbytes)
            return True
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log(f"  {method}: out of memory, skipped")
        except Exception as error:  # a missing kernel or backend: record and go on
            log(f"  {method}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
        return False

    generator = torch.Generator(device=device).manual_seed(length + batch)
    # KV in the [B, Hkv, L, d] layout SDPA wants; spot reads the [B, L, Hkv, d] view of it.
    keys = torch.randn(batch, heads_kv, length, dim, device=device, dtype=torch.bfloat16, generator=generator)
    values = torch.randn(batch, heads_kv, length, dim, device=device, dtype=torch.bfloat16, generator=generator)
    query = torch.randn(batch, heads_q, dim, device=device, dtype=torch.bfloat16, generator=generator)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    key_cache, value_cache = keys.transpose(1, 2), values.transpose(1, 2)

    # Dense baselines. GQA through enable_gqa where the backend takes it, else expanded KV
    # (built outside the timed call: the bytes read are the same, the memory is not).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query_4d = query[:, :, None]
    for method, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        dense_keys, dense_values, gqa = keys, values, True
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(query_4d, keys, values, scale=scale, enable_gqa=True)
        except RuntimeError:
            gqa = False
            try:
                dense_keys, dense_values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log(f"  {method}: no GQA support and no memory for expanded KV, skipped")
                continue

        def dense(backend=backend, dense_keys=dense_keys, dense_values=dense_values, gqa=gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(query_4d, dense_keys, dense_values, scale=scale, enable_gqa=gqa)

        attempt(method, length, dense, kv_bytes)
        del dense_keys, dense_values

    # Spot selector K-cache: int4 codes + fp16 scales, one r-dim key per complete block.
    selector_query = torch.randn(batch, heads_kv, rank, device=device, generator=generator)
    selector_keys = torch.randn(batch, heads_kv, max(num_blocks, 1), rank, device=device, generator=generator)
    try:
        codes, key_scales = sa.pack_kcache(selector_keys, "int4")
    except Exception:  # no kernel for the device: the readable specification packs the same bytes
        codes, key_scales = reference.pack_kcache(selector_keys.cpu(), "int4")
        codes, key_scales = codes.to(device), key_scales.to(device)
    num_visible = torch.full((batch, 1), num_blocks, dtype=torch.int32, device=device)

    # Quest metadata: per-block channel min / max of the keys.
    assert length % BLOCK == 0, "the sweep's lengths are whole blocks"
    key_blocks = keys.view(batch, heads_kv, num_blocks, BLOCK, dim)
    key_min, key_max = key_blocks.amin(3), key_blocks.amax(3)

    for budget in budgets:
        blocks = budget_blocks(budget, length)
        tokens = blocks * BLOCK
        attend_bytes = kv_read_bytes(batch, heads_kv, min(tokens, length), dim)
        selection_bytes = selection_read_bytes(codes, key_scales, key_min, num_blocks, blocks)
        selector_bytes = selection_bytes["spot"]
        step = SparseDecodeStep(heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, top_p=0.9, k_min=blocks,
                                k_max=blocks, block_size=BLOCK, sink_blocks=SINK, local_blocks=LOCAL,
                                kcache_format="int4")

        def spot_step():
            return step.run(query, key_cache, value_cache, seq_lens, codes, key_scales, None, selector_query)

        def spot_select():
            return step.select(selector_query, codes, key_scales, seq_lens)

        def spot_score():
            return sa.selector_score(selector_query[:, :, None], codes, num_visible, rank ** -0.5, key_scales, "int4")

        # Capture only what runs eagerly: a capture that fails half-way can leave the stream unusable.
        step_runs = attempt("spot_step", tokens, spot_step, attend_bytes + selector_bytes)
        try:
            if not step_runs:
                raise RuntimeError("the eager step did not run")
            captured = step.capture(query, key_cache, value_cache, seq_lens, codes, key_scales, None, selector_query)
            attempt("spot_step_graph", tokens, captured.replay, attend_bytes + selector_bytes)
            del captured
        except Exception as error:
            log(f"  spot_step_graph: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
        attempt("spot_select", tokens, spot_select, selector_bytes)
        attempt("spot_score", tokens, spot_score, selector_bytes)
        try:
            scores = spot_score()
            attempt("spot_topp", tokens, lambda: sa.select_blocks(scores, num_visible, 0.9, blocks, blocks, SINK, LOCAL),
                    scores.numel() * 4)
        except Exception as error:
            log(f"  spot_topp: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")

        # The sparse kernel alone, on a fixed random selection of the budget (sink + local kept).
        chosen, counts = topk_blocks(torch.rand(batch, heads_kv, num_blocks, device=device, generator=generator),
                                     seq_lens, BLOCK, blocks, SINK, LOCAL)
        attempt("spot_attend", tokens,
                lambda: sa.sparse_decode(query, key_cache, value_cache, seq_lens, chosen, counts, BLOCK, scale),
                attend_bytes)

        def quest():
            indices, quest_counts = quest_select(query, key_min, key_max, seq_lens, scale, blocks)
            return sa.sparse_decode(query, key_cache, value_cache, seq_lens, indices, quest_counts, BLOCK, scale)

        def twilight():
            indices, twilight_counts = twilight_select(query, key_blocks, key_min, key_max, seq_lens, scale, blocks)
            return sa.sparse_decode(query, key_cache, value_cache, seq_lens, indices, twilight_counts, BLOCK, scale)

        attempt("quest_step", tokens, quest, attend_bytes + selection_bytes["quest"])
        attempt("twilight_step", tokens, twilight, attend_bytes + selection_bytes["twilight"])
    del keys, values, key_cache, value_cache, key_blocks, key_min, key_max
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Per-layer times inside a many-layer graph
# --------------------------------------------------------------------------------------------


def graph_us_per_call(timer, device, calls) -> float:
    """Median microseconds per call of ``calls`` (one per layer) replayed from one CUDA graph. Each
    call runs eagerly first: a capture that fails half-way can leave the stream unusable."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph, _ = capture_cuda_graph(lambda: [call() for call in calls], device, warmup=2)
    return timer(graph.replay) / len(calls)


def run_layered(shape_name, length, batch, budget, layers, timer, device, rows, log) -> None:
    heads_q, heads_kv, dim, rank = SHAPES[shape_name]
    scale = dim ** -0.5
    num_blocks = math.ceil(length / BLOCK)
    blocks = budget_blocks(budget, length)
    tokens = blocks * BLOCK
    kv_bytes = kv_read_bytes(batch, heads_kv, length, dim)
    attend_bytes = kv_read_bytes(batch, heads_kv, min(tokens, length), dim)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    layers = min(layers, int(0.6 * free_bytes // (kv_bytes * 1.15)))
    if layers < 2:
        log(f"  layers: {shape_name} L={length} B={batch}: memory for fewer than 2 layers, skipped")
        return
    generator = torch.Generator(device=device).manual_seed(7 * length + batch)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    step = SparseDecodeStep(heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, top_p=0.9, k_min=blocks, k_max=blocks,
                            block_size=BLOCK, sink_blocks=SINK, local_blocks=LOCAL, kcache_format="int4")
    inputs = []
    for _ in range(layers):
        layer = {"keys": torch.randn(batch, heads_kv, length, dim, device=device, dtype=torch.bfloat16,
                                     generator=generator),
                 "values": torch.randn(batch, heads_kv, length, dim, device=device, dtype=torch.bfloat16,
                                       generator=generator),
                 "query": torch.randn(batch, heads_q, dim, device=device, dtype=torch.bfloat16, generator=generator),
                 "selector_query": torch.randn(batch, heads_kv, rank, device=device, generator=generator)}
        layer["codes"], layer["scales"] = sa.pack_kcache(
            torch.randn(batch, heads_kv, num_blocks, rank, device=device, generator=generator), "int4")
        key_blocks = layer["keys"].view(batch, heads_kv, num_blocks, BLOCK, dim)
        layer["key_blocks"], layer["key_min"], layer["key_max"] = key_blocks, key_blocks.amin(3), key_blocks.amax(3)
        layer["chosen"], layer["counts"] = topk_blocks(
            torch.rand(batch, heads_kv, num_blocks, device=device, generator=generator), seq_lens, BLOCK, blocks,
            SINK, LOCAL)
        inputs.append(layer)
    selection_bytes = selection_read_bytes(inputs[0]["codes"], inputs[0]["scales"], inputs[0]["key_min"], num_blocks,
                                           blocks)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense(backend, x):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(x["query"][:, :, None], x["keys"], x["values"], scale=scale,
                                                  enable_gqa=True)

    def twilight(x):
        indices, counts = twilight_select(x["query"], x["key_blocks"], x["key_min"], x["key_max"], seq_lens, scale,
                                          blocks)
        return sa.sparse_decode(x["query"], x["keys"].transpose(1, 2), x["values"].transpose(1, 2), seq_lens,
                                indices, counts, BLOCK, scale)

    methods = [
        ("sdpa_flash", length, kv_bytes, lambda x: dense(SDPBackend.FLASH_ATTENTION, x)),
        ("sdpa_cudnn", length, kv_bytes, lambda x: dense(SDPBackend.CUDNN_ATTENTION, x)),
        ("spot_step", tokens, attend_bytes + selection_bytes["spot"],
         lambda x: step.run(x["query"], x["keys"].transpose(1, 2), x["values"].transpose(1, 2), seq_lens,
                            x["codes"], x["scales"], None, x["selector_query"])),
        ("spot_select", tokens, selection_bytes["spot"],
         lambda x: step.select(x["selector_query"], x["codes"], x["scales"], seq_lens)),
        ("spot_attend", tokens, attend_bytes,
         lambda x: sa.sparse_decode(x["query"], x["keys"].transpose(1, 2), x["values"].transpose(1, 2), seq_lens,
                                    x["chosen"], x["counts"], BLOCK, scale)),
        ("twilight_step", tokens, attend_bytes + selection_bytes["twilight"], twilight),
    ]
    for method, budget_tokens, nbytes, run in methods:
        try:
            us = graph_us_per_call(timer, device, [lambda x=x, run=run: run(x) for x in inputs])
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log(f"  layers {method}: out of memory, skipped")
            continue
        except Exception as error:
            log(f"  layers {method}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        rows.append({"shape": shape_name, "L": length, "B": batch, "budget_tokens": int(budget_tokens),
                     "method": method, "timing": "layers", "layers": layers, "us": round(us, 2),
                     "bytes": int(nbytes)})
        log(f"  {shape_name:9s} L={length:6d} B={batch:2d} budget={budget_tokens:6d} {method:18s} {us:9.1f} us "
            f"per layer ({layers}-layer graph)")
    del inputs
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


SAME_BYTES_METHODS = ("spot_attend", "spot_step", "spot_step_graph")


def copy_same_bytes(rows, timer, device) -> None:
    """Adds copy_frac to the single-timed sparse rows: a copy of the row's bytes, timed like the row."""
    copy_us: dict[int, float] = {}
    for row in rows:
        if row["method"] not in SAME_BYTES_METHODS or row["timing"] != "single" or row["us"] <= 0:
            continue
        nbytes = row["bytes"]
        if nbytes not in copy_us:
            source = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
            target = torch.empty_like(source)
            copy_us[nbytes] = timer(lambda: target.copy_(source))
            del source, target
        row["copy_same_bytes_us"] = round(copy_us[nbytes], 2)
        row["copy_frac"] = round(copy_us[nbytes] / row["us"], 4)
    torch.cuda.empty_cache()


def finish_rows(rows, copy_gbps):
    dense = {(r["shape"], r["L"], r["B"], r["timing"]): r["us"] for r in rows if r["method"] == "sdpa_flash"}
    for row in rows:
        row["bw_frac"] = round(row["bytes"] / (row["us"] * 1e-6) / (copy_gbps * 1e9), 4) if row["us"] > 0 else None
        baseline = dense.get((row["shape"], row["L"], row["B"], row["timing"]))
        row["speedup_vs_sdpa_flash"] = round(baseline / row["us"], 3) if baseline and row["us"] > 0 else None


def markdown(result) -> str:
    lines = [
        f"# Decode attention on {result['device']}",
        "",
        f"date {result['date']}, commit {result['commit']}, copy bandwidth {result['copy_gbps']:.0f} GB/s "
        f"(read + write), read bandwidth {result['read_gbps']:.0f} GB/s (a sum), bf16, block {BLOCK}, "
        f"sink {SINK} + local {LOCAL} blocks kept by every selection; L2 emptied before every timed call by "
        f"{'reading' if result['l2_flush'] == 'read' else 'writing'} 256 MB.",
        "",
        "timing: `single` = one call (or one graph replay for spot_step_graph), L2 flushed before it; "
        "`layers` = per-layer time inside one CUDA graph running the method for several layers, each with "
        "its own inputs (speedups compare rows of the same timing).",
        "",
        "copy_frac: a device copy of the same bytes (half read, half written), timed like the row, over the "
        "row's time (single-timed sparse rows).",
        "",
        "| shape | L | B | budget (tokens) | method | timing | us | speedup vs sdpa_flash | MB moved | bw_frac | copy_frac |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        speedup = "" if r.get("speedup_vs_sdpa_flash") is None else f"{r['speedup_vs_sdpa_flash']:.2f}x"
        frac = "" if r.get("bw_frac") is None else f"{r['bw_frac']:.2f}"
        copy_frac = "" if r.get("copy_frac") is None else f"{r['copy_frac']:.2f}"
        timing = r["timing"] + (f" ({r['layers']})" if "layers" in r else "")
        lines.append(f"| {r['shape']} | {r['L']} | {r['B']} | {r['budget_tokens']} | {r['method']} | {timing} | {r['us']:.1f} | "
                     f"{speedup} | {r['bytes'] / 1e6:.1f} | {frac} | {copy_frac} |")
    lines.append("")
    return "\n".join(lines)


def plot(result, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    rows = result["rows"]
    panels = sorted({(r["shape"], r["B"]) for r in rows})
    if not panels:
        return
    fixed = 4096
    methods = ["sdpa_flash", "sdpa_cudnn", "spot_step", "spot_step_graph", "spot_attend", "spot_select", "quest_step",
               "twilight_step"]
    # A --layered-only run has per-layer rows only: plot those (one point per length) instead.
    timing = "single" if any(r["timing"] == "single" for r in rows) else "layers"
    columns = min(3, len(panels))
    figure_rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(figure_rows, columns, figsize=(5 * columns, 3.6 * figure_rows), squeeze=False)
    for axis, (shape, batch) in zip(axes.flat, panels):
        for method in methods:
            points = sorted((r["L"], r["us"]) for r in rows if r["shape"] == shape and r["B"] == batch
                            and r["timing"] == timing
                            and r["method"] == method and (method.startswith("sdpa") or r["budget_tokens"] == fixed))
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{shape}, B={batch} (sparse: {fixed}-token budget)")
        axis.set_xlabel("context length L")
        axis.set_ylabel("us" if timing == "single" else "us per layer (in a CUDA graph)")
        axis.grid(True, which="both", alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations only")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--tag", help="file name suffix (default: the GPU model, h100 on an H100)")
    parser.add_argument("--time-limit", type=float, default=230.0, help="seconds; later configurations are skipped")
    parser.add_argument("--graph-layers", type=int, default=8,
                        help="layers per graph for the per-layer times at the longest length (0: none)")
    parser.add_argument("--layered-only", action="store_true", help="only the per-layer times")
    parser.add_argument("--l2-flush", choices=["read", "write"], default="read",
                        help="how the L2 is emptied before each timed call (see Timer)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    tag = args.tag or device_tag(device, name)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    budgets = QUICK_BUDGETS if args.quick else FULL_BUDGETS

    began = time.time()
    log = lambda text: print(text, flush=True)  # noqa: E731
    copy_gbps = copy_bandwidth_gbps(device)
    read_gbps = read_bandwidth_gbps(device)
    log(f"{name}: copy bandwidth {copy_gbps:.0f} GB/s, read bandwidth {read_gbps:.0f} GB/s")
    timer = Timer(args.warmup, args.iters, device, args.l2_flush)
    rows: list[dict] = []
    skipped: list[str] = []
    for shape in args.shapes:
        for batch in batches:
            for length in lengths:
                config = f"{shape} L={length} B={batch}"
                if time.time() - began > args.time_limit:
                    skipped.append(f"{config}: time limit")
                    continue
                try:
                    if not args.layered_only:
                        run_config(shape, length, batch, budgets, timer, device, rows, log)
                    if args.graph_layers > 0 and length == max(lengths):
                        run_layered(shape, length, batch, 4096, args.graph_layers, timer, device, rows, log)
                except torch.cuda.OutOfMemoryError:
                    skipped.append(f"{config}: out of memory")
                    log(f"{config}: out of memory, skipped")
                except Exception:
                    skipped.append(f"{config}: {traceback.format_exc().splitlines()[-1]}")
                    log(f"{config}: failed\n{traceback.format_exc()}")
                torch.cuda.empty_cache()

    copy_same_bytes(rows, timer, device)
    finish_rows(rows, copy_gbps)
    result = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "copy_gbps": round(copy_gbps, 1), "read_gbps": round(read_gbps, 1),
              "l2_flush": args.l2_flush, "block_size": BLOCK,
              "quick": args.quick, "skipped": skipped, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"decode_{tag}")
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(result))
    plot(result, stem + ".png")
    log(f"wrote {stem}.json/.md/.png in {time.time() - began:.0f} s ({len(rows)} rows, {len(skipped)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
