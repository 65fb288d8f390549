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

}  // namespace

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
