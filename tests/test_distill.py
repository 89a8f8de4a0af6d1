"""Distillation on a tiny random Llama: capture of post-RoPE q/k, teacher targets, losses,
a few steps that lower the loss, checkpoint/resume, and the data split."""

import json
import os

import pytest
import torch

from spot_attention import data, distill, reference
from spot_attention.selector import SelectorConfig, SpotSelectors


def _tiny_llama(layers=2, heads=6, kv_heads=2, head_dim=16, vocab=97, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         hidden_size=heads * head_dim, head_dim=head_dim, intermediate_size=64, vocab_size=vocab,
                         max_position_embeddings=4096, rope_theta=10000.0)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


class ByteTokenizer:
    """Bytes modulo the vocabulary: enough for real text to reach a random tiny model."""

    def __init__(self, vocab=97):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [byte % self.vocab for byte in text.encode("utf-8")]}


def _selectors(model, block_size=16, selector_dim=32):
    config = SelectorConfig.for_model(model.config, "tiny", selector_dim=selector_dim, block_size=block_size)
    return SpotSelectors(config)


def test_capture_gives_the_post_rope_qk_attention_uses():
    """Block mass from the captured q/k equals block mass of the eager attention probabilities."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(1))
    captured = distill.capture_window(model, ids, [0, 1])
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        output = model.model(input_ids=ids, output_attentions=True)
    model.config._attn_implementation = "sdpa"
    for layer in (0, 1):
        query, key, scaling = captured[layer]
        assert query.shape == (1, 6, 45, 16) and key.shape == (1, 2, 45, 16)
        assert scaling == pytest.approx(16**-0.5)
        probabilities = output.attentions[layer][0]  # [Hq, L, L]
        per_block = torch.zeros(6, 45, 3).index_add_(2, torch.arange(45) // 16, probabilities.float())
        expected = per_block.view(2, 3, 45, 3).mean(1)
        mass = distill.teacher_token_mass(query, key, scaling, 16)[0]
        torch.testing.assert_close(mass, expected, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(module, "spot_capture_store") for module in model.modules())


def test_prefill_targets_equal_block_mass_per_query_block():
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 6, 50, 16, generator=generator)
    key = torch.randn(1, 2, 50, 16, generator=generator)
    token_mass = distill.teacher_token_mass(query, key, 0.25, 16)
    packed_q = query[0].transpose(0, 1).contiguous()
    packed_k = key[0].transpose(0, 1).contiguous()
    expected = reference.block_mass(packed_q, packed_k, torch.tensor([0, 50], dtype=torch.int32), 16, 16, 0.25)
    torch.testing.assert_close(distill.prefill_targets(token_mass, 16), expected, rtol=1e-5, atol=1e-6)


def test_divergences():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 7, generator=generator)
    logits[:, 5:] = float("-inf")
    teacher = torch.softmax(torch.randn(4, 7, generator=generator), -1)
    target = teacher[:, :5] / teacher[:, :5].sum(-1, keepdim=True)
    log_p = torch.log_softmax(logits[:, :5], -1)
    forward = (target * (target.log() - log_p)).sum(-1)
    reverse = (log_p.exp() * (log_p - target.log())).sum(-1)
    torch.testing.assert_close(distill.divergence(teacher, logits, "forward_kl"), forward)
    torch.testing.assert_close(distill.divergence(teacher, logits, "reverse_kl"), reverse)
    torch.testing.assert_close(distill.divergence(teacher, logits, "mixed"), 0.5 * (forward + reverse))
    # A selector equal to the teacher has zero divergence.
    exact = torch.log(teacher).masked_fill(torch.arange(7) >= 5, float("-inf"))
    assert distill.divergence(teacher, exact, "forward_kl").abs().max() < 1e-6
    with pytest.raises(ValueError, match="argument 'loss'"):
        distill.divergence(teacher, logits, "l2")


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_a_few_steps_lower_the_loss(loss):
    model = _tiny_llama(seed=4)
    selectors = _selectors(model)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (1, 100), generator=generator)
    captured = distill.capture_window(model, ids, selectors.layers)
    for layer, (query, key, _) in captured.items():
        selectors[layer].init_statistics(query, key)
    batches = {layer: distill.make_layer_batch(selectors[layer], q, k, s, 40, generator)
               for layer, (q, k, s) in captured.items()}
    assert batches[0].token_positions.min() >= 15 and len(batches[0].token_positions) == 40
    before, _ = distill.total_loss(selectors, batches, loss)
    optimizer = torch.optim.AdamW(selectors.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        value, _ = distill.total_loss(selectors, batches, loss)
        value.backward()
        optimizer.step()
    after, _ = distill.total_loss(selectors, batches, loss)
    assert float(after.detach()) < 0.8 * float(before.detach())
    # The frozen model got no gradient.
    assert all(parameter.grad is None for parameter in model.parameters())


def test_distill_end_to_end_with_resume(tmp_path):
    model = _tiny_llama(seed=5)
    tokenizer = ByteTokenizer()
    settings = distill.DistillSettings(selector_dim=32, block_size=16, tokens_per_window=32, updates_per_window=2,
                                       replay=2, checkpoint_every=2, warmup=1)
    common = dict(train_ctx=64, lr=1e-2, seed=0, model=model, tokenizer=tokenizer, settings=settings,
                  progress=False, log=lambda *args: None)
    first = distill.distill(None, str(tmp_path), steps=4, compare_losses=("reverse_kl",), **common)
    checkpoint = torch.load(tmp_path / distill.CHECKPOINT_NAME, weights_only=False)
    assert checkpoint["step"] == 4 and set(checkpoint["variants"]) == {"forward_kl", "reverse_kl"}
    messages = []
    common["log"] = messages.append
    resumed = distill.distill(None, str(tmp_path), steps=6, compare_losses=("reverse_kl",), **common)
    assert any("at step 4" in message for message in messages)
    stored = json.loads((tmp_path / "selector.json").read_text())
    assert stored["training"]["steps_done"] == 6 and stored["training"]["loss"] == "forward_kl"
    assert stored["training"]["train_files"] and all(data.split_of(path) == "train"
                                                     for path in stored["training"]["train_files"])
    assert os.path.isfile(tmp_path / "variants" / "reverse_kl" / "selector.safetensors")
    loaded = SpotSelectors.load(tmp_path)
    assert loaded.layers == [0, 1]
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values()))


def test_distill_is_deterministic(tmp_path):
    settings = distill.DistillSettings(selector_dim=32, block_size=16, tokens_per_window=16, updates_per_window=2,
                                       replay=2, warmup=1)
    results = []
    for run in range(2):
        model = _tiny_llama(seed=6)
        selectors = distill.distill(None, str(tmp_path / str(run)), train_ctx=48, steps=3, lr=1e-2, seed=3,
                                    model=model, tokenizer=ByteTokenizer(), settings=settings, progress=False,
                                    log=lambda *args: None)
        results.append(selectors.state_dict())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_data_split_is_by_file_and_fixed():
    files = {split: set(data.source_files(split)) for split in data.SPLITS}
    assert not files["train"] & files["heldout"] and not files["train"] & files["calibration"]
    assert not files["calibration"] & files["heldout"]
    assert all(data.split_of(path) == split for split, paths in files.items() for path in list(paths)[:50])
    assert len(files["train"]) > 4 * len(files["heldout"]) > 0
    used = []
    docs = list(data.documents("heldout", 3000, ByteTokenizer(), max_tokens=3500, limit=2, used=used))
    assert len(docs) == 2 and all(3000 <= len(ids) <= 3500 for ids in docs)
    assert [record["path"] for record in used] == [record["path"] for record in data.used_files("heldout")[-2:]]
    with pytest.raises(ValueError, match="argument 'split'"):
        data.source_files("test")


def test_calibrate_selectors_on_captured_text():
    from spot_attention import policy

    model = _tiny_llama(seed=7)
    selectors = _selectors(model)
    tokenizer = ByteTokenizer()
    result = policy.calibrate_selectors(selectors, model, tokenizer, target_recall=0.9, context=(64, 96), windows=1,
                                        token_rows=24)
    config = selectors.config
    assert set(config.top_p) == {0, 1} and all(0.0 <= p <= 1.0 for p in config.top_p.values())
    assert all(value >= 0.9 for value in result["recall"].values())
    summary = config.training["calibration"]
    assert summary["contexts"] == [64, 96] and summary["windows"] == 2
    assert summary["files"] and all(data.split_of(path) == "calibration" for path in summary["files"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_capture_teacher_and_steps(dtype):
    """Capture on a CUDA model in half precision, the teacher through the CUDA block_mass kernel
    (or its fallback), and a few steps that lower the loss, all on the device."""
    model = _tiny_llama(heads=8, kv_heads=2, head_dim=64, seed=8).to("cuda", dtype)
    selectors = _selectors(model, block_size=64, selector_dim=64).cuda()
    ids = torch.randint(0, 97, (1, 333), generator=torch.Generator().manual_seed(8))
    captured = distill.capture_window(model, ids, selectors.layers)
    query, key, scaling = captured[0]
    assert query.is_cuda and query.dtype == dtype
    mass = distill.teacher_token_mass(query, key, scaling, 64)
    packed_q = query[0].transpose(0, 1).double().cpu()
    packed_k = key[0].transpose(0, 1).double().cpu()
    expected = reference.block_mass(packed_q, packed_k, torch.tensor([0, 333], dtype=torch.int32), 1, 64, scaling)
    torch.testing.assert_close(mass.cpu(), expected, atol=2e-3, rtol=2e-3)
    generator = torch.Generator().manual_seed(8)
    for layer, (q, k, _) in captured.items():
        selectors[layer].init_statistics(q, k)
    batches = {layer: distill.make_layer_batch(selectors[layer], q, k, s, 64, generator)
               for layer, (q, k, s) in captured.items()}
    before, _ = distill.total_loss(selectors, batches, "forward_kl")
    optimizer = torch.optim.AdamW(selectors.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        value, _ = distill.total_loss(selectors, batches, "forward_kl")
        value.backward()
        optimizer.step()
    after, _ = distill.total_loss(selectors, batches, "forward_kl")
    assert float(after.detach()) < float(before.detach())


@pytest.mark.model
@pytest.mark.slow
def test_shipped_selector_on_the_default_model():
    """The shipped SmolLM2-135M selector on a held-out 1K window: low divergence from the real
    attention, and its calibrated policy keeps most of the attention mass."""
    from spot_attention import models, policy
    from spot_attention.selector import load_selectors, shipped_selector_dir

    if not os.path.isfile(os.path.join(shipped_selector_dir(), "selector.json")):
        pytest.skip("no shipped selector in this checkout")
    try:
        model, tokenizer = models.load_model()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"default model not available: {error}")
    selectors = load_selectors()
    window = data.training_windows(tokenizer, 1024, 1, seed=5, split="heldout")[0]
    captured = distill.capture_window(model, window[None], selectors.layers)
    generator = torch.Generator().manual_seed(0)
    batches = {layer: distill.make_layer_batch(selectors[layer], q, k, s, 128, generator)
               for layer, (q, k, s) in captured.items()}
    divergences = distill.evaluate(selectors, [batches])
    assert divergences["prefill"] < 0.15 and divergences["decode"] < 0.2
    rule = policy.DualTopP.from_config(selectors.config)
    recalls = []
    for layer, (query, key, scaling) in captured.items():
        rows = policy.selector_rows(selectors[layer], query, key, scaling, 128, generator)["prefill"]
        recalls.append(policy.layer_recall([rows], rule.layer_top_p(layer), rule.knobs(layer))[0])
    assert sum(recalls) / len(recalls) > 0.9
