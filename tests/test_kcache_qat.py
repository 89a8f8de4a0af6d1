"""Quantisation-aware selector training: the fake-quantised keys are bit for bit what the K-cache
returns, the gradient passes straight through, and distillation trains through the round trip
and records the format."""

import json

import pytest
import torch

from spot_attention import distill, reference
from spot_attention.integrations.hf import kcache_round_trip
from spot_attention.kcache_qat import QAT_FORMATS, fake_quantize_kcache
from spot_attention.selector import SpotSelectors

from test_distill import ByteTokenizer, _selectors, _tiny_llama

FORMATS = reference.KCACHE_FORMATS


def _keys(seed, shape=(2, 3, 7, 64)):
    """Selector-like keys: unit scale with outliers and a spread of group magnitudes, so scales
    differ between groups and the nvfp4 per-tensor scale matters."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(*shape, generator=generator)
    keys = keys * torch.exp2(torch.randint(-6, 4, (*shape[:-1], 1), generator=generator).float())
    keys[..., 5] *= 9.0
    return keys


def _reference_round_trip(keys, fmt):
    """The cache's rule written out: nvfp4's per-tensor scale from the amax of the keys appended
    at once (4x headroom), then reference pack + unpack."""
    global_scale = 1.0
    if fmt == "nvfp4":
        global_scale = max(float(keys.abs().amax()) * 4.0 / (6.0 * 448.0), 1e-12)
    codes, scales = reference.pack_kcache(keys, fmt, global_scale)
    return reference.unpack_kcache(codes, scales, fmt, global_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_quant_forward_is_the_cache_round_trip_bit_for_bit(fmt, seed):
    keys = _keys(seed)
    quantised = fake_quantize_kcache(keys.clone().requires_grad_(), fmt)
    expected = _reference_round_trip(keys, fmt)
    assert quantised.dtype == torch.float32 and quantised.shape == keys.shape
    assert torch.equal(quantised.detach(), expected)
    assert torch.equal(quantised.detach(), kcache_round_trip(keys, fmt))
    # It is a real 4-bit grid: most values moved.
    assert (quantised.detach() != keys).float().mean() > 0.5


def test_nvfp4_uses_the_per_tensor_scale_of_the_whole_call():
    """The same block quantises differently next to a larger block (a shared fp32 scale), as it
    would in one cache; a fixed scale of 1 would give yet another result."""
    keys = _keys(3, shape=(1, 1, 2, 32)) * 1e-3
    keys[0, 0, 1] *= 500.0
    together = fake_quantize_kcache(keys, "nvfp4")[0, 0, 0]
    alone = fake_quantize_kcache(keys[:, :, :1], "nvfp4")[0, 0, 0]
    assert not torch.equal(together, alone)
    codes, scales = reference.pack_kcache(keys, "nvfp4", 1.0)
    assert not torch.equal(together, reference.unpack_kcache(codes, scales, "nvfp4", 1.0)[0, 0, 0])


@pytest.mark.parametrize("fmt", [*FORMATS, "none"])
def test_gradient_is_straight_through(fmt):
    keys = _keys(4).requires_grad_()
    weights = torch.randn(keys.shape, generator=torch.Generator().manual_seed(5))
    (fake_quantize_kcache(keys, fmt) * weights).sum().backward()
    assert torch.equal(keys.grad, weights)


@pytest.mark.parametrize("fmt", FORMATS)
def test_centred_fake_quant_scores_like_a_centred_cache(fmt):
    """With ``center`` the cache holds keys minus the per-head mean (over batch and blocks): the
    forward is that round trip plus the mean, so every row's softmax equals the one over the
    centred cache's keys; the centred grid is finer (smaller error), the gradient still the
    identity."""
    keys = _keys(8) + 3.0 * torch.randn(1, 3, 1, 64, generator=torch.Generator().manual_seed(9))
    mean = keys.mean(dim=(0, 2), keepdim=True)
    leaf = keys.clone().requires_grad_()
    centred = fake_quantize_kcache(leaf, fmt, center=True)
    cache = _reference_round_trip(keys - mean, fmt)
    torch.testing.assert_close(centred.detach(), cache + mean, rtol=0, atol=1e-5)
    query = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(torch.softmax(query @ centred.detach().transpose(-1, -2), -1),
                               torch.softmax(query @ cache.transpose(-1, -2), -1), rtol=1e-4, atol=1e-6)
    plain_error = (fake_quantize_kcache(keys, fmt) - keys).norm()
    assert (centred.detach() - keys).norm() < plain_error
    centred.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(keys))


def test_bad_format_is_named():
    with pytest.raises(ValueError, match="argument 'fmt'"):
        fake_quantize_kcache(_keys(0), "fp8")
    assert QAT_FORMATS == ("none", "int4", "mxfp4", "nvfp4")


def _layer_batches(model, selectors, seed=6):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (1, 100), generator=generator)
    captured = distill.capture_window(model, ids, selectors.layers)
    for layer, (query, key, _) in captured.items():
        selectors[layer].init_statistics(query, key)
    return {layer: distill.make_layer_batch(selectors[layer], q, k, s, 40, generator)
            for layer, (q, k, s) in captured.items()}


def test_decode_rows_read_the_cache_and_key_parameters_get_gradients():
    model = _tiny_llama(seed=6)
    selectors = _selectors(model)
    batches = _layer_batches(model, selectors)
    selector, batch = selectors[0], batches[0]
    float_prefill, float_decode = distill.layer_losses(selector, batch, "forward_kl")
    prefill, decode = distill.layer_losses(selector, batch, "forward_kl", distill.KCacheReading("nvfp4"))
    assert torch.equal(prefill, float_prefill) and not torch.equal(decode, float_decode)
    both_prefill, both_decode = distill.layer_losses(selector, batch, "forward_kl",
                                                     distill.KCacheReading("nvfp4", prefill=True))
    assert not torch.equal(both_prefill, float_prefill) and torch.equal(both_decode, decode)
    # The decode loss is the float computation with the keys swapped for the cache's.
    original = selector.key_features_from_inputs
    selector.key_features_from_inputs = lambda inputs: kcache_round_trip(original(inputs), "nvfp4")
    try:
        _, swapped = distill.layer_losses(selector, batch, "forward_kl")
    finally:
        del selector.key_features_from_inputs
    assert torch.equal(decode, swapped)
    decode.backward()
    # Key-side parameters (pool_weight) learn through the round trip; the bias key weights get
    # none yet since their query side starts at zero.
    for name in ("pool_weight", "query_weight", "variance_weight"):
        grad = getattr(selector, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_distill_with_nvfp4_writes_the_format_and_resumes(tmp_path):
    settings = distill.DistillSettings(selector_dim=32, block_size=16, tokens_per_window=16, updates_per_window=2,
                                       replay=2, checkpoint_every=2, warmup=1)
    common = dict(train_ctx=48, lr=1e-2, seed=3, tokenizer=ByteTokenizer(), settings=settings, progress=False,
                  log=lambda *args: None)
    runs = []
    for run in range(2):
        runs.append(distill.distill(None, str(tmp_path / str(run)), steps=3, model=_tiny_llama(seed=6),
                                    kcache_format="nvfp4", **common))
    for name, value in runs[0].state_dict().items():
        assert torch.equal(value, runs[1].state_dict()[name]), name
    float_run = distill.distill(None, str(tmp_path / "float"), steps=3, model=_tiny_llama(seed=6), **common)
    assert any(not torch.equal(value, float_run.state_dict()[name]) for name, value in runs[0].state_dict().items())
    stored = json.loads((tmp_path / "0" / "selector.json").read_text())
    assert stored["kcache_format"] == "nvfp4"
    assert stored["training"]["settings"]["kcache_format"] == "nvfp4"
    assert SpotSelectors.load(tmp_path / "0").config.kcache_format == "nvfp4"
    assert json.loads((tmp_path / "float" / "selector.json").read_text())["kcache_format"] == "int4"
    # Resuming continues the QAT run; a different format does not silently mix.
    resumed = distill.distill(None, str(tmp_path / "0"), steps=4, model=_tiny_llama(seed=6), kcache_format="nvfp4",
                              **common)
    assert json.loads((tmp_path / "0" / "selector.json").read_text())["training"]["steps_done"] == 4
    assert resumed.config.kcache_format == "nvfp4"
    with pytest.raises(ValueError, match="kcache_format"):
        distill.distill(None, str(tmp_path / "0"), steps=5, model=_tiny_llama(seed=6), kcache_format="mxfp4",
                        **common)
    with pytest.raises(ValueError, match="argument 'kcache_format'"):
        distill.distill(None, str(tmp_path / "bad"), steps=1, model=_tiny_llama(seed=6), kcache_format="fp8",
                        **common)


def test_command_line_kcache_format(tmp_path, monkeypatch):
    """``spot-attn distill --kcache-format nvfp4 --kcache-prefill --center-keys`` reaches training and
    selector.json."""
    from spot_attention import models

    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (_tiny_llama(seed=6), ByteTokenizer()))
    threads = torch.get_num_threads()
    try:
        code = distill.main(["--out", str(tmp_path), "--train-ctx", "192", "--steps", "2", "--selector-dim", "32",
                             "--tokens-per-window", "16", "--updates-per-window", "2", "--replay", "2",
                             "--threads", "1", "--kcache-format", "nvfp4", "--kcache-prefill", "--center-keys"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    stored = json.loads((tmp_path / "selector.json").read_text())
    assert stored["kcache_format"] == "nvfp4"
    assert stored["training"]["settings"]["kcache_format"] == "nvfp4"
    assert stored["training"]["settings"]["kcache_prefill"] is True
    assert stored["training"]["settings"]["kcache_center"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_fake_quant_matches_the_reference(fmt):
    """On CUDA the round trip goes through the CUDA pack/unpack kernels: still the reference
    bit for bit, gradient straight through."""
    keys = _keys(7, shape=(1, 3, 33, 64))
    device_keys = keys.cuda().requires_grad_()
    quantised = fake_quantize_kcache(device_keys, fmt)
    assert quantised.is_cuda and torch.equal(quantised.detach().cpu(), _reference_round_trip(keys, fmt))
    quantised.sum().backward()
    assert torch.equal(device_keys.grad, torch.ones_like(device_keys))
