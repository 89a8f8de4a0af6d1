// Dual top-p selection of one row of selector logits, host side: the rule of
// reference.select_blocks / reference._select_row, shared by the CPU kernels of select_blocks and
// decode_select. The CUDA kernels implement the same rule without a full sort: select_blocks by a
// threshold search (spot/select_row.cuh), decode_select by a top-E select (decode_select_cuda.cu)
// with that search as its fallback. Masses are float64 or 2^-62 fixed point, so cumulative masses
// compared with top_p agree with the reference to rounding (differences matter only on
// measure-zero ties).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace spot {

struct SelectKnobs {
  double top_p = 1.0;
  int k_min = 0, k_max = 0, sink_blocks = 0, local_blocks = 0;
};

// Size of the forced set of a row with n visible blocks: a prefix of `sink` and a suffix of
// `local` blocks, overlapping when the row is short.
inline constexpr int forced_block_count(int num_visible, int sink_blocks, int local_blocks) {
  return num_visible <= 0 ? 0
                          : (int64_t(sink_blocks) + local_blocks >= num_visible ? num_visible
                                                                                 : sink_blocks + local_blocks);
}

inline constexpr bool is_forced_block(int j, int num_visible, int sink_blocks, int local_blocks) {
  return j < sink_blocks || int64_t(j) >= int64_t(num_visible) - local_blocks;
}

// Scratch reused across rows by one CPU worker.
struct SelectRowScratch {
  std::vector<double> prob;
  std::vector<int32_t> candidates;
  std::vector<uint8_t> chosen;
};

// One row: logits scores[0, num_scored) (entries [num_scored, num_visible) have probability 0,
// the way a -inf logit does). Writes the chosen block indices ascending into out[0, count) and -1
// into out[count, k_max); returns count.
inline int select_row_host(const float* scores, int num_scored, int num_visible, const SelectKnobs& knobs,
                           SelectRowScratch& scratch, int32_t* out) {
  const int n = std::max(num_visible, 0);
  num_scored = std::clamp(num_scored, 0, n);
  std::fill(out, out + knobs.k_max, int32_t(-1));
  if (n == 0) return 0;

  // prob = softmax(row) in float64; an all -inf row (or an unscored one) has all-zero probability.
  std::vector<double>& prob = scratch.prob;
  prob.assign(size_t(n), 0.0);
  double row_max = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < num_scored; ++j) row_max = std::max(row_max, double(scores[j]));
  if (row_max != -std::numeric_limits<double>::infinity()) {
    double total = 0;
    for (int j = 0; j < num_scored; ++j) {
      prob[j] = std::exp(double(scores[j]) - row_max);
      total += prob[j];
    }
    for (int j = 0; j < num_scored; ++j) prob[j] /= total;
  }

  const int sink = knobs.sink_blocks, local = knobs.local_blocks;
  double forced_mass = 0;
  std::vector<int32_t>& candidates = scratch.candidates;
  candidates.clear();
  for (int j = 0; j < n; ++j) {
    if (is_forced_block(j, n, sink, local)) {
      forced_mass += prob[j];
    } else {
      candidates.push_back(j);
    }
  }
  const int num_forced = n - int(candidates.size());
  // Probability descending, ties to the lower index: a strict order, so sort is deterministic.
  std::sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
    return prob[a] != prob[b] ? prob[a] > prob[b] : a < b;
  });
  // The fewest candidates whose mass, added to the forced mass, reaches top_p (all of them when
  // it is never reached).
  const int num_candidates = int(candidates.size());
  const double top_p = double(knobs.top_p);
  int k_p = num_candidates;
  double running = forced_mass;
  for (int taken = 0; taken < num_candidates; ++taken) {
    if (running >= top_p) {
      k_p = taken;
      break;
    }
    running += prob[candidates[taken]];
  }
  const int total = std::min(std::max(num_forced + k_p, knobs.k_min), knobs.k_max);
  const int extra = std::clamp(total - num_forced, 0, num_candidates);

  std::vector<uint8_t>& chosen = scratch.chosen;
  chosen.assign(size_t(n), 0);
  for (int j = 0; j < n; ++j) chosen[j] = is_forced_block(j, n, sink, local) ? 1 : 0;
  for (int i = 0; i < extra; ++i) chosen[candidates[i]] = 1;
  int count = 0;
  for (int j = 0; j < n; ++j) {
    if (chosen[j]) out[count++] = j;
  }
  return count;
}

}  // namespace spot
