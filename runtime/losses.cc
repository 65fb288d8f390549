// Loss formulas (see DESIGN.md "Semantics"): cross_entropy, importance
// sampling, PPO, CISPO, DRO and GSPO.
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

// GSPO-token's per-token ratio: every token carries the value of the sequence
// ratio exp(mean over M of (lp - q)), M the tokens sequence_ratio_mask marks
// whose target is not ignored, and the gradient of its own logprob. The mean
// is detached (the sequence ratio is a stop-gradient factor); with M empty the
// sequence log-ratio is taken as 0 (ratio 1) rather than the 0/0 of a mean.
at::Tensor SequenceRatio(const at::Tensor& lp, const at::Tensor& q, const at::Tensor& in_ratio) {
  at::Tensor lp_value = lp.detach();
  at::Tensor marked = in_ratio.sum().clamp_min(1).to(lp.scalar_type());
  at::Tensor log_ratio = at::where(in_ratio, lp_value - q, at::zeros_like(lp_value)).sum() / marked;
  return at::exp(log_ratio + (lp - lp_value));
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

bool PerTokenLoss(const std::string& loss_fn) { return loss_fn != "gspo"; }

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
      at::Tensor ratio;
      if (loss_fn == "gspo") {
        at::Tensor in_ratio = inputs.at("sequence_ratio_mask").ne(0) & keep.ne(0);
        ratio = SequenceRatio(lp, q, in_ratio);
      } else {
        ratio = at::exp(lp - q);
      }
      if (loss_fn == "importance_sampling") {
        loss = -ratio * adv;
      } else {
        at::Tensor lo = Threshold(inputs, config, "clip_low_threshold", lp);
        at::Tensor hi = Threshold(inputs, config, "clip_high_threshold", lp);
        at::Tensor clipped = at::min(at::max(ratio, lo), hi);
        if (loss_fn == "ppo" || loss_fn == "gspo") {
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
