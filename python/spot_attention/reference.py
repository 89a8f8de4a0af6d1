"""Readable PyTorch specification of every ``torch.ops.spot`` op.

Each function here is the definition its C++ and CUDA kernels are tested against. They run in
any floating dtype (float64 for exact references) and favour clarity over speed; only
``block_mass`` and ``sparse_prefill`` avoid an ``L x L`` tensor per head, because tests and the
evaluation harness run them at several thousand tokens.

Conventions shared by all ops
-----------------------------
* ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads, ``G = Hq // Hkv`` (query head ``h`` belongs to
  KV group ``h // G``), ``d`` head dim, ``r`` selector dim.
* A *key block* ``j`` holds tokens ``[j * block_size, (j + 1) * block_size)``; the last block of a
  sequence may be partial.
* Block lists are ``int32`` tensors ``[..., k_max]`` sorted ascending and padded with ``-1``,
  with an ``int32`` count ``[...]`` of valid entries.
* Log-sum-exp (``lse``) is the natural log of the sum of ``exp(scale * q.k)`` over attended keys,
  ``-inf`` when nothing is attended (the output is then zero).
"""

from __future__ import annotations

import math

import torch

KCACHE_FORMATS = ("int4", "mxfp4", "nvfp4")
# Values per shared scale, per format.
KCACHE_GROUP = {"int4": 32, "mxfp4": 32, "nvfp4": 16}

# E2M1 (FP4) magnitudes, indexed by the 3 low bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


# --------------------------------------------------------------------------------------------
# Selector scoring and dual top-p selection
# --------------------------------------------------------------------------------------------


