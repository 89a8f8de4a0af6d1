"""Dual top-p block selection, its knobs, budget statistics and per-layer calibration of ``p``.

The rule (``reference.select_blocks`` is its definition): for a row with ``n`` visible blocks and
selector probabilities ``prob = softmax(scores[:n])``, the forced blocks ``F`` (the first
``sink_blocks`` and the last ``local_blocks`` visible ones) are always kept; of the others, ranked
by probability, the fewest whose mass added to ``mass(F)`` reaches ``top_p`` are kept; the total
count is clamped into ``[k_min, k_max]``. The budget thus varies per query, group and layer.

``top_p`` is set per layer by ``calibrate_top_p``: the smallest ``p`` whose selection keeps, on
held-out text, the target share of the layer's TRUE attention mass (recall = teacher mass of the
chosen blocks), found by bisection (recall is non-decreasing in ``p``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from . import reference


@dataclasses.dataclass
class LayerKnobs:
    top_p: float
    k_min: int
    k_max: int
    sink_blocks: int
    local_blocks: int


@dataclasses.dataclass
class DualTopP:
    """The policy's knobs: ``top_p`` one value or ``{layer: p}``; the rest shared by all layers."""

    top_p: float | dict[int, float] = 0.95
    k_min: int = 2
    k_max: int = 1 << 20
    sink_blocks: int = 1
    local_blocks: int = 2
    default_top_p: float = 0.95

    @classmethod
    def from_config(cls, config: Any) -> "DualTopP":
        """From a ``SelectorConfig`` (uncalibrated layers get ``default_top_p``)."""
        return cls(top_p=dict(config.top_p or {}), k_min=config.k_min, k_max=config.k_max,
                   sink_blocks=config.sink_blocks, local_blocks=config.local_blocks)

    def layer_top_p(self, layer: int | None) -> float:
        if isinstance(self.top_p, dict):
            return float(self.top_p.get(layer, self.default_top_p)) if layer is not None else self.default_top_p
        return float(self.top_p)

    def knobs(self, layer: int | None = None, num_blocks: int | None = None) -> LayerKnobs:
        """Knobs of a layer; with ``num_blocks`` the counts are clamped into what the selection
        kernels accept for rows of that width (``sink + local <= k_max <= num_blocks``)."""
        k_max = self.k_max
        k_min = self.k_min
        if num_blocks is not None:
            k_max = max(min(k_max, num_blocks), self.sink_blocks + self.local_blocks)
            k_min = min(k_min, k_max)
        return LayerKnobs(self.layer_top_p(layer), k_min, k_max, self.sink_blocks, self.local_blocks)

    def select(self, scores: torch.Tensor, num_visible: torch.Tensor, layer: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int32 [B, H, NQ, k_max] ascending, -1 padded; counts int32 [B, H, NQ]).
        scores float32 [B, H, NQ, NK]; num_visible int32 [B, NQ]."""
        knobs = self.knobs(layer, scores.shape[-1])
        return select(scores, num_visible, knobs.top_p, knobs.k_min, knobs.k_max, knobs.sink_blocks,
                      knobs.local_blocks)

    def select_mask(self, scores: torch.Tensor, num_visible: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        knobs = self.knobs(layer)
        return select_mask(scores, num_visible, knobs.top_p, knobs.k_min, knobs.k_max, knobs.sink_blocks,
                           knobs.local_blocks)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def select(scores, num_visible, top_p, k_min, k_max, sink_blocks=1, local_blocks=1):
    """``torch.ops.spot.select_blocks``; where that kernel is not built (a placeholder) the same
    rule runs through ``select_mask`` (ties between equal probabilities may then be broken
    differently from the kernel, never the counts' rule)."""
    try:
        from . import ops

        return ops.select_blocks(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks)
    except (RuntimeError, NotImplementedError, ImportError) as error:
        if not isinstance(error, ImportError) and "not implemented" not in str(error):
            raise
    mask = select_mask(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks)
    return indices_from_mask(mask, k_max)


def indices_from_mask(mask: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., NK] -> (int32 [..., k_max] ascending, -1 padded; int32 counts [...])."""
    nk = mask.shape[-1]
    positions = torch.arange(nk, device=mask.device).expand_as(mask)
    keyed = torch.where(mask, positions, torch.full_like(positions, nk))
    ordered = keyed.sort(-1).values[..., :k_max]
    if ordered.shape[-1] < k_max:
        ordered = torch.nn.functional.pad(ordered, (0, k_max - ordered.shape[-1]), value=nk)
    indices = torch.where(ordered < nk, ordered, torch.full_like(ordered, -1)).to(torch.int32)
    return indices, mask.sum(-1).clamp(max=k_max).to(torch.int32)


def select_mask(
    scores: torch.Tensor,
    num_visible: torch.Tensor,
    top_p: float | torch.Tensor,
    k_min: int,
    k_max: int,
    sink_blocks: int = 1,
    local_blocks: int = 1,
) -> torch.Tensor:
    """Vectorised dual top-p: bool [B, H, NQ, NK], True for the chosen blocks.

    scores [B, H, NQ, NK] logits (``-inf`` = probability 0); num_visible int [B, NQ]; ``top_p`` a
    float or a tensor broadcastable to [B, H, NQ] (e.g. a candidate ``p`` per layer during
    calibration). Same rule as ``reference.select_blocks``, computed in float64."""
    batch, heads, nq, nk = scores.shape
    device = scores.device
    positions = torch.arange(nk, device=device)
    n = num_visible.to(device).long()[:, None, :, None]  # [B, 1, NQ, 1]
    visible = positions < n  # [B, 1, NQ, NK]
    logits = scores.double().masked_fill(~visible, float("-inf"))
    empty = torch.isinf(logits).all(-1, keepdim=True) & (logits < 0).all(-1, keepdim=True)
    prob = torch.softmax(logits.masked_fill(empty, 0.0), -1).masked_fill(empty | ~visible, 0.0)
    forced = visible & ((positions < sink_blocks) | (positions >= n - local_blocks))
    forced = forced.expand(batch, heads, nq, nk)
    candidate = visible.expand_as(forced) & ~forced
    forced_mass = (prob * forced).sum(-1)  # [B, H, NQ]
    # Rank candidates by probability, ties to the lower index (stable sort of a descending key).
    ranked_prob = torch.where(candidate, prob, torch.full_like(prob, -1.0))
    order = torch.sort(ranked_prob, dim=-1, descending=True, stable=True).indices
    sorted_prob = torch.gather(prob * candidate, -1, order)
    sorted_is_candidate = torch.gather(candidate, -1, order)
    before = forced_mass[..., None] + torch.cumsum(sorted_prob, -1) - sorted_prob  # mass before taking each
    if isinstance(top_p, torch.Tensor):
        threshold = top_p.to(device=device, dtype=torch.float64).expand(batch, heads, nq)[..., None]
    else:
        threshold = float(top_p)
    k_p = ((before < threshold) & sorted_is_candidate).sum(-1)  # [B, H, NQ]
    num_forced = forced.sum(-1)
    num_candidates = candidate.sum(-1)
    total = torch.clamp(num_forced + k_p, min=k_min, max=k_max)
    extra = torch.minimum(torch.clamp(total - num_forced, min=0), num_candidates)
    rank = torch.arange(nk, device=device)
    take_sorted = (rank < extra[..., None]) & sorted_is_candidate
    chosen = torch.zeros_like(forced)
    chosen.scatter_(-1, order, take_sorted)
    return chosen | forced


# --------------------------------------------------------------------------------------------
# Budget statistics and recall
# --------------------------------------------------------------------------------------------


def budget_stats(mask: torch.Tensor, num_visible: torch.Tensor) -> dict[str, float]:
    """Blocks read per row and the fraction of visible blocks read. mask bool [B, H, NQ, NK];
    num_visible [B, NQ]."""
    rows = mask.shape[0] * mask.shape[1] * mask.shape[2]
    read = float(mask.sum())
    visible = float(num_visible.long().sum()) * mask.shape[1]
    return {"blocks_read_per_row": read / max(rows, 1), "blocks_visible_per_row": visible / max(rows, 1),
            "fraction_read": read / visible if visible else float("nan")}


def recall(mask: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Teacher attention mass of the chosen blocks per row ([B, H, NQ]); teacher rows sum to 1."""
    return (teacher.double() * mask).sum(-1) / teacher.double().sum(-1).clamp(min=1e-30)


class BudgetTracker:
    """Per-layer accumulation of blocks read, blocks visible and recall."""

    def __init__(self) -> None:
        self.read: dict[int, float] = {}
        self.visible: dict[int, float] = {}
        self.recall_sum: dict[int, float] = {}
        self.rows: dict[int, int] = {}

    def add(self, layer: int, mask: torch.Tensor, num_visible: torch.Tensor, teacher: torch.Tensor | None = None):
        self.read[layer] = self.read.get(layer, 0.0) + float(mask.sum())
        self.visible[layer] = self.visible.get(layer, 0.0) + float(num_visible.long().sum()) * mask.shape[1]
        if teacher is not None:
            self.recall_sum[layer] = self.recall_sum.get(layer, 0.0) + float(recall(mask, teacher).sum())
            self.rows[layer] = self.rows.get(layer, 0) + mask.shape[0] * mask.shape[1] * mask.shape[2]

    def per_layer(self) -> dict[int, dict[str, float]]:
        return {
            layer: {
                "fraction_read": self.read[layer] / self.visible[layer] if self.visible[layer] else float("nan"),
                "recall": self.recall_sum[layer] / self.rows[layer] if self.rows.get(layer) else float("nan"),
            }
            for layer in sorted(self.read)
        }

    def fraction_read(self) -> float:
        """Blocks read over blocks visible, all layers pooled."""
        visible = sum(self.visible.values())
        return sum(self.read.values()) / visible if visible else float("nan")

    def mean_layer_fraction_read(self) -> float:
        """Mean over layers of each layer's fraction read."""
        values = [v["fraction_read"] for v in self.per_layer().values()]
        return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CalibrationRows:
    """Selector logits and teacher mass of one layer on held-out rows.

    scores [B, Hkv, R, NK] (``-inf`` for blocks the selector cannot score, e.g. a partial local
    block), num_visible int [B, R], teacher [B, Hkv, R, NK] true attention mass per block."""

    scores: torch.Tensor
    num_visible: torch.Tensor
    teacher: torch.Tensor


def layer_recall(rows: Iterable[CalibrationRows], top_p: float, knobs: LayerKnobs) -> tuple[float, float]:
    """(mean recall, fraction of visible blocks read) of a layer at ``top_p``."""
    recall_sum, count, read, visible = 0.0, 0, 0.0, 0.0
    for item in rows:
        mask = select_mask(item.scores, item.num_visible, top_p, knobs.k_min, knobs.k_max, knobs.sink_blocks,
                           knobs.local_blocks)
        values = recall(mask, item.teacher)
        recall_sum += float(values.sum())
        count += values.numel()
        read += float(mask.sum())
        visible += float(item.num_visible.long().sum()) * mask.shape[1]
    return recall_sum / max(count, 1), read / visible if visible else float("nan")


def calibrate_top_p(
    selectors: Any,
    rows_by_layer: dict[int, list[CalibrationRows]],
    target_recall: float,
    policy: DualTopP | None = None,
    iterations: int = 24,
) -> dict[int, dict[str, float]]:
    """Per-layer smallest ``p`` (to ``2^-iterations``) whose selection keeps ``target_recall`` of
    the true attention mass on the given rows, by bisection. Writes ``selectors.config.top_p``
    when ``selectors`` has a config. Returns ``{layer: {"top_p", "recall", "fraction_read"}}``."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"argument 'target_recall': expected a value in (0, 1], got {target_recall}")
    config = getattr(selectors, "config", None)
    policy = policy or (DualTopP.from_config(config) if config is not None else DualTopP())
    result: dict[int, dict[str, float]] = {}
    for layer, rows in sorted(rows_by_layer.items()):
        knobs = policy.knobs(layer)
        low, high = 0.0, 1.0
        low_recall, _ = layer_recall(rows, low, knobs)
        if low_recall >= target_recall:
            high = 0.0
        else:
            for _ in range(iterations):
                middle = 0.5 * (low + high)
                if layer_recall(rows, middle, knobs)[0] >= target_recall:
                    high = middle
                else:
                    low = middle
        achieved, fraction = layer_recall(rows, high, knobs)
        result[layer] = {"top_p": high, "recall": achieved, "fraction_read": fraction}
    if config is not None:
        top_p = dict(config.top_p or {})
        top_p.update({layer: item["top_p"] for layer, item in result.items()})
        config.top_p = top_p
    return result


@torch.no_grad()
def selector_rows(selector, query: torch.Tensor, key: torch.Tensor, scaling: float, token_rows: int = 256,
                  generator: torch.Generator | None = None, kcache_format: str = "dense",
                  prefill_reads_kcache: bool = False) -> dict[str, CalibrationRows]:
    """Prefill rows (every query block) and decode rows (``token_rows`` random positions) of one
    layer, scored the way the integration scores them: complete blocks only, the partial local
    block visible but unscored; decode rows read the selector keys through the K-cache format
    (the 4-bit round trip of the integration's cache, ``kcache_round_trip``), prefill rows the
    float keys, or with ``prefill_reads_kcache`` the keys as the cache returns them (bf16 for
    "dense"), as ``LearnedSelection(prefill_reads_kcache=True)`` scores them.
    query [B, Hq, L, d]; key [B, Hkv, L, d] post-RoPE."""
    from .integrations.hf import kcache_round_trip
    from .distill import prefill_targets, teacher_token_mass

    block = selector.block_size
    batch, _, length, _ = query.shape
    nk = reference.num_blocks(length, block)
    token_mass = teacher_token_mass(query, key, scaling, block)  # [B, Hkv, L, NK]
    key_features = selector.key_features(key)
    complete = key_features.shape[2]
    query_features = selector.query_features(query)

    pooled = selector.pool_query_blocks(query_features)
    nq = pooled.shape[2]
    row = torch.arange(nq, device=query.device)
    scored = torch.clamp(row + 1, max=complete)[None].expand(batch, -1)
    # One round trip serves both row kinds: decode rows always read the cache (float keys stand
    # in for a "dense" one unless prefill reads it too), prefill rows on request.
    cached_keys = key_features
    if (kcache_format != "dense" or prefill_reads_kcache) and complete > 0:
        cached_keys = kcache_round_trip(key_features, kcache_format)
    prefill_keys = cached_keys if prefill_reads_kcache else key_features
    scores = selector.logits(pooled, prefill_keys, scored)
    scores = torch.nn.functional.pad(scores, (0, nk - complete), value=float("-inf"))
    prefill = CalibrationRows(scores, (row + 1)[None].expand(batch, -1), prefill_targets(token_mass, block))

    generator = generator or torch.Generator().manual_seed(0)
    positions = torch.randperm(length, generator=generator)[: min(token_rows, length)].sort().values.to(query.device)
    scored = ((positions + 1) // block).clamp(max=complete)
    visible = (positions + block) // block  # blocks touching [0, t]
    scores = selector.logits(query_features[:, :, positions], cached_keys, scored[None].expand(batch, -1))
    scores = torch.nn.functional.pad(scores, (0, nk - complete), value=float("-inf"))
    decode = CalibrationRows(scores, visible[None].expand(batch, -1), token_mass[:, :, positions])
    return {"prefill": prefill, "decode": decode}


def calibrate_selectors(
    selectors: Any,
    model: Any,
    tokenizer: Any,
    target_recall: float = 0.95,
    context: int | tuple[int, ...] | list[int] = 2048,
    windows: int = 4,
    token_rows: int = 256,
    seed: int = 0,
    split: str = "calibration",
    prefill_reads_kcache: bool = False,
    center_keys: bool = False,
) -> dict[str, Any]:
    """Captures ``windows`` windows of each ``context`` length from the calibration split, scores
    them with the selectors and sets ``selectors.config.top_p`` per layer (prefill and decode rows
    of every length pooled). With ``center_keys``, first refits each layer's ``key_center`` on the
    first window of each length. Records the files and the per-layer result in
    ``config.training["calibration"]``."""
    from . import data
    from .distill import capture_window

    contexts = [context] if isinstance(context, int) else list(context)
    used: list = []
    texts, firsts = [], []  # firsts: index in texts of each length's first window
    for length in contexts:
        windows_of_length = data.training_windows(tokenizer, length, windows, seed=seed, split=split, used=used)
        firsts += [len(texts)] if windows_of_length else []
        texts += windows_of_length
    generator = torch.Generator().manual_seed(seed)
    # The K-cache stores keys minus a center (exact for the distributions, kinder to 4 bits): fit
    # it on the first window of each length before any row reads the cache; those captures are
    # kept for their rows rather than taken twice.
    kept: dict[int, dict] = {}
    if center_keys:
        kept = {index: capture_window(model, texts[index][None], selectors.layers) for index in firsts}
        for layer in selectors.layers:
            selectors[layer].fit_key_center([captured[layer][1] for captured in kept.values()])
    rows: dict[int, list[CalibrationRows]] = {layer: [] for layer in selectors.layers}
    for index, window in enumerate(texts):
        captured = kept.pop(index, None) or capture_window(model, window[None], selectors.layers)
        for layer, (query, key, scaling) in captured.items():
            parts = selector_rows(selectors[layer], query, key, scaling, token_rows, generator,
                                  kcache_format=selectors.config.kcache_format,
                                  prefill_reads_kcache=prefill_reads_kcache)
            rows[layer].extend(parts.values())
        del captured
    result = calibrate_top_p(selectors, rows, target_recall)
    summary = {
        "target_recall": target_recall,
        "contexts": contexts,
        "windows": len(texts),
        "k_min": selectors.config.k_min,
        "sink_blocks": selectors.config.sink_blocks,
        "local_blocks": selectors.config.local_blocks,
        "kcache_format": selectors.config.kcache_format,
        "prefill_reads_kcache": prefill_reads_kcache,
        "key_center_fitted": center_keys,
        "files": sorted({record["path"] for record in used}),
        "fraction_read": {str(layer): round(item["fraction_read"], 4) for layer, item in result.items()},
        "recall": {str(layer): round(item["recall"], 4) for layer, item in result.items()},
        "mean_fraction_read": sum(item["fraction_read"] for item in result.values()) / max(len(result), 1),
    }
    selectors.config.training = dict(selectors.config.training or {}, calibration=summary)
    return {"top_p": {layer: item["top_p"] for layer, item in result.items()},
            "recall": {layer: item["recall"] for layer, item in result.items()}, "summary": summary}
