"""SpotAttention inside Hugging Face transformers (5.x): an attention function and a cache.

``attach(model, selectors)`` registers the ``"spot"`` attention function and switches the
model's full-attention layers to it; every other layer (sliding-window attention, and the
linear-attention layers of hybrid models, which never call an attention function) is left as it
was and runs dense SDPA. Inside an attached layer:

* prefill (``Lq == Lk``, plain causal): the selector scores query blocks against key blocks,
  dual top-p picks the key blocks, and ``spot.sparse_prefill`` attends to them;
* decode (``Lq == 1``): ``SpotCache`` keeps, next to the layer's KV, the selector K-cache
  (one pooled key per complete block, 4-bit packed or dense) and appends to it as blocks fill;
  ``spot.decode_select`` picks the blocks and ``spot.sparse_decode`` reads them from the KV cache;
* anything else (a chunk of several new tokens on top of a cache) runs dense and is counted.

Where a compiled kernel is missing on the device, the same selection drives the exact *masked*
backend (the block mask expanded to a dense mask through torch SDPA); ``SpotAttention.report()``
says which path each op took. ``handle.enabled = False`` (or ``with handle.dense():``) makes the
attached layers dense again without detaching; ``detach(model)`` restores the model.

The block choice itself is a ``SelectionMethod``: ``LearnedSelection`` (the trained selectors)
here, training-free baselines in ``spot_attention.eval.baselines``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from .. import reference
from . import kernels

ATTENTION_NAME = "spot"

# --------------------------------------------------------------------------------------------
# Budget statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerBudget:
    blocks_read: int = 0
    blocks_visible: int = 0
    # Teacher attention mass of the blocks read, summed over (batch, group, query block) rows.
    recall_sum: float = 0.0
    recall_rows: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    dense_calls: int = 0


class BudgetStats:
    """Blocks read / blocks visible per layer, accumulated over forward passes."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerBudget] = {}

    def reset(self) -> None:
        self.layers.clear()

    def layer(self, index: int) -> LayerBudget:
        return self.layers.setdefault(index, LayerBudget())

    def fraction_read(self, layers: list[int] | None = None) -> float:
        chosen = [self.layers[i] for i in (layers if layers is not None else self.layers) if i in self.layers]
        visible = sum(item.blocks_visible for item in chosen)
        return sum(item.blocks_read for item in chosen) / visible if visible else float("nan")

    def recall(self, layers: list[int] | None = None) -> float:
        chosen = [self.layers[i] for i in (layers if layers is not None else self.layers) if i in self.layers]
        rows = sum(item.recall_rows for item in chosen)
        return sum(item.recall_sum for item in chosen) / rows if rows else float("nan")

    def per_layer(self) -> dict[int, dict[str, float]]:
        table = {}
        for index, item in sorted(self.layers.items()):
            table[index] = {
                "frac_read": item.blocks_read / item.blocks_visible if item.blocks_visible else float("nan"),
                "recall": item.recall_sum / item.recall_rows if item.recall_rows else float("nan"),
                "blocks_read": item.blocks_read,
                "blocks_visible": item.blocks_visible,
                "prefill_calls": item.prefill_calls,
                "decode_calls": item.decode_calls,
                "dense_calls": item.dense_calls,
            }
        return table


# --------------------------------------------------------------------------------------------
# Selector K-cache
# --------------------------------------------------------------------------------------------


