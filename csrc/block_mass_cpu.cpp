// CPU kernel of spot.block_mass: exact causal attention mass per (query block, key block).
//
// Work is split into tasks of whole query blocks of one (sequence, KV group), so every task owns
// its output rows. A task walks its query tokens 16 at a time; for each head of the group it
// computes the tokens' logits against every visible key (a [16, visible] tile, register-blocked
// 4 rows x 16 keys), then per row: the max, then exp2(logit - max) summed per key block, and the
// block sums divided by the row total (the softmax denominator) are added to the row's query
// block. Logits are in the log2 domain (query pre-scaled by softmax_scale * log2(e)).
// Accumulation: fp32 within a key block (at most 256 terms), double across blocks and rows.
#if defined(__GNUC__) && !defined(__clang__)
// Vec8 helpers are always inlined, so the AVX-vs-SSE argument ABI never shows at a call.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_clones.h"
#include "launchers.h"
#include "spot/dispatch.h"
#include "spot/numeric.h"

namespace spot {

namespace {

#define SPOT_CPU_INLINE inline __attribute__((always_inline))

// Eight floats: one AVX register, or two SSE registers in the baseline build.
typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t IntVec8 __attribute__((vector_size(32)));

constexpr int kRowsPerChunk = 16;  // query tokens whose logits are held at once (per head)
constexpr int kMicroRows = 4;      // register block: 4 query rows ...
constexpr int kKeyTile = 16;       // ... by 16 keys (keys are packed in tiles of 16)
constexpr float kLog2e = 1.4426950408889634f;

SPOT_CPU_INLINE Vec8 load8(const float* source) {
  Vec8 value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

SPOT_CPU_INLINE void store8(float* target, Vec8 value) { std::memcpy(target, &value, sizeof(value)); }

SPOT_CPU_INLINE Vec8 splat(float value) { return Vec8{} + value; }

SPOT_CPU_INLINE float horizontal_max(Vec8 value) {
  float result = value[0];
  for (int i = 1; i < 8; ++i) result = std::max(result, value[i]);
  return result;
}

SPOT_CPU_INLINE float horizontal_sum(Vec8 value) {
  return ((value[0] + value[1]) + (value[2] + value[3])) + ((value[4] + value[5]) + (value[6] + value[7]));
}

// 2^x for x <= 0 (logits minus their row max), relative error ~1e-7; x < -125 (including -inf)
// gives 0. Round-to-nearest splits x = n + f with |f| <= 1/2; 2^f is its degree-7 Taylor
// polynomial (truncation error < 6e-9) and 2^n goes straight into the exponent bits.
SPOT_CPU_INLINE Vec8 exp2_nonpositive(Vec8 x) {
  const Vec8 lowest = splat(-125.f);
  const IntVec8 underflow = x < lowest;
  x = x < lowest ? lowest : x;
  const Vec8 round_magic = splat(12582912.f);  // 1.5 * 2^23: x + magic rounds x to an integer
  const Vec8 rounded = (x + round_magic) - round_magic;
  const Vec8 f = x - rounded;
  Vec8 p = splat(1.525273380405984e-05f);
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.f;
  IntVec8 bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(rounded, IntVec8) << 23;
  bits &= ~underflow;
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// logits[r][c] (row stride `stride`) = query[r] . key c, for 4 query rows of `dim` floats and a
// packed key tile of 16 keys ([dim][16]).
SPOT_CPU_INLINE void logits_4x16(const float* query, int dim, const float* key_tile, float* logits,
                                 int64_t stride) {
  Vec8 acc00{}, acc01{}, acc10{}, acc11{}, acc20{}, acc21{}, acc30{}, acc31{};
  for (int k = 0; k < dim; ++k) {
    const Vec8 key_lo = load8(key_tile + k * kKeyTile);
    const Vec8 key_hi = load8(key_tile + k * kKeyTile + 8);
    const Vec8 q0 = splat(query[k]), q1 = splat(query[dim + k]);
    const Vec8 q2 = splat(query[2 * dim + k]), q3 = splat(query[3 * dim + k]);
    acc00 += q0 * key_lo; acc01 += q0 * key_hi;
    acc10 += q1 * key_lo; acc11 += q1 * key_hi;
    acc20 += q2 * key_lo; acc21 += q2 * key_hi;
    acc30 += q3 * key_lo; acc31 += q3 * key_hi;
  }
  store8(logits, acc00); store8(logits + 8, acc01);
  store8(logits + stride, acc10); store8(logits + stride + 8, acc11);
  store8(logits + 2 * stride, acc20); store8(logits + 2 * stride + 8, acc21);
  store8(logits + 3 * stride, acc30); store8(logits + 3 * stride + 8, acc31);
}

// logits [num_rows rounded up to 4][num_key_tiles * 16] for `query` [rows][dim] (zero rows pad
// to a multiple of 4) against packed key tiles [num_key_tiles][dim][16].
SPOT_CPU_CLONES void compute_logits(const float* query, int num_rows, int dim, const float* packed_keys,
                                    int num_key_tiles, float* logits, int64_t stride) {
  for (int tile = 0; tile < num_key_tiles; ++tile) {
    const float* key_tile = packed_keys + int64_t(tile) * dim * kKeyTile;
    for (int row = 0; row < num_rows; row += kMicroRows) {
      logits_4x16(query + int64_t(row) * dim, dim, key_tile, logits + row * stride + tile * kKeyTile, stride);
    }
  }
}

// One query row at causal position `token`: logits[0, token] are visible (log2 domain).
// Adds its per-key-block attention mass to mass_row[0, num_blocks(token + 1)]. `logits` must
// have room up to token + 1 rounded up to 8; that padding is overwritten.
SPOT_CPU_CLONES void accumulate_row(float* logits, int token, int block_size_k, float* block_sums,
                                    double* mass_row) {
  const int visible = token + 1;
  const int padded = (visible + 7) & ~7;
  for (int c = visible; c < padded; ++c) logits[c] = -std::numeric_limits<float>::infinity();
  Vec8 max_vec = splat(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < padded; c += 8) {
    const Vec8 value = load8(logits + c);
    max_vec = value > max_vec ? value : max_vec;
  }
  const float row_max = horizontal_max(max_vec);
  const Vec8 row_max_vec = splat(row_max);
  const int num_blocks = (visible + block_size_k - 1) / block_size_k;
  double total = 0;
  for (int block = 0; block < num_blocks; ++block) {
    const int begin = block * block_size_k;
    const int end = std::min(begin + block_size_k, padded);  // padding past `visible` adds 0
    Vec8 sum{};
    int c = begin;
    for (; c + 8 <= end; c += 8) sum += exp2_nonpositive(load8(logits + c) - row_max_vec);
    float block_sum = horizontal_sum(sum);
    for (; c < end; ++c) block_sum += std::exp2(logits[c] - row_max);
    block_sums[block] = block_sum;
    total += block_sum;
  }
  const double inverse_total = 1.0 / total;
  for (int block = 0; block < num_blocks; ++block) mass_row[block] += block_sums[block] * inverse_total;
}

// A run of whole query blocks [first_token, end_token) of one sequence and KV group.
struct Task {
  int batch_index = 0, kv_head = 0, first_token = 0, end_token = 0;
  double cost = 0;
};

struct Scratch {
  std::vector<float> query;       // [kRowsPerChunk][dim]
  std::vector<float> logits;      // [kRowsPerChunk][stride]
  std::vector<float> block_sums;  // [num_key_blocks]
  std::vector<double> mass;       // [query blocks of a task][num_key_blocks]
};

template <typename scalar_t>
class BlockMassCpu {
 public:
  explicit BlockMassCpu(const BlockMassParams& params)
      : params_(params),
        group_(params.heads_q / params.heads_kv),
        dim_(params.head_dim),
        stride_(int64_t(params.max_seqlen + kKeyTile - 1) / kKeyTile * kKeyTile) {}

  void run() {
    pack_keys();
    build_tasks();
    std::atomic<int64_t> next_task{0};
    const int64_t num_tasks = int64_t(tasks_.size());
    // Dynamic scheduling, most expensive tasks first: causal tasks differ in cost by up to L/64x.
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      scratch.query.assign(size_t(kRowsPerChunk) * dim_, 0.f);
      scratch.logits.assign(size_t(kRowsPerChunk) * stride_, 0.f);
      scratch.block_sums.assign(size_t(params_.num_key_blocks), 0.f);
      for (int64_t worker = begin; worker < end; ++worker) {
        for (int64_t index = next_task++; index < num_tasks; index = next_task++) {
          run_task(tasks_[size_t(index)], scratch);
        }
      }
    });
  }

 private:
  int sequence_start(int b) const { return params_.cu_seqlens[b]; }
  int sequence_length(int b) const { return params_.cu_seqlens[b + 1] - params_.cu_seqlens[b]; }

  // Keys as float tiles of 16: packed_[key_offset_[b] + g * tiles(b) * dim * 16 + ...], zero past
  // the sequence end.
  void pack_keys() {
    const int heads_kv = params_.heads_kv;
    key_offset_.assign(size_t(params_.batch) + 1, 0);
    for (int b = 0; b < params_.batch; ++b) {
      const int64_t tiles = (sequence_length(b) + kKeyTile - 1) / kKeyTile;
      key_offset_[b + 1] = key_offset_[b] + tiles * heads_kv * dim_ * kKeyTile;
    }
    packed_.assign(size_t(key_offset_[params_.batch]), 0.f);
    const auto* key = static_cast<const scalar_t*>(params_.key);
    at::parallel_for(0, int64_t(params_.batch) * heads_kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int b = int(pair / heads_kv), g = int(pair % heads_kv);
        const int length = sequence_length(b);
        const int64_t tiles = (length + kKeyTile - 1) / kKeyTile;
        float* packed = packed_.data() + key_offset_[b] + g * tiles * dim_ * kKeyTile;
        for (int s = 0; s < length; ++s) {
          const scalar_t* row = key + (int64_t(sequence_start(b) + s) * heads_kv + g) * dim_;
          float* tile = packed + int64_t(s / kKeyTile) * dim_ * kKeyTile + s % kKeyTile;
          for (int k = 0; k < dim_; ++k) tile[int64_t(k) * kKeyTile] = to_float(row[k]);
        }
      }
    });
  }

