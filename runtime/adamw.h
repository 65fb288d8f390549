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
#include "core/adam_hyper.h"
#include "runtime/decoder_model.h"

namespace lathe::runtime {

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
  struct StepHooks {
    // Replaces the local gradient norm (a sharded model's norm over every rank).
    std::function<double()> global_norm;
    // Given whether this rank's update is finite, whether every rank's is
    // (collective); null: this rank alone.
    std::function<bool(bool)> all_agree;
  };
  // Applies one step and clears the gradients. A step that would leave a
  // weight or moment non-finite, or whose gradient norm is not finite, is
  // refused (FailedPrecondition): weights, moments and the step count are
  // unchanged and the gradients are cleared.
  absl::StatusOr<AdamStepResult> Step(std::vector<TrainableParam>& params, const AdamHyper& hyper,
                                      const StepHooks& hooks = {});
  int64_t step() const { return step_; }

  // The state of parameter i.
  struct State {
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
    int64_t step = 0;
    // Upper bounds of |param|, |exp_avg| and exp_avg_sq, kept across steps
    // so that most steps are proven finite without touching the tensors; < 0:
    // not known (a fresh or restored state), measured when next needed.
    double param_bound = -1, exp_avg_bound = -1, exp_avg_sq_bound = -1;
  };
  std::vector<State>& states() { return states_; }
  // Replaces the whole state (a checkpoint's). REQUIRES: one State per
  // parameter, shaped like it.
  void Restore(int64_t step, std::vector<State> states) {
    step_ = step;
    states_ = std::move(states);
  }
  // Forgets everything: the next Step starts from zero moments at step 1.
  void Reset() {
    step_ = 0;
    states_.clear();
  }

 private:
  // Whether the step is proven finite by the states' bounds and `grad_bound`
  // (>= every |gradient| element); on true the bounds hold the step's. False
  // means only "not proven".
  bool BoundsProveFinite(const std::vector<TrainableParam>& params, const AdamHyper& hyper, double grad_bound);
  // Whether the step is finite, computed aside (exact, costs a step).
  bool UpdateIsFinite(const std::vector<TrainableParam>& params, const AdamHyper& hyper);
  void Update(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
              int64_t step, const AdamHyper& hyper);
  std::vector<State> states_;
  int64_t step_ = 0;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_ADAMW_H_
