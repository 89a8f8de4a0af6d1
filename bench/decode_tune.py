"""Decode tuning probe: the sparse kernel's split count and a per-kernel breakdown of the step.

    python bench/decode_tune.py --out /tmp/tune.json      # Qwen3-8B shapes, L = 128K, B = 1, 8, 32

For each batch: ``sparse_decode`` alone at the planned split count and at forced ones
(``SPOT_DECODE_SPLITS``), each replayed from a CUDA graph so that host overhead is not timed;
the fused ``decode_select`` alone and the whole step, also from graphs; and the GPU time of
every kernel of one step as the CUDA profiler records it. Timing as in bench/decode.py (median
of CUDA-event-timed replays, L2 flushed before each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from benchlib import git_commit
from decode import BLOCK, LOCAL, SHAPES, SINK, Timer, copy_bandwidth_gbps

import spot_attention as sa
from spot_attention.decode import SparseDecodeStep, capture_cuda_graph, topk_blocks


def graphed(fn):
    """fn captured in a CUDA graph: its replay."""
    graph, _ = capture_cuda_graph(fn)
    return graph.replay


def kernel_times_us(fn, repeats: int = 5) -> dict[str, float]:
    """Mean GPU time per call of each kernel fn launches, by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            times[event.key[:90]] = round(event.device_time_total / repeats, 2)
    return times


def select_probe(device, out) -> int:
    """decode_select kernel time (profiler) for one (B=1, 8 KV heads) row set per configuration:
    how it scales with the row width, the selector dim, the key format and k_max."""
    rows = []
    configs = [(2048, 64, "int4", 64), (512, 64, "int4", 64), (8192, 64, "int4", 64), (2048, 32, "int4", 64),
               (2048, 128, "int4", 64), (2048, 64, "dense", 64), (2048, 64, "int4", 8), (2048, 64, "int4", 512)]
    for width, rank, fmt, k_max in configs:
        gen = torch.Generator(device=device).manual_seed(width + rank)
        query = torch.randn(1, 8, rank, device=device, generator=gen)
        keys = torch.randn(1, 8, width, rank, device=device, generator=gen)
        scales = None
        if fmt != "dense":
            keys, scales = sa.pack_kcache(keys, fmt)
        seq_lens = torch.full((1,), width * BLOCK, dtype=torch.int32, device=device)

        def select():
            return torch.ops.spot.decode_select(query, keys, scales, seq_lens, BLOCK, fmt, 1.0, rank ** -0.5, 0.9,
                                                4, k_max, SINK, LOCAL)

        times = kernel_times_us(select, repeats=20)
        us = sum(t for name, t in times.items() if "decode_select" in name)
        rows.append({"width": width, "rank": rank, "format": fmt, "k_max": k_max, "kernel_us": us})
        print(f"  decode_select width={width:5d} r={rank:3d} {fmt:5s} k_max={k_max:4d}: {us:7.2f} us")
    if out:
        with open(out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(device), "commit": git_commit(), "rows": rows}, handle,
                      indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-8b", choices=list(SHAPES))
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--budget", type=int, default=4096, help="tokens")
    parser.add_argument("--splits", type=int, nargs="*", default=[8, 16, 32, 48, 64])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--select-probe", action="store_true",
                        help="only decode_select's kernel time across row widths, selector dims, key formats and k_max")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode_tune.py needs a CUDA device", file=sys.stderr)
        return 1

    device = torch.device("cuda")
    if args.select_probe:
        return select_probe(device, args.out)
    heads_q, heads_kv, dim, rank = SHAPES[args.shape]
    copy_gbps = copy_bandwidth_gbps(device)
    timer = Timer(3, args.iters, device)
    num_blocks = math.ceil(args.length / BLOCK)
    blocks = min(num_blocks, math.ceil(args.budget / BLOCK))
    result = {"device": torch.cuda.get_device_name(device), "commit": git_commit(), "copy_gbps": round(copy_gbps, 1),
              "l2_flush": timer.l2_flush, "shape": args.shape, "L": args.length, "budget_tokens": blocks * BLOCK,
              "rows": []}
    print(f"{result['device']}: copy {copy_gbps:.0f} GB/s; {args.shape} L={args.length} budget {blocks * BLOCK} tokens")
    for batch in args.batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        keys = torch.randn(batch, args.length, heads_kv, dim, device=device, dtype=torch.bfloat16, generator=gen)
        values = torch.randn_like(keys)
        query = torch.randn(batch, heads_q, dim, device=device, dtype=torch.bfloat16, generator=gen)
        seq_lens = torch.full((batch,), args.length, dtype=torch.int32, device=device)
        selector_query = torch.randn(batch, heads_kv, rank, device=device, generator=gen)
        codes, scales = sa.pack_kcache(torch.randn(batch, heads_kv, num_blocks, rank, device=device, generator=gen),
                                       "int4")
        chosen, counts = topk_blocks(torch.rand(batch, heads_kv, num_blocks, device=device, generator=gen), seq_lens,
                                     BLOCK, blocks, SINK, LOCAL)
        attend_bytes = 2 * batch * heads_kv * blocks * BLOCK * dim * 2
        row = {"B": batch, "attend_bytes": attend_bytes, "attend_us": {}}

        def attend():
            return sa.sparse_decode(query, keys, values, seq_lens, chosen, counts, BLOCK, dim ** -0.5)

        for splits in [None] + list(args.splits):
            if splits is None:
                os.environ.pop("SPOT_DECODE_SPLITS", None)
            else:
                os.environ["SPOT_DECODE_SPLITS"] = str(splits)
            us = timer(graphed(attend))
            label = "planned" if splits is None else str(splits)
            row["attend_us"][label] = round(us, 2)
            print(f"  B={batch:2d} sparse_decode splits={label:>7s} {us:8.1f} us  "
                  f"{attend_bytes / (us * 1e-6) / 1e9:7.0f} GB/s  bw_frac {attend_bytes / (us * 1e-6) / (copy_gbps * 1e9):.2f}")
        os.environ.pop("SPOT_DECODE_SPLITS", None)

        step = SparseDecodeStep(heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, top_p=0.9, k_min=SINK + LOCAL + 1,
                                k_max=blocks, block_size=BLOCK, sink_blocks=SINK, local_blocks=LOCAL,
                                kcache_format="int4")
        select = lambda: step.select(selector_query, codes, scales, seq_lens)  # noqa: E731
        run = lambda: step.run(query, keys, values, seq_lens, codes, scales, None, selector_query)  # noqa: E731
        row["select_us"] = round(timer(graphed(select)), 2)
        row["step_us"] = round(timer(graphed(run)), 2)
        row["step_kernels_us"] = kernel_times_us(run)
        print(f"  B={batch:2d} decode_select {row['select_us']:8.1f} us, step {row['step_us']:8.1f} us")
        for name, us in row["step_kernels_us"].items():
            print(f"      {us:8.2f} us  {name}")
        result["rows"].append(row)
        del keys, values
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
