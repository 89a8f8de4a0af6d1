// Entries of spot.pack_kcache, spot.unpack_kcache and spot.append_kcache: the 4-bit selector
// K-cache (include/spot/kcache_format.h has the bit layouts). Validate once, fill
// KCachePackParams, run the CPU kernel or the CUDA launcher by device.
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "launchers.h"
#include "ops.h"
#include "torch_utils.h"

namespace spot {
namespace {

// Values per key row must fill whole scale groups of every format and whole code bytes.
constexpr int64_t kDimMultiple = 32;

at::ScalarType scale_dtype(KCacheFormat format) { return format == KCacheFormat::kInt4 ? at::kHalf : at::kByte; }

const char* scale_dtype_name(KCacheFormat format) {
  return format == KCacheFormat::kInt4 ? "float16 (int4 scales)" : "uint8 (E8M0 / E4M3 scale bytes)";
}

void check_cpu_or_cuda(const at::Tensor& tensor, const char* op, const char* arg) {
  SPOT_CHECK_ARG(tensor.is_cpu() || tensor.is_cuda(), op, arg, "must be on CPU or CUDA, got ", tensor.device());
}

void check_global_scale(KCacheFormat format, double global_scale, const char* op) {
  if (format != KCacheFormat::kNvfp4) return;  // only nvfp4 reads it
  SPOT_CHECK_ARG(std::isfinite(global_scale) && global_scale > 0, op, "global_scale",
                 "must be positive and finite for nvfp4, got ", global_scale);
}

void check_dim_multiple(int64_t dim, const at::Tensor& tensor, const char* op, const char* arg,
                        const char* what) {
  SPOT_CHECK_ARG(dim > 0 && dim % kDimMultiple == 0, op, arg, "last dim (", what, ") must be a positive multiple of ",
                 kDimMultiple, ", got shape ", tensor.sizes());
}

// Key rows in float32 (CPU and CUDA), float16 or bfloat16.
DType check_keys(const at::Tensor& keys, const char* op) {
  check_cpu_or_cuda(keys, op, "keys");
  SPOT_CHECK_ARG(keys.dim() >= 1, op, "keys", "must have at least one dim [..., r], got a 0-d tensor");
  const DType dtype = to_spot_dtype(keys, /*allow_float32=*/true, op, "keys");
  check_dim_multiple(keys.size(-1), keys, op, "keys", "r");
  check_contiguous(keys, op, "keys");
  return dtype;
}

void check_scales(const at::Tensor& scales, const at::Tensor& codes, KCacheFormat format, int64_t dim,
                  const char* op) {
  check_device(scales, codes, op, "scales");
  SPOT_CHECK_ARG(scales.scalar_type() == scale_dtype(format), op, "scales", "must be ", scale_dtype_name(format),
                 " for this format, got ", scales.scalar_type());
  std::vector<int64_t> expected(codes.sizes().begin(), codes.sizes().end());
  expected.back() = dim / kcache_group_size(format);
  SPOT_CHECK_ARG(scales.sizes() == at::IntArrayRef(expected), op, "scales", "must have shape ",
                 at::IntArrayRef(expected), " (codes' leading dims, r / ", kcache_group_size(format),
                 " groups), got ", scales.sizes());
  check_contiguous(scales, op, "scales");
}

void check_codes(const at::Tensor& codes, const char* op) {
  check_cpu_or_cuda(codes, op, "codes");
  SPOT_CHECK_ARG(codes.dim() >= 1, op, "codes", "must have at least one dim [..., r / 2], got a 0-d tensor");
  check_dtype(codes, at::kByte, op, "codes");
  check_contiguous(codes, op, "codes");
}

KCachePackParams make_params(KCacheFormat format, double global_scale, int64_t num_rows, int64_t dim) {
  KCachePackParams params;
  params.format = format;
  params.global_scale = global_scale;
  params.num_rows = num_rows;
  params.dim = int(dim);
  return params;
}

void check_dim_fits(int64_t dim, const at::Tensor& tensor, const char* op, const char* arg) {
  SPOT_CHECK_ARG(dim <= (int64_t(1) << 24), op, arg, "last dim (r) must be at most 2^24, got shape ",
                 tensor.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_kcache(const at::Tensor& keys, std::string_view format_name,
                                               double global_scale) {
  constexpr const char* kOp = "pack_kcache";
  const KCacheFormat format = parse_kcache_format(format_name, /*allow_dense=*/false, kOp);
  check_global_scale(format, global_scale, kOp);
  const DType dtype = check_keys(keys, kOp);
  const int64_t dim = keys.size(-1);
  check_dim_fits(dim, keys, kOp, "keys");

  std::vector<int64_t> code_shape(keys.sizes().begin(), keys.sizes().end());
  std::vector<int64_t> scale_shape = code_shape;
  code_shape.back() = dim / 2;
  scale_shape.back() = dim / kcache_group_size(format);
  at::Tensor codes = at::empty(code_shape, keys.options().dtype(at::kByte));
  at::Tensor scales = at::empty(scale_shape, keys.options().dtype(scale_dtype(format)));
  const int64_t num_rows = keys.numel() / dim;
  if (num_rows == 0) return {codes, scales};

  KCachePackParams params = make_params(format, global_scale, num_rows, dim);
  params.keys = keys.data_ptr();
  params.key_dtype = dtype;
  params.codes = codes.data_ptr<uint8_t>();
  params.scales = scales.data_ptr();
  run_on_device(params, keys, kOp, "keys", pack_kcache_cpu, SPOT_CUDA_LAUNCHER(pack_kcache_cuda));
  return {codes, scales};
}

at::Tensor unpack_kcache(const at::Tensor& codes, const at::Tensor& scales, std::string_view format_name,
                         double global_scale) {
  constexpr const char* kOp = "unpack_kcache";
  const KCacheFormat format = parse_kcache_format(format_name, /*allow_dense=*/false, kOp);
  check_global_scale(format, global_scale, kOp);
  check_codes(codes, kOp);
  const int64_t dim = codes.size(-1) * 2;
  SPOT_CHECK_ARG(dim > 0 && dim % kDimMultiple == 0, kOp, "codes", "last dim (r / 2) must be a positive multiple of ",
                 kDimMultiple / 2, ", got shape ", codes.sizes());
  check_dim_fits(dim, codes, kOp, "codes");
  check_scales(scales, codes, format, dim, kOp);

  std::vector<int64_t> out_shape(codes.sizes().begin(), codes.sizes().end());
  out_shape.back() = dim;
  at::Tensor unpacked = at::empty(out_shape, codes.options().dtype(at::kFloat));
  const int64_t num_rows = codes.numel() / (dim / 2);
  if (num_rows == 0) return unpacked;

  KCachePackParams params = make_params(format, global_scale, num_rows, dim);
  params.codes = const_cast<uint8_t*>(codes.data_ptr<uint8_t>());
  params.scales = scales.data_ptr();
  params.unpacked = unpacked.data_ptr<float>();
  run_on_device(params, codes, kOp, "codes", unpack_kcache_cpu, SPOT_CUDA_LAUNCHER(unpack_kcache_cuda));
  return unpacked;
}

void append_kcache(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& keys, const at::Tensor& slots,
                   std::string_view format_name, double global_scale) {
  constexpr const char* kOp = "append_kcache";
  const KCacheFormat format = parse_kcache_format(format_name, /*allow_dense=*/false, kOp);
  check_global_scale(format, global_scale, kOp);
  check_codes(codes, kOp);
  check_dim(codes, 4, kOp, "codes", "[batch, heads_kv, num_key_blocks, r / 2]");
  const DType dtype = check_keys(keys, kOp);
  check_dim(keys, 3, kOp, "keys", "[batch, heads_kv, r]");
  check_device(keys, codes, kOp, "keys");
  const int64_t batch = keys.size(0), heads = keys.size(1), dim = keys.size(2);
  check_dim_fits(dim, keys, kOp, "keys");
  check_size(codes, 0, batch, kOp, "codes", "batch, as keys");
  check_size(codes, 1, heads, kOp, "codes", "heads_kv, as keys");
  check_size(codes, 3, dim / 2, kOp, "codes", "r / 2, keys' last dim halved");
  check_scales(scales, codes, format, dim, kOp);
  check_device(slots, codes, kOp, "slots");
  check_dim(slots, 1, kOp, "slots", "[batch]");
  check_dtype(slots, at::kInt, kOp, "slots");
  check_size(slots, 0, batch, kOp, "slots", "batch, as keys");
  check_contiguous(slots, kOp, "slots");
  const int64_t num_key_blocks = codes.size(2);
  SPOT_CHECK_ARG(batch <= INT32_MAX && heads <= INT32_MAX && num_key_blocks <= INT32_MAX, kOp, "codes",
                 "dims must fit int32, got shape ", codes.sizes());
  if (slots.is_cpu()) {
    // A CUDA slot past the cache cannot be checked without a device sync (the op is graph
    // capturable); the CUDA kernel skips it instead.
    const int32_t* slot_values = slots.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      SPOT_CHECK_ARG(slot_values[b] < num_key_blocks, kOp, "slots", "entry ", b, " is ", slot_values[b],
                     ", past the cache's ", num_key_blocks, " key blocks (negative skips the sequence)");
    }
  }
  if (batch * heads == 0 || num_key_blocks == 0) return;

  KCachePackParams params = make_params(format, global_scale, batch * heads, dim);
  params.keys = keys.data_ptr();
  params.key_dtype = dtype;
  params.codes = codes.data_ptr<uint8_t>();
  params.scales = scales.data_ptr();
  params.slots = slots.data_ptr<int32_t>();
  params.batch = int(batch);
  params.heads = int(heads);
  params.num_key_blocks = int(num_key_blocks);
  run_on_device(params, codes, kOp, "codes", append_kcache_cpu, SPOT_CUDA_LAUNCHER(append_kcache_cuda));
}

}  // namespace spot
