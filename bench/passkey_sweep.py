"""Passkey retrieval over more lengths and depths than `spot-attn eval` runs, for one or more
selectors on the same prompts: which cases dense attention solves and sparse attention loses.

    python bench/passkey_sweep.py --selector shipped --selector centred=/path/to/selector \
        [--lengths 1024 1536 2048] [--depths 0.1 0.3 0.5 0.7 0.9] [--seed 1] [--device cpu]

Each prompt is run densely and with each selector's sparse attention (greedy, 8 new tokens;
spot_attention.eval.passkey). Writes JSON (``--out``, default bench/results/passkey_sweep_<device>.json)
and prints the lost cases per selector.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchlib import ROOT, device_tag, import_spot_attention, results_header, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or model directory (default: SmolLM2-135M)")
    parser.add_argument("--selector", action="append", default=[],
                        help="NAME=DIR, or 'shipped' for the packaged selector (repeatable)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 1536, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import_spot_attention()
    from spot_attention import cli
    from spot_attention.eval import harness, passkey
    from spot_attention.integrations import hf

    named = []
    for item in args.selector or ["shipped"]:
        name, _, directory = item.partition("=")
        if item == "shipped":
            name, directory = "shipped", None
        elif not directory:
            parser.error(f"--selector: expected NAME=DIR or 'shipped', got {item!r}")
        named.append((name, directory))
    device = cli.pick_device(args.device)
    torch.manual_seed(0)
    model, tokenizer = cli.load_model(args.model, device, cli.pick_dtype("auto", device), print)
    results, summary = {}, {}
    for name, directory in named:
        selectors = cli.load_selectors(directory, device, print)
        handle = hf.attach(model, method=hf.LearnedSelection(selectors), layers=sorted(selectors.layers))
        rows = passkey.run_passkey(model, tokenizer, handle, args.lengths, depths=tuple(args.depths), seed=args.seed)
        hf.detach(model)
        results[name] = rows
        lost = [{"L": r["L"], "depth": r["depth"], "passkey": r["passkey"], "sparse_answer": r["sparse_answer"]}
                for r in rows if r["dense_ok"] and not r["sparse_ok"]]
        summary[name] = {"selector": directory or f"shipped:{cli.DEFAULT_SELECTOR}", "cases": len(rows),
                         "dense_ok": sum(r["dense_ok"] for r in rows), "sparse_lost": lost}
        print(f"{name}: dense solves {summary[name]['dense_ok']} of {len(rows)}, sparse loses {len(lost)}: {lost}",
              flush=True)
    device_name = harness.device_description(device)
    result = {**results_header(device_name, "passkey_sweep.py", argv), "lengths": args.lengths,
              "depths": args.depths, "seed": args.seed, "summary": summary, "rows": results}
    tag = device_tag(device, device_name)
    write_results(result, args.out or os.path.join(ROOT, "bench", "results", f"passkey_sweep_{tag}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