def selector_score(
    query: torch.Tensor,
    keys: torch.Tensor,
    num_visible: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Selector logits of query rows against pooled key blocks.

    query: [B, Hkv, NQ, r]; keys: [B, Hkv, NK, r] (already dequantised, see ``unpack_kcache``);
    num_visible: int32 [B, NQ], key blocks row ``(b, q)`` may see (``0 <= n <= NK``).
    Returns float32 [B, Hkv, NQ, NK]: ``softmax_scale * query . key`` for visible blocks, ``-inf``
    for the rest.
    """
    logits = torch.einsum("bhqr,bhkr->bhqk", query.double(), keys.double()) * softmax_scale
    nk = keys.shape[2]
    visible = torch.arange(nk, device=query.device)[None, None, :] < num_visible[:, :, None].long()
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.float()


def select_blocks(
    scores: torch.Tensor,
    num_visible: torch.Tensor,
    top_p: float,
    k_min: int,
    k_max: int,
    sink_blocks: int,
    local_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual top-p block selection for every row of ``scores``.

    scores: float32 [B, H, NQ, NK] logits (``-inf`` = probability 0); num_visible: int32 [B, NQ].
    For each row with ``n = num_visible`` visible blocks:

    1. ``prob = softmax(scores[:n])`` (all ``-inf`` rows give all-zero probabilities).
    2. Forced blocks ``F``: the first ``sink_blocks`` and the last ``local_blocks`` visible ones.
    3. The other visible blocks ``C`` are ranked by probability (ties: lower index first); ``k_p``
       is the fewest of them whose mass added to ``mass(F)`` reaches ``top_p`` (all of ``C``
       when it is never reached).
    4. The row keeps ``F`` plus the top ``clamp(|F| + k_p, k_min, k_max) - |F|`` of ``C``
       (clamped to ``[0, |C|]``).

    Returns (indices int32 [B, H, NQ, k_max] ascending, -1 padded; counts int32 [B, H, NQ]).
    ``k_max >= sink_blocks + local_blocks`` is required.
    """
    batch, heads, nq, nk = scores.shape
    indices = torch.full((batch, heads, nq, k_max), -1, dtype=torch.int32)
    counts = torch.zeros((batch, heads, nq), dtype=torch.int32)
    scores_cpu = scores.detach().double().cpu()
    visible_cpu = num_visible.detach().cpu()
    for b in range(batch):
        for q in range(nq):
            n = int(visible_cpu[b, q])
            for h in range(heads):
                chosen = _select_row(scores_cpu[b, h, q, :n], top_p, k_min, k_max, sink_blocks, local_blocks)
                counts[b, h, q] = len(chosen)
                if chosen:
                    indices[b, h, q, : len(chosen)] = torch.tensor(sorted(chosen), dtype=torch.int32)
    return indices.to(scores.device), counts.to(scores.device)


def _select_row(row: torch.Tensor, top_p, k_min, k_max, sink_blocks, local_blocks) -> list[int]:
    n = row.numel()
    if n == 0:
        return []
    if torch.isinf(row).all():
        prob = torch.zeros_like(row)
    else:
        prob = torch.softmax(row, dim=0)
    forced = set(range(min(sink_blocks, n))) | set(range(max(n - local_blocks, 0), n))
    mass = sum(float(prob[j]) for j in forced)
    candidates = sorted((j for j in range(n) if j not in forced), key=lambda j: (-float(prob[j]), j))
    k_p = len(candidates)
    running = mass
    for taken, j in enumerate(candidates):
        if running >= top_p:
            k_p = taken
            break
        running += float(prob[j])
    else:
        if running >= top_p:
            k_p = len(candidates)
    total = min(max(len(forced) + k_p, k_min), k_max)
    extra = min(max(total - len(forced), 0), len(candidates))
    return sorted(forced) + candidates[:extra]


# --------------------------------------------------------------------------------------------
# Attention over chosen blocks
# --------------------------------------------------------------------------------------------


def _gather_tokens(cache: torch.Tensor, block_table: torch.Tensor | None, b: int, length: int) -> torch.Tensor:
    """Tokens ``[0, length)`` of sequence ``b`` as [length, Hkv, d]."""
    if block_table is None:
        return cache[b, :length]
    page = cache.shape[1]
    pages = block_table[b, : num_blocks(length, page)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def sparse_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    seq_lens: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    block_size: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode query per sequence attending only to its group's chosen key blocks.

    query: [B, Hq, d]. Without ``block_table`` the caches are [B, L_max, Hkv, d]; with it they
    are pages [P, page_size, Hkv, d] and ``block_table`` int32 [B, pages_max] maps the
    sequence's page ``i`` (tokens ``[i * page_size, (i + 1) * page_size)``) to a page row.
    seq_lens int32 [B] (the query sees every cached token ``< seq_len``); block_indices int32
    [B, Hkv, K] and block_counts int32 [B, Hkv] as produced by ``select_blocks``.
    Returns (out [B, Hq, d] in query's dtype, lse float32 [B, Hq]).
    """
    batch, hq, dim = query.shape
    hkv = key_cache.shape[2]
    group = hq // hkv
    out = torch.zeros(batch, hq, dim, dtype=torch.float64)
    lse = torch.full((batch, hq), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        keys = _gather_tokens(key_cache, block_table, b, length).double()
        values = _gather_tokens(value_cache, block_table, b, length).double()
        for g in range(hkv):
            count = int(block_counts[b, g])
            blocks = block_indices[b, g, :count].long().tolist()
            tokens = [t for j in blocks for t in range(j * block_size, min((j + 1) * block_size, length))]
            if not tokens:
                continue
            token_index = torch.tensor(tokens, dtype=torch.long)
            k = keys[token_index, g]  # [n, d]
            v = values[token_index, g]
            for h in range(g * group, (g + 1) * group):
                logits = (k @ query[b, h].double()) * softmax_scale
                lse[b, h] = torch.logsumexp(logits, 0)
                out[b, h] = torch.softmax(logits, 0) @ v
    return out.to(query.dtype), lse.float()


def sparse_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    block_size: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block-sparse attention for packed variable-length sequences.

    query: [T, Hq, d]; key, value: [T, Hkv, d]; cu_seqlens int32 [B + 1] (sequence ``b`` is rows
    ``[cu[b], cu[b+1])`` of all three). Query block ``i`` of a sequence (its tokens
    ``[i * block_size, ...)``) attends to the key blocks ``block_indices[b, g, i, :count]`` that
    are not after it, plus always its diagonal block ``i``; inside the diagonal block the mask is
    causal per token. block_indices int32 [B, Hkv, NQ, K], block_counts int32 [B, Hkv, NQ] with
    ``NQ >= num_blocks(longest sequence)``. The first ``clamp(count, 0, K)`` entries are read as a
    set: order and duplicates do not matter, and entries outside ``[0, i)`` are ignored.
    Returns (out [T, Hq, d] in query's dtype, lse float32 [T, Hq]).
    """
    total, hq, dim = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    out = torch.zeros(total, hq, dim, dtype=torch.float64)
    lse = torch.full((total, hq), float("-inf"), dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        start, end = bounds[b], bounds[b + 1]
        length = end - start
        q = query[start:end].double()
        k = key[start:end].double()
        v = value[start:end].double()
        for qb in range(num_blocks(length, block_size)):
            rows = torch.arange(qb * block_size, min((qb + 1) * block_size, length))
            for g in range(hkv):
                count = min(max(int(block_counts[b, g, qb]), 0), block_indices.shape[-1])
                chosen = {j for j in block_indices[b, g, qb, :count].tolist() if 0 <= j < qb}
                chosen.add(qb)
                cols = torch.tensor(
                    [t for j in sorted(chosen) for t in range(j * block_size, min((j + 1) * block_size, length))]
                )
                causal = cols[None, :] <= rows[:, None]  # [rows, cols]
                for h in range(g * group, (g + 1) * group):
                    logits = (q[rows, h] @ k[cols, g].T) * softmax_scale
                    logits = logits.masked_fill(~causal, float("-inf"))
                    lse[start + rows, h] = torch.logsumexp(logits, 1)
                    out[start + rows, h] = torch.softmax(logits, 1) @ v[cols, g]
    return out.to(query.dtype), lse.float()


def dense_causal_attention(query, key, value, cu_seqlens, softmax_scale):
    """Dense causal attention for packed sequences: ``sparse_prefill`` with every block chosen."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    group = query.shape[1] // key.shape[1]
    for b in range(len(bounds) - 1):
        q = query[bounds[b] : bounds[b + 1]].double().transpose(0, 1)
        k = key[bounds[b] : bounds[b + 1]].double().transpose(0, 1).repeat_interleave(group, 0)
        v = value[bounds[b] : bounds[b + 1]].double().transpose(0, 1).repeat_interleave(group, 0)
        length = q.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        logits = (q @ k.transpose(1, 2) * softmax_scale).masked_fill(~mask, float("-inf"))
        out[bounds[b] : bounds[b + 1]] = (torch.softmax(logits, -1) @ v).transpose(0, 1)
    return out.to(query.dtype)


# --------------------------------------------------------------------------------------------
# Teacher targets
# --------------------------------------------------------------------------------------------


def block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    softmax_scale: float,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Exact causal attention mass per key block: the distillation teacher.

    query: [T, Hq, d]; key: [T, Hkv, d]; cu_seqlens int32 [B + 1]. For sequence ``b``, KV group
    ``g``, query block ``i`` (``block_size_q`` tokens; 1 gives per-token targets) and key block
    ``j``::

        mass[b, g, i, j] = mean over heads h in g and query tokens t in block i of
                           sum over key tokens s <= t in block j of softmax_s(scale * q_t,h . k_s,g)

    Returns float32 [B, Hkv, NQ, NK] with ``NQ = num_blocks(max_seqlen, block_size_q)`` and
    ``NK = num_blocks(max_seqlen, block_size_k)``; rows sum to 1 where the query block exists and
    entries outside a sequence are 0. Works a query chunk at a time, never holding ``L x L``.
    """
    total, hq, dim = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    bounds = cu_seqlens.tolist()
    lengths = [bounds[b + 1] - bounds[b] for b in range(len(bounds) - 1)]
    max_len = max_seqlen if max_seqlen is not None else max(lengths, default=0)
    nq = num_blocks(max_len, block_size_q)
    nk = num_blocks(max_len, block_size_k)
    mass = torch.zeros(len(lengths), hkv, nq, nk, dtype=torch.float64)
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        k = key[bounds[b] : bounds[b + 1]].double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, d]
        key_block = torch.arange(length) // block_size_k
        for qb in range(num_blocks(length, block_size_q)):
            rows = torch.arange(qb * block_size_q, min((qb + 1) * block_size_q, length))
            q = query[bounds[b] + rows].double().transpose(0, 1)  # [Hq, rows, d]
            logits = q @ k.transpose(1, 2) * softmax_scale  # [Hq, rows, L]
            causal = torch.arange(length)[None, :] <= rows[:, None]
            prob = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
            per_block = torch.zeros(hq, len(rows), nk, dtype=torch.float64)
            per_block.index_add_(2, key_block, prob)
            mass[b, :, qb] = per_block.view(hkv, group, len(rows), nk).mean(dim=(1, 2))
    return mass.float()


# --------------------------------------------------------------------------------------------
# 4-bit selector K-cache formats
# --------------------------------------------------------------------------------------------
#
# Every format packs the last dim ``r`` (a multiple of 32) two codes per byte: element ``2i`` in
# the low nibble of byte ``i``, element ``2i + 1`` in the high nibble.
#
# int4  : code = two's-complement integer in [-8, 7]; one float16 scale per 32 values,
#         scale = fp16(amax / 7); value = code * scale. Codes are rne(x / scale) saturated to
#         [-8, 7] (so only saturation reaches -8). amax = 0 gives scale 0 and codes 0.
# mxfp4 : code = E2M1 (sign bit 3, magnitude index bits 0-2 into E2M1_VALUES); one E8M0 scale
#         byte per 32 values: the OCP MX rule, exponent = floor(log2(amax)) - 2 clamped to
#         [-127, 127], byte = exponent + 127; value = E2M1 * 2^exponent. Codes are
#         rne(x / 2^exponent) onto the E2M1 grid, saturated at +-6. amax = 0 gives byte 0.
# nvfp4 : code = E2M1; one E4M3 scale byte per 16 values and one float32 ``global_scale`` per
#         tensor: block scale = e4m3(amax / 6 / global_scale) (round to nearest even,
#         saturated at 448); value = E2M1 * e4m3 * global_scale. A good ``global_scale`` is
#         amax(tensor) / (6 * 448).
#
# A group holding NaN or Inf packs to zero codes and a NaN scale (fp16 0x7E00, E8M0 0xFF,
# E4M3 0x7F), so it unpacks to NaN for the whole group: propagated, never silently finite.
# ``ops.pack_kcache(check_finite=True)`` raises instead.


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even


def quantize_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (0..15) of ``x`` (ties to the even mantissa), saturating at +-6."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    mag = x.abs().double().clamp(max=6.0)
    # Distance to every grid point; ties go to the code with an even index (even mantissa bit).
    dist = (mag[..., None] - grid).abs()
    best = dist.min(-1, keepdim=True).values
    is_best = dist == best
    even = torch.tensor([i % 2 == 0 for i in range(8)])
    prefer = torch.where(is_best.sum(-1, keepdim=True) > 1, is_best & even, is_best)
    index = prefer.to(torch.int64).argmax(-1)
    sign = (x < 0) & (index > 0)
    return (index + 8 * sign.to(torch.int64)).to(torch.uint8)


def dequantize_e2m1(code: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    code = code.long()
    mag = grid[code & 7]
    return torch.where(code >= 8, -mag, mag)


def float_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> E4M3 (fn) byte, round to nearest even, saturating at 448 (x >= 0 here)."""
    return x.float().clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_to_float(byte: torch.Tensor) -> torch.Tensor:
    return byte.view(torch.float8_e4m3fn).double()


def _nibbles_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def _bytes_to_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0xF
    high = (packed >> 4) & 0xF
    return torch.stack((low, high), -1).flatten(-2)


def pack_kcache(keys: torch.Tensor, fmt: str, global_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise keys [..., r] to (codes uint8 [..., r/2], scales [..., r/group]); see above."""
    group = KCACHE_GROUP[fmt]
    x = keys.double().reshape(*keys.shape[:-1], -1, group)  # [..., groups, group]
    finite = torch.isfinite(x).all(-1)  # [..., groups]
    x = torch.where(finite[..., None], x, torch.zeros_like(x))
    amax = x.abs().amax(-1)
    if fmt == "int4":
        scale = (amax / 7).to(torch.float16)
        safe = torch.where(scale > 0, scale.double(), torch.ones_like(amax))
        codes = round_half_even(x / safe[..., None]).clamp(-8, 7)
        codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.int64) & 0xF
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
        scales = scale
    elif fmt == "mxfp4":
        exponent = torch.where(amax > 0, torch.floor(torch.log2(torch.where(amax > 0, amax, 1.0))) - 2, -127.0)
        exponent = exponent.clamp(-127, 127)
        codes = quantize_e2m1(x / torch.exp2(exponent)[..., None]).long()
        scales = (exponent + 127).to(torch.uint8)
        scales = torch.where(finite, scales, torch.full_like(scales, 0xFF))
    elif fmt == "nvfp4":
        block_scale = float_to_e4m3(amax / 6.0 / global_scale)
        real = e4m3_to_float(block_scale) * global_scale
        safe = torch.where(real > 0, real, torch.ones_like(real))
        codes = quantize_e2m1(x / safe[..., None]).long()
        codes = torch.where(real[..., None] > 0, codes, torch.zeros_like(codes))
        scales = torch.where(finite, block_scale, torch.full_like(block_scale, 0x7F))
    else:
        raise ValueError(f"unknown kcache format {fmt!r}; expected one of {KCACHE_FORMATS}")
    codes = torch.where(finite[..., None], codes, torch.zeros_like(codes))
    packed = _nibbles_to_bytes(codes.reshape(*keys.shape))
    return packed, scales.reshape(*keys.shape[:-1], -1)


def unpack_kcache(codes: torch.Tensor, scales: torch.Tensor, fmt: str, global_scale: float = 1.0) -> torch.Tensor:
    """Inverse of ``pack_kcache``: float32 [..., r]."""
    group = KCACHE_GROUP[fmt]
    nib = _bytes_to_nibbles(codes).long()
    nib = nib.reshape(*nib.shape[:-1], -1, group)
    if fmt == "int4":
        values = torch.where(nib >= 8, nib - 16, nib).double() * scales.double()[..., None]
    elif fmt == "mxfp4":
        scale = torch.where(scales == 0xFF, float("nan"), torch.exp2(scales.double() - 127))
        values = dequantize_e2m1(nib) * scale[..., None]
    elif fmt == "nvfp4":
        values = dequantize_e2m1(nib) * (e4m3_to_float(scales) * global_scale)[..., None]
    else:
        raise ValueError(f"unknown kcache format {fmt!r}; expected one of {KCACHE_FORMATS}")
    return values.reshape(*codes.shape[:-1], -1).float()


def decode_select(query, keys, seq_lens, block_size, softmax_scale, top_p, k_min, k_max, sink_blocks, local_blocks):
    """Fused decode selection on dense selector keys: query [B, Hkv, r], keys [B, Hkv, NK, r]."""
    scored = (seq_lens.long() // block_size).to(torch.int32)[:, None]
    visible = ((seq_lens.long() + block_size - 1) // block_size).to(torch.int32)[:, None]
    scores = selector_score(query[:, :, None], keys, scored, softmax_scale)  # [B, Hkv, 1, NK]
    width = max(int(visible.max()), keys.shape[2]) if visible.numel() else keys.shape[2]
    if width > keys.shape[2]:
        pad = scores.new_full((*scores.shape[:3], width - keys.shape[2]), float("-inf"))
        scores = torch.cat((scores, pad), -1)
    indices, counts = select_blocks(scores, visible, top_p, k_min, k_max, sink_blocks, local_blocks)
    return indices[:, :, 0], counts[:, :, 0]
