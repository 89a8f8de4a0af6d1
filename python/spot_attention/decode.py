"""One layer's decode attention step as a single unit: selector query -> ``spot.decode_select``
(scores the packed selector K-cache and picks blocks by dual top-p) -> ``spot.sparse_decode``
(exact attention over the chosen blocks of the KV cache).

At batch 1 a decode step is a handful of short kernels, so launch overhead is a real share of
the time. ``SparseDecodeStep.capture`` records the whole step in one CUDA graph over static
input buffers; ``CapturedDecodeStep.replay`` then costs one graph launch per layer and step.

Usage::

    step = SparseDecodeStep(heads_q=32, heads_kv=8, head_dim=128, top_p=0.9, k_min=4, k_max=64,
                            selector=layer_selector)            # or pass selector_query yourself
    out, lse = step(query, key_cache, value_cache, seq_lens, selector_keys, selector_scales)  # eager
    graph = step.capture(query, key_cache, value_cache, seq_lens, selector_keys, selector_scales)
    out, lse = graph.replay(query=next_query, seq_lens=next_lens)                              # graph

The caches (KV and selector K-cache) are read through the pointers seen at capture: keep them
allocated for the graph's life and update them in place (``append_kcache``, index_copy_ into
the KV cache or its pages). Per-step inputs (query, seq_lens, block_table, an explicit selector
query) are copied into the graph's static buffers by ``replay``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import ops

# decode_select(query [B, Hkv, r] fp32, keys, key_scales, seq_lens) -> (indices, counts); the
# default runs ``torch.ops.spot.decode_select`` with the step's policy.
SelectFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class SparseDecodeStep:
    """Decode attention for one layer: a fixed layer shape and selection policy.

    heads_q, heads_kv, head_dim: the layer's attention shape (head_dim 64, 128 or 256).
    block_size: key block of the selection, in tokens (a multiple of the KV page size).
    top_p, k_min, k_max, sink_blocks, local_blocks: the dual top-p policy (``policy.py``);
    ``k_max`` is the width of the block lists and so bounds the bytes a step reads.
    kcache_format: ``"dense"``, ``"int4"``, ``"mxfp4"`` or ``"nvfp4"`` (the selector K-cache);
    kcache_global_scale: nvfp4's per-tensor scale.
    selector: an object with ``query_features(query [B, Hq, 1, d]) -> [B, Hkv, 1, r]`` (the
    layer's ``LayerSelector``) used when no selector query is passed.
    softmax_scale / selector_softmax_scale: default ``head_dim ** -0.5`` / ``r ** -0.5``.
    select_fn: replaces ``decode_select`` (baselines, tests); same inputs and outputs.
    """

    heads_q: int
    heads_kv: int
    head_dim: int
    top_p: float
    k_min: int
    k_max: int
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    kcache_format: str = "int4"
    kcache_global_scale: float = 1.0
    selector: object | None = None
    softmax_scale: float | None = None
    selector_softmax_scale: float | None = None
    select_fn: SelectFn | None = None

    def __post_init__(self) -> None:
        if self.heads_kv <= 0 or self.heads_q % self.heads_kv != 0:
            raise ValueError(f"heads_q ({self.heads_q}) must be a positive multiple of heads_kv ({self.heads_kv})")
        if not 1 <= self.k_max:
            raise ValueError(f"k_max must be at least 1, got {self.k_max}")
        if self.softmax_scale is None:
            self.softmax_scale = self.head_dim ** -0.5

    # ----------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------

    def selector_query(self, query: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, d] -> selector query float32 [B, Hkv, r] through ``selector``."""
        if self.selector is None:
            raise ValueError("SparseDecodeStep: pass selector_query or build the step with a selector")
        features = self.selector.query_features(query[:, :, None])  # [B, Hkv, 1, r]
        return features[:, :, -1].float().contiguous()

    def select(self, selector_query: torch.Tensor, selector_keys: torch.Tensor,
               selector_key_scales: torch.Tensor | None, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_indices int32 [B, Hkv, k_max], block_counts int32 [B, Hkv])."""
        if self.select_fn is not None:
            return self.select_fn(selector_query, selector_keys, selector_key_scales, seq_lens)
        scale = self.selector_softmax_scale
        if scale is None:
            scale = selector_query.shape[-1] ** -0.5
        return torch.ops.spot.decode_select(
            selector_query, selector_keys, selector_key_scales, seq_lens, self.block_size, self.kcache_format,
            self.kcache_global_scale, scale, self.top_p, min(self.k_min, self.k_max), self.k_max,
            self.sink_blocks, self.local_blocks,
        )

    def __call__(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        selector_keys: torch.Tensor,
        selector_key_scales: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        selector_query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, Hq, d] (post-RoPE); caches [B, L_max, Hkv, d] or pages [P, page, Hkv, d] with
        block_table int32 [B, pages]; seq_lens int32 [B] (tokens in the cache, this step's key
        included); selector_keys [B, Hkv, NK, r] (dense) or packed codes [B, Hkv, NK, r/2] with
        selector_key_scales. Returns (out [B, Hq, d], lse float32 [B, Hq])."""
        out, lse, _, _ = self.run(query, key_cache, value_cache, seq_lens, selector_keys, selector_key_scales,
                                  block_table, selector_query)
        return out, lse

    def run(self, query, key_cache, value_cache, seq_lens, selector_keys, selector_key_scales=None,
            block_table=None, selector_query=None):
        """The step with its selection: (out, lse, block_indices, block_counts)."""
        if selector_query is None:
            selector_query = self.selector_query(query)
        indices, counts = self.select(selector_query, selector_keys, selector_key_scales, seq_lens)
        out, lse = ops.sparse_decode(query, key_cache, value_cache, seq_lens, indices, counts,
                                     block_size=self.block_size, softmax_scale=self.softmax_scale,
                                     block_table=block_table)
        return out, lse, indices, counts

    # ----------------------------------------------------------------------------------------
    # CUDA graph
    # ----------------------------------------------------------------------------------------

    def capture(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        selector_keys: torch.Tensor,
        selector_key_scales: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        selector_query: torch.Tensor | None = None,
        warmup: int = 2,
        pool=None,
    ) -> "CapturedDecodeStep":
        """Records the step in a CUDA graph. The per-step inputs are copied into static buffers
        (their shapes are fixed from here on); the caches are captured by address."""
        if not query.is_cuda:
            raise ValueError("SparseDecodeStep.capture: argument 'query' must be a CUDA tensor")
        static = {
            "query": query.clone(),
            "seq_lens": seq_lens.clone(),
            "block_table": None if block_table is None else block_table.clone(),
            "selector_query": None if selector_query is None else selector_query.clone(),
        }

        def body():
            return self.run(static["query"], key_cache, value_cache, static["seq_lens"], selector_keys,
                            selector_key_scales, static["block_table"], static["selector_query"])

        graph, outputs = capture_cuda_graph(body, device=query.device, warmup=warmup, pool=pool)
        return CapturedDecodeStep(graph, static, *outputs)


def capture_cuda_graph(fn: Callable, device=None, warmup: int = 1, pool=None):
    """Records ``fn()`` in a CUDA graph: (graph, fn's outputs as captured). ``fn`` runs ``warmup``
    times (at least once) on a side stream first: first calls may allocate or pick kernels, which
    a capture must not see for the first time."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs


class CapturedDecodeStep:
    """A ``SparseDecodeStep`` recorded as one CUDA graph. ``out``/``lse``/``block_indices``/
    ``block_counts`` are the graph's static outputs: read (or clone) them after each replay."""

    def __init__(self, graph, static, out, lse, block_indices, block_counts) -> None:
        self.graph = graph
        self.static = static
        self.out, self.lse = out, lse
        self.block_indices, self.block_counts = block_indices, block_counts

    def replay(
        self,
        query: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        selector_query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies the given per-step inputs into the static buffers (shapes as at capture) and
        replays. Inputs left out keep their previous contents (update them in place yourself to
        save the copy). Returns the static (out, lse)."""
        for name, value in (("query", query), ("seq_lens", seq_lens), ("block_table", block_table),
                            ("selector_query", selector_query)):
            if value is None:
                continue
            target = self.static[name]
            if target is None:
                raise ValueError(f"CapturedDecodeStep.replay: argument '{name}' was not part of the capture")
            if target.shape != value.shape:
                raise ValueError(f"CapturedDecodeStep.replay: argument '{name}' must have shape "
                                 f"{tuple(target.shape)} as at capture, got {tuple(value.shape)}")
            target.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.out, self.lse


# --------------------------------------------------------------------------------------------
# Capturable selection in plain torch (baselines, tests, benchmarks)
# --------------------------------------------------------------------------------------------


def topk_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int, k: int,
                sink_blocks: int = 1, local_blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-budget selection without host syncs (CUDA-graph safe): the ``k`` best-scoring
    visible blocks, sink and local blocks forced in. scores float [B, Hkv, NK] (NK >= visible
    blocks of every sequence). Returns (indices int32 [B, Hkv, k] ascending, -1 padded; counts
    int32 [B, Hkv] = min(k, visible))."""
    batch, heads, num_key_blocks = scores.shape
    k = min(k, num_key_blocks)
    visible = (seq_lens.long() + block_size - 1) // block_size  # [B]
    column = torch.arange(num_key_blocks, device=scores.device)
    is_visible = column[None, :] < visible[:, None]  # [B, NK]
    forced = (column[None, :] < sink_blocks) | (column[None, :] >= visible[:, None] - local_blocks)
    ranked = scores.float().masked_fill(forced[:, None] & is_visible[:, None], float("inf"))
    ranked = ranked.masked_fill(~is_visible[:, None], float("-inf"))
    top = torch.topk(ranked, k, dim=-1).indices  # [B, Hkv, k]
    counts = torch.clamp(visible, max=k)[:, None].expand(batch, heads)
    slot = torch.arange(k, device=scores.device)
    keep = slot[None, None, :] < counts[..., None]
    # topk lists the kept blocks first; push the padding to the end, then sort ascending.
    top = torch.where(keep, top, torch.full_like(top, num_key_blocks))
    indices = torch.sort(top, dim=-1).values
    indices = torch.where(indices >= num_key_blocks, torch.full_like(indices, -1), indices)
    return indices.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()
