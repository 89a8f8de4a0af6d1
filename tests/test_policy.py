"""Dual top-p policy: vectorised selection against ``reference.select_blocks``, the op path,
budget statistics, and per-layer calibration of top_p."""

import pytest
import torch

from spot_attention import policy, reference
from spot_attention.selector import SelectorConfig, SpotSelectors


def _random_case(generator, batch=2, heads=3, nq=5, nk=11):
    scores = torch.randn(batch, heads, nq, nk, generator=generator) * 2.5
    num_visible = torch.randint(0, nk + 1, (batch, nq), generator=generator, dtype=torch.int32)
    return scores, num_visible


@pytest.mark.parametrize("seed", range(6))
def test_select_mask_matches_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    scores, num_visible = _random_case(generator)
    scores[0, 1, 2] = float("-inf")  # a row with nothing scoreable
    scores[1, 0, 0, 3:6] = scores[1, 0, 0, 2]  # ties: lower index first
    for _ in range(8):
        top_p = float(torch.rand(1, generator=generator))
        sink = int(torch.randint(0, 3, (1,), generator=generator))
        local = int(torch.randint(0, 3, (1,), generator=generator))
        k_max = max(sink + local, int(torch.randint(1, 12, (1,), generator=generator)))
        k_min = int(torch.randint(0, k_max + 1, (1,), generator=generator))
        expected_indices, expected_counts = reference.select_blocks(scores, num_visible, top_p, k_min, k_max, sink,
                                                                    local)
        mask = policy.select_mask(scores, num_visible, top_p, k_min, k_max, sink, local)
        indices, counts = policy.indices_from_mask(mask, k_max)
        assert torch.equal(counts, expected_counts)
        assert torch.equal(indices, expected_indices)


def test_select_mask_edge_values_of_top_p():
    generator = torch.Generator().manual_seed(7)
    scores, num_visible = _random_case(generator, nk=9)
    num_visible.fill_(9)
    only_forced = policy.select_mask(scores, num_visible, 0.0, 0, 9, 1, 1)
    assert torch.equal(only_forced.sum(-1), torch.full((2, 3, 5), 2))
    everything = policy.select_mask(scores, num_visible, 1.0, 0, 9, 1, 1)
    assert bool(everything.all())
    clamped = policy.select_mask(scores, num_visible, 1.0, 0, 4, 1, 1)
    assert torch.equal(clamped.sum(-1), torch.full((2, 3, 5), 4))
    assert bool(clamped[..., 0].all()) and bool(clamped[..., 8].all())


def test_select_per_row_top_p_tensor():
    generator = torch.Generator().manual_seed(3)
    scores, num_visible = _random_case(generator)
    per_row = torch.rand(2, 3, 5, generator=generator, dtype=torch.float64)
    mask = policy.select_mask(scores, num_visible, per_row, 1, 11, 1, 1)
    for h in range(3):
        single = policy.select_mask(scores[:, h : h + 1, 2:3], num_visible[:, 2:3], float(per_row[0, h, 2]), 1, 11, 1, 1)
        assert torch.equal(mask[0, h, 2], single[0, 0, 0])


def test_select_through_op_or_fallback_matches_reference():
    generator = torch.Generator().manual_seed(11)
    scores, num_visible = _random_case(generator, nk=13)
    rule = policy.DualTopP(top_p={4: 0.7}, k_min=2, k_max=6, sink_blocks=1, local_blocks=2)
    indices, counts = rule.select(scores, num_visible, layer=4)
    expected = reference.select_blocks(scores, num_visible, 0.7, 2, 6, 1, 2)
    assert torch.equal(counts.cpu(), expected[1])
    assert torch.equal(indices.cpu(), expected[0])


def test_knobs_clamp_into_kernel_ranges():
    rule = policy.DualTopP(top_p=0.9, k_min=8, k_max=100, sink_blocks=1, local_blocks=2)
    knobs = rule.knobs(0, num_blocks=5)
    assert (knobs.k_min, knobs.k_max) == (5, 5)
    knobs = rule.knobs(0, num_blocks=2)
    assert knobs.k_max == 3  # never below sink + local
    assert policy.DualTopP(top_p={3: 0.5}).layer_top_p(7) == 0.95


def test_indices_from_mask_layout():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    indices, counts = policy.indices_from_mask(mask, 5)
    assert indices.tolist() == [[0, 2, 3, -1, -1], [-1] * 5]
    assert counts.tolist() == [3, 0]
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32


