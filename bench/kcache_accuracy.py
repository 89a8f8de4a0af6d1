"""What each selector K-cache format costs in accuracy, on the default model.

For bf16 and each 4-bit format (int4, mxfp4, nvfp4) the shipped selector scores every query
block against the selector keys as that cache hands them back (``prefill_reads_kcache``); the
evaluation harness reports attention-mass recall, blocks read and the perplexity change against
dense attention on held-out documents. By default every format runs at the shipped per-layer
top_p; ``--calibrate`` first calibrates top_p per format (same recall target, windows and
lengths as the shipped calibration), so the formats are compared at equal target recall.
``--selector-for FMT=DIR`` (repeatable) adds a row: format FMT scored by the selector in DIR (e.g.
one trained through that format, ``spot-attn distill --kcache-format FMT``), labelled
``FMT@<name of DIR>``, on the same documents; ``--formats`` with no value leaves only those rows.

    python bench/kcache_accuracy.py [--length 8192] [--docs 2] [--device cuda] [--calibrate]
        [--selector-for nvfp4=DIR ...] [--formats bf16 nvfp4]

Writes ``--out`` (default bench/results/kcache_accuracy_<device>.json) and the .md and .png beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchlib import device_tag
from spot_attention import cli, reference
from spot_attention.eval import harness
from spot_attention.integrations import hf

FORMATS = ("bf16", "int4", "mxfp4", "nvfp4")


def bytes_per_key(fmt: str, rank: int) -> float:
    """Stored bytes per pooled selector key of ``rank`` values, scales counted (the nvfp4
    per-tensor fp32 scale is shared by the whole cache and left out)."""
    if fmt == "bf16":
        return 2.0 * rank
    group = reference.KCACHE_GROUP[fmt]
    scale_bytes = 2 if fmt == "int4" else 1
    return rank / 2 + scale_bytes * rank / group


def write_report(result: dict, out: str) -> None:
    with open(out, "w") as handle:
        json.dump(result, handle, indent=2)
    lines = [
        f"# Selector K-cache formats: accuracy at L={result['L']} ({result['device']}, {result['date']}, "
        f"commit {result['commit']})",
        "",
        "| format | bytes/key | ratio vs bf16 | recall | ppl delta % | frac read | top-1 agree |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['format']} | {row['bytes_per_key']:.0f} | {row['ratio_vs_bf16']:.2f}x | "
                     f"{row['recall']:.4f} | {row['ppl_delta_pct']:+.2f} | {row['frac_read']:.3f} | "
                     f"{row['top1_agree']:.3f} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["rows"]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = [row["format"] for row in rows]
    for axis, key, title in zip(axes, ("bytes_per_key", "recall", "ppl_delta_pct"),
                                ("bytes per key", "attention-mass recall", "perplexity change %")):
        axis.bar(names, [row[key] for row in rows], color=["#777", "#1f77b4", "#2ca02c", "#d62728"][: len(rows)])
        axis.set_title(title)
    if rows:
        low = min(row["recall"] for row in rows)
        axes[1].set_ylim(max(0.0, low - 0.02), 1.0)
    figure.tight_layout()
    figure.savefig(os.path.splitext(out)[0] + ".png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--selector", default=None)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--out", default=None,
                        help="results JSON (a .md and .png go next to it); default "
                             "bench/results/kcache_accuracy_<device>.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--calibrate", action="store_true", help="calibrate top_p per format first")
    parser.add_argument("--selector-for", action="append", default=[], metavar="FMT=DIR",
                        help="also evaluate format FMT with the selector in DIR (row FMT@<dir name>; repeatable)")
    parser.add_argument("--center-keys", action="store_true",
                        help="with --calibrate: refit each selector's key_center first (docs/kcache.md)")
    args = parser.parse_args(argv)
    if args.center_keys and not args.calibrate:
        parser.error("--center-keys needs --calibrate (the center is fitted on the calibration windows)")
    extra_rows = []
    for item in args.selector_for:
        fmt, _, directory = item.partition("=")
        if fmt not in FORMATS or not directory:
            parser.error(f"--selector-for: expected FMT=DIR with FMT one of {FORMATS}, got {item!r}")
        extra_rows.append((f"{fmt}@{os.path.basename(os.path.normpath(directory))}", fmt, directory))
    if not args.formats and not extra_rows:
        parser.error("nothing to evaluate: give --formats or --selector-for")

    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    if args.out is None:
        # Not a name of the committed studies (kcache.json, kcache_cpu.json, ...): a run with the
        # defaults must not replace one of them.
        name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
        args.out = os.path.join("bench", "results", f"kcache_accuracy_{device_tag(device, name)}.json")
    torch.manual_seed(0)
    default_selectors = cli.load_selectors(args.selector, device, print)
    model, tokenizer = cli.load_model(args.model, device, dtype, print)
    documents = {args.length: cli.heldout_documents(tokenizer, args.length, args.docs)}
    # (label, format, selectors, selector directory) per row; the default selector first.
    plan = [(fmt, fmt, default_selectors, args.selector or "shipped") for fmt in args.formats]
    for label, fmt, directory in extra_rows:
        plan.append((label, fmt, cli.load_selectors(directory, device, print), directory))
    if any(sorted(selectors.layers) != sorted(default_selectors.layers) for _, _, selectors, _ in plan):
        raise SystemExit("--selector-for: every selector must cover the same layers as --selector")
    methods = [hf.LearnedSelection(selectors, kcache_format="dense" if fmt == "bf16" else fmt,
                                   prefill_reads_kcache=True) for _, fmt, selectors, _ in plan]
    handle = hf.attach(model, method=methods[0], layers=sorted(default_selectors.layers), measure_recall=True)
    rank = int(default_selectors.config.selector_dim)
    # Every row starts from its selector's stored policy (restored after each row).
    stored = {id(selectors): (dict(selectors.config.top_p or {}), selectors.config.kcache_format)
              for _, _, selectors, _ in plan}
    result = None
    rows = []
    for (label, fmt, selectors, directory), method in zip(plan, methods):
        stored_top_p, stored_format = stored[id(selectors)]
        selectors.config.top_p = dict(stored_top_p)
        calibration = dict((selectors.config.training or {}).get("calibration") or {})
        if args.calibrate:
            from spot_attention.policy import calibrate_selectors

            selectors.config.kcache_format = method.kcache_format
            calibrate_selectors(selectors, model, tokenizer, target_recall=calibration.get("target_recall", 0.95),
                                context=calibration.get("contexts", [2048, 4096]),
                                windows=calibration.get("windows", 4), prefill_reads_kcache=True,
                                center_keys=args.center_keys)
            selectors.config.kcache_format = stored_format
        evaluated = harness.run_eval(model, handle, documents, [args.length], [method], docs_per_length=args.docs,
                                     progress=not args.no_progress, log=print)
        row = next(row for row in evaluated["rows"] if row["method"] != "dense")
        rows.append({
            "format": label,
            "kcache_format": fmt,
            "selector": directory,
            "selector_trained_format": (selectors.config.training or {}).get("settings", {}).get("kcache_format",
                                                                                                "none"),
            "bytes_per_key": bytes_per_key(fmt, rank),
            "recall": row["recall"],
            "ppl_delta_pct": row["ppl_delta_pct"],
            "frac_read": row["frac_read"],
            "top1_agree": row["top1_agree"],
            "kl": row["kl"],
            "ppl": row["ppl"],
            "ppl_dense": row["ppl_dense"],
            "top_p_mean": sum(selectors.config.top_p.values()) / len(selectors.config.top_p),
        })
        result = evaluated
        print(f"{label}: recall {row['recall']:.4f}, ppl delta {row['ppl_delta_pct']:+.2f}%, "
              f"frac read {row['frac_read']:.3f}", flush=True)
    bf16_bytes = bytes_per_key("bf16", rank)
    for row in rows:
        row["ratio_vs_bf16"] = bf16_bytes / row["bytes_per_key"]
    summary = {
        "device": result["device"],
        "date": result["date"],
        "commit": result["commit"],
        "L": args.length,
        "rank": rank,
        "documents": result["documents"],
        "dtype": result["dtype"],
        "top_p": "calibrated per format" if args.calibrate else "shipped",
        "key_center": "refitted per row" if args.center_keys else "as stored",
        "command": "python bench/kcache_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_report(summary, args.out)
    print(open(os.path.splitext(args.out)[0] + ".md").read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
