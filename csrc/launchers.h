// CPU kernels and CUDA launchers, one pair per op: what an op entry calls once its params are
// filled. CUDA launchers run on the current stream and check their launches.
#pragma once

#include "spot/params.h"

namespace spot {

void selector_score_cpu(const SelectorScoreParams& params);
void select_blocks_cpu(const SelectBlocksParams& params);
void decode_select_cpu(const DecodeSelectParams& params);
void sparse_decode_cpu(const SparseDecodeParams& params);
void sparse_prefill_cpu(const SparsePrefillParams& params);
void block_mass_cpu(const BlockMassParams& params);
void pack_kcache_cpu(const KCachePackParams& params);
void unpack_kcache_cpu(const KCachePackParams& params);
void append_kcache_cpu(const KCachePackParams& params);

#ifdef SPOT_WITH_CUDA
void selector_score_cuda(const SelectorScoreParams& params);
void select_blocks_cuda(const SelectBlocksParams& params);
void decode_select_cuda(const DecodeSelectParams& params);
// Largest num_key_blocks the CUDA selection kernels hold in shared memory.
int select_blocks_cuda_max_key_blocks();
// Split-KV planning: sets num_splits and merge_in_cluster, so the entry can size the workspace.
void plan_sparse_decode(SparseDecodeParams& params);
void sparse_decode_cuda(const SparseDecodeParams& params);
// Picks the implementation (SPOT_PREFILL_IMPL: unset/auto, mma, wgmma) and runs it.
void sparse_prefill_cuda(const SparsePrefillParams& params);
// Portable tensor-core kernel (mma.sync, sm_80+): head_dim 64/128, block_size 64/128.
void sparse_prefill_mma_cuda(const SparsePrefillParams& params);
// Hopper kernel (wgmma + TMA) and whether it can run this call on the current device.
void sparse_prefill_sm90_cuda(const SparsePrefillParams& params);
bool sparse_prefill_sm90_supported(const SparsePrefillParams& params);
void block_mass_cuda(const BlockMassParams& params);
void pack_kcache_cuda(const KCachePackParams& params);
void unpack_kcache_cuda(const KCachePackParams& params);
void append_kcache_cuda(const KCachePackParams& params);
#endif

}  // namespace spot
