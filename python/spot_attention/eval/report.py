"""Writes an evaluation result (the JSON ``run_eval`` returns) as JSON, a Markdown table and a
PNG plot of perplexity change against the fraction of KV blocks read."""

from __future__ import annotations

import json
import math
import os


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    lines = [
        f"# Evaluation: {result.get('model', 'model')}",
        "",
        f"device: {result.get('device')}; date: {result.get('date')}; commit: {result.get('commit')}; "
        f"selector train_ctx: {result.get('train_ctx')}; backend: {result.get('backend', {}).get('backend')}",
        *([f"selector: {result['selector']['path']} (block {result['selector']['block_size']})", ""]
          if result.get("selector") else []),
        "",
        "frac_read: KV blocks read / causally visible, over all full-attention layers (prefill). "
        "recall: teacher attention mass of the blocks read. ppl_delta_pct: sparse vs dense perplexity. "
        "top1_agree / kl: next-token argmax agreement and KL(dense || sparse) per token.",
        "",
        "| L | method | budget | frac_read | ppl dense | ppl | ppl_delta_pct | top1_agree | kl | recall | docs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["L"], r["method"], r["frac_read"])):
        lines.append(
            f"| {row['L']} | {row['method']} | {_fmt(row.get('budget'))} | {_fmt(row['frac_read'])} | "
            f"{_fmt(row['ppl_dense'])} | {_fmt(row['ppl'])} | {_fmt(row['ppl_delta_pct'], 2)} | "
            f"{_fmt(row['top1_agree'])} | {_fmt(row['kl'], 4)} | {_fmt(row['recall'])} | {row['documents']} |"
        )
    passkey = result.get("passkey") or []
    if passkey:
        lines += ["", "## Passkey (chat template, greedy)", "",
                  "| L | depth | dense | sparse | frac_read |", "| ---: | ---: | --- | --- | ---: |"]
        for row in passkey:
            lines.append(f"| {row['L']} | {row['depth']} | {'ok' if row['dense_ok'] else 'miss'} | "
                         f"{'ok' if row['sparse_ok'] else 'miss'} | {_fmt(row['frac_read'])} |")
        kept = result.get("passkey_sparse_keeps_dense")
        lines += ["", f"Sparse keeps every dense success: {kept}"]
    documents = result.get("documents") or []
    if documents:
        lines += ["", "## Documents (held-out)", ""]
        lines += [f"- {doc['name']} ({doc['tokens']} tokens)" for doc in documents]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["L"] for row in result["rows"]})
    figure, axes = plt.subplots(1, len(lengths), figsize=(max(5 * len(lengths), 8), 4.5), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        rows = [row for row in result["rows"] if row["L"] == length]
        for method in sorted({row["method"] for row in rows}):
            points = sorted((row["frac_read"], row["ppl_delta_pct"]) for row in rows if row["method"] == method)
            style = "o-" if len(points) > 1 else "*"
            axis.plot([p[0] for p in points], [p[1] for p in points], style, label=method,
                      markersize=10 if style == "*" else 5)
        axis.axhline(0.0, color="gray", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_yscale("symlog", linthresh=1.0)
        axis.set_xlabel("fraction of KV blocks read")
        axis.set_ylabel("perplexity change vs dense (%)")
        axis.set_title(f"L = {length}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{result.get('model', '')}: sparse vs dense ({result.get('device')})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(result: dict, json_path: str, plot_path: str | None = None) -> dict[str, str]:
    """Writes ``json_path``, the Markdown beside it (``.md``) and the plot; returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as handle:
        json.dump(result, handle, indent=1, default=float)
    markdown_path = os.path.splitext(json_path)[0] + ".md"
    with open(markdown_path, "w") as handle:
        handle.write(markdown(result))
    plot_path = plot_path or os.path.splitext(json_path)[0] + ".png"
    plot(result, plot_path)
    return {"json": json_path, "markdown": markdown_path, "plot": plot_path}
