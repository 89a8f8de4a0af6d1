"""LayerSelector / SpotSelectors: shapes, block semantics, relative-position invariance, the
initial approximation of attention, ``selector_score`` semantics and the file round trip."""

import json
import math

import pytest
import torch

from spot_attention import reference
from spot_attention.selector import LayerSelector, SelectorConfig, SpotSelectors


def _config(num_heads=6, num_kv_heads=2, head_dim=32, selector_dim=32, block_size=16, layers=(0, 3), **extra):
    pairs = extra.pop("rotary_pairs", min(head_dim // 2, (selector_dim - selector_dim // 4) // 2))
    variance = extra.pop("variance_bands", selector_dim // 8)
    bias = selector_dim - 2 * pairs - variance
    return SelectorConfig(model_id="tiny", layers=list(layers), num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, selector_dim=selector_dim, block_size=block_size, rotary_pairs=pairs,
                          variance_bands=variance, bias_dims=bias, **extra)


def _rope(x, positions, theta=10000.0):
    """HF rotate_half RoPE of x [B, H, L, d] at the given positions."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None]
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    sin = torch.cat((angles.sin(), angles.sin()), -1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x.double() * cos + rotated.double() * sin).to(x.dtype)


def _trained_like(selector, generator):
    """Random non-trivial parameters (an untrained selector leaves the bias dims at zero)."""
    with torch.no_grad():
        for parameter in selector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return selector


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("length", [5, 16, 37, 64])
def test_shapes_and_complete_blocks(group, length):
    generator = torch.Generator().manual_seed(group * 100 + length)
    config = _config(num_heads=2 * group, num_kv_heads=2)
    selector = LayerSelector(config, 0)
    query = torch.randn(2, 2 * group, length, 32, generator=generator)
    key = torch.randn(2, 2, length, 32, generator=generator)
    features = selector.query_features(query)
    assert features.shape == (2, 2, length, 32) and features.dtype == torch.float32
    pooled = selector.pool_query_blocks(features)
    assert pooled.shape == (2, 2, reference.num_blocks(length, 16), 32)
    # The last (possibly partial) query block is the mean of its own tokens (times the prefill
    # scale, 1 at init).
    last = (reference.num_blocks(length, 16) - 1) * 16
    torch.testing.assert_close(pooled[:, :, -1], features[:, :, last:].mean(2))
    with torch.no_grad():
        selector.prefill_scale.copy_(torch.tensor([0.5, 2.0]))
    scaled = selector.pool_query_blocks(features)
    torch.testing.assert_close(scaled, pooled * torch.tensor([0.5, 2.0])[None, :, None, None])
    keys = selector.key_features(key)
    assert keys.shape == (2, 2, length // 16, 32)


def test_key_block_depends_on_its_tokens_only():
    """A decode cache computes each block's key once, when the block fills."""
    generator = torch.Generator().manual_seed(1)
    selector = _trained_like(LayerSelector(_config(), 0), generator)
    key = torch.randn(1, 2, 80, 32, generator=generator)
    whole = selector.key_features(key)
    torch.testing.assert_close(selector.key_features(key[:, :, :40]), whole[:, :, :2])
    torch.testing.assert_close(selector.key_features(key[:, :, 32:64]), whole[:, :, 2:4])
    assert not selector.key_features_need_position


def test_pooling_inputs_equals_pooling_features():
    generator = torch.Generator().manual_seed(2)
    selector = _trained_like(LayerSelector(_config(), 0), generator)
    query = torch.randn(1, 6, 45, 32, generator=generator)
    inputs = selector.query_inputs(query)
    pooled_inputs = {name: selector.pool_blocks(value) for name, value in inputs.items()}
    torch.testing.assert_close(selector.prefill_features_from_inputs(pooled_inputs),
                               selector.pool_query_blocks(selector.query_features(query)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_blocks", [1, 7, 128])
def test_scores_depend_on_relative_position_only(shift_blocks):
    """Shifting every position by whole blocks (up to 8x a 256-token training length and far
    beyond) leaves every score unchanged: no absolute position reaches the selector."""
    generator = torch.Generator().manual_seed(3)
    selector = _trained_like(LayerSelector(_config(), 0), generator)
    raw_q = torch.randn(1, 6, 48, 32, generator=generator, dtype=torch.float64)
    raw_k = torch.randn(1, 2, 48, 32, generator=generator, dtype=torch.float64)
    positions = torch.arange(48)

    def scores(offset):
        q = _rope(raw_q, positions + offset).float()
        k = _rope(raw_k, positions + offset).float()
        qsel = selector.pool_query_blocks(selector.query_features(q)).double()
        ksel = selector.key_features(k).double()
        return torch.einsum("bhqr,bhkr->bhqk", qsel, ksel)

    torch.testing.assert_close(scores(shift_blocks * 16), scores(0), rtol=1e-4, atol=1e-4)


def test_untrained_selector_approximates_group_mean_attention_logits():
    """At init, softmax_scale * qsel . ksel = (1/sqrt(d)) mean_h q_h . mean(k) on the kept
    (lowest-frequency) rotary pairs; variance dims add the second-order term, bias dims zero."""
    generator = torch.Generator().manual_seed(4)
    config = _config(head_dim=32, selector_dim=32)
    selector = LayerSelector(config, 0)
    query = torch.randn(1, 6, 32, 32, generator=generator)
    key = torch.randn(1, 2, 32, 32, generator=generator)
    selector.init_statistics(query, key)
    qsel = selector.query_features(query)
    ksel = selector.key_features(key)
    pairs = config.rotary_pairs
    rotary = torch.einsum("bhlr,bhkr->bhlk", qsel[..., : 2 * pairs], ksel[..., : 2 * pairs]) * selector.softmax_scale
    kept = torch.cat((torch.arange(16 - pairs, 16), torch.arange(32 - pairs, 32)))
    mean_query = query.view(1, 2, 3, 32, 32).mean(2)[..., kept]
    mean_key = key.view(1, 2, 2, 16, 32).mean(3)[..., kept]
    expected = torch.einsum("bhld,bhkd->bhlk", mean_query, mean_key) / math.sqrt(32)
    torch.testing.assert_close(rotary, expected, rtol=1e-4, atol=1e-4)
    bias = qsel[..., 2 * pairs + config.variance_bands :]
    assert bool((bias == 0).all())


def test_logits_follow_selector_score_semantics():
    generator = torch.Generator().manual_seed(5)
    selector = LayerSelector(_config(), 0)
    qsel = torch.randn(2, 2, 4, 32, generator=generator)
    ksel = torch.randn(2, 2, 6, 32, generator=generator)
    num_visible = torch.tensor([[0, 1, 3, 6], [2, 2, 5, 6]], dtype=torch.int32)
    expected = reference.selector_score(qsel, ksel, num_visible, selector.softmax_scale)
    torch.testing.assert_close(selector.logits(qsel, ksel, num_visible), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_features(dtype):
    generator = torch.Generator().manual_seed(6)
    selector = _trained_like(LayerSelector(_config(), 0), generator)
    query = torch.randn(1, 6, 33, 32, generator=generator)
    key = torch.randn(1, 2, 33, 32, generator=generator)
    low = selector.query_features(query.to(dtype))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, selector.query_features(query), rtol=0.05, atol=0.05)
    assert selector.key_features(key.to(dtype)).dtype == torch.float32


def test_shape_errors_name_the_argument():
    selector = LayerSelector(_config(), 0)
    with pytest.raises(ValueError, match="argument 'query'"):
        selector.query_features(torch.randn(1, 4, 8, 32))
    with pytest.raises(ValueError, match="argument 'key'"):
        selector.key_features(torch.randn(1, 2, 8, 16))


def test_config_validation():
    with pytest.raises(ValueError, match="selector_dim"):
        SelectorConfig(model_id="tiny", layers=[0], num_heads=2, num_kv_heads=2, head_dim=32, selector_dim=32,
                       rotary_pairs=4, variance_bands=2, bias_dims=2)
    with pytest.raises(ValueError, match="kcache_format"):
        _config(kcache_format="fp8")
    with pytest.raises(ValueError, match="num_kv_heads"):
        _config(num_heads=5, num_kv_heads=2)


def test_config_for_a_transformers_model():
    from transformers import LlamaConfig

    model_config = LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
                               intermediate_size=64, vocab_size=64, rope_theta=5e5)
    config = SelectorConfig.for_model(model_config, "llama-tiny")
    assert config.layers == [0, 1, 2]
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.group_size) == (8, 2, 32, 4)
    assert config.rope_theta == 5e5
    assert 2 * config.rotary_pairs + config.variance_bands + config.bias_dims == 64


@pytest.mark.parametrize("kcache_format", ["int4", "dense"])
def test_save_load_round_trip(tmp_path, kcache_format):
    generator = torch.Generator().manual_seed(8)
    config = _config(kcache_format=kcache_format, top_p={0: 0.91, 3: 0.5}, training={"loss": "forward_kl"})
    selectors = SpotSelectors(config)
    for layer in config.layers:
        _trained_like(selectors[layer], generator)
        selectors[layer].init_statistics(torch.randn(1, 6, 40, 32, generator=generator),
                                         torch.randn(1, 2, 40, 32, generator=generator))
    selectors.save(tmp_path)
    stored = json.loads((tmp_path / "selector.json").read_text())
    assert stored["top_p"] == {"0": 0.91, "3": 0.5} and stored["kcache_format"] == kcache_format
    loaded = SpotSelectors.load(tmp_path)
    assert loaded.config == selectors.config
    assert loaded.layers == [0, 3] and 3 in loaded and 1 not in loaded
    query = torch.randn(1, 6, 50, 32, generator=generator)
    key = torch.randn(1, 2, 50, 32, generator=generator)
    for layer in config.layers:
        assert torch.equal(loaded[layer].query_features(query), selectors[layer].query_features(query))
        assert torch.equal(loaded[layer].key_features(key), selectors[layer].key_features(key))


def test_shipped_default_selector_loads():
    from spot_attention.selector import load_selectors, shipped_selector_dir

    import os

    if not os.path.isfile(os.path.join(shipped_selector_dir(), "selector.json")):
        pytest.skip("no shipped selector in this checkout")
    selectors = load_selectors()
    config = selectors.config
    assert config.layers == list(range(30))
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.selector_dim) == (9, 3, 64, 64)
    assert config.top_p is not None and set(config.top_p) == set(range(30))
    assert all(0.0 <= p <= 1.0 for p in config.top_p.values())


def test_key_center_leaves_block_distributions_unchanged():
    generator = torch.Generator().manual_seed(21)
    config = _config()
    selector = _trained_like(LayerSelector(config, 0), generator)
    query = _rope(torch.randn(2, 6, 96, 32, generator=generator), torch.arange(96))
    key = _rope(torch.randn(2, 2, 96, 32, generator=generator) + 0.7, torch.arange(96))
    num_visible = torch.tensor([[6, 3], [4, 6]], dtype=torch.int32)
    query_sel = selector.pool_query_blocks(selector.query_features(query))[:, :, :2]
    before = selector.logits(query_sel, selector.key_features(key), num_visible)
    uncentred = selector.key_features(key)
    selector.fit_key_center([key])
    centred = selector.key_features(key)
    # The fitted center is the mean key, and keys come back minus it.
    assert torch.allclose(centred.mean(dim=(0, 2)), torch.zeros(2, 32), atol=1e-5)
    assert torch.allclose(centred, uncentred - selector.key_center[None, :, None], atol=1e-6)
    after = selector.logits(query_sel, centred, num_visible)
    assert not torch.allclose(before, after)  # the logits moved...
    assert torch.allclose(before.softmax(-1), after.softmax(-1), atol=1e-6)  # ...their distribution did not
    # Refitting is idempotent: the center is computed from the uncentred keys.
    center = selector.key_center.clone()
    selector.fit_key_center([key])
    assert torch.allclose(selector.key_center, center, atol=1e-6)


def test_key_center_round_trips_and_old_files_load_uncentred(tmp_path):
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(22)
    config = _config()
    selectors = SpotSelectors(config)
    key = torch.randn(1, 2, 64, 32, generator=generator) + 1.0
    for layer in config.layers:
        _trained_like(selectors[layer], generator)
        selectors[layer].fit_key_center([key])
    selectors.save(tmp_path)
    loaded = SpotSelectors.load(tmp_path)
    for layer in config.layers:
        assert torch.equal(loaded[layer].key_center, selectors[layer].key_center)
        assert loaded[layer].key_center.abs().sum() > 0
    # A file from before key centering: no key_center tensors, loads with a zero center.
    state = load_file(tmp_path / "selector.safetensors")
    save_file({name: tensor for name, tensor in state.items() if not name.endswith(".key_center")},
              tmp_path / "selector.safetensors")
    old = SpotSelectors.load(tmp_path)
    for layer in config.layers:
        assert torch.equal(old[layer].key_center, torch.zeros(2, 32))
        assert torch.allclose(old[layer].key_features(key) - selectors[layer].key_center[None, :, None],
                              selectors[layer].key_features(key), atol=1e-6)
