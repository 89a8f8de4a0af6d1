"""spot.sparse_prefill against dense causal prefill, with the selection that feeds it.

One GPU run, B = 1, bfloat16, for each model shape and length:

* dense causal attention: torch SDPA with only the flash backend, and with only cuDNN;
* spot.sparse_prefill at densities 100%, 50%, 25%, 10%, 5%: every query block keeps its diagonal
  and the sink block 0, and each other earlier key block with probability ``density`` (random,
  sorted lists, as ``select_blocks`` returns them); 100% is every block (dense causal);
* the selection that would produce those lists: ``selector_score`` + ``select_blocks`` on pooled
  blocks (r = 64 dims per block), timed when those ops run on CUDA, else null;
* ``block_mass`` (the distillation teacher) next to the dense forward, when it runs on CUDA.

TFLOP/s count the work done: 4 * d * (query heads) * (query-key pairs visited), causal pairs
only, so dense methods count L(L+1)/2 pairs per head and sparse ones the pairs of their blocks.
Speedups are against SDPA flash; "with selection" adds the selection time to the kernel time.
Times are medians of CUDA-event-timed calls after a warm-up, as many as fit a small budget (few
at 128K, where one dense call takes about half a second).

Writes bench/results/prefill_<device>.{json,md,png} (<device>: the GPU model, h100 on an H100;
--output overrides the path):
    {"device", "date", "commit", "rows": [{shape, L, density, method, us, tflops, ...}], "checks"}

    python bench/prefill.py                    # 8K, 32K, 128K, both shapes: a few minutes on an H100
    python bench/prefill.py --lengths 8192     # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from benchlib import MODEL_SHAPES as SHAPES
from benchlib import ROOT, device_tag, git_commit, import_spot_attention, time_us

spot_attention = import_spot_attention()
from spot_attention import ops  # noqa: E402

BLOCK = 64
SELECTOR_DIM = 64
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)

def random_selection(num_blocks: int, heads_kv: int, density: float, generator: torch.Generator):
    """Block lists of one sequence: block 0 (sink) plus each other earlier block with probability
    ``density``, ascending, -1 padded (the diagonal is implicit). Returns (indices int32
    [1, Hkv, NQ, K], counts int32 [1, Hkv, NQ], visited key blocks per row incl. the diagonal)."""
    rows = torch.arange(num_blocks, device="cuda")
    earlier = rows[None, :] < rows[:, None]  # [NQ, NK]: key block j < query block i
    if density >= 1.0:
        chosen = earlier.expand(heads_kv, num_blocks, num_blocks)
    else:
        draw = torch.rand(heads_kv, num_blocks, num_blocks, device="cuda", generator=generator) < density
        chosen = earlier & (draw | (rows == 0)[None, None, :])
    counts = chosen.sum(-1, dtype=torch.int32)  # [Hkv, NQ]
    width = max(int(counts.max().item()), 1)
    # Chosen blocks sort first, in ascending order; the rest are cut or overwritten with -1.
    sort_key = torch.where(chosen, rows, rows + num_blocks)
    indices = sort_key.sort(-1).values[..., :width].to(torch.int32)
    indices = torch.where(torch.arange(width, device="cuda") < counts[..., None], indices, -1)
    del chosen, sort_key
    return indices[None].contiguous(), counts[None].contiguous(), counts + 1


def visited_pairs(visited_blocks: torch.Tensor, length: int) -> float:
    """Query-key pairs a kernel computes for full 64-token blocks: a full block per earlier
    block, the causal half of the diagonal. visited_blocks [Hkv, NQ] includes the diagonal."""
    assert length % BLOCK == 0, "lengths are whole blocks here"
    earlier = (visited_blocks - 1).sum().item()
    diagonal = visited_blocks.numel()
    return float(earlier) * BLOCK * BLOCK + float(diagonal) * BLOCK * (BLOCK + 1) / 2


@contextlib.contextmanager
def prefill_impl(impl: str):
    """SPOT_PREFILL_IMPL for the duration: "auto" unsets it (the launcher's own choice)."""
    previous = os.environ.get("SPOT_PREFILL_IMPL")
    if impl == "auto":
        os.environ.pop("SPOT_PREFILL_IMPL", None)
    else:
        os.environ["SPOT_PREFILL_IMPL"] = impl
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SPOT_PREFILL_IMPL", None)
        else:
            os.environ["SPOT_PREFILL_IMPL"] = previous


def error_row(shape, length, density, method, error: BaseException) -> dict:
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    print(f"  {method} failed: {message}", flush=True)
    return dict(shape=shape, L=length, density=density, method=method, us=None, tflops=None, error=message)


def bench_shape(name: str, length: int, budget_s: float, impls=("auto",), seed: int = 0) -> tuple[list[dict], list[dict]]:
    heads_q, heads_kv, head_dim = SHAPES[name]
    group = heads_q // heads_kv
    shape = f"{name} ({heads_q}/{heads_kv} heads, d={head_dim})"
    num_blocks = length // BLOCK
    scale = head_dim**-0.5
    generator = torch.Generator(device="cuda").manual_seed(seed)
    query = torch.randn(length, heads_q, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(length, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn(length, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    cu_seqlens = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    rows, checks = [], []
    dense_pairs = heads_q * length * (length + 1) / 2
    dense_flops = 4.0 * head_dim * dense_pairs

    def record(method, density, function, flops, **extra):
        try:
            us = time_us(function, budget_s, max_iterations=30)
        except Exception as error:  # noqa: BLE001 - a failing method is recorded, the run goes on
            traceback.print_exc()
            rows.append(error_row(shape, length, density, method, error))
            return None
        tflops = flops / (us * 1e-6) / 1e12 if flops else None
        row = dict(shape=shape, L=length, density=density, method=method, us=round(us, 1),
                   tflops=round(tflops, 1) if tflops is not None else None, **extra)
        print(f"  {method:<44} density={str(density):<5} {us:>12.1f} us  "
              f"{'' if tflops is None else f'{tflops:6.1f} TFLOP/s'}", flush=True)
        rows.append(row)
        return us

    # ---- Dense baselines: SDPA on [1, Hq, L, d], KV heads repeated outside the timing ---------
    dense_query = query.transpose(0, 1).unsqueeze(0)
    dense_key = key.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)
    dense_value = value.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)

    def sdpa(backend):
        def run():
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(dense_query, dense_key, dense_value, is_causal=True, scale=scale)
        return run

    flash_us = record("dense causal (SDPA flash)", 1.0, sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                      dense_flops)
    record("dense causal (SDPA cuDNN)", 1.0, sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION), dense_flops)

    # ---- Correctness check once per shape and length: dense sparse_prefill vs SDPA flash -------
    if length <= 32768:
        try:
            indices, counts, _ = random_selection(num_blocks, heads_kv, 1.0, generator)
            out, _ = ops.sparse_prefill(query, key, value, cu_seqlens, length, indices, counts, BLOCK, scale)
            expected = sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION)()[0].transpose(0, 1)
            worst = (out.float() - expected.float()).abs().max().item()
            checks.append(dict(shape=shape, L=length, check="dense sparse_prefill vs SDPA flash, max |diff|",
                               value=worst, ok=worst < 3e-2))
            print(f"  check: dense sparse_prefill vs SDPA flash max |diff| = {worst:.3g}", flush=True)
            del out, expected, indices, counts
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            checks.append(dict(shape=shape, L=length, check="dense sparse_prefill vs SDPA flash", error=str(error)[:300]))
    del dense_key, dense_value

    # ---- Selection cost: selector_score + select_blocks on pooled blocks --------------------
    selection_us = None
    pooled_query = torch.randn(1, heads_kv, num_blocks, SELECTOR_DIM, device="cuda", generator=generator,
                               dtype=torch.bfloat16)
    pooled_keys = torch.randn(1, heads_kv, num_blocks, SELECTOR_DIM, device="cuda", generator=generator,
                              dtype=torch.bfloat16)
    num_visible = torch.arange(1, num_blocks + 1, dtype=torch.int32, device="cuda")[None].contiguous()

    def selection():
        scores = ops.selector_score(pooled_query, pooled_keys, num_visible, SELECTOR_DIM**-0.5)
        return ops.select_blocks(scores, num_visible, top_p=0.9, k_min=2, k_max=num_blocks, sink_blocks=1,
                                 local_blocks=1)

    selection_us = record("selection (selector_score + select_blocks)", None, selection, None)
    del pooled_query, pooled_keys, num_visible

    # ---- Teacher: block_mass next to the dense forward --------------------------------------
    mass_us = record("block_mass (64x64 teacher)", 1.0,
                     lambda: ops.block_mass(query, key, cu_seqlens, length, BLOCK, BLOCK, scale), None)
    if mass_us is not None and flash_us:
        rows[-1]["ratio_vs_sdpa_flash"] = round(mass_us / flash_us, 3)

    # ---- Sparse prefill at each density ------------------------------------------------------
    for density in DENSITIES:
        try:
            indices, counts, visited = random_selection(num_blocks, heads_kv, density, generator)
        except Exception as error:  # noqa: BLE001
            rows.append(error_row(shape, length, density, "sparse_prefill", error))
            continue
        pairs = visited_pairs(visited, length) * group
        actual_density = pairs / dense_pairs
        for impl in impls:
            method = "sparse_prefill" if impl == "auto" else f"sparse_prefill [{impl}]"
            with prefill_impl(impl):
                us = record(method, density,
                            lambda: ops.sparse_prefill(query, key, value, cu_seqlens, length, indices, counts, BLOCK,
                                                       scale),
                            4.0 * head_dim * pairs, visited_fraction=round(actual_density, 4))
            if us is None:
                continue
            row = rows[-1]
            if flash_us:
                row["speedup_vs_sdpa_flash"] = round(flash_us / us, 2)
            if selection_us is not None:
                total = us + selection_us
                row["selection_us"] = round(selection_us, 1)
                row["total_with_selection_us"] = round(total, 1)
                row["selection_share"] = round(selection_us / total, 3)
                if flash_us:
                    row["speedup_with_selection"] = round(flash_us / total, 2)
        del indices, counts, visited
    del query, key, value
    torch.cuda.empty_cache()
    return rows, checks


