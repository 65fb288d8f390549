// AdamW hyperparameters of one optim_step and their validation (torch-free,
// so the coordinator can refuse a bad optim_step at submit).
#ifndef LATHE_CORE_ADAM_HYPER_H_
#define LATHE_CORE_ADAM_HYPER_H_

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

struct AdamHyper {
  double learning_rate = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-12;
  double weight_decay = 0.0;
  double grad_clip_norm = 0.0;  // 0 = off
};

// Defaults for unset fields. InvalidArgument naming the field for a value
// that is not a finite, normal float32 (runtime::CheckFloat32), lr < 0,
// betas outside [0, 1), eps <= 0, decay < 0, lr * decay > 1 or clip < 0.
absl::StatusOr<AdamHyper> AdamHyperFromProto(const lathe::v1::AdamParams& params);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_ADAM_HYPER_H_
