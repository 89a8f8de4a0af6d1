"""The evaluation run: dense vs sparse on held-out documents at several lengths, for the learned
selector and the training-free baselines, each at several budgets.

Every method runs through the same attached model (``handle.using(method)``), on the same
tokens, against the same dense run, so rows compare at equal footing; the fraction of KV blocks
read is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import time
from typing import Iterable

import torch

from ..integrations.hf import LearnedSelection, SelectionMethod, SpotAttention, full_attention_layers
from .perplexity import LogitComparison, compare_logits, final_hidden_states


@dataclasses.dataclass
class Document:
    name: str  # where the text came from (a file path), recorded in the results
    ids: torch.Tensor  # int64 [tokens]
    info: dict = dataclasses.field(default_factory=dict)  # provenance (split, sha256, ...) for the results


@dataclasses.dataclass
class _Accumulator:
    comparison: LogitComparison = dataclasses.field(default_factory=LogitComparison)
    blocks_read: float = 0.0
    blocks_visible: float = 0.0
    recall_sum: float = 0.0
    recall_rows: int = 0
    documents: int = 0
    seconds: float = 0.0
    per_layer_read: dict = dataclasses.field(default_factory=dict)
    per_layer_visible: dict = dataclasses.field(default_factory=dict)


def method_label(method: SelectionMethod) -> tuple[str, object]:
    budget = getattr(method, "budget", None)
    if isinstance(method, LearnedSelection):
        override = method.top_p_override
        return ("spot", "calibrated" if override is None else override)
    return (method.name, budget)


def learned_methods(selectors, top_p_sweep: Iterable[float] = (0.7, 0.8, 0.9, 0.95, 0.98)) -> list[SelectionMethod]:
    """The selector as calibrated, then at each global top_p of the sweep."""
    methods: list[SelectionMethod] = [LearnedSelection(selectors)]
    methods += [LearnedSelection(selectors, top_p=p) for p in top_p_sweep]
    return methods


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """SPOT_COMMIT when set (a copied tree whose .git, if any, is not the code that runs), else
    git's HEAD."""
    if os.environ.get("SPOT_COMMIT"):
        return os.environ["SPOT_COMMIT"]
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_eval(
    model,
    handle: SpotAttention,
    documents: list[Document] | dict[int, list[Document]],
    lengths: Iterable[int],
    methods: list[SelectionMethod],
    *,
    docs_per_length: int = 2,
    progress: bool = True,
    log=print,
) -> dict:
    """Rows ``{method, budget, L, frac_read, ppl, ppl_dense, ppl_delta_pct, top1_agree, kl, recall, ...}``
    averaged over up to ``docs_per_length`` documents of at least ``L`` tokens (token-weighted for
    the next-token statistics, block-weighted for the budget). ``documents`` is one pool for every
    length or ``{L: pool}``."""
    device = next(model.parameters()).device
    config = model.config.get_text_config(decoder=True)
    all_full = full_attention_layers(config)
    dense_layers = [index for index in all_full if index not in handle.layers]
    plan = []
    used_documents: dict[str, dict] = {}
    for length in lengths:
        pool = documents.get(length, []) if isinstance(documents, dict) else documents
        chosen = [doc for doc in pool if doc.ids.numel() >= length][:docs_per_length]
        if not chosen:
            log(f"eval: no held-out document has {length} tokens; length skipped")
        for doc in chosen:
            plan.append((length, doc))
            entry = used_documents.setdefault(doc.name, {**doc.info, "name": doc.name,
                                                         "tokens": int(doc.ids.numel()), "lengths": []})
            entry["lengths"].append(length)
    total_steps = len(plan) * (1 + len(methods))
    bar = _progress_bar(total_steps, progress)
    accumulators: dict[tuple, _Accumulator] = {}
    dense_seconds: dict[int, float] = {}
    started = time.perf_counter()
    for length, doc in plan:
        ids = doc.ids[:length][None].to(device)
        _synchronize(device)
        tick = time.perf_counter()
        with handle.dense():
            dense_hidden = final_hidden_states(model, ids)
        _synchronize(device)
        dense_seconds[length] = dense_seconds.get(length, 0.0) + time.perf_counter() - tick
        bar.update(1)
        for method in methods:
            name, budget = method_label(method)
            bar.set_description(f"L={length} {name} {budget}")
            handle.stats.reset()
            _synchronize(device)
            tick = time.perf_counter()
            with handle.using(method):
                sparse_hidden = final_hidden_states(model, ids)
            _synchronize(device)
            seconds = time.perf_counter() - tick
            comparison = compare_logits(model, dense_hidden, sparse_hidden, ids)
            entry = accumulators.setdefault((name, str(budget), length), _Accumulator())
            entry.comparison.add(comparison)
            entry.documents += 1
            entry.seconds += seconds
            for index, budget_stats in handle.stats.layers.items():
                entry.blocks_read += budget_stats.blocks_read
                entry.blocks_visible += budget_stats.blocks_visible
                entry.recall_sum += budget_stats.recall_sum
                entry.recall_rows += budget_stats.recall_rows
                entry.per_layer_read[index] = entry.per_layer_read.get(index, 0) + budget_stats.blocks_read
                entry.per_layer_visible[index] = entry.per_layer_visible.get(index, 0) + budget_stats.blocks_visible
            # Layers left dense read every visible block.
            if handle.stats.layers and dense_layers:
                visible_per_layer = next(iter(handle.stats.layers.values())).blocks_visible
                entry.blocks_read += visible_per_layer * len(dense_layers)
                entry.blocks_visible += visible_per_layer * len(dense_layers)
            bar.update(1)
        del dense_hidden
    bar.close()
    rows = []
    budgets = {method_label(method): method for method in methods}
    for (name, budget_text, length), entry in accumulators.items():
        comparison = entry.comparison
        budget = next((b for (n, b) in budgets if n == name and str(b) == budget_text), budget_text)
        per_layer = {
            str(index): entry.per_layer_read[index] / entry.per_layer_visible[index]
            for index in sorted(entry.per_layer_read) if entry.per_layer_visible[index]
        }
        rows.append({
            "method": name,
            "budget": budget,
            "L": length,
            "frac_read": entry.blocks_read / entry.blocks_visible if entry.blocks_visible else float("nan"),
            "ppl_dense": comparison.ppl_dense,
            "ppl": comparison.ppl_sparse,
            "ppl_delta_pct": comparison.ppl_delta_pct,
            "top1_agree": comparison.top1_agree,
            "kl": comparison.kl_mean,
            "recall": entry.recall_sum / entry.recall_rows if entry.recall_rows else float("nan"),
            "tokens": comparison.tokens,
            "documents": entry.documents,
            "seconds": entry.seconds,
            "dense_seconds": dense_seconds.get(length, float("nan")),
            "frac_read_per_layer": per_layer,
        })
    # One dense row per length: the reference every sparse row's ppl_delta_pct is taken against.
    for length in sorted({row["L"] for row in rows}):
        same_length = [row for row in rows if row["L"] == length]
        rows.append({
            "method": "dense", "budget": None, "L": length, "frac_read": 1.0, "ppl_dense": same_length[0]["ppl_dense"],
            "ppl": same_length[0]["ppl_dense"], "ppl_delta_pct": 0.0, "top1_agree": 1.0, "kl": 0.0, "recall": 1.0,
            "tokens": same_length[0]["tokens"], "documents": same_length[0]["documents"],
            "seconds": dense_seconds.get(length, float("nan")), "dense_seconds": dense_seconds.get(length, float("nan")),
            "frac_read_per_layer": {},
        })
    rows.sort(key=lambda row: (row["L"], row["method"], row["frac_read"]))
    return {
        "device": device_description(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attached_layers": handle.layers,
        "dense_layers": dense_layers,
        "documents": list(used_documents.values()),
        "rows": rows,
        "backend": handle.report(),
        "wall_s": time.perf_counter() - started,
    }


class _NoBar:
    def update(self, count=1):
        pass

    def set_description(self, text):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run", dynamic_ncols=True)


def summarize(rows: list[dict], method: str = "spot") -> str:
    lines = []
    for row in rows:
        if row["method"] != method:
            continue
        lines.append(
            f"L={row['L']:>5} {row['method']} {row['budget']}: read {row['frac_read']:.3f} of the blocks, "
            f"ppl {row['ppl_dense']:.3f} -> {row['ppl']:.3f} ({row['ppl_delta_pct']:+.2f}%), "
            f"top-1 agreement {row['top1_agree']:.4f}, recall {row['recall']:.4f}"
        )
    return "\n".join(lines)

