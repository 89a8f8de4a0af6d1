"""Python face of the ``torch.ops.spot`` ops: thin wrappers with shapes in their docstrings, and
the fake (meta) kernels that let ``torch.compile`` and meta tensors trace them.

Validation lives in the C++ op entries (``csrc/<op>.cpp``), so eager calls on CPU and CUDA raise
the same ``ValueError`` naming the bad argument. ``reference.py`` is the readable specification.
"""

from __future__ import annotations

import importlib

import torch

from . import reference

_extension = importlib.import_module("spot_attention.spot_ops")  # runs the op registrations

KCACHE_FORMATS = reference.KCACHE_FORMATS
KCACHE_GROUP = reference.KCACHE_GROUP


def cuda_available() -> bool:
    """True when CUDA kernels were compiled into ``spot_ops`` and a device is present."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "spot::sparse_decode", "CUDA"
    )


def _num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def selector_score(
    query: torch.Tensor,
    keys: torch.Tensor,
    num_visible: torch.Tensor,
    softmax_scale: float,
    key_scales: torch.Tensor | None = None,
    format: str = "dense",
    global_scale: float = 1.0,
) -> torch.Tensor:
    """Selector logits. query [B, Hkv, NQ, r]; keys [B, Hkv, NK, r] (``format="dense"``) or packed
    uint8 codes [B, Hkv, NK, r/2] with ``key_scales`` [B, Hkv, NK, r/group]; num_visible int32
    [B, NQ]. Returns float32 [B, Hkv, NQ, NK], ``-inf`` past each row's visible blocks."""
    return torch.ops.spot.selector_score(query, keys, key_scales, num_visible, format, global_scale, softmax_scale)


