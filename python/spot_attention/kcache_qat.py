"""Quantisation-aware training of the selector keys: a differentiable stand-in for the 4-bit
selector K-cache.

``fake_quantize_kcache(keys, fmt)`` returns, in the forward pass, exactly the keys the K-cache
hands back (``integrations.hf.kcache_round_trip``: the same ``SelectorKeyStore``, hence the same
pack/unpack kernels, or ``reference.pack_kcache``/``unpack_kcache`` where they are not compiled,
and the store's own nvfp4 per-tensor scale, taken from the keys passed in one call as the cache
takes it from its first append). In the backward pass it is the identity (straight-through
estimator), so the selector trains against the scores the cache will give it.

Why the plain STE and not the clipped one: every format derives its scales from the amax of
each group (and nvfp4's per-tensor scale from the amax of the whole call, with 4x headroom), so
the input range is never clipped; the only saturation is a group's largest value meeting a block
scale that rounded down (E4M3 / fp16 rounding of ``amax / 6`` or ``amax / 7``). A clipped STE
would zero the gradient of exactly that value, the one a block's score depends on most, and
nothing else, so it removes signal without guarding against anything. The gradient through the
scales themselves (their dependence on amax) is dropped as well, as usual for STE.
"""

from __future__ import annotations

import torch

from . import reference

# "none" trains against float keys; the others are the K-cache formats the round trip supports.
QAT_FORMATS = ("none", *reference.KCACHE_FORMATS)


class _KCacheRoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys: torch.Tensor, fmt: str) -> torch.Tensor:
        from .integrations.hf import kcache_round_trip

        return kcache_round_trip(keys.detach(), fmt)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def fake_quantize_kcache(keys: torch.Tensor, fmt: str, center: bool = False) -> torch.Tensor:
    """keys [B, Hkv, N, r] (float; ``r`` a multiple of 32) -> the same keys after the ``fmt``
    K-cache round trip, with an identity gradient. ``fmt``: "none" (returned unchanged), "dense" (bf16), int4, mxfp4, nvfp4.

    ``center``: the cache stores each key minus the mean key of its KV head over ``keys`` (batch
    and blocks), the training stand-in for a selector's fitted ``key_center``; the mean is added
    back after the round trip. Adding it back moves every logit of a row by the same amount, so
    the scores differ from a centred cache's only by a per-row constant the softmax ignores."""
    if fmt == "none":
        return keys
    if fmt != "dense" and fmt not in reference.KCACHE_FORMATS:
        raise ValueError(f"argument 'fmt': expected one of {QAT_FORMATS} or 'dense', got {fmt!r}")
    if keys.numel() == 0:
        return keys
    if not center:
        return _KCacheRoundTrip.apply(keys, fmt)
    mean = keys.detach().mean(dim=(0, 2), keepdim=True)
    return _KCacheRoundTrip.apply(keys - mean, fmt) + mean
