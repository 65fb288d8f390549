// AdamW step; the op order follows torch's single-tensor implementation so
// that results agree to rounding.
#include "runtime/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
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

namespace {

// The largest |element| of `t` (its infinity norm), as a double.
double MaxAbs(const at::Tensor& t) {
  return at::linalg_vector_norm(t.detach(), std::numeric_limits<double>::infinity(), {}, false, at::kDouble)
      .item<double>();
}

}  // namespace

bool AdamW::BoundsProveFinite(const std::vector<TrainableParam>& params, const AdamHyper& h, double grad_bound) {
  // Far below float32's largest value, so that the float rounding of each
  // operation cannot carry a bounded value past it.
  constexpr double kLimit = std::numeric_limits<float>::max() / 16;
  if (!(grad_bound <= 1e18)) return false;  // its square must stay finite
  std::vector<State> next(states_.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].tensor.grad().defined()) continue;
    State& s = states_[i];
    if (s.param_bound < 0) s.param_bound = MaxAbs(params[i].tensor);
    if (s.exp_avg_bound < 0) s.exp_avg_bound = MaxAbs(s.exp_avg);
    if (s.exp_avg_sq_bound < 0) s.exp_avg_sq_bound = MaxAbs(s.exp_avg_sq);
    // exp_avg' is a convex combination of exp_avg and the gradient, and so is
    // exp_avg_sq' of exp_avg_sq and its square; the divisor is at least eps.
    const double m = std::max(s.exp_avg_bound, grad_bound);
    const double v = std::max(s.exp_avg_sq_bound, grad_bound * grad_bound);
    const double ratio = m / h.eps;
    const double step_size = h.learning_rate / (1 - std::pow(h.beta1, static_cast<double>(s.step + 1)));
    const double param = s.param_bound * std::fabs(1 - h.learning_rate * h.weight_decay) + step_size * ratio;
    if (!(v <= kLimit && ratio <= kLimit && step_size <= kLimit && param <= kLimit)) return false;
    // A little slack over the exact bounds for rounding.
    next[i].param_bound = param * (1 + 1e-5);
    next[i].exp_avg_bound = m * (1 + 1e-5);
    next[i].exp_avg_sq_bound = v * (1 + 1e-5);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].tensor.grad().defined()) continue;
    states_[i].param_bound = next[i].param_bound;
    states_[i].exp_avg_bound = next[i].exp_avg_bound;
    states_[i].exp_avg_sq_bound = next[i].exp_avg_sq_bound;
  }
  return true;
}

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
  double grad_bound = 0;  // >= every |gradient| element after clipping
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
    grad_bound = result.grad_norm * (1 + 1e-5);
    if (h.grad_clip_norm > 0) {
      at::Tensor coef = at::clamp_max(h.grad_clip_norm / (total + 1e-6), 1.0);
      grad_bound *= std::min(1.0, coef.item<double>() * (1 + 1e-5));
      for (TrainableParam& p : params) {
        if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coef);
      }
    }
  }
  // A non-finite weight or moment anywhere (on any rank) refuses the whole
  // step, so the run keeps its last state. Bounds prove most steps finite at
  // no cost; the rest are computed aside first.
  bool finite = BoundsProveFinite(params, h, grad_bound);
  if (!finite) {
    finite = UpdateIsFinite(params, h);
    for (State& s : states_) s.param_bound = s.exp_avg_bound = s.exp_avg_sq_bound = -1;
  }
  if (hooks.all_agree) finite = hooks.all_agree(finite);
  if (!finite) {
    // Bounds proven for a step that is not taken no longer describe the state.
    for (State& s : states_) s.param_bound = s.exp_avg_bound = s.exp_avg_sq_bound = -1;
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
