// Dual top-p selection of one row of selector logits on the device: the rule of
// reference._select_row (and of the host version, spot/select_row.h) computed by a group of
// threads (one warp, or one CTA) without sorting.
//
// Order. Candidates rank by probability, ties to the lower index. Probabilities are a monotone
// function of the logits, so the rank key is the logit's order-preserving uint32 image; a
// candidate whose float64 probability is 0 (a -inf logit, an unscored block, an underflow) gets
// the key of -inf, so zero-probability candidates tie and fall back to index order, like the
// reference's (-prob, index) sort.
//
// Threshold search. k_p (the fewest candidates whose mass, added to the forced mass, reaches
// top_p) is found by bisection over the 32-bit key: the largest key t with
// forced + mass(key >= t) >= top_p; candidates above t are all taken and the ties at t are taken
// in index order, one at a time, until top_p is reached. The final count after the [k_min, k_max]
// clamp is selected the same way by a count bisection. Masses are float64 like the reference.
//
// Work split. Element j of the row belongs to thread j mod group size in every pass, so each
// thread reads and writes only its own elements of the shared probability buffer (no barriers
// between passes besides the reductions). Every reduction returns the same bits on every thread
// (xor butterflies and fixed-order cross-warp sums), so all control flow stays uniform.
#pragma once

#include <cmath>
#include <cstdint>

#include "spot/select_row.h"

