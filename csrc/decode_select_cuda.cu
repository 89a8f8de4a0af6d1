// CUDA launcher of spot.decode_select: one CTA (512 threads) per (sequence, KV head). The CTA
// scores its query against the cached selector keys of the sequence's complete blocks (one
// thread per key block, the fp32 fma chain of selector_score, packed keys decoded in registers
// straight from the 4-bit cache), keeps the logits and their float64 probabilities in shared
// memory, then picks the blocks by the dual top-p rule. No host syncs, no allocation: the launch
// can be captured in a CUDA graph.
//
// Selection. Decode rows are few (batch x KV heads) and wide (one logit per cached block), so a
// search that walks the row once per bit of the threshold (spot/select_row.cuh) is mostly
// barriers: it cost ~100 us at 128K tokens. But only the E = min(k_max - forced, candidates) best
// candidates can ever be chosen: the top-p cut falls among them, or the clamp to k_max applies.
// So the CTA finds the E-th largest order key by a 4-pass count radix select (8-bit digits,
// shared-memory histograms), gathers those E candidates (ties at the threshold lowest index
// first), orders them by counting (the reference's (-probability, index) order) and scans their
// masses once; a row (or cluster chunk) of at most 512 blocks instead sorts its blocks, one per
// thread, by a bitonic sort. Masses are summed as 2^-62 fixed point, so every prefix is exact and
// monotone and the cut is the first prefix reaching top_p, like the reference's running sum.
// Rows whose E exceeds kMaxTop take the threshold search.
//
// Measured (H200, int4 keys, r = 64, 8 rows, k_max = 64; bench/decode_tune.py --select-probe,
// bench/results/decode_select_probe_h200.json): 9.1 us at 512 blocks (one CTA a row), 13.0 us at
// 2048, 20.9 us at 8192; dense fp32 keys 15.9 us at 2048. One CTA a row took 23 and 65 us at 2048
// and 8192 blocks; scoring over a cluster, 18 and 42; scoring and selecting over it, 15.4 and
// 21.4; the bitonic sort of 512-block chunks then took 2048 blocks to 13.0 (and 512 from 11.2 to
// 9.1). What is left is latency: a few dozen barrier-separated steps (ncu at 2048 blocks before
// the sort: no step above ~20% of the stall samples). Joining the cluster's softmax in one
// exchange (each CTA's max and its sum of exp(logit - that max), then one rescale per
// probability) measured slower, not faster: 13.9 us at 2048 blocks and 15.6 us per layer in the
// decode step against 14.8 (H200). Neither did two latency cuts change anything measurable:
// prefetching each thread's key row into L1 before reading the query, and the forced mass summed
// by one warp without a barrier (13.07 us at 2048 blocks, 14.7 per layer against 14.9).
// Nor did a cluster path of one cluster exchange instead of three (each warp sorts its 32 blocks
// by shuffles, each block finds its place in its CTA by binary searches of the other warps'
// lists, the first CTA merges the CTAs' lists and joins the softmax from each CTA's max and sum):
// 16.9 us per layer against 15.2 for this path, both launched as dependents, in one run (H200,
// 128K tokens, B = 1, 4-layer graphs); with data-dependent search loops it had taken 18.5 in an
// earlier run. Launching the kernel as a dependent of the previous one (its CTAs wait, resident,
// for that grid's outputs) took B = 1 from 15.8 to 15.2 us per layer, and the step from 28.8 to
// 28.3 (Qwen3-8B shapes; SmolLM2 shapes 24.1 to 23.5; the two builds in consecutive runs; in one
// run, the warp-list path went from 19.0 to 18.5 with it; bench/results/decode_select_variants_h200.md).
// Where the time goes (per-CTA %globaltimer traces of an instrumented build, never committed;
// 4-layer graph of the decode step, B = 1, 4-CTA clusters, a steady-state layer), from the
// wait's return: query in shared memory 0.9 us; scoring 2.2; CTA max 0.8; first cluster barrier
// 0.55; exp, sum, second cluster barrier and division 1.95; bitonic sort 2.5; forced mass 0.55;
// third cluster barrier 0.57; the first CTA's merge of the 4 lists 2.0; the cut and the output
// 1.6 (13.6 us). From the selection's end to the next layer's wait return (sparse_decode and the
// launches): 12.5 us (bench/results/decode_select_trace_h200.txt). Two cuts aimed at that trace
// measured slower (one run, B = 1, Qwen3-8B shapes; bench/results/decode_b1_latency_h200.md):
// the merge of the lists by fixed-step branchless searches, unrolled over the ranks, 16.5 us per
// layer against 15.3; with each thread's first packed key row also loaded before the wait for the
// query, 16.8; and 8 CTAs a row, 17.3.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include "cuda_device.h"
#include "launchers.h"
#include "spot/cuda/dependent_launch.cuh"
#include "spot/dispatch.h"
#include "spot/select_row.cuh"
#include "spot/selector_keys.h"