def test_budget_stats_and_recall():
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    mask[0, 0, 0, :2] = True
    mask[0, 1, 1, :3] = True
    num_visible = torch.tensor([[2, 4]], dtype=torch.int32)
    stats = policy.budget_stats(mask, num_visible)
    assert stats["fraction_read"] == pytest.approx(5 / 12)
    assert stats["blocks_read_per_row"] == pytest.approx(5 / 4)
    teacher = torch.tensor([0.5, 0.25, 0.125, 0.125]).expand(1, 2, 2, 4)
    values = policy.recall(mask, teacher)
    assert values[0, 0, 0] == pytest.approx(0.75) and values[0, 1, 1] == pytest.approx(0.875)
    tracker = policy.BudgetTracker()
    tracker.add(3, mask, num_visible, teacher)
    assert tracker.per_layer()[3]["fraction_read"] == pytest.approx(5 / 12)
    assert tracker.fraction_read() == pytest.approx(5 / 12)


def _synthetic_rows(generator, sharpness, count=3, nq=24, nk=40):
    """Teacher = softmax of hidden logits; the selector sees them with noise (an imperfect
    selector), visible prefixes of varying length."""
    rows = []
    for _ in range(count):
        hidden = torch.randn(1, 2, nq, nk, generator=generator) * sharpness
        scores = hidden + 0.5 * torch.randn(1, 2, nq, nk, generator=generator)
        num_visible = torch.randint(4, nk + 1, (1, nq), generator=generator, dtype=torch.int32)
        visible = torch.arange(nk)[None, None, None, :] < num_visible[:, None, :, None]
        teacher = torch.softmax(hidden.masked_fill(~visible, float("-inf")), -1)
        rows.append(policy.CalibrationRows(scores.masked_fill(~visible, float("-inf")), num_visible, teacher))
    return rows


@pytest.mark.parametrize("target", [0.8, 0.9, 0.97])
def test_calibration_hits_target_recall(target):
    generator = torch.Generator().manual_seed(int(target * 100))
    config = SelectorConfig(model_id="synthetic", layers=[0, 1], num_heads=2, num_kv_heads=2, head_dim=16,
                            selector_dim=32, rotary_pairs=8, variance_bands=8, bias_dims=8, k_min=1)
    selectors = SpotSelectors(config)
    rows = {0: _synthetic_rows(generator, 1.0), 1: _synthetic_rows(generator, 3.0)}
    result = policy.calibrate_top_p(selectors, rows, target)
    for layer, item in result.items():
        knobs = policy.DualTopP.from_config(config).knobs(layer)
        achieved, _ = policy.layer_recall(rows[layer], item["top_p"], knobs)
        assert achieved >= target
        assert achieved == pytest.approx(item["recall"])
        # Minimal: a visibly smaller p misses the target.
        below, _ = policy.layer_recall(rows[layer], item["top_p"] - 1e-3, knobs)
        assert below < target
        assert config.top_p[layer] == item["top_p"]
    # The sharper layer (attention concentrated on fewer blocks) reads less.
    assert result[1]["fraction_read"] < result[0]["fraction_read"]


def test_calibration_rejects_bad_target():
    config = SelectorConfig(model_id="synthetic", layers=[0], num_heads=2, num_kv_heads=2, head_dim=16,
                            selector_dim=32, rotary_pairs=8, variance_bands=8, bias_dims=8)
    with pytest.raises(ValueError, match="argument 'target_recall'"):
        policy.calibrate_top_p(SpotSelectors(config), {}, 1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nk", [7, 200])
def test_gpu_select_matches_reference(nk):
    generator = torch.Generator().manual_seed(nk)
    scores, num_visible = _random_case(generator, batch=2, heads=8, nq=9, nk=nk)  # random: no ties
    expected = reference.select_blocks(scores, num_visible, 0.9, 2, min(nk, 64), 1, 2)
    indices, counts = policy.select(scores.cuda(), num_visible.cuda(), 0.9, 2, min(nk, 64), 1, 2)
    assert indices.is_cuda and counts.is_cuda
    assert torch.equal(counts.cpu(), expected[1]) and torch.equal(indices.cpu(), expected[0])
    mask = policy.select_mask(scores.cuda(), num_visible.cuda(), 0.9, 2, min(nk, 64), 1, 2)
    assert torch.equal(policy.indices_from_mask(mask, min(nk, 64))[0].cpu(), expected[0])
