"""The ops as the integration and the evaluation call them: the compiled ``torch.ops.spot`` kernel
where it exists for the tensors' device, otherwise an exact fallback, with a record of which ran.

Fallbacks are exact (same semantics as ``reference.py``) but built for speed on any device:
selection is ``policy.select_mask`` (vectorised), sparse attention runs as torch SDPA under the dense mask expanded from
the chosen blocks (the *masked* backend), block mass is a chunked dense pass. A kernel that is
a placeholder ("not implemented yet") or not compiled for the device is detected on first use
and not tried again on that device type.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .. import ops, reference

# (op name, device type) pairs whose compiled kernel is missing; filled on first failure.
_MISSING: set[tuple[str, str]] = set()
# (op name, device type) -> "kernel" | "fallback", the path last taken; read by ``report``.
_TAKEN: dict[tuple[str, str], str] = {}
_LOCK = threading.Lock()


def _is_missing_kernel(error: Exception) -> bool:
    text = str(error)
    return ("not implemented yet" in text or "Could not run 'spot::" in text or "built without CUDA" in text)


def _run(name: str, device: torch.device, kernel, fallback, *, force_fallback: bool = False,
         unsupported: str | None = None):
    """Runs ``kernel`` unless it is known missing, forced off, or ``unsupported`` names why the
    kernel cannot take these inputs (a dtype or shape its entry rejects on this device)."""
    key = (name, device.type)
    if not force_fallback and unsupported is None and key not in _MISSING:
        try:
            result = kernel()
            with _LOCK:
                _TAKEN[key] = "kernel"
            return result
        except (RuntimeError, NotImplementedError, ValueError) as error:
            if not _is_missing_kernel(error):
                raise
            with _LOCK:
                _MISSING.add(key)
    with _LOCK:
        if force_fallback:
            _TAKEN[key] = "masked (forced)"
        elif unsupported is not None:
            _TAKEN[key] = f"fallback ({unsupported})"
        else:
            _TAKEN[key] = "fallback (no kernel)"
    return fallback()


def _attention_unsupported(name: str, query: torch.Tensor, head_dim: int, block_size: int | None) -> str | None:
    """Why the compiled attention kernels would reject these inputs (mirrors their entries)."""
    on_cuda = query.is_cuda
    if on_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        return f"{query.dtype} on cuda"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{query.dtype}"
    if name == "sparse_prefill":
        if on_cuda and head_dim not in (64, 128):
            return f"head_dim {head_dim}"
        if on_cuda and block_size not in (64, 128):
            return f"block_size {block_size}"
    elif head_dim not in (64, 128, 256):
        return f"head_dim {head_dim}"
    if name == "block_mass" and on_cuda and block_size is not None and block_size & (block_size - 1):
        return f"block_size {block_size}"
    return None


def kernel_available(name: str, device: torch.device | str) -> bool:
    """False once ``name`` was found missing on this device type (True until first tried)."""
    return (name, torch.device(device).type) not in _MISSING


def report() -> dict[str, str]:
    """Which path each op took, ``{"sparse_prefill/cuda": "kernel", ...}``."""
    with _LOCK:
        return {f"{name}/{device}": path for (name, device), path in sorted(_TAKEN.items())}


def reset_report() -> None:
    with _LOCK:
        _TAKEN.clear()


# --------------------------------------------------------------------------------------------
# Block masks
# --------------------------------------------------------------------------------------------


def block_mask_from_indices(indices: torch.Tensor, counts: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """indices int32 [..., K] (-1 padded), counts int32 [...] -> bool [..., num_key_blocks]."""
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < counts[..., None].long()
    index = indices.long()
    valid &= (index >= 0) & (index < num_key_blocks)
    index = torch.where(valid, index, torch.full_like(index, num_key_blocks))
    mask = torch.zeros(*indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, index, True)
    return mask[..., :num_key_blocks]


def prefill_block_mask(indices: torch.Tensor, counts: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The key blocks a prefill query block actually reads: its chosen blocks that are not after
    it, plus always its diagonal block (``sparse_prefill``'s rule). bool [B, Hkv, NQ, NQ]."""
    mask = block_mask_from_indices(indices[..., :num_blocks, :], counts[..., :num_blocks], num_blocks)
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=mask.device).tril()
    diagonal = torch.eye(num_blocks, dtype=torch.bool, device=mask.device)
    return (mask & causal) | diagonal


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def select_blocks_torch(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks):
    """The vectorised dual top-p of ``policy.select_mask`` as (indices, counts), any device."""
    from .. import policy

    mask = policy.select_mask(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks)
    return policy.indices_from_mask(mask, k_max)