namespace spot {

namespace {

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxTop = 2 * kThreads;  // most candidates the top-E selection orders
constexpr double kMassScale = 0x1p62;  // fixed-point unit of the masses: sums of <= 1 fit in 64 bits

// Key blocks scored for this sequence: the complete ones that have a cached key.
struct DecodeRow {
  int scored;
  int visible;
};

__device__ DecodeRow decode_row(const DecodeSelectParams& params, int b) {
  const int length = max(params.seq_lens[b], 0);
  const int complete = length / params.block_size;
  return {min(complete, params.num_key_blocks), complete + (length % params.block_size != 0 ? 1 : 0)};
}

// ------------------------------------------------------------------------------------------
// Scoring
// ------------------------------------------------------------------------------------------

// query . key * softmax_scale for a dense key row, one fma per element in dim order. Rows whose
// bytes are whole 16-byte chunks are read a chunk at a time: element by element, each thread
// walking its own row makes every warp load touch 32 rows (82 us instead of 22 at 2048 blocks).
template <typename key_t>
__device__ float score_dense(const float* query, const key_t* key, int dim, float softmax_scale, bool chunked) {
  float acc = 0.f;
  if (chunked) {
    constexpr int kPerChunk = 16 / sizeof(key_t);
    for (int first = 0; first < dim; first += kPerChunk) {
      const uint4 chunk = __ldg(reinterpret_cast<const uint4*>(key + first));
      key_t values[kPerChunk];
      memcpy(values, &chunk, sizeof(chunk));
#pragma unroll
      for (int i = 0; i < kPerChunk; ++i) acc = __fmaf_rn(query[first + i], to_float(values[i]), acc);
    }
  } else {
    for (int k = 0; k < dim; ++k) acc = __fmaf_rn(query[k], to_float(key[k]), acc);
  }
  return acc * softmax_scale;
}

// Eight values of one code word (inside one group) into the fma chain.
template <KCacheFormat Format>
__device__ __forceinline__ float fma_word(float acc, const float* query, uint32_t word, float block_scale,
                                         float global_scale) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    acc = __fmaf_rn(query[i], packed_key_value<Format>((word >> (4 * i)) & 0xFu, block_scale, global_scale), acc);
  }
  return acc;
}

// The same for a packed row: 16-byte loads of codes (dim / 2 bytes, a multiple of 16), one scale
// per group, values as spot/selector_keys.h defines them.
template <KCacheFormat Format>
__device__ float score_packed(const float* query, const uint8_t* codes, const void* scales, int dim,
                              float global_scale, float softmax_scale) {
  constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
  float acc = 0.f;
  for (int first = 0; first < dim; first += 32) {  // 32 values = 16 bytes
    const uint4 words = __ldg(reinterpret_cast<const uint4*>(codes + first / 2));
    const float scale_low = kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales, first / kGroup));
    const float scale_high =
        kcache::decode_block_scale<Format>(packed_scale_bits<Format>(scales, (first + 16) / kGroup));
    acc = fma_word<Format>(acc, query + first, words.x, scale_low, global_scale);
    acc = fma_word<Format>(acc, query + first + 8, words.y, scale_low, global_scale);
    acc = fma_word<Format>(acc, query + first + 16, words.z, scale_high, global_scale);
    acc = fma_word<Format>(acc, query + first + 24, words.w, scale_high, global_scale);
  }
  return acc * softmax_scale;
}

// ------------------------------------------------------------------------------------------
// Top-E selection
// ------------------------------------------------------------------------------------------

// Candidate blocks in shared memory, entries [first, kMaxTop) of an array of kMaxTop
// probabilities, then kMaxTop order keys, then kMaxTop block indices. One pointer, not three:
// the plain kernel is at its 64-register limit.
struct Candidates {
  unsigned char* base;
  int first;

  __device__ double* prob() const { return reinterpret_cast<double*>(base) + first; }
  __device__ uint32_t* keys() const { return reinterpret_cast<uint32_t*>(base + kMaxTop * sizeof(double)) + first; }
  __device__ int32_t* blocks() const {
    return reinterpret_cast<int32_t*>(base + kMaxTop * (sizeof(double) + sizeof(uint32_t))) + first;
  }
  __device__ Candidates at(int offset) const { return {base, first + offset}; }
};

constexpr size_t kCandidatesBytes = kMaxTop * (sizeof(double) + sizeof(uint32_t) + sizeof(int32_t));

