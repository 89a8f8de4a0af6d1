"""spot.block_mass (the distillation teacher) against a dense causal attention forward.

The teacher needs two QK^T passes (row log-sum-exp, then per-block mass) and no P V product, so it
should cost about as much as one dense causal forward at the same length. This script times both
on one GPU, B = 1, for the model shapes below, and writes

    bench/results/block_mass_<tag>.json   {"device", "date", "commit", "rows": [...]}
    bench/results/block_mass_<tag>.md     the same rows as a table
(<tag> = the GPU model, h100 on an H100; --tag overrides it).

Dense baseline: torch scaled_dot_product_attention with only the flash backend enabled, causal,
query [1, Hq, L, d] and key/value [1, Hq, L, d] (KV heads repeated up front, outside the timing,
so GQA costs what it costs a flash kernel). block_mass times the whole op: validation, the
zero-filled output and the kernel.

    python bench/block_mass.py                 # 8K, 32K and 128K; about two minutes on an H100
    python bench/block_mass.py --lengths 8192  # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchlib import MODEL_SHAPES as SHAPES
from benchlib import ROOT, device_tag, git_commit, import_spot_attention, time_us

spot_attention = import_spot_attention()


def bench_shape(name: str, length: int, block_size_q: int, block_size_k: int, seed: int = 0) -> list[dict]:
    heads_q, heads_kv, head_dim = SHAPES[name]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    query = torch.randn(length, heads_q, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(length, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    cu_seqlens = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5

    group = heads_q // heads_kv
    dense_query = query.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, L, d]
    dense_key = key.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).contiguous()
    dense_value = torch.randn_like(dense_key)

    def dense():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(dense_query, dense_key, dense_value, is_causal=True, scale=scale)

    def teacher():
        return spot_attention.block_mass(query, key, cu_seqlens, length, block_size_q, block_size_k, scale)

    mass = teacher()
    row_sums = mass[0].sum(-1)
    worst = (row_sums - 1).abs().max().item()
    if worst > 1e-3:
        raise RuntimeError(f"block_mass rows do not sum to 1 ({name}, L={length}): worst |sum - 1| = {worst:.3g}")
    del mass, row_sums

    dense_us = time_us(dense)
    teacher_us = time_us(teacher)
    shape = f"{name} ({heads_q}/{heads_kv} heads, d={head_dim})"
    return [
        dict(shape=shape, L=length, method="dense causal forward (SDPA flash)", us=round(dense_us, 1),
             ratio_vs_dense=1.0),
        dict(shape=shape, L=length, method=f"block_mass ({block_size_q}x{block_size_k})", us=round(teacher_us, 1),
             ratio_vs_dense=round(teacher_us / dense_us, 3)),
    ]


def markdown(result: dict) -> str:
    lines = [
        "# spot.block_mass vs a dense causal forward",
        "",
        f"Device: {result['device']}; date: {result['date']}; commit: {result['commit']}; B = 1, bfloat16.",
        "",
        "| shape | L | method | time (us) | ratio vs dense |",
        "|---|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | {row['L']} | {row['method']} | {row['us']:.1f} | {row['ratio_vs_dense']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--block-size-q", type=int, default=64)
    parser.add_argument("--block-size-k", type=int, default=64)
    parser.add_argument("--tag", help="output name suffix (default: the GPU model, h100 on an H100)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args()
    if not spot_attention.cuda_available():
        raise SystemExit("bench/block_mass.py needs CUDA and the CUDA build of spot_ops")
    device_name = torch.cuda.get_device_name()
    tag = args.tag or device_tag(torch.device("cuda"), device_name)

    rows = []
    for length in args.lengths:
        for shape in args.shapes:
            for row in bench_shape(shape, length, args.block_size_q, args.block_size_k):
                print(f"{row['shape']:<32} L={row['L']:>7}  {row['method']:<36} {row['us']:>12.1f} us  "
                      f"x{row['ratio_vs_dense']:.3f}", flush=True)
                rows.append(row)
            torch.cuda.empty_cache()

    result = dict(
        device=device_name,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        rows=rows,
    )
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"block_mass_{tag}")
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