def select_blocks(scores, num_visible, top_p, k_min, k_max, sink_blocks=1, local_blocks=1, *, force_fallback=False):
    return _run(
        "select_blocks", scores.device,
        lambda: ops.select_blocks(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks),
        lambda: select_blocks_torch(scores, num_visible, top_p, k_min, k_max, sink_blocks, local_blocks),
        force_fallback=force_fallback,
    )


def _unpack_on_device(codes, scales, fmt, global_scale):
    # reference.unpack_kcache builds its lookup grids on the CPU: run it there.
    return reference.unpack_kcache(codes.cpu(), scales.cpu(), fmt, global_scale).to(codes.device)


def unpack_kcache(codes, scales, fmt, global_scale=1.0):
    return _run(
        "unpack_kcache", codes.device,
        lambda: ops.unpack_kcache(codes, scales, fmt, global_scale),
        lambda: _unpack_on_device(codes, scales, fmt, global_scale),
    )


def pack_kcache(keys, fmt, global_scale=1.0):
    def fallback():
        codes, scales = reference.pack_kcache(keys.detach().cpu(), fmt, global_scale)
        return codes.to(keys.device), scales.to(keys.device)

    return _run("pack_kcache", keys.device, lambda: ops.pack_kcache(keys, fmt, global_scale), fallback)


def append_kcache(codes, scales, keys, slots, fmt, global_scale=1.0) -> None:
    def fallback():
        new_codes, new_scales = pack_kcache(keys, fmt, global_scale)  # [B, Hkv, r/2], [B, Hkv, r/g]
        for b, slot in enumerate(slots.tolist()):
            if slot >= 0:
                codes[b, :, slot] = new_codes[b]
                scales[b, :, slot] = new_scales[b]

    _run("append_kcache", codes.device, lambda: ops.append_kcache(codes, scales, keys, slots, fmt, global_scale),
         fallback)


def selector_score(query, keys, num_visible, softmax_scale, key_scales=None, fmt="dense", global_scale=1.0):
    """query [B, Hkv, NQ, r]; keys dense [B, Hkv, NK, r] or packed codes + key_scales."""

    def fallback():
        dense = keys if fmt == "dense" else unpack_kcache(keys, key_scales, fmt, global_scale)
        logits = torch.einsum("bhqr,bhkr->bhqk", query.float(), dense.float()) * softmax_scale
        column = torch.arange(dense.shape[2], device=query.device)
        visible = column[None, None, :] < num_visible[:, :, None].long()
        return logits.masked_fill(~visible[:, None], float("-inf"))

    return _run(
        "selector_score", query.device,
        lambda: ops.selector_score(query, keys, num_visible, softmax_scale, key_scales, fmt, global_scale),
        fallback,
    )