// Shared memory of the selection: the row's logits and probabilities, and room for the top E.
struct SelectShared {
  const float* scores;     // [width] logits of the scored blocks
  double* prob;            // [width]
  Candidates gathered;     // [kMaxTop], the top E as gathered
  Candidates sorted;       // [kMaxTop], by (probability desc, index asc)
  Candidates chunk_lists;  // [kMaxTop], in a cluster's first CTA: each CTA's sorted top E
  double* reduce_scratch;  // kWarps doubles
};

struct TopShared {
  using MassScan = cub::BlockScan<unsigned long long, kThreads>;
  typename MassScan::TempStorage mass_scan;
  uint32_t bins[256];
  uint32_t digit, above;
};

using Selector = select_device::RowSelector<select_device::BlockGroup<kWarps>>;

// The largest order key T with count(candidate keys >= T) >= wanted (0 < wanted <= candidates),
// by four 8-bit digit passes of a count histogram; `above` receives count(keys > T).
__device__ uint32_t kth_largest_key(const Selector& selector, TopShared& top, int wanted, int& above, int begin,
                                   int end) {
  const int lane = threadIdx.x & 31;
  uint32_t prefix = 0;
  int found_above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t resolved = shift == 24 ? 0u : ~((1u << (shift + 8)) - 1u);  // digits already fixed
    for (int i = threadIdx.x; i < 256; i += kThreads) top.bins[i] = 0;
    __syncthreads();
    // Lanes with equal digits add once, through their lowest lane: a warp's keys mostly share
    // their leading digits. (Measured: no change at 2048 blocks against one atomic per key; the
    // kernel's time is in instruction latency, not in these atomics.)
    for (int base = begin; base < end; base += kThreads) {
      const int j = base + int(threadIdx.x);
      int digit = -1;
      if (j < end && selector.is_candidate(j)) {
        const uint32_t key = selector.key(j);
        if (((key ^ prefix) & resolved) == 0) digit = int((key >> shift) & 0xFFu);
      }
      const unsigned peers = __match_any_sync(select_device::kFullMask, digit);
      if (digit >= 0 && lane == __ffs(int(peers)) - 1) atomicAdd(&top.bins[digit], unsigned(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds digits [8l, 8l + 8); the digit sought is the largest d with
      // found_above + count(digits >= d) >= wanted.
      int lane_total = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) lane_total += int(top.bins[lane * 8 + b]);
      int suffix = lane_total;  // lanes >= lane
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_down_sync(select_device::kFullMask, suffix, offset);
        if (lane + offset < 32) suffix += other;
      }
      int running = found_above + suffix - lane_total;  // lanes above this one
      int digit = -1, digit_above = 0;
#pragma unroll
      for (int b = 7; b >= 0; --b) {
        const int bin = int(top.bins[lane * 8 + b]);
        if (digit < 0 && running + bin >= wanted) {
          digit = lane * 8 + b;
          digit_above = running;
        }
        running += bin;
      }
      const unsigned holders = __ballot_sync(select_device::kFullMask, digit >= 0);
      const int winner = 31 - __clz(int(holders));  // holders != 0: wanted <= candidates
      if (lane == winner) {
        top.digit = uint32_t(digit);
        top.above = uint32_t(digit_above);
      }
    }
    __syncthreads();
    prefix |= top.digit << shift;
    found_above = int(top.above);
    __syncthreads();  // the next pass clears the bins and overwrites the broadcast
  }
  above = found_above;
  return prefix;
}

// Where the forced blocks of a row of n visible blocks lie: [0, sink_end) and [local_begin, n).
struct RowShape {
  int n, num_forced, num_candidates, sink_end, local_begin, wanted;
};

__device__ RowShape row_shape(const DecodeRow row, const SelectKnobs knobs) {
  RowShape shape;
  shape.n = max(row.visible, 0);
  shape.num_forced = forced_block_count(shape.n, knobs.sink_blocks, knobs.local_blocks);
  shape.num_candidates = shape.n - shape.num_forced;
  shape.sink_end = min(knobs.sink_blocks, shape.n);
  shape.local_begin = max(shape.n - knobs.local_blocks, shape.sink_end);
  // Only the E = min(k_max - forced, candidates) best candidates can ever be chosen.
  shape.wanted = min(knobs.k_max - shape.num_forced, shape.num_candidates);
  return shape;
}

// Forced mass of the blocks in [begin, end), in 2^-62 units like every mass below; every thread
// gets the sum.
__device__ unsigned long long forced_mass_in(const Selector& selector, TopShared& top, const RowShape& shape,
                                             int begin, int end) {
  unsigned long long here = 0;
  for (int j = max(begin, 0) + int(threadIdx.x); j < min(end, shape.sink_end); j += kThreads) {
    here += __double2ull_rn(selector.probability(j) * kMassScale);
  }
  for (int j = max(begin, shape.local_begin) + int(threadIdx.x); j < min(end, shape.n); j += kThreads) {
    here += __double2ull_rn(selector.probability(j) * kMassScale);
  }
  unsigned long long total, unused;
  TopShared::MassScan(top.mass_scan).ExclusiveSum(here, unused, total);
  __syncthreads();
  return total;
}