  void build_tasks() {
    const int block_q = params_.block_size_q;
    // At least 64 tokens per task where the block allows, so per-task overhead stays small.
    const int tokens_per_task = block_q * std::max(1, 64 / block_q);
    for (int b = 0; b < params_.batch; ++b) {
      const int length = sequence_length(b);
      for (int g = 0; g < params_.heads_kv; ++g) {
        for (int first = 0; first < length; first += tokens_per_task) {
          Task task;
          task.batch_index = b;
          task.kv_head = g;
          task.first_token = first;
          task.end_token = std::min(first + tokens_per_task, length);
          task.cost = double(task.end_token - first) * (double(first + task.end_token) / 2 + 16);
          tasks_.push_back(task);
        }
      }
    }
    std::stable_sort(tasks_.begin(), tasks_.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  }

  void run_task(const Task& task, Scratch& scratch) const {
    const int b = task.batch_index, g = task.kv_head;
    const int start = sequence_start(b), length = sequence_length(b);
    const int block_q = params_.block_size_q, num_key_blocks = params_.num_key_blocks;
    const int num_local_blocks = (task.end_token - task.first_token + block_q - 1) / block_q;
    scratch.mass.assign(size_t(num_local_blocks) * num_key_blocks, 0.0);
    const int64_t key_tiles = (length + kKeyTile - 1) / kKeyTile;
    const float* packed = packed_.data() + key_offset_[b] + g * key_tiles * dim_ * kKeyTile;
    const auto* query = static_cast<const scalar_t*>(params_.query);
    const float query_scale = params_.softmax_scale * kLog2e;

    for (int chunk = task.first_token; chunk < task.end_token; chunk += kRowsPerChunk) {
      const int rows = std::min(kRowsPerChunk, task.end_token - chunk);
      const int padded_rows = (rows + kMicroRows - 1) / kMicroRows * kMicroRows;
      const int visible_tiles = (chunk + rows + kKeyTile - 1) / kKeyTile;
      for (int h = g * group_; h < (g + 1) * group_; ++h) {
        for (int r = 0; r < padded_rows; ++r) {
          float* target = scratch.query.data() + int64_t(r) * dim_;
          if (r >= rows) {
            std::fill(target, target + dim_, 0.f);
            continue;
          }
          const scalar_t* row = query + (int64_t(start + chunk + r) * params_.heads_q + h) * dim_;
          for (int k = 0; k < dim_; ++k) target[k] = to_float(row[k]) * query_scale;
        }
        compute_logits(scratch.query.data(), padded_rows, dim_, packed, visible_tiles, scratch.logits.data(),
                       stride_);
        for (int r = 0; r < rows; ++r) {
          const int token = chunk + r;
          double* mass_row = scratch.mass.data() + int64_t((token - task.first_token) / block_q) * num_key_blocks;
          accumulate_row(scratch.logits.data() + r * stride_, token, params_.block_size_k,
                         scratch.block_sums.data(), mass_row);
        }
      }
    }

    const int key_blocks_here = (length + params_.block_size_k - 1) / params_.block_size_k;
    for (int local = 0; local < num_local_blocks; ++local) {
      const int query_block = task.first_token / block_q + local;
      const int rows = std::min(block_q, length - query_block * block_q);
      const double weight = 1.0 / (double(group_) * rows);
      float* out = params_.mass +
                   ((int64_t(b) * params_.heads_kv + g) * params_.num_query_blocks + query_block) * num_key_blocks;
      const double* sums = scratch.mass.data() + int64_t(local) * num_key_blocks;
      for (int j = 0; j < key_blocks_here; ++j) out[j] = float(sums[j] * weight);
    }
  }

  const BlockMassParams& params_;
  const int group_;
  const int dim_;
  const int64_t stride_;  // logits row stride: max_seqlen rounded up to a key tile
  std::vector<int64_t> key_offset_;
  std::vector<float> packed_;
  std::vector<Task> tasks_;
};

}  // namespace

void block_mass_cpu(const BlockMassParams& params) {
  SPOT_DISPATCH_FLOAT(params.dtype, scalar_t, BlockMassCpu<scalar_t>(params).run());
}

}  // namespace spot
