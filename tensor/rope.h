// The rotary embedding's inverse frequencies and cos/sin factor for each rope
// type lathe supports, computed as transformers' modeling_rope_utils does
// (fp32, the same operations in the same order).
#ifndef LATHE_TENSOR_ROPE_H_
#define LATHE_TENSOR_ROPE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "core/model_config.h"

namespace lathe::runtime {

struct RopeFrequencies {
  at::Tensor inv_freq;            // fp32 [head_dim / 2]
  double attention_factor = 1.0;  // cos and sin are multiplied by it
};

// REQUIRES: `rope` as ParseModelConfig validates it (a supported type,
// factors in range); head_dim even.
//   default: 1 / theta^(2i / head_dim)
//   linear:  default / factor
//   llama3:  default, divided by factor for wavelengths above
//            original_max_position_embeddings / low_freq_factor, smoothly
//            blended between that and / high_freq_factor
//   yarn:    a ramp between default and default / factor over the dimensions
//            the beta_fast / beta_slow rotation counts bound
RopeFrequencies RopeInverseFrequencies(const RopeSettings& rope, int64_t head_dim, at::Device device = at::kCPU);

}  // namespace lathe::runtime

#endif  // LATHE_TENSOR_ROPE_H_
