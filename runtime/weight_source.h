// Reads model weights from a Hugging Face safetensors folder into tensors of
// one dtype (fp32, or bf16 under --dtype bfloat16), checking names and shapes, and accepting both the per-expert and
// the fused (transformers 5.x) layouts of MoE experts.
#ifndef LATHE_RUNTIME_WEIGHT_SOURCE_H_
#define LATHE_RUNTIME_WEIGHT_SOURCE_H_

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/quantization.h"
#include "core/safetensors.h"

namespace lathe::runtime {

// A contiguous range along one dimension of a tensor; dim -1 is the whole tensor.
struct Slice {
  int dim = -1;
  int64_t begin = 0;
  int64_t size = 0;
};

// Where a model's tensors come from, by Hugging Face name: a checkpoint
// folder (WeightSource), or a generator that makes them up (the tiny models
// of runtime/tiny_model.h).
class TensorSource {
 public:
  virtual ~TensorSource() = default;

  // The tensor `name`, whose full shape must be exactly `shape`, as the
  // source's type; only `slice` of it is made. DataLoss when the source
  // lacks it, InvalidArgument when its shape differs; both name the tensor.
  virtual absl::StatusOr<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape,
                                          Slice slice = {}) const = 0;

  // Take's tensor in fp32 whatever the source's type: exact from an fp32
  // file under a bf16 source (buffers transformers keeps in fp32).
  virtual absl::StatusOr<at::Tensor> TakeFloat32(const std::string& name, std::vector<int64_t> shape,
                                                 Slice slice = {}) const;
  // Experts [first, first + count) of the MoE layer whose mlp prefix is `mlp`
  // ("model.layers.3.mlp") of `experts` in all (count -1: to the end):
  // gate [count, I, H], up [count, I, H], down [count, H, I].
  struct Experts {
    at::Tensor gate, up, down;
  };
  virtual absl::StatusOr<Experts> TakeExperts(const std::string& mlp, int64_t experts, int64_t inter,
                                              int64_t hidden, int64_t first = 0, int64_t count = -1) const = 0;
};

// Quantized checkpoints (config.json `quantization_config`, core/quantization.h)
// are dequantized as they are read: the model asks for "X.weight" and gets
// the exact dequantized values, rounded once to the run's dtype, whether the
// file holds X.weight as F8_E4M3 with X.weight_scale_inv (block FP8) or
// X.weight_packed / X.weight_scale / X.weight_shape (pack-quantized INT).
// The file says which tensors are quantized; the scale tensors are never
// served as weights.
class WeightSource : public TensorSource {
 public:
  // Tensors are returned as `type` (kFloat or kBFloat16), converted from
  // whatever dtype the files hold. Reads <dir>/config.json's
  // quantization_config (InvalidArgument for one lathe does not read).
  static absl::StatusOr<WeightSource> Open(const std::string& dir, at::ScalarType type = at::kFloat);

  // Reads only the slice's bytes from the mapping (for a quantized weight,
  // dequantizes only the slice). DataLoss naming the tensor for quantized data
  // without a matching quantization_config, for a module the config lists as
  // not converted, a missing or misshapen scale, or an unsupported dtype.
  absl::StatusOr<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape,
                                  Slice slice = {}) const override;
  absl::StatusOr<at::Tensor> TakeFloat32(const std::string& name, std::vector<int64_t> shape,
                                         Slice slice = {}) const override;
  // Per-expert or fused (transformers 5.x) layouts alike.
  absl::StatusOr<Experts> TakeExperts(const std::string& mlp, int64_t experts, int64_t inter, int64_t hidden,
                                      int64_t first = 0, int64_t count = -1) const override;

 private:
  WeightSource(std::shared_ptr<SafetensorsCheckpoint> ckpt, at::ScalarType type, QuantizationConfig quant)
      : ckpt_(std::move(ckpt)), type_(type), quant_(std::move(quant)) {}
  // Take and TakeFloat32: the tensor as `type`.
  absl::StatusOr<at::Tensor> TakeAs(const std::string& name, const std::vector<int64_t>& shape, Slice slice,
                                    at::ScalarType type) const;
  absl::StatusOr<at::Tensor> TakeFp8(const TensorView& weight, const std::string& scale_name, Slice slice,
                                     at::ScalarType type) const;
  absl::StatusOr<at::Tensor> TakePacked(const std::string& name, const std::string& module,
                                        const std::vector<int64_t>& shape, Slice slice, at::ScalarType type) const;
  // OK when `name` (of module `module`) may be stored as `method` says.
  absl::Status CheckQuantized(const std::string& name, const std::string& module, QuantMethod method) const;

  std::shared_ptr<SafetensorsCheckpoint> ckpt_;
  at::ScalarType type_;
  QuantizationConfig quant_;
};

// A copy of `slice` of a safetensors view as `type` (fp32 by default).
// InvalidArgument for an unsupported dtype.
absl::StatusOr<at::Tensor> TensorFromView(const TensorView& view, Slice slice = {}, at::ScalarType type = at::kFloat);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_WEIGHT_SOURCE_H_
