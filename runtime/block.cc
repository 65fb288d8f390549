// Block: the pre-norm residual wiring of a decoder layer.
#include "runtime/block.h"

#include <ATen/ATen.h>

namespace lathe::runtime {

at::Tensor Norm::operator()(const at::Tensor& x) const {
  if (!offset) return RmsNorm(x, weight, eps);
  at::Tensor f = x.to(at::kFloat);
  at::Tensor normed = f * at::rsqrt(f.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (normed * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
}

at::Tensor Block::Forward(const at::Tensor& h, const LayerContext& ctx, size_t layer, MoeStats* stats) const {
  at::Tensor x = h + mixer_->Forward(input_norm_(h), ctx, layer);
  return x + ffn_->Forward(post_norm_(x), ctx, stats);
}

void Block::Visit(const TensorVisitor& fn) {
  fn(input_norm_.weight);
  mixer_->Visit(fn);
  fn(post_norm_.weight);
  ffn_->Visit(fn);
}

}  // namespace lathe::runtime