def select_blocks(
    scores: torch.Tensor,
    num_visible: torch.Tensor,
    top_p: float,
    k_min: int,
    k_max: int,
    sink_blocks: int = 1,
    local_blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual top-p selection (see ``reference.select_blocks``). scores float32 [B, H, NQ, NK];
    num_visible int32 [B, NQ]. Returns (indices int32 [B, H, NQ, k_max] ascending, -1 padded;
    counts int32 [B, H, NQ])."""
    return torch.ops.spot.select_blocks(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks)


def decode_select(
    query: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    top_p: float,
    k_min: int,
    k_max: int,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    block_size: int = 64,
    softmax_scale: float | None = None,
    key_scales: torch.Tensor | None = None,
    format: str = "dense",
    global_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused decode selection: ``selector_score`` + ``select_blocks`` for one query per sequence.
    query [B, Hkv, r]; keys [B, Hkv, NK, r] (dense) or packed codes + ``key_scales``; seq_lens
    int32 [B]. Blocks ``[0, seq_len // block_size)`` have selector keys and are scored; the
    partial last block is visible (kept as a local block) but unscored. Returns (indices int32
    [B, Hkv, k_max], counts int32 [B, Hkv])."""
    if softmax_scale is None:
        softmax_scale = query.shape[-1] ** -0.5
    return torch.ops.spot.decode_select(
        query, keys, key_scales, seq_lens, block_size, format, global_scale, softmax_scale,
        top_p, k_min, k_max, sink_blocks, local_blocks,
    )


def sparse_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    block_size: int = 64,
    softmax_scale: float | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse decode attention. query [B, Hq, d]; caches [B, L_max, Hkv, d] (any strides
    with a contiguous last dim) or pages [P, page_size, Hkv, d] with block_table int32
    [B, pages]; seq_lens int32 [B]; block_indices int32 [B, Hkv, K]; block_counts int32 [B, Hkv].
    Returns (out [B, Hq, d], lse float32 [B, Hq])."""
    if softmax_scale is None:
        softmax_scale = query.shape[-1] ** -0.5
    return torch.ops.spot.sparse_decode(
        query, key_cache, value_cache, block_table, seq_lens, block_indices, block_counts, block_size, softmax_scale
    )


def sparse_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    block_size: int = 64,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block-sparse prefill over packed sequences. query [T, Hq, d]; key, value
    [T, Hkv, d]; cu_seqlens int32 [B + 1]; block_indices int32 [B, Hkv, NQ, K]; block_counts int32
    [B, Hkv, NQ] (NQ >= ceil(max_seqlen / block_size)); the diagonal block is always attended.
    Returns (out [T, Hq, d], lse float32 [T, Hq]). On CUDA: fp16/bf16, head dim 64 or 128,
    block_size 64 or 128; ``SPOT_PREFILL_IMPL=mma`` or ``wgmma`` forces the portable or the Hopper
    kernel (unset: Hopper where it supports the call, else mma)."""
    if softmax_scale is None:
        softmax_scale = query.shape[-1] ** -0.5
    return torch.ops.spot.sparse_prefill(
        query, key, value, cu_seqlens, max_seqlen, block_indices, block_counts, block_size, softmax_scale
    )


def block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_size_q: int = 64,
    block_size_k: int = 64,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Teacher targets: exact causal attention mass per key block, averaged over the query heads
    of each KV group and the queries of each query block. query [T, Hq, d]; key [T, Hkv, d];
    cu_seqlens int32 [B + 1]. Returns float32 [B, Hkv, ceil(max_seqlen/block_size_q),
    ceil(max_seqlen/block_size_k)]."""
    if softmax_scale is None:
        softmax_scale = query.shape[-1] ** -0.5
    return torch.ops.spot.block_mass(query, key, cu_seqlens, max_seqlen, block_size_q, block_size_k, softmax_scale)


def pack_kcache(
    keys: torch.Tensor, format: str = "int4", global_scale: float = 1.0, check_finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise keys [..., r] (r a multiple of 32) to 4-bit codes uint8 [..., r/2] and scales
    [..., r/group] (float16 for int4; uint8 E8M0 for mxfp4; uint8 E4M3 for nvfp4, whose values
    also scale by ``global_scale``). Groups with NaN/Inf unpack to NaN; ``check_finite=True``
    raises instead (it synchronises with the device)."""
    if check_finite and not bool(torch.isfinite(keys).all()):
        raise ValueError("spot.pack_kcache: argument 'keys' holds NaN or Inf")
    return torch.ops.spot.pack_kcache(keys, format, global_scale)


def unpack_kcache(
    codes: torch.Tensor, scales: torch.Tensor, format: str = "int4", global_scale: float = 1.0
) -> torch.Tensor:
    """Inverse of ``pack_kcache``: float32 [..., r]."""
    return torch.ops.spot.unpack_kcache(codes, scales, format, global_scale)


def append_kcache(
    codes: torch.Tensor,
    scales: torch.Tensor,
    keys: torch.Tensor,
    slots: torch.Tensor,
    format: str = "int4",
    global_scale: float = 1.0,
) -> None:
    """Pack keys [B, Hkv, r] into block slot ``slots[b]`` (int32 [B]; negative skips) of the packed
    cache codes [B, Hkv, NK, r/2] / scales [B, Hkv, NK, r/group], in place (graph capturable).
    A slot >= NK raises on CPU; on CUDA it is skipped (checking it would synchronise)."""
    torch.ops.spot.append_kcache(codes, scales, keys, slots, format, global_scale)


# --------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only
# --------------------------------------------------------------------------------------------


@torch.library.register_fake("spot::selector_score")
def _selector_score_fake(query, keys, key_scales, num_visible, format, global_scale, softmax_scale):
    batch, heads, rows, _ = query.shape
    return query.new_empty((batch, heads, rows, keys.shape[2]), dtype=torch.float32)


@torch.library.register_fake("spot::select_blocks")
def _select_blocks_fake(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks):
    batch, heads, rows, _ = scores.shape
    indices = scores.new_empty((batch, heads, rows, k_max), dtype=torch.int32)
    counts = scores.new_empty((batch, heads, rows), dtype=torch.int32)
    return indices, counts


@torch.library.register_fake("spot::decode_select")
def _decode_select_fake(query, keys, key_scales, seq_lens, block_size, format, global_scale, softmax_scale,
                        top_p, k_min, k_max, sink_blocks, local_blocks):
    batch, heads, _ = query.shape
    indices = query.new_empty((batch, heads, k_max), dtype=torch.int32)
    return indices, query.new_empty((batch, heads), dtype=torch.int32)


@torch.library.register_fake("spot::sparse_decode")
def _sparse_decode_fake(query, key_cache, value_cache, block_table, seq_lens, block_indices, block_counts,
                        block_size, softmax_scale):
    return torch.empty_like(query), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.register_fake("spot::sparse_prefill")
def _sparse_prefill_fake(query, key, value, cu_seqlens, max_seqlen, block_indices, block_counts, block_size,
                         softmax_scale):
    return torch.empty_like(query), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.register_fake("spot::block_mass")
def _block_mass_fake(query, key, cu_seqlens, max_seqlen, block_size_q, block_size_k, softmax_scale):
    batch = cu_seqlens.shape[0] - 1
    shape = (batch, key.shape[1], _num_blocks(max_seqlen, block_size_q), _num_blocks(max_seqlen, block_size_k))
    return query.new_empty(shape, dtype=torch.float32)


def _scale_dtype(format: str) -> torch.dtype:
    return torch.float16 if format == "int4" else torch.uint8


@torch.library.register_fake("spot::pack_kcache")
def _pack_kcache_fake(keys, format, global_scale):
    group = KCACHE_GROUP.get(format, 32)
    codes = keys.new_empty((*keys.shape[:-1], keys.shape[-1] // 2), dtype=torch.uint8)
    scales = keys.new_empty((*keys.shape[:-1], keys.shape[-1] // group), dtype=_scale_dtype(format))
    return codes, scales


@torch.library.register_fake("spot::unpack_kcache")
def _unpack_kcache_fake(codes, scales, format, global_scale):
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] * 2), dtype=torch.float32)


@torch.library.register_fake("spot::append_kcache")
def _append_kcache_fake(codes, scales, keys, slots, format, global_scale):
    return None
