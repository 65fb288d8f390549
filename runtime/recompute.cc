// Recomputation in the backward pass (see recompute.h): the same scheme as
// PyTorch's reentrant torch.utils.checkpoint.
#include "runtime/recompute.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>

namespace lathe::runtime {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct FnHolder : torch::CustomClassHolder {
  TensorFn fn;
};

// Inputs: x, the params that require grad (only so the output requires grad
// when x does not; their gradients reach them inside the backward), and fn.
struct RecomputeFn : torch::autograd::Function<RecomputeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params, c10::IValue held) {
    ctx->saved_data["fn"] = held;
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->save_for_backward({x});
    return static_cast<FnHolder*>(held.toCapsule().get())->fn(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const TensorFn& fn = static_cast<FnHolder*>(ctx->saved_data["fn"].toCapsule().get())->fn;
    at::Tensor leaf = x.detach().requires_grad_(x.requires_grad());
    {
      at::AutoGradMode enable(true);
      at::Tensor y = fn(leaf);
      torch::autograd::backward({y}, {grads[0]});
    }
    variable_list out(2 + ctx->saved_data["params"].toInt());
    out[0] = leaf.grad();
    return out;
  }
};

struct GradsHolder : torch::CustomClassHolder {
  std::vector<at::Tensor> grads;  // one per input of BackwardNowFn, in order
};

// Inputs: x and the params that require grad; their gradients were computed
// in the forward and are only scaled here.
struct BackwardNowFn : torch::autograd::Function<BackwardNowFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params, const at::Tensor& value,
                            c10::IValue held) {
    ctx->saved_data["grads"] = held;
    return value.clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* held = static_cast<GradsHolder*>(ctx->saved_data["grads"].toCapsule().get());
    variable_list out;
    for (at::Tensor& g : held->grads) {
      out.push_back(g.defined() ? g.mul(grads[0].to(g.scalar_type())) : at::Tensor());
      g.reset();
    }
    out.push_back(at::Tensor());  // value
    out.push_back(at::Tensor());  // held
    return out;
  }
};

}  // namespace

at::Tensor ChunkedBackwardNow(const RowsLossFn& fn, const at::Tensor& x, int64_t chunk,
                              const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> anchors;
  for (const at::Tensor& p : params) {
    if (p.defined() && p.requires_grad()) anchors.push_back(p);
  }
  const int64_t t = x.size(0);
  const bool differentiable = at::GradMode::is_enabled() && (x.requires_grad() || !anchors.empty());
  at::Tensor total;
  std::vector<at::Tensor> x_grads;
  std::vector<at::Tensor> param_grads(anchors.size());
  for (int64_t begin = 0; begin == 0 || begin < t; begin += chunk) {  // once when x has no rows
    const int64_t n = std::min(chunk, t - begin);
    at::Tensor rows = x.narrow(0, begin, n).detach().requires_grad_(differentiable && x.requires_grad());
    at::Tensor value;
    {
      at::AutoGradMode mode(differentiable);
      value = fn(rows, begin);
      if (differentiable && value.requires_grad()) {
        std::vector<at::Tensor> wrt = anchors;
        if (rows.requires_grad()) wrt.insert(wrt.begin(), rows);
        std::vector<at::Tensor> g = torch::autograd::grad({value}, wrt, {}, /*retain_graph=*/false,
                                                           /*create_graph=*/false, /*allow_unused=*/true);
        size_t k = 0;
        if (rows.requires_grad()) {
          x_grads.push_back(g[k].defined() ? g[k] : at::zeros_like(rows));
          ++k;
        }
        for (size_t i = 0; i < anchors.size(); ++i, ++k) {
          if (!g[k].defined()) continue;
          at::Tensor wide = g[k].to(at::kFloat);
          param_grads[i] = param_grads[i].defined() ? param_grads[i].add_(wide) : wide;
        }
      } else if (differentiable && rows.requires_grad()) {
        x_grads.push_back(at::zeros_like(rows));
      }
    }
    value = value.detach();
    total = total.defined() ? total + value : value;
  }
  if (!differentiable) return total;
  auto holder = c10::make_intrusive<GradsHolder>();
  if (x.requires_grad()) holder->grads.push_back(x_grads.empty() ? at::zeros_like(x) : at::cat(x_grads, 0));
  for (size_t i = 0; i < anchors.size(); ++i) {
    holder->grads.push_back(param_grads[i].defined() ? param_grads[i].to(anchors[i].scalar_type())
                                                     : at::Tensor());
  }
  // x enters only when it requires grad, so the holder's first gradient is
  // x's exactly then.
  if (!x.requires_grad()) {
    return BackwardNowFn::apply(anchors.front(), at::TensorList(anchors).slice(1), total,
                                c10::IValue::make_capsule(std::move(holder)));
  }
  return BackwardNowFn::apply(x, at::TensorList(anchors), total, c10::IValue::make_capsule(std::move(holder)));
}

at::Tensor Recomputed(const TensorFn& fn, const at::Tensor& x, const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> anchors;
  for (const at::Tensor& p : params) {
    if (p.defined() && p.requires_grad()) anchors.push_back(p);
  }
  if (!at::GradMode::is_enabled() || (!x.requires_grad() && anchors.empty())) return fn(x);
  auto holder = c10::make_intrusive<FnHolder>();
  holder->fn = fn;
  // As an at::TensorList (not the vector) so that apply() counts them as inputs.
  return RecomputeFn::apply(x, at::TensorList(anchors), c10::IValue::make_capsule(std::move(holder)));
}

}  // namespace lathe::runtime
