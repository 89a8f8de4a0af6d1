"""Training-free block-selection baselines, run through the same integration as the learned
selector so that every method is measured by the same harness at the same block size.

* ``OracleTopP``: dual top-p over the true attention block mass (``block_mass`` of the layer's own
  queries and keys): the best a mass-predicting selector could do at a given ``p``.
* ``QuestTopK``: Quest-style. Each key block keeps the per-channel min and max of its keys; the
  upper bound ``sum_c max(q_c min_c, q_c max_c)`` of ``q . k`` over the block stands in for the
  block's logit, softmaxed per query over the visible blocks and averaged over the query block
  and the group's heads; the top ``k`` blocks are kept (a fixed budget, as in Quest).
* ``TwilightTopP``: Twilight-style. Keys are quantised per token to 4 bits (int4, one scale per 32
  channels); the attention mass estimated from the quantised keys is summed per block and dual
  top-p keeps the blocks reaching ``p`` (an adaptive budget, as in Twilight).
* ``Streaming``: the attention sink plus a window of recent blocks (StreamingLLM), nothing scored.

All keep the sink and local blocks like the learned policy, so budgets compare like for like.
"""

from __future__ import annotations

import torch

from .. import reference
from ..integrations import kernels
from ..integrations.hf import SelectionMethod

# The selection kernels take top_p in (0, 1]; fixed-budget methods pin k_min = k_max instead.
_NO_TOP_P = 1e-6


def _visible_rows(batch: int, num_blocks: int, device) -> torch.Tensor:
    return (torch.arange(num_blocks, device=device, dtype=torch.int32) + 1)[None].expand(batch, -1).contiguous()


def _log_mass(mass: torch.Tensor) -> torch.Tensor:
    return torch.where(mass > 0, mass.clamp(min=1e-30).log(), torch.full_like(mass, float("-inf")))


def _select_prefill_from_scores(scores, top_p, k_min, k_max, sink, local):
    batch, _, num_blocks, _ = scores.shape
    k_max = max(min(k_max, num_blocks), sink + local)
    return kernels.select_blocks(scores.float().contiguous(), _visible_rows(batch, num_blocks, scores.device),
                                 top_p, min(k_min, k_max), k_max, sink, local)


def _select_decode_from_scores(scores, length, block_size, top_p, k_min, k_max, sink, local):
    """scores [B, Hkv, NK] for one query at the end of a cache of ``length`` keys."""
    batch = scores.shape[0]
    num_blocks = reference.num_blocks(length, block_size)
    k_max = max(min(k_max, num_blocks), sink + local)
    visible = torch.full((batch, 1), num_blocks, dtype=torch.int32, device=scores.device)
    indices, counts = kernels.select_blocks(scores[:, :, None].float().contiguous(), visible, top_p,
                                            min(k_min, k_max), k_max, sink, local)
    return indices[:, :, 0], counts[:, :, 0]


