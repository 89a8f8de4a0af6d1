"""How the key-block size bounds what any selector can reach: the oracle top-p baseline (true
attention mass per block) on the default model at one length, for several block sizes.

    python bench/oracle_blocks.py --length 8192 --docs 1 --block-sizes 64 32 --top-p 0.9 0.95 0.97

Every layer's prefill reads, per query block, the fewest key blocks whose true attention mass
reaches top_p (sink + local blocks kept), so the rows are the best perplexity a learned selector
could reach at that fraction of the KV read. Writes JSON and Markdown (``--out``, default
bench/results/oracle_blocks_<device>.json / .md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from benchlib import ROOT, device_tag, git_commit, import_spot_attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or model directory (default: SmolLM2-135M)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.95, 0.97])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import_spot_attention()
    from spot_attention import cli
    from spot_attention.eval import baselines, harness
    from spot_attention.integrations import hf

    if args.threads:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype("auto", device)
    model, tokenizer = cli.load_model(args.model, device, dtype, print)
    documents = {args.length: cli.heldout_documents(tokenizer, args.length, args.docs)}
    rows = []
    for block_size in args.block_sizes:
        methods = baselines.baseline_methods(block_size, {"oracle": args.top_p, "quest": [], "twilight": [],
                                                          "streaming": []})
        with hf.attached(model, method=methods[0], measure_recall=True) as handle:
            result = harness.run_eval(model, handle, documents, [args.length], methods, docs_per_length=args.docs,
                                      progress=False)
        for row in result["rows"]:
            if row["method"] == "dense":
                continue
            rows.append({"block_size": block_size, "top_p": row["budget"], "L": row["L"],
                         "frac_read": row["frac_read"], "ppl_delta_pct": row["ppl_delta_pct"],
                         "top1_agree": row["top1_agree"], "recall": row["recall"], "documents": row["documents"]})
            print(f"block {block_size:3d} oracle top_p {row['budget']}: read {row['frac_read']:.3f}, "
                  f"ppl {row['ppl_delta_pct']:+.2f}%, top-1 {row['top1_agree']:.3f}, recall {row['recall']:.3f}",
                  flush=True)
    name = harness.device_description(device)
    out = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "L": args.length, "documents": result["documents"], "rows": rows}
    tag = device_tag(device, name)
    path = args.out or os.path.join(ROOT, "bench", "results", f"oracle_blocks_{tag}.json")
    with open(path, "w") as handle:
        json.dump(out, handle, indent=1)
    lines = [f"# Oracle top-p by key-block size (L={args.length}, {name}, commit {out['commit']})", "",
             "| block | top_p | frac_read | ppl change % | top-1 agree | recall |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['block_size']} | {r['top_p']} | {r['frac_read']:.3f} | {r['ppl_delta_pct']:+.2f} | "
              f"{r['top1_agree']:.3f} | {r['recall']:.3f} |" for r in rows]
    with open(os.path.splitext(path)[0] + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
