"""The trainable block selector of each full-attention layer, its config and file format.

A ``LayerSelector`` reads what a transformers attention function receives for its layer, the
frozen layer's post-RoPE queries ``[B, Hq, L, d]`` and keys ``[B, Hkv, L, d]``, and produces per KV
group (its ``G = Hq / Hkv`` query heads share one selector query):

* ``query_features``: one selector query ``[B, Hkv, L, r]`` per token,
* ``pool_query_blocks``: their mean per query block (prefill) ``[B, Hkv, NQ, r]``,
* ``key_features``: one selector key per COMPLETE key block ``[B, Hkv, L // block_size, r]``;
  a block's key depends on that block's tokens only, so a decode cache appends one key when a
  block fills (``key_features_need_position = False``),

and the selector's block distribution is ``softmax_b(softmax_scale * qsel . ksel_b)`` over the
visible blocks: a plain dot product, which is what ``spot.selector_score``, ``spot.decode_select``
and the 4-bit selector K-cache compute.

Feature layout (``r = 2 * rotary_pairs + variance_bands + bias_dims``, default 48 + 8 + 8 = 64):

* **rotary dims** ``[0, 2P)``: the layer's own RoPE frequency pairs (HF ``rotate_half`` layout:
  pair ``f`` is dims ``(f, f + d/2)``, angular frequency ``theta^(-2f/d)``), the ``P`` lowest
  frequencies. The query side multiplies each pair by a learned complex weight per query head
  and sums the group's heads; the key side is the block's pooled pair (see below). A complex (rotation-
  commuting) weight keeps ``qsel . ksel`` a function of the query and key CONTENT and of the
  RELATIVE position only, exactly as in the frozen attention, which is how the selector extends
  to 8x its training length: no absolute-position feature exists for it to overfit. Pairs whose
  wavelength is shorter than a block average out in the block mean and are left out.
* **variance dims** ``[2P, 2P + V)``: a second-order term of the block's log-sum-exp,
  ``logsumexp_t(s q.k_t) ~ s q.mean(k) + s^2/2 Var_t(q.k_t)``: per frequency band, the query side
  is a learned combination of the heads' squared pair norms, the key side the block's variance
  of the keys in that band. Both are rotation invariant.
* **bias dims** ``[2P + V, r)``: a learned per-block prior (attention sinks, delimiters): the key
  side is the max over the block's tokens of a linear function of the tokens' squared pair norms,
  the query side a linear function of the query's squared pair norms plus a constant. Rotation
  invariant as well.

Block keys pool their tokens with learned weights: a softmax inside the block over a linear
function of each token's squared pair norms (rotation invariant; uniform, i.e. the block mean,
at init). A block whose attention is drawn by one token (a sink, a delimiter) gets that token's
key rather than a blurred mean, and a shift of every position still only rotates each pair.

Fixed per-dim gains (``key_gain`` etc., set by ``init_statistics`` from captured keys) bring every
key dim to unit scale, so the 4-bit K-cache formats (one scale per 16 or 32 dims) lose little; the
query side divides by the same gains, leaving scores unchanged.

Block keys are returned minus a fixed per-(KV head) ``key_center`` (zero unless fitted:
``fit_key_center``, or ``spot-attn distill --calibrate --center-keys``). A center shifts all
logits of a row by the same ``-qsel . center``, so the block distribution is exactly unchanged,
but a 4-bit K-cache then spends its levels on how blocks differ rather than on what they share:
the KL between the selector's distributions from float and from 4-bit keys drops 2-3x on
held-out text (docs/kcache.md, "Centred keys", which also says why the shipped selector is not
centred). Files without a center load with zeros, which is the selector they stored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
from torch import nn

KCACHE_FORMATS = ("int4", "mxfp4", "nvfp4", "dense")
CONFIG_NAME = "selector.json"
WEIGHTS_NAME = "selector.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass
class SelectorConfig:
    model_id: str
    layers: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    selector_dim: int = 64
    block_size: int = 64
    # Position treatment: the frozen model's RoPE, kept relative by complex pair weights.
    rope_theta: float = 10000.0
    rotary_layout: str = "half"  # HF rotate_half: pair f = dims (f, f + d/2)
    rotary_pairs: int = 24
    variance_bands: int = 8
    bias_dims: int = 8
    # Policy: calibrated top_p per layer (None until calibrated) and the shared knobs.
    top_p: dict[int, float] | None = None
    k_min: int = 2
    k_max: int = 1 << 20
    sink_blocks: int = 1
    local_blocks: int = 2  # the diagonal block and the one before it: measured better at 8K
    kcache_format: str = "int4"
    # Provenance: how the selector was trained and calibrated (free-form, written to the json).
    training: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers]
        if self.top_p is not None:
            self.top_p = {int(layer): float(p) for layer, p in self.top_p.items()}
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.kcache_format not in KCACHE_FORMATS:
            raise ValueError(f"kcache_format: expected one of {KCACHE_FORMATS}, got {self.kcache_format!r}")
        if self.rotary_layout != "half":
            raise ValueError(f"rotary_layout: only 'half' (rotate_half) is supported, got {self.rotary_layout!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        self.rotary_pairs = min(self.rotary_pairs, self.head_dim // 2)
        if 2 * self.rotary_pairs + self.variance_bands + self.bias_dims != self.selector_dim:
            raise ValueError(
                f"selector_dim {self.selector_dim} != 2 * rotary_pairs {self.rotary_pairs} + variance_bands "
                f"{self.variance_bands} + bias_dims {self.bias_dims}"
            )

    @classmethod
    def for_model(cls, model_config: Any, model_id: str, layers: list[int] | None = None, selector_dim: int = 64,
                  **overrides) -> "SelectorConfig":
        """Config for a transformers model config; layers default to its full-attention layers.
        The feature split follows ``selector_dim``: 1/8 variance dims, 1/8 bias dims, the rest
        rotary pairs (capped at ``head_dim / 2``; freed dims go to the bias)."""
        from .models import attention_shape, full_attention_layers

        shape = attention_shape(model_config)
        variance = overrides.pop("variance_bands", max(selector_dim // 8, 1))
        pairs = overrides.pop("rotary_pairs", min((selector_dim - 2 * variance) // 2, shape["head_dim"] // 2))
        bias = overrides.pop("bias_dims", selector_dim - 2 * pairs - variance)
        return cls(
            model_id=model_id,
            layers=list(layers) if layers is not None else full_attention_layers(model_config),
            num_heads=shape["num_heads"],
            num_kv_heads=shape["num_kv_heads"],
            head_dim=shape["head_dim"],
            selector_dim=selector_dim,
            rope_theta=shape["rope_theta"],
            rotary_pairs=pairs,
            variance_bands=variance,
            bias_dims=bias,
            **overrides,
        )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.top_p is not None:
            data["top_p"] = {str(layer): p for layer, p in sorted(self.top_p.items())}
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SelectorConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"selector.json format_version {version} is not supported (expected {FORMAT_VERSION})")
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _frequency_bands(num_pairs: int, bands: int) -> torch.Tensor:
    """Band index of each rotary pair: ``bands`` contiguous frequency ranges of near-equal size."""
    return torch.div(torch.arange(num_pairs) * bands, num_pairs, rounding_mode="floor")


class LayerSelector(nn.Module):
    """The selector of one full-attention layer (all its KV groups); see the module docstring."""

    key_features_need_position = False

    def __init__(self, config: SelectorConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.block_size = config.block_size
        self.num_kv_heads = config.num_kv_heads
        self.group_size = config.group_size
        self.head_dim = config.head_dim
        self.selector_dim = config.selector_dim
        self.softmax_scale = 1.0 / math.sqrt(config.selector_dim)
        half = config.head_dim // 2
        pairs, bands, bias = config.rotary_pairs, config.variance_bands, config.bias_dims
        hkv, group = config.num_kv_heads, config.group_size
        # The P lowest frequencies are the last P pairs of the rotate_half layout.
        self.register_buffer("rotary_index", torch.arange(half - pairs, half), persistent=False)
        self.register_buffer("band_of_pair", _frequency_bands(half, bands), persistent=False)

        # Init so that the untrained selector scores a block like the group's mean head logit
        # against the block's mean key: (1/sqrt(d)) mean_h q_h . mean(k) = softmax_scale * qsel . ksel.
        gain = math.sqrt(config.selector_dim / config.head_dim) / group
        self.query_weight = nn.Parameter(torch.zeros(hkv, group, pairs, 2))  # complex (re, im) per head, pair
        with torch.no_grad():
            self.query_weight[..., 0] = gain
        # Second-order term: s^2/4 * |q_f|^2 * E|k_f - mean k_f|^2 per pair (random phases), as a
        # selector-scale feature; mean over heads on the query side.
        score_scale = 1.0 / math.sqrt(config.head_dim)
        variance_init = score_scale**2 / (4.0 * self.softmax_scale * group)
        self.variance_weight = nn.Parameter(torch.full((hkv, group, bands), variance_init))
        # Bias dims: the key side starts as random projections so the zero query side gets a
        # gradient; the untrained selector's scores are then unaffected.
        generator = torch.Generator().manual_seed(1000 + layer)
        self.bias_key_weight = nn.Parameter(torch.randn(hkv, bias, half, generator=generator) / math.sqrt(half))
        self.bias_key_offset = nn.Parameter(torch.zeros(hkv, bias))
        self.bias_query_weight = nn.Parameter(torch.zeros(hkv, bias, group, half))
        self.bias_query_offset = nn.Parameter(torch.zeros(hkv, bias))
        # Key pooling: zero weights give the plain block mean.
        self.pool_weight = nn.Parameter(torch.zeros(hkv, half))
        # Inverse temperature of pooled (prefill) queries: a query block's teacher is the mean of
        # its tokens' distributions, flatter or sharper than one token's, so prefill rows get
        # their own scale instead of pulling the shared weights away from decode rows.
        self.prefill_scale = nn.Parameter(torch.ones(hkv))

        # Fixed gains that bring each key dim to unit scale (4-bit friendly); see init_statistics.
        self.register_buffer("key_gain", torch.ones(hkv, pairs))
        self.register_buffer("variance_gain", torch.ones(hkv, bands))
        self.register_buffer("bias_gain", torch.ones(hkv, bias))
        self.register_buffer("key_energy_scale", torch.ones(hkv, half))
        self.register_buffer("query_energy_scale", torch.ones(hkv, group, half))
        self.register_buffer("key_center", torch.zeros(hkv, config.selector_dim))

    # ---------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, imag) parts of every rotary pair: x [..., d] -> two [..., d/2]."""
        half = self.head_dim // 2
        return x[..., :half], x[..., half:]

    def _grouped_query(self, query: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = query.shape
        if heads != self.num_kv_heads * self.group_size or dim != self.head_dim:
            raise ValueError(
                f"argument 'query': expected [B, {self.num_kv_heads * self.group_size}, L, {self.head_dim}], "
                f"got {list(query.shape)}"
            )
        return query.float().view(batch, self.num_kv_heads, self.group_size, length, dim)

    def _band_sum(self, per_pair: torch.Tensor) -> torch.Tensor:
        """[..., d/2] -> [..., bands]: sum of the pairs in each frequency band."""
        bands = self.variance_weight.shape[-1]
        out = per_pair.new_zeros(*per_pair.shape[:-1], bands)
        return out.index_add_(-1, self.band_of_pair, per_pair)

    # ---------------------------------------------------------------------------------------
    # Features
    # ---------------------------------------------------------------------------------------

    def query_inputs(self, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter-free per-token quantities the query features are LINEAR in (so pooling
        them per query block and then applying ``query_features_from_inputs`` equals pooling the
        features): rotary pairs ``[B, Hkv, G, L, P]`` (real, imag) and squared pair norms
        ``[B, Hkv, G, L, d/2]``."""
        q = self._grouped_query(query)  # [B, Hkv, G, L, d]
        real, imag = self._pairs(q)  # [B, Hkv, G, L, d/2]
        index = self.rotary_index
        return {"real": real[..., index], "imag": imag[..., index], "energy": real * real + imag * imag}

    def query_features_from_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query_inputs`` (possibly pooled or subsampled along L) -> selector queries [B, Hkv, L, r]."""
        real_p, imag_p, energy = inputs["real"], inputs["imag"], inputs["energy"]
        w_re = self.query_weight[..., 0][None, :, :, None, :]  # [1, Hkv, G, 1, P]
        w_im = self.query_weight[..., 1][None, :, :, None, :]
        key_gain = self.key_gain[None, :, None, :]  # [1, Hkv, 1, P]
        rot_re = (w_re * real_p - w_im * imag_p).sum(2) / key_gain  # [B, Hkv, L, P]
        rot_im = (w_re * imag_p + w_im * real_p).sum(2) / key_gain
        rotary = torch.stack((rot_re, rot_im), -1).flatten(-2)  # [B, Hkv, L, 2P] as (re, im) pairs
        band_energy = self._band_sum(energy)  # [B, Hkv, G, L, V]
        variance = torch.einsum("bhglv,hgv->bhlv", band_energy, self.variance_weight)
        variance = variance / self.variance_gain[None, :, None, :]
        scaled_energy = energy / self.query_energy_scale[None, :, :, None, :]
        bias = torch.einsum("bhglf,hjgf->bhlj", scaled_energy, self.bias_query_weight)
        bias = (bias + self.bias_query_offset[None, :, None, :]) / self.bias_gain[None, :, None, :]
        return torch.cat((rotary, variance, bias), -1)

    def query_features(self, query: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, L, d] (post-RoPE) -> per-token selector queries float32 [B, Hkv, L, r]."""
        return self.query_features_from_inputs(self.query_inputs(query))

    def pool_query_blocks(self, query_features: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, L, r] -> [B, Hkv, ceil(L / block_size), r]: mean per query block (the last one
        may be partial) times the learned prefill scale."""
        return self.pool_blocks(query_features) * self.prefill_scale[:, None, None]

    def prefill_features_from_inputs(self, pooled_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query_inputs`` pooled per query block (``pool_blocks``) -> prefill selector queries;
        equals ``pool_query_blocks(query_features(query))``."""
        return self.query_features_from_inputs(pooled_inputs) * self.prefill_scale[:, None, None]

    def pool_blocks(self, values: torch.Tensor) -> torch.Tensor:
        """[..., L, x] -> [..., ceil(L / block_size), x]: plain mean per block of tokens."""
        *lead, length, width = values.shape
        nq = (length + self.block_size - 1) // self.block_size
        pad = nq * self.block_size - length
        padded = torch.nn.functional.pad(values, (0, 0, 0, pad))
        sums = padded.view(*lead, nq, self.block_size, width).sum(-2)
        sizes = torch.full((nq, 1), float(self.block_size), device=values.device)
        if nq:
            sizes[-1] = self.block_size - pad
        return sums / sizes

    def key_inputs(self, key: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter-free per-block quantities of the COMPLETE blocks: the tokens' rotary pairs
        ``[B, Hkv, N, block, P]`` (real, imag), the in-block spread of every pair ``[B, Hkv, N,
        d/2]`` and the tokens' squared pair norms ``[B, Hkv, N, block, d/2]``."""
        batch, heads, length, dim = key.shape
        if heads != self.num_kv_heads or dim != self.head_dim:
            raise ValueError(f"argument 'key': expected [B, {self.num_kv_heads}, L, {self.head_dim}], "
                             f"got {list(key.shape)}")
        complete = length // self.block_size
        k = key[:, :, : complete * self.block_size].float().view(batch, heads, complete, self.block_size, dim)
        real, imag = self._pairs(k)  # [B, Hkv, N, bs, d/2]
        mean_re, mean_im = real.mean(3, keepdim=True), imag.mean(3, keepdim=True)
        spread = ((real - mean_re) ** 2 + (imag - mean_im) ** 2).mean(3)
        index = self.rotary_index
        return {"real": real[..., index], "imag": imag[..., index], "spread": spread,
                "energy": real * real + imag * imag}

    def key_features_from_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        energy = inputs["energy"] / self.key_energy_scale[None, :, None, None, :]  # [B, Hkv, N, bs, d/2]
        # Attention pooling inside the block: token weights from rotation-invariant token
        # features (uniform at init), so a block's key can follow the tokens that draw attention
        # (sinks, delimiters) while every score stays a relative-position function.
        pool_logits = torch.einsum("bhntf,hf->bhnt", energy, self.pool_weight)
        weights = torch.softmax(pool_logits, -1)[..., None]  # [B, Hkv, N, bs, 1]
        key_gain = self.key_gain[None, :, None, :]
        pooled_re = (weights * inputs["real"]).sum(3) * key_gain  # [B, Hkv, N, P]
        pooled_im = (weights * inputs["imag"]).sum(3) * key_gain
        rotary = torch.stack((pooled_re, pooled_im), -1).flatten(-2)
        variance = self._band_sum(inputs["spread"]) * self.variance_gain[None, :, None, :]
        token_bias = torch.einsum("bhntf,hjf->bhntj", energy, self.bias_key_weight)
        bias = (token_bias.amax(3) + self.bias_key_offset[None, :, None, :]) * self.bias_gain[None, :, None, :]
        return torch.cat((rotary, variance, bias), -1) - self.key_center[None, :, None, :]

    def key_features(self, key: torch.Tensor) -> torch.Tensor:
        """key [B, Hkv, L, d] (post-RoPE) -> selector keys float32 [B, Hkv, L // block_size, r]
        of the complete blocks (a trailing partial block has none yet)."""
        return self.key_features_from_inputs(self.key_inputs(key))

    def logits(self, query_sel: torch.Tensor, key_sel: torch.Tensor, num_visible: torch.Tensor) -> torch.Tensor:
        """``spot.selector_score`` semantics, differentiable: query_sel [B, Hkv, NQ, r], key_sel
        [B, Hkv, NK, r], num_visible int [B, NQ] -> float32 [B, Hkv, NQ, NK], ``-inf`` past each
        row's visible blocks."""
        logits = torch.einsum("bhqr,bhkr->bhqk", query_sel.float(), key_sel.float()) * self.softmax_scale
        nk = key_sel.shape[2]
        visible = torch.arange(nk, device=logits.device)[None, None, :] < num_visible[:, :, None].long()
        return logits.masked_fill(~visible[:, None], float("-inf"))

    # ---------------------------------------------------------------------------------------
    # Data-dependent initialisation
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_statistics(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Set the fixed gains from captured post-RoPE queries/keys of real text (scores at init
        are unchanged by them, except through the bias dims, which start at zero anyway)."""
        q = self._grouped_query(query)
        q_re, q_im = self._pairs(q)
        self.query_energy_scale.copy_((q_re**2 + q_im**2).mean(dim=(0, 3)).clamp(min=1e-6))
        k_re, k_im = self._pairs(key.float())
        self.key_energy_scale.copy_((k_re**2 + k_im**2).mean(dim=(0, 2)).clamp(min=1e-6))
        self.key_gain.fill_(1.0)
        self.variance_gain.fill_(1.0)
        self.bias_gain.fill_(1.0)
        features = self.key_features(key)  # [B, Hkv, N, r] with unit gains
        if features.shape[2] == 0:
            return
        pairs = self.rotary_index.numel()
        rms = features.pow(2).mean(dim=(0, 2)).sqrt().clamp(min=1e-6)  # [Hkv, r]
        rotary_rms = rms[:, : 2 * pairs].view(-1, pairs, 2).pow(2).mean(-1).sqrt()  # [Hkv, P]
        self.key_gain.copy_(1.0 / rotary_rms)
        bands = self.variance_weight.shape[-1]
        self.variance_gain.copy_(1.0 / rms[:, 2 * pairs : 2 * pairs + bands])
        self.bias_gain.copy_(1.0 / rms[:, 2 * pairs + bands :])

    @torch.no_grad()
    def fit_key_center(self, keys: list[torch.Tensor]) -> None:
        """Sets ``key_center`` to the mean selector key of the complete blocks of ``keys`` (each
        [B, Hkv, L, d], post-RoPE). Block distributions are unchanged by any center."""
        total = torch.zeros_like(self.key_center, dtype=torch.float64)
        count = 0
        for key in keys:
            features = self.key_features(key) + self.key_center[None, :, None, :]  # uncentred
            total += features.double().sum(dim=(0, 2))
            count += features.shape[0] * features.shape[2]
        if count:
            self.key_center.copy_((total / count).to(self.key_center.dtype))


class SpotSelectors(nn.Module):
    """All layers' selectors plus their config: ``selectors[layer]`` is a ``LayerSelector``,
    ``selectors.layers`` the layer indices, ``selectors.config`` the ``SelectorConfig``."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        self.selectors = nn.ModuleDict({str(layer): LayerSelector(config, layer) for layer in config.layers})

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def __getitem__(self, layer: int) -> LayerSelector:
        return self.selectors[str(int(layer))]

    def __contains__(self, layer: int) -> bool:
        return str(int(layer)) in self.selectors

    def __len__(self) -> int:
        return len(self.selectors)

    def keys(self) -> list[int]:
        return self.layers

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``selector.json`` (config, policy, provenance) and ``selector.safetensors``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format_version": str(FORMAT_VERSION)})
        with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
            json.dump(self.config.to_json(), handle, indent=1, sort_keys=True)
            handle.write("\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "SpotSelectors":
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_NAME)) as handle:
            config = SelectorConfig.from_json(json.load(handle))
        selectors = cls(config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        expected = set(selectors.state_dict())
        missing = expected - set(state)
        unexpected = set(state) - expected
        # Files written before key pooling / the prefill scale / key centering lack them: their
        # initial values (plain block mean, scale 1, center 0) reproduce those files exactly.
        if unexpected or any(not name.endswith((".pool_weight", ".prefill_scale", ".key_center")) for name in missing):
            raise ValueError(f"{os.path.join(directory, WEIGHTS_NAME)} does not match selector.json: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        selectors.load_state_dict(state, strict=False)
        return selectors.to(device)


def shipped_selector_dir(model_id: str = "smollm2-135m") -> str:
    """Directory of a selector shipped inside the package (``spot_attention/selectors/<id>``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "selectors", model_id)


def load_selectors(path_or_id: str | os.PathLike = "smollm2-135m", device: str | torch.device = "cpu") -> SpotSelectors:
    """A selector directory, or the id of a shipped one (default: SmolLM2-135M)."""
    path = os.fspath(path_or_id)
    if not os.path.isdir(path):
        path = shipped_selector_dir(path)
    return SpotSelectors.load(path, device)
