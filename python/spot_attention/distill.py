"""KL distillation of the selectors from a frozen model's own attention.

For every training window (``train_ctx`` tokens of the training split, ``spot_attention.data``):

1. **Capture.** One no-grad forward of the frozen backbone (without its LM head) through a
   capturing attention function: for every selector layer it records the post-RoPE ``query``
   ``[1, Hq, L, d]``, ``key`` ``[1, Hkv, L, d]`` and ``scaling``, exactly what a transformers
   attention function receives, and then runs the usual SDPA attention.
2. **Teacher.** ``spot.block_mass`` with ``block_size_q = 1``: per-token, group-averaged
   attention mass per key block. Averaging its rows over each query block gives exactly the
   prefill (``block_size_q = 64``) target, so one pass serves both.
3. **Loss**, per layer and KV group, averaged over layers:
   * prefill rows: every query block ``i >= 1`` against key blocks ``0..i``;
   * decode rows: ``tokens_per_window`` random query positions ``t`` against the complete key
     blocks of a cache of length ``t + 1`` (the partial block is forced as local at inference
     and never scored), teacher renormalised over those blocks,
   each a divergence between the teacher ``A`` and the selector ``p = softmax(qsel . ksel)``:
   ``forward_kl`` = KL(A || p) (mass-covering: the selector must not miss blocks the layer
   attends to), ``reverse_kl`` = KL(p || A) (mode-seeking), ``mixed`` = their mean.

   With ``kcache_format`` (quantisation-aware training, ``kcache_qat``) the decode rows score
   the selector keys as that 4-bit K-cache returns them (forward exact, straight-through
   gradient), and with ``kcache_prefill`` the prefill rows too, as
   ``LearnedSelection(prefill_reads_kcache=True)`` scores them; the saved config then names the
   format, so calibration and evaluation use it.

Only the selectors train (AdamW, cosine schedule with warmup); captures are kept in a small
replay buffer and each is used for ``updates_per_window`` steps, since a capture costs far more
than a selector step. Checkpoints (``checkpoint.pt`` in ``out_dir``) hold the selectors, the
optimiser and the step; training resumes from them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from typing import Any

import torch
from torch import nn

from . import data as data_module
from . import models, reference
from .kcache_qat import QAT_FORMATS, fake_quantize_kcache
from .selector import SelectorConfig, SpotSelectors

CAPTURE_NAME = "spot_capture"
LOSSES = ("forward_kl", "reverse_kl", "mixed")
CHECKPOINT_NAME = "checkpoint.pt"
# Probabilities below this count as zero inside logarithms of the teacher.
TEACHER_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------
# Capture of the frozen layers' post-RoPE queries and keys
# --------------------------------------------------------------------------------------------


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = getattr(module, "spot_capture_store", None)
    if store is not None:
        store[module.spot_capture_layer] = (query.detach(), key.detach(),
                                            float(scaling if scaling is not None else query.shape[-1] ** -0.5))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    count = models.text_config(model.config).num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError("argument 'model': could not find its list of decoder layers")


def _set_attention(model: nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError):
        pass
    if model.config._attn_implementation != name:
        model.config._attn_implementation_internal = name


@contextlib.contextmanager
def capturing(model: nn.Module, layers: list[int]):
    """``with capturing(model, layers) as store:`` every forward fills ``store[layer] = (query
    [B, Hq, L, d], key [B, Hkv, L, d], scaling)`` for the given layers (post-RoPE, detached)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    decoder = _decoder_layers(model)
    store: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    hooked = []
    for layer in layers:
        attention = getattr(decoder[layer], "self_attn", None)
        if attention is None:
            raise ValueError(f"argument 'layers': layer {layer} has no self_attn module")
        attention.spot_capture_store = store
        attention.spot_capture_layer = layer
        hooked.append(attention)
    previous = model.config._attn_implementation
    _set_attention(model, CAPTURE_NAME)
    try:
        yield store
    finally:
        for attention in hooked:
            del attention.spot_capture_store, attention.spot_capture_layer
        _set_attention(model, previous or "sdpa")


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (its logits are not needed to capture attention)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def capture_window(model: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """input_ids [B, L] -> {layer: (query, key, scaling)} from one frozen forward."""
    device = next(model.parameters()).device
    with capturing(model, layers) as store:
        _backbone(model)(input_ids=input_ids.to(device), use_cache=False)
    missing = [layer for layer in layers if layer not in store]
    if missing:
        raise RuntimeError(f"layers {missing} did not call an attention function")
    return dict(store)


# --------------------------------------------------------------------------------------------
# Teacher targets
# --------------------------------------------------------------------------------------------


def teacher_token_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, block_size: int) -> torch.Tensor:
    """Per-token block mass float32 [B, Hkv, L, NK] (``spot.block_mass`` with block_size_q = 1;
    the reference where the compiled op is missing). query [B, Hq, L, d]; key [B, Hkv, L, d]."""
    batch, heads_q, length, dim = query.shape
    # The CUDA kernel reads 16-bit activations (fp32 accumulation); the CPU kernel takes fp32.
    dtype = torch.float32
    if query.is_cuda:
        dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    packed_q = query.transpose(1, 2).reshape(batch * length, heads_q, dim).to(dtype).contiguous()
    packed_k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim).to(dtype).contiguous()
    cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
    try:
        from . import ops

        return ops.block_mass(packed_q, packed_k, cu_seqlens, length, 1, block_size, scaling)
    except (RuntimeError, NotImplementedError, ImportError) as error:
        if "not implemented" not in str(error) and not isinstance(error, ImportError):
            raise
        return reference.block_mass(packed_q.cpu(), packed_k.cpu(), cu_seqlens.cpu(), 1, block_size, scaling,
                                    length).to(query.device)


