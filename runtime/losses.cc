// Loss formulas (see DESIGN.md "Semantics"): cross_entropy, importance
// sampling, PPO, CISPO and DRO.
#include "runtime/losses.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>


namespace lathe::runtime {
namespace {

// Per-token clip bound: the input tensor when given, else the config value.
at::Tensor Threshold(const std::map<std::string, at::Tensor>& inputs,
                     const std::map<std::string, double>& config, const std::string& key,
                     const at::Tensor& like) {
  auto it = inputs.find(key);
  if (it != inputs.end()) return it->second.to(like.scalar_type());
  return at::full_like(like, config.at(key));
}

}  // namespace

namespace {

// logprob[i, k] = log_softmax(logits[i])[t[i, k]] with a fused backward:
// one [N, V] buffer, grad = onehot·g − softmax·Σ_k g. Only the log-softmax is
// kept for the backward, so the logits can be freed after the forward.
struct TargetLogprobFn : public torch::autograd::Function<TargetLogprobFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& index) {
    at::Tensor log_softmax = at::_log_softmax(logits, 1, /*half_to_float=*/false);
    ctx->save_for_backward({log_softmax, index});
    return log_softmax.gather(1, index);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& log_softmax = saved[0];
    const at::Tensor& index = saved[1];
    at::Tensor g = grads[0];
    at::Tensor grad = at::exp(log_softmax).mul_(-g.sum(1, /*keepdim=*/true));
    grad.scatter_add_(1, index, g);
    return {grad, at::Tensor()};
  }
};

}  // namespace

at::Tensor TargetLogprobs(const at::Tensor& logits, const at::Tensor& targets, const GatherLogprobsFn& gather) {
  at::Tensor ignored = targets.eq(kIgnoreTarget);
  at::Tensor safe = targets.masked_fill(ignored, 0);
  at::Tensor index = safe.dim() == 1 ? safe.unsqueeze(1) : safe;
  at::Tensor lp = gather ? gather(logits, index) : TargetLogprobFn::apply(logits, index);
  if (targets.dim() == 1) lp = lp.squeeze(1);
  return lp.masked_fill(ignored, 0.0);
}

at::Tensor ElementwiseLoss(const std::string& loss_fn, const at::Tensor& lp,
                           const std::map<std::string, at::Tensor>& inputs,
                           const std::map<std::string, double>& config) {
  at::Tensor keep = inputs.at("target_tokens").ne(kIgnoreTarget).to(lp.scalar_type());
  at::Tensor loss;
  if (loss_fn == "cross_entropy") {
    auto w = inputs.find("weights");
    loss = w == inputs.end() ? -lp : -lp * w->second.to(lp.scalar_type());
  } else {
    at::Tensor q = inputs.at("logprobs").to(lp.scalar_type());
    at::Tensor adv = inputs.at("advantages").to(lp.scalar_type());
    if (loss_fn == "dro") {
      double beta = config.at("beta");
      at::Tensor diff = lp - q;
      loss = -(lp * adv - 0.5 * beta * diff * diff);
    } else {
      at::Tensor ratio = at::exp(lp - q);
      if (loss_fn == "importance_sampling") {
        loss = -ratio * adv;
      } else {
        at::Tensor lo = Threshold(inputs, config, "clip_low_threshold", lp);
        at::Tensor hi = Threshold(inputs, config, "clip_high_threshold", lp);
        at::Tensor clipped = at::min(at::max(ratio, lo), hi);
        if (loss_fn == "ppo") {
          loss = -at::minimum(ratio * adv, clipped * adv);
        } else {  // cispo
          loss = -clipped.detach() * lp * adv;
        }
      }
    }
  }
  return loss * keep;
}

}  // namespace lathe::runtime