def query_block_mass(query: torch.Tensor, key: torch.Tensor, block_size: int, scaling: float) -> torch.Tensor:
    """Attention mass per key block of queries at the end of the cache, averaged over the
    group's heads and the queries. query [B, Hq, Lq, d]; key [B, Hkv, Lk, d] -> [B, Hkv, NK]."""
    batch, heads_q, length_q, _ = query.shape
    heads_kv, length = key.shape[1], key.shape[2]
    group = heads_q // heads_kv
    logits = torch.matmul(query.float(), key.float().repeat_interleave(group, 1).transpose(-1, -2)) * scaling
    position = torch.arange(length - length_q, length, device=query.device)
    logits = logits.masked_fill(torch.arange(length, device=query.device)[None, :] > position[:, None], float("-inf"))
    prob = torch.softmax(logits, -1)  # [B, Hq, Lq, Lk]
    num_blocks = reference.num_blocks(length, block_size)
    per_block = torch.zeros(batch, heads_q, length_q, num_blocks, device=query.device)
    per_block.index_add_(3, torch.arange(length, device=query.device) // block_size, prob)
    return per_block.view(batch, heads_kv, group * length_q, num_blocks).mean(2)


class OracleTopP(SelectionMethod):
    def __init__(self, top_p: float, block_size: int = 64, k_min: int = 1, k_max: int = 1 << 20,
                 sink_blocks: int = 1, local_blocks: int = 1):
        self.name = "oracle"
        self.budget = top_p
        self.top_p, self.block_size, self.k_min, self.k_max = top_p, block_size, k_min, k_max
        self.sink, self.local = sink_blocks, local_blocks

    def select_prefill(self, layer_idx, query, key, scaling, store):
        mass = kernels.block_mass(query, key, self.block_size, self.block_size, scaling)
        return _select_prefill_from_scores(_log_mass(mass), self.top_p, self.k_min, self.k_max, self.sink,
                                           self.local)

    def select_decode(self, layer_idx, query, key, scaling, store):
        mass = query_block_mass(query, key, self.block_size, scaling)
        return _select_decode_from_scores(_log_mass(mass), key.shape[2], self.block_size, self.top_p, self.k_min,
                                          self.k_max, self.sink, self.local)


class TwilightTopP(SelectionMethod):
    def __init__(self, top_p: float, block_size: int = 64, k_min: int = 1, k_max: int = 1 << 20,
                 sink_blocks: int = 1, local_blocks: int = 1, key_format: str = "int4"):
        self.name = "twilight"
        self.budget = top_p
        self.top_p, self.block_size, self.k_min, self.k_max = top_p, block_size, k_min, k_max
        self.sink, self.local = sink_blocks, local_blocks
        self.key_format = key_format

    def quantised_keys(self, key: torch.Tensor) -> torch.Tensor:
        codes, scales = kernels.pack_kcache(key.float().contiguous(), self.key_format)
        return kernels.unpack_kcache(codes, scales, self.key_format).to(key.dtype)

    def select_prefill(self, layer_idx, query, key, scaling, store):
        estimate = kernels.block_mass(query, self.quantised_keys(key), self.block_size, self.block_size, scaling)
        return _select_prefill_from_scores(_log_mass(estimate), self.top_p, self.k_min, self.k_max, self.sink,
                                           self.local)

    def select_decode(self, layer_idx, query, key, scaling, store):
        estimate = query_block_mass(query, self.quantised_keys(key), self.block_size, scaling)
        return _select_decode_from_scores(_log_mass(estimate), key.shape[2], self.block_size, self.top_p,
                                          self.k_min, self.k_max, self.sink, self.local)


class QuestTopK(SelectionMethod):
    def __init__(self, k: int, block_size: int = 64, sink_blocks: int = 1, local_blocks: int = 1):
        self.name = "quest"
        self.budget = k
        self.k, self.block_size = k, block_size
        self.sink, self.local = sink_blocks, local_blocks

    def _bounds(self, key):
        """Per-block channel min and max of the keys: [B, Hkv, NK, d] each."""
        length = key.shape[2]
        num_blocks = reference.num_blocks(length, self.block_size)
        pad = num_blocks * self.block_size - length
        padded = torch.nn.functional.pad(key.float(), (0, 0, 0, pad), value=float("nan"))
        blocks = padded.view(*key.shape[:2], num_blocks, self.block_size, key.shape[-1])
        return blocks.nan_to_num(float("inf")).amin(3), blocks.nan_to_num(float("-inf")).amax(3)

    def _upper_bound_prob(self, query, key, scaling, first_row):
        """Softmax over visible blocks of the per-query bound: [B, Hq, Lq, NK]."""
        low, high = self._bounds(key)
        group = query.shape[1] // key.shape[1]
        low, high = low.repeat_interleave(group, 1), high.repeat_interleave(group, 1)
        q = query.float()
        bound = (torch.matmul(q.clamp(min=0), high.transpose(-1, -2))
                 + torch.matmul(q.clamp(max=0), low.transpose(-1, -2))) * scaling
        rows = torch.arange(first_row, first_row + query.shape[2], device=query.device) // self.block_size
        blocks = torch.arange(bound.shape[-1], device=query.device)
        bound = bound.masked_fill(blocks[None, :] > rows[:, None], float("-inf"))
        return torch.softmax(bound, -1)

    def select_prefill(self, layer_idx, query, key, scaling, store):
        batch, heads_q, length, _ = query.shape
        heads_kv = key.shape[1]
        num_blocks = reference.num_blocks(length, self.block_size)
        prob = self._upper_bound_prob(query, key, scaling, 0)  # [B, Hq, L, NK]
        pad = num_blocks * self.block_size - length
        prob = torch.nn.functional.pad(prob, (0, 0, 0, pad))
        sums = prob.view(batch, heads_kv, heads_q // heads_kv, num_blocks, self.block_size, num_blocks).sum((2, 4))
        sizes = torch.full((num_blocks,), float(self.block_size), device=query.device)
        sizes[-1] = length - (num_blocks - 1) * self.block_size
        estimate = sums / (sizes[:, None] * (heads_q // heads_kv))
        return _select_prefill_from_scores(_log_mass(estimate), _NO_TOP_P, self.k, self.k, self.sink, self.local)

    def select_decode(self, layer_idx, query, key, scaling, store):
        prob = self._upper_bound_prob(query, key, scaling, key.shape[2] - 1)  # [B, Hq, 1, NK]
        estimate = prob.view(query.shape[0], key.shape[1], -1, prob.shape[-1]).mean(2)
        return _select_decode_from_scores(_log_mass(estimate), key.shape[2], self.block_size, _NO_TOP_P, self.k,
                                          self.k, self.sink, self.local)


class Streaming(SelectionMethod):
    def __init__(self, window_blocks: int, block_size: int = 64, sink_blocks: int = 1):
        self.name = "streaming"
        self.budget = window_blocks
        self.window, self.block_size, self.sink = window_blocks, block_size, sink_blocks

    def select_prefill(self, layer_idx, query, key, scaling, store):
        batch, num_blocks = query.shape[0], reference.num_blocks(query.shape[2], self.block_size)
        scores = torch.zeros(batch, key.shape[1], num_blocks, num_blocks, device=query.device)
        return _select_prefill_from_scores(scores, _NO_TOP_P, 0, self.sink + self.window, self.sink, self.window)

    def select_decode(self, layer_idx, query, key, scaling, store):
        num_blocks = reference.num_blocks(key.shape[2], self.block_size)
        scores = torch.zeros(query.shape[0], key.shape[1], num_blocks, device=query.device)
        return _select_decode_from_scores(scores, key.shape[2], self.block_size, _NO_TOP_P, 0,
                                          self.sink + self.window, self.sink, self.window)


def baseline_methods(block_size: int, budgets: dict[str, list] | None = None) -> list[SelectionMethod]:
    """Every baseline at each of its budgets (defaults span roughly 5%-60% of the blocks at 2K-8K)."""
    budgets = budgets or {}
    methods: list[SelectionMethod] = []
    for top_p in budgets.get("oracle", [0.8, 0.9, 0.95, 0.98]):
        methods.append(OracleTopP(top_p, block_size))
    for k in budgets.get("quest", [4, 8, 16, 32]):
        methods.append(QuestTopK(k, block_size))
    for top_p in budgets.get("twilight", [0.8, 0.9, 0.95, 0.98]):
        methods.append(TwilightTopP(top_p, block_size))
    for window in budgets.get("streaming", [2, 6, 14, 30]):
        methods.append(Streaming(window, block_size))
    return methods