def prefill_targets(token_mass: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, Hkv, L, NK] per-token mass -> [B, Hkv, NQ, NK] mean per query block (exactly
    ``block_mass`` with ``block_size_q = block_size``)."""
    batch, heads, length, nk = token_mass.shape
    nq = reference.num_blocks(length, block_size)
    pad = nq * block_size - length
    sums = torch.nn.functional.pad(token_mass, (0, 0, 0, pad)).view(batch, heads, nq, block_size, nk).sum(3)
    sizes = torch.full((nq,), float(block_size), device=token_mass.device)
    sizes[-1] = block_size - pad
    return sums / sizes[None, None, :, None]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def divergence(teacher: torch.Tensor, logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row divergence between teacher probabilities and selector logits over the finite
    entries of ``logits`` (teacher renormalised over them). Rows: leading dims. Returns [...]."""
    valid = torch.isfinite(logits)
    target = torch.where(valid, teacher, torch.zeros_like(teacher)).clamp(min=0)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    log_p = torch.log_softmax(logits, -1)
    log_p = torch.where(valid, log_p, torch.zeros_like(log_p))
    log_t = torch.log(target.clamp(min=TEACHER_FLOOR))
    forward = (target * (log_t - log_p)).sum(-1)
    if loss == "forward_kl":
        return forward
    p = torch.where(valid, log_p.exp(), torch.zeros_like(log_p))
    reverse = (p * (log_p - log_t)).sum(-1)
    if loss == "reverse_kl":
        return reverse
    if loss == "mixed":
        return 0.5 * (forward + reverse)
    raise ValueError(f"argument 'loss': expected one of {LOSSES}, got {loss!r}")


@dataclasses.dataclass
class LayerBatch:
    """One layer's selector inputs and teacher targets for one window. The selector's query
    features are linear in its ``query_inputs``, so those are pooled per query block (prefill
    rows) and subsampled (decode rows) once per capture, and each training step touches only
    those rows."""

    block_inputs: dict  # query_inputs pooled per query block (pool_blocks): [B, Hkv, G, NQ, ...]
    token_inputs: dict  # query_inputs at token_positions: [B, Hkv, G, S, ...]
    key_inputs: dict  # LayerSelector.key_inputs of the window's keys
    prefill_teacher: torch.Tensor  # [B, Hkv, NQ, NK]
    token_positions: torch.Tensor  # int64 [S] query positions of the decode rows
    token_teacher: torch.Tensor  # [B, Hkv, S, NK]


