// AdamW step; the op order follows torch's single-tensor implementation so
// that results agree to rounding.
#include "runtime/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace lathe::runtime {
void AdamW::Update(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg,
                   at::Tensor exp_avg_sq, int64_t step, const AdamHyper& h) {
  if (h.weight_decay != 0) param.mul_(1 - h.learning_rate * h.weight_decay);
  exp_avg.lerp_(grad, 1 - h.beta1);
  exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, 1 - h.beta2);
  const double bias1 = 1 - std::pow(h.beta1, static_cast<double>(step));
  const double bias2 = 1 - std::pow(h.beta2, static_cast<double>(step));
  const double step_size = h.learning_rate / bias1;
  at::Tensor denom = (exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(h.eps);
  param.addcdiv_(exp_avg, denom, -step_size);
}

namespace {

void DropGradients(std::vector<TrainableParam>& params) {
  for (TrainableParam& p : params) p.tensor.mutable_grad() = at::Tensor();
}

bool AllFinite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

}  // namespace

bool AdamW::UpdateIsFinite(const std::vector<TrainableParam>& params, const AdamHyper& h) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& grad = params[i].tensor.grad();
    if (!grad.defined()) continue;
    const State& s = states_[i];
    // The bias-corrected step size is a float32 scalar of the update.
    const double bias1 = 1 - std::pow(h.beta1, static_cast<double>(s.step + 1));
    if (!(h.learning_rate / bias1 <= std::numeric_limits<float>::max())) return false;
    at::Tensor param = params[i].tensor.detach().clone(), exp_avg = s.exp_avg.clone(),
               exp_avg_sq = s.exp_avg_sq.clone();
    Update(param, grad, exp_avg, exp_avg_sq, s.step + 1, h);
    if (!AllFinite(param) || !AllFinite(exp_avg) || !AllFinite(exp_avg_sq)) return false;
  }
  return true;
}

absl::StatusOr<AdamStepResult> AdamW::Step(std::vector<TrainableParam>& params, const AdamHyper& h,
                                           const StepHooks& hooks) {
  at::NoGradGuard no_grad;
  if (states_.empty()) {
    for (const TrainableParam& p : params) {
      states_.push_back({at::zeros_like(p.tensor), at::zeros_like(p.tensor), 0});
    }
  }
  // Global norm over every defined gradient, as clip_grad_norm_ computes it.
  std::vector<at::Tensor> norms;
  for (TrainableParam& p : params) {
    if (p.tensor.grad().defined()) norms.push_back(at::linalg_vector_norm(p.tensor.grad(), 2));
  }
  AdamStepResult result;
  if (!norms.empty()) {
    at::Tensor total = hooks.global_norm ? at::scalar_tensor(hooks.global_norm(), at::kFloat)
                                         : at::linalg_vector_norm(at::stack(norms), 2);
    result.grad_norm = total.item<double>();
    if (!std::isfinite(result.grad_norm)) {
      DropGradients(params);
      return absl::FailedPreconditionError(absl::StrCat(
          "optim_step refused: the gradient norm is ", result.grad_norm,
          "; the weights and optimizer state are unchanged and the accumulated gradients were discarded"));
    }
    if (h.grad_clip_norm > 0) {
      at::Tensor coef = at::clamp_max(h.grad_clip_norm / (total + 1e-6), 1.0);
      for (TrainableParam& p : params) {
        if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coef);
      }
    }
  }
  // The step is computed aside first: a non-finite weight or moment anywhere
  // (on any rank) refuses the whole step, so the run keeps its last state.
  bool finite = UpdateIsFinite(params, h);
  if (hooks.all_agree) finite = hooks.all_agree(finite);
  if (!finite) {
    DropGradients(params);
    return absl::FailedPreconditionError(
        "optim_step refused: the update would make weights or optimizer moments non-finite in float32 (learning "
        "rate, eps or gradients too large); the weights and optimizer state are unchanged and the accumulated "
        "gradients were discarded");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TrainableParam& p = params[i];
    State& s = states_[i];
    at::Tensor grad = p.tensor.grad();
    if (!grad.defined()) continue;
    Update(p.tensor, grad, s.exp_avg, s.exp_avg_sq, ++s.step, h);
  }
  DropGradients(params);
  result.step = ++step_;
  return result;
}

}  // namespace lathe::runtime
