"""The transformers integration: sparse prefill/decode through the "spot" attention function,
SpotCache and its selector K-cache, the masked backend, the dense switch, hybrid models."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import spot_attention  # noqa: E402
from spot_attention import reference  # noqa: E402
from spot_attention.integrations import hf, kernels  # noqa: E402

BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread avoids paying thread hand-offs on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# A selector with the LayerSelector interface: fixed random projections (so the tests exercise
# the integration without depending on training).
# --------------------------------------------------------------------------------------------


class ProjectionSelector(nn.Module):
    def __init__(self, heads_q, heads_kv, head_dim, rank, block_size, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.heads_kv = heads_kv
        self.group = heads_q // heads_kv
        self.block_size = block_size
        self.query_projection = nn.Parameter(torch.randn(heads_kv, head_dim, rank, generator=generator) / head_dim**0.5)
        self.key_projection = nn.Parameter(torch.randn(heads_kv, head_dim, rank, generator=generator) / head_dim**0.5)

    def query_features(self, query):  # [B, Hq, L, d] -> [B, Hkv, L, r]
        batch, _, length, dim = query.shape
        grouped = query.float().view(batch, self.heads_kv, self.group, length, dim).mean(2)
        return torch.einsum("bhld,hdr->bhlr", grouped, self.query_projection)

    def pool_query_blocks(self, features):  # [B, Hkv, L, r] -> [B, Hkv, NQ, r]
        length = features.shape[2]
        blocks = reference.num_blocks(length, self.block_size)
        padded = torch.nn.functional.pad(features, (0, 0, 0, blocks * self.block_size - length))
        sums = padded.view(*features.shape[:2], blocks, self.block_size, -1).sum(3)
        sizes = torch.full((blocks,), float(self.block_size))
        sizes[-1] = length - (blocks - 1) * self.block_size
        return sums / sizes[:, None].to(features.device)

    def key_features(self, key):  # [B, Hkv, L, d] -> [B, Hkv, L // block, r]
        complete = key.shape[2] // self.block_size
        pooled = key[:, :, : complete * self.block_size].float()
        pooled = pooled.reshape(*key.shape[:2], complete, self.block_size, -1).mean(3)
        return torch.einsum("bhnd,hdr->bhnr", pooled, self.key_projection)


class ProjectionSelectors:
    def __init__(self, config, layers, rank=32, block_size=BLOCK, **policy):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.layers = {
            index: ProjectionSelector(text.num_attention_heads, text.num_key_value_heads, head_dim, rank, block_size,
                                      index)
            for index in layers
        }
        settings = dict(block_size=block_size, top_p=1.0, k_min=1, k_max=1 << 20, sink_blocks=1, local_blocks=1,
                        kcache_format="int4")
        settings.update(policy)
        self.config = types.SimpleNamespace(**settings)

    def __getitem__(self, index):
        return self.layers[index]


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------


def tiny_llama(heads_q=6, heads_kv=2, head_dim=64, layers=3):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=heads_q * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads_q, num_key_value_heads=heads_kv, head_dim=head_dim, max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_qwen3():
    config = transformers.Qwen3Config(
        vocab_size=97, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=512, attn_implementation="sdpa",
    )
    torch.manual_seed(1)
    return transformers.Qwen3ForCausalLM(config).eval()


def tiny_qwen3_next():
    config = transformers.Qwen3NextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_value_heads=2, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(2)
    return transformers.Qwen3NextForCausalLM(config).eval()


def tokens(batch, length, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Fallback kernels against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p,k_min,k_max,sink,local", [(0.9, 1, 6, 1, 1), (0.5, 3, 4, 2, 1), (1.0, 0, 9, 0, 2),
                                                          (0.0, 2, 3, 1, 0)])
def test_select_blocks_torch_matches_reference(top_p, k_min, k_max, sink, local):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 5, 9, generator=generator) * 2
    scores[0, 1, 2] = 0.5  # ties everywhere in one row
    scores[1, 0, 3, :4] = float("-inf")
    num_visible = torch.tensor([[9, 4, 1, 7, 0], [3, 9, 9, 5, 2]], dtype=torch.int32)
    expected = reference.select_blocks(scores, num_visible, top_p, k_min, k_max, sink, local)
    got = kernels.select_blocks_torch(scores, num_visible, top_p, k_min, k_max, sink, local)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("length,group,block_q", [(37, 1, 16), (50, 3, 1), (16, 3, 16), (9, 2, 16)])
def test_block_mass_torch_matches_reference(length, group, block_q):
    generator = torch.Generator().manual_seed(4)
    heads_kv, dim = 2, 32
    query = torch.randn(2, heads_kv * group, length, dim, generator=generator)
    key = torch.randn(2, heads_kv, length, dim, generator=generator)
    got = kernels.block_mass_torch(query, key, block_q, BLOCK, dim**-0.5, chunk_rows=32)
    packed_q = query.transpose(1, 2).reshape(-1, heads_kv * group, dim)
    packed_k = key.transpose(1, 2).reshape(-1, heads_kv, dim)
    cu = torch.tensor([0, length, 2 * length], dtype=torch.int32)
    expected = reference.block_mass(packed_q, packed_k, cu, block_q, BLOCK, dim**-0.5)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def random_selection(batch, heads_kv, num_q, num_k, k_max, generator):
    scores = torch.randn(batch, heads_kv, num_q, num_k, generator=generator)
    visible = (torch.arange(num_q, dtype=torch.int32) + 1)[None].expand(batch, -1).contiguous()
    return reference.select_blocks(scores, visible, 0.6, 1, k_max, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,group,dim", [(45, 3, 64), (16, 1, 32), (7, 8, 64), (70, 2, 128)])
def test_masked_prefill_matches_reference(length, group, dim, dtype):
    generator = torch.Generator().manual_seed(5)
    batch, heads_kv = 2, 2
    query = torch.randn(batch, heads_kv * group, length, dim, generator=generator).to(dtype)
    key = torch.randn(batch, heads_kv, length, dim, generator=generator).to(dtype)
    value = torch.randn(batch, heads_kv, length, dim, generator=generator).to(dtype)
    blocks = reference.num_blocks(length, BLOCK)
    indices, counts = random_selection(batch, heads_kv, blocks, blocks, 2, generator)
    mask = kernels.prefill_block_mask(indices, counts, blocks)
    got = kernels.masked_prefill(query, key, value, mask, BLOCK, dim**-0.5, chunk_rows=BLOCK)
    cu = torch.tensor([0, length, 2 * length], dtype=torch.int32)
    expected, _ = reference.sparse_prefill(
        query.transpose(1, 2).reshape(-1, heads_kv * group, dim), key.transpose(1, 2).reshape(-1, heads_kv, dim),
        value.transpose(1, 2).reshape(-1, heads_kv, dim), cu, indices, counts, BLOCK, dim**-0.5)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.reshape(-1, heads_kv * group, dim).float(), expected.float(), atol=tolerance,
                               rtol=tolerance)


@pytest.mark.parametrize("length,group", [(45, 3), (5, 8), (64, 1)])
def test_masked_decode_matches_reference(length, group):
    generator = torch.Generator().manual_seed(6)
    batch, heads_kv, dim = 2, 2, 64
    query = torch.randn(batch, heads_kv * group, 1, dim, generator=generator)
    key = torch.randn(batch, heads_kv, length, dim, generator=generator)
    value = torch.randn(batch, heads_kv, length, dim, generator=generator)
    blocks = reference.num_blocks(length, BLOCK)
    scores = torch.randn(batch, heads_kv, 1, blocks, generator=generator)
    indices, counts = reference.select_blocks(scores, torch.full((batch, 1), blocks, dtype=torch.int32), 0.5, 1,
                                              blocks, 1, 1)
    indices, counts = indices[:, :, 0], counts[:, :, 0]
    mask = kernels.block_mask_from_indices(indices, counts, blocks)
    got = kernels.masked_decode(query, key, value, mask, BLOCK, dim**-0.5)
    expected, _ = reference.sparse_decode(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), None,
                                          torch.full((batch,), length, dtype=torch.int32), indices, counts, BLOCK,
                                          dim**-0.5)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["dense", "int4", "mxfp4", "nvfp4"])
def test_selector_key_store_appends_match_packing(fmt):
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 3, 21, 64, generator=generator)
    store = hf.SelectorKeyStore(fmt, BLOCK)
    store.append(features[:, :, :5])
    for index in range(5, 21):  # one block at a time, through the capacity growth
        store.append(features[:, :, index : index + 1])
    assert store.num_blocks == 21 and store.capacity >= 21
    stored = store.dense_view()
    if fmt == "dense":
        torch.testing.assert_close(stored, features)
    else:
        codes, scales = reference.pack_kcache(features, fmt, store.global_scale)
        expected = reference.unpack_kcache(codes, scales, fmt, store.global_scale)
        torch.testing.assert_close(stored, expected)
        assert (stored - features).abs().max() < 0.5 * features.abs().max()
        assert store.nbytes() * 3 < features.numel() * 2  # well under bf16's size
    store.truncate(4)
    assert store.num_blocks == 4


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def dense_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3, "qwen3_next": tiny_qwen3_next}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_blocks_selected_equals_dense(name):
    model = MODELS[name]()
    ids = tokens(2, 53)
    expected = dense_logits(model, ids)
    selectors = ProjectionSelectors(model.config, hf.full_attention_layers(model.config), top_p=1.0)
    handle = hf.attach(model, selectors)
    assert model.config._attn_implementation == "spot"
    got = dense_logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert handle.stats.fraction_read() == pytest.approx(1.0)
    for index in handle.layers:
        assert handle.stats.layers[index].prefill_calls == 1
    hf.detach(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(dense_logits(model, ids), expected, atol=0, rtol=0)


def test_hybrid_attaches_full_attention_layers_only():
    model = tiny_qwen3_next()
    selectors = ProjectionSelectors(model.config, [1, 3])
    handle = hf.attach(model, selectors)
    assert handle.layers == [1, 3]
    layers = hf.decoder_layers(model)
    assert not hasattr(layers[0], "self_attn") and layers[0].linear_attn is not None
    assert all(getattr(layers[i].self_attn, "spot_layer_idx", None) == i for i in (1, 3))
    hf.detach(model)
    with pytest.raises(ValueError, match="argument 'layers'"):
        hf.attach(model, selectors, layers=[0, 1])


def test_small_budget_is_sparse_and_dense_switch_restores():
    model = tiny_llama()
    ids = tokens(1, 90, seed=1)
    expected = dense_logits(model, ids)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=0.0, k_min=0, k_max=2)
    handle = hf.attach(model, selectors)
    sparse = dense_logits(model, ids)
    blocks = reference.num_blocks(90, BLOCK)
    # Each query block reads at most 2 blocks (sink + diagonal) of the i + 1 it sees.
    expected_fraction = sum(min(i + 1, 2) for i in range(blocks)) / sum(i + 1 for i in range(blocks))
    assert handle.stats.fraction_read() == pytest.approx(expected_fraction)
    assert (sparse - expected).abs().max() > 1e-3  # really sparse
    # The first two blocks see at most two blocks: identical to dense there.
    torch.testing.assert_close(sparse[:, : 2 * BLOCK], expected[:, : 2 * BLOCK], atol=1e-4, rtol=1e-4)
    with handle.dense():
        torch.testing.assert_close(dense_logits(model, ids), expected, atol=0, rtol=0)
    handle.enabled = False
    torch.testing.assert_close(dense_logits(model, ids), expected, atol=0, rtol=0)
    handle.enabled = True
    torch.testing.assert_close(dense_logits(model, ids), sparse, atol=1e-5, rtol=1e-5)


def test_sparse_layer_output_matches_reference_sparse_prefill():
    model = tiny_llama(layers=1)
    ids = tokens(2, 75, seed=2)
    selectors = ProjectionSelectors(model.config, [0], top_p=0.5, k_min=1, k_max=3)
    method = hf.LearnedSelection(selectors)
    captured = {}
    handle = hf.attach(model, method=method)
    original = handle.attend

    def recording_attend(module, query, key, value, mask, scaling, **kwargs):
        output, weights = original(module, query, key, value, mask, scaling, **kwargs)
        captured.update(query=query, key=key, value=value, scaling=scaling, output=output)
        return output, weights

    handle.attend = recording_attend
    dense_logits(model, ids)
    q, k, v = captured["query"], captured["key"], captured["value"]
    indices, counts = method.select_prefill(0, q, k, captured["scaling"], None)
    read = kernels.prefill_block_mask(indices, counts, 5).sum(-1)  # [B, Hkv, NQ]
    assert (read < torch.arange(1, 6)).any() and (read <= 4).all()  # sparse: at most 3 chosen + the diagonal
    assert int(counts.min()) >= 1 and int(counts.max()) <= 3
    heads_q, heads_kv, dim = q.shape[1], k.shape[1], q.shape[-1]
    cu = torch.tensor([0, 75, 150], dtype=torch.int32)
    expected, _ = reference.sparse_prefill(q.transpose(1, 2).reshape(-1, heads_q, dim),
                                           k.transpose(1, 2).reshape(-1, heads_kv, dim),
                                           v.transpose(1, 2).reshape(-1, heads_kv, dim), cu, indices, counts, BLOCK,
                                           captured["scaling"])
    # The layer's attention output [B, L, Hq, d] is the reference's on the same choices.
    torch.testing.assert_close(captured["output"].reshape(-1, heads_q, dim), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_with_all_blocks_matches_dense(name):
    model = MODELS[name]()
    ids = tokens(2, 40, seed=3)
    expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    selectors = ProjectionSelectors(model.config, hf.full_attention_layers(model.config), top_p=1.0)
    handle = hf.attach(model, selectors)
    got = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, expected)
    for index in handle.layers:
        budget = handle.stats.layers[index]
        assert budget.prefill_calls == 1 and budget.decode_calls == 29 and budget.dense_calls == 0
    assert handle.stats.fraction_read() == pytest.approx(1.0)


def test_spot_cache_keeps_selector_keys_per_complete_block():
    model = tiny_llama()
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=0.7, k_min=1, k_max=3, kcache_format="int4")
    hf.attach(model, selectors)
    ids = tokens(1, 40, seed=4)
    cache = hf.SpotCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
        for step in range(30):  # crosses the block boundaries at 48 and 64
            out = model(next_token, past_key_values=cache, use_cache=True)
            next_token = out.logits[:, -1:].argmax(-1)
    length = 40 + 30
    for index in (0, 1, 2):
        store = cache.selector_keys[index]
        assert store.num_blocks == length // BLOCK
        key = cache.layers[index].keys
        expected = selectors[index].key_features(key).detach()
        torch.testing.assert_close(store.dense_view(), expected, atol=0.2 * float(expected.abs().max()), rtol=0)
        assert store.format == "int4"


def test_decode_selection_reads_only_chosen_blocks():
    """Decode with a tight budget equals attention restricted to the blocks decode_select chose."""
    model = tiny_llama(layers=1)
    selectors = ProjectionSelectors(model.config, [0], top_p=0.3, k_min=1, k_max=2, kcache_format="dense")
    handle = hf.attach(model, selectors)
    ids = tokens(1, 70, seed=5)
    cache = hf.SpotCache(config=model.config)
    captured = {}
    original = handle.attend

    def recording_attend(module, query, key, value, mask, scaling, **kwargs):
        output, weights = original(module, query, key, value, mask, scaling, **kwargs)
        captured.update(query=query, key=key, value=value, scaling=scaling, output=output)
        return output, weights

    handle.attend = recording_attend
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(tokens(1, 1, seed=6), past_key_values=cache, use_cache=True)
    q, k, v = captured["query"], captured["key"], captured["value"]
    assert q.shape[2] == 1 and k.shape[2] == 71
    selector = selectors[0]
    indices, counts = reference.decode_select(
        selector.query_features(q)[:, :, -1], selector.key_features(k), torch.tensor([71], dtype=torch.int32), BLOCK,
        32**-0.5, 0.3, 1, 2, 1, 1)
    expected, _ = reference.sparse_decode(q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), None,
                                          torch.tensor([71], dtype=torch.int32), indices, counts, BLOCK,
                                          captured["scaling"])
    torch.testing.assert_close(captured["output"][:, 0], expected, atol=1e-5, rtol=1e-5)
    budget = handle.stats.layers[0]
    assert budget.decode_calls == 1 and budget.blocks_read <= 2 * 2 + budget.blocks_visible - 5 * 2


def test_padded_batch_uses_masked_backend_and_matches_dense():
    model = tiny_llama()
    ids = tokens(2, 37, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    expected = dense_logits(model, ids, attention_mask=mask)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=1.0)
    hf.attach(model, selectors)
    got = dense_logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(got[1, 9:], expected[1, 9:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)


def test_masked_backend_is_reported_and_exact():
    model = tiny_llama()
    ids = tokens(1, 50, seed=8)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=0.6, k_min=1, k_max=3)
    handle = hf.attach(model, selectors, backend="masked")
    masked = dense_logits(model, ids)
    report = handle.report()
    assert report["backend"] == "masked" and "select_blocks/cpu" in report["ops"]
    hf.detach(model)
    handle = hf.attach(model, selectors, backend="auto")
    torch.testing.assert_close(dense_logits(model, ids), masked, atol=1e-4, rtol=1e-4)


def test_measure_recall_is_one_with_all_blocks_and_less_when_sparse():
    model = tiny_llama()
    ids = tokens(1, 80, seed=9)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=1.0)
    handle = hf.attach(model, selectors, measure_recall=True)
    dense_logits(model, ids)
    assert handle.stats.recall() == pytest.approx(1.0, abs=1e-5)
    hf.detach(model)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], top_p=0.0, k_min=0, k_max=2)
    handle = hf.attach(model, selectors, measure_recall=True)
    dense_logits(model, ids)
    assert 0.2 < handle.stats.recall() < 0.999


def test_attach_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="argument 'selectors'"):
        hf.attach(model)
    selectors = ProjectionSelectors(model.config, [0, 1, 2])
    with pytest.raises(ValueError, match="argument 'backend'"):
        hf.attach(model, selectors, backend="fast")
    hf.attach(model, selectors)
    with pytest.raises(ValueError, match="argument 'model'"):
        hf.attach(model, selectors)


@pytest.mark.gpu
@pytest.mark.skipif(not spot_attention.cuda_available(), reason="needs CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kcache_format", ["dense", "int4", "nvfp4"])
def test_gpu_kernels_match_masked_backend(dtype, kcache_format):
    """The CUDA kernels (block 64) against the exact masked SDPA backend on the same choices."""
    model = tiny_llama(heads_q=8, heads_kv=2, head_dim=64).to("cuda", dtype)
    ids = tokens(2, 300, seed=10).cuda()
    selectors = ProjectionSelectors(model.config, [0, 1, 2], rank=64, block_size=64, top_p=0.8, k_min=2, k_max=4,
                                    kcache_format=kcache_format)
    for selector in selectors.layers.values():
        selector.to("cuda")
    handle = hf.attach(model, selectors, backend="masked")
    masked = dense_logits(model, ids).float()
    masked_tokens = model.generate(ids, max_new_tokens=80, do_sample=False)  # crosses block 384
    masked_fraction = handle.stats.fraction_read()
    hf.detach(model)
    handle = hf.attach(model, selectors, backend="kernels")
    kernel = dense_logits(model, ids).float()
    ops_used = handle.report()["ops"]
    assert ops_used["sparse_prefill/cuda"] == "kernel", ops_used
    torch.testing.assert_close(kernel, masked, atol=5e-2, rtol=5e-2)
    handle.stats.reset()
    generated = model.generate(ids, max_new_tokens=80, do_sample=False)
    assert handle.report()["ops"]["sparse_decode/cuda"] == "kernel"
    assert (generated == masked_tokens).float().mean() > 0.9
    assert handle.stats.fraction_read() < 1.0 and masked_fraction < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_masked_backend_without_kernels_matches_dense_with_all_blocks():
    model = tiny_llama(heads_q=8, heads_kv=2, head_dim=64).to("cuda", torch.bfloat16)
    ids = tokens(1, 333, seed=12).cuda()
    expected = dense_logits(model, ids).float()
    expected_tokens = model.generate(ids, max_new_tokens=40, do_sample=False)
    selectors = ProjectionSelectors(model.config, [0, 1, 2], rank=64, block_size=64, top_p=1.0)
    for selector in selectors.layers.values():
        selector.to("cuda")
    hf.attach(model, selectors, backend="masked")
    torch.testing.assert_close(dense_logits(model, ids).float(), expected, atol=3e-2, rtol=3e-2)
    assert (model.generate(ids, max_new_tokens=40, do_sample=False) == expected_tokens).float().mean() > 0.9


# --------------------------------------------------------------------------------------------
# The project's selectors (spot_attention.selector) through the integration
# --------------------------------------------------------------------------------------------


def real_selectors(model, **overrides):
    selector = pytest.importorskip("spot_attention.selector")
    config = selector.SelectorConfig.for_model(model.config, "tiny", block_size=BLOCK, **overrides)
    selectors = selector.SpotSelectors(config)
    ids = tokens(1, 96, seed=30)
    captured = {}
    handle = hf.attach(model, method=hf.LearnedSelection(selectors, top_p=1.0))
    original = handle.attend

    def capture(module, query, key, value, mask, scaling, **kwargs):
        captured[module.spot_layer_idx] = (query, key)
        return original(module, query, key, value, mask, scaling, **kwargs)

    handle.attend = capture
    dense_logits(model, ids)
    hf.detach(model)
    for layer, (query, key) in captured.items():
        selectors[layer].init_statistics(query, key)
    return selectors


@pytest.mark.parametrize("name", ["llama", "qwen3_next"])
def test_project_selectors_all_blocks_equal_dense_in_prefill_and_generate(name):
    model = MODELS[name]()
    selectors = real_selectors(model, top_p={layer: 1.0 for layer in hf.full_attention_layers(model.config)},
                               kcache_format="int4")
    ids = tokens(2, 45, seed=31)
    expected_logits = dense_logits(model, ids)
    expected_tokens = model.generate(ids, max_new_tokens=25, do_sample=False)
    handle = hf.attach(model, selectors)
    assert handle.layers == selectors.layers
    torch.testing.assert_close(dense_logits(model, ids), expected_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(ids, max_new_tokens=25, do_sample=False), expected_tokens)
    assert handle.stats.fraction_read() == pytest.approx(1.0)


def test_project_selectors_calibrated_budget_is_sparse_and_uses_packed_cache():
    model = tiny_llama()
    selectors = real_selectors(model, top_p={0: 0.6, 1: 0.6, 2: 0.6}, k_min=1, kcache_format="mxfp4")
    handle = hf.attach(model, selectors)
    ids = tokens(1, 100, seed=32)
    cache = hf.SpotCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(30):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert 0.0 < handle.stats.fraction_read() < 1.0
    for layer in selectors.layers:
        store = cache.selector_keys[layer]
        assert store.format == "mxfp4" and store.num_blocks == 130 // BLOCK
        expected = selectors[layer].key_features(cache.layers[layer].keys).detach()
        scale = float(expected.abs().amax())
        assert float((store.dense_view() - expected).abs().max()) < 0.35 * scale
        assert handle.stats.layers[layer].decode_calls == 30