// The `wanted` best candidates of [begin, end) (ties at the threshold lowest index first), written
// unordered to out [0, wanted). 0 < wanted <= candidates in the range.
__device__ void gather_top(const Selector& selector, TopShared& top, int wanted, int begin, int end,
                           const Candidates out) {
  int count_above;
  const uint32_t threshold = kth_largest_key(selector, top, wanted, count_above, begin, end);
  const int ties_wanted = wanted - count_above;
  // Each thread takes a contiguous range of blocks so that one scan orders the ties by index.
  const int chunk = (end - begin + kThreads - 1) / kThreads;
  const int first = min(end, begin + int(threadIdx.x) * chunk), last = min(end, first + chunk);
  unsigned long long local = 0;  // above count << 32 | tie count
  for (int j = first; j < last; ++j) {
    if (!selector.is_candidate(j)) continue;
    const uint32_t key = selector.key(j);
    local += key > threshold ? (1ull << 32) : (key == threshold ? 1ull : 0ull);
  }
  unsigned long long before;
  TopShared::MassScan(top.mass_scan).ExclusiveSum(local, before);
  int above_slot = int(before >> 32), tie_rank = int(before & 0xFFFFFFFFu);
  for (int j = first; j < last; ++j) {
    if (!selector.is_candidate(j)) continue;
    const uint32_t key = selector.key(j);
    int slot = -1;
    if (key > threshold) {
      slot = above_slot++;
    } else if (key == threshold) {
      if (tie_rank < ties_wanted) slot = count_above + tie_rank;
      ++tie_rank;
    }
    if (slot >= 0) {
      out.keys()[slot] = key;
      out.blocks()[slot] = j;
      out.prob()[slot] = selector.probability(j);
    }
  }
  __syncthreads();
}

// Up to kThreads blocks, one per thread, in selection order by a bitonic sort of one 64-bit word
// each: candidate flag, order key, inverted block index. Strides below a warp exchange through
// shuffles; the 10 wider ones through shared memory, double-buffered so each costs one barrier.
// Replaces the radix passes, the gather and the ordering count: 512 blocks took 9.1 us instead of
// 11.2, and 2048 blocks over a 4-CTA cluster 13.0 instead of 15.4 (H200).
__device__ __forceinline__ uint64_t sort_word(const Selector& selector, int j) {
  if (!selector.is_candidate(j)) return 0;
  return (uint64_t(1) << 63) | (uint64_t(selector.key(j)) << 31) | uint64_t(0x7FFFFFFF - j);
}

// The `wanted` best candidates of [begin, end) (end - begin <= kThreads) in selection order, into
// out [0, wanted). `scratch`: 2 * kThreads words of shared memory.
__device__ void sort_top(const Selector& selector, uint64_t* scratch, int wanted, int begin, int end,
                         const Candidates out) {
  const int t = int(threadIdx.x);
  const int j = begin + t;
  uint64_t word = j < end ? sort_word(selector, j) : 0;
  int buffer = 0;
#pragma unroll
  for (int size = 2; size <= kThreads; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      uint64_t other;
      if (stride >= 32) {
        uint64_t* exchange = scratch + buffer * kThreads;
        exchange[t] = word;
        __syncthreads();
        other = exchange[t ^ stride];
        buffer ^= 1;  // the next wide stride writes the other buffer: no second barrier
      } else {
        other = __shfl_xor_sync(0xFFFFFFFFu, word, stride);
      }
      // Descending overall: pairs whose size-block has bit `size` clear keep the larger word low.
      const bool keep_larger = ((t & stride) == 0) == ((t & size) == 0);
      word = keep_larger ? (word > other ? word : other) : (word < other ? word : other);
    }
  }
  if (t < wanted) {
    const int block = 0x7FFFFFFF - int(word & 0x7FFFFFFFu);
    out.keys()[t] = uint32_t(word >> 31);
    out.blocks()[t] = block;
    out.prob()[t] = selector.probability(block);
  }
  __syncthreads();
}

// The selection order: order key descending (probability descending), then block index ascending.
__device__ __forceinline__ bool precedes(uint32_t key, int block, uint32_t other_key, int other_block) {
  return key > other_key || (key == other_key && block < other_block);
}