def markdown(result: dict) -> str:
    lines = [
        "# spot.sparse_prefill vs dense causal prefill",
        "",
        f"Device: {result['device']}; date: {result['date']}; commit: {result['commit']}; B = 1, bfloat16, "
        f"{BLOCK}-token blocks. TFLOP/s count the causal query-key pairs each method computes.",
        "",
        "| shape | L | method | density | time (us) | TFLOP/s | vs SDPA flash | + selection | selection share |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    for row in result["rows"]:
        time_cell = cell(row["us"], ".1f") if row["us"] is not None else f"error: {row.get('error', '')}"
        lines.append(
            f"| {row['shape']} | {row['L']} | {row['method']} | {cell(row['density'], '.2f')} | {time_cell} | "
            f"{cell(row['tflops'], '.1f')} | {cell(row.get('speedup_vs_sdpa_flash'), '.2f')} | "
            f"{cell(row.get('speedup_with_selection'), '.2f')} | {cell(row.get('selection_share'), '.3f')} |"
        )
    if result.get("checks"):
        lines += ["", "Checks:", ""]
        for check in result["checks"]:
            lines.append(f"- {check['shape']} L={check['L']}: {check['check']}: "
                         f"{check.get('value', check.get('error'))}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({row["shape"] for row in result["rows"]})
    figure, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        for length in sorted({row["L"] for row in result["rows"] if row["shape"] == shape}):
            sparse = [row for row in result["rows"] if row["shape"] == shape and row["L"] == length
                      and row["method"] == "sparse_prefill" and row.get("speedup_vs_sdpa_flash") is not None]  # default impl
            if not sparse:
                continue
            densities = [row["density"] for row in sparse]
            line = axis.plot(densities, [row["speedup_vs_sdpa_flash"] for row in sparse], "o-",
                             label=f"L={length // 1024}K kernel")[0]
            with_selection = [row.get("speedup_with_selection") for row in sparse]
            if all(value is not None for value in with_selection):
                axis.plot(densities, with_selection, "s--", color=line.get_color(), label=f"L={length // 1024}K + selection")
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(list(DENSITIES))
        axis.set_xticklabels([f"{int(d * 100)}%" for d in DENSITIES])
        axis.set_xlabel("block density")
        axis.set_ylabel("speedup vs SDPA flash (causal)")
        axis.set_title(shape)
        axis.legend(fontsize=8)
    figure.suptitle(f"spot.sparse_prefill, {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--impls", nargs="+", default=["auto", "mma"], choices=["auto", "mma", "wgmma"],
                        help="sparse_prefill implementations to time (auto: the launcher's choice)")
    parser.add_argument("--time-limit", type=float, default=230.0, help="seconds; later configurations are skipped")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--output", help="results JSON (default: bench/results/prefill_<device>.json)")
    args = parser.parse_args()
    if not spot_attention.cuda_available():
        raise SystemExit("bench/prefill.py needs CUDA and the CUDA build of spot_ops")
    if args.output is None:
        tag = device_tag(torch.device("cuda"), torch.cuda.get_device_name())
        args.output = os.path.join(ROOT, "bench", "results", f"prefill_{tag}.json")

    started = time.perf_counter()
    rows, checks = [], []
    for length in args.lengths:
        for name in args.shapes:
            if time.perf_counter() - started > args.time_limit:
                print(f"{name} L={length}: skipped (past --time-limit)", flush=True)
                rows.append(dict(shape=name, L=length, density=None, method="all", us=None, tflops=None,
                                 error="skipped: past --time-limit"))
                continue
            print(f"{name} L={length}", flush=True)
            try:
                shape_rows, shape_checks = bench_shape(name, length, args.budget, tuple(args.impls))
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: keep the other shapes
                traceback.print_exc()
                shape_rows, shape_checks = [error_row(name, length, None, "all", error)], []
            rows += shape_rows
            checks += shape_checks
            torch.cuda.empty_cache()

    result = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        rows=rows,
        checks=checks,
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    stem = os.path.splitext(args.output)[0]
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(result))
    try:
        plot(result, stem + ".png")
    except Exception:  # noqa: BLE001 - the numbers matter more than the picture
        traceback.print_exc()
    print(f"wrote {args.output} (+ .md, .png) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