@torch.no_grad()
def make_layer_batch(selector, query, key, scaling, tokens_per_window, generator) -> LayerBatch:
    block_size = selector.block_size
    token_mass = teacher_token_mass(query, key, scaling, block_size)
    length = query.shape[2]
    # Decode rows need at least one complete block before them: positions t >= block_size - 1.
    candidates = torch.arange(block_size - 1, length)
    count = min(tokens_per_window, candidates.numel())
    positions = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]].sort().values
    inputs = selector.query_inputs(query)
    index = positions.to(query.device)
    return LayerBatch(
        block_inputs={name: selector.pool_blocks(value) for name, value in inputs.items()},
        token_inputs={name: value.index_select(-2, index) for name, value in inputs.items()},
        key_inputs=selector.key_inputs(key),
        prefill_teacher=prefill_targets(token_mass, block_size),
        token_positions=positions,
        token_teacher=token_mass.index_select(2, index),
    )


@dataclasses.dataclass(frozen=True)
class KCacheReading:
    """How the losses read the selector keys. ``format`` ("none": float keys) is the K-cache that
    decode rows read them through (fake quantised, ``kcache_qat``); ``prefill`` makes prefill rows
    read it too; ``center`` centres the keys on the window's mean before quantising them."""

    format: str = "none"
    prefill: bool = False
    center: bool = False


FLOAT_KEYS = KCacheReading()


