"""The evaluation package: baselines, perplexity/agreement/KL, recall, the harness and the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from spot_attention import reference  # noqa: E402
from spot_attention.eval import baselines, harness, perplexity, report  # noqa: E402
from spot_attention.integrations import hf, kernels  # noqa: E402
from test_hf_integration import BLOCK, ProjectionSelectors, dense_logits, tiny_llama, tokens  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread avoids paying thread hand-offs on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def attach_method(model, method, **kwargs):
    return hf.attach(model, method=method, **kwargs)


@pytest.mark.parametrize("method", [
    baselines.OracleTopP(1.0, BLOCK),
    baselines.TwilightTopP(1.0, BLOCK),
    baselines.QuestTopK(100, BLOCK),
    baselines.Streaming(100, BLOCK),
], ids=lambda m: m.name)
def test_baselines_with_every_block_equal_dense(method):
    model = tiny_llama()
    ids = tokens(2, 70, seed=11)
    expected = dense_logits(model, ids)
    handle = attach_method(model, method)
    torch.testing.assert_close(dense_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    assert handle.stats.fraction_read() == pytest.approx(1.0)
    generated = model.generate(ids, max_new_tokens=20, do_sample=False)
    hf.detach(model)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=20, do_sample=False))


def test_streaming_reads_sink_and_window_only():
    model = tiny_llama()
    length = 100
    handle = attach_method(model, baselines.Streaming(2, BLOCK))
    dense_logits(model, tokens(1, length))
    blocks = reference.num_blocks(length, BLOCK)
    expected = sum(min(i + 1, 3) for i in range(blocks)) / sum(i + 1 for i in range(blocks))
    assert handle.stats.fraction_read() == pytest.approx(expected)


def test_oracle_matches_reference_selection_and_reaches_its_recall():
    generator = torch.Generator().manual_seed(12)
    query = torch.randn(1, 6, 90, 64, generator=generator) * 2
    key = torch.randn(1, 2, 90, 64, generator=generator) * 2
    scaling = 64**-0.5
    method = baselines.OracleTopP(0.8, BLOCK, k_min=1)
    indices, counts = method.select_prefill(0, query, key, scaling, None)
    cu = torch.tensor([0, 90], dtype=torch.int32)
    mass = reference.block_mass(query[0].transpose(0, 1), key[0].transpose(0, 1), cu, BLOCK, BLOCK, scaling)
    visible = (torch.arange(6, dtype=torch.int32) + 1)[None]
    log_mass = torch.where(mass > 0, mass.log(), torch.full_like(mass, float("-inf")))
    expected = reference.select_blocks(log_mass, visible, 0.8, 1, 6, 1, 1)
    assert torch.equal(indices, expected[0]) and torch.equal(counts, expected[1])
    chosen = kernels.prefill_block_mask(indices, counts, 6)
    assert float((mass * chosen).sum(-1).min()) >= 0.8 - 1e-5


def test_oracle_recall_in_the_model_is_at_least_top_p():
    model = tiny_llama()
    handle = attach_method(model, baselines.OracleTopP(0.7, BLOCK), measure_recall=True)
    dense_logits(model, tokens(1, 120, seed=13))
    assert handle.stats.recall() >= 0.7 - 1e-4
    assert handle.stats.fraction_read() < 1.0


def test_quest_bound_is_an_upper_bound():
    generator = torch.Generator().manual_seed(14)
    query = torch.randn(1, 4, 40, 64, generator=generator)
    key = torch.randn(1, 2, 40, 64, generator=generator)
    low, high = baselines.QuestTopK(4, BLOCK)._bounds(key)
    q = query.repeat(1, 1, 1, 1)
    bound = (torch.matmul(q.clamp(min=0), high.repeat_interleave(2, 1).transpose(-1, -2))
             + torch.matmul(q.clamp(max=0), low.repeat_interleave(2, 1).transpose(-1, -2)))
    exact = torch.matmul(q, key.repeat_interleave(2, 1).transpose(-1, -2))  # [1, 4, 40, 40]
    for block in range(3):
        tokens_of_block = slice(block * BLOCK, min((block + 1) * BLOCK, 40))
        assert (bound[..., block] >= exact[..., tokens_of_block].amax(-1) - 1e-5).all()


def test_quest_keeps_exactly_k_blocks():
    generator = torch.Generator().manual_seed(15)
    query = torch.randn(2, 6, 130, 64, generator=generator)
    key = torch.randn(2, 2, 130, 64, generator=generator)
    indices, counts = baselines.QuestTopK(3, BLOCK).select_prefill(0, query, key, 0.125, None)
    expected = torch.clamp(torch.arange(1, 10), max=3).int()
    assert torch.equal(counts, expected.expand_as(counts))
    assert (indices[..., 0][..., 1:] == 0).all()  # the sink is always kept


def test_twilight_estimates_mass_from_quantised_keys():
    generator = torch.Generator().manual_seed(16)
    key = torch.randn(1, 2, 50, 64, generator=generator)
    method = baselines.TwilightTopP(0.9, BLOCK)
    quantised = method.quantised_keys(key)
    codes, scales = reference.pack_kcache(key, "int4")
    torch.testing.assert_close(quantised, reference.unpack_kcache(codes, scales, "int4"))
    assert 0 < (quantised - key).abs().max() < 0.3


def test_query_block_mass_matches_reference_last_row():
    generator = torch.Generator().manual_seed(17)
    query = torch.randn(2, 6, 45, 64, generator=generator)
    key = torch.randn(2, 2, 45, 64, generator=generator)
    got = baselines.query_block_mass(query[:, :, -1:], key, BLOCK, 0.125)
    mass = kernels.block_mass_torch(query, key, 1, BLOCK, 0.125)
    torch.testing.assert_close(got, mass[:, :, -1], atol=1e-6, rtol=1e-5)


def test_compare_logits_against_direct_computation():
    model = tiny_llama()
    ids = tokens(1, 60, seed=18)
    dense = perplexity.final_hidden_states(model, ids)
    noisy = dense + 0.05 * torch.randn(dense.shape, generator=torch.Generator().manual_seed(19))
    result = perplexity.compare_logits(model, dense, noisy, ids, chunk=7)
    head = model.get_output_embeddings()
    dense_log = torch.log_softmax(head(dense)[0, :-1], -1)
    noisy_log = torch.log_softmax(head(noisy)[0, :-1], -1)
    targets = ids[0, 1:]
    assert result.tokens == 59
    assert result.ppl_dense == pytest.approx(math.exp(-dense_log.gather(1, targets[:, None]).mean().item()), rel=1e-5)
    assert result.ppl_sparse == pytest.approx(math.exp(-noisy_log.gather(1, targets[:, None]).mean().item()), rel=1e-5)
    assert result.top1_agree == pytest.approx((dense_log.argmax(-1) == noisy_log.argmax(-1)).float().mean().item())
    kl = (dense_log.exp() * (dense_log - noisy_log)).sum(-1).mean().item()
    assert result.kl_mean == pytest.approx(kl, rel=1e-4) and kl > 0
    same = perplexity.compare_logits(model, dense, dense, ids)
    assert same.top1_agree == 1.0 and abs(same.kl_mean) < 1e-6 and same.ppl_delta_pct == pytest.approx(0.0)
    # The logits the full model returns are the ones rebuilt from the hidden states.
    torch.testing.assert_close(head(dense), dense_logits(model, ids))


def test_run_eval_rows_and_report(tmp_path):
    model = tiny_llama()
    selectors = ProjectionSelectors(model.config, [0, 1], top_p=0.8, k_min=1)
    handle = hf.attach(model, selectors, measure_recall=True)
    documents = [harness.Document(f"doc{i}", tokens(1, 200 + 50 * i, seed=20 + i)[0]) for i in range(3)]
    methods = harness.learned_methods(selectors, top_p_sweep=(0.5, 1.0)) + baselines.baseline_methods(
        BLOCK, {"oracle": [0.9], "quest": [2], "twilight": [0.9], "streaming": [1, 3]})
    result = harness.run_eval(model, handle, documents, [96, 260], methods, docs_per_length=2, progress=False)
    rows = {(row["method"], str(row["budget"]), row["L"]): row for row in result["rows"]}
    assert len(rows) == (len(methods) + 1) * 2  # one dense reference row per length
    for length in (96, 260):
        dense = rows[("dense", "None", length)]
        assert dense["ppl"] == rows[("spot", "calibrated", length)]["ppl_dense"] and dense["ppl_delta_pct"] == 0.0
    assert rows[("spot", "calibrated", 96)]["documents"] == 2 and rows[("spot", "calibrated", 260)]["documents"] == 1
    assert [doc["name"] for doc in result["documents"]] == ["doc0", "doc1", "doc2"]
    assert result["dense_layers"] == [2]
    full = rows[("spot", "1.0", 260)]
    assert full["frac_read"] == pytest.approx(1.0) and full["ppl_delta_pct"] == pytest.approx(0.0, abs=1e-3)
    assert full["top1_agree"] == 1.0 and full["recall"] == pytest.approx(1.0, abs=1e-5)
    narrow, wide = rows[("streaming", "1", 260)], rows[("streaming", "3", 260)]
    blocks = reference.num_blocks(260, BLOCK)
    visible = sum(i + 1 for i in range(blocks))
    # Two of three layers stream (sink + window), the third is dense.
    expected = (2 * sum(min(i + 1, 2) for i in range(blocks)) + visible) / (3 * visible)
    assert narrow["frac_read"] == pytest.approx(expected)
    assert narrow["frac_read"] < wide["frac_read"] < 1.0
    assert narrow["recall"] < wide["recall"] < 1.0
    for row in result["rows"]:
        assert row["ppl"] > 1 and 0 <= row["top1_agree"] <= 1 and row["kl"] >= -1e-6
    paths = report.write(result, str(tmp_path / "eval.json"))
    loaded = json.loads(open(paths["json"]).read())
    assert len(loaded["rows"]) == len(result["rows"])
    table = open(paths["markdown"]).read()
    assert "| 260 | streaming | 1 |" in table and "doc2" in table
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_harness_runs_every_method_at_block_64():
    model = tiny_llama(heads_q=8, heads_kv=2, head_dim=64).to("cuda", torch.bfloat16)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], rank=64, block_size=64, top_p=0.9, k_min=2)
    for selector in selectors.layers.values():
        selector.to("cuda")
    methods = harness.learned_methods(selectors, top_p_sweep=(1.0,)) + baselines.baseline_methods(64)
    handle = hf.attach(model, method=methods[0], measure_recall=True)
    documents = [harness.Document(f"doc{i}", tokens(1, 1100, seed=40 + i)[0]) for i in range(2)]
    result = harness.run_eval(model, handle, documents, [1024], methods, docs_per_length=2, progress=False)
    assert len(result["rows"]) == len(methods) + 1  # one dense reference row for the one length
    dense = next(row for row in result["rows"] if row["method"] == "dense")
    full = next(row for row in result["rows"] if row["method"] == "spot" and row["budget"] == 1.0)
    assert dense["ppl"] == full["ppl_dense"] and dense["ppl_delta_pct"] == 0.0
    assert full["frac_read"] == pytest.approx(1.0) and full["top1_agree"] > 0.97
    for row in result["rows"]:
        assert 0 < row["frac_read"] <= 1 and 0 <= row["recall"] <= 1 + 1e-4 and math.isfinite(row["ppl"])
