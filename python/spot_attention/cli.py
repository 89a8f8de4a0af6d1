"""``spot-attn``: the command line of SpotAttention.

    spot-attn demo      dense vs sparse on one long held-out document (CPU or GPU, minutes)
    spot-attn eval      the full evaluation: perplexity/agreement/KL/recall/blocks read at 2K-8K,
                        training-free baselines at several budgets, passkey; JSON + Markdown + PNG
    spot-attn distill   trains selectors for a model (see spot_attention.distill)
    spot-attn selfcheck every op on small random inputs against the reference, as a table
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

DEFAULT_SELECTOR = "smollm2-135m"
EXIT_MISSING = 2


class MissingPiece(RuntimeError):
    """A part the command needs is not available (a selector not shipped, a module not built)."""


# --------------------------------------------------------------------------------------------
# The pieces a command needs: model, selectors, held-out documents
# --------------------------------------------------------------------------------------------


def shipped_selector_dir(name: str = DEFAULT_SELECTOR) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "selectors", name)


def pick_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device):
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[requested]


def load_model(path: str | None, device, dtype, log):
    """(model, tokenizer) through ``spot_attention.models.load_model`` (the default SmolLM2
    GGUF when ``path`` is None)."""
    from . import models

    tick = time.perf_counter()
    try:
        model, tokenizer = models.load_model(path, dtype=dtype, device=device)
    except FileNotFoundError as error:
        raise MissingPiece(str(error)) from error
    log(f"model: {path or models.DEFAULT_GGUF_NAME} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters) on {device}, {str(dtype).replace('torch.', '')}, loaded in {time.perf_counter() - tick:.0f} s")
    return model, tokenizer


def load_selectors(directory: str | None, device, log):
    """``SpotSelectors.load(directory)``; the shipped SmolLM2 selector by default."""
    directory = directory or shipped_selector_dir()
    if not os.path.isdir(directory) or not os.path.isfile(os.path.join(directory, "selector.json")):
        raise MissingPiece(
            f"no selector at {directory}: the SmolLM2-135M selector is not shipped yet. Train one with "
            "`spot-attn distill --model <dir> --out <dir>` and pass it with --selector <dir>."
        )
    try:
        selector_module = importlib.import_module("spot_attention.selector")
    except ImportError as error:
        raise MissingPiece(f"spot_attention.selector is not available ({error})") from error
    selectors = selector_module.SpotSelectors.load(directory, device)
    log(f"selector: {directory} ({len(selectors.layers)} layers, block {selectors.config.block_size}, "
        f"K-cache {selectors.config.kcache_format})")
    return selectors


def train_context(selectors) -> int | None:
    """The longest sequence the selector was trained on, from its recorded provenance."""
    config = getattr(selectors, "config", None)
    training = getattr(config, "training", None) or {}
    if isinstance(training, dict) and isinstance(training.get("settings"), dict):
        training = {**training["settings"], **{k: v for k, v in training.items() if k != "settings"}}
    for name in ("train_ctx", "train_length", "window_length", "length", "max_length", "seq_len"):
        value = training.get(name) if isinstance(training, dict) else None
        if value is None and config is not None:
            value = getattr(config, name, None)
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
            return int(value)
        if isinstance(value, (list, tuple)) and value:
            return int(max(value))
    return None


def heldout_documents(tokenizer, min_tokens: int, count: int, files: list[str] | None = None):
    """Held-out documents of at least ``min_tokens`` tokens: ``files`` when given, otherwise the
    held-out split of ``spot_attention.data`` (stdlib files never used in training)."""
    from .eval.harness import Document

    documents = []
    if files:
        for path in files:
            text = open(path, encoding="utf-8", errors="replace").read()
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if ids.numel() >= min_tokens:
                documents.append(Document(path, ids, {"path": os.path.abspath(path), "tokens": int(ids.numel())}))
            if len(documents) >= count:
                break
    else:
        from . import data

        records: list[dict] = []
        for ids in data.documents("heldout", min_tokens, tokenizer, limit=count, used=records):
            record = records[-1]
            documents.append(Document(record["path"], ids, dict(record)))
    if not documents:
        raise MissingPiece(f"no held-out document has {min_tokens} tokens")
    return documents


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def command_demo(args) -> int:
    import torch

    from .eval.perplexity import compare_logits, final_hidden_states
    from .integrations import hf

    log = print
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    selectors = load_selectors(args.selector, device, log)  # first: fail fast when none is shipped
    model, tokenizer = load_model(args.model, device, dtype, log)
    document = heldout_documents(tokenizer, args.tokens, 1, args.documents)[0]
    ids = document.ids[: args.tokens][None].to(device)
    log(f"document: {document.name} (first {ids.shape[1]} of {document.ids.numel()} tokens)")
    handle = hf.attach(model, selectors, backend=args.backend)
    timings = {}
    with handle.dense():
        tick = time.perf_counter()
        dense_hidden = final_hidden_states(model, ids)
        timings["dense"] = time.perf_counter() - tick
    handle.stats.reset()
    tick = time.perf_counter()
    sparse_hidden = final_hidden_states(model, ids)
    timings["sparse"] = time.perf_counter() - tick
    comparison = compare_logits(model, dense_hidden, sparse_hidden, ids)
    frac = handle.stats.fraction_read()
    log("")
    log(f"{'':<8}{'perplexity':>12}{'blocks read':>14}{'wall s':>9}")
    log(f"{'dense':<8}{comparison.ppl_dense:>12.3f}{1.0:>14.3f}{timings['dense']:>9.2f}")
    log(f"{'sparse':<8}{comparison.ppl_sparse:>12.3f}{frac:>14.3f}{timings['sparse']:>9.2f}")
    log(f"perplexity change {comparison.ppl_delta_pct:+.2f}%, top-1 next-token agreement "
        f"{comparison.top1_agree:.4f}, KL(dense||sparse) {comparison.kl_mean:.4f} nats/token")
    ops_used = handle.report()["ops"]
    log("ops: " + ", ".join(f"{name}={path}" for name, path in ops_used.items()))
    return 0


def command_eval(args) -> int:
    import torch

    from .eval import baselines, harness, passkey, report
    from .integrations import hf

    log = print
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    if args.quick:
        lengths, docs_per_length = args.lengths or [2048], 1
        passkey_lengths = args.passkey_lengths if args.passkey_lengths is not None else []
        budgets = {"oracle": [0.9], "quest": [8], "twilight": [0.9], "streaming": [6]}
        sweep = []
    else:
        lengths, docs_per_length = args.lengths or [2048, 4096, 8192], args.docs
        passkey_lengths = args.passkey_lengths if args.passkey_lengths is not None else [1024, 2048]
        budgets, sweep = None, args.top_p_sweep
    selectors = None
    try:
        selectors = load_selectors(args.selector, device, log)
    except MissingPiece as error:
        if not args.baselines_only:
            raise
        log(f"{error}\nrunning the baselines only")
    model, tokenizer = load_model(args.model, device, dtype, log)
    documents = {length: heldout_documents(tokenizer, length, docs_per_length, args.documents)
                 for length in lengths}
    block_size = 64
    methods = []
    if selectors is not None:
        learned = hf.LearnedSelection(selectors)
        block_size = learned.block_size
        methods += harness.learned_methods(selectors, sweep)
    if not args.no_baselines:
        methods += baselines.baseline_methods(block_size, budgets)
    if not methods:
        raise MissingPiece("nothing to evaluate: no selector and --no-baselines")
    # The learned selector's layers when there is one (the rest stay dense for every method).
    layers = sorted(methods[0].layers) if selectors is not None else None
    handle = hf.attach(model, method=methods[0], layers=layers, backend=args.backend, measure_recall=True)
    result = harness.run_eval(model, handle, documents, lengths, methods, docs_per_length=docs_per_length,
                              progress=not args.no_progress, log=log)
    result["model"] = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    result["train_ctx"] = train_context(selectors) if selectors is not None else None
    result["selector"] = None if selectors is None else {
        "path": args.selector or f"shipped:{DEFAULT_SELECTOR}", "block_size": selectors.config.block_size}
    result["quick"] = bool(args.quick)
    if passkey_lengths and selectors is not None:
        handle.method = methods[0]
        rows = passkey.run_passkey(model, tokenizer, handle, passkey_lengths)
        result["passkey"] = rows
        result["passkey_sparse_keeps_dense"] = all(row["sparse_ok"] for row in rows if row["dense_ok"])
    out = args.out or os.path.join("bench", "results", "eval_smollm2_quick.json" if args.quick else
                                   "eval_smollm2.json")
    paths = report.write(result, out)
    log("")
    first_sparse = next((row["method"] for row in result["rows"] if row["method"] != "dense"), "spot")
    log(harness.summarize(result["rows"]) or harness.summarize(result["rows"], first_sparse))
    if "passkey" in result:
        log(f"passkey: sparse keeps every dense success: {result['passkey_sparse_keeps_dense']}")
    log(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']} in {result['wall_s']:.0f} s")
    return 0


def command_distill(args) -> int:
    distill = _distill_module()
    if distill is None:
        raise MissingPiece("spot_attention.distill is not available")
    return int(distill.run(args) or 0)


def _distill_module():
    try:
        return importlib.import_module("spot_attention.distill")
    except ImportError:
        return None


def command_selfcheck(args) -> int:
    from .eval.selfcheck import format_table, run_selfcheck

    devices = [args.device] if args.device != "all" else ["cpu"] + (["cuda"] if _cuda_present() else [])
    failed = False
    for device in devices:
        results = run_selfcheck(device)
        print(f"\n## {device}\n")
        print(format_table(results))
        failed |= any(item.status in ("MISMATCH", "error") for item in results)
    return 1 if failed else 0


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spot-attn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", default=None, help="model directory (default: the SmolLM2-135M GGUF)")
        sub.add_argument("--selector", default=None, help=f"selector directory (default: shipped {DEFAULT_SELECTOR})")
        sub.add_argument("--device", default="auto", help="cpu, cuda or auto")
        sub.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU)")
        sub.add_argument("--backend", default="auto", choices=["auto", "kernels", "masked"],
                         help="sparse attention: kernels where compiled (auto), kernels only, or masked SDPA")
        sub.add_argument("--documents", nargs="*", default=None,
                         help="text files to use instead of the held-out split")

    demo = commands.add_parser("demo", help="dense vs sparse on one long held-out document")
    common(demo)
    demo.add_argument("--tokens", type=int, default=2048)

    evaluate = commands.add_parser("eval", help="the evaluation with baselines (JSON + Markdown + PNG)")
    common(evaluate)
    evaluate.add_argument("--quick", action="store_true", help="one document at 2K, one budget per baseline")
    evaluate.add_argument("--lengths", type=int, nargs="*", default=None)
    evaluate.add_argument("--docs", type=int, default=2, help="documents per length")
    evaluate.add_argument("--top-p-sweep", type=float, nargs="*", default=[0.8, 0.9, 0.95, 0.98])
    evaluate.add_argument("--passkey-lengths", type=int, nargs="*", default=None)
    evaluate.add_argument("--no-baselines", action="store_true")
    evaluate.add_argument("--baselines-only", action="store_true",
                          help="run the baselines when no selector is available")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--out", default=None, help="JSON path (Markdown and PNG are written beside it)")

    distill = commands.add_parser("distill", help="train selectors by KL distillation (spot_attention.distill)")
    distill_module = _distill_module()
    if distill_module is not None:
        distill_module.add_arguments(distill)
    else:
        distill.add_argument("--model", default=None)
        distill.add_argument("--out", required=True)

    selfcheck = commands.add_parser("selfcheck", help="every op against the reference on small random inputs")
    selfcheck.add_argument("--device", default="all", help="cpu, cuda or all")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return command_demo(args)
        if args.command == "eval":
            return command_eval(args)
        if args.command == "distill":
            return command_distill(args)
        return command_selfcheck(args)
    except MissingPiece as error:
        print(f"spot-attn {args.command}: {error}", file=sys.stderr)
        return EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
