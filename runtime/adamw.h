// AdamW with decoupled weight decay and global-norm clipping, computed as
// torch.optim.AdamW does (single-tensor path), with fp32 state.
#ifndef LATHE_RUNTIME_ADAMW_H_
#define LATHE_RUNTIME_ADAMW_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"
#include "runtime/decoder_model.h"

namespace lathe::runtime {

struct AdamHyper {
  double learning_rate = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-12;
  double weight_decay = 0.0;
  double grad_clip_norm = 0.0;  // 0 = off
};

// Defaults for unset fields. InvalidArgument naming the field for a
// non-finite value, lr < 0, betas outside [0, 1), eps <= 0, decay < 0 or
// clip < 0.
absl::StatusOr<AdamHyper> AdamHyperFromProto(const lathe::v1::AdamParams& params);

struct AdamStepResult {
  double grad_norm = 0.0;  // global L2 norm before clipping
  int64_t step = 0;        // optimizer steps taken, this one included
};

// Optimizer state for a fixed list of trainable parameters. A parameter whose
// gradient is undefined is skipped, as torch does. A stacked expert tensor is
// one parameter, as in transformers 5.x: an expert that received no tokens
// has a zero gradient and still moves with its momentum.
class AdamW {
 public:
  // `global_norm`, when given, replaces the local gradient norm (a sharded
  // model's norm over every rank).
  AdamStepResult Step(std::vector<TrainableParam>& params, const AdamHyper& hyper,
                      const std::function<double()>& global_norm = nullptr);
  int64_t step() const { return step_; }

  // The state of parameter i.
  struct State {
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
    int64_t step = 0;
  };
  std::vector<State>& states() { return states_; }

 private:
  void Update(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
              int64_t step, const AdamHyper& hyper);
  std::vector<State> states_;
  int64_t step_ = 0;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_ADAMW_H_
