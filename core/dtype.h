// The precision a deployment computes in, chosen once per deployment
// (dp_worker --dtype) and fixed when a model is loaded.
#ifndef LATHE_CORE_DTYPE_H_
#define LATHE_CORE_DTYPE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lathe::runtime {

// kFloat32: every weight, activation and gradient in fp32.
// kBFloat16: frozen base weights and activations in bf16 (matrix products
// accumulate in fp32), the trainable state in fp32 (LoRA A/B, fp32 master
// copies of fully fine-tuned weights, gradients, Adam moments), and norms,
// softmaxes, RoPE tables, router scores, logprobs and losses computed in fp32.
// docs/runtime.md ("Precision") has the whole list.
enum class Dtype { kFloat32, kBFloat16 };

// The default of a deployment: bfloat16 on a GPU, float32 on CPU ranks.
Dtype DefaultDtype(bool on_gpu);

// "float32" or "bfloat16"; the empty string is DefaultDtype(on_gpu).
// InvalidArgument naming the value otherwise.
absl::StatusOr<Dtype> ParseDtype(absl::string_view name, bool on_gpu);

// "float32" or "bfloat16".
const char* DtypeName(Dtype dtype);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_DTYPE_H_
