// Reads model weights from a Hugging Face safetensors folder into fp32
// tensors, checking names and shapes, and accepting both the per-expert and
// the fused (transformers 5.x) layouts of MoE experts.
#ifndef LATHE_RUNTIME_WEIGHT_SOURCE_H_
#define LATHE_RUNTIME_WEIGHT_SOURCE_H_

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/safetensors.h"

namespace lathe::runtime {

class WeightSource {
 public:
  static absl::StatusOr<WeightSource> Open(const std::string& dir);

  // The tensor `name` as fp32 with exactly `shape`. DataLoss when the folder
  // lacks it, InvalidArgument when its shape differs; both name the tensor.
  absl::StatusOr<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape) const;

  // Experts of the MoE layer whose mlp prefix is `mlp` ("model.layers.3.mlp"):
  // gate [E, I, H], up [E, I, H], down [E, H, I].
  struct Experts {
    at::Tensor gate, up, down;
  };
  absl::StatusOr<Experts> TakeExperts(const std::string& mlp, int64_t experts, int64_t inter,
                                      int64_t hidden) const;

 private:
  explicit WeightSource(std::shared_ptr<SafetensorsCheckpoint> ckpt) : ckpt_(std::move(ckpt)) {}
  std::shared_ptr<SafetensorsCheckpoint> ckpt_;
};

// An fp32 copy of a safetensors view. InvalidArgument for an unsupported dtype.
absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_WEIGHT_SOURCE_H_
