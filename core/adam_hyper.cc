// Defaults and range checks of the AdamW hyperparameters.
#include "core/adam_hyper.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "core/validation.h"

namespace lathe::runtime {
namespace {

absl::Status Check(bool ok, const char* field, const char* rule) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("adam_params.", field, " ", rule));
}

}  // namespace

absl::StatusOr<AdamHyper> AdamHyperFromProto(const lathe::v1::AdamParams& p) {
  AdamHyper h;
  if (p.has_learning_rate()) h.learning_rate = p.learning_rate();
  if (p.has_beta1()) h.beta1 = p.beta1();
  if (p.has_beta2()) h.beta2 = p.beta2();
  if (p.has_eps()) h.eps = p.eps();
  if (p.has_weight_decay()) h.weight_decay = p.weight_decay();
  if (p.has_grad_clip_norm()) h.grad_clip_norm = p.grad_clip_norm();
  // The step computes in float32: each value must be a finite float32, and
  // eps (a divisor) a normal one.
  for (auto [v, name] : {std::pair{h.learning_rate, "learning_rate"}, {h.beta1, "beta1"},
                         {h.beta2, "beta2"}, {h.eps, "eps"}, {h.weight_decay, "weight_decay"},
                         {h.grad_clip_norm, "grad_clip_norm"}}) {
    LATHE_RETURN_IF_ERROR(CheckFloat32(v, absl::StrCat("adam_params.", name), /*normal=*/true));
  }
  if (auto s = Check(h.learning_rate >= 0, "learning_rate", "must be >= 0"); !s.ok()) return s;
  if (auto s = Check(h.beta1 >= 0 && h.beta1 < 1, "beta1", "must be in [0, 1)"); !s.ok()) return s;
  if (auto s = Check(h.beta2 >= 0 && h.beta2 < 1, "beta2", "must be in [0, 1)"); !s.ok()) return s;
  if (auto s = Check(h.eps > 0, "eps", "must be > 0"); !s.ok()) return s;
  if (auto s = Check(h.weight_decay >= 0, "weight_decay", "must be >= 0"); !s.ok()) return s;
  if (auto s = Check(h.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0"); !s.ok()) return s;
  // Decoupled decay multiplies each weight by 1 - lr * weight_decay.
  if (auto s = Check(h.learning_rate * h.weight_decay <= 1, "weight_decay",
                     "times learning_rate must be <= 1 (the decay factor 1 - lr * weight_decay would be negative)");
      !s.ok()) {
    return s;
  }
  return h;
}

}  // namespace lathe::runtime