namespace spot {
namespace select_device {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Unsigned image of a float with the same order (for non-NaN values; -inf is the lowest).
__device__ __forceinline__ uint32_t ordered_key(float value) {
  const uint32_t bits = __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

constexpr uint32_t kZeroProbabilityKey = ~0xFF800000u;  // ordered_key(-inf)

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ double warp_max(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = fmax(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// One warp works on the row.
struct WarpGroup {
  static constexpr int kSize = 32;
  __device__ int rank() const { return threadIdx.x & 31; }
  __device__ double sum(double value) const { return warp_sum(value); }
  __device__ int sum(int value) const { return warp_sum(value); }
  __device__ double max(double value) const { return warp_max(value); }
  // Number of set flags on lower ranks; total receives the number of set flags.
  __device__ int exclusive_count(bool flag, int& total) const {
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    total = __popc(ballot);
    return __popc(ballot & ((1u << rank()) - 1u));
  }
};

// A whole CTA of kWarps warps works on the row; `scratch` is kWarps doubles of shared memory.
template <int kWarps>
struct BlockGroup {
  static constexpr int kSize = 32 * kWarps;
  double* scratch;

  __device__ int rank() const { return threadIdx.x; }

  // Cross-warp combine in a fixed order; values are exact in double (floats, ints < 2^53).
  template <bool kMax>
  __device__ double combine(double warp_value) const {
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = warp_value;
    __syncthreads();
    double result = scratch[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) result = kMax ? fmax(result, scratch[w]) : result + scratch[w];
    __syncthreads();
    return result;
  }
  __device__ double sum(double value) const { return combine<false>(warp_sum(value)); }
  __device__ int sum(int value) const { return int(combine<false>(double(warp_sum(value)))); }
  __device__ double max(double value) const { return combine<true>(warp_max(value)); }
  __device__ int exclusive_count(bool flag, int& total) const {
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = double(__popc(ballot));
    __syncthreads();
    int before = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int count = int(scratch[w]);
      before += w < warp ? count : 0;
      total += count;
    }
    __syncthreads();
    return before + __popc(ballot & ((1u << lane) - 1u));
  }
};

// The row's view: logits scores[0, num_scored) (global or shared memory), probabilities written
// to prob[0, num_scored) (shared memory), blocks [num_scored, num_visible) of probability 0.
struct RowView {
  const float* scores;
  double* prob;
  int num_scored;
  int num_visible;
};

template <class Group>
struct RowSelector {
  // Held by value: references to the caller's locals would put them in local memory.
  Group group;
  RowView row;
  SelectKnobs knobs;
  int n;  // visible blocks

  __device__ bool is_candidate(int j) const {
    return j < n && !is_forced_block(j, n, knobs.sink_blocks, knobs.local_blocks);
  }
  __device__ double probability(int j) const { return j < row.num_scored ? row.prob[j] : 0.0; }
  __device__ uint32_t key(int j) const {
    return (j < row.num_scored && row.prob[j] > 0.0) ? ordered_key(row.scores[j]) : kZeroProbabilityKey;
  }

  // forced_mass + mass of the candidates with key >= threshold (threshold < 2^32).
  __device__ double mass_from(double forced_mass, uint32_t threshold) const {
    double local = 0;
    for (int j = group.rank(); j < n; j += Group::kSize) {
      if (is_candidate(j) && key(j) >= threshold) local += probability(j);
    }
    return forced_mass + group.sum(local);
  }

  __device__ int count_from(uint32_t threshold) const {
    int local = 0;
    for (int j = group.rank(); j < n; j += Group::kSize) local += (is_candidate(j) && key(j) >= threshold) ? 1 : 0;
    return group.sum(local);
  }

  // Writes prob = softmax(scores[0, num_scored)) (all 0 when every logit is -inf).
  __device__ void softmax() const {
    double local_max = -INFINITY;
    for (int j = group.rank(); j < row.num_scored; j += Group::kSize) local_max = fmax(local_max, double(row.scores[j]));
    const double row_max = group.max(local_max);
    double local_sum = 0;
    for (int j = group.rank(); j < row.num_scored; j += Group::kSize) {
      const double e = row_max == -INFINITY ? 0.0 : exp(double(row.scores[j]) - row_max);
      row.prob[j] = e;
      local_sum += e;
    }
    const double total = group.sum(local_sum);
    for (int j = group.rank(); j < row.num_scored; j += Group::kSize) {
      row.prob[j] = row_max == -INFINITY ? 0.0 : row.prob[j] / total;
    }
  }

  // Writes the chosen blocks ascending to out[0, count), -1 to out[count, k_max); returns count.
  __device__ int run(int32_t* out) const {
    softmax();
    const double top_p = knobs.top_p;
    double local_forced = 0;
    for (int j = group.rank(); j < n; j += Group::kSize) {
      if (!is_candidate(j)) local_forced += probability(j);
    }
    const double forced_mass = group.sum(local_forced);
    const int num_forced = forced_block_count(n, knobs.sink_blocks, knobs.local_blocks);
    const int num_candidates = n - num_forced;

    // k_p, and the key / tie count that realise it when found by bisection.
    int k_p = num_candidates;
    bool have_threshold = false;
    uint32_t threshold = 0;
    int ties_taken = 0;
    if (forced_mass >= top_p) {
      k_p = 0;
    } else if (num_candidates > 0 && mass_from(forced_mass, 0u) >= top_p) {
      // Invariant: mass_from(lo) >= top_p > mass_from(hi) (hi = 2^32 is the empty set).
      uint32_t lo = 0;
      uint64_t hi = uint64_t(1) << 32;
      while (hi - lo > 1) {
        const uint32_t mid = uint32_t((uint64_t(lo) + hi) / 2);
        if (mass_from(forced_mass, mid) >= top_p) lo = mid; else hi = mid;
      }
      threshold = lo;
      double local_above = 0, local_tie = 0;
      int local_count_above = 0, local_count_tie = 0;
      for (int j = group.rank(); j < n; j += Group::kSize) {
        if (!is_candidate(j)) continue;
        const uint32_t k = key(j);
        if (k > threshold) {
          local_above += probability(j);
          ++local_count_above;
        } else if (k == threshold) {
          local_tie = probability(j);  // equal keys have equal probabilities
          ++local_count_tie;
        }
      }
      const double mass_above = forced_mass + group.sum(local_above);
      const int count_above = group.sum(local_count_above);
      const int count_tie = group.sum(local_count_tie);
      const double tie_probability = group.max(local_tie);
      // The reference adds ties one at a time, lowest index first.
      double running = mass_above;
      while (ties_taken < count_tie && running < top_p) {
        running += tie_probability;
        ++ties_taken;
      }
      k_p = count_above + ties_taken;
      have_threshold = true;
    }

    const int total = min(max(num_forced + k_p, knobs.k_min), knobs.k_max);
    const int extra = min(max(total - num_forced, 0), num_candidates);
    const bool take_all = extra == num_candidates;
    const bool take_none = extra == 0;
    uint32_t select_key = 0;
    int select_ties = 0;  // candidates with key == select_key taken, lowest index first
    if (!take_all && !take_none) {
      if (have_threshold && extra == k_p) {
        select_key = threshold;
        select_ties = ties_taken;
      } else {
        // Largest key t with count(key >= t) >= extra.
        uint32_t lo = 0;
        uint64_t hi = uint64_t(1) << 32;
        while (hi - lo > 1) {
          const uint32_t mid = uint32_t((uint64_t(lo) + hi) / 2);
          if (count_from(mid) >= extra) lo = mid; else hi = mid;
        }
        select_key = lo;
        select_ties = extra - (lo == 0xFFFFFFFFu ? 0 : count_from(lo + 1));
      }
    }

    // Ascending compaction of forced + chosen candidates.
    int written = 0, ties_seen = 0;
    for (int base = 0; base < n; base += Group::kSize) {
      const int j = base + group.rank();
      const bool candidate = is_candidate(j);
      const bool forced = j < n && !candidate;
      const uint32_t k = candidate && !take_all && !take_none ? key(j) : 0u;
      const bool tied = candidate && !take_all && !take_none && k == select_key;
      int tie_total;
      const int tie_rank = ties_seen + group.exclusive_count(tied, tie_total);
      ties_seen += tie_total;
      const bool chosen =
          forced || (candidate && (take_all || (!take_none && (k > select_key || (tied && tie_rank < select_ties)))));
      int chosen_total;
      const int position = written + group.exclusive_count(chosen, chosen_total);
      written += chosen_total;
      if (chosen && position < knobs.k_max) out[position] = j;
    }
    for (int i = written + group.rank(); i < knobs.k_max; i += Group::kSize) out[i] = -1;
    return written;
  }
};

template <class Group>
__device__ int select_row(const Group& group, const RowView& row, const SelectKnobs& knobs, int32_t* out) {
  const int n = row.num_visible > 0 ? row.num_visible : 0;
  RowView clamped = row;
  clamped.num_visible = n;
  clamped.num_scored = min(max(row.num_scored, 0), n);
  const RowSelector<Group> selector{group, clamped, knobs, n};
  return selector.run(out);
}

}  // namespace select_device
}  // namespace spot
