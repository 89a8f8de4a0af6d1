"""Pieces the GPU benchmarks share: the model shapes they sweep, the commit they record, the
header and writing of a results file, and the CUDA-event timer."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (query heads, KV heads, head dim)
MODEL_SHAPES = {
    "qwen3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
}


def import_spot_attention():
    """The installed package, or the in-place build under python/ when it is not installed."""
    try:
        import spot_attention
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "python"))
        import spot_attention
    return spot_attention


def git_commit() -> str:
    """SPOT_COMMIT when set (a copied tree without .git, e.g. on a GPU host), else git's HEAD."""
    import_spot_attention()
    from spot_attention.eval.harness import git_commit as package_commit

    return package_commit()


def results_header(device_description: str, script: str, argv) -> dict:
    """What a results file records about its run: device, UTC date, commit and the command line
    (``argv`` as main() got it, None for the process's own)."""
    arguments = argv if argv is not None else sys.argv[1:]
    return {"device": device_description,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "command": f"python bench/{script} " + " ".join(arguments)}


def write_results(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {path}")


def device_tag(device, description: str) -> str:
    """Results-file suffix: "cpu", else the GPU model in its name, lower case ("NVIDIA H100 80GB
    HBM3" and "NVIDIA H100-SXM5" -> "h100", "NVIDIA H200" -> "h200"), else the whole name."""
    if device.type == "cpu":
        return "cpu"
    model = re.search(r"\b[A-Z]{1,2}\d{2,3}[A-Z]?\b", description)
    if model:
        return model.group(0).lower()
    return re.sub(r"[^a-z0-9]+", "_", description.lower()).strip("_")


def time_us(function, budget_s: float = 2.0, min_iterations: int = 3, max_iterations: int = 50) -> float:
    """Median microseconds per call: one warm-up call, then as many CUDA-event timed calls as fit
    the budget (at least ``min_iterations``, at most ``max_iterations``)."""
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    iterations = max(min_iterations, min(max_iterations, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(iterations):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        function()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1000.0)
    times.sort()
    return times[len(times) // 2]