// The `count` candidates of `in`, in selection order, into out [0, count): each one's place is the
// number that precede it (count <= kMaxTop, so at most kMaxTop^2 / kThreads compares a thread).
__device__ void order_candidates(const Candidates in, int count, const Candidates out) {
  const uint32_t* keys = in.keys();
  const int32_t* blocks = in.blocks();
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const uint32_t key = keys[i];
    const int block = blocks[i];
    int place = 0;
    for (int m = 0; m < count; ++m) place += precedes(keys[m], blocks[m], key, block) ? 1 : 0;
    out.keys()[place] = key;
    out.blocks()[place] = block;
    out.prob()[place] = in.prob()[i];
  }
  __syncthreads();
}

// The first `wanted` of the merged order of `num_lists` ordered lists (list l: lists [l * stride,
// l * stride + lengths[l])), into out [0, wanted). An entry's place is its place in its own list
// plus, by binary search, how many entries of each other list precede it.
__device__ void merge_ordered_lists(const Candidates lists, const int* lengths, int num_lists, int stride,
                                    int wanted, const Candidates out) {
  for (int i = threadIdx.x; i < num_lists * stride; i += kThreads) {
    const int list = i / stride, place_in_list = i % stride;
    if (place_in_list >= lengths[list]) continue;
    const uint32_t key = lists.keys()[i];
    const int block = lists.blocks()[i];
    int place = place_in_list;
    for (int other = 0; other < num_lists; ++other) {
      if (other == list) continue;
      const Candidates entries = lists.at(other * stride);
      int low = 0, high = lengths[other];  // the first entry of `other` not preceding this one
      while (low < high) {
        const int mid = (low + high) / 2;
        if (precedes(entries.keys()[mid], entries.blocks()[mid], key, block)) {
          low = mid + 1;
        } else {
          high = mid;
        }
      }
      place += low;
    }
    if (place < wanted) {
      out.keys()[place] = key;
      out.blocks()[place] = block;
      out.prob()[place] = lists.prob()[i];
    }
  }
  __syncthreads();
}

// From the `wanted` best candidates in order (shared.sorted) and the forced mass:
// the top-p cut, the [k_min, k_max] clamp and the output row (forced prefix, chosen ascending,
// forced suffix, -1 padding). Returns the count.
__device__ int finish_selection(const SelectShared& shared, TopShared& top, const RowShape& shape,
                                unsigned long long forced_mass, const SelectKnobs knobs, int32_t* out) {
  const select_device::BlockGroup<kWarps> group{shared.reduce_scratch};
  int extra = 0;
  if (shape.wanted > 0) {
    // Candidate of rank r is taken for top_p while forced + mass(ranks < r) < top_p. A cut past
    // the E gathered means the clamp to k_max decides (or every candidate is taken).
    constexpr int kRanksPerThread = kMaxTop / kThreads;
    unsigned long long prefix[kRanksPerThread];
#pragma unroll
    for (int i = 0; i < kRanksPerThread; ++i) {
      const int rank = int(threadIdx.x) * kRanksPerThread + i;
      prefix[i] = rank < shape.wanted ? __double2ull_rn(shared.sorted.prob()[rank] * kMassScale) : 0ull;
    }
    TopShared::MassScan(top.mass_scan).ExclusiveSum(prefix, prefix);
    const unsigned long long target = static_cast<unsigned long long>(ceil(knobs.top_p * kMassScale));
    int taken_here = 0;
#pragma unroll
    for (int i = 0; i < kRanksPerThread; ++i) {
      const int rank = int(threadIdx.x) * kRanksPerThread + i;
      taken_here += (rank < shape.wanted && forced_mass + prefix[i] < target) ? 1 : 0;
    }
    const int k_p = group.sum(taken_here);  // its barriers also retire the scan's storage
    const int total = min(max(shape.num_forced + k_p, knobs.k_min), knobs.k_max);
    extra = min(max(total - shape.num_forced, 0), shape.wanted);

    // Chosen candidates lie between the forced prefix and suffix: output slot = sink_end + their
    // ascending rank among the chosen.
    for (int r = threadIdx.x; r < extra; r += kThreads) {
      const int block = shared.sorted.blocks()[r];
      int position = shape.sink_end;
      for (int m = 0; m < extra; ++m) position += shared.sorted.blocks()[m] < block ? 1 : 0;
      if (position < knobs.k_max) out[position] = block;
    }
  }
  for (int j = threadIdx.x; j < shape.sink_end; j += kThreads) out[j] = j;
  for (int j = shape.local_begin + int(threadIdx.x); j < shape.n; j += kThreads) {
    const int position = shape.sink_end + extra + (j - shape.local_begin);
    if (position < knobs.k_max) out[position] = j;
  }
  const int count = shape.num_forced + extra;
  for (int i = count + int(threadIdx.x); i < knobs.k_max; i += kThreads) out[i] = -1;
  return count;
}

