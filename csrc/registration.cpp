// The table of contents of the spot_ops extension: every op's schema, and the entry that serves
// it. Each entry (csrc/<op>.cpp) validates its inputs once and then runs the CPU reference kernel
// (csrc/<op>_cpu.cpp) or the CUDA launcher (csrc/<op>_cuda.cu) by the inputs' device, so the same
// function is registered for both dispatch keys. Fake (meta) kernels live in
// python/spot_attention/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(spot, m) {
  // query [B, Hkv, NQ, r] x pooled keys [B, Hkv, NK, r] (or packed 4-bit + scales) -> fp32 logits.
  m.def("selector_score(Tensor query, Tensor keys, Tensor? key_scales, Tensor num_visible, str format, "
        "float global_scale, float softmax_scale) -> Tensor");
  // fp32 logits [B, H, NQ, NK] -> (int32 block indices [B, H, NQ, k_max], int32 counts [B, H, NQ]).
  m.def("select_blocks(Tensor scores, Tensor num_visible, float top_p, int k_min, int k_max, "
        "int sink_blocks, int local_blocks) -> (Tensor, Tensor)");
  // decode fused: selector query [B, Hkv, r] against the (packed) selector K-cache, then dual
  // top-p; blocks [0, seq_len / block_size) are scored, [0, ceil(seq_len / block_size)) visible.
  m.def("decode_select(Tensor query, Tensor keys, Tensor? key_scales, Tensor seq_lens, int block_size, "
        "str format, float global_scale, float softmax_scale, float top_p, int k_min, int k_max, "
        "int sink_blocks, int local_blocks) -> (Tensor, Tensor)");
  // query [B, Hq, d] over chosen blocks of a contiguous or paged KV cache -> (out, fp32 lse).
  m.def("sparse_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor? block_table, "
        "Tensor seq_lens, Tensor block_indices, Tensor block_counts, int block_size, "
        "float softmax_scale) -> (Tensor, Tensor)");
  // packed varlen causal attention, each query block over its chosen key blocks -> (out, fp32 lse).
  m.def("sparse_prefill(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens, int max_seqlen, "
        "Tensor block_indices, Tensor block_counts, int block_size, float softmax_scale) "
        "-> (Tensor, Tensor)");
  // teacher: exact causal attention mass per (query block, key block), GQA-group averaged.
  m.def("block_mass(Tensor query, Tensor key, Tensor cu_seqlens, int max_seqlen, int block_size_q, "
        "int block_size_k, float softmax_scale) -> Tensor");
  // keys [..., r] -> (uint8 codes [..., r/2], scales [..., r/group]) in int4 | mxfp4 | nvfp4.
  m.def("pack_kcache(Tensor keys, str format, float global_scale) -> (Tensor, Tensor)");
  m.def("unpack_kcache(Tensor codes, Tensor scales, str format, float global_scale) -> Tensor");
  // packs keys [B, Hkv, r] into block slot slots[b] of a packed cache [B, Hkv, NK, ...], in place.
  m.def("append_kcache(Tensor(a!) codes, Tensor(b!) scales, Tensor keys, Tensor slots, str format, "
        "float global_scale) -> ()");
}

#define SPOT_REGISTER_ALL(m)                          \
  m.impl("selector_score", &spot::selector_score);   \
  m.impl("select_blocks", &spot::select_blocks);     \
  m.impl("decode_select", &spot::decode_select);     \
  m.impl("sparse_decode", &spot::sparse_decode);     \
  m.impl("sparse_prefill", &spot::sparse_prefill);   \
  m.impl("block_mass", &spot::block_mass);           \
  m.impl("pack_kcache", &spot::pack_kcache);         \
  m.impl("unpack_kcache", &spot::unpack_kcache);     \
  m.impl("append_kcache", &spot::append_kcache);

TORCH_LIBRARY_IMPL(spot, CPU, m) { SPOT_REGISTER_ALL(m) }

#ifdef SPOT_WITH_CUDA
TORCH_LIBRARY_IMPL(spot, CUDA, m) { SPOT_REGISTER_ALL(m) }
#endif

// The extension is imported as a Python module only to run the registrations above.
PyMODINIT_FUNC PyInit_spot_ops(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "spot_ops", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
