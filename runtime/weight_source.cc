// Weight lookup and conversion for model loading.
#include "runtime/weight_source.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status.h"

namespace lathe::runtime {

absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view, Slice slice, at::ScalarType to) {
  at::ScalarType type;
  if (view.dtype == "F32") {
    type = at::kFloat;
  } else if (view.dtype == "BF16") {
    type = at::kBFloat16;
  } else if (view.dtype == "F16") {
    type = at::kHalf;
  } else if (view.dtype == "F64") {
    type = at::kDouble;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", view.name, "' has dtype ", view.dtype, "; expected F32, BF16 or F16"));
  }
  // from_blob does not take ownership; the copy below detaches from the mapping.
  at::Tensor t = at::from_blob(const_cast<uint8_t*>(view.data), view.shape,
                               at::TensorOptions().dtype(type));
  if (slice.dim >= 0) t = t.narrow(slice.dim, slice.begin, slice.size);
  return t.to(to, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

absl::StatusOr<WeightSource> WeightSource::Open(const std::string& dir, at::ScalarType type) {
  LATHE_ASSIGN_OR_RETURN(QuantizationConfig quant, LoadQuantizationConfig(dir));
  LATHE_ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(dir));
  return WeightSource(std::shared_ptr<SafetensorsCheckpoint>(std::move(ckpt)), type, std::move(quant));
}

namespace {

absl::Status ShapeMismatch(const std::string& name, const std::vector<int64_t>& has,
                           const std::vector<int64_t>& want) {
  return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape [", absl::StrJoin(has, ", "),
                                                 "], expected [", absl::StrJoin(want, ", "), "]"));
}

// The region of a [rows, cols] or [lead, rows, cols] weight that `slice` cuts,
// and the shape of that cut.
Region RegionOf(const std::vector<int64_t>& shape, Slice slice, std::vector<int64_t>* cut) {
  const size_t nd = shape.size();
  Region r;
  r.lead = nd == 3 ? shape[0] : 1;
  r.rows = shape[nd - 2];
  r.cols = shape[nd - 1];
  *cut = shape;
  if (slice.dim < 0) return r;
  (*cut)[slice.dim] = slice.size;
  const int axis = slice.dim + (nd == 2 ? 1 : 0);  // 0 lead, 1 rows, 2 cols
  int64_t* begin[] = {&r.lead_begin, &r.row_begin, &r.col_begin};
  int64_t* size[] = {&r.lead, &r.rows, &r.cols};
  *begin[axis] = slice.begin;
  *size[axis] = slice.size;
  return r;
}

// Dequantizes `region` (`dequantize(region, out)`) into a new tensor of shape
// `cut` and dtype `type`. Other dtypes than fp32 go through an fp32 buffer of
// at most 1 Mi elements, rounded chunk by chunk, so that a bf16 run never
// holds an fp32 copy of a whole weight.
template <typename Fn>
absl::StatusOr<at::Tensor> Dequantized(const std::vector<int64_t>& cut, const Region& region, at::ScalarType type,
                                       Fn dequantize) {
  at::Tensor out = at::empty(cut, type);
  if (type == at::kFloat) {
    LATHE_RETURN_IF_ERROR(dequantize(region, out.data_ptr<float>()));
    return out;
  }
  constexpr int64_t kChunk = int64_t{1} << 20;
  const int64_t rows_per = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, region.cols));
  std::vector<float> buffer(std::min(rows_per, region.rows) * region.cols);
  at::Tensor flat = out.view({-1});
  int64_t done = 0;
  for (int64_t l = 0; l < region.lead; ++l) {
    for (int64_t r = 0; r < region.rows; r += rows_per) {
      Region part = region;
      part.lead_begin = region.lead_begin + l, part.lead = 1;
      part.row_begin = region.row_begin + r, part.rows = std::min(rows_per, region.rows - r);
      LATHE_RETURN_IF_ERROR(dequantize(part, buffer.data()));
      flat.narrow(0, done, part.numel()).copy_(at::from_blob(buffer.data(), {part.numel()}, at::kFloat));
      done += part.numel();
    }
  }
  return out;
}