// Decode rows are few (batch x KV heads) and wide (one logit per cached block). Only the E best
// candidates can be chosen, and the top-p cut falls inside them or the clamp to k_max applies:
// so find them (a bitonic sort of the row up to kThreads blocks, else a count radix select and a
// count of their order), and scan their masses. E <= kMaxTop here; returns the count.
__device__ int select_row_top(const SelectShared shared, TopShared& top, const DecodeRow row,
                              const SelectKnobs knobs, int32_t* out) {
  const RowShape shape = row_shape(row, knobs);
  const select_device::BlockGroup<kWarps> group{shared.reduce_scratch};
  const Selector selector{group,
                          select_device::RowView{shared.scores, shared.prob, min(max(row.scored, 0), shape.n), shape.n},
                          knobs, shape.n};
  selector.softmax();
  __syncthreads();  // keys read probabilities other threads wrote
  const unsigned long long forced_mass = forced_mass_in(selector, top, shape, 0, shape.n);
  if (shape.wanted > 0) {
    if (shape.n <= kThreads) {
      sort_top(selector, reinterpret_cast<uint64_t*>(shared.gathered.base), shape.wanted, 0, shape.n, shared.sorted);
    } else {
      gather_top(selector, top, shape.wanted, 0, shape.n, shared.gathered);
      order_candidates(shared.gathered, shape.wanted, shared.sorted);
    }
  }
  return finish_selection(shared, top, shape, forced_mass, knobs, out);
}

// ------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------

// Dynamic shared memory: prob [width] doubles, scores [width] floats, query [dim] floats, then
// Candidates of kMaxTop entries: gathered, sorted and (clustered) the chunk lists.
struct SharedLayout {
  size_t scores, query, candidates, bytes;
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline SharedLayout shared_layout(int width, int dim, bool clustered) {
  SharedLayout layout;
  layout.scores = align16(size_t(width) * sizeof(double));
  layout.query = layout.scores + align16(size_t(width) * sizeof(float));
  layout.candidates = layout.query + align16(size_t(dim) * sizeof(float));
  layout.bytes = layout.candidates + (clustered ? 3 : 2) * kCandidatesBytes;
  return layout;
}

// The i-th Candidates array at `base`.
__device__ inline Candidates candidates_at(unsigned char* base, int i) { return {base + i * kCandidatesBytes, 0}; }

// A small batch has few rows (one per sequence and KV head), so on Hopper a row is spread over a
// thread-block cluster of `ranks` CTAs: CTA r owns a contiguous chunk of the row's blocks,
// scores them, joins the row's max and sum through the first CTA's shared memory, and finds its
// chunk's E best candidates, which it orders and writes into the first CTA's shared memory. The
// first CTA merges those ordered lists (binary searches, not a count over all ranks x E) and
// finishes as a single CTA would. The result is the single-CTA one but for the order of the
// float64 softmax sum.
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return int(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}

// `local` in the first CTA of the cluster (itself without a cluster).
template <typename T>
__device__ __forceinline__ T* in_first_cta(T* local) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, 0);
#else
  return local;
#endif
}

__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();  // remote shared-memory writes visible
#else
  __syncthreads();
#endif
}

constexpr int kMaxRanks = 8;

// What the CTAs of a cluster exchange through the first CTA's shared memory.
struct ClusterShared {
  double max[kMaxRanks], sum[kMaxRanks];
  unsigned long long forced_mass[kMaxRanks];
  int list_lengths[kMaxRanks];  // entries of each CTA's ordered list
};

