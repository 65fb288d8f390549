// Rope types; see rope.h. Each step mirrors transformers' fp32 computation
// (python-scalar / tensor is reciprocal × scalar there, as ATen's is here).
#include "tensor/rope.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace lathe::runtime {
namespace {

// s / t as python computes a scalar over a tensor: t.reciprocal() * s.
at::Tensor Over(double s, const at::Tensor& t) { return t.reciprocal() * s; }

// theta^(2i / dim) for i < dim / 2, fp32.
at::Tensor PosFreqs(double theta, int64_t dim, at::Device device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor exponents = at::arange(0, dim, 2, opts).to(at::kFloat) / static_cast<double>(dim);
  return at::pow(theta, exponents);
}

at::Tensor Llama3(const RopeSettings& r, const at::Tensor& inv_freq) {
  const double old_context = static_cast<double>(r.original_max_position_embeddings);
  const double low_wavelen = old_context / r.low_freq_factor;
  const double high_wavelen = old_context / r.high_freq_factor;
  at::Tensor wavelen = Over(2 * M_PI, inv_freq);
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
  at::Tensor smooth = (Over(old_context, wavelen) - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
  at::Tensor medium = at::logical_not(wavelen < high_wavelen).logical_and(at::logical_not(wavelen > low_wavelen));
  return at::where(medium, smoothed, scaled);
}

at::Tensor Yarn(const RopeSettings& r, int64_t dim, at::Device device) {
  const double base = r.theta;
  at::Tensor pos_freqs = PosFreqs(base, dim, device);
  at::Tensor extrapolation = Over(1.0, pos_freqs);
  at::Tensor interpolation = Over(1.0, r.factor * pos_freqs);
  // The dimension whose wavelength makes `rotations` turns over the original context.
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(static_cast<double>(r.original_max_position_embeddings) / (rotations * 2 * M_PI))) /
           (2 * std::log(base));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // no division by zero
  at::Tensor ramp = ((at::arange(dim / 2, at::TensorOptions().dtype(at::kFloat).device(device)) - low) / (high - low))
                        .clamp(0, 1);
  at::Tensor extrapolation_factor = 1 - ramp;
  return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
}

}  // namespace

RopeFrequencies RopeInverseFrequencies(const RopeSettings& rope, int64_t head_dim, at::Device device) {
  if (rope.type == "yarn") return {Yarn(rope, head_dim, device), rope.attention_factor};
  at::Tensor inv_freq = Over(1.0, PosFreqs(rope.theta, head_dim, device));
  if (rope.type == "linear") inv_freq = inv_freq / rope.factor;
  if (rope.type == "llama3") inv_freq = Llama3(rope, inv_freq);
  return {inv_freq, 1.0};
}

}  // namespace lathe::runtime
