"""Every ``torch.ops.spot`` op on small random inputs against ``reference.py``: one table row per
(op, case), saying whether the compiled kernel matches, is missing, or disagrees."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .. import ops, reference


@dataclasses.dataclass
class CheckResult:
    op: str
    case: str
    device: str
    status: str  # "ok", "MISMATCH", "missing", "error"
    max_error: float = float("nan")
    detail: str = ""


def _compare(got, expected, atol: float, rtol: float) -> tuple[bool, float, str]:
    got_list = got if isinstance(got, (tuple, list)) else (got,)
    expected_list = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = 0.0
    for got_item, expected_item in zip(got_list, expected_list):
        got_item = got_item.detach().cpu()
        expected_item = expected_item.detach().cpu()
        if got_item.shape != expected_item.shape:
            return False, float("inf"), f"shape {tuple(got_item.shape)} != {tuple(expected_item.shape)}"
        if not got_item.is_floating_point():
            if not torch.equal(got_item.to(expected_item.dtype), expected_item):
                return False, float((got_item.long() - expected_item.long()).abs().max()), "integers differ"
            continue
        got_item, expected_item = got_item.double(), expected_item.double()
        same_inf = torch.isinf(got_item) == torch.isinf(expected_item)
        if not bool(same_inf.all()):
            return False, float("inf"), "-inf pattern differs"
        finite = torch.isfinite(expected_item) & torch.isfinite(got_item)
        nan_mismatch = torch.isnan(got_item) != torch.isnan(expected_item)
        if bool(nan_mismatch.any()):
            return False, float("nan"), "NaN pattern differs"
        if bool(finite.any()):
            error = (got_item[finite] - expected_item[finite]).abs()
            worst = max(worst, float(error.max()))
            if not bool((error <= atol + rtol * expected_item[finite].abs()).all()):
                return False, worst, ""
    return True, worst, ""


def _run_case(op: str, case: str, device: torch.device, compute: Callable, expect: Callable, atol=1e-5,
              rtol=1e-5) -> CheckResult:
    try:
        got = compute()
    except (RuntimeError, NotImplementedError, ValueError) as error:
        text = str(error)
        if "not implemented yet" in text or "Could not run" in text or "built without CUDA" in text:
            return CheckResult(op, case, device.type, "missing", detail=text.splitlines()[0][:80])
        return CheckResult(op, case, device.type, "error", detail=text.splitlines()[0][:120])
    ok, worst, detail = _compare(got, expect(), atol, rtol)
    return CheckResult(op, case, device.type, "ok" if ok else "MISMATCH", worst, detail)


def run_selfcheck(device: str | torch.device = "cpu", seed: int = 0) -> list[CheckResult]:
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    results: list[CheckResult] = []
    attention_dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if device.type == "cpu" else [])

    # selector_score: dense and packed keys.
    query = randn(2, 3, 4, 64)
    keys = randn(2, 3, 7, 64)
    visible = torch.tensor([[7, 3, 0, 5], [1, 7, 6, 2]], dtype=torch.int32, device=device)
    results.append(_run_case(
        "selector_score", "dense r=64", device,
        lambda: ops.selector_score(query, keys, visible, 0.125),
        lambda: reference.selector_score(query.cpu(), keys.cpu(), visible.cpu(), 0.125), atol=1e-4))
    for fmt in reference.KCACHE_FORMATS:
        global_scale = float(keys.abs().max()) / (6 * 448) if fmt == "nvfp4" else 1.0
        codes, scales = reference.pack_kcache(keys.cpu(), fmt, global_scale)
        codes, scales = codes.to(device), scales.to(device)
        dequantised = reference.unpack_kcache(codes.cpu(), scales.cpu(), fmt, global_scale)
        results.append(_run_case(
            "selector_score", f"{fmt} r=64", device,
            lambda codes=codes, scales=scales, fmt=fmt, gs=global_scale: ops.selector_score(
                query, codes, visible, 0.125, key_scales=scales, format=fmt, global_scale=gs),
            lambda dequantised=dequantised: reference.selector_score(query.cpu(), dequantised, visible.cpu(), 0.125),
            atol=1e-4))

    # select_blocks and decode_select.
    scores = randn(2, 3, 4, 9, scale=2.0)
    num_visible = torch.tensor([[9, 4, 1, 6], [2, 9, 7, 3]], dtype=torch.int32, device=device)
    for top_p, k_min, k_max, sink, local in ((0.9, 1, 6, 1, 1), (0.5, 3, 4, 2, 1), (1.0, 0, 9, 0, 2)):
        results.append(_run_case(
            "select_blocks", f"p={top_p} k=[{k_min},{k_max}] sink={sink} local={local}", device,
            lambda a=(top_p, k_min, k_max, sink, local): ops.select_blocks(scores, num_visible, *a),
            lambda a=(top_p, k_min, k_max, sink, local): reference.select_blocks(scores.cpu(), num_visible.cpu(), *a)))
    decode_query = randn(2, 3, 64)
    decode_keys = randn(2, 3, 6, 64)
    seq_lens = torch.tensor([390, 130], dtype=torch.int32, device=device)
    results.append(_run_case(
        "decode_select", "dense r=64 block=64", device,
        lambda: ops.decode_select(decode_query, decode_keys, seq_lens, 0.8, 2, 5, 1, 1, 64, 0.125),
        lambda: reference.decode_select(decode_query.cpu(), decode_keys.cpu(), seq_lens.cpu(), 64, 0.125, 0.8, 2, 5,
                                        1, 1)))
    codes, scales = reference.pack_kcache(decode_keys.cpu(), "int4")
    dequantised = reference.unpack_kcache(codes, scales, "int4")
    results.append(_run_case(
        "decode_select", "int4 r=64 block=64", device,
        lambda: ops.decode_select(decode_query, codes.to(device), seq_lens, 0.8, 2, 5, 1, 1, 64, 0.125,
                                  key_scales=scales.to(device), format="int4"),
        lambda: reference.decode_select(decode_query.cpu(), dequantised, seq_lens.cpu(), 64, 0.125, 0.8, 2, 5, 1, 1)))

    # sparse_decode, sparse_prefill, block_mass over dtypes, GQA 3.
    for dtype in attention_dtypes:
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        name = str(dtype).replace("torch.", "")
        q = randn(2, 6, 64).to(dtype)
        cache_k = randn(2, 200, 2, 64).to(dtype)
        cache_v = randn(2, 200, 2, 64).to(dtype)
        lens = torch.tensor([200, 77], dtype=torch.int32, device=device)
        indices = torch.tensor([[[0, 2, 3], [1, 3, -1]], [[0, 1, -1], [1, -1, -1]]], dtype=torch.int32, device=device)
        counts = torch.tensor([[3, 2], [2, 1]], dtype=torch.int32, device=device)
        results.append(_run_case(
            "sparse_decode", f"{name} d=64 G=3", device,
            lambda q=q, k=cache_k, v=cache_v: ops.sparse_decode(q, k, v, lens, indices, counts, 64, 0.125),
            lambda q=q, k=cache_k, v=cache_v: reference.sparse_decode(q.cpu(), k.cpu(), v.cpu(), None, lens.cpu(),
                                                                      indices.cpu(), counts.cpu(), 64, 0.125),
            atol=tolerance, rtol=tolerance))
        lengths = [150, 37]
        cu = torch.tensor([0, 150, 187], dtype=torch.int32, device=device)
        pq = randn(187, 6, 64).to(dtype)
        pk = randn(187, 2, 64).to(dtype)
        pv = randn(187, 2, 64).to(dtype)
        block_scores = torch.randn(2, 2, 3, 3, generator=generator)
        block_visible = (torch.arange(3, dtype=torch.int32) + 1)[None].expand(2, -1).contiguous()
        p_indices, p_counts = reference.select_blocks(block_scores, block_visible, 0.5, 1, 2, 1, 1)
        p_indices, p_counts = p_indices.to(device), p_counts.to(device)
        results.append(_run_case(
            "sparse_prefill", f"{name} d=64 G=3 lens={lengths}", device,
            lambda q=pq, k=pk, v=pv: ops.sparse_prefill(q, k, v, cu, 150, p_indices, p_counts, 64, 0.125),
            lambda q=pq, k=pk, v=pv: reference.sparse_prefill(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), p_indices.cpu(),
                                                              p_counts.cpu(), 64, 0.125),
            atol=tolerance, rtol=tolerance))
        results.append(_run_case(
            "block_mass", f"{name} d=64 G=3 bq=64 bk=64", device,
            lambda q=pq, k=pk: ops.block_mass(q, k, cu, 150, 64, 64, 0.125),
            lambda q=pq, k=pk: reference.block_mass(q.cpu(), k.cpu(), cu.cpu(), 64, 64, 0.125, 150),
            atol=max(tolerance, 1e-4), rtol=tolerance))

    # K-cache packing: exact.
    kcache_keys = randn(2, 3, 5, 64, scale=3.0)
    for fmt in reference.KCACHE_FORMATS:
        global_scale = float(kcache_keys.abs().max()) / (6 * 448) if fmt == "nvfp4" else 1.0
        expected_codes, expected_scales = reference.pack_kcache(kcache_keys.cpu(), fmt, global_scale)
        results.append(_run_case(
            "pack_kcache", fmt, device,
            lambda fmt=fmt, gs=global_scale: ops.pack_kcache(kcache_keys, fmt, gs),
            lambda c=expected_codes, s=expected_scales: (c, s), atol=0, rtol=0))
        results.append(_run_case(
            "unpack_kcache", fmt, device,
            lambda c=expected_codes, s=expected_scales, fmt=fmt, gs=global_scale: ops.unpack_kcache(
                c.to(device), s.to(device), fmt, gs),
            lambda c=expected_codes, s=expected_scales, fmt=fmt, gs=global_scale: reference.unpack_kcache(
                c, s, fmt, gs), atol=0, rtol=0))

        def append(fmt=fmt, gs=global_scale, c=expected_codes, s=expected_scales):
            codes_buffer, scales_buffer = c.clone().to(device), s.clone().to(device)
            ops.append_kcache(codes_buffer, scales_buffer, kcache_keys[:, :, 0] * 0.5,
                              torch.tensor([4, -1], dtype=torch.int32, device=device), fmt, gs)
            return codes_buffer, scales_buffer

        def append_expected(fmt=fmt, gs=global_scale, c=expected_codes, s=expected_scales):
            codes_buffer, scales_buffer = c.clone(), s.clone()
            new_codes, new_scales = reference.pack_kcache(kcache_keys[0, :, 0].cpu() * 0.5, fmt, gs)
            codes_buffer[0, :, 4], scales_buffer[0, :, 4] = new_codes, new_scales
            return codes_buffer, scales_buffer

        results.append(_run_case("append_kcache", f"{fmt} slot 4 / skip", device, append, append_expected, atol=0,
                                 rtol=0))
    return results


def format_table(results: list[CheckResult]) -> str:
    lines = ["| op | case | device | status | max abs error | note |", "| --- | --- | --- | --- | ---: | --- |"]
    for item in results:
        error = "-" if math.isnan(item.max_error) else f"{item.max_error:.2e}"
        lines.append(f"| {item.op} | {item.case} | {item.device} | {item.status} | {error} | {item.detail} |")
    counts = {status: sum(1 for item in results if item.status == status) for status in ("ok", "MISMATCH", "missing",
                                                                                       "error")}
    lines.append("")
    lines.append(", ".join(f"{count} {status}" for status, count in counts.items()))
    return "\n".join(lines)