// The clustered selection of a row; `begin`, `end`: this CTA's chunk, already scored into its
// own `shared.scores`. Returns the count in the first CTA, -1 in the others (which must not touch
// shared memory of the first CTA afterwards: they exit).
__device__ int select_row_clustered(const SelectShared shared, TopShared& top, ClusterShared& cluster,
                                    const DecodeRow row, const SelectKnobs knobs, int32_t* out, int rank, int ranks,
                                    int begin, int end) {
  const RowShape shape = row_shape(row, knobs);
  const int scored = min(max(row.scored, 0), shape.n);
  const select_device::BlockGroup<kWarps> group{shared.reduce_scratch};
  ClusterShared& first = *in_first_cta(&cluster);

  // Softmax over the whole row: max and sum joined across the cluster in rank order.
  double local_max = -INFINITY;
  for (int j = begin + int(threadIdx.x); j < min(end, scored); j += kThreads) {
    local_max = fmax(local_max, double(shared.scores[j]));
  }
  local_max = group.max(local_max);
  if (threadIdx.x == 0) first.max[rank] = local_max;
  cluster_barrier();
  double row_max = first.max[0];
  for (int r = 1; r < ranks; ++r) row_max = fmax(row_max, first.max[r]);
  double local_sum = 0;
  for (int j = begin + int(threadIdx.x); j < min(end, scored); j += kThreads) {
    const double e = row_max == -INFINITY ? 0.0 : exp(double(shared.scores[j]) - row_max);
    shared.prob[j] = e;
    local_sum += e;
  }
  local_sum = group.sum(local_sum);
  if (threadIdx.x == 0) first.sum[rank] = local_sum;
  cluster_barrier();
  double total = first.sum[0];
  for (int r = 1; r < ranks; ++r) total += first.sum[r];
  for (int j = begin + int(threadIdx.x); j < min(end, scored); j += kThreads) {
    shared.prob[j] = row_max == -INFINITY ? 0.0 : shared.prob[j] / total;
  }
  __syncthreads();

  // This chunk's E best candidates (E = the row's wanted count, at most its candidates here),
  // ordered, into entries [rank * E, rank * E + E_r) of the first CTA's chunk lists.
  const Selector selector{group, select_device::RowView{shared.scores, shared.prob, scored, shape.n}, knobs, shape.n};
  const int forced_here = max(0, min(end, shape.sink_end) - begin) + max(0, end - max(begin, shape.local_begin));
  const int wanted_here = max(0, min(shape.wanted, (end - begin) - forced_here));
  if (wanted_here > 0) {
    const Candidates lists{in_first_cta(shared.chunk_lists.base), rank * shape.wanted};
    if (end - begin <= kThreads) {
      sort_top(selector, reinterpret_cast<uint64_t*>(shared.gathered.base), wanted_here, begin, end, lists);
    } else {
      gather_top(selector, top, wanted_here, begin, end, shared.gathered);
      order_candidates(shared.gathered, wanted_here, lists);
    }
  }
  const unsigned long long forced_mass_here = forced_mass_in(selector, top, shape, begin, end);
  if (threadIdx.x == 0) {
    first.forced_mass[rank] = forced_mass_here;
    first.list_lengths[rank] = wanted_here;
  }
  cluster_barrier();
  if (rank != 0) return -1;

  unsigned long long forced_mass = 0;
  for (int r = 0; r < ranks; ++r) forced_mass += cluster.forced_mass[r];
  if (shape.wanted > 0) {
    merge_ordered_lists(shared.chunk_lists, cluster.list_lengths, ranks, shape.wanted, shape.wanted, shared.sorted);
  }
  return finish_selection(shared, top, shape, forced_mass, knobs, out);
}

// kClustered: launched in clusters of `ranks` CTAs per row. Such a grid spans few SMs, so it may
// take the whole register file (one CTA per SM); the plain kernel keeps two CTAs per SM for
// large batches, whose rows would otherwise run in two waves.
template <typename query_t, typename key_t, KCacheFormat Format, bool kClustered>
__global__ void __launch_bounds__(kThreads, kClustered ? 1 : 2)
    decode_select_kernel(const DecodeSelectParams params, const int cluster_ranks) {
  const int ranks = kClustered ? cluster_ranks : 1;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ double reduce_scratch[kWarps];
  __shared__ TopShared top;
  __shared__ ClusterShared cluster;
  const int width = params.num_key_blocks, dim = params.dim;
  const SharedLayout layout = shared_layout(width, dim, kClustered);
  double* prob = reinterpret_cast<double*>(shared_bytes);
  float* scores = reinterpret_cast<float*>(shared_bytes + layout.scores);
  float* query = reinterpret_cast<float*>(shared_bytes + layout.query);
  // Launched as a dependent of the previous kernel (in a decode graph, the attention of the layer
  // before): the CTAs are resident when that grid's outputs land, and read nothing before.
  wait_for_previous_grid();
  allow_dependent_launch();  // the step's sparse_decode waits for this grid before reading
  const int rank = kClustered ? cluster_rank() : 0;
  const int h = blockIdx.x / ranks, b = blockIdx.y;
  const int64_t pair = int64_t(b) * params.heads + h;
  const DecodeRow row = decode_row(params, b);
  // This CTA's chunk of the row's visible blocks (the whole row without a cluster).
  const int n = max(row.visible, 0);
  const int chunk = (n + ranks - 1) / ranks;
  const int begin = min(n, rank * chunk), end = min(n, begin + chunk);

  const bool chunked_keys = (size_t(dim) * sizeof(key_t)) % 16 == 0 && reinterpret_cast<uintptr_t>(params.keys) % 16 == 0;
  const query_t* query_row = static_cast<const query_t*>(params.query) + pair * dim;
  for (int k = threadIdx.x; k < dim; k += kThreads) query[k] = to_float(query_row[k]);
  __syncthreads();
#pragma unroll 4
  for (int j = begin + int(threadIdx.x); j < min(end, row.scored); j += kThreads) {
    const int64_t key_row = pair * width + j;
    if constexpr (Format == KCacheFormat::kDense) {
      scores[j] = score_dense(query, static_cast<const key_t*>(params.keys) + key_row * dim, dim,
                              params.softmax_scale, chunked_keys);
    } else {
      constexpr int kGroup = kcache::FormatTraits<Format>::kGroupSize;
      const uint8_t* codes = static_cast<const uint8_t*>(params.keys) + key_row * (dim / 2);
      const uint8_t* scales = static_cast<const uint8_t*>(params.key_scales) +
                              key_row * (dim / kGroup) * packed_scale_bytes(Format);
      scores[j] = score_packed<Format>(query, codes, scales, dim, params.global_scale, params.softmax_scale);
    }
  }
  __syncthreads();

  const SelectKnobs knobs{params.top_p, params.k_min, params.k_max, params.sink_blocks, params.local_blocks};
  int32_t* out = params.indices + pair * params.k_max;
  unsigned char* candidates = shared_bytes + layout.candidates;
  const SelectShared shared{scores,
                            prob,
                            candidates_at(candidates, 0),
                            candidates_at(candidates, 1),
                            kClustered ? candidates_at(candidates, 2) : Candidates{},
                            reduce_scratch};
  int count;
  if constexpr (kClustered) {
    count = select_row_clustered(shared, top, cluster, row, knobs, out, rank, ranks, begin, end);
    if (count < 0) return;
  } else {
    const int num_forced = forced_block_count(n, knobs.sink_blocks, knobs.local_blocks);
    if (min(knobs.k_max - num_forced, n - num_forced) <= kMaxTop) {
      count = select_row_top(shared, top, row, knobs, out);
    } else {
      const select_device::RowView view{scores, prob, row.scored, row.visible};
      const select_device::BlockGroup<kWarps> group{reduce_scratch};
      count = select_device::select_row(group, view, knobs, out);
    }
  }
  if (threadIdx.x == 0) params.counts[pair] = count;
}

