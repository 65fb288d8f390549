// The parameter rows of each block type lathe builds layers from, named
// under a module prefix ("model.layers.3.self_attn"). Each runtime block
// loads exactly these tensors (tests/params/describe_load_test.cc holds
// the two together).
#ifndef LATHE_PARAMS_BLOCKS_H_
#define LATHE_PARAMS_BLOCKS_H_

#include <cstdint>
#include <string>

#include "core/model_config.h"
#include "params/param_table.h"

namespace lathe::params {

using runtime::ModelConfig;

// An RMSNorm weight `name` of `width` (whole on every rank).
ParamTable DescribeNorm(const std::string& role, const std::string& name, int64_t width);

// A linear layer `module` of [out, in] cut by `cut`, with its adapter in
// `group` (none for kNone).
ParamTable DescribeLinear(const std::string& role, const std::string& module, int64_t out, int64_t in, Cut cut,
                          Group group, int64_t unit = 1);

// Grouped-query softmax attention (runtime/attention.h): q/k/v/o, with the
// config's output gate (q rows doubled), q/k norms and biases.
ParamTable DescribeGqa(const ModelConfig& c, const std::string& prefix);

// Multi-head latent attention (runtime/latent_attention.h): q_a/q_b (or
// q_proj), kv_a, kv_b, o and the two latent norms; adapters on the
// projections from the hidden state and on o.
ParamTable DescribeLatentAttention(const ModelConfig& c, const std::string& prefix);

// Gated DeltaNet (runtime/linear_attention.h): in_proj_qkv (adapted as
// in_proj_q/k/v), z, b, a, the conv, dt_bias, A_log, the gated norm, out_proj.
ParamTable DescribeGatedDeltaNet(const ModelConfig& c, const std::string& prefix);

// A SwiGLU MLP of width `inter` (runtime/ffn.h).
ParamTable DescribeSwiGlu(const std::string& prefix, int64_t hidden, int64_t inter);

// A MoE layer's router ("gate.weight") and expert bank of `experts` experts.
ParamTable DescribeRouterAndExperts(const std::string& prefix, int64_t experts, int64_t hidden, int64_t inter);

// Softmax-routed experts (runtime/ffn.h's RoutedExperts) with the config's
// sigmoid-gated shared expert, if any.
ParamTable DescribeRoutedExperts(const ModelConfig& c, const std::string& prefix);

// Sigmoid-routed experts (runtime/sigmoid_moe.h): the router, its fp32
// correction bias, the experts and the ungated shared experts.
ParamTable DescribeSigmoidExperts(const ModelConfig& c, const std::string& prefix);

}  // namespace lathe::params

#endif  // LATHE_PARAMS_BLOCKS_H_