def decode_select(query, keys, seq_lens, top_p, k_min, k_max, sink_blocks, local_blocks, block_size,
                  softmax_scale, key_scales=None, fmt="dense", global_scale=1.0):
    """query [B, Hkv, r]; keys [B, Hkv, NK, r] dense or packed. See ``ops.decode_select``."""

    def fallback():
        lengths = seq_lens.long()
        scored = (lengths // block_size).to(torch.int32)[:, None]
        visible = ((lengths + block_size - 1) // block_size).to(torch.int32)[:, None]
        scores = selector_score(query[:, :, None], keys, scored, softmax_scale, key_scales, fmt, global_scale)
        width = max(int(visible.max()), scores.shape[-1])
        if width > scores.shape[-1]:
            scores = F.pad(scores, (0, width - scores.shape[-1]), value=float("-inf"))
        indices, counts = select_blocks(scores, visible, top_p, k_min, k_max, sink_blocks, local_blocks)
        return indices[:, :, 0], counts[:, :, 0]

    return _run(
        "decode_select", query.device,
        lambda: ops.decode_select(query, keys, seq_lens, top_p, k_min, k_max, sink_blocks, local_blocks,
                                  block_size, softmax_scale, key_scales, fmt, global_scale),
        fallback,
    )


# --------------------------------------------------------------------------------------------
# Attention over chosen blocks: kernels and the masked (SDPA) backend
# --------------------------------------------------------------------------------------------


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """[B, Hq, Lq, d] / [B, Hkv, Lk, d] -> group-major views [B*Hkv, G, L, d] so that one mask row
    per KV group broadcasts over its query heads without being copied G times."""
    batch, heads_q, length_q, dim = query.shape
    heads_kv, length_k = key.shape[1], key.shape[2]
    group = heads_q // heads_kv
    q = query.reshape(batch * heads_kv, group, length_q, dim)
    k = key.reshape(batch * heads_kv, 1, length_k, dim).expand(-1, group, -1, -1)
    v = value.reshape(batch * heads_kv, 1, length_k, value.shape[-1]).expand(-1, group, -1, -1)
    return q, k, v


def masked_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    chunk_rows: int = 2048,
) -> torch.Tensor:
    """Exact block-sparse causal attention through SDPA. query [B, Hq, L, d]; key, value
    [B, Hkv, L, d]; block_mask bool [B, Hkv, NQ, NQ] (from ``prefill_block_mask``);
    attention_mask: optional bool [B, 1 or Hq, L, L] (True = attend) or additive float, ANDed in.
    Returns [B, L, Hq, d]."""
    batch, heads_q, length, dim = query.shape
    heads_kv = key.shape[1]
    group = heads_q // heads_kv
    q, k, v = _grouped(query, key, value)
    token_block = torch.arange(length, device=query.device) // block_size
    out = torch.empty(batch * heads_kv, group, length, value.shape[-1], dtype=query.dtype, device=query.device)
    extra = _as_bool_mask(attention_mask)
    for start in range(0, length, chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, length), device=query.device)
        allowed = block_mask[:, :, token_block[rows]][..., token_block]  # [B, Hkv, C, L]
        allowed = allowed & (token_block[None, :] <= token_block[rows][:, None])
        allowed = allowed & (torch.arange(length, device=query.device)[None, :] <= rows[:, None])
        if extra is not None:
            allowed = allowed & _mask_for_groups(extra[:, :, start : start + len(rows)], heads_kv)
        allowed = allowed.reshape(batch * heads_kv, 1, len(rows), length)
        out[:, :, start : start + len(rows)] = F.scaled_dot_product_attention(
            q[:, :, start : start + len(rows)], k, v, attn_mask=allowed, scale=scaling
        )
    return out.reshape(batch, heads_q, length, -1).transpose(1, 2)