def layer_losses(selector, batch: LayerBatch, loss: str,
                 kcache: KCacheReading = FLOAT_KEYS) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill loss, decode loss), means over rows and KV groups of one layer, with the keys read
    as ``kcache`` says."""
    block = selector.block_size
    key_features = selector.key_features_from_inputs(batch.key_inputs)  # [B, Hkv, NKc, r]
    complete = key_features.shape[2]
    # One round trip of the window's keys serves both row kinds: the nvfp4 per-tensor scale is
    # then the one a cache filled by this window's prefill would use.
    cached_keys = fake_quantize_kcache(key_features, kcache.format, center=kcache.center)
    prefill_keys = cached_keys if kcache.prefill else key_features
    bsz = key_features.shape[0]
    device = key_features.device

    pooled = selector.prefill_features_from_inputs(batch.block_inputs)  # [B, Hkv, NQ, r]
    nq = pooled.shape[2]
    rows = torch.arange(1, nq, device=device)  # block 0 sees one block only: nothing to learn
    visible = torch.clamp(rows + 1, max=complete)[None].expand(bsz, -1)
    logits = selector.logits(pooled[:, :, 1:], prefill_keys, visible)
    teacher = batch.prefill_teacher[:, :, 1:nq, :complete]
    keep = visible[0] >= 2
    prefill = divergence(teacher[:, :, keep], logits[:, :, keep], loss).mean()

    token_features = selector.query_features_from_inputs(batch.token_inputs)  # [B, Hkv, S, r]
    positions = batch.token_positions.to(device)
    scored = ((positions + 1) // block).clamp(max=complete)  # complete blocks of a cache of t + 1 tokens
    token_logits = selector.logits(token_features, cached_keys, scored[None].expand(bsz, -1))
    token_teacher = batch.token_teacher[..., :complete]
    keep = scored >= 2
    if keep.any():
        decode = divergence(token_teacher[:, :, keep], token_logits[:, :, keep], loss).mean()
    else:
        decode = prefill.new_zeros(())
    return prefill, decode


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistillSettings:
    train_ctx: int = 1024
    steps: int = 600
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 20
    seed: int = 0
    loss: str = "forward_kl"
    tokens_per_window: int = 256
    updates_per_window: int = 4
    replay: int = 8
    checkpoint_every: int = 40
    selector_dim: int = 64
    block_size: int = 64
    # Quantisation-aware training: the K-cache format decode rows (and, with kcache_prefill,
    # prefill rows) read the selector keys through; "none" trains on float keys. kcache_center:
    # the cache holds keys minus the window's mean key, as a centred selector's cache does.
    kcache_format: str = "none"
    kcache_prefill: bool = False
    kcache_center: bool = False

    @property
    def kcache(self) -> KCacheReading:
        return KCacheReading(self.kcache_format, self.kcache_prefill, self.kcache_center)


def _lr_factor(step: int, settings: DistillSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _window_batches(model, selectors: SpotSelectors, window: torch.Tensor, settings, generator) -> dict[int, LayerBatch]:
    captured = capture_window(model, window[None], selectors.layers)
    return {
        layer: make_layer_batch(selectors[layer], q, k, scaling, settings.tokens_per_window, generator)
        for layer, (q, k, scaling) in captured.items()
    }


def total_loss(selectors: SpotSelectors, batches: dict[int, LayerBatch], loss: str,
               kcache: KCacheReading = FLOAT_KEYS) -> tuple[torch.Tensor, dict]:
    per_layer = {}
    total = None
    for layer in selectors.layers:
        prefill, decode = layer_losses(selectors[layer], batches[layer], loss, kcache)
        value = 0.5 * (prefill + decode)
        per_layer[layer] = (float(prefill.detach()), float(decode.detach()))
        total = value if total is None else total + value
    return total / len(selectors.layers), per_layer


@torch.no_grad()
def evaluate(selectors: SpotSelectors, batches_list: list[dict[int, LayerBatch]], loss: str = "forward_kl",
             kcache: KCacheReading = FLOAT_KEYS) -> dict:
    """Mean prefill / decode divergence per layer over captured windows (e.g. held-out text),
    optionally with the keys read through a K-cache format (as ``layer_losses``)."""
    sums: dict[int, list[float]] = {layer: [0.0, 0.0] for layer in selectors.layers}
    for batches in batches_list:
        for layer in selectors.layers:
            prefill, decode = layer_losses(selectors[layer], batches[layer], loss, kcache)
            sums[layer][0] += float(prefill)
            sums[layer][1] += float(decode)
    count = max(len(batches_list), 1)
    per_layer = {layer: {"prefill": s[0] / count, "decode": s[1] / count} for layer, s in sums.items()}
    return {
        "loss": loss,
        "prefill": sum(v["prefill"] for v in per_layer.values()) / len(per_layer),
        "decode": sum(v["decode"] for v in per_layer.values()) / len(per_layer),
        "per_layer": per_layer,
    }


def distill(
    model_path: str | None,
    out_dir: str,
    train_ctx: int = 1024,
    steps: int = 600,
    lr: float = 3e-3,
    seed: int = 0,
    loss: str = "forward_kl",
    resume: bool = True,
    device: str = "cpu",
    model=None,
    tokenizer=None,
    layers: list[int] | None = None,
    settings: DistillSettings | None = None,
    compare_losses: tuple[str, ...] = (),
    progress: bool = True,
    time_limit_s: float | None = None,
    log=print,
    kcache_format: str | None = None,
    kcache_prefill: bool | None = None,
    kcache_center: bool | None = None,
) -> SpotSelectors:
    """Trains selectors for every full-attention layer (or ``layers``) of the model at
    ``model_path`` (``None``: the default model) and saves them to ``out_dir``.

    ``model``/``tokenizer`` may be passed already loaded. ``compare_losses`` trains further
    selectors with other losses on the very same captures and steps (a capture costs far more
    than a step, so a comparison is nearly free); they are saved to ``out_dir/variants/<loss>``.
    ``time_limit_s`` stops early (after a checkpoint) when the wall time is spent.
    ``kcache_format`` (``QAT_FORMATS``; None keeps ``settings``'): train through that K-cache's
    round trip (decode rows; prefill rows too with ``kcache_prefill``; keys centred on each
    window's mean with ``kcache_center``) and store the format in the selector config. Returns
    the main selectors (not calibrated: see ``policy.calibrate_top_p``)."""
    for name in (loss, *compare_losses):
        if name not in LOSSES:
            raise ValueError(f"argument 'loss': expected one of {LOSSES}, got {name!r}")
    settings = dataclasses.replace(settings or DistillSettings(), train_ctx=train_ctx, steps=steps, lr=lr, seed=seed,
                                   loss=loss)
    if kcache_format is not None:
        settings = dataclasses.replace(settings, kcache_format=kcache_format)
    if kcache_prefill is not None:
        settings = dataclasses.replace(settings, kcache_prefill=bool(kcache_prefill))
    if kcache_center is not None:
        settings = dataclasses.replace(settings, kcache_center=bool(kcache_center))
    if settings.kcache_format not in QAT_FORMATS:
        raise ValueError(f"argument 'kcache_format': expected one of {QAT_FORMATS}, got {settings.kcache_format!r}")
    started = time.time()
    torch.manual_seed(seed)
    random.seed(seed)
    if model is None:
        model, tokenizer = models.load_model(model_path, dtype=torch.float32, device=device)
    model.requires_grad_(False)
    model_id = models.model_id(model_path) if model_path is not None else models.DEFAULT_MODEL_ID
    # A selector trained through a format is calibrated and evaluated with it; "none" keeps the
    # config's default format.
    format_override = {} if settings.kcache_format == "none" else {"kcache_format": settings.kcache_format}
    config = SelectorConfig.for_model(model.config, model_id, layers=layers, selector_dim=settings.selector_dim,
                                      block_size=settings.block_size, **format_override)
    windows_needed = settings.steps // settings.updates_per_window + 1
    used: list = []
    windows = data_module.training_windows(tokenizer, settings.train_ctx, windows_needed, seed=seed, used=used)
    if not windows:
        raise RuntimeError("no training text long enough for train_ctx")
    losses = (loss, *[name for name in compare_losses if name != loss])
    variants = {}
    for name in losses:
        selectors = SpotSelectors(dataclasses.replace(config, training={})).to(device)
        optimizer = torch.optim.AdamW([p for p in selectors.parameters() if p.requires_grad], lr=settings.lr,
                                      weight_decay=settings.weight_decay)
        variants[name] = (selectors, optimizer)
    main_selectors = variants[loss][0]
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    step = 0
    history: list[dict] = []
    if resume and os.path.isfile(checkpoint_path):
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        saved = state.get("settings", {})
        for name in ("kcache_format", "kcache_prefill", "kcache_center"):
            # Checkpoints written before QAT existed trained on float keys.
            before = saved.get(name, getattr(DistillSettings(), name))
            if before != getattr(settings, name):
                raise ValueError(f"{checkpoint_path} was trained with {name}={before!r}, not "
                                 f"{getattr(settings, name)!r}: pass the same setting or resume=False")
        for name, (selectors, optimizer) in variants.items():
            selectors.load_state_dict(state["variants"][name]["selectors"])
            optimizer.load_state_dict(state["variants"][name]["optimizer"])
        step = int(state["step"])
        history = state.get("history", [])
        log(f"resumed from {checkpoint_path} at step {step}")
    generator = torch.Generator().manual_seed(seed * 1000003 + step)
    replay: list[dict[int, LayerBatch]] = []
    try:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc=f"distill {loss}", disable=not progress, smoothing=0.1)
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        bar = None
    if step == 0:
        captured = capture_window(model, windows[0][None], main_selectors.layers)
        for selectors, _ in variants.values():
            for layer, (q, k, _) in captured.items():
                selectors[layer].init_statistics(q, k)
        del captured
    window_index = step // settings.updates_per_window
    while step < settings.steps:
        if step % settings.updates_per_window == 0 or not replay:
            window_index = step // settings.updates_per_window
            # Inputs are parameter-free, so one set of batches serves every variant.
            replay.append(_window_batches(model, main_selectors, windows[window_index % len(windows)], settings,
                                          generator))
            replay = replay[-settings.replay :]
        # The newest capture first, then replayed ones.
        pick = len(replay) - 1 if step % settings.updates_per_window == 0 else int(
            torch.randint(0, len(replay), (1,), generator=generator))
        record = {"step": step + 1, "window": window_index}
        for name, (selectors, optimizer) in variants.items():
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, settings)
            optimizer.zero_grad(set_to_none=True)
            value, _ = total_loss(selectors, replay[pick], name, settings.kcache)
            value.backward()
            optimizer.step()
            record[name] = float(value.detach())
        step += 1
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record[loss]:.4f}")
            bar.update(1)
        out_of_time = time_limit_s is not None and time.time() - started > time_limit_s
        if step % settings.checkpoint_every == 0 or step == settings.steps or out_of_time:
            state = {
                "variants": {name: {"selectors": sel.state_dict(), "optimizer": opt.state_dict()}
                             for name, (sel, opt) in variants.items()},
                "step": step, "history": history, "settings": dataclasses.asdict(settings),
            }
            torch.save(state, checkpoint_path + ".tmp")
            os.replace(checkpoint_path + ".tmp", checkpoint_path)
        if out_of_time:
            log(f"time limit reached at step {step}")
            break
    if bar is not None:
        bar.close()
    for name, (selectors, _) in variants.items():
        selectors.config.training = {
            "loss": name,
            "settings": dict(dataclasses.asdict(settings), loss=name),
            "steps_done": step,
            "windows_seen": min(window_index + 1, len(windows)),
            "wall_time_s": round(time.time() - started, 1),
            "final_loss": history[-1][name] if history else None,
            "train_files": sorted({record["path"] for record in used}),
        }
        selectors.save(out_dir if name == loss else os.path.join(out_dir, "variants", name))
    return main_selectors


@torch.no_grad()
def heldout_divergences(
    selectors_by_name: dict[str, SpotSelectors],
    model,
    tokenizer,
    context: int = 1024,
    windows: int = 4,
    split: str = "heldout",
    seed: int = 0,
    tokens_per_window: int = 256,
) -> dict[str, Any]:
    """Forward and reverse KL (prefill and decode rows) of each named selector set on windows of
    a split it was not trained on; all sets see the same captures and rows."""
    used: list = []
    texts = data_module.training_windows(tokenizer, context, windows, seed=seed, split=split, used=used)
    reference_selectors = next(iter(selectors_by_name.values()))
    generator = torch.Generator().manual_seed(seed)
    captures = [_window_batches(model, reference_selectors, window, DistillSettings(
        tokens_per_window=tokens_per_window, block_size=reference_selectors.config.block_size), generator)
        for window in texts]
    result: dict[str, Any] = {"split": split, "context": context, "windows": len(texts),
                              "files": sorted({record["path"] for record in used})}
    for name, selectors in selectors_by_name.items():
        result[name] = {measure: evaluate(selectors, captures, measure) for measure in ("forward_kl", "reverse_kl")}
    return result


# --------------------------------------------------------------------------------------------
# Command line: ``spot-attn distill`` / ``python -m spot_attention.distill``
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or local HF directory (default: SmolLM2-135M)")
    parser.add_argument("--out", required=True, help="directory for selector.json / selector.safetensors")
    parser.add_argument("--train-ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=LOSSES, default="forward_kl")
    parser.add_argument("--selector-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64,
                        help="key (and prefill query) block size the selector chooses among")
    parser.add_argument("--tokens-per-window", type=int, default=256)
    parser.add_argument("--compare-loss", action="append", default=[], choices=LOSSES,
                        help="also train a variant with this loss on the same captures (repeatable)")
    parser.add_argument("--updates-per-window", type=int, default=4)
    parser.add_argument("--replay", type=int, default=8)
    parser.add_argument("--kcache-format", choices=QAT_FORMATS, default="none",
                        help="train through this selector K-cache format's round trip (quantisation-aware; decode "
                             "rows) and store it in selector.json; none: float keys")
    parser.add_argument("--kcache-prefill", action="store_true",
                        help="with --kcache-format, prefill rows read the round-tripped keys too (as "
                             "LearnedSelection(prefill_reads_kcache=True) and bench/kcache_accuracy.py score them)")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=None, help="stop (checkpointed) after this many seconds")
    parser.add_argument("--calibrate", action="store_true", help="calibrate top_p per layer after training")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--calib-ctx", type=int, nargs="+", default=[2048, 4096],
                        help="calibration window lengths (rows of all of them are pooled)")
    parser.add_argument("--calib-windows", type=int, default=2, help="windows per calibration length")
    parser.add_argument("--local-blocks", type=int, default=None, help="set the policy's local blocks before calibrating")
    parser.add_argument("--sink-blocks", type=int, default=None)
    parser.add_argument("--k-min", type=int, default=None)
    parser.add_argument("--center-keys", action="store_true",
                        help="before calibrating, fit each layer's key_center (the K-cache stores keys minus it); "
                             "with --kcache-format, training quantises keys minus each window's mean key too")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="skip training: calibrate the selector already in --out")
    parser.add_argument("--heldout-report", action="store_true",
                        help="write heldout_kl.json: forward/reverse KL of the selector and its variants")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(args.model, dtype=torch.float32, device=args.device)
    if args.calibrate_only:
        selectors = SpotSelectors.load(args.out, args.device)
    else:
        settings = DistillSettings(selector_dim=args.selector_dim, block_size=args.block_size,
                                   tokens_per_window=args.tokens_per_window,
                                   updates_per_window=args.updates_per_window, replay=args.replay)
        selectors = distill(args.model, args.out, train_ctx=args.train_ctx, steps=args.steps, lr=args.lr,
                            seed=args.seed, loss=args.loss, resume=not args.no_resume, device=args.device,
                            model=model, tokenizer=tokenizer, settings=settings,
                            compare_losses=tuple(args.compare_loss), time_limit_s=args.time_limit,
                            kcache_format=args.kcache_format, kcache_prefill=args.kcache_prefill,
                            kcache_center=args.center_keys and args.kcache_format != "none")
    for name in ("local_blocks", "sink_blocks", "k_min"):
        if getattr(args, name, None) is not None:
            setattr(selectors.config, name, int(getattr(args, name)))
    if args.calibrate:
        from .policy import calibrate_selectors

        started = time.time()
        result = calibrate_selectors(selectors, model, tokenizer, target_recall=args.target_recall,
                                     context=tuple(args.calib_ctx), windows=args.calib_windows,
                                     center_keys=args.center_keys)
        selectors.config.training["calibration"]["wall_time_s"] = round(time.time() - started, 1)
        selectors.save(args.out)
        summary = result["summary"]
        print(json.dumps({"top_p": {k: round(v, 4) for k, v in result["top_p"].items()},
                          "mean_fraction_read": summary["mean_fraction_read"]}, indent=1))
    if args.heldout_report:
        named = {selectors.config.training.get("loss", "main"): selectors}
        variants = os.path.join(args.out, "variants")
        if os.path.isdir(variants):
            for name in sorted(os.listdir(variants)):
                named[name] = SpotSelectors.load(os.path.join(variants, name), args.device)
        report = heldout_divergences(named, model, tokenizer, context=args.train_ctx)
        with open(os.path.join(args.out, "heldout_kl.json"), "w") as handle:
            json.dump(report, handle, indent=1)
        for name in named:
            print(name, {measure: {"prefill": round(v["prefill"], 4), "decode": round(v["decode"], 4)}
                         for measure, v in report[name].items()})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spot-attn distill", description="Distil SpotAttention selectors")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
