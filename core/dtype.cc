// Parsing and naming of the compute dtype.
#include "core/dtype.h"

#include "absl/strings/str_cat.h"

namespace lathe::runtime {

Dtype DefaultDtype(bool on_gpu) { return on_gpu ? Dtype::kBFloat16 : Dtype::kFloat32; }

absl::StatusOr<Dtype> ParseDtype(absl::string_view name, bool on_gpu) {
  if (name.empty()) return DefaultDtype(on_gpu);
  if (name == "float32") return Dtype::kFloat32;
  if (name == "bfloat16") return Dtype::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype must be float32 or bfloat16 (empty: the device's default), not '", name, "'"));
}

const char* DtypeName(Dtype dtype) { return dtype == Dtype::kBFloat16 ? "bfloat16" : "float32"; }

}  // namespace lathe::runtime