const char* MethodName(QuantMethod m) {
  return m == QuantMethod::kFp8Block ? "\"fp8\"" : "\"compressed-tensors\" pack-quantized";
}

}  // namespace

absl::Status WeightSource::CheckQuantized(const std::string& name, const std::string& module,
                                          QuantMethod method) const {
  if (quant_.method != method) {
    return absl::DataLossError(absl::StrCat(
        "tensor '", name, "' is stored quantized as ", MethodName(method), " but config.json's quantization_config ",
        quant_.method == QuantMethod::kNone ? "is absent" : absl::StrCat("says ", MethodName(quant_.method))));
  }
  if (quant_.NotConverted(module)) {
    return absl::DataLossError(absl::StrCat("tensor '", name, "' is stored quantized but quantization_config lists ",
                                            "its module '", module, "' as not converted"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> TensorSource::TakeFloat32(const std::string& name, std::vector<int64_t> shape,
                                                     Slice slice) const {
  LATHE_ASSIGN_OR_RETURN(at::Tensor t, Take(name, std::move(shape), slice));
  return t.to(at::kFloat);
}

absl::StatusOr<at::Tensor> WeightSource::Take(const std::string& name, std::vector<int64_t> shape,
                                              Slice slice) const {
  return TakeAs(name, shape, slice, type_);
}

absl::StatusOr<at::Tensor> WeightSource::TakeFloat32(const std::string& name, std::vector<int64_t> shape,
                                                     Slice slice) const {
  return TakeAs(name, shape, slice, at::kFloat);
}

absl::StatusOr<at::Tensor> WeightSource::TakeAs(const std::string& name, const std::vector<int64_t>& shape,
                                                Slice slice, at::ScalarType type) const {
  const bool weight = absl::EndsWith(name, ".weight");
  const std::string module = weight ? name.substr(0, name.size() - 7) : name;
  if (!ckpt_->Contains(name)) {
    if (weight && ckpt_->Contains(module + ".weight_packed")) return TakePacked(name, module, shape, slice, type);
    return absl::DataLossError(absl::StrCat("checkpoint lacks tensor '", name, "'"));
  }
  LATHE_ASSIGN_OR_RETURN(TensorView view, ckpt_->Get(name));
  if (view.shape != shape) return ShapeMismatch(name, view.shape, shape);
  const std::string scale = weight ? module + ".weight_scale_inv" : name + "_scale_inv";
  if (!absl::StartsWith(view.dtype, "F8_") && !ckpt_->Contains(scale)) return TensorFromView(view, slice, type);
  LATHE_RETURN_IF_ERROR(CheckQuantized(name, module, QuantMethod::kFp8Block));
  return TakeFp8(view, scale, slice, type);
}

absl::StatusOr<at::Tensor> WeightSource::TakeFp8(const TensorView& weight, const std::string& scale_name,
                                                 Slice slice, at::ScalarType type) const {
  if (!ckpt_->Contains(scale_name)) {
    return absl::DataLossError(absl::StrCat("tensor '", weight.name, "' is ", weight.dtype, " but its scale '",
                                            scale_name, "' is missing"));
  }
  if (weight.shape.size() != 2 && weight.shape.size() != 3) {
    return absl::DataLossError(absl::StrCat("tensor '", weight.name, "' is block-FP8 but not 2-D or 3-D"));
  }
  LATHE_ASSIGN_OR_RETURN(TensorView scale, ckpt_->Get(scale_name));
  std::vector<int64_t> cut;
  const Region region = RegionOf(weight.shape, slice, &cut);
  return Dequantized(cut, region, type, [&](const Region& part, float* out) {
    return DequantizeFp8Block(weight, scale, quant_.block_rows, quant_.block_cols, part, out);
  });
}

absl::StatusOr<at::Tensor> WeightSource::TakePacked(const std::string& name, const std::string& module,
                                                    const std::vector<int64_t>& shape, Slice slice,
                                                    at::ScalarType type) const {
  const std::string packed_name = module + ".weight_packed";
  LATHE_RETURN_IF_ERROR(CheckQuantized(packed_name, module, QuantMethod::kPackQuantized));
  for (const char* part : {".weight_scale", ".weight_shape"}) {
    if (!ckpt_->Contains(module + part)) {
      return absl::DataLossError(absl::StrCat("tensor '", packed_name, "' has no '", module, part, "'"));
    }
  }
  if (ckpt_->Contains(module + ".weight_zero_point")) {
    return absl::DataLossError(absl::StrCat("tensor '", packed_name, "' has a zero point; only symmetric ",
                                            "pack-quantized weights are supported"));
  }
  LATHE_ASSIGN_OR_RETURN(TensorView stored_shape, ckpt_->Get(module + ".weight_shape"));
  std::vector<int64_t> full;
  if ((stored_shape.dtype != "I64" && stored_shape.dtype != "I32") || stored_shape.shape.size() != 1) {
    return absl::DataLossError(absl::StrCat("tensor '", stored_shape.name, "' must be a 1-D I32 or I64 shape"));
  }
  for (int64_t i = 0; i < stored_shape.shape[0]; ++i) {
    if (stored_shape.dtype == "I64") {
      int64_t d;
      std::memcpy(&d, stored_shape.data + 8 * i, 8);
      full.push_back(d);
    } else {
      int32_t d;
      std::memcpy(&d, stored_shape.data + 4 * i, 4);
      full.push_back(d);
    }
  }
  if (full != shape) return ShapeMismatch(name, full, shape);
  LATHE_ASSIGN_OR_RETURN(TensorView packed, ckpt_->Get(packed_name));
  LATHE_ASSIGN_OR_RETURN(TensorView scale, ckpt_->Get(module + ".weight_scale"));
  std::vector<int64_t> cut;
  if (shape.size() != 2) return absl::DataLossError(absl::StrCat("tensor '", packed_name, "' is not a 2-D weight"));
  const Region region = RegionOf(shape, slice, &cut);
  return Dequantized(cut, region, type, [&](const Region& part, float* out) {
    return DequantizePacked(packed, scale, shape, quant_.bits, quant_.group_size, part, out);
  });
}

absl::StatusOr<WeightSource::Experts> WeightSource::TakeExperts(const std::string& mlp,
                                                                int64_t experts, int64_t inter,
                                                                int64_t hidden, int64_t first,
                                                                int64_t count) const {
  if (count < 0) count = experts - first;
  const Slice mine{0, first, count};
  Experts out;
  for (const char* suffix : {"", ".weight"}) {
    std::string fused = absl::StrCat(mlp, ".experts.gate_up_proj", suffix);
    if (!ckpt_->Contains(fused)) continue;
    LATHE_ASSIGN_OR_RETURN(at::Tensor gate_up, Take(fused, {experts, 2 * inter, hidden}, mine));
    out.gate = gate_up.narrow(1, 0, inter).contiguous();
    out.up = gate_up.narrow(1, inter, inter).contiguous();
    LATHE_ASSIGN_OR_RETURN(out.down,
                           Take(absl::StrCat(mlp, ".experts.down_proj", suffix), {experts, hidden, inter}, mine));
    return out;
  }
  std::vector<at::Tensor> gate, up, down;
  for (int64_t e = first; e < first + count; ++e) {
    std::string p = absl::StrCat(mlp, ".experts.", e, ".");
    LATHE_ASSIGN_OR_RETURN(at::Tensor g, Take(p + "gate_proj.weight", {inter, hidden}));
    LATHE_ASSIGN_OR_RETURN(at::Tensor u, Take(p + "up_proj.weight", {inter, hidden}));
    LATHE_ASSIGN_OR_RETURN(at::Tensor d, Take(p + "down_proj.weight", {hidden, inter}));
    gate.push_back(g);
    up.push_back(u);
    down.push_back(d);
  }
  out.gate = at::stack(gate);
  out.up = at::stack(up);
  out.down = at::stack(down);
  return out;
}

}  // namespace lathe::runtime