def masked_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact block-sparse attention for queries at the end of the cache. query [B, Hq, Lq, d]
    (Lq = 1 in decode); key, value [B, Hkv, Lk, d]; block_mask bool [B, Hkv, NK]. Returns
    [B, Lq, Hq, d]."""
    batch, heads_q, length_q, _ = query.shape
    heads_kv, length_k = key.shape[1], key.shape[2]
    q, k, v = _grouped(query, key, value)
    token_block = torch.arange(length_k, device=query.device) // block_size
    allowed = block_mask[..., token_block][:, :, None, :].expand(-1, -1, length_q, -1)  # [B, Hkv, Lq, Lk]
    position_q = torch.arange(length_k - length_q, length_k, device=query.device)
    allowed = allowed & (torch.arange(length_k, device=query.device)[None, :] <= position_q[:, None])
    extra = _as_bool_mask(attention_mask)
    if extra is not None:
        allowed = allowed & _mask_for_groups(extra, heads_kv)
    allowed = allowed.reshape(batch * heads_kv, 1, length_q, length_k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    return out.reshape(batch, heads_q, length_q, -1).transpose(1, 2)


def _as_bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _mask_for_groups(mask: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """[B, 1 or Hq, C, L] -> broadcastable to [B, Hkv, C, L] (a per-head mask must agree within
    a group, as it does for padding masks: take its first head)."""
    if mask.shape[1] == 1:
        return mask
    group = mask.shape[1] // heads_kv
    return mask[:, ::group]


def sparse_prefill(query, key, value, block_indices, block_counts, block_size, scaling, *, force_masked=False):
    """query [B, Hq, L, d]; key, value [B, Hkv, L, d] (one length, no padding); block_indices
    [B, Hkv, NQ, K]. Returns [B, L, Hq, d]. Uses the compiled kernel on packed rows when present."""
    batch, heads_q, length, dim = query.shape
    num_blocks = reference.num_blocks(length, block_size)

    def kernel():
        packed_q = query.transpose(1, 2).reshape(batch * length, heads_q, dim).contiguous()
        packed_k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim).contiguous()
        packed_v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1]).contiguous()
        cu_seqlens = torch.arange(batch + 1, device=query.device, dtype=torch.int32) * length
        out, _ = ops.sparse_prefill(packed_q, packed_k, packed_v, cu_seqlens, length, block_indices.contiguous(),
                                    block_counts.contiguous(), block_size, scaling)
        return out.reshape(batch, length, heads_q, -1)

    def fallback():
        mask = prefill_block_mask(block_indices, block_counts, num_blocks)
        return masked_prefill(query, key, value, mask, block_size, scaling)

    return _run("sparse_prefill", query.device, kernel, fallback, force_fallback=force_masked,
                unsupported=_attention_unsupported("sparse_prefill", query, dim, block_size))


def sparse_decode(query, key, value, block_indices, block_counts, block_size, scaling, *, force_masked=False):
    """query [B, Hq, 1, d]; key, value [B, Hkv, Lk, d] (cache layout; passed to the kernel as the
    strided view [B, Lk, Hkv, d]); block_indices [B, Hkv, K]. Returns [B, 1, Hq, d]."""
    batch, _, _, _ = query.shape
    length = key.shape[2]

    def kernel():
        seq_lens = torch.full((batch,), length, dtype=torch.int32, device=query.device)
        out, _ = ops.sparse_decode(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), seq_lens,
                                   block_indices.contiguous(), block_counts.contiguous(), block_size, scaling)
        return out[:, None]

    def fallback():
        mask = block_mask_from_indices(block_indices, block_counts, reference.num_blocks(length, block_size))
        return masked_decode(query, key, value, mask, block_size, scaling)

    return _run("sparse_decode", query.device, kernel, fallback, force_fallback=force_masked,
                unsupported=_attention_unsupported("sparse_decode", query, query.shape[-1], block_size))


# --------------------------------------------------------------------------------------------
# Teacher block mass
# --------------------------------------------------------------------------------------------


def block_mass_torch(query, key, block_size_q, block_size_k, scaling, chunk_rows=1024):
    """Exact causal block mass for equal-length batches. query [B, Hq, L, d]; key [B, Hkv, L, d].
    Returns float32 [B, Hkv, ceil(L/bq), ceil(L/bk)] (``reference.block_mass`` semantics)."""
    batch, heads_q, length, _ = query.shape
    heads_kv = key.shape[1]
    group = heads_q // heads_kv
    num_q = reference.num_blocks(length, block_size_q)
    num_k = reference.num_blocks(length, block_size_k)
    device = query.device
    key_block = torch.arange(length, device=device) // block_size_k
    # Whole query blocks per chunk so each block's mean is taken once.
    chunk_rows = max(block_size_q, chunk_rows // block_size_q * block_size_q)
    mass = torch.zeros(batch, heads_kv, num_q, num_k, dtype=torch.float32, device=device)
    keys = key.float().repeat_interleave(group, 1)
    for start in range(0, length, chunk_rows):
        end = min(start + chunk_rows, length)
        rows = torch.arange(start, end, device=device)
        logits = torch.matmul(query[:, :, start:end].float(), keys.transpose(-1, -2)) * scaling  # [B, Hq, C, L]
        logits = logits.masked_fill(torch.arange(length, device=device)[None, :] > rows[:, None], float("-inf"))
        prob = torch.softmax(logits, -1)
        per_block = torch.zeros(batch, heads_q, end - start, num_k, dtype=torch.float32, device=device)
        per_block.index_add_(3, key_block, prob)
        per_block = per_block.view(batch, heads_kv, group, end - start, num_k).mean(2)  # [B, Hkv, C, NK]
        query_block = rows // block_size_q
        first = start // block_size_q
        sums = torch.zeros(batch, heads_kv, num_q, num_k, dtype=torch.float32, device=device)
        sums.index_add_(2, query_block, per_block)
        sizes = torch.bincount(query_block, minlength=num_q).clamp(min=1).float()
        last = int(query_block[-1]) + 1
        mass[:, :, first:last] = (sums / sizes[:, None])[:, :, first:last]
    return mass


def block_mass(query, key, block_size_q, block_size_k, scaling):
    """Teacher mass for equal-length batches: query [B, Hq, L, d], key [B, Hkv, L, d]."""
    batch, heads_q, length, dim = query.shape

    def kernel():
        packed_q = query.transpose(1, 2).reshape(batch * length, heads_q, dim).contiguous()
        packed_k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim).contiguous()
        cu_seqlens = torch.arange(batch + 1, device=query.device, dtype=torch.int32) * length
        return ops.block_mass(packed_q, packed_k, cu_seqlens, length, block_size_q, block_size_k, scaling)

    return _run("block_mass", query.device, kernel,
                lambda: block_mass_torch(query, key, block_size_q, block_size_k, scaling),
                unsupported=_attention_unsupported("block_mass", query, dim, block_size_k))


def selector_softmax_scale(rank: int) -> float:
    return 1.0 / math.sqrt(rank)