class SelectorKeyStore:
    """One layer's selector K-cache: a pooled selector key per (sequence, KV head, complete key
    block), dense or 4-bit packed, in a buffer that grows by doubling so that appends write in
    place (``spot.append_kcache``) and scoring reads one contiguous tensor."""

    def __init__(self, fmt: str = "int4", block_size: int = 64, global_scale: float | None = None) -> None:
        if fmt != "dense" and fmt not in reference.KCACHE_FORMATS:
            raise ValueError(f"argument 'fmt': expected 'dense' or one of {reference.KCACHE_FORMATS}, got {fmt!r}")
        self.format = fmt
        self.block_size = block_size
        self.global_scale = global_scale
        self.num_blocks = 0
        self.keys: torch.Tensor | None = None  # dense [B, Hkv, capacity, r] or codes [B, Hkv, capacity, r/2]
        self.scales: torch.Tensor | None = None  # [B, Hkv, capacity, r/group]

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, batch: int, heads: int, rank: int, needed: int, device, dtype=torch.float32) -> None:
        """Room for ``needed`` blocks (keeps the stored ones)."""
        if self.keys is not None and needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 16)
        if self.format == "dense":
            grown = torch.zeros(batch, heads, capacity, rank, dtype=dtype, device=device)
            grown_scales = None
        else:
            group = reference.KCACHE_GROUP[self.format]
            grown = torch.zeros(batch, heads, capacity, rank // 2, dtype=torch.uint8, device=device)
            scale_dtype = torch.float16 if self.format == "int4" else torch.uint8
            grown_scales = torch.zeros(batch, heads, capacity, rank // group, dtype=scale_dtype, device=device)
        if self.keys is not None:
            grown[:, :, : self.num_blocks] = self.keys[:, :, : self.num_blocks]
            if grown_scales is not None:
                grown_scales[:, :, : self.num_blocks] = self.scales[:, :, : self.num_blocks]
        self.keys, self.scales = grown, grown_scales

    def append(self, features: torch.Tensor) -> None:
        """features [B, Hkv, n, r]: selector keys of the next n complete blocks."""
        count = features.shape[2]
        if count == 0:
            return
        if self.format == "nvfp4" and self.global_scale is None:
            # Headroom for later blocks whose keys are larger than the first ones seen.
            amax = float(features.detach().abs().amax())
            self.global_scale = max(amax * 4.0 / (6.0 * 448.0), 1e-12)
        batch, heads, _, rank = features.shape
        self.reserve(batch, heads, rank, self.num_blocks + count, features.device)
        start = self.num_blocks
        if self.format == "dense":
            self.keys[:, :, start : start + count] = features.to(self.keys.dtype)
        elif count == 1:
            slots = torch.full((features.shape[0],), start, dtype=torch.int32, device=features.device)
            kernels.append_kcache(self.keys, self.scales, features[:, :, 0].float().contiguous(), slots, self.format,
                                  self.global_scale or 1.0)
        else:
            codes, scales = kernels.pack_kcache(features.float().contiguous(), self.format, self.global_scale or 1.0)
            self.keys[:, :, start : start + count] = codes
            self.scales[:, :, start : start + count] = scales
        self.num_blocks += count

    def dense_view(self) -> torch.Tensor:
        """The stored keys, dequantised: float [B, Hkv, num_blocks, r]."""
        keys = self.keys[:, :, : self.num_blocks]
        if self.format == "dense":
            return keys
        return kernels.unpack_kcache(keys.contiguous(), self.scales[:, :, : self.num_blocks].contiguous(),
                                     self.format, self.global_scale or 1.0)

    def truncate(self, num_blocks: int) -> None:
        self.num_blocks = min(self.num_blocks, max(num_blocks, 0))

    def select_batch(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys[indices.to(self.keys.device)]
            self.scales = None if self.scales is None else self.scales[indices.to(self.scales.device)]

    def repeat_batch(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, 0)
            self.scales = None if self.scales is None else self.scales.repeat_interleave(repeats, 0)

    def nbytes(self) -> int:
        total = 0
        for tensor in (self.keys, self.scales):
            if tensor is not None:
                total += tensor[:, :, : self.num_blocks].numel() * tensor.element_size()
        return total


try:
    from transformers import DynamicCache as _DynamicCache
except ImportError:  # pragma: no cover - transformers is an optional dependency of the package
    _DynamicCache = object


class SpotCache(_DynamicCache):
    """``DynamicCache`` that also holds each attached layer's selector K-cache.

    ``model.generate()`` on an attached model creates one automatically; pass one explicitly as
    ``past_key_values=SpotCache(config=model.config)`` when calling ``model(...)`` step by step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.selector_keys: dict[int, SelectorKeyStore] = {}

    def selector_store(self, layer_idx: int, fmt: str, block_size: int) -> SelectorKeyStore:
        store = self.selector_keys.get(layer_idx)
        if store is None or store.format != fmt or store.block_size != block_size:
            store = SelectorKeyStore(fmt, block_size)
            self.selector_keys[layer_idx] = store
        return store

    def reset(self):
        super().reset()
        self.selector_keys.clear()

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        for layer_idx, store in self.selector_keys.items():
            store.truncate(self.get_seq_length(layer_idx) // store.block_size)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for store in self.selector_keys.values():
            store.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for store in self.selector_keys.values():
            store.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for store in self.selector_keys.values():
            store.repeat_batch(repeats)

    def selector_cache_bytes(self) -> int:
        return sum(store.nbytes() for store in self.selector_keys.values())


# --------------------------------------------------------------------------------------------
# Selection methods
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
    """Dual top-p knobs of one layer (see ``reference.select_blocks``)."""

    top_p: float
    k_min: int
    k_max: int
    sink_blocks: int = 1
    local_blocks: int = 1


class SelectionMethod:
    """Chooses key blocks for an attached layer. ``block_size`` is the key (and prefill query)
    block size; ``layers`` the layers it can serve (None: any)."""

    name = "method"
    block_size = 64
    layers: list[int] | None = None

    def select_prefill(self, layer_idx: int, query, key, scaling, store: SelectorKeyStore | None):
        """query [B, Hq, L, d], key [B, Hkv, L, d] (post-RoPE). Returns (indices int32
        [B, Hkv, NQ, K], counts int32 [B, Hkv, NQ]) with NQ = ceil(L / block_size)."""
        raise NotImplementedError

    def select_decode(self, layer_idx: int, query, key, scaling, store: SelectorKeyStore | None):
        """query [B, Hq, 1, d]; key [B, Hkv, Lk, d] the whole cache. Returns (indices int32
        [B, Hkv, K], counts int32 [B, Hkv])."""
        raise NotImplementedError(f"{self.name} selects blocks for prefill only")

    def store_format(self, layer_idx: int) -> str:
        return "dense"


def _selector_config_value(config: Any, name: str, layer_idx: int, default=None):
    """A config field that is either one value or one per layer (list or {layer: value})."""
    value = getattr(config, name, None) if not isinstance(config, dict) else config.get(name)
    if isinstance(value, dict):
        value = value.get(layer_idx, value.get(str(layer_idx)))
    elif isinstance(value, (list, tuple)):
        value = value[layer_idx]
    return default if value is None else value


class LearnedSelection(SelectionMethod):
    """The trained selectors: ``selectors[layer]`` is a ``LayerSelector`` with
    ``query_features``, ``pool_query_blocks`` and ``key_features``; ``selectors.config`` holds
    the per-layer policy, ``block_size`` and the K-cache format.

    ``top_p`` (one value or a per-layer dict) overrides the calibrated values, e.g. to sweep the
    budget; ``kcache_format`` overrides the stored K-cache format ("dense" keeps float keys).
    ``prefill_reads_kcache`` makes prefill score against the keys as the K-cache stores them (a
    4-bit round trip, or bf16 for "dense"), as a chunked prefill or a decode step would see them:
    the K-cache accuracy study uses it to measure what a format costs.
    """

    name = "spot"

    def __init__(self, selectors, top_p: float | dict[int, float] | None = None, kcache_format: str | None = None,
                 k_min: int | None = None, k_max: int | None = None, prefill_reads_kcache: bool = False):
        self.selectors = selectors
        self.prefill_reads_kcache = prefill_reads_kcache
        self.config = getattr(selectors, "config", None)
        self.block_size = int(_selector_config_value(self.config, "block_size", 0, 64))
        self.layers = sorted(int(layer) for layer in _selector_layers(selectors))
        self.top_p_override = top_p
        self.k_min_override = k_min
        self.k_max_override = k_max
        self.kcache_format = kcache_format or _selector_config_value(self.config, "kcache_format", 0, "int4")

    def selector(self, layer_idx: int):
        return self.selectors[layer_idx]

    def policy(self, layer_idx: int) -> LayerPolicy:
        top_p = self.top_p_override
        if isinstance(top_p, dict):
            top_p = top_p.get(layer_idx)
        if top_p is None:
            top_p = _selector_config_value(self.config, "top_p", layer_idx, 0.95)
        k_min = self.k_min_override if self.k_min_override is not None else _selector_config_value(
            self.config, "k_min", layer_idx, 2)
        k_max = self.k_max_override if self.k_max_override is not None else _selector_config_value(
            self.config, "k_max", layer_idx, 1 << 20)
        # The selection kernels take top_p in (0, 1]; a vanishing top_p keeps only the forced
        # blocks and k_min, as top_p = 0 does in the reference rule.
        return LayerPolicy(
            top_p=min(max(float(top_p), 1e-6), 1.0),
            k_min=int(k_min),
            k_max=int(k_max),
            sink_blocks=int(_selector_config_value(self.config, "sink_blocks", layer_idx, 1)),
            local_blocks=int(_selector_config_value(self.config, "local_blocks", layer_idx, 1)),
        )

    def store_format(self, layer_idx: int) -> str:
        return self.kcache_format

    def score_scale(self, layer_idx: int, rank: int) -> float:
        selector = self.selector(layer_idx)
        scale = getattr(selector, "softmax_scale", None)
        return float(scale) if scale is not None else kernels.selector_softmax_scale(rank)

    def select_prefill(self, layer_idx, query, key, scaling, store):
        selector = self.selector(layer_idx)
        policy = self.policy(layer_idx)
        block = self.block_size
        batch, _, length, _ = query.shape
        num_blocks = reference.num_blocks(length, block)
        with torch.no_grad():
            query_blocks = selector.pool_query_blocks(selector.query_features(query))  # [B, Hkv, NQ, r]
            key_blocks = selector.key_features(key)  # [B, Hkv, L // block, r]
        complete = key_blocks.shape[2]
        if store is not None:
            store.truncate(0)
            store.append(key_blocks)
        if self.prefill_reads_kcache and complete > 0:
            key_blocks = kcache_round_trip(key_blocks, self.kcache_format)
        # Query block i scores the complete blocks 0..i; its diagonal is kept as a local block.
        row = torch.arange(num_blocks, device=query.device, dtype=torch.int32)
        scored = torch.clamp(row + 1, max=complete)[None].expand(batch, -1).contiguous()
        visible = (row + 1)[None].expand(batch, -1).contiguous()
        scores = kernels.selector_score(query_blocks.float().contiguous(), key_blocks.float().contiguous(), scored,
                                        self.score_scale(layer_idx, key_blocks.shape[-1]))
        if complete < num_blocks:
            scores = torch.nn.functional.pad(scores, (0, num_blocks - complete), value=float("-inf"))
        k_max = max(min(policy.k_max, num_blocks), policy.sink_blocks + policy.local_blocks)
        return kernels.select_blocks(scores, visible, policy.top_p, min(policy.k_min, k_max), k_max,
                                     policy.sink_blocks, policy.local_blocks)

    def select_decode(self, layer_idx, query, key, scaling, store):
        selector = self.selector(layer_idx)
        policy = self.policy(layer_idx)
        block = self.block_size
        batch, _, _, _ = query.shape
        length = key.shape[2]
        with torch.no_grad():
            query_features = selector.query_features(query)[:, :, -1]  # [B, Hkv, r]
            if store is None:
                # No SpotCache: rebuild the selector keys from the whole KV cache every step.
                store = SelectorKeyStore("dense", block)
                store.append(selector.key_features(key))
            else:
                _sync_store(selector, store, key, block)
        seq_lens = torch.full((batch,), length, dtype=torch.int32, device=query.device)
        visible = reference.num_blocks(length, block)
        k_max = max(min(policy.k_max, visible), policy.sink_blocks + policy.local_blocks)
        rank = query_features.shape[-1]
        # A cache shorter than one block has no selector keys yet: score against an empty buffer.
        store.reserve(batch, query_features.shape[1], rank, 1, query.device)
        return kernels.decode_select(
            query_features.float().contiguous(), store.keys, seq_lens, policy.top_p, min(policy.k_min, k_max), k_max,
            policy.sink_blocks, policy.local_blocks, block, self.score_scale(layer_idx, rank),
            key_scales=store.scales, fmt=store.format, global_scale=store.global_scale or 1.0,
        )


def kcache_round_trip(keys: torch.Tensor, fmt: str) -> torch.Tensor:
    """The selector keys as the K-cache hands them back: bf16 for "dense", else through a
    4-bit ``SelectorKeyStore`` (its own nvfp4 per-tensor scale rule included)."""
    if fmt == "dense":
        return keys.to(torch.bfloat16).to(keys.dtype)
    store = SelectorKeyStore(fmt, block_size=1)
    store.append(keys)
    return store.dense_view().to(keys.dtype)


def _selector_layers(selectors) -> list[int]:
    for name in ("layers", "layer_indices"):
        value = getattr(selectors, name, None)
        if value is not None:
            return list(value.keys()) if isinstance(value, dict) else list(value)
    if hasattr(selectors, "keys"):
        return list(selectors.keys())
    raise TypeError("argument 'selectors': expected an object listing its layers (.layers or .keys())")


def _sync_store(selector, store: SelectorKeyStore, key: torch.Tensor, block_size: int) -> None:
    """Append the selector keys of blocks completed since the store was last filled."""
    complete = key.shape[2] // block_size
    if store.num_blocks > complete:
        store.truncate(complete)
    if store.num_blocks == complete:
        return
    start = store.num_blocks
    if getattr(selector, "key_features_need_position", False):
        features = selector.key_features(key[:, :, : complete * block_size])[:, :, start:complete]
    else:
        features = selector.key_features(key[:, :, start * block_size : complete * block_size])
    store.append(features)


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------


def _dense_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def spot_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function: query [B, Hq, Lq, d], key/value [B, Hkv, Lk, d] (RoPE
    applied, cache updated). Returns ([B, Lq, Hq, d], None)."""
    handle: SpotAttention | None = getattr(module, "spot_attention", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if handle is None or not handle.enabled or dropout > 0.0 or kwargs.get("sliding_window") is not None:
        return _dense_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return handle.attend(module, query, key, value, attention_mask, scaling, **kwargs)


def register() -> None:
    """Registers the ``"spot"`` attention function and its (SDPA-style) mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, spot_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------


def full_attention_layers(config) -> list[int]:
    """Indices of the layers whose attention is full (causal, unwindowed) softmax attention."""
    from ..models import full_attention_layers as from_config

    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return from_config(text_config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.model.layers`` for the usual causal LMs)."""
    config = model.config.get_text_config(decoder=True)
    count = config.num_hidden_layers
    for candidate in (getattr(getattr(model, "model", None), "layers", None), getattr(model, "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) == count:
            return candidate
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError("argument 'model': could not find its list of decoder layers")


class SpotAttention:
    """The handle ``attach`` returns: switches, statistics and the per-layer state."""

    def __init__(self, model: nn.Module, method: SelectionMethod, layers: list[int], backend: str,
                 measure_recall: bool) -> None:
        if backend not in ("auto", "kernels", "masked"):
            raise ValueError(f"argument 'backend': expected 'auto', 'kernels' or 'masked', got {backend!r}")
        self.model = model
        self.method = method
        self.layers = layers
        self.backend = backend
        self.measure_recall = measure_recall
        self.enabled = True
        self.stats = BudgetStats()
        self._active_cache: dict[int, Any] = {}
        self._hooks: list = []
        self._previous_implementation: str | None = None
        self._warned: set[str] = set()

    # -- switches ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def dense(self):
        """Runs the attached layers dense inside the block."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def using(self, method: SelectionMethod):
        """Temporarily chooses blocks with another method (a baseline, another budget)."""
        previous = self.method
        self.method = method
        try:
            yield self
        finally:
            self.method = previous

    def report(self) -> dict[str, Any]:
        """Which path each op took (kernel or fallback) and the budget actually used."""
        return {
            "backend": self.backend,
            "method": self.method.name,
            "ops": kernels.report(),
            "frac_read": self.stats.fraction_read(),
            "layers": self.layers,
        }

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            warnings.warn(text, stacklevel=3)

    # -- the attention -------------------------------------------------------------------------

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer_idx = module.spot_layer_idx
        length_q, length_k = query.shape[2], key.shape[2]
        budget = self.stats.layer(layer_idx)
        block = self.method.block_size
        cache = self._active_cache.get(layer_idx)
        store = None
        if isinstance(cache, SpotCache):
            store = cache.selector_store(layer_idx, self.method.store_format(layer_idx), block)
        force_masked = self.backend == "masked"
        if length_q == length_k:
            indices, counts = self.method.select_prefill(layer_idx, query, key, scaling, store)
            num_blocks = reference.num_blocks(length_k, block)
            read_mask = kernels.prefill_block_mask(indices, counts, num_blocks)  # [B, Hkv, NQ, NQ]
            budget.prefill_calls += 1
            budget.blocks_read += int(read_mask.sum())
            budget.blocks_visible += query.shape[0] * key.shape[1] * num_blocks * (num_blocks + 1) // 2
            if self.measure_recall:
                mass = kernels.block_mass(query, key, block, block, scaling)
                budget.recall_sum += float((mass * read_mask).sum())
                budget.recall_rows += mass.shape[0] * mass.shape[1] * mass.shape[2]
            if attention_mask is not None:
                output = kernels.masked_prefill(query, key, value, read_mask, block, scaling, attention_mask)
            else:
                self._require_kernel("sparse_prefill", query.device)
                output = kernels.sparse_prefill(query, key, value, indices, counts, block, scaling,
                                                force_masked=force_masked)
            return output, None
        if length_q == 1:
            indices, counts = self.method.select_decode(layer_idx, query, key, scaling, store)
            num_blocks = reference.num_blocks(length_k, block)
            read_mask = kernels.block_mask_from_indices(indices, counts, num_blocks)
            budget.decode_calls += 1
            budget.blocks_read += int(read_mask.sum())
            budget.blocks_visible += query.shape[0] * key.shape[1] * num_blocks
            if attention_mask is not None:
                output = kernels.masked_decode(query, key, value, read_mask, block, scaling, attention_mask)
            else:
                self._require_kernel("sparse_decode", query.device)
                output = kernels.sparse_decode(query, key, value, indices, counts, block, scaling,
                                               force_masked=force_masked)
            return output, None
        self._warn_once(
            f"spot attention: {length_q} new queries on a cache of {length_k} keys runs dense (only full "
            "prefill and one-token decode are sparse)"
        )
        budget.dense_calls += 1
        return _dense_attention(module, query, key, value, attention_mask, scaling, **kwargs)

    def _require_kernel(self, name: str, device: torch.device) -> None:
        if self.backend == "kernels" and not kernels.kernel_available(name, device):
            raise RuntimeError(f"spot attention: backend='kernels' but spot.{name} has no kernel on {device.type}")

    # -- cache tracking ------------------------------------------------------------------------

    def _remember_cache(self, module, args, kwargs):
        # The cache argument was renamed across transformers releases.
        cache = next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
        self._active_cache[module.spot_layer_idx] = cache

    def _forget_cache(self, module, args, kwargs, output):
        self._active_cache.pop(module.spot_layer_idx, None)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _cache_kwarg(attention: nn.Module) -> str:
    """``cache`` where this transformers' attention modules take it, else ``past_key_values``."""
    try:
        return "cache" if "cache" in inspect.signature(attention.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def attach(
    model: nn.Module,
    selectors=None,
    *,
    method: SelectionMethod | None = None,
    layers: list[int] | None = None,
    backend: str = "auto",
    measure_recall: bool = False,
) -> SpotAttention:
    """Makes ``model``'s full-attention layers block-sparse.

    selectors: a ``SpotSelectors`` (or anything ``LearnedSelection`` accepts); or pass ``method``
    (a ``SelectionMethod``, e.g. a baseline). layers: defaults to the full-attention layers the
    method serves. backend: "auto" (kernels where compiled, else the masked SDPA backend),
    "kernels" (fail when a kernel is missing) or "masked" (always SDPA under the block mask).
    measure_recall: also compute the teacher block mass in prefill to report attention-mass
    recall (costs one dense pass per layer).
    """
    if getattr(model, "spot_attention", None) is not None:
        raise ValueError("argument 'model': already attached; call detach(model) first")
    if method is None:
        if selectors is None:
            raise ValueError("argument 'selectors': pass the selectors or a selection method")
        method = LearnedSelection(selectors)
    config = model.config.get_text_config(decoder=True)
    full = full_attention_layers(config)
    if layers is None:
        layers = [index for index in full if method.layers is None or index in method.layers]
    else:
        bad = [index for index in layers if index not in full]
        if bad:
            raise ValueError(f"argument 'layers': {bad} are not full-attention layers (those are {full})")
    register()
    handle = SpotAttention(model, method, sorted(layers), backend, measure_recall)
    decoder = decoder_layers(model)
    for index in handle.layers:
        attention = getattr(decoder[index], "self_attn", None)
        if attention is None:
            raise ValueError(f"argument 'model': layer {index} has no self_attn module")
        attention.spot_attention = handle
        attention.spot_layer_idx = index
        handle._hooks.append(attention.register_forward_pre_hook(handle._remember_cache, with_kwargs=True))
        handle._hooks.append(attention.register_forward_hook(handle._forget_cache, with_kwargs=True))
    handle._previous_implementation = model.config._attn_implementation
    _set_implementation(model, ATTENTION_NAME)
    original_generate = model.generate
    cache_kwarg = _cache_kwarg(decoder[handle.layers[0]].self_attn) if handle.layers else "past_key_values"

    def generate(*args, **kwargs):
        # generate() builds a plain DynamicCache unless given one: give it a SpotCache.
        given = any(kwargs.get(name) is not None for name in _CACHE_KWARGS)
        if handle.enabled and not given and kwargs.get("use_cache", True):
            kwargs[cache_kwarg] = SpotCache(config=model.config)
        return original_generate(*args, **kwargs)

    model.generate = generate
    model.spot_attention = handle
    return handle


def detach(model: nn.Module) -> None:
    """Undoes ``attach``: the model is exactly as before (its original attention function)."""
    handle: SpotAttention | None = getattr(model, "spot_attention", None)
    if handle is None:
        return
    for hook in handle._hooks:
        hook.remove()
    decoder = decoder_layers(model)
    for index in handle.layers:
        attention = decoder[index].self_attn
        for name in ("spot_attention", "spot_layer_idx"):
            if hasattr(attention, name):
                delattr(attention, name)
    _set_implementation(model, handle._previous_implementation or "sdpa")
    if "generate" in model.__dict__:
        del model.generate
    del model.spot_attention


@contextlib.contextmanager
def attached(model: nn.Module, selectors=None, **kwargs):
    """``with attached(model, selectors) as handle:`` ... detached on exit."""
    handle = attach(model, selectors, **kwargs)
    try:
        yield handle
    finally:
        detach(model)


def _set_implementation(model: nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError):
        model.config._attn_implementation_internal = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation_internal = name


def is_attached(model: nn.Module) -> bool:
    return getattr(model, "spot_attention", None) is not None


__all__ = [
    "ATTENTION_NAME",
    "BudgetStats",
    "LayerPolicy",
    "LearnedSelection",
    "SelectionMethod",
    "SelectorKeyStore",
    "SpotAttention",
    "SpotCache",
    "attach",
    "attached",
    "decoder_layers",
    "detach",
    "full_attention_layers",
    "is_attached",
    "register",
    "spot_attention_forward",
]