// CTAs per row: while the grid stays within a quarter of the SMs, at most one pass of kThreads
// keys per CTA, every CTA's E candidates fit the first CTA's kMaxTop slots, and at most the
// portable cluster size; 1 (a plain launch) before Hopper.
template <auto ClusteredKernel>
int cluster_ranks(const DecodeSelectParams& params) {
  if (compute_capability_major() < 9 || !binary_is_sm90_or_later<ClusteredKernel>()) return 1;
  const int64_t rows = int64_t(params.batch) * params.heads;
  const int64_t passes = (int64_t(params.num_key_blocks) + kThreads - 1) / kThreads;
  int ranks = 1;
  while (ranks < kMaxRanks && ranks < passes && rows * ranks * 4 <= multiprocessor_count() &&
         int64_t(ranks) * 2 * std::max(params.k_max, 1) <= kMaxTop) {
    ranks *= 2;
  }
  return ranks;
}

// The 48 KB default counts static shared memory too (~5.5 KB here), so opt in on every launch
// (cheap, and capture-safe) rather than only above 48 KB of dynamic memory.
template <auto Kernel>
void prepare_kernel(size_t shared_bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
}

// `ranks` CTAs per row, in clusters of that size (a plain launch when 1), each CTA resident and
// waiting for the previous kernel's outputs.
template <auto Kernel>
void launch_rows(const DecodeSelectParams& params, int ranks) {
  const size_t shared_bytes = shared_layout(params.num_key_blocks, params.dim, ranks > 1).bytes;
  prepare_kernel<Kernel>(shared_bytes);
  const dim3 grid(unsigned(params.heads * ranks), unsigned(params.batch));
  launch_dependent_in_clusters<Kernel>(grid, dim3(kThreads), shared_bytes,
                                       c10::cuda::getCurrentCUDAStream().stream(), unsigned(ranks), params, ranks);
}

template <typename query_t, typename key_t, KCacheFormat Format>
void launch(const DecodeSelectParams& params) {
  const int ranks = cluster_ranks<decode_select_kernel<query_t, key_t, Format, true>>(params);
  if (ranks > 1) {
    launch_rows<decode_select_kernel<query_t, key_t, Format, true>>(params, ranks);
  } else {
    launch_rows<decode_select_kernel<query_t, key_t, Format, false>>(params, 1);
  }
}

}  // namespace

void decode_select_cuda(const DecodeSelectParams& params) {
  if (params.batch == 0 || params.heads == 0) return;
  SPOT_DISPATCH_FLOAT(params.query_dtype, query_t, {
    SPOT_DISPATCH_KCACHE_FORMAT_OR_DENSE(params.format, kFormat, {
      if constexpr (kFormat == KCacheFormat::kDense) {
        SPOT_DISPATCH_FLOAT(params.key_dtype, key_t, (launch<query_t, key_t, kFormat>(params)));
      } else {
        launch<query_t, uint8_t, kFormat>(params);  // packed keys are code bytes
      }
    });
  });
}

}  // namespace spot
