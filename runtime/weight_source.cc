// Weight lookup and conversion for model loading.
#include "runtime/weight_source.h"

#include <ATen/ATen.h>

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
  LATHE_ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::Open(dir));
  return WeightSource(std::shared_ptr<SafetensorsCheckpoint>(std::move(ckpt)), type);
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
  if (!ckpt_->Contains(name)) {
    return absl::DataLossError(absl::StrCat("checkpoint lacks tensor '", name, "'"));
  }
  LATHE_ASSIGN_OR_RETURN(TensorView view, ckpt_->Get(name));
  if (view.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape [",
                                                   absl::StrJoin(view.shape, ", "), "], expected [",
                                                   absl::StrJoin(shape, ", "), "]"));
  }
  return TensorFromView(view, slice, type);
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
